"""Check a checkpoint's tensors against the config, then arrange them per layer under their Hugging Face names.

Validation happens before any compute and reports everything at once: every missing tensor (with layer, expert and
projection), every shape that differs from what config.json implies (expected vs found), and extra tensors that
belong to nothing. Expert weights are accepted in both forms found in the wild:
  * per expert, as files on disk use: ``mlp.experts.{j}.{gate,up,down}_proj.weight``;
  * packed, as transformers 5 holds them in memory: ``mlp.experts.gate_up_proj [E, 2*I, H]`` and
    ``mlp.experts.down_proj [E, H, I]``; these are sliced into per-expert views (no copy).
Arrays keep their checkpoint dtype; layers widen them to float32 when they use them.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import open_checkpoint
from .config import Qwen3MoeConfig
from .errors import CheckpointError


@dataclass
class Attention:
    q_proj: np.ndarray  # (n_heads*head_dim, hidden)
    k_proj: np.ndarray  # (n_kv_heads*head_dim, hidden)
    v_proj: np.ndarray  # (n_kv_heads*head_dim, hidden)
    o_proj: np.ndarray  # (hidden, n_heads*head_dim)
    q_norm: np.ndarray  # (head_dim,)
    k_norm: np.ndarray  # (head_dim,)


@dataclass
class MLP:
    """A SwiGLU MLP: a dense layer, or one expert of an MoE layer."""

    gate_proj: np.ndarray  # (intermediate, hidden)
    up_proj: np.ndarray  # (intermediate, hidden)
    down_proj: np.ndarray  # (hidden, intermediate)


@dataclass
class SparseMoeBlock:
    gate: np.ndarray  # (num_experts, hidden): the router
    experts: list[MLP | None]  # None: an expert held by another rank (sharding.shard_weights, "ep")


@dataclass
class DecoderLayer:
    input_layernorm: np.ndarray  # (hidden,)
    self_attn: Attention
    post_attention_layernorm: np.ndarray  # (hidden,)
    mlp: MLP | SparseMoeBlock


@dataclass
class Qwen3MoeWeights:
    embed_tokens: np.ndarray  # (vocab, hidden)
    layers: list[DecoderLayer]
    norm: np.ndarray  # (hidden,)
    lm_head: np.ndarray  # (vocab, hidden); the same array as embed_tokens when tie_word_embeddings

    def arrays(self) -> list[np.ndarray]:
        """Every tensor once (tied embeddings count once; experts another rank holds are absent)."""
        arrays = [self.embed_tokens, self.norm, self.lm_head]
        for layer in self.layers:
            a, mlp = layer.self_attn, layer.mlp
            arrays += [layer.input_layernorm, layer.post_attention_layernorm, a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                       a.q_norm, a.k_norm]
            experts = [e for e in mlp.experts if e is not None] if isinstance(mlp, SparseMoeBlock) else [mlp]
            arrays += [mlp.gate] if isinstance(mlp, SparseMoeBlock) else []
            arrays += [m for e in experts for m in (e.gate_proj, e.up_proj, e.down_proj)]
        return list({id(a): a for a in arrays}.values())


def expected_shapes(c: Qwen3MoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint for ``c`` must hold (per-expert form), with its shape."""
    H, D = c.hidden_size, c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (c.num_attention_heads * D, H),
            p + "self_attn.k_proj.weight": (c.num_key_value_heads * D, H),
            p + "self_attn.v_proj.weight": (c.num_key_value_heads * D, H),
            p + "self_attn.o_proj.weight": (H, c.num_attention_heads * D),
            p + "self_attn.q_norm.weight": (D,),
            p + "self_attn.k_norm.weight": (D,),
        }
        if c.is_moe_layer(i):
            shapes[p + "mlp.gate.weight"] = (c.num_experts, H)
            for j in range(c.num_experts):
                shapes |= _mlp_shapes(f"{p}mlp.experts.{j}.", H, c.moe_intermediate_size)
        else:
            shapes |= _mlp_shapes(p + "mlp.", H, c.intermediate_size)
    return shapes


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {
        prefix + "gate_proj.weight": (inter, hidden),
        prefix + "up_proj.weight": (inter, hidden),
        prefix + "down_proj.weight": (hidden, inter),
    }


def load_weights(model_dir: str | Path, config: Qwen3MoeConfig) -> Qwen3MoeWeights:
    """Open, validate and arrange the weights of ``model_dir``."""
    tensors = open_checkpoint(model_dir)
    return arrange_weights(tensors, config, source=str(model_dir))


