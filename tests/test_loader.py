"""Loading a model folder: file layouts, dtypes, packed experts, tied embeddings, and every way a folder can be wrong.

Every test goes through the public entry point (``Qwen3MoeForCausalLM(folder)``), so what is checked is what a user
gets. Logits are compared on fresh random prompts; weights are fresh random each run (see conftest.py's seed).
"""

import json
import mmap
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from qwen3moe import CheckpointError, Qwen3MoeForCausalLM
from qwen3moe.synthetic import TINY_CONFIG, random_weights
from qwen3moe.weights import SparseMoeBlock

BF16 = np.dtype(ml_dtypes.bfloat16)
E, I, H = TINY_CONFIG["num_experts"], TINY_CONFIG["moe_intermediate_size"], TINY_CONFIG["hidden_size"]
MOE_LAYERS = [1, 2]  # TINY_CONFIG: mlp_only_layers [0], decoder_sparse_step 1 (checked in test_config.py)
INDEX = "model.safetensors.index.json"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def prompt(rng, n=10):
    return rng.integers(0, TINY_CONFIG["vocab_size"], n)


def load_error(folder) -> str:
    """The CheckpointError message of loading ``folder`` (fails the test if loading succeeds or raises another type)."""
    with pytest.raises(CheckpointError) as e:
        Qwen3MoeForCausalLM(folder)
    return str(e.value)


