"""The errors qwen3moe raises on bad input.

Bad input raises a ``ValueError`` subclass, and a device that cannot serve (missing, failed, out of memory) a
``RuntimeError`` one, so that callers who do not care about the kind can catch one thing; each message says what was
wrong and what to do about it.
"""

from contextlib import contextmanager


class CheckpointError(ValueError):
    """A model folder or weight file that cannot be used: missing, misshapen, corrupt or unsafe."""


class UnsupportedConfigError(ValueError):
    """A config.json that asks for something this engine does not implement."""


class DeviceError(RuntimeError):
    """A device or backend that this installation cannot serve."""


class OutOfDeviceMemory(DeviceError):
    """Weights, a KV cache or a step that do not fit in the memory left on their device (a GPU, or the host)."""


def size(nbytes: int) -> str:
    """A number of bytes as people read it: MiB below a GiB, GiB above."""
    return f"{nbytes / 2**20:.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


@contextmanager
def fits_in_memory(what: str, advice: str):
    """Turn a MemoryError raised inside (NumPy's, or CuPy's OutOfMemoryError, a subclass of it) into an
    OutOfDeviceMemory that says what did not fit (``what``: "... does not fit") and what to do."""
    try:
        yield
    except MemoryError as e:
        raise OutOfDeviceMemory(f"{what} in the memory left on the device ({e}); {advice}") from None


class RankFailure(RuntimeError):
    """A rank of a model split over several devices failed or could not start; the whole group has stopped."""
