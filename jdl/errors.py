"""User-facing errors: one line, no traceback.

Everything a user can cause with a flag, a file or a missing dataset raises a
subclass of `JdlError`. Experiment entrypoints catch exactly this class and print
its message as one line (see `jdl.cli.run`); any other exception is a bug in jdl
and keeps its traceback.
"""


class JdlError(Exception):
  """Base class of errors caused by user input, printed as one line."""


class ConfigError(JdlError, ValueError):
  """A bad flag, hyperparameter or combination of them."""


class DataError(JdlError):
  """A dataset that is unknown, missing, or cannot be prepared."""


class CheckpointError(JdlError):
  """A checkpoint that is damaged or does not fit the model."""


class TrainingError(JdlError):
  """Training cannot go on, e.g. a non-finite loss under --nan_policy=stop."""


class Interrupted(JdlError):
  """The run was stopped by a signal after saving a checkpoint to resume from.

  Arguments:
    message: what happened and how to continue.
    signum: the signal number; the process exit status is 128 + signum, as a
      shell reports a process killed by that signal.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum
