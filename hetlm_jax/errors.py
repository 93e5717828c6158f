"""The one exception type the command line turns into a single error line."""


class HetlmError(Exception):
  """A problem with the user's input, flags or workdir; its message is shown as is."""


def one_line(e: BaseException) -> str:
  """An exception's message on one line of at most about 300 characters (its type's name when it has none)."""
  text = " ".join(str(e).split())
  return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)


def input_error(path, problem: str) -> HetlmError:
  """The error for bad input: the file named first, then the problem."""
  return HetlmError(f"{path}: {problem}")