def all_weight_arrays(w):
    """(description, array) for every array of a loaded Qwen3MoeWeights."""
    out = [("embed_tokens", w.embed_tokens), ("norm", w.norm), ("lm_head", w.lm_head)]
    for i, layer in enumerate(w.layers):
        a = layer.self_attn
        out += [(f"layer {i} {n}", getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm",
                                                            "k_norm")]
        out += [(f"layer {i} input_layernorm", layer.input_layernorm),
                (f"layer {i} post_attention_layernorm", layer.post_attention_layernorm)]
        mlps = list(enumerate(layer.mlp.experts)) if isinstance(layer.mlp, SparseMoeBlock) else [("dense", layer.mlp)]
        if isinstance(layer.mlp, SparseMoeBlock):
            out.append((f"layer {i} router", layer.mlp.gate))
        for j, m in mlps:
            out += [(f"layer {i} expert {j} {n}", getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    return out


def backed_by_mmap(a: np.ndarray) -> bool:
    """True when ``a`` is a view (possibly of a view ...) of an mmap of the file, not a copy in memory."""
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, mmap.mmap)


def pack_experts(tensors: dict, swap_halves: bool = False) -> dict:
    """transformers 5's in-memory form: experts.gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""
    out = dict(tensors)
    for i in MOE_LAYERS:
        p = f"model.layers.{i}.mlp.experts."
        gate = [out.pop(f"{p}{j}.gate_proj.weight") for j in range(E)]
        up = [out.pop(f"{p}{j}.up_proj.weight") for j in range(E)]
        down = [out.pop(f"{p}{j}.down_proj.weight") for j in range(E)]
        halves = (up, gate) if swap_halves else (gate, up)
        out[p + "gate_up_proj"] = np.stack([np.concatenate([a, b]) for a, b in zip(*halves)])
        out[p + "down_proj"] = np.stack(down)
    return out


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file, parsed here, independently of the code under test."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][name]


# --- layouts ------------------------------------------------------------------------------------------------------


def test_sharded_checkpoint_with_index_loads_every_tensor(tiny_model_dir, tiny_tensors):
    assert (tiny_model_dir / INDEX).is_file()
    assert {p.name for p in tiny_model_dir.glob("*.safetensors")} == {SHARD1, SHARD2}
    w = Qwen3MoeForCausalLM(tiny_model_dir).weights

    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in w.layers] == [False, True, True]
    t = tiny_tensors
    np.testing.assert_array_equal(w.embed_tokens, t["model.embed_tokens.weight"])
    np.testing.assert_array_equal(w.lm_head, t["lm_head.weight"])
    np.testing.assert_array_equal(w.layers[0].mlp.down_proj, t["model.layers.0.mlp.down_proj.weight"])
    np.testing.assert_array_equal(w.layers[2].mlp.gate, t["model.layers.2.mlp.gate.weight"])
    for j in (0, 5, E - 1):
        for n in ("gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(getattr(w.layers[1].mlp.experts[j], n),
                                          t[f"model.layers.1.mlp.experts.{j}.{n}.weight"])
    np.testing.assert_array_equal(w.layers[2].self_attn.k_norm, t["model.layers.2.self_attn.k_norm.weight"])


def test_single_file_and_unindexed_shards_give_the_same_logits(tiny_model_dir, make_model_dir, compute_logits, rng):
    single = make_model_dir(shards=1)
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    assert not (single / INDEX).exists()
    unindexed = make_model_dir(shards=3)
    (unindexed / INDEX).unlink()  # three *.safetensors files and no index: all are read
    ids = prompt(rng)

    reference = compute_logits(tiny_model_dir, ids)
    np.testing.assert_array_equal(compute_logits(single, ids), reference)
    np.testing.assert_array_equal(compute_logits(unindexed, ids), reference)


def test_layer_types_of_the_loaded_model_follow_the_config(make_model_dir, tiny_config):
    config = tiny_config | {"num_hidden_layers": 5, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    folder = make_model_dir(tensors=random_weights(config, seed=1), config=config)
    w = Qwen3MoeForCausalLM(folder).weights
    # layer i is MoE iff i not in [3] and (i + 1) % 2 == 0: only layer 1 (layer 3 is excluded by mlp_only_layers)
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in w.layers] == [False, True, False, False, False]


def test_dense_qwen3_checkpoint_loads(make_model_dir, tiny_config, compute_logits, rng):
    config = {k: v for k, v in tiny_config.items() if k not in ("num_experts", "num_experts_per_tok",
                                                                "moe_intermediate_size", "mlp_only_layers")}
    config["model_type"] = "qwen3"
    model = Qwen3MoeForCausalLM(make_model_dir(tensors=random_weights(config, seed=2), config=config))
    assert not any(isinstance(layer.mlp, SparseMoeBlock) for layer in model.weights.layers)
    assert np.isfinite(compute_logits(model, prompt(rng))).all()


# --- dtypes and memory maps -------------------------------------------------------------------------------------


def test_bf16_f16_f32_checkpoints_give_equal_logits(make_model_dir, tiny_tensors, compute_logits, rng):
    """bf16 -> f32 widening is exact, so one set of values saved in three dtypes must give the same logits.

    Values below 2**-14 are zeroed first: below that f16 is subnormal and would round some bf16 values.
    """
    exact = {n: np.where(np.abs(w.astype(np.float32)) < 2.0**-14, 0, w).astype(BF16) for n, w in tiny_tensors.items()}
    folders = {dt: make_model_dir(tensors={n: w.astype(dt) for n, w in exact.items()}, name=np.dtype(dt).name)
               for dt in (BF16, np.float16, np.float32)}
    ids = prompt(rng, 12)

    logits = {}
    for dt, folder in folders.items():
        model = Qwen3MoeForCausalLM(folder)
        assert {a.dtype for _, a in all_weight_arrays(model.weights)} == {np.dtype(dt)}, "the checkpoint dtype is kept"
        logits[np.dtype(dt).name] = compute_logits(model, ids)
    ref = logits["float32"]
    scale = float(np.abs(ref).max())
    for name in ("bfloat16", "float16"):
        np.testing.assert_allclose(logits[name], ref, rtol=0, atol=1e-6 * scale, err_msg=name)


@pytest.mark.parametrize("layout", ["per_expert", "packed"])
def test_weights_are_memory_mapped_in_the_checkpoint_dtype(layout, tiny_model_dir, make_model_dir, tiny_tensors):
    folder = tiny_model_dir if layout == "per_expert" else make_model_dir(tensors=pack_experts(tiny_tensors))
    arrays = all_weight_arrays(Qwen3MoeForCausalLM(folder).weights)

    assert len(arrays) == 3 + 3 * 8 + 3 + 2 * (1 + 3 * E)
    not_mapped = [d for d, a in arrays if not backed_by_mmap(a)]
    assert not_mapped == [], "copied into memory instead of mapped"
    assert [d for d, a in arrays if a.dtype != BF16] == [], "bf16 must stay bf16"
    assert [d for d, a in arrays if a.flags.writeable] == [], "views of the checkpoint must be read-only"


# --- packed experts and tied embeddings ---------------------------------------------------------------------------


def test_packed_experts_give_exactly_the_per_expert_logits(tiny_model_dir, make_model_dir, tiny_tensors,
                                                          compute_logits, rng):
    packed = make_model_dir(tensors=pack_experts(tiny_tensors))
    swapped = make_model_dir(tensors=pack_experts(tiny_tensors, swap_halves=True))
    ids = prompt(rng, 16)

    reference = compute_logits(tiny_model_dir, ids)
    np.testing.assert_array_equal(compute_logits(packed, ids), reference)
    # guard: the order of the halves matters, so the equality above really checks "gate rows first"
    assert not np.allclose(compute_logits(swapped, ids), reference)


def test_packed_experts_with_the_wrong_shape(make_model_dir, tiny_tensors):
    tensors = pack_experts(tiny_tensors)
    name = "model.layers.2.mlp.experts.gate_up_proj"
    tensors[name] = tensors[name][:, 1:]  # one row short: [8, 63, 64]
    message = load_error(make_model_dir(tensors=tensors))
    assert "layer 2" in message
    assert repr(name) in message
    assert f"has shape [{E}, {2 * I - 1}, {H}]" in message
    assert f"expected [{E}, {2 * I}, {H}]" in message


def test_tied_embeddings_with_and_without_lm_head_in_the_file(make_model_dir, tiny_config, tiny_tensors,
                                                               compute_logits, rng):
    untied_as_tied = dict(tiny_tensors, **{"lm_head.weight": tiny_tensors["model.embed_tokens.weight"]})
    tied_config = tiny_config | {"tie_word_embeddings": True}
    without = {n: w for n, w in tiny_tensors.items() if n != "lm_head.weight"}
    ids = prompt(rng)

    reference = compute_logits(make_model_dir(tensors=untied_as_tied), ids)  # untied, lm_head == embeddings
    np.testing.assert_array_equal(compute_logits(make_model_dir(tensors=without, config=tied_config), ids), reference)
    np.testing.assert_array_equal(compute_logits(make_model_dir(tensors=untied_as_tied, config=tied_config), ids),
                                  reference)
    # guard: the folder's own lm_head differs from the embeddings, so the equalities above test the tie
    assert not np.allclose(compute_logits(make_model_dir(tensors=tiny_tensors), ids), reference)


def test_untied_model_without_lm_head(make_model_dir, tiny_tensors):
    tensors = {n: w for n, w in tiny_tensors.items() if n != "lm_head.weight"}
    message = load_error(make_model_dir(tensors=tensors))
    assert "1 missing tensors" in message
    assert "lm_head.weight" in message


# --- tensors that do not match the config ---------------------------------------------------------------------------


def test_missing_expert_tensors_name_layer_expert_and_projection(make_model_dir, tiny_tensors):
    gone = ["model.layers.2.mlp.experts.5.up_proj.weight", "model.layers.1.mlp.experts.0.down_proj.weight"]
    tensors = {n: w for n, w in tiny_tensors.items() if n not in gone}
    message = load_error(make_model_dir(tensors=tensors))
    assert "2 missing tensors" in message  # every problem at once, not just the first
    assert "model.layers.2.mlp.experts.5.up_proj.weight (layer 2, expert 5, up_proj)" in message
    assert "model.layers.1.mlp.experts.0.down_proj.weight (layer 1, expert 0, down_proj)" in message


def test_wrong_shapes_say_expected_and_found(make_model_dir, tiny_tensors):
    tensors = dict(tiny_tensors)
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((49, H), BF16)  # 2 kv heads x 24 = 48 rows
    tensors["model.layers.2.mlp.experts.3.down_proj.weight"] = np.zeros((I, H), BF16)  # transposed
    message = load_error(make_model_dir(tensors=tensors))
    assert "2 tensors with the wrong shape" in message
    assert f"model.layers.1.self_attn.k_proj.weight (layer 1, k_proj): expected [48, {H}], found [49, {H}]" in message
    assert (f"model.layers.2.mlp.experts.3.down_proj.weight (layer 2, expert 3, down_proj): "
            f"expected [{H}, {I}], found [{I}, {H}]") in message


def test_unknown_extra_tensor_is_reported_by_name(make_model_dir, tiny_tensors):
    tensors = dict(tiny_tensors, **{"model.layers.1.mlp.shared_expert.gate_proj.weight": np.zeros((I, H), BF16)})
    message = load_error(make_model_dir(tensors=tensors))
    assert "1 unexpected tensors" in message
    assert "model.layers.1.mlp.shared_expert.gate_proj.weight" in message


def test_integer_weights_are_refused(make_model_dir, tiny_tensors):
    tensors = dict(tiny_tensors, **{"model.norm.weight": np.ones(H, np.int32)})
    message = load_error(make_model_dir(tensors=tensors))
    assert "model.norm.weight: int32" in message
    assert "bf16/f16/f32" in message


def mixtral_names(tensors: dict) -> dict:
    """The same weights under Mixtral's names: block_sparse_moe, w1/w2/w3, no q/k norms, every layer sparse."""
    out = {}
    for name, w in tensors.items():
        if "_norm.weight" in name and "self_attn" in name:
            continue
        name = name.replace(".mlp.experts.", ".block_sparse_moe.experts.")
        name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        name = name.replace("gate_proj", "w1").replace("down_proj", "w2").replace("up_proj", "w3")
        if ".mlp." not in name:  # layer 0's dense MLP has no Mixtral counterpart
            out[name] = w
    for name in [n for n in out if n.startswith("model.layers.1.block_sparse_moe.")]:
        out[name.replace("layers.1.", "layers.0.")] = out[name]
    return out


def test_mixtral_checkpoint_is_recognised(make_model_dir, tiny_tensors):
    message = load_error(make_model_dir(tensors=mixtral_names(tiny_tensors)))
    assert "Unsupported weight naming scheme for Qwen3-MoE" in message
    assert "Mixtral-style 'block_sparse_moe'" in message


def test_dense_weights_under_an_moe_config_are_recognised(make_model_dir, tiny_config):
    dense = random_weights(tiny_config | {"num_experts": 0}, seed=3)  # every layer has mlp.{gate,up,down}_proj
    message = load_error(make_model_dir(tensors=dense))
    assert "Unsupported weight naming scheme for Qwen3-MoE" in message
    assert "declares 8 experts but the files hold no expert or router tensors" in message
    assert "dense model's MLP weights" in message


# --- damaged files --------------------------------------------------------------------------------------------------


def test_truncated_shard_names_the_tensor_that_is_cut(make_model_dir):
    folder = make_model_dir()
    header, data = safetensors_parts(folder / SHARD2)
    last = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1] if kv[0] != "__metadata__" else -1)
    end = last[1]["data_offsets"][1]
    assert end == len(data)
    raw = (folder / SHARD2).read_bytes()
    (folder / SHARD2).write_bytes(raw[:-10])  # an interrupted download

    message = load_error(folder)
    assert SHARD2 in message
    assert repr(last[0]) in message
    assert f"..{end} of the data section, which has only {end - 10} bytes" in message
    assert "truncated" in message


