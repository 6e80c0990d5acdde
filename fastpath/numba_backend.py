"""The ``numba`` backend: the reference's block operations (``qwen3moe/reference_backend.py``) on Numba kernels.

``prepare`` lays the weights out for the kernels once, at load time:
  * bf16 matrices become uint32 views of the same memory (two bf16 per word) -- no copy, still memory-mapped;
  * q, k and v projections are stacked into one matrix so one pass over the normalised input computes all three
    (a small copy), and likewise a dense MLP's gate and up;
  * an MoE layer's experts become three ``numba.typed.List``s of matrices (gate, up, down): views again, so
    loading a 60 GB checkpoint copies no expert and a decode step touches only the experts it chose;
  * f16 checkpoints are widened to f32 once (Numba has no fast f16 arithmetic); f32 checkpoints are used as they are;
  * the checkpoint's memory maps are populated (every page mapped now, not on first touch; see ``populate``).

Decode steps (a few tokens) are bound by memory and run on the fused GEMV kernels. A step with many tokens (prefill,
perplexity) does ~2 x tokens flops per weight byte and is bound by arithmetic instead: there each weight matrix is
widened to float32 block by block, once per step, and multiplied by BLAS, and long prompts attend through the
reference's BLAS attention. The cut-over is ``MANY_TOKENS``.
"""

from dataclasses import dataclass

import numpy as np
from numba.typed import List

from qwen3moe.checkpoint import populate
from qwen3moe.config import Qwen3MoeConfig
from qwen3moe.layers import AttentionSegment, Routing, attend, silu
from qwen3moe.weights import Qwen3MoeWeights, SparseMoeBlock

from . import numba_kernels as K

PARALLEL_MIN_BYTES = 1 << 20  # calls that touch less memory run on one thread (K.SERIAL): no thread start-up
MANY_TOKENS = 16  # from this many tokens (or picks of one expert) on, widen weights in blocks and use BLAS
BLOCK_ROWS = 512  # rows widened at a time: 4 MB of float32 at hidden 2048, reused by BLAS while in cache


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
    expert_nbytes: int  # MoE: bytes of one expert's three matrices (indexing a typed List from Python is slow)


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
    populate([weights.embed_tokens, weights.lm_head] + [l.self_attn.q_proj for l in weights.layers] +
             [e.gate_proj for l in weights.layers if isinstance(l.mlp, SparseMoeBlock) for e in l.mlp.experts])
    layers = []
    for i, lw in enumerate(weights.layers):
        a = lw.self_attn
        f32 = lambda v: np.asarray(v, dtype=np.float32)
        if isinstance(lw.mlp, SparseMoeBlock):
            experts = tuple(List([words(getattr(e, p)) for e in lw.mlp.experts])
                            for p in ("gate_proj", "up_proj", "down_proj"))
            gate_up, down, router = None, None, words(lw.mlp.gate)
            expert_nbytes = sum(m[0].nbytes for m in experts)
        else:
            gate_up, down = words(np.concatenate([lw.mlp.gate_proj, lw.mlp.up_proj])), words(lw.mlp.down_proj)
            router = experts = None
            expert_nbytes = 0
        layers.append(Layer(f32(lw.input_layernorm), words(np.concatenate([a.q_proj, a.k_proj, a.v_proj])),
                            f32(a.q_norm), f32(a.k_norm), words(a.o_proj), f32(lw.post_attention_layernorm),
                            gate_up, down, router, experts, expert_nbytes))
    # np.asarray: a plain ndarray view of the memory map (indexing a np.memmap subclass costs ~0.2 ms per call)
    return State(config, np.asarray(weights.embed_tokens), layers, np.asarray(weights.norm, np.float32),
                 words(weights.lm_head))


def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Even and odd elements of each row, the form the projection kernels take their input in."""
    return K.split_even_odd(x, x[0], 0.0, False)


def joined(xe: np.ndarray, xo: np.ndarray) -> np.ndarray:
    """The inverse of split: rows in their natural order, as BLAS takes them."""
    x = np.empty((xe.shape[0], 2 * xe.shape[1]), np.float32)
    x[:, 0::2], x[:, 1::2] = xe, xo
    return x


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ W.T for many tokens: W (N, K/2 words) widened BLOCK_ROWS rows at a time, each block used once by BLAS."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    for start in range(0, w.shape[0], BLOCK_ROWS):
        block = w[start:start + BLOCK_ROWS]
        out[:, start:start + BLOCK_ROWS] = x @ (K.widen(block) if block.dtype == np.uint32 else block).T
    return out


def run(kernel, nbytes: int, *args):
    """Run a threaded kernel, or its one-thread twin when the call touches fewer than PARALLEL_MIN_BYTES."""
    return (kernel if nbytes >= PARALLEL_MIN_BYTES else K.SERIAL[kernel])(*args)


def project_into(xe: np.ndarray, xo: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out += x @ W.T, with x given split (and already normalised where a norm precedes the projection)."""
    if xe.shape[0] < MANY_TOKENS:
        run(K.project, w.nbytes * xe.shape[0], xe, xo, w, out)
    else:
        out += matmul(joined(xe, xo), w)


