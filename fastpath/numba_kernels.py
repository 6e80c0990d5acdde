"""Numba CPU kernels for Qwen3-MoE: the fast twins of the functions in ``qwen3moe/layers.py``.

Decoding one token reads every active weight once and does two flops per weight, so on a CPU it is bound by memory
bandwidth, not arithmetic. The kernels are written for that:

* **bf16 stays bf16.** A weight row is read as the 16-bit words the checkpoint holds, two at a time as one uint32,
  and widened in registers: a bf16 is the top half of a float32, so ``word << 16`` is the even element and
  ``word & 0xFFFF0000`` the odd one (``_as_float32`` reinterprets the bits; no float32 copy of a weight ever exists).
  Half the bytes of a float32 copy means twice the speed.
* **The input is split into even and odd elements once** (``split_even_odd``) so that the inner loop is two
  contiguous fused multiply-adds per word, which LLVM vectorises (``fastmath`` lets it reorder the float32 sums).
* **Threads over output rows** (``prange``): each thread owns whole rows, so no two threads write the same output,
  and a row is read once for all the step's tokens (it stays in L1 while the tokens' dot products use it).
* **Fusion where it saves a pass over memory**: the RMSNorm is applied while splitting the input of the projection
  that follows it, projections accumulate into their output so the residual add is free, q/k-norm + RoPE + cache
  write is one pass, the router's GEMV + softmax + top-k is one call, gate/up + SiLU·mul is one pass, and the down
  projection applies the routing weight and adds into the residual.
* **The MoE block reads only chosen experts**, straight from the checkpoint's memory map (experts are passed as
  lists of matrices, so nothing is copied at load), and groups a step's tokens by expert so each expert's rows are
  read once per step however many tokens chose it.

Weights may also be float32 (an f32 checkpoint): ``_lo``/``_hi`` read a row's element pairs and Numba compiles one
version per dtype. ``cache=True`` stores the compiled code next to this file, so a second process starts at once.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# fastmath without 'nnan'/'ninf': sums may be reordered (that is what lets LLVM vectorise them) but NaN and Inf
# still propagate, so debug mode can find them; error_model="numpy": IEEE division, no zero checks in hot loops.
FLAGS = dict(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"}, nogil=True, error_model="numpy")
SHIFT, HIGH = np.uint32(16), np.uint32(0xFFFF0000)


@intrinsic
def _as_float32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (C++'s bit_cast); compiles to no instruction at all.

    (Numba widens ``uint32 << 16`` to a 64-bit integer, hence the truncation.)
    """
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        word = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(word, ir.FloatType())

    return types.float32(bits), codegen


def _lo(row, j):
    """Element 2j of a weight row, as float32."""


def _hi(row, j):
    """Element 2j + 1 of a weight row, as float32."""


@overload(_lo, inline="always")
def _lo_impl(row, j):
    if row.dtype == types.uint32:  # two bf16 per word, little-endian: element 2j is the low half
        return lambda row, j: _as_float32(row[j] << SHIFT)
    if row.dtype == types.float32:
        return lambda row, j: row[2 * j]


@overload(_hi, inline="always")
def _hi_impl(row, j):
    if row.dtype == types.uint32:
        return lambda row, j: _as_float32(row[j] & HIGH)
    if row.dtype == types.float32:
        return lambda row, j: row[2 * j + 1]


@njit(**FLAGS, inline="always")
def _dot(row, xe, xo) -> np.float32:
    """sum_k row[k] * x[k] with x given as its even (xe) and odd (xo) elements."""
    acc = np.float32(0.0)
    for j in range(xe.shape[0]):
        acc += xe[j] * _lo(row, j) + xo[j] * _hi(row, j)
    return acc


# ---- projections -----------------------------------------------------------------------------------------------


