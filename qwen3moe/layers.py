"""Every layer of Qwen3-MoE as a small NumPy function, computed in float32.

Shapes use these letters:
  T tokens in the step (all requests of a batch, flattened), H hidden_size, V vocab_size,
  Hq num_attention_heads, Hkv num_key_value_heads, D head_dim, L cached positions,
  E num_experts, K num_experts_per_tok, I intermediate size of an MLP.
Weights may arrive in bf16/f16 (memory-mapped from the checkpoint); ``f32`` widens them at the point of use, so only
the weights a step touches are ever read (for an MoE layer: the router and the chosen experts).
The semantics follow transformers' ``modeling_qwen3_moe.py`` (see REFERENCE.md section 1).
"""

from dataclasses import dataclass, field

import numpy as np

from .weights import MLP, Attention, SparseMoeBlock


def f32(w: np.ndarray) -> np.ndarray:
    """Widen a checkpoint array to float32 (bf16 -> f32 is exact); float32 arrays pass through without a copy."""
    return np.asarray(w, dtype=np.float32)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T, PyTorch's nn.Linear convention: w is (out_features, in_features), no bias."""
    return x @ f32(w).T  # (T, in) @ (in, out) -> (T, out)


def embedding(token_ids: np.ndarray, embed_tokens: np.ndarray) -> np.ndarray:
    return f32(embed_tokens[token_ids])  # (T,) -> (T, H)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * x / sqrt(mean(x^2) + eps) over the last axis (Qwen3 multiplies by w, not by 1 + w)."""
    variance = np.mean(x * x, axis=-1, keepdims=True)  # (..., 1)
    return f32(weight) * (x / np.sqrt(variance + np.float32(eps)))  # (..., n)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


# ---- rotary position embedding -------------------------------------------------------------------------------


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for each position, in the NeoX layout: the D/2 frequencies are repeated for both halves."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # (D/2,)
    inv_freq = (np.float32(1) / np.float32(theta) ** exponents).astype(np.float32)  # (D/2,)
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, D)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each (x[i], x[i + D/2]) pair by its position's angle ("rotate_half", not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # (T, n, D)
    return x * cos[:, None, :] + rotated * sin[:, None, :]  # (T, n, D)


# ---- attention -----------------------------------------------------------------------------------------------


@dataclass
class AttentionSegment:
    """One request's slice of the flattened batch and where its keys and values live.

    Rows ``start:stop`` of the batch are the request's new tokens, at positions ``pos .. pos + (stop - start) - 1``;
    ``k_cache``/``v_cache`` are that request's cache for the current layer, shape (capacity, Hkv, D).
    """

    start: int
    stop: int
    pos: int
    k_cache: np.ndarray
    v_cache: np.ndarray


def self_attention(x: np.ndarray, w: Attention, cos: np.ndarray, sin: np.ndarray,
                   segments: list[AttentionSegment], eps: float) -> np.ndarray:
    """Project, q/k-norm, RoPE, write the new keys/values into each request's cache, attend, project back."""
    Dh = w.q_norm.shape[0]
    T = x.shape[0]
    q = linear(x, w.q_proj).reshape(T, -1, Dh)  # (T, Hq, D)
    k = linear(x, w.k_proj).reshape(T, -1, Dh)  # (T, Hkv, D)
    v = linear(x, w.v_proj).reshape(T, -1, Dh)  # (T, Hkv, D)
    q = apply_rope(rms_norm(q, w.q_norm, eps), cos, sin)  # q/k-norm per head, BEFORE RoPE; v is not normalised
    k = apply_rope(rms_norm(k, w.k_norm, eps), cos, sin)
    out = np.empty_like(q)  # (T, Hq, D)
    for s in segments:
        end = s.pos + (s.stop - s.start)
        s.k_cache[s.pos:end] = k[s.start:s.stop]
        s.v_cache[s.pos:end] = v[s.start:s.stop]
        out[s.start:s.stop] = attend(q[s.start:s.stop], s.k_cache[:end], s.v_cache[:end], s.pos)
    return linear(out.reshape(T, -1), w.o_proj)  # (T, Hq*D) -> (T, H)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int) -> np.ndarray:
    """Grouped-query causal attention of n new queries (at positions pos..pos+n-1) over L = pos+n cached keys.

    q (n, Hq, D), k and v (L, Hkv, D) -> (n, Hq, D). Each kv head serves Hq/Hkv consecutive query heads.
    """
    n, Hq, D = q.shape
    L, Hkv, _ = k.shape
    group = Hq // Hkv
    qg = q.reshape(n, Hkv, group, D).transpose(1, 2, 0, 3)  # (Hkv, group, n, D)
    kt = k.transpose(1, 2, 0)[:, None]  # (Hkv, 1, D, L)
    scores = (qg @ kt) * np.float32(D ** -0.5)  # (Hkv, group, n, L)
    query_pos = pos + np.arange(n)[:, None]  # (n, 1)
    causal = np.arange(L)[None, :] <= query_pos  # (n, L): key j is visible to query i when j <= pos + i
    scores = np.where(causal, scores, -np.inf)
    probs = softmax(scores)  # (Hkv, group, n, L)
    out = probs @ v.transpose(1, 0, 2)[:, None]  # (Hkv, group, n, L) @ (Hkv, 1, L, D) -> (Hkv, group, n, D)
    return out.transpose(2, 0, 1, 3).reshape(n, Hq, D)  # (n, Hq, D)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---- feed-forward: dense MLP, router, experts -----------------------------------------------------------------


