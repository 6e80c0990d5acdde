"""Read PyTorch ``.bin`` checkpoints without torch and without running anything they contain.

What ``torch.save(state_dict, "pytorch_model.bin")`` writes (the zip format torch has used since 1.6) is a zip
archive whose members all sit in one folder, named after the file (``pytorch_model/``) or simply ``archive/``::

    archive/data.pkl      the state dict as a pickle: names -> tensor *records*, no tensor bytes
    archive/data/0        the raw bytes of storage "0", one member per storage
    archive/data/1        ...
    archive/byteorder     "little" or "big" (newer torch writes it; older files are little-endian)
    archive/version, ...  format bookkeeping this reader does not need

Inside data.pkl each tensor is the call ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``.
Its ``storage`` argument is not pickled inline: it is a *persistent id*, the tuple
``("storage", torch.BFloat16Storage, "0", "cpu", numel)``, which pickle hands to ``persistent_load``. The key ("0")
names the member ``archive/data/0`` that holds the bytes. Several tensors may view one storage (a slice has an
offset, a transpose has swapped strides), which is why offset, size and stride travel with every tensor.

Why everything else is refused: a pickle is a small program for a stack machine, and its GLOBAL + REDUCE opcodes
import any function by name and call it with any arguments; ``os.system("...")`` is three opcodes away. So
``pickle.load`` (and ``torch.load`` without ``weights_only=True``) runs whatever the file says. This reader's
unpickler resolves a global only if it is on a short allow-list, and each allowed name maps to a local stand-in
that records where a tensor lives and does nothing else. Every other name is refused before it is even imported,
so nothing in a downloaded model folder is executed. A file that is not a zip (the legacy pre-1.6 format is a bare
pickle stream) is never unpickled at all.

Why memory maps: torch stores members uncompressed (ZIP_STORED), so each storage's bytes sit verbatim in the file.
We map the file once and hand out read-only NumPy views into it: a 60 GB checkpoint costs address space, not a
60 GB copy, and the OS reads a page only when a tensor touches it. The price is that the zip's CRC-32 of mapped
members is not checked (that would read every byte); sizes and bounds are. Compressed members, which torch never
writes but other zip tools might, are read into memory instead.
"""

import collections
import io
import json
import math
import pickle
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided

from .errors import CheckpointError

__all__ = ["read_torch_bin", "read_torch_bin_index"]

# The legacy storage classes torch names in data.pkl, and the NumPy dtype of their elements.
_STORAGE_DTYPES = {
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "HalfStorage": np.dtype(np.float16),
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

# Training scripts often save {"state_dict": weights, "epoch": 3, ...}; these keys are unwrapped (see _unwrap).
_WRAPPER_KEYS = ("state_dict", "model")

# What zipfile raises on a damaged archive: it was not written for hostile input, so more than BadZipFile gets out
# (a bad name is a UnicodeDecodeError, a bad offset a ValueError, a flipped "encrypted" or version field a
# RuntimeError or its subclass NotImplementedError).
_DAMAGED_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, ValueError)

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, file name length, extra field length
_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"


# The stand-ins below are NamedTuples, which are immutable: pickle's BUILD opcode, which sets attributes on the
# object on top of its stack, cannot alter them, so one file cannot change how the next one is read.


class _StorageType(NamedTuple):
    """Stand-in for a class such as ``torch.BFloat16Storage``: data.pkl only uses it as a label for the dtype."""

    name: str
    dtype: np.dtype


class _StorageRecord(NamedTuple):
    """One storage as data.pkl describes it: which member holds its bytes, and how many elements of which dtype."""

    key: str
    dtype: np.dtype
    numel: int


