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

from types import FunctionType

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


def _lo(w, r, j):
    """Element 2j of row r of a weight matrix, as float32."""


def _hi(w, r, j):
    """Element 2j + 1 of row r of a weight matrix, as float32."""


@overload(_lo, inline="always")
def _lo_impl(w, r, j):
    if w.dtype == types.uint32:  # two bf16 per word, little-endian: element 2j is the low half
        return lambda w, r, j: _as_float32(w[r, j] << SHIFT)
    if w.dtype == types.float32:
        return lambda w, r, j: w[r, 2 * j]


@overload(_hi, inline="always")
def _hi_impl(w, r, j):
    if w.dtype == types.uint32:
        return lambda w, r, j: _as_float32(w[r, j] & HIGH)
    if w.dtype == types.float32:
        return lambda w, r, j: w[r, 2 * j + 1]


@njit(**FLAGS, inline="always")
def _dot(w, r, xe, xo, t) -> np.float32:
    """Row r of w times token t of x, with x given as its even (xe) and odd (xo) elements.

    Matrices and indices rather than row views: in a loop that runs millions of times per step, creating a view
    (with its reference-count updates) costs more than the 2 KB dot product it feeds.
    """
    acc = np.float32(0.0)
    for j in range(xe.shape[1]):
        acc += xe[t, j] * _lo(w, r, j) + xo[t, j] * _hi(w, r, j)
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
    for r in prange(w.shape[0]):
        for t in range(xe.shape[0]):
            out[t, r] += _dot(w, r, xe, xo, t)


@njit(**FLAGS)
def widen(w):
    """bf16 words (N, K/2) -> float32 (N, K): for steps with many tokens, where BLAS does the multiplying.

    Each word becomes one 64-bit pair of float32 bit patterns (odd element in the high half, even in the low), so
    the stores are contiguous and vectorise. One thread on purpose: it runs between BLAS calls, whose worker threads
    keep spinning on the other cores for a while after each call, and a parallel loop would wait for them.
    """
    N, half = w.shape
    out = np.empty((N, half), np.uint64)
    for r in range(N):
        for j in range(half):
            word = np.uint64(w[r, j])
            out[r, j] = ((word & np.uint64(0xFFFF0000)) << np.uint64(32)) | ((word << np.uint64(16)) &
                                                                             np.uint64(0xFFFFFFFF))
    return out.view(np.float32)


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
def route(xe, xo, gate, top_k, norm_topk_prob, disabled):
    """Router GEMV + softmax over all experts + top-k (ties to the lower expert id) + optional renormalisation.

    ``disabled`` (E,) masks experts out before the softmax (a what-if of the routing explorer; all False normally).
    Returns probs (T, E), experts (T, K) most probable first, weights (T, K).
    """
    T, E = xe.shape[0], gate.shape[0]
    probs = np.zeros((T, E), np.float32)
    project_serial(xe, xo, gate, probs)  # E rows: too little work to start threads for
    for t in range(T):
        for e in range(E):
            if disabled[e]:
                probs[t, e] = -np.inf
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
                if not taken[e] and not disabled[e] and (best < 0 or p[e] > p[best]):
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


ROWS_PER_ITEM = 16  # rows of one expert per parallel work item: amortises fetching the expert's matrix


@njit(**FLAGS, parallel=True)
def experts_gate_up(xe, xo, gates, ups, active, order, starts, top_k):
    """SiLU(gate(x)) * up(x) for every pick of every active expert: (picks, I), rows in ``order``.

    ``gates``/``ups`` are lists of each expert's (I, H/2) matrices, straight from the checkpoint's memory map.
    Work is split over (expert, block of rows) items so that even one token's 8 experts keep every thread busy;
    each row is read once for all the expert's tokens.
    """
    inter = gates[0].shape[0]
    blocks = (inter + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    h = np.empty((order.shape[0], inter), np.float32)
    for item in prange(active.shape[0] * blocks):
        e = active[item // blocks]
        gate, up = gates[e], ups[e]
        first = (item % blocks) * ROWS_PER_ITEM
        for r in range(first, min(first + ROWS_PER_ITEM, inter)):
            for a in range(starts[e], starts[e + 1]):
                t = order[a] // top_k
                g = _dot(gate, r, xe, xo, t)
                h[a, r] = g / (np.float32(1.0) + np.exp(-g)) * _dot(up, r, xe, xo, t)
    return h


@njit(**FLAGS, parallel=True)
def experts_down(h, downs, active, order, starts, weights, top_k, out):
    """out[t] += weight * down_e(h) for every pick: the routing-weighted sum, added into the residual ``out``.

    Two passes. First every (expert, block of rows) item -- the split of experts_gate_up -- writes down_e(h) for
    the expert's picks into y. Then one thread per output column adds the weighted picks of each token into
    ``out`` (in ascending expert order, as the reference sums them).
    """
    H = downs[0].shape[0]
    he, ho = h[:, 0::2].copy(), h[:, 1::2].copy()
    blocks = (H + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    y = np.empty((order.shape[0], H), np.float32)  # (picks, H), rows in ``order``
    for item in prange(active.shape[0] * blocks):
        e = active[item // blocks]
        down = downs[e]
        first = (item % blocks) * ROWS_PER_ITEM
        for r in range(first, min(first + ROWS_PER_ITEM, H)):
            for a in range(starts[e], starts[e + 1]):
                y[a, r] = _dot(down, r, he, ho, a)
    flat_weights = weights.ravel()
    for r in prange(H):
        for e in active:
            for a in range(starts[e], starts[e + 1]):
                out[order[a] // top_k, r] += flat_weights[order[a]] * y[a, r]


@njit(**FLAGS, parallel=True)
def dense_gate_up(xe, xo, gate_up):
    """SiLU(gate(x)) * up(x) of a dense MLP; gate_up (2I, H/2) stacks the gate rows then the up rows."""
    T, inter = xe.shape[0], gate_up.shape[0] // 2
    h = np.empty((T, inter), np.float32)
    for r in prange(inter):
        for t in range(T):
            g = _dot(gate_up, r, xe, xo, t)
            h[t, r] = g / (np.float32(1.0) + np.exp(-g)) * _dot(gate_up, inter + r, xe, xo, t)
    return h


# ---- serial twins --------------------------------------------------------------------------------------------


def _serial_twin(kernel):
    """The same Python function compiled without threads, under its own name (so its cache files are its own)."""
    fn = kernel.py_func
    twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    return njit(**FLAGS)(twin)


# The kernels built without threads. Starting a parallel region costs tens of microseconds, more than a small
# model's whole projection takes; the backend runs these when a call touches little memory (see PARALLEL_MIN_BYTES).
project_serial = _serial_twin(project)
SERIAL = {kernel: _serial_twin(kernel)
          for kernel in (attend_cached, experts_gate_up, experts_down, dense_gate_up)} | {project: project_serial}