def test_file_shorter_than_its_length_prefix(make_model_dir):
    folder = make_model_dir()
    (folder / SHARD1).write_bytes(b"\x10\x00\x00")
    message = load_error(folder)
    assert SHARD1 in message and "3 bytes, too short" in message


def _lie(folder: Path, kind: str) -> tuple[Path, list[str]]:
    """Make one shard's header lie in one way; return the file and the words its error must contain."""
    name = "model.layers.1.self_attn.k_proj.weight"  # [48, 64] bf16: 6144 bytes
    path = shard_of(folder, name)
    header, data = safetensors_parts(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if kind == "span":
        header[name]["shape"] = [48, 63]
        write_safetensors(path, header, data)
        return path, [repr(name), "shape [48, 63] BF16 (6048 bytes)", "span 6144 bytes"]
    if kind == "beyond":
        header[name]["data_offsets"] = [len(data) + 64, len(data) + 64 + 6144]
        write_safetensors(path, header, data)
        return path, [repr(name), f"bytes {len(data) + 64}..{len(data) + 64 + 6144}", f"only {len(data)} bytes"]
    if kind == "header_length":
        path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
        return path, [f"header claims {len(raw)} bytes but the file has {len(raw)}"]
    if kind == "not_json":
        path.write_bytes(raw[:8] + b"{\"model.norm.weight\": [" + b"~" * (n - 23) + raw[8 + n:])
        return path, ["header is not valid JSON"]
    if kind == "not_object":
        write_safetensors(path, [1, 2], data)
        return path, ["header must be a JSON object"]
    if kind == "dtype":
        header[name]["dtype"] = "F8_E4M3"
        write_safetensors(path, header, data)
        return path, [repr(name), "unsupported dtype 'F8_E4M3'"]
    if kind == "negative":
        header[name]["shape"] = [-48, -64]
        write_safetensors(path, header, data)
        return path, [repr(name), "negative dimension"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["span", "beyond", "header_length", "not_json", "not_object", "dtype", "negative"])
def test_header_that_lies(make_model_dir, kind):
    folder = make_model_dir()
    path, words = _lie(folder, kind)
    message = load_error(folder)
    assert str(path) in message
    for w in words:
        assert w in message


def test_rewritten_header_without_a_lie_still_loads(make_model_dir):
    """Guards the helpers above: re-serialising a header unchanged gives a loadable file."""
    folder = make_model_dir()
    path = shard_of(folder, "model.layers.1.self_attn.k_proj.weight")
    write_safetensors(path, *safetensors_parts(path))
    Qwen3MoeForCausalLM(folder)


# --- index and file-set problems -----------------------------------------------------------------------------------


def test_index_naming_a_missing_shard(make_model_dir):
    folder = make_model_dir()
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    in_shard2 = [n for n, s in weight_map.items() if s == SHARD2]
    (folder / SHARD2).unlink()

    message = load_error(folder)
    assert f"shard {SHARD2} is missing" in message
    assert f"{in_shard2[0]!r} and {len(in_shard2) - 1} more tensors" in message


def test_index_naming_a_tensor_the_shard_lacks(make_model_dir):
    folder = make_model_dir()
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"]["model.layers.1.mlp.experts.8.up_proj.weight"] = SHARD1
    (folder / INDEX).write_text(json.dumps(index))

    message = load_error(folder)
    assert f"places 'model.layers.1.mlp.experts.8.up_proj.weight' in {SHARD1}, but that shard lacks it" in message


def test_index_that_is_not_an_index(make_model_dir):
    folder = make_model_dir()
    (folder / INDEX).write_text(json.dumps({"metadata": {}}))
    message = load_error(folder)
    assert INDEX in message and "'weight_map'" in message


def test_index_must_not_point_outside_its_folder(make_model_dir, tmp_path):
    folder = make_model_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(folder / SHARD2, elsewhere / SHARD2)
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {n: (f"../elsewhere/{s}" if s == SHARD2 else s) for n, s in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))

    message = load_error(folder)
    assert f"../elsewhere/{SHARD2}" in message