def arrange_weights(tensors: dict[str, np.ndarray], config: Qwen3MoeConfig, source: str) -> Qwen3MoeWeights:
    tensors = unpack_experts(tensors, config, source)
    validate(tensors, config, source)
    t = tensors
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = Attention(*(t[f"{p}self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "q_norm", "k_norm")))
        if config.is_moe_layer(i):
            experts = [_mlp(t, f"{p}mlp.experts.{j}.") for j in range(config.num_experts)]
            mlp = SparseMoeBlock(gate=t[p + "mlp.gate.weight"], experts=experts)
        else:
            mlp = _mlp(t, p + "mlp.")
        layers.append(DecoderLayer(t[p + "input_layernorm.weight"], attn, t[p + "post_attention_layernorm.weight"],
                                   mlp))
    embed = t["model.embed_tokens.weight"]
    lm_head = embed if config.tie_word_embeddings else t["lm_head.weight"]
    return Qwen3MoeWeights(embed_tokens=embed, layers=layers, norm=t["model.norm.weight"], lm_head=lm_head)


def _mlp(t: dict[str, np.ndarray], prefix: str) -> MLP:
    return MLP(t[prefix + "gate_proj.weight"], t[prefix + "up_proj.weight"], t[prefix + "down_proj.weight"])


def unpack_experts(tensors: dict[str, np.ndarray], config: Qwen3MoeConfig, source: str) -> dict[str, np.ndarray]:
    """Replace packed ``experts.gate_up_proj``/``experts.down_proj`` by per-expert views of the same memory."""
    out = dict(tensors)
    E, I, H = config.num_experts, config.moe_intermediate_size, config.hidden_size
    for i in config.moe_layers:
        p = f"model.layers.{i}.mlp.experts."
        for packed, shape in (("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I))):
            if p + packed not in out:
                continue
            if f"{p}0.{'gate_proj' if packed == 'gate_up_proj' else 'down_proj'}.weight" in out:
                raise CheckpointError(f"{source}: layer {i} holds experts both packed ({p + packed}) and per "
                                      "expert; keep one form")
            w = out.pop(p + packed)
            if w.shape != shape:
                raise CheckpointError(
                    f"{source}: layer {i} packed experts tensor {p + packed!r} has shape {list(w.shape)}, "
                    f"expected {list(shape)} (num_experts, ...) from config.json"
                )
            for j in range(E):
                if packed == "gate_up_proj":  # rows [0, I) are gate, [I, 2I) are up, as transformers chunks them
                    out[f"{p}{j}.gate_proj.weight"], out[f"{p}{j}.up_proj.weight"] = w[j, :I], w[j, I:]
                else:
                    out[f"{p}{j}.down_proj.weight"] = w[j]
    return out


def validate(tensors: dict[str, np.ndarray], config: Qwen3MoeConfig, source: str) -> None:
    """Raise one CheckpointError that lists every problem, or return if the tensors fit the config."""
    expected = expected_shapes(config)
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [n for n in expected if n not in tensors]
    extra = sorted(n for n in tensors if n not in expected and n not in ignorable and "rotary_emb" not in n)
    reason = _naming_problem(tensors, config, len(missing), len(expected))
    if reason:
        raise CheckpointError(
            f"Unsupported weight naming scheme for Qwen3-MoE in {source}: {reason}. Check config.json and that the "
            f"weights use names like 'model.layers.0.self_attn.q_proj.weight' and "
            f"'model.layers.0.mlp.experts.0.gate_proj.weight'."
        )
    wrong = [
        f"{n} ({_describe(n)}): expected {list(expected[n])}, found {list(tensors[n].shape)}"
        for n in expected if n in tensors and tuple(tensors[n].shape) != expected[n]
    ]
    wrong_dtype = [f"{n}: {tensors[n].dtype}" for n in expected if n in tensors
                   and tensors[n].dtype.name not in ("bfloat16", "float16", "float32")]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors: " + _listing(f"{n} ({_describe(n)})" for n in missing))
    if wrong:
        problems.append(f"{len(wrong)} tensors with the wrong shape: " + _listing(wrong))
    if wrong_dtype:
        problems.append("tensors that are not bf16/f16/f32: " + _listing(wrong_dtype))
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (not part of a {config.model_type} model with this "
                        "config): " + _listing(extra))
    if problems:
        raise CheckpointError(f"{source}: the weights do not match config.json:\n  " + "\n  ".join(problems))


def _naming_problem(tensors: dict[str, np.ndarray], config: Qwen3MoeConfig, missing: int, expected: int) -> str:
    """Why these tensors are not a Qwen3-MoE checkpoint at all ('' when they are, even if some are wrong)."""
    names = list(tensors)
    if any(".block_sparse_moe." in n for n in names):
        return "found Mixtral-style 'block_sparse_moe' tensors"
    if config.moe_layers and not any(".mlp.experts." in n or n.endswith(".mlp.gate.weight") for n in names):
        dense = any(n.endswith(".mlp.gate_proj.weight") for n in names)
        return (f"config.json declares {config.num_experts} experts but the files hold no expert or router tensors"
                + (" (they look like a dense model's MLP weights)" if dense else ""))
    if missing > expected // 2:
        found = "found for example " + ", ".join(repr(n) for n in names[:3]) if names else "the files hold none"
        return f"{missing} of {expected} expected tensors are absent ({found})"
    return ""


def _describe(name: str) -> str:
    """'model.layers.3.mlp.experts.7.up_proj.weight' -> 'layer 3, expert 7, up_proj'."""
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        return parts[-2] if len(parts) > 1 else name
    desc = f"layer {parts[2]}"
    if "experts" in parts:
        desc += f", expert {parts[parts.index('experts') + 1]}"
    return desc + f", {parts[-2]}"


def _listing(items, limit: int = 20) -> str:
    items = list(items)
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n    " + shown + more
