"""The one exception type the command line turns into a single error line."""


class HetlmError(Exception):
  """A problem with the user's input, flags or workdir; its message is shown as is."""


def input_error(path, problem: str) -> HetlmError:
  """The error for bad input: the file named first, then the problem."""
  return HetlmError(f"{path}: {problem}")
