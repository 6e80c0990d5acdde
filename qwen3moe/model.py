"""The model loop: one forward step over a batch of requests, composed from a backend's block operations.

A step takes any mix of requests: a prefill (a whole prompt) and decodes (one token each) of different lengths.
Their new tokens are flattened into one (T, H) matrix so that every per-token layer (norms, projections, router,
experts) runs once for the whole step, the way serving engines batch; only attention looks at requests one by one,
each against its own KV cache. The backend (``backends.py``; the reference is ``reference_backend.py``) decides how
each block is computed; the loop is the same for all of them.
"""

from dataclasses import dataclass

import numpy as np

from .config import Qwen3MoeConfig
from .debug import Debugger
from .layers import AttentionSegment, RoutingOverride, rope_cos_sin
from .router_stats import RouterStats


class KVCache:
    """Keys and values of one sequence for every layer, float32, for up to ``capacity`` positions."""

    def __init__(self, config: Qwen3MoeConfig, capacity: int):
        shape = (config.num_hidden_layers, capacity, config.num_key_value_heads, config.head_dim)
        self.capacity = capacity
        self.k = np.zeros(shape, dtype=np.float32)  # (layers, capacity, Hkv, D)
        self.v = np.zeros(shape, dtype=np.float32)  # (layers, capacity, Hkv, D)


@dataclass
class Request:
    """New tokens of one sequence: ``tokens`` go to positions ``pos, pos+1, ...`` of ``cache``."""

    tokens: list[int]
    pos: int
    cache: KVCache
    task_id: object = None


def forward(backend, state, config: Qwen3MoeConfig, requests: list[Request], stats: RouterStats,
            debug: Debugger, all_logits: bool = False, override: RoutingOverride | None = None) -> list[np.ndarray]:
    """Run one step; return, per request, the logits of its last token (V,) or of all its tokens (n, V)."""
    for r in requests:
        if not (0 < len(r.tokens) and r.pos + len(r.tokens) <= r.cache.capacity):
            raise ValueError(f"request of {len(r.tokens)} tokens at position {r.pos} does not fit its cache "
                             f"of {r.cache.capacity} positions")
    bounds = np.cumsum([0] + [len(r.tokens) for r in requests])  # request j owns rows bounds[j]:bounds[j+1]
    token_ids = np.concatenate([np.asarray(r.tokens, dtype=np.int64) for r in requests])  # (T,)
    positions = np.concatenate([r.pos + np.arange(len(r.tokens)) for r in requests])  # (T,)
    token_info = [(r.task_id, r.pos + j, t) for r in requests for j, t in enumerate(r.tokens)]

    override = override or RoutingOverride()  # no override: every layer routes as config.json says
    with debug.phase("embedding"):
        x = backend.embed(state, token_ids)  # (T, H)
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)  # (T, D) each
    for i in range(config.num_hidden_layers):
        segments = [AttentionSegment(int(bounds[j]), int(bounds[j + 1]), r.pos, r.cache.k[i], r.cache.v[i])
                    for j, r in enumerate(requests)]
        with debug.phase("attention"):
            x = backend.attention_block(state, i, x, cos, sin, segments)  # (T, H)
        debug.check(x, "hidden state after attention", i)
        top_k, disabled = override.for_layer(i, config.num_experts, config.num_experts_per_tok)
        with debug.phase("moe" if config.is_moe_layer(i) else "mlp"):
            x, routing = backend.feed_forward_block(state, i, x, top_k, disabled)  # (T, H)
        if routing is not None:
            stats.record(i, routing, token_info)
            debug.routing(i, routing.experts, routing.weights, [t for _, _, t in token_info])
        debug.check(x, "hidden state after the MLP/MoE block", i)

    with debug.phase("lm_head"):
        rows = np.arange(len(token_ids)) if all_logits else bounds[1:] - 1  # last token of each request
        logits = backend.final_logits(state, x[rows])  # (rows, V)
    debug.check(logits, "logits", "lm_head")
    if all_logits:
        return [logits[bounds[j]:bounds[j + 1]] for j in range(len(requests))]
    return list(logits)