def mlp(x: np.ndarray, w: MLP) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and for each expert."""
    return linear(silu(linear(x, w.gate_proj)) * linear(x, w.up_proj), w.down_proj)  # (T, H) -> (T, I) -> (T, H)


@dataclass
class Routing:
    """What the router decided for each token of a step."""

    probs: np.ndarray  # (T, E) softmax over all experts
    experts: np.ndarray  # (T, K) chosen expert ids, most probable first
    weights: np.ndarray  # (T, K) their mixing weights (renormalised to sum 1 when norm_topk_prob)


@dataclass(frozen=True)
class RoutingOverride:
    """A what-if for the router, as the routing explorer uses it; real Qwen3-MoE routing has no override.

    ``top_k`` replaces num_experts_per_tok in every MoE layer; ``disabled[layer]`` are experts that layer never
    chooses: their router logits are masked to -inf before the softmax, so tokens go to the next-best experts.
    """

    top_k: int | None = None
    disabled: dict[int, frozenset[int]] = field(default_factory=dict)

    def for_layer(self, layer: int, num_experts: int, default_top_k: int) -> tuple[int, np.ndarray | None]:
        """(top_k, disabled mask (E,) or None) for one layer."""
        chosen = self.disabled.get(layer)
        mask = None
        if chosen:
            mask = np.zeros(num_experts, dtype=bool)
            mask[sorted(chosen)] = True
        return self.top_k or default_top_k, mask


def route(x: np.ndarray, gate: np.ndarray, top_k: int, norm_topk_prob: bool,
          disabled: np.ndarray | None = None) -> Routing:
    """Softmax over ALL experts in float32, keep the top_k, optionally renormalise them.

    Ties are broken towards the lower expert index (a stable sort of -probs), so every backend picks the same experts.
    ``disabled`` (E,) masks experts out before the softmax (a RoutingOverride; never in the real model).
    """
    logits = linear(x, gate)  # (T, E)
    if disabled is not None:
        logits[:, disabled] = -np.inf
    probs = softmax(logits)  # (T, E)
    order_key = -probs if disabled is None else np.where(disabled, np.inf, -probs)  # disabled never chosen
    experts = np.argsort(order_key, axis=-1, kind="stable")[:, :top_k]  # (T, K)
    weights = np.take_along_axis(probs, experts, axis=-1)  # (T, K)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return Routing(probs=probs, experts=experts, weights=weights)


def moe_block(x: np.ndarray, w: SparseMoeBlock, top_k: int, norm_topk_prob: bool,
              disabled: np.ndarray | None = None) -> tuple[np.ndarray, Routing]:
    """Route each token to its top_k experts and sum their outputs weighted by the router.

    Tokens are grouped by expert so each chosen expert runs once on all of its tokens; experts nobody chose are
    never touched (their weights are not even read). No capacity limit: no token is dropped. An expert that is None
    is held by another rank of a split model (expert parallelism): the output is then this rank's part of the sum.
    """
    routing = route(x, w.gate, top_k, norm_topk_prob, disabled)
    out = np.zeros_like(x)  # (T, H)
    for e in np.unique(routing.experts):
        if w.experts[e] is None:
            continue
        tokens, slot = np.nonzero(routing.experts == e)  # which tokens chose e, and in which of their K slots
        y = mlp(x[tokens], w.experts[e])  # (n_e, H)
        out[tokens] += y * routing.weights[tokens, slot][:, None]  # a token picks an expert at most once
    return out, routing
