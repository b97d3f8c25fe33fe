"""The error a user's run raises when it cannot start or go on: main.py prints its message, not a traceback."""


class RunError(RuntimeError):
  """A run cannot start or go on; the message says why and what to do. `exit_code` is main.py's exit status."""

  def __init__(self, message: str, *, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code


# What a user's input or environment causes (bad config, missing or corrupt files, a run that cannot go on): shown
# as its message alone, by main.py and by the web app. Anything else is a bug and keeps its traceback.
USER_ERRORS = (RunError, ValueError, KeyError, OSError, ImportError)


def user_message(error: BaseException) -> str:
  """The text to show for a user error (a KeyError's str() would add quotes around its message)."""
  return error.args[0] if isinstance(error, KeyError) and error.args else str(error)