@njit(**FLAGS)
def split_even_odd(x, norm_weight, eps, normalize):
    """(T, K) -> even (T, K/2), odd (T, K/2); with ``normalize``, RMSNorm(x) * norm_weight is split instead."""
    T, K = x.shape
    xe = np.empty((T, K // 2), np.float32)
    xo = np.empty((T, K // 2), np.float32)
    for t in range(T):
        scale = np.float32(1.0)
        if normalize:
            ss = np.float32(0.0)
            for k in range(K):
                ss += x[t, k] * x[t, k]
            scale = np.float32(1.0) / np.sqrt(ss / np.float32(K) + np.float32(eps))
        for j in range(K // 2):
            a, b = x[t, 2 * j] * scale, x[t, 2 * j + 1] * scale
            if normalize:
                a, b = a * norm_weight[2 * j], b * norm_weight[2 * j + 1]
            xe[t, j], xo[t, j] = a, b
    return xe, xo


@njit(**FLAGS, parallel=True)
def project(xe, xo, w, out):
    """out[t, r] += x[t] . w[r] for every token t and row r of w (N, K/2 words): y += x @ W.T."""
    T = xe.shape[0]
    for r in prange(w.shape[0]):
        row = w[r]
        for t in range(T):
            out[t, r] += _dot(row, xe[t], xo[t])


@njit(**FLAGS, parallel=True)
def widen(w):
    """bf16 words (N, K/2) -> float32 (N, K): for steps with many tokens, where BLAS does the multiplying."""
    N, half = w.shape
    out = np.empty((N, 2 * half), np.float32)
    for r in prange(N):
        for j in range(half):
            out[r, 2 * j] = _lo(w[r], j)
            out[r, 2 * j + 1] = _hi(w[r], j)
    return out


# ---- attention -----------------------------------------------------------------------------------------------


@njit(**FLAGS)
def qk_norm_rope_cache(qkv, q_norm, k_norm, cos, sin, eps, n_heads, n_kv_heads, k_cache, v_cache, pos):
    """Split one request's fused q|k|v rows, RMSNorm q and k per head, rotate them, write k and v to the cache.

    qkv (n, (Hq + 2 Hkv) D) -> q (n, Hq, D), returned; k/v go to cache rows pos..pos+n-1 (NeoX rotate_half RoPE).
    """
    n = qkv.shape[0]
    D = q_norm.shape[0]
    half = D // 2
    q = np.empty((n, n_heads, D), np.float32)
    for t in range(n):
        for h in range(n_heads + 2 * n_kv_heads):
            src = qkv[t, h * D:(h + 1) * D]
            if h >= n_heads + n_kv_heads:  # v: copied as it is
                v_cache[pos + t, h - n_heads - n_kv_heads, :] = src
                continue
            weight = q_norm if h < n_heads else k_norm
            ss = np.float32(0.0)
            for d in range(D):
                ss += src[d] * src[d]
            scale = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
            dst = q[t, h] if h < n_heads else k_cache[pos + t, h - n_heads]
            for d in range(half):
                a = src[d] * scale * weight[d]
                b = src[d + half] * scale * weight[d + half]
                dst[d] = a * cos[t, d] - b * sin[t, d]
                dst[d + half] = b * cos[t, d + half] + a * sin[t, d + half]
    return q


@njit(**FLAGS, parallel=True)
def attend_cached(q, k_cache, v_cache, pos):
    """Causal grouped-query attention of n queries (positions pos..pos+n-1) over the cache; (n, Hq, D) -> same.

    One thread per kv head: it reads that head's keys and values once for all its query heads and queries.
    """
    n, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    group = Hq // Hkv
    scale = np.float32(D ** -0.5)
    out = np.empty_like(q)
    for g in prange(Hkv):
        scores = np.empty(pos + n, np.float32)
        for t in range(n):
            L = pos + t + 1  # keys this query may see
            for h in range(g * group, (g + 1) * group):
                best = -np.inf
                for j in range(L):
                    s = np.float32(0.0)
                    for d in range(D):
                        s += q[t, h, d] * k_cache[j, g, d]
                    scores[j] = s * scale
                    best = max(best, scores[j])
                total = np.float32(0.0)
                for j in range(L):
                    scores[j] = np.exp(scores[j] - best)
                    total += scores[j]
                for d in range(D):
                    out[t, h, d] = 0.0
                for j in range(L):
                    p = scores[j] / total
                    for d in range(D):
                        out[t, h, d] += p * v_cache[j, g, d]
    return out


# ---- router and experts --------------------------------------------------------------------------------------


@njit(**FLAGS)
def route(xe, xo, gate, top_k, norm_topk_prob):
    """Router GEMV + softmax over all experts + top-k (ties to the lower expert id) + optional renormalisation.

    Returns probs (T, E), experts (T, K) most probable first, weights (T, K).
    """
    T, E = xe.shape[0], gate.shape[0]
    probs = np.zeros((T, E), np.float32)
    project(xe, xo, gate, probs)
    experts = np.empty((T, top_k), np.int64)
    weights = np.empty((T, top_k), np.float32)
    for t in range(T):
        p = probs[t]
        p -= p.max()
        p[:] = np.exp(p)
        p /= p.sum()
        taken = np.zeros(E, np.bool_)
        for k in range(top_k):
            best = -1
            for e in range(E):  # strict '>' scanning upwards keeps the lowest id among equals
                if not taken[e] and (best < 0 or p[e] > p[best]):
                    best = e
            taken[best] = True
            experts[t, k], weights[t, k] = best, p[best]
        if norm_topk_prob:
            weights[t] /= weights[t].sum()
    return probs, experts, weights


@njit(**FLAGS)
def group_by_expert(experts, num_experts):
    """Sort the step's (token, slot) picks by expert: returns order (picks, sorted), starts (E + 1) offsets."""
    picks = experts.ravel()
    order = np.argsort(picks, kind="mergesort")  # stable: tokens of one expert stay in token order
    starts = np.zeros(num_experts + 1, np.int64)
    for e in picks:
        starts[e + 1] += 1
    for e in range(num_experts):
        starts[e + 1] += starts[e]
    return order, starts


@njit(**FLAGS, parallel=True)
def experts_gate_up(xe, xo, gates, ups, active, order, starts, top_k):
    """SiLU(gate(x)) * up(x) for every pick of every active expert: (picks, I), rows in ``order``.

    ``gates``/``ups`` are lists of each expert's (I, H/2) matrices, straight from the checkpoint's memory map.
    Work is split over (expert, row) pairs so that even one token's 8 experts keep every thread busy; each row is
    read once for all the expert's tokens.
    """
    inter = gates[0].shape[0]
    h = np.empty((order.shape[0], inter), np.float32)
    for f in prange(active.shape[0] * inter):
        e, r = active[f // inter], f % inter
        g_row, u_row = gates[e][r], ups[e][r]
        for a in range(starts[e], starts[e + 1]):
            t = order[a] // top_k
            g = _dot(g_row, xe[t], xo[t])
            u = _dot(u_row, xe[t], xo[t])
            h[a, r] = g / (np.float32(1.0) + np.exp(-g)) * u
    return h


@njit(**FLAGS, parallel=True)
def experts_down(h, downs, active, order, starts, weights, top_k, out):
    """out[t] += weight * down_e(h) for every pick: the routing-weighted sum, added into the residual ``out``.

    One thread per output row r: it reads row r of each active expert's down matrix (H, I/2) once and applies it to
    all of that expert's picks, so no two threads touch the same output element.
    """
    he, ho = h[:, 0::2].copy(), h[:, 1::2].copy()
    flat_weights = weights.ravel()
    for r in prange(out.shape[1]):
        for e in active:
            row = downs[e][r]
            for a in range(starts[e], starts[e + 1]):
                pick = order[a]
                out[pick // top_k, r] += flat_weights[pick] * _dot(row, he[a], ho[a])


@njit(**FLAGS, parallel=True)
def dense_gate_up(xe, xo, gate_up):
    """SiLU(gate(x)) * up(x) of a dense MLP; gate_up (2I, H/2) stacks the gate rows then the up rows."""
    T, inter = xe.shape[0], gate_up.shape[0] // 2
    h = np.empty((T, inter), np.float32)
    for r in prange(inter):
        for t in range(T):
            g = _dot(gate_up[r], xe[t], xo[t])
            u = _dot(gate_up[inter + r], xe[t], xo[t])
            h[t, r] = g / (np.float32(1.0) + np.exp(-g)) * u
    return h


# ---- measuring the machine -----------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def read_bandwidth_probe(words):
    """Sum a large uint32 array with every thread: the time it takes gives the machine's read bandwidth."""
    total = np.uint64(0)
    for i in prange(words.shape[0]):
        total += words[i]
    return total
