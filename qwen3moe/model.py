"""The model loop: one forward step over a batch of requests, composed from a backend's block operations.

A step takes any mix of requests: a prefill (a whole prompt) and decodes (one token each) of different lengths.
Their new tokens are flattened into one (T, H) matrix so that every per-token layer (norms, projections, router,
experts) runs once for the whole step, the way serving engines batch; only attention looks at requests one by one,
each against its own KV cache. The backend (``backends.py``; the reference is ``reference_backend.py``) decides how
each block is computed; the loop is the same for all of them.
"""

import itertools
from dataclasses import dataclass

import numpy as np

from .config import Qwen3MoeConfig
from .debug import Debugger
from .layers import AttentionSegment, Routing, RoutingOverride, rope_cos_sin
from .router_stats import RouterStats


class KVCache:
    """Keys and values of one sequence for every layer, float32, for up to ``capacity`` positions.

    ``xp`` is the array module of the backend that will use it: numpy, or cupy for a cache in GPU memory.
    """

    def __init__(self, config: Qwen3MoeConfig, capacity: int, xp=np):
        shape = self.shape(config, capacity)
        self.capacity = capacity
        self.k = xp.zeros(shape, dtype=np.float32)  # (layers, capacity, Hkv, D)
        self.v = xp.zeros(shape, dtype=np.float32)  # (layers, capacity, Hkv, D)

    @staticmethod
    def shape(config: Qwen3MoeConfig, capacity: int) -> tuple[int, int, int, int]:
        """(layers, capacity, Hkv, D): the keys' array, and the values'."""
        return config.num_hidden_layers, capacity, config.num_key_value_heads, config.head_dim


@dataclass
class Request:
    """New tokens of one sequence: ``tokens`` go to positions ``pos, pos+1, ...`` of ``cache``."""

    tokens: list[int]
    pos: int
    cache: KVCache
    task_id: object = None


def forward(backend, state, config: Qwen3MoeConfig, requests: list[Request], stats: RouterStats | None,
            debug: Debugger, all_logits: bool = False, override: RoutingOverride | None = None) -> list[np.ndarray]:
    """Run one step; return, per request, the logits of its last token (V,) or of all its tokens (n, V).

    ``stats`` None: nobody counts the routing (the ranks of a split model other than rank 0, which counts it)."""
    check_requests(requests, config.vocab_size)
    bounds = [0, *itertools.accumulate(len(r.tokens) for r in requests)]  # request j owns rows bounds[j]:bounds[j+1]
    token_ids = np.array([t for r in requests for t in r.tokens], dtype=np.int64)  # (T,)
    positions = np.array([r.pos + j for r in requests for j in range(len(r.tokens))])  # (T,)
    token_info = [(r.task_id, r.pos + j, t) for r in requests for j, t in enumerate(r.tokens)]

    override = override or RoutingOverride()  # no override: every layer routes as config.json says
    with debug.phase("embedding"):
        x = backend.embed(state, token_ids)  # (T, H)
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)  # (T, D) each
    for i in range(config.num_hidden_layers):
        segments = [AttentionSegment(bounds[j], bounds[j + 1], r.pos, r.cache.k[i], r.cache.v[i])
                    for j, r in enumerate(requests)]
        with debug.phase("attention"):
            x = backend.attention_block(state, i, x, cos, sin, segments)  # (T, H)
        debug.check(x, "hidden state after attention", i)
        top_k, disabled = override.for_layer(i, config.num_experts, config.num_experts_per_tok)
        with debug.phase("moe" if config.is_moe_layer(i) else "mlp"):
            x, routing = backend.feed_forward_block(state, i, x, top_k, disabled)  # (T, H)
        if routing is not None and stats is not None:
            routing = on_host(routing)
            stats.record(i, routing, token_info)
            debug.routing(i, routing.experts, routing.weights, [t for _, _, t in token_info])
        debug.check(x, "hidden state after the MLP/MoE block", i)

    with debug.phase("lm_head"):
        rows = slice(None) if all_logits else [b - 1 for b in bounds[1:]]  # the last token of each request
        logits = backend.final_logits(state, x[rows])  # (rows, V)
        logits = logits if isinstance(logits, np.ndarray) else logits.get()  # a GPU backend's logits to the host
    debug.check(logits, "logits", "lm_head")
    if all_logits:
        return [logits[bounds[j]:bounds[j + 1]] for j in range(len(requests))]
    return list(logits)


def check_requests(requests: list[Request], vocab_size: int) -> None:
    for r in requests:
        bad = [t for t in r.tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})")
        if not (0 < len(r.tokens) and r.pos + len(r.tokens) <= r.cache.capacity):
            raise ValueError(f"request of {len(r.tokens)} tokens at position {r.pos} does not fit its cache "
                             f"of {r.cache.capacity} positions")


def on_host(routing: Routing) -> Routing:
    """The routing as NumPy arrays: a GPU backend returns it in device memory; statistics are counted on the host."""
    return Routing(*(a if isinstance(a, np.ndarray) else a.get() for a in (routing.probs, routing.experts,
                                                                          routing.weights)))
