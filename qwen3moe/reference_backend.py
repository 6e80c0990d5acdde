"""The NumPy reference backend: the block operations the model loop calls, composed from ``layers.py``.

Every backend module offers the same five functions (see ``backends.py``); this one is the definition the others
are tested against. Its "prepared state" is simply the checkpoint's weights (or one rank's part of them, see
``sharding.shard_weights``).
"""

from dataclasses import dataclass

import numpy as np

from .config import Qwen3MoeConfig
from .layers import AttentionSegment, Routing, embedding, linear, mlp, moe_block, rms_norm, self_attention
from .sharding import RankShard
from .weights import Qwen3MoeWeights

xp = np  # activations and KV caches are NumPy arrays


@dataclass
class State:
    weights: Qwen3MoeWeights
    config: Qwen3MoeConfig
    residual: bool  # whether the blocks add their input back (every rank of a split model but the first leaves it
    #                 out, so that the all-reduce of the ranks' outputs counts it once)


def prepare(weights: Qwen3MoeWeights, config: Qwen3MoeConfig, shard: RankShard | None = None) -> State:
    """``shard``: which part of the model ``weights`` are when they are one rank's (None: the whole model)."""
    return State(weights, config, residual=shard is None or shard.rank == 0)


def embed(s: State, token_ids: np.ndarray) -> np.ndarray:
    return embedding(token_ids, s.weights.embed_tokens)  # (T,) -> (T, H)


def attention_block(s: State, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                    segments: list[AttentionSegment]) -> np.ndarray:
    """x + self_attn(input_layernorm(x)); also writes the step's keys and values into the caches."""
    layer, eps = s.weights.layers[i], s.config.rms_norm_eps
    out = self_attention(rms_norm(x, layer.input_layernorm, eps), layer.self_attn, cos, sin, segments, eps)
    return x + out if s.residual else out


def feed_forward_block(s: State, i: int, x: np.ndarray, top_k: int,
                       disabled: np.ndarray | None) -> tuple[np.ndarray, Routing | None]:
    """x + mlp(post_attention_layernorm(x)), the MLP being dense or the MoE block (then its routing is returned).

    ``top_k`` is the layer's num_experts_per_tok and ``disabled`` None, unless a RoutingOverride is in force.
    """
    layer, c = s.weights.layers[i], s.config
    h = rms_norm(x, layer.post_attention_layernorm, c.rms_norm_eps)  # (T, H)
    if not c.is_moe_layer(i):
        out, routing = mlp(h, layer.mlp), None
    else:
        out, routing = moe_block(h, layer.mlp, top_k, c.norm_topk_prob, disabled)
    return x + out if s.residual else out, routing


def final_logits(s: State, x: np.ndarray) -> np.ndarray:
    """lm_head(norm(x)): (T, H) -> (T, V)."""
    return linear(rms_norm(x, s.weights.norm, s.config.rms_norm_eps), s.weights.lm_head)
