"""config.json -> Qwen3MoeConfig: both spellings, the layer-type rule, and clear refusals of what is not implemented."""

import itertools
import json
import math

import pytest

from qwen3moe.config import Qwen3MoeConfig, config_from_dict, load_config
from qwen3moe.errors import CheckpointError, UnsupportedConfigError
from qwen3moe.synthetic import TINY_CONFIG

# A config as the released Qwen3 checkpoints spell it, with values that differ from every default so that a field
# read from the wrong key (or not at all) shows up.
RELEASED = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 500,
    "hidden_size": 96,
    "intermediate_size": 160,
    "num_hidden_layers": 5,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "head_dim": 20,
    "rms_norm_eps": 3e-6,
    "rope_theta": 5_000_000.0,
    "rope_scaling": None,
    "max_position_embeddings": 640,
    "tie_word_embeddings": True,
    "num_experts": 12,
    "num_experts_per_tok": 3,
    "moe_intermediate_size": 40,
    "norm_topk_prob": True,
    "decoder_sparse_step": 2,
    "mlp_only_layers": [3],
    "hidden_act": "silu",
    "use_sliding_window": False,
    "attention_bias": False,
    "eos_token_id": [7, 9],
}


def transformers5_spelling(released: dict) -> dict:
    """The same model as transformers 5's save_pretrained writes it."""
    raw = dict(released)
    raw["num_local_experts"] = raw.pop("num_experts")
    raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), "rope_type": "default"}
    del raw["rope_scaling"]
    return raw


def write_config(folder, raw) -> None:
    (folder / "config.json").write_text(json.dumps(raw) if isinstance(raw, dict) else raw)


# --- the two spellings ----------------------------------------------------------------------------------------------


