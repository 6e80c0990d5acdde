"""Find the weight files of a Hugging Face model folder and open them lazily as one name -> array mapping.

Supported layouts, in the order they are looked for:
  1. ``model.safetensors.index.json`` + shards (how large checkpoints are published),
  2. one or more ``*.safetensors`` files,
  3. ``pytorch_model.bin.index.json`` + shards, or a single ``pytorch_model.bin``: read by a restricted reader
     that accepts only tensor storage records and never executes anything from the file (see ``torch_bin``).
Arrays stay memory-mapped in their checkpoint dtype (bf16, f16 or f32); checking names and shapes happens in
``weights.py`` before any compute.
"""

import json
import mmap
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import CheckpointError
from .safetensors_file import open_safetensors
from .torch_bin import read_torch_bin, read_torch_bin_index

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"


def open_checkpoint(model_dir: str | Path) -> dict[str, np.ndarray]:
    """All tensors of the folder, by their on-disk names."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    if (model_dir / SAFETENSORS_INDEX).is_file():
        return _open_safetensors_index(model_dir / SAFETENSORS_INDEX)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return _merge(files, open_safetensors)
    if (model_dir / TORCH_INDEX).is_file():
        return read_torch_bin_index(model_dir / TORCH_INDEX)
    if (model_dir / TORCH_SINGLE).is_file():
        return read_torch_bin(model_dir / TORCH_SINGLE)
    raise CheckpointError(
        f"no weights in {model_dir}: expected {SAFETENSORS_INDEX}, *.safetensors, {TORCH_INDEX} or {TORCH_SINGLE}"
    )


def _open_safetensors_index(index_path: Path) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index, it needs a 'weight_map' object ({e})") from None
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    for shard, names in shards.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a plain file name in the model folder")
        if not (index_path.parent / shard).is_file():
            raise CheckpointError(
                f"{index_path}: shard {shard} is missing from the folder (it should hold {names[0]!r} "
                f"and {len(names) - 1} more tensors)"
            )
    tensors: dict[str, np.ndarray] = {}
    for shard, names in _progress(shards.items(), index_path.parent, list(shards)):
        found = open_safetensors(index_path.parent / shard)
        for name in names:
            if name not in found:
                raise CheckpointError(f"{index_path}: the index places {name!r} in {shard}, but that shard lacks it")
            tensors[name] = found[name]
    return tensors


def _merge(files: list[Path], open_file) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, Path] = {}
    for f in _progress(files, files[0].parent, [f.name for f in files]):
        for name, array in open_file(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {where[name].name} and {f.name}")
            tensors[name], where[name] = array, f
    return tensors


def _progress(items, folder: Path, file_names: list[str]):
    """A progress bar over shards, shown only for checkpoints of 1 GiB or more (where opening takes a moment)."""
    total = sum((folder / n).stat().st_size for n in file_names)
    return tqdm(items, total=len(file_names), desc="opening shards", unit="shard", disable=total < 2**30)


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python names it only from 3.13


def populate(arrays) -> None:
    """Map every page of the files behind ``arrays`` into this process now, as llama.cpp's MAP_POPULATE does.

    A memory map costs nothing until a page is touched; then each first touch of a 4 KiB page is a page fault. A
    decode step that reaches experts no step has used yet pays those faults on the hot path (for Qwen3-30B-A3B,
    ~2,000 faults per new expert), so a fast backend populates the maps once at load. Reads the whole checkpoint
    (from the page cache when it is there); a progress bar shows it for large models.
    """
    maps = {id(m): m for m in map(_file_map, arrays) if m is not None}
    total = sum(len(m) for m in maps.values())
    for m in tqdm(maps.values(), desc="populating weight pages", unit="file", disable=total < 2**30):
        try:
            m.madvise(MADV_POPULATE_READ)
        except OSError:  # an older kernel: at least start reading ahead
            m.madvise(mmap.MADV_WILLNEED)


def _file_map(a) -> mmap.mmap | None:
    """The mmap object an array is a view of, if any."""
    while isinstance(a, np.ndarray):
        if isinstance(a, np.memmap) and a._mmap is not None:
            return a._mmap
        a = a.base
    return a if isinstance(a, mmap.mmap) else None
