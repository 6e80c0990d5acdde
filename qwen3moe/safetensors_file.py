"""Read a ``.safetensors`` file as memory-mapped NumPy arrays, checking every claim its header makes.

The format is three parts::

    [8 bytes: little-endian u64 N][N bytes: JSON header][raw tensor bytes]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
start of the raw bytes), plus an optional ``__metadata__`` entry of strings. Because the raw bytes are plain
little-endian arrays, a tensor is just a ``numpy.memmap`` at the right offset: nothing is read until it is used, so a
checkpoint larger than RAM can still be opened, and the operating system shares the pages between processes.

We parse the header ourselves (rather than through the ``safetensors`` package) so that a truncated file or a header
that lies about sizes produces an error naming the tensor, instead of a crash or a silently wrong array.
"""

import json
import struct
from pathlib import Path

import ml_dtypes  # registers bfloat16 with NumPy
import numpy as np

from .errors import CheckpointError

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit; a larger N means a corrupt file


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header without __metadata__, byte offset where tensor data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{path}: header claims {n} bytes but the file has {size}; the file is truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def open_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Map every tensor of one file; arrays are read-only views of the file."""
    path = Path(path)
    header, data_start = read_header(path)
    data_bytes = path.stat().st_size - data_start
    # One read-only map of the whole file; each tensor is a view of its bytes (one map per tensor would cost the
    # process one kernel mapping each: ~37k for Qwen3-235B).
    data = np.memmap(path, dtype=np.uint8, mode="r")[data_start:] if data_bytes else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        dtype, shape, (begin, end) = _parse_entry(path, name, info)
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(shape)} {info['dtype']} ({expected} bytes) "
                f"but its data_offsets span {end - begin} bytes; the header is inconsistent"
            )
        if not 0 <= begin <= end <= data_bytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies at bytes {begin}..{end} of the data section, which has only "
                f"{data_bytes} bytes; the file is truncated (re-download or re-save it)"
            )
        tensors[name] = data[begin:end].view(dtype).reshape(shape)
    return tensors


def _parse_entry(path: Path, name: str, info) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}")
    if info["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
    try:
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or data_offsets {info!r}") from None
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a negative dimension in shape {list(shape)}")
    return DTYPES[info["dtype"]], shape, (begin, end)