def embed(s: State, token_ids: np.ndarray) -> np.ndarray:
    return np.asarray(s.embed_tokens[token_ids], dtype=np.float32)  # (T, H)


def attention_block(s: State, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                    segments: list[AttentionSegment]) -> np.ndarray:
    c, layer = s.config, s.layers[i]
    xe, xo = K.split_even_odd(x, layer.input_norm, c.rms_norm_eps, True)  # RMSNorm fused into the split
    qkv = np.zeros((x.shape[0], layer.qkv.shape[0]), np.float32)  # (T, (Hq + 2 Hkv) D)
    project_into(xe, xo, layer.qkv, qkv)
    attn = np.empty((x.shape[0], c.num_attention_heads * c.head_dim), np.float32)  # (T, Hq D)
    for g in segments:
        rows = slice(g.start, g.stop)
        q = K.qk_norm_rope_cache(qkv[rows], layer.q_norm, layer.k_norm, cos[rows], sin[rows], c.rms_norm_eps,
                                 c.num_attention_heads, c.num_key_value_heads, g.k_cache, g.v_cache, g.pos)
        n, end = g.stop - g.start, g.pos + g.stop - g.start
        cached_bytes = 2 * g.k_cache[:end].nbytes * n
        heads = run(K.attend_cached, cached_bytes, q, g.k_cache, g.v_cache, g.pos) if n < MANY_TOKENS else \
            attend(q, g.k_cache[:end], g.v_cache[:end], g.pos)
        attn[rows] = heads.reshape(n, -1)
    out = x.copy()  # the residual; o_proj adds into it
    project_into(*split(attn), layer.o_proj, out)
    return out


def feed_forward_block(s: State, i: int, x: np.ndarray, top_k: int,
                       disabled: np.ndarray | None) -> tuple[np.ndarray, Routing | None]:
    c, layer = s.config, s.layers[i]
    xe, xo = K.split_even_odd(x, layer.post_norm, c.rms_norm_eps, True)
    out = x.copy()  # the residual; the down projection adds into it
    if layer.router is None:
        if x.shape[0] < MANY_TOKENS:
            h = run(K.dense_gate_up, layer.gate_up.nbytes * x.shape[0], xe, xo, layer.gate_up)  # (T, I)
        else:
            gate_up = matmul(joined(xe, xo), layer.gate_up)  # (T, 2I)
            h = silu(gate_up[:, :gate_up.shape[1] // 2]) * gate_up[:, gate_up.shape[1] // 2:]
        project_into(*split(h), layer.down, out)
        return out, None
    mask = np.zeros(c.num_experts, np.bool_) if disabled is None else disabled
    probs, experts, weights = K.route(xe, xo, layer.router, top_k, c.norm_topk_prob, mask)
    order, starts = K.group_by_expert(experts, c.num_experts)
    picks = np.diff(starts)  # tokens per expert
    gates, ups, downs = layer.experts
    few = np.flatnonzero((picks > 0) & (picks < MANY_TOKENS))  # fused kernels: each row read once for its tokens
    if len(few):
        expert_bytes = len(few) * layer.expert_nbytes
        h = run(K.experts_gate_up, expert_bytes, xe, xo, gates, ups, few, order, starts, top_k)  # (picks, I)
        run(K.experts_down, expert_bytes, h, downs, few, order, starts, weights, top_k, out)
    many = np.flatnonzero(picks >= MANY_TOKENS)  # BLAS on widened weights
    if len(many):
        xn = joined(xe, xo)
        for e in many:
            chosen = order[starts[e]:starts[e + 1]]  # flat (token, slot) picks of expert e
            tokens = chosen // top_k
            xt = xn[tokens]
            h = silu(matmul(xt, gates[e])) * matmul(xt, ups[e])  # (n_e, I)
            out[tokens] += weights.ravel()[chosen][:, None] * matmul(h, downs[e])  # tokens are distinct
    return out, Routing(probs=probs, experts=experts, weights=weights)


def final_logits(s: State, x: np.ndarray) -> np.ndarray:
    xe, xo = K.split_even_odd(x, s.norm, s.config.rms_norm_eps, True)
    logits = np.zeros((x.shape[0], s.lm_head.shape[0]), np.float32)  # (T, V)
    project_into(xe, xo, s.lm_head, logits)
    return logits
