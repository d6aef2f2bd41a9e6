"""The errors a user can act on. Each is one line on the command line (`error: ...`, exit status 2, or
the error's own `exit_status`); anything else is a bug and keeps its traceback.

Imports nothing: every layer of the engine raises these.
"""


class EngineError(Exception):
    """An error the user can fix (bad path, bad config, bad data); the CLI prints it as one line."""


class ConfigError(EngineError, ValueError):
    """A config value or model path that cannot work."""


class DownloadError(ConfigError):
    """A named base's files could not be fetched (offline, registry unreachable, no pip): the message is
    the one-line way to get them by hand."""


class DataError(EngineError, ValueError):
    """Bad input data; the message starts with `file:line:`."""


class FeedbackError(DataError):
    """Bad feedback data; the message starts with `file:line:`."""


class ConstitutionError(DataError):
    """A bad constitution line; the message starts with `file:line:`."""


class RewardError(EngineError):
    """A reward source returned something that is not one finite number per response."""


class RunLockedError(EngineError):
    """Another live process holds OUT."""


class CheckpointError(ConfigError):
    """OUT/checkpoint.pt cannot be read, or was written by a different stage, config or data."""


class StaleCheckpointError(CheckpointError):
    """OUT/checkpoint.pt was written with a different config or different input content: resuming it would
    not repeat a run of this config (the pipeline starts such a stage over)."""


class WriteError(EngineError):
    """OUT could not be written mid-run (disk full, quota, a read-only remount): the run stopped; every file
    it had written before is intact (each is written atomically), so the same command resumes from the
    last good checkpoint once the disk has room."""

    exit_status = 4  # the CLI's status for a run stopped by its file system (2: bad input, 3: diverged)


class NonFiniteError(EngineError):
    """A non-finite loss, gradient norm or weight: the run stopped and kept its last good checkpoint."""

    exit_status = 3  # the CLI's status for a run that started and diverged (2: bad input)
