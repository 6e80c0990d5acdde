"""The errors qwen3moe raises on bad input.

Each one is a ``ValueError`` subclass so that callers who do not care about the kind can catch one thing, and each
message says what was wrong and what to do about it.
"""


class CheckpointError(ValueError):
    """A model folder or weight file that cannot be used: missing, misshapen, corrupt or unsafe."""


class UnsupportedConfigError(ValueError):
    """A config.json that asks for something this engine does not implement."""


class DeviceError(RuntimeError):
    """A device or backend that this installation cannot serve."""


class RankFailure(RuntimeError):
    """A rank of a model split over several devices failed or could not start; the whole group has stopped."""