def test_both_spellings_give_the_same_config(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_config(tmp_path / "a", RELEASED)
    write_config(tmp_path / "b", transformers5_spelling(RELEASED))

    released, saved = load_config(tmp_path / "a"), load_config(tmp_path / "b")

    assert released == saved
    # and both read the values, not defaults
    assert released.num_experts == 12
    assert released.rope_theta == 5_000_000.0
    assert released.head_dim == 20  # from config, not hidden_size / heads (= 16)
    assert released.num_experts_per_tok == 3
    assert released.moe_intermediate_size == 40
    assert released.decoder_sparse_step == 2
    assert released.mlp_only_layers == (3,)
    assert released.rms_norm_eps == 3e-6
    assert released.max_position_embeddings == 640
    assert released.tie_word_embeddings is True
    assert released.eos_token_id == (7, 9)


def test_config_written_by_installed_transformers_loads(tmp_path):
    """Not our re-statement of the v5 spelling: the file the installed transformers really writes."""
    transformers = pytest.importorskip("transformers", reason="needs transformers to write a config.json")
    fields = {k: v for k, v in RELEASED.items() if k not in ("architectures", "model_type", "rope_scaling")}
    transformers.Qwen3MoeConfig(**fields).save_pretrained(tmp_path)

    assert load_config(tmp_path) == config_from_dict(RELEASED)


def test_config_without_rope_theta_uses_transformers_default():
    raw = {k: v for k, v in RELEASED.items() if k not in ("rope_theta", "rope_scaling")}
    assert config_from_dict(raw).rope_theta == 10_000.0


# --- the layer-type rule --------------------------------------------------------------------------------------------


def rule(layer: int, num_experts: int, mlp_only_layers, decoder_sparse_step: int) -> str:
    """REFERENCE.md: MoE when num_experts > 0, not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    moe = num_experts > 0 and layer not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0
    return "moe" if moe else "dense"


@pytest.mark.parametrize("num_experts, step, mlp_only", list(itertools.product(
    [0, 4], [1, 2, 3], [[], [0], [1, 4], [0, 2, 5, 6]])))
def test_layer_types_follow_the_rule(num_experts, step, mlp_only):
    raw = dict(RELEASED, num_hidden_layers=7, num_experts=num_experts, decoder_sparse_step=step,
               mlp_only_layers=mlp_only, num_experts_per_tok=2)
    config = config_from_dict(raw)

    expected = [rule(i, num_experts, mlp_only, step) for i in range(7)]
    assert config.layer_types == expected
    assert config.moe_layers == [i for i, kind in enumerate(expected) if kind == "moe"]
    assert [config.is_moe_layer(i) for i in range(7)] == [kind == "moe" for kind in expected]


def test_layer_rule_examples_by_hand():
    """Two cases worked out by hand, so the re-statement above is not the only witness."""
    every_other = config_from_dict(dict(RELEASED, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert every_other.layer_types == ["dense", "moe", "dense", "dense", "dense", "moe"]
    real = config_from_dict(dict(RELEASED, num_hidden_layers=4, decoder_sparse_step=1, mlp_only_layers=[]))
    assert real.layer_types == ["moe"] * 4


def test_dense_qwen3_is_accepted_with_no_moe_layers():
    raw = {k: v for k, v in RELEASED.items() if k not in ("num_experts", "num_experts_per_tok",
                                                           "moe_intermediate_size", "decoder_sparse_step",
                                                           "mlp_only_layers", "norm_topk_prob")}
    raw["model_type"] = "qwen3"
    config = config_from_dict(raw)

    assert config.model_type == "qwen3"
    assert config.num_experts == 0
    assert config.moe_layers == []
    assert config.layer_types == ["dense"] * RELEASED["num_hidden_layers"]


def test_dense_qwen3_ignores_stray_expert_fields():
    """A 'qwen3' (dense) config never has MoE layers, even if expert fields are present."""
    config = config_from_dict(dict(RELEASED, model_type="qwen3"))
    assert config.num_experts == 0 and config.moe_layers == []


def test_moe_config_with_zero_experts_is_all_dense():
    config = config_from_dict(dict(RELEASED, num_experts=0))
    assert config.layer_types == ["dense"] * RELEASED["num_hidden_layers"]


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "qwen2_moe", None])
def test_other_model_types_are_refused(model_type):
    raw = dict(RELEASED, model_type=model_type)
    if model_type is None:
        del raw["model_type"]
    with pytest.raises(UnsupportedConfigError) as e:
        config_from_dict(raw)
    assert repr(model_type) in str(e.value)
    assert "qwen3_moe" in str(e.value)  # says what is supported


@pytest.mark.parametrize("change, words", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     ["rope scaling", "'yarn'"]),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, ["rope scaling", "'yarn'"]),  # the older key
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["rope scaling", "'linear'"]),
    ({"use_sliding_window": True, "sliding_window": 4096}, ["use_sliding_window", "sliding-window"]),
    ({"attention_bias": True}, ["attention_bias"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "'gelu'", "silu"]),
    ({"layer_types": ["full_attention", "sliding_attention"] + ["full_attention"] * 3}, ["sliding_attention"]),
])
def test_unimplemented_features_are_refused(change, words):
    with pytest.raises(UnsupportedConfigError) as e:
        config_from_dict(dict(RELEASED, **change), source="the/config.json")
    message = str(e.value)
    assert message.startswith("the/config.json")
    for w in words:
        assert w in message


def test_yarn_in_transformers5_rope_parameters_is_refused():
    raw = transformers5_spelling(RELEASED)
    raw["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UnsupportedConfigError, match="rope scaling 'yarn'"):
        config_from_dict(raw)


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(UnsupportedConfigError) as e:
        config_from_dict(dict(RELEASED, num_attention_heads=6, num_key_value_heads=4))
    assert "num_attention_heads (6) must be a multiple of num_key_value_heads (4)" in str(e.value)


@pytest.mark.parametrize("top_k", [13, 0])
def test_top_k_outside_1_to_num_experts(top_k):
    with pytest.raises(UnsupportedConfigError) as e:
        config_from_dict(dict(RELEASED, num_experts=12, num_experts_per_tok=top_k))
    assert "num_experts_per_tok must be in 1..12" in str(e.value)
    assert f"found {top_k}" in str(e.value)


@pytest.mark.parametrize("field, value", [("rms_norm_eps", -1e-6), ("rms_norm_eps", 0.0), ("rms_norm_eps", math.nan),
                                          ("rope_theta", 0.0), ("rope_theta", math.inf),
                                          ("max_position_embeddings", 0), ("intermediate_size", 0)])
def test_non_positive_sizes_and_constants(field, value):
    with pytest.raises(UnsupportedConfigError) as e:
        config_from_dict(dict(RELEASED, **{field: value}))  # (with dense layers: their width counts)
    assert f"{field} must be" in str(e.value) and f"found {value}" in str(e.value)


def test_a_dense_width_is_not_needed_without_dense_layers():
    every_layer_moe = dict(RELEASED, intermediate_size=0, mlp_only_layers=[], decoder_sparse_step=1)
    assert config_from_dict(every_layer_moe).intermediate_size == 0


def test_every_inconsistency_is_reported_at_once():
    with pytest.raises(UnsupportedConfigError) as e:
        config_from_dict(dict(RELEASED, num_key_value_heads=4, head_dim=21, moe_intermediate_size=0))
    message = str(e.value)
    assert "multiple of num_key_value_heads" in message
    assert "head_dim must be even" in message and "21" in message
    assert "moe_intermediate_size must be positive" in message


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads"])
def test_missing_required_field(tmp_path, field):
    raw = dict(RELEASED)
    del raw[field]
    write_config(tmp_path, raw)
    with pytest.raises(CheckpointError) as e:
        load_config(tmp_path)
    assert f"required field {field!r} is missing" in str(e.value)
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("text, words", [
    ('{"model_type": "qwen3_moe", "hidden_size": 64,', ["not valid JSON"]),
    ("", ["not valid JSON"]),
    ("[1, 2, 3]", ["must hold a JSON object", "list"]),
])
def test_invalid_json(tmp_path, text, words):
    write_config(tmp_path, text)
    with pytest.raises(CheckpointError) as e:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    assert "not found" in str(e.value)


def test_tiny_config_is_what_the_other_tests_assume():
    """The loader and CLI tests count on TINY_CONFIG's layer layout: dense, MoE, MoE with 8 experts, top-2."""
    config = config_from_dict(TINY_CONFIG)
    assert isinstance(config, Qwen3MoeConfig)
    assert config.layer_types == ["dense", "moe", "moe"]
    assert (config.num_experts, config.num_experts_per_tok) == (8, 2)
