"""The error a user's run raises when it cannot start or go on: main.py prints its message, not a traceback."""


class RunError(RuntimeError):
  """A run cannot start or go on; the message says why and what to do. `exit_code` is main.py's exit status."""

  def __init__(self, message: str, *, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code
