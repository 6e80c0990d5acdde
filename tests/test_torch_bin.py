"""Tests for qwen3moe.torch_bin, the torch-free reader of PyTorch .bin checkpoints.

Files written by real ``torch.save`` need torch (an optional dev dependency); the malformed and malicious files are
built by hand here, opcode by opcode, so those tests run without it.
"""

import builtins
import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from qwen3moe.errors import CheckpointError
from qwen3moe.torch_bin import read_torch_bin, read_torch_bin_index

NEEDS_TORCH = "torch is needed to write real checkpoints with torch.save"


# --- building checkpoints by hand --------------------------------------------------------------------------------


def _pickle_str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _pickle_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _pickle_tuple(values) -> bytes:
    return b"(" + b"".join(_pickle_int(v) for v in values) + b"t"  # MARK ... TUPLE


def _state_dict_pickle(tensors: dict) -> bytes:
    """data.pkl for a state dict, written the way torch.save writes it.

    ``tensors`` maps name -> (storage type, storage key, storage numel, offset, size, stride).
    """
    parts = [b"\x80\x02}("]  # PROTO 2, EMPTY_DICT, MARK
    for name, (storage_type, key, numel, offset, size, stride) in tensors.items():
        storage_id = b"(" + _pickle_str("storage") + f"ctorch\n{storage_type}\n".encode()
        storage_id += _pickle_str(key) + _pickle_str("cpu") + _pickle_int(numel) + b"tQ"  # TUPLE, BINPERSID
        hooks = b"ccollections\nOrderedDict\n)R"  # OrderedDict()
        arguments = storage_id + _pickle_int(offset) + _pickle_tuple(size) + _pickle_tuple(stride) + b"\x89" + hooks
        parts.append(_pickle_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + arguments + b"tR")
    parts.append(b"u.")  # SETITEMS, STOP
    return b"".join(parts)


