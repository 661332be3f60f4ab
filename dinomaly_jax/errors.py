"""Every exception that means bad input from the user; `main` prints them as one message.

This module imports nothing: any layer may raise these without pulling in the stack.
"""


class ConfigError(ValueError):
  """A config value is missing, unknown or out of range (the message names the field)."""


class DataError(ValueError):
  """Bad input data: the message names the file or folder and what was expected."""


class CheckpointError(ValueError):
  """A PyTorch checkpoint that cannot be converted; the message lists every problem."""


class EncoderWeightsError(ValueError):
  """The encoder weights are missing or do not fit the configured model."""


class IncompatibleWorkdirError(RuntimeError):
  """The work directory holds a run of a different configuration."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite."""


class DiskFullError(OSError):
  """A disk has no room for what the run must write (the message names the folder)."""


class StorageError(OSError):
  """An object store still failed after its client's retries (the message says what failed)."""


class UsageError(ValueError):
  """A bad command line: an unknown flag or config field, a value that does not parse."""


class Interrupted(Exception):
  """Training stopped on SIGINT or SIGTERM after saving a checkpoint (the message says how
  to resume); `exit_code` is 128 + the signal number, as a shell reports a signal."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


USER_ERRORS = (ConfigError, DataError, CheckpointError, EncoderWeightsError,
               IncompatibleWorkdirError, NonFiniteLossError, UsageError, FileNotFoundError, DiskFullError)