class _TensorRecord(NamedTuple):
    """One tensor as data.pkl describes it: a view (offset, size, stride in elements) into a storage.

    The fields hold whatever data.pkl passed; _tensor_view checks them before using them.
    """

    storage: object
    offset: object
    size: object
    stride: object


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_requires_grad_hooks_and_metadata):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: note where the tensor lives. The checks come later, when the
    tensor's name is known and can go into the error message. Autograd flags and hooks mean nothing to an array."""
    return _TensorRecord(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_requires_grad_and_hooks):
    """Stand-in for ``torch._utils._rebuild_parameter``: an ``nn.Parameter`` is just its tensor here."""
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild dicts of tensor records; see the module docstring for why."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"qwen3moe refuses to load '{module}.{name}' from {self._path}: only tensor storage records are "
                "accepted; nothing in a model folder is executed"
            ) from None

    def persistent_load(self, pid):
        match pid:
            case ("storage", _StorageType(dtype=dtype), str(key), _location, int(numel)) if numel >= 0:
                return _StorageRecord(key, dtype, numel)
        raise CheckpointError(
            f"{self._path}: data.pkl holds a persistent record {pid!r:.200} that is not a supported tensor storage "
            f"(supported storages: {', '.join(_STORAGE_DTYPES)})"
        )


def read_torch_bin(path) -> dict[str, np.ndarray]:
    """Read every tensor of a ``torch.save`` checkpoint as a NumPy array, keyed by its state-dict name.

    Arrays are read-only views into a memory map of the file wherever possible, so the file must stay in place while
    they are in use. Tensors that share a storage in the file share memory here too. bf16 tensors come back as
    ``ml_dtypes.bfloat16``. A top-level ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped.
    Raises CheckpointError for anything that is not a well-formed checkpoint of plain tensors.
    """
    path = Path(path)
    with _open_zip(path) as archive:
        prefix = _archive_prefix(archive, path)
        _check_byteorder(archive, prefix, path)
        records = _state_dict_records(_unpickle(_read_member(archive, prefix + "data.pkl", path), path), path)
        storages = _Storages(archive, prefix, path)
        tensors = {}
        for name, record in records.items():
            tensors[name] = _tensor_view(name, record, storages.get(name, record.storage), path)
        return tensors


def read_torch_bin_index(index_path) -> dict[str, np.ndarray]:
    """Read a sharded checkpoint through its ``pytorch_model.bin.index.json``.

    The index's ``weight_map`` (tensor name -> shard file in the same folder) is the contract: exactly the tensors it
    names are returned, in its order, and each must be in the shard it names. Tensors a shard holds beyond that are
    ignored. Raises CheckpointError for a bad index, a missing shard (naming a tensor that lives in it) or a tensor
    missing from its shard.
    """
    index_path = Path(index_path)
    weight_map = _weight_map(index_path)
    first_tensor_of = {}  # shard file name -> a tensor it holds, for error messages
    for tensor, shard in weight_map.items():
        first_tensor_of.setdefault(shard, tensor)
    shards = {shard: _read_shard(index_path, shard, tensor) for shard, tensor in first_tensor_of.items()}
    tensors = {}
    for tensor, shard in weight_map.items():
        if tensor not in shards[shard]:
            raise CheckpointError(f"{index_path} puts tensor {tensor!r} in {shard}, but that shard has no such tensor")
        tensors[tensor] = shards[shard][tensor]
    return tensors


def _open_zip(path: Path) -> zipfile.ZipFile:
    """Open the checkpoint as a zip, turning every way that can fail into a CheckpointError that says what to do."""
    try:
        return zipfile.ZipFile(path)
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}: {exc.strerror or exc}") from exc
    except _DAMAGED_ZIP_ERRORS:
        raise _not_a_zip_error(path) from None


def _not_a_zip_error(path: Path) -> CheckpointError:
    """Tell a damaged zip (it starts like one) from something that never was one, e.g. a legacy checkpoint."""
    with open(path, "rb") as file:
        looks_like_zip = file.read(4) == _LOCAL_HEADER_SIGNATURE
    if looks_like_zip:
        return CheckpointError(f"{path} is a damaged or truncated zip archive; download or copy it again")
    return CheckpointError(
        f"{path} is not a zip archive, so it is not a checkpoint in the format torch.save has written since torch 1.6 "
        "(it may be a legacy pre-1.6 checkpoint, which is a bare pickle and never loaded here, or not a checkpoint at "
        "all); re-save it with a recent torch, or convert it to safetensors, in an environment where you trust it"
    )


