"""The exceptions distload raises, each naming what the user must look at."""

__all__ = ["DistloadError", "CheckpointError", "ConfigError", "PlanError", "LoadError", "RankError",
           "CallAborted", "UsageError"]


class DistloadError(RuntimeError):
    """Base class of every error distload raises on purpose."""


class CheckpointError(DistloadError):
    """A checkpoint file is missing, malformed or inconsistent; the message names the file
    (and the tensor, where one is at fault)."""


class ConfigError(CheckpointError):
    """A checkpoint's config.json holds a value the architecture cannot use; the message
    names the file and the field."""


class UsageError(DistloadError):
    """The arguments are wrong: a bad value, or ranks started with different arguments
    (the CLI exits with 2)."""


class PlanError(DistloadError):
    """The model cannot be planned onto the given world and memory budgets."""


class LoadError(DistloadError):
    """Materializing the plan failed: a missing or unexpected key, a shape mismatch."""


class RankError(DistloadError):
    """Another rank failed; the message carries that rank's own error, and `cause` the
    name of its type (e.g. ``"UsageError"``: the CLI exits with that cause's code on every
    rank), where known."""

    def __init__(self, message: str = "", *, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class CallAborted(RankError):
    """Rank 0 ended a pipelined call at a call or batch boundary (a bad input, its batch
    iterator raising); the message carries its error. The pipeline is still usable."""