def _write_torch_zip(path: Path, data_pkl: bytes, storages=None, compression=zipfile.ZIP_STORED, byteorder=None):
    """Pack data.pkl and storage bytes into a zip laid out like torch.save's."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", byteorder or sys.byteorder)
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


def _float_checkpoint(path: Path, values: np.ndarray, offset: int, size: tuple, stride: tuple, **zip_options):
    """A checkpoint with one float32 tensor "w" viewing storage "0", which holds ``values``."""
    data_pkl = _state_dict_pickle({"w": ("FloatStorage", "0", values.size, offset, size, stride)})
    return _write_torch_zip(path, data_pkl, {"0": values.astype(np.float32).tobytes()}, **zip_options)


# --- reading what torch.save writes ------------------------------------------------------------------------------


def _same_bits(array: np.ndarray, tensor) -> bool:
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    expected = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return array.shape == tuple(tensor.shape) and np.ascontiguousarray(array).tobytes() == expected


def test_round_trip_is_bit_for_bit_and_zero_copy(tmp_path):
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    base = torch.randn(6, 8, generator=generator).to(torch.bfloat16)
    state_dict = {
        "bf16": base,
        "bf16_rows_2_to_4": base[2:4],  # shares base's storage at offset 16
        "f16": torch.randn(3, 5, generator=generator).half(),
        "f32_transposed": torch.randn(4, 7, generator=generator).t(),  # non-contiguous, saved as-is
        "f32_scalar": torch.tensor(3.25),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=generator),
        "bool": torch.rand(4, generator=generator) > 0.5,
        "empty": torch.zeros(0, 3),
    }
    torch.save(state_dict, tmp_path / "model.bin")

    tensors = read_torch_bin(tmp_path / "model.bin")

    assert list(tensors) == list(state_dict)
    for name, tensor in state_dict.items():
        assert _same_bits(tensors[name], tensor), name
    assert tensors["bf16"].dtype == ml_dtypes.bfloat16
    assert np.array_equal(tensors["bf16"].view(np.uint16), base.view(torch.int16).numpy().view(np.uint16))
    assert tensors["f16"].dtype == np.float16 and tensors["f32_transposed"].dtype == np.float32
    # Views into the mapped file, not copies: the slice shares memory with its base, the transpose keeps its strides.
    assert np.shares_memory(tensors["bf16"], tensors["bf16_rows_2_to_4"])
    assert not tensors["f32_transposed"].flags.c_contiguous
    assert not any(array.flags.writeable for array in tensors.values())


def test_parameters_and_a_training_wrapper_are_unwrapped(tmp_path):
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    layer = torch.nn.Linear(4, 3)  # its state dict is an OrderedDict of nn.Parameters, with _metadata attached
    torch.save({"model": layer.state_dict(), "step": 7}, tmp_path / "checkpoint.bin")

    tensors = read_torch_bin(tmp_path / "checkpoint.bin")

    assert sorted(tensors) == ["bias", "weight"]
    assert np.array_equal(tensors["weight"], layer.weight.detach().numpy())


def test_sharded_checkpoint_reads_every_shard(tmp_path):
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    first = {"a": torch.randn(2, 3), "b": torch.randn(4).half()}
    second = {"c": torch.randn(3, 2).to(torch.bfloat16)}
    torch.save(first, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(second, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {name: "pytorch_model-00001-of-00002.bin" for name in first}
    weight_map |= {name: "pytorch_model-00002-of-00002.bin" for name in second}
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))

    tensors = read_torch_bin_index(index)

    assert list(tensors) == ["a", "b", "c"]
    for name, tensor in (first | second).items():
        assert _same_bits(tensors[name], tensor), name


def test_missing_shard_names_the_shard_and_a_tensor_in_it(tmp_path):
    _float_checkpoint(tmp_path / "shard-1.bin", np.arange(4), 0, (4,), (1,))
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "shard-1.bin", "lm_head.weight": "shard-2.bin"}}))

    with pytest.raises(CheckpointError, match=r"shard-2\.bin.*lm_head\.weight"):
        read_torch_bin_index(index)


def test_index_must_not_point_outside_its_folder(tmp_path):
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../elsewhere/model.bin"}}))

    with pytest.raises(CheckpointError, match="not a plain file name"):
        read_torch_bin_index(index)


def test_tensor_missing_from_its_shard(tmp_path):
    _float_checkpoint(tmp_path / "shard-1.bin", np.arange(4), 0, (4,), (1,))
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "shard-1.bin", "norm.weight": "shard-1.bin"}}))

    with pytest.raises(CheckpointError, match=r"'norm\.weight'.*shard-1\.bin"):
        read_torch_bin_index(index)


# --- files built by hand: what the reader accepts -----------------------------------------------------------------


def test_hand_built_checkpoint_reads(tmp_path):
    """Guards the builder: the error tests below only mean something if a well-formed hand-built file reads."""
    path = _float_checkpoint(tmp_path / "model.bin", np.arange(12), 2, (3, 2), (1, 3))

    w = read_torch_bin(path)["w"]

    assert np.array_equal(w, [[2, 5], [3, 6], [4, 7]])  # element [i, j] is storage[2 + i + 3 * j]


def test_compressed_members_are_read_into_memory(tmp_path):
    path = _float_checkpoint(tmp_path / "model.bin", np.arange(6), 0, (2, 3), (3, 1), compression=zipfile.ZIP_DEFLATED)

    assert np.array_equal(read_torch_bin(path)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_reader_does_not_import_torch(tmp_path):
    path = _float_checkpoint(tmp_path / "model.bin", np.arange(4), 0, (4,), (1,))
    script = (
        "import sys\n"
        "from qwen3moe.torch_bin import read_torch_bin\n"
        f"read_torch_bin({str(path)!r})\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)


# --- malicious files ---------------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call to ``function(argument)``: what an attacker puts in a model file."""

    def __init__(self, function, argument):
        self.function = function
        self.argument = argument

    def __reduce__(self):
        return self.function, (self.argument,)