def _archive_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    """The folder every member lives in, e.g. ``"archive/"``; found as the folder of the one ``data.pkl``."""
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{path} is a zip archive but not a torch.save checkpoint: expected one '<folder>/data.pkl' member, "
            f"found {len(pickles)}"
        )
    return pickles[0].removesuffix("data.pkl")


def _check_byteorder(archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
    """Refuse files whose numbers are stored in the other byte order: the views we hand out are never converted."""
    member = prefix + "byteorder"
    if member not in archive.namelist():
        return  # written before torch recorded it: little-endian
    file_order = _read_member(archive, member, path).decode("ascii", errors="replace").strip()
    if file_order != sys.byteorder:
        raise CheckpointError(
            f"{path} stores {file_order!r}-endian tensors but this machine is {sys.byteorder}-endian; "
            "re-save the checkpoint on a matching machine or convert it to safetensors"
        )


def _read_member(archive: zipfile.ZipFile, member: str, path: Path) -> bytes:
    """Read one zip member into memory; a damaged member is a CheckpointError, not a zlib or zipfile crash."""
    try:
        return archive.read(member)
    except (*_DAMAGED_ZIP_ERRORS, OSError) as exc:
        raise CheckpointError(f"{path}: member {member!r} is damaged ({exc}); download or copy the file again") from exc


def _unpickle(data: bytes, path: Path):
    """Run data.pkl through the restricted unpickler."""
    try:
        return _RestrictedUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged pickle can fail in many ways (EOFError, TypeError, UnpicklingError, ...)
        raise CheckpointError(f"{path}: data.pkl is damaged ({type(exc).__name__}: {exc})") from exc


def _state_dict_records(obj, path: Path) -> dict[str, _TensorRecord]:
    """Check that data.pkl held a state dict, i.e. a dict of name -> tensor, and nothing else."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of name -> tensor")
    state_dict = _unwrap(obj)
    for name, value in state_dict.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRecord):
            raise CheckpointError(
                f"{path}: entry {name!r} of the state dict is a {type(value).__name__}, not a tensor; "
                "expected a dict of name -> tensor as model.state_dict() returns"
            )
    return state_dict


def _unwrap(obj: dict) -> dict:
    """Return ``obj["state_dict"]`` or ``obj["model"]`` when ``obj`` is obviously a wrapper around the weights:
    it holds no tensors of its own and one of those keys holds a dict. Only one level is unwrapped."""
    if any(isinstance(value, _TensorRecord) for value in obj.values()):
        return obj
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key]
    return obj


class _Storages:
    """The storages of one archive as flat NumPy arrays, each made once and shared by every tensor that views it."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: Path):
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._file_map = None  # a uint8 memory map of the whole file, made when the first stored member needs it
        self._arrays = {}

    def get(self, tensor_name: str, storage) -> np.ndarray:
        """The storage behind ``tensor_name`` as a 1-D array of its dtype."""
        if not isinstance(storage, _StorageRecord):
            raise CheckpointError(f"{self._path}: tensor {tensor_name!r} has no valid storage record")
        if storage not in self._arrays:
            self._arrays[storage] = self._load(tensor_name, storage)
        return self._arrays[storage]

    def _load(self, tensor_name: str, storage: _StorageRecord) -> np.ndarray:
        member = f"{self._prefix}data/{storage.key}"
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise CheckpointError(
                f"{self._path}: tensor {tensor_name!r} lives in storage member {member!r}, which is missing"
            ) from None
        expected = storage.numel * storage.dtype.itemsize
        if info.file_size != expected:
            raise CheckpointError(
                f"{self._path}: storage member {member!r} of tensor {tensor_name!r} holds {info.file_size} bytes, "
                f"but data.pkl says {storage.numel} x {storage.dtype} = {expected} bytes"
            )
        if info.compress_type == zipfile.ZIP_STORED:
            raw = self._mapped(info)
        else:
            raw = np.frombuffer(_read_member(self._archive, member, self._path), dtype=np.uint8)
        return raw.view(storage.dtype)

    def _mapped(self, info: zipfile.ZipInfo) -> np.ndarray:
        """The bytes of an uncompressed member, as a view into the memory-mapped file.

        A member's data starts after its *local* header: 30 fixed bytes, the file name and an extra field. The extra
        field's length can differ from the one in the central directory (torch pads it to align the data), so it is
        read from the local header itself.
        """
        if self._file_map is None:
            # Viewed as a plain ndarray so that tensors are ordinary arrays; the map lives on as their base.
            self._file_map = np.memmap(self._path, dtype=np.uint8, mode="r").view(np.ndarray)
        file_map = self._file_map
        header = bytes(file_map[info.header_offset : info.header_offset + _LOCAL_HEADER.size])
        if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_HEADER_SIGNATURE:
            raise CheckpointError(f"{self._path}: the zip header of {info.filename!r} is damaged")
        _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > len(file_map):
            raise CheckpointError(f"{self._path} is truncated: {info.filename!r} runs past the end of the file")
        return file_map[start : start + info.file_size]


def _tensor_view(name: str, record: _TensorRecord, storage: np.ndarray, path: Path) -> np.ndarray:
    """Build the tensor ``name`` as a view of its storage, after checking that the view stays inside it."""
    offset, size, stride = record.offset, record.size, record.stride
    if not (_is_index(offset) and _is_index_tuple(size) and _is_index_tuple(stride) and len(size) == len(stride)):
        raise CheckpointError(
            f"{path}: tensor {name!r} has an invalid layout (offset {offset!r}, size {size!r}, stride {stride!r})"
        )
    count = math.prod(size)
    if count == 0:
        return storage[:0].reshape(size)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1  # one past the last element it reads
    if extent > storage.size:
        raise CheckpointError(
            f"{path}: tensor {name!r} (size {size}, stride {stride}, offset {offset}) reaches element {extent} of its "
            f"storage, but the storage holds only {storage.size} elements; the file is damaged"
        )
    if stride == _contiguous_strides(size):
        return storage[offset : offset + count].reshape(size)
    byte_strides = tuple(s * storage.itemsize for s in stride)
    return as_strided(storage[offset:], shape=size, strides=byte_strides, writeable=False)


def _contiguous_strides(size: tuple) -> tuple:
    """The strides, in elements, of a row-major (C-contiguous) tensor of this size."""
    strides = []
    step = 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _is_index(value) -> bool:
    return type(value) is int and value >= 0


def _is_index_tuple(value) -> bool:
    return isinstance(value, tuple) and all(_is_index(item) for item in value)


def _weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file, checked to map names to plain file names in the index's folder."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {index_path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path} is not valid JSON: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} has no 'weight_map' object of tensor name -> shard file name")
    for tensor, shard in weight_map.items():
        if Path(shard).name != shard or shard in ("", ".", ".."):
            # A shard must sit next to the index: a path here could point anywhere on the machine.
            raise CheckpointError(f"{index_path} puts tensor {tensor!r} in {shard!r}, which is not a plain file name")
    return weight_map


def _read_shard(index_path: Path, shard: str, example_tensor: str) -> dict[str, np.ndarray]:
    """Read one shard named by the index, or say which shard is missing and what it should have held."""
    shard_path = index_path.parent / shard
    if not shard_path.is_file():
        raise CheckpointError(
            f"{index_path} names shard {shard!r} (holding tensor {example_tensor!r}, among others), "
            f"but {shard_path} does not exist"
        )
    return read_torch_bin(shard_path)
