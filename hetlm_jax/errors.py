"""The one exception type the command line turns into a single error line."""


class HetlmError(Exception):
  """A problem with the user's input, flags or workdir; its message is shown as is."""


def input_error(path, problem: str) -> HetlmError:
  return HetlmError(f"{path}: {problem}")