def _payloads(marker: Path) -> dict:
    return {
        f"{os.system.__module__}.system": _Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.mark.parametrize("refused", ["posix.system", "builtins.eval"])
def test_malicious_pickle_in_a_zip_is_refused_and_never_run(tmp_path, refused):
    marker = tmp_path / "pwned"
    payloads = _payloads(marker)
    if refused not in payloads:
        pytest.skip(f"os.system lives in {os.system.__module__} on this platform")
    data_pkl = pickle.dumps({"w": payloads[refused]}, protocol=2, fix_imports=False)  # keep "builtins" as is
    path = _write_torch_zip(tmp_path / "model.bin", data_pkl)

    with pytest.raises(CheckpointError, match=rf"refuses to load '{refused}' from .*model\.bin"):
        read_torch_bin(path)
    assert not marker.exists()


def test_malicious_raw_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.bin"
    for payload in _payloads(marker).values():
        path.write_bytes(pickle.dumps(payload, protocol=2))

        with pytest.raises(CheckpointError, match="not a zip archive"):
            read_torch_bin(path)
        assert not marker.exists()


def test_unknown_storage_type_is_refused(tmp_path):
    data_pkl = _state_dict_pickle({"w": ("ComplexFloatStorage", "0", 2, 0, (2,), (1,))})
    path = _write_torch_zip(tmp_path / "model.bin", data_pkl, {"0": bytes(16)})

    with pytest.raises(CheckpointError, match="refuses to load 'torch.ComplexFloatStorage'"):
        read_torch_bin(path)


@pytest.mark.parametrize(
    "target", [b"ctorch\nFloatStorage\n", b"ctorch._utils\n_rebuild_tensor_v2\n"], ids=["storage-type", "rebuild"]
)
def test_a_file_cannot_alter_the_stand_ins_for_the_next(tmp_path, target):
    # GLOBAL target; {"dtype": 1, "__defaults__": ()}; BUILD, which writes that into target's __dict__; STOP
    state = b"}(" + _pickle_str("dtype") + _pickle_int(1) + _pickle_str("__defaults__") + b")u"
    hostile = _write_torch_zip(tmp_path / "hostile.bin", b"\x80\x02" + target + state + b"b.")
    good = _float_checkpoint(tmp_path / "good.bin", np.arange(4), 0, (4,), (1,))

    with pytest.raises(CheckpointError):
        read_torch_bin(hostile)
    assert np.array_equal(read_torch_bin(good)["w"], np.arange(4, dtype=np.float32))


# --- damaged and foreign files -----------------------------------------------------------------------------------


def test_garbage_is_not_a_zip(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(256).replace(b"PK", b"pk"))

    with pytest.raises(CheckpointError, match="not a zip archive.*re-save it with a recent torch.*safetensors"):
        read_torch_bin(path)


def test_legacy_checkpoint_is_explained(tmp_path):
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    path = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)

    with pytest.raises(CheckpointError, match="legacy pre-1.6 checkpoint"):
        read_torch_bin(path)


def test_truncated_checkpoint(tmp_path):
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    path = tmp_path / "model.bin"
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(CheckpointError, match="damaged or truncated"):
        read_torch_bin(path)


def test_every_truncation_is_a_checkpoint_error(tmp_path):
    whole = _float_checkpoint(tmp_path / "whole.bin", np.arange(6), 0, (6,), (1,)).read_bytes()
    cut = tmp_path / "cut.bin"
    for length in range(0, len(whole), 7):
        cut.write_bytes(whole[:length])
        with pytest.raises(CheckpointError):
            read_torch_bin(cut)


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [(0, (4, 2), (2, 1)), (2, (2, 3), (3, 1)), (0, (3, 3), (1, 3))],
    ids=["too-many-elements", "offset-past-the-end", "strided-past-the-end"],
)
def test_storage_too_small_for_its_tensor(tmp_path, offset, size, stride):
    path = _float_checkpoint(tmp_path / "model.bin", np.arange(6), offset, size, stride)

    with pytest.raises(CheckpointError, match=r"tensor 'w' .* storage holds only 6 elements"):
        read_torch_bin(path)


def test_storage_member_missing(tmp_path):
    data_pkl = _state_dict_pickle({"w": ("FloatStorage", "7", 4, 0, (4,), (1,))})
    path = _write_torch_zip(tmp_path / "model.bin", data_pkl)

    with pytest.raises(CheckpointError, match=r"tensor 'w' lives in storage member 'archive/data/7', which is missing"):
        read_torch_bin(path)


def test_storage_member_of_the_wrong_size(tmp_path):
    data_pkl = _state_dict_pickle({"w": ("FloatStorage", "0", 8, 0, (4,), (1,))})
    path = _write_torch_zip(tmp_path / "model.bin", data_pkl, {"0": bytes(16)})

    with pytest.raises(CheckpointError, match="holds 16 bytes, but data.pkl says 8 x float32 = 32 bytes"):
        read_torch_bin(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights/readme.txt", "hello")

    with pytest.raises(CheckpointError, match="not a torch.save checkpoint"):
        read_torch_bin(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [([1, 2], "holds a list, not a state dict"), ({"w": 1}, "entry 'w' of the state dict is a int, not a tensor")],
)
def test_pickle_that_is_not_a_state_dict(tmp_path, content, message):
    path = _write_torch_zip(tmp_path / "model.bin", pickle.dumps(content, protocol=2))

    with pytest.raises(CheckpointError, match=message):
        read_torch_bin(path)


def test_other_byte_order_is_refused(tmp_path):
    other = "big" if sys.byteorder == "little" else "little"
    path = _float_checkpoint(tmp_path / "model.bin", np.arange(4), 0, (4,), (1,), byteorder=other)

    with pytest.raises(CheckpointError, match=f"stores '{other}'-endian tensors"):
        read_torch_bin(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="cannot open"):
        read_torch_bin(tmp_path / "absent.bin")