def test_tensor_in_two_single_files(make_model_dir, tiny_tensors):
    folder = make_model_dir(shards=1)
    (folder / "model.safetensors").unlink()
    names = sorted(tiny_tensors)
    first = {n: tiny_tensors[n] for n in names[::2]} | {"model.norm.weight": tiny_tensors["model.norm.weight"]}
    second = {n: tiny_tensors[n] for n in names[1::2]} | {"model.norm.weight": tiny_tensors["model.norm.weight"]}
    save_file(first, str(folder / "a.safetensors"))
    save_file(second, str(folder / "b.safetensors"))

    message = load_error(folder)
    assert "'model.norm.weight' appears in both a.safetensors and b.safetensors" in message


def test_folder_without_weights(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / f, folder / f)
    message = load_error(folder)
    assert f"no weights in {folder}" in message
    assert "*.safetensors" in message and "pytorch_model.bin" in message


# --- PyTorch .bin folders -------------------------------------------------------------------------------------------


def test_pytorch_bin_folder_gives_the_safetensors_logits(tiny_model_dir, tiny_tensors, tmp_path, compute_logits, rng):
    torch = pytest.importorskip("torch", reason="torch is needed to write a pytorch_model.bin with torch.save")
    folder = tmp_path / "bin"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith("model"):  # config and tokenizer files, not the weights
            shutil.copy(f, folder / f.name)
    state_dict = {n: torch.from_numpy(w.view(np.int16).copy()).view(torch.bfloat16) for n, w in tiny_tensors.items()}
    torch.save(state_dict, folder / "pytorch_model.bin")
    assert not list(folder.glob("*.safetensors"))
    ids = prompt(rng, 12)

    model = Qwen3MoeForCausalLM(folder)
    assert model.weights.embed_tokens.dtype == BF16
    np.testing.assert_array_equal(compute_logits(model, ids), compute_logits(tiny_model_dir, ids))


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    """Token ids past vocab_size would index past the embedding table: refuse the folder up front."""
    from qwen3moe import CheckpointError, Qwen3MoeForCausalLM
    from qwen3moe.synthetic import TINY_CONFIG, write_synthetic_checkpoint

    folder = write_synthetic_checkpoint(tmp_path / "m", config=dict(TINY_CONFIG, vocab_size=200))
    with pytest.raises(CheckpointError, match="tokenizer.json has 261 tokens but the model's vocab_size is 200"):
        Qwen3MoeForCausalLM(folder)
