"""The ``numba`` backend: the reference's block operations (``qwen3moe/reference_backend.py``) on Numba kernels.

``prepare`` lays the weights out for the kernels once, at load time:
  * bf16 matrices become uint32 views of the same memory (two bf16 per word) -- no copy, still memory-mapped;
  * q, k and v projections are stacked into one matrix so one pass over the normalised input computes all three
    (a small copy), and likewise a dense MLP's gate and up;
  * an MoE layer's experts become three ``numba.typed.List``s of matrices (gate, up, down): views again, so
    loading a 60 GB checkpoint copies no expert and a decode step touches only the experts it chose;
  * f16 checkpoints are widened to f32 once (Numba has no fast f16 arithmetic); f32 checkpoints are used as they are.
"""

from dataclasses import dataclass

import numpy as np
from numba.typed import List

from qwen3moe.config import Qwen3MoeConfig
from qwen3moe.layers import AttentionSegment, Routing
from qwen3moe.weights import Qwen3MoeWeights, SparseMoeBlock

from . import numba_kernels as K


@dataclass
class Layer:
    input_norm: np.ndarray  # (H,) f32
    qkv: np.ndarray  # ((Hq + 2 Hkv) D, H/2) words
    q_norm: np.ndarray  # (D,) f32
    k_norm: np.ndarray  # (D,) f32
    o_proj: np.ndarray  # (H, Hq D/2) words
    post_norm: np.ndarray  # (H,) f32
    gate_up: np.ndarray | None  # dense: (2I, H/2) words
    down: np.ndarray | None  # dense: (H, I/2) words
    router: np.ndarray | None  # MoE: (E, H/2) words
    experts: tuple | None  # MoE: typed Lists of E matrices each: gate (I, H/2), up (I, H/2), down (H, I/2)


@dataclass
class State:
    config: Qwen3MoeConfig
    embed_tokens: np.ndarray  # (V, H), checkpoint dtype
    layers: list[Layer]
    norm: np.ndarray  # (H,) f32
    lm_head: np.ndarray  # (V, H/2) words


def words(w: np.ndarray) -> np.ndarray:
    """A weight matrix as the kernels read it: bf16 -> uint32 pairs (a view), f32 as it is, f16 widened to f32."""
    if w.dtype.name == "bfloat16":
        return np.ascontiguousarray(w).view(np.uint32)
    return np.ascontiguousarray(w, dtype=np.float32)


def prepare(weights: Qwen3MoeWeights, config: Qwen3MoeConfig) -> State:
    if config.hidden_size % 2 or config.head_dim % 2:
        raise ValueError("the numba backend needs an even hidden_size and head_dim")
    layers = []
    for i, lw in enumerate(weights.layers):
        a = lw.self_attn
        f32 = lambda v: np.asarray(v, dtype=np.float32)
        if isinstance(lw.mlp, SparseMoeBlock):
            experts = tuple(List([words(getattr(e, p)) for e in lw.mlp.experts])
                            for p in ("gate_proj", "up_proj", "down_proj"))
            gate_up, down, router = None, None, words(lw.mlp.gate)
        else:
            gate_up, down = words(np.concatenate([lw.mlp.gate_proj, lw.mlp.up_proj])), words(lw.mlp.down_proj)
            router = experts = None
        layers.append(Layer(f32(lw.input_layernorm), words(np.concatenate([a.q_proj, a.k_proj, a.v_proj])),
                            f32(a.q_norm), f32(a.k_norm), words(a.o_proj), f32(lw.post_attention_layernorm),
                            gate_up, down, router, experts))
    return State(config, weights.embed_tokens, layers, np.asarray(weights.norm, np.float32), words(weights.lm_head))


def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Even and odd elements of each row, the form the projection kernels take their input in."""
    return K.split_even_odd(x, x[0], 0.0, False)


def embed(s: State, token_ids: np.ndarray) -> np.ndarray:
    return np.asarray(s.embed_tokens[token_ids], dtype=np.float32)  # (T, H)


def attention_block(s: State, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                    segments: list[AttentionSegment]) -> np.ndarray:
    c, layer = s.config, s.layers[i]
    xe, xo = K.split_even_odd(x, layer.input_norm, c.rms_norm_eps, True)  # RMSNorm fused into the split
    qkv = np.zeros((x.shape[0], layer.qkv.shape[0]), np.float32)  # (T, (Hq + 2 Hkv) D)
    K.project(xe, xo, layer.qkv, qkv)
    attn = np.empty((x.shape[0], c.num_attention_heads * c.head_dim), np.float32)  # (T, Hq D)
    for g in segments:
        rows = slice(g.start, g.stop)
        q = K.qk_norm_rope_cache(qkv[rows], layer.q_norm, layer.k_norm, cos[rows], sin[rows], c.rms_norm_eps,
                                 c.num_attention_heads, c.num_key_value_heads, g.k_cache, g.v_cache, g.pos)
        attn[rows] = K.attend_cached(q, g.k_cache, g.v_cache, g.pos).reshape(g.stop - g.start, -1)
    out = x.copy()  # the residual; o_proj adds into it
    K.project(*split(attn), layer.o_proj, out)
    return out


def feed_forward_block(s: State, i: int, x: np.ndarray) -> tuple[np.ndarray, Routing | None]:
    c, layer = s.config, s.layers[i]
    xe, xo = K.split_even_odd(x, layer.post_norm, c.rms_norm_eps, True)
    out = x.copy()  # the residual; the down projection adds into it
    if layer.router is None:
        h = K.dense_gate_up(xe, xo, layer.gate_up)  # (T, I)
        K.project(*split(h), layer.down, out)
        return out, None
    probs, experts, weights = K.route(xe, xo, layer.router, c.num_experts_per_tok, c.norm_topk_prob)
    order, starts = K.group_by_expert(experts, c.num_experts)
    active = np.flatnonzero(np.diff(starts))  # experts chosen by at least one token
    gates, ups, downs = layer.experts
    h = K.experts_gate_up(xe, xo, gates, ups, active, order, starts, c.num_experts_per_tok)  # (picks, I)
    K.experts_down(h, downs, active, order, starts, weights, c.num_experts_per_tok, out)
    return out, Routing(probs=probs, experts=experts, weights=weights)


def final_logits(s: State, x: np.ndarray) -> np.ndarray:
    xe, xo = K.split_even_odd(x, s.norm, s.config.rms_norm_eps, True)
    logits = np.zeros((x.shape[0], s.lm_head.shape[0]), np.float32)  # (T, V)
    K.project(xe, xo, s.lm_head, logits)
    return logits
