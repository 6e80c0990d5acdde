"""config.json -> Qwen3MoeConfig, with the checkpoint's own field names, and the layer-type rule.

Two spellings exist in the wild and both are read:
  * released Qwen3 checkpoints: ``num_experts``, top-level ``rope_theta`` and ``rope_scaling``;
  * transformers 5 ``save_pretrained``: ``num_local_experts`` and ``rope_parameters: {rope_theta, rope_type}``.
Fields that would change the maths but are not implemented here (sliding windows, rope scaling, attention biases,
another activation) are refused with a message instead of being silently ignored.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, UnsupportedConfigError

DEFAULT_ROPE_THETA = 10_000.0  # transformers' default when config.json names no theta


@dataclass(frozen=True)
class Qwen3MoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of the dense SwiGLU MLP layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # from config.json; NOT hidden_size / num_attention_heads in real checkpoints
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_experts: int  # 0 for a dense model
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    eos_token_id: tuple[int, ...]
    model_type: str = "qwen3_moe"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The rule from transformers' Qwen3MoeDecoderLayer: MoE unless listed in mlp_only_layers or off-step."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def layer_types(self) -> list[str]:
        """'moe' or 'dense' for every layer, in order."""
        return ["moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]


def load_config(model_dir: str | Path) -> Qwen3MoeConfig:
    """Read ``model_dir/config.json`` and check that this engine can run it."""
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist")
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a model folder needs the config.json that came with its weights")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict, source: str = "config.json") -> Qwen3MoeConfig:
    model_type = raw.get("model_type")
    if model_type not in ("qwen3_moe", "qwen3"):
        raise UnsupportedConfigError(
            f"{source}: model_type {model_type!r} is not supported; this engine runs 'qwen3_moe' "
            "(and dense 'qwen3') checkpoints"
        )
    _refuse_unsupported(raw, source)

    def need(name):
        if name not in raw:
            raise CheckpointError(f"{source}: required field {name!r} is missing")
        return raw[name]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    is_moe = model_type == "qwen3_moe"
    num_experts = int(raw.get("num_experts", raw.get("num_local_experts", 0))) if is_moe else 0
    eos = raw.get("eos_token_id")
    config = Qwen3MoeConfig(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(heads if raw.get("num_key_value_heads") is None else raw["num_key_value_heads"]),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        num_experts=num_experts,
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 0)) if num_experts else 0,
        moe_intermediate_size=int(raw.get("moe_intermediate_size", 0)) if num_experts else 0,
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        decoder_sparse_step=int(raw.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(i) for i in (raw.get("mlp_only_layers") or ())),
        eos_token_id=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        model_type=model_type,
    )
    _check_consistent(config, source)
    return config


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA)))


def _refuse_unsupported(raw: dict, source: str) -> None:
    """Fields that change the model's maths in ways this engine does not implement."""
    for key in ("rope_scaling", "rope_parameters"):
        scaling = raw.get(key) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedConfigError(
                f"{source}: rope scaling {rope_type!r} is not implemented (set in {key}); use a checkpoint "
                "without rope scaling (the standard Qwen3 releases have none) or remove it to run at the native "
                "context length"
            )
        if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
            raise UnsupportedConfigError(f"{source}: partial_rotary_factor != 1 is not implemented")
    if raw.get("use_sliding_window"):
        raise UnsupportedConfigError(
            f"{source}: use_sliding_window is true; sliding-window attention is not implemented "
            "(Qwen3 releases set it to false)"
        )
    if raw.get("attention_bias"):
        raise UnsupportedConfigError(f"{source}: attention_bias is true; Qwen3 attention has no biases")
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not implemented (only 'silu')")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedConfigError(f"{source}: only full attention layers are implemented, found {layer_types}")


def _check_consistent(c: Qwen3MoeConfig, source: str) -> None:
    problems = []
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "decoder_sparse_step"):
        if getattr(c, name) <= 0:
            problems.append(f"{name} must be positive (found {getattr(c, name)})")
    if c.num_key_value_heads > 0 and c.num_attention_heads % c.num_key_value_heads:
        problems.append(
            f"num_attention_heads ({c.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({c.num_key_value_heads})"
        )
    if c.head_dim % 2:
        problems.append(f"head_dim must be even for rotary embeddings (found {c.head_dim})")
    if c.num_experts < 0:
        problems.append(f"num_experts must not be negative (found {c.num_experts})")
    if c.num_experts and not 0 < c.num_experts_per_tok <= c.num_experts:
        problems.append(f"num_experts_per_tok must be in 1..{c.num_experts} (found {c.num_experts_per_tok})")
    if c.num_experts and c.moe_intermediate_size <= 0:
        problems.append(f"moe_intermediate_size must be positive (found {c.moe_intermediate_size})")
    if c.decoder_sparse_step > 0 and len(c.moe_layers) < c.num_hidden_layers and c.intermediate_size <= 0:
        problems.append(f"intermediate_size must be positive where a layer is dense (found {c.intermediate_size})")
    if c.max_position_embeddings <= 0:
        problems.append(f"max_position_embeddings must be positive (found {c.max_position_embeddings})")
    for name in ("rms_norm_eps", "rope_theta"):  # (a norm of sqrt(mean + eps), frequencies theta^(-2i/d))
        if not 0 < getattr(c, name) < math.inf:
            problems.append(f"{name} must be a positive finite number (found {getattr(c, name)})")
    outside = [i for i in c.mlp_only_layers if not 0 <= i < c.num_hidden_layers]
    if outside:
        problems.append(f"mlp_only_layers lists {outside}, outside layers 0..{c.num_hidden_layers - 1}")
    if problems:
        raise UnsupportedConfigError(f"{source}: " + "; ".join(problems))
