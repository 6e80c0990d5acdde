"""The ``numba`` backend: the reference's block operations (``qwen3moe/reference_backend.py``) on Numba kernels.

``prepare`` lays the weights out for the kernels once, at load time:
  * bf16 matrices become uint32 views of the same memory (two bf16 per word) -- no copy, still memory-mapped;
  * q, k and v projections are stacked into one matrix so one pass over the normalised input computes all three
    (a small copy), and likewise a dense MLP's gate and up;
  * an MoE layer's experts become one ``numba.typed.List`` of (gate, up, down) matrices: views again, so
    loading a 60 GB checkpoint copies no expert and a decode step touches only the experts it chose;
  * f16 checkpoints are widened to f32 once (Numba has no fast f16 arithmetic); f32 checkpoints are used as they are;
  * the checkpoint's memory maps are populated (every page mapped now, not on first touch; see ``populate``).

Decode steps (a few tokens) run on the fused GEMV kernels: bound by memory at one token, and from two tokens on by
the arithmetic of the projections, which then widen each weight once for up to four tokens. A step with many tokens
(prefill, perplexity) does ~2 x tokens flops per weight byte, more than those kernels keep up with: there each
weight matrix is widened to float32 block by block, once per step, and multiplied by BLAS, and long prompts attend
through the reference's BLAS attention. The cut-over is ``MANY_TOKENS``.

A small model's decode step (the bundled model's reads 6.6 MB, ~0.2 ms of kernels) is bound by the cost of the calls
themselves as much as by memory, so each block is as few compiled calls as its parts allow: the RMSNorm runs inside
the projection after it, q/k-norm + RoPE + cache write + attention is one call per request, and an MoE block whose
experts are small is one call altogether. Calls that touch little memory run on one thread (``PARALLEL_MIN_BYTES``).
Batch-1 greedy decoding (``GreedyDecoder``, which ``generate`` uses after the prefill) goes further: the whole step,
lm_head and argmax included, is one compiled call.

``precision="bf16"`` (bf16 checkpoints, CPUs with AVX512-BF16): the products of steps of fewer than MANY_TOKENS
tokens -- the whole-step decoders' and the model loop's kernels (projections, experts, dense MLP) -- round their
input to bf16 once and multiply with ``vdpbf16ps``, as llama.cpp does (numba_kernels.py). Those steps are bound by
memory or, from a few tokens on (batch decoding), by the arithmetic, which the instruction halves. The router keeps
float32, as do the BLAS products of longer steps (prefill) and a small model's one-call MoE block (``moe_block``).
"""

import functools
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numba
import numpy as np
from numba.typed import List
from threadpoolctl import ThreadpoolController

from qwen3moe.checkpoint import populate
from qwen3moe.config import Qwen3MoeConfig
from qwen3moe.debug import NonFiniteError
from qwen3moe.layers import AttentionSegment, Routing, attend, rope_cos_sin, silu
from qwen3moe.router_stats import RouterStats
from qwen3moe.sampling import sample
from qwen3moe.weights import Qwen3MoeWeights, SparseMoeBlock

from . import numba_kernels as K

xp = np  # activations and KV caches are NumPy arrays
# Calls that touch less memory run on one thread (K.SERIAL). Waking the worker threads costs ~40 us once they have
# gone to sleep between two steps (as long as one thread takes to read 2 MB), and far more when another process
# holds the other cores; at 4 MB the threads win even so.
PARALLEL_MIN_BYTES = 1 << 22
SLOW_STEP, BACKOFF_STEPS, MAX_BACKOFF_STEPS = 3, 16, 1024  # GreedyDecoder: when to fall back to one thread
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
    experts: List | None  # MoE: typed List of E (gate (I, H/2), up (I, H/2), down (H, I/2)) words
    expert_nbytes: int  # MoE: bytes of one expert's three matrices (indexing a typed List from Python is slow)
    no_disabled: np.ndarray | None  # MoE: (E,) all False, the router's mask when no expert is disabled
    expert_matrices: list | None = None  # MoE: the same (gate, up, down) as a Python list


@dataclass
class State:
    config: Qwen3MoeConfig
    embed_tokens: np.ndarray  # (V, H/2) words
    layers: list[Layer]
    norm: np.ndarray  # (H,) f32
    lm_head: np.ndarray  # (V, H/2) words
    decoding: "DecodingWeights | None" = None  # the weights as K.decode_step takes them (GreedyDecoder)
    precision: str = "float32"  # "bf16": products of steps under MANY_TOKENS tokens take bf16 activations


def words(w: np.ndarray) -> np.ndarray:
    """A weight matrix as the kernels read it: bf16 -> uint32 pairs (a view), f32 as it is, f16 widened to f32."""
    if w.dtype.name == "bfloat16":
        return np.ascontiguousarray(w).view(np.uint32)
    return np.ascontiguousarray(w, dtype=np.float32)


def prepare(weights: Qwen3MoeWeights, config: Qwen3MoeConfig, precision: str = "float32") -> State:
    if config.hidden_size % 2 or config.head_dim % 2:
        raise ValueError("the numba backend needs an even hidden_size and head_dim")
    if precision == "bf16":
        if not K.bf16_supported():
            raise ValueError("precision 'bf16' on the numba backend multiplies with AVX512-BF16 (vdpbf16ps), which "
                             "this CPU lacks; use precision='float32'")
        other = {m.dtype.name for m in [weights.lm_head] + [l.self_attn.q_proj for l in weights.layers]} - {"bfloat16"}
        if other:
            raise ValueError("precision 'bf16' on the numba backend needs a bf16 checkpoint (this one's matrices are "
                             f"{', '.join(sorted(other))}); use precision='float32'")
    populate([weights.embed_tokens, weights.lm_head] + [l.self_attn.q_proj for l in weights.layers] +
             [e.gate_proj for l in weights.layers if isinstance(l.mlp, SparseMoeBlock) for e in l.mlp.experts])
    layers = []
    for i, lw in enumerate(weights.layers):
        a = lw.self_attn
        f32 = lambda v: np.asarray(v, dtype=np.float32)
        if isinstance(lw.mlp, SparseMoeBlock):
            matrices = [(words(e.gate_proj), words(e.up_proj), words(e.down_proj)) for e in lw.mlp.experts]
            experts = K.expert_list(*matrices[0])
            for m in matrices[1:]:
                K.add_expert(experts, *m)
            gate_up, down, router = None, None, words(lw.mlp.gate)
            expert_nbytes = sum(m.nbytes for m in matrices[0])
            no_disabled = np.zeros(config.num_experts, np.bool_)
        else:
            gate_up, down = words(np.concatenate([lw.mlp.gate_proj, lw.mlp.up_proj])), words(lw.mlp.down_proj)
            router = experts = no_disabled = None
            expert_nbytes = 0
        layers.append(Layer(f32(lw.input_layernorm), words(np.concatenate([a.q_proj, a.k_proj, a.v_proj])),
                            f32(a.q_norm), f32(a.k_norm), words(a.o_proj), f32(lw.post_attention_layernorm),
                            gate_up, down, router, experts, expert_nbytes, no_disabled,
                            matrices if router is not None else None))
    return State(config, words(weights.embed_tokens), layers, np.asarray(weights.norm, np.float32),
                 words(weights.lm_head), precision=precision)


def joined(xe: np.ndarray, xo: np.ndarray) -> np.ndarray:
    """The inverse of K.split_even_odd: rows in their natural order, as BLAS takes them."""
    x = np.empty((xe.shape[0], 2 * xe.shape[1]), np.float32)
    x[:, 0::2], x[:, 1::2] = xe, xo
    return x


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ W.T for many tokens: W (N, K/2 words) widened BLOCK_ROWS rows at a time, each block used once by BLAS."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    with blas_threads(w.nbytes):
        for start in range(0, w.shape[0], BLOCK_ROWS):
            block = w[start:start + BLOCK_ROWS]
            out[:, start:start + BLOCK_ROWS] = x @ (K.widen(block) if block.dtype == np.uint32 else block).T
    return out


def blas_threads(nbytes: int):
    """Where BLAS multiplies (the prefill's matrices and attention): on one thread for work under PARALLEL_MIN_BYTES,
    as the kernels here run small calls. More threads gain little there, and OpenBLAS's workers keep spinning for
    tens of milliseconds after a call, which stalls the threaded decode steps after a prefill (bundled model: see
    docs/benchmarks.md)."""
    return blas_controller().limit(limits=1, user_api="blas") if nbytes < PARALLEL_MIN_BYTES else nullcontext()


@functools.cache
def blas_controller() -> ThreadpoolController:
    """The BLAS that NumPy multiplies with (found once: it reads the loaded libraries)."""
    return ThreadpoolController()


def normed(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm(x) * weight with rows in their natural order, as BLAS takes them."""
    return joined(*K.split_even_odd(x, weight, eps, True))


def activations(s: State, w: np.ndarray) -> np.ndarray:
    """How a kernel's product with ``w`` takes its input (the kernels' ``like``): rounded to bf16 and packed
    (K.PACKED) at precision bf16 where w holds bf16 pairs, else float32 (K.FLOAT32)."""
    return K.PACKED if s.precision == "bf16" and w.dtype == np.uint32 else K.FLOAT32


def run(kernel, nbytes: int, *args):
    """Run a threaded kernel, or its one-thread twin when the call touches fewer than PARALLEL_MIN_BYTES."""
    return (kernel if nbytes >= PARALLEL_MIN_BYTES else K.SERIAL[kernel])(*args)


def embed(s: State, token_ids: np.ndarray) -> np.ndarray:
    return K.embed_rows(s.embed_tokens, token_ids, s.config.hidden_size)  # (T,) -> (T, H)


def attention_block(s: State, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                    segments: list[AttentionSegment]) -> np.ndarray:
    c, layer = s.config, s.layers[i]
    T = x.shape[0]
    if T < MANY_TOKENS:  # qkv: (T, (Hq + 2 Hkv) D)
        qkv = run(K.norm_project, layer.qkv.nbytes * T, x, layer.input_norm, c.rms_norm_eps, layer.qkv,
                  activations(s, layer.qkv))
    else:
        qkv = matmul(normed(x, layer.input_norm, c.rms_norm_eps), layer.qkv)
    attn = np.empty((T, c.num_attention_heads * c.head_dim), np.float32)  # (T, Hq D)
    for g in segments:
        n = g.stop - g.start
        if n < MANY_TOKENS:
            cached_bytes = 2 * g.k_cache.strides[0] * (g.pos + n) * n  # keys and values, read once per query
            run(K.attend_segment, cached_bytes, qkv, cos, sin, layer.q_norm, layer.k_norm, c.rms_norm_eps,
                c.num_attention_heads, g.start, g.stop, g.k_cache, g.v_cache, g.pos, attn)
        else:
            rows = slice(g.start, g.stop)
            q = K.qk_norm_rope_cache(qkv[rows], layer.q_norm, layer.k_norm, cos[rows], sin[rows], c.rms_norm_eps,
                                     c.num_attention_heads, c.num_key_value_heads, g.k_cache, g.v_cache, g.pos)
            keys = 2 * g.k_cache.strides[0] * (g.pos + n)  # the bytes of keys and values attention reads
            with blas_threads(keys + 4 * c.num_attention_heads * n * (g.pos + n)):  # and of its scores
                attn[rows] = attend(q, g.k_cache[:g.pos + n], g.v_cache[:g.pos + n], g.pos).reshape(n, -1)
    if T < MANY_TOKENS:  # o_proj adds into the residual
        return run(K.project_residual, layer.o_proj.nbytes * T, attn, layer.o_proj, x, activations(s, layer.o_proj))
    return x + matmul(attn, layer.o_proj)


def feed_forward_block(s: State, i: int, x: np.ndarray, top_k: int,
                       disabled: np.ndarray | None) -> tuple[np.ndarray, Routing | None]:
    c, layer = s.config, s.layers[i]
    T = x.shape[0]
    if layer.router is None:
        if T < MANY_TOKENS:
            h = run(K.dense_gate_up, layer.gate_up.nbytes * T, x, layer.post_norm, c.rms_norm_eps, layer.gate_up,
                    activations(s, layer.gate_up))  # (T, I)
            return run(K.project_residual, layer.down.nbytes * T, h, layer.down, x, activations(s, layer.down)), None
        gate_up = matmul(normed(x, layer.post_norm, c.rms_norm_eps), layer.gate_up)
        h = silu(gate_up[:, :gate_up.shape[1] // 2]) * gate_up[:, gate_up.shape[1] // 2:]  # (T, I)
        return x + matmul(h, layer.down), None
    mask = layer.no_disabled if disabled is None else disabled
    most_experts = min(T * top_k, c.num_experts)  # the step reads at most this many experts
    if T < MANY_TOKENS and layer.router.nbytes + most_experts * layer.expert_nbytes < PARALLEL_MIN_BYTES:
        # one thread would run every kernel of the block: run them as one call
        out, probs, experts, weights = K.moe_block(x, layer.post_norm, c.rms_norm_eps, layer.router, layer.experts,
                                                   top_k, c.norm_topk_prob, mask)
        return out, Routing(probs=probs, experts=experts, weights=weights)
    xe, xo = K.split_even_odd(x, layer.post_norm, c.rms_norm_eps, True)
    out = x.copy()  # the residual; the down projection adds into it
    probs, experts, weights = K.route(xe, xo, layer.router, top_k, c.norm_topk_prob, mask)
    order, starts = K.group_by_expert(experts, c.num_experts)
    picks = np.diff(starts)  # tokens per expert
    few = np.flatnonzero((picks > 0) & (picks < MANY_TOKENS))  # fused kernels: each row read once for its tokens
    if len(few):
        expert_bytes = len(few) * layer.expert_nbytes
        like = activations(s, layer.expert_matrices[0][0])  # (the router above took float32 whatever it is)
        pe, po = (xe, xo) if like is K.FLOAT32 else K.split_like(x, layer.post_norm, c.rms_norm_eps, True, like)
        h = run(K.experts_gate_up, expert_bytes, pe, po, layer.experts, few, order, starts, top_k)  # (picks, I)
        run(K.experts_down, expert_bytes, h, layer.experts, few, order, starts, weights, top_k, out, like)
    many = np.flatnonzero(picks >= MANY_TOKENS)  # BLAS on widened weights
    if len(many):
        xn = joined(xe, xo)
        for e in many:
            chosen = order[starts[e]:starts[e + 1]]  # flat (token, slot) picks of expert e
            tokens = chosen // top_k
            xt = xn[tokens]
            gate, up, down = layer.experts[e]
            h = silu(matmul(xt, gate)) * matmul(xt, up)  # (n_e, I)
            out[tokens] += weights.ravel()[chosen][:, None] * matmul(h, down)  # tokens are distinct
    return out, Routing(probs=probs, experts=experts, weights=weights)


def final_logits(s: State, x: np.ndarray) -> np.ndarray:
    """lm_head(norm(x)): (T, H) -> (T, V)."""
    if x.shape[0] < MANY_TOKENS:
        return run(K.norm_project, s.lm_head.nbytes * x.shape[0], x, s.norm, s.config.rms_norm_eps, s.lm_head,
                   activations(s, s.lm_head))
    return matmul(normed(x, s.norm, s.config.rms_norm_eps), s.lm_head)


# ---- batch-1 greedy decoding: a whole step in one call ------------------------------------------------------------


class GreedyDecoder:
    """Greedy decoding of one sequence, each step -- embedding, every layer, lm_head, argmax, router counts -- one
    compiled call (``K.decode_step``).

    Why: through the model loop a decode step of the bundled model is ~20 kernel calls from Python plus the loop's
    own bookkeeping (requests to rows, RoPE tables, router statistics, sampling): ~330 us, of which the kernels'
    arithmetic is well under half. Here the step is one call into one parallel region whose threads share out every
    phase (see the notes above ``K.decode_step``), RoPE comes from a table made once, the router statistics are
    counted in arrays during the step and handed over by ``flush_stats``, and the token is the argmax of the logits
    (the lowest id among equals; NaN or +Inf logits raise NonFiniteError, as the reference sampler does).
    ``generate`` uses it after the prefill when nothing needs the per-step path (see ``backends.py``).

    ``cache`` must already hold positions [0, pos); ``token`` is the input at ``pos``. The keys and values it writes
    are the ones the per-step path would write, so the cache stays usable by it. ``logits`` holds the last step's.
    A checkpoint whose matrices are not all of one dtype (bf16, or f32) decodes through the block operations.
    """

    def __init__(self, s: State, cache, pos: int, token: int):
        c = s.config
        if not isinstance(cache.k, np.ndarray):
            raise TypeError("the numba backend needs KV caches in host memory (NumPy arrays)")
        s.decoding = s.decoding or decoding_weights(s)
        self.s, self.cache, self.capacity, self.pos, self.token, self.steps = s, cache, cache.capacity, int(pos), \
            int(token), 0
        self.logits = np.empty(s.lm_head.shape[0], np.float32)
        E, n_moe = c.num_experts, len(c.moe_layers)
        self._counts = np.zeros((max(n_moe, 1), E), np.int64)  # since the last flush, per MoE layer
        self._prob_sum = np.zeros((max(n_moe, 1), E), np.float64)
        self._entropy = np.zeros(max(n_moe, 1), np.float64)
        if s.decoding.table is None:  # mixed dtypes: the block operations, one step at a time
            self._stats = RouterStats(c)
            return
        cos, sin = rope_cos_sin(np.arange(cache.capacity), c.head_dim, c.rope_theta)  # (capacity, D) each
        d = s.decoding
        self._args = (s.embed_tokens, s.lm_head, d.table, d.layer_norms, d.qk_norms, d.moe_slot, s.norm, cache.k,
                      cache.v, cos, sin, np.float32(c.rms_norm_eps), c.num_attention_heads, c.num_experts_per_tok,
                      bool(c.norm_topk_prob), np.zeros(E, np.bool_), self.logits, self._counts, self._prob_sum,
                      self._entropy, activations(s, s.lm_head))  # (the table's matrices share lm_head's dtype)
        # One thread when the step reads less than PARALLEL_MIN_BYTES (waking the others would cost more).
        self._threads = numba.get_num_threads() if d.step_bytes >= PARALLEL_MIN_BYTES else 1
        # Recent step times in seconds, threaded and on one thread (see _decode); the first step runs on one thread.
        self._fastest = {True: np.inf, False: np.inf}
        self._one_thread_steps, self._backoff, self._clean_steps = 1, BACKOFF_STEPS, 0

    def step(self) -> int:
        """Decode one token: the greedy successor of the previous one (the first time: of ``token``)."""
        if self.pos >= self.capacity:
            raise ValueError(f"the KV cache is full ({self.capacity} positions)")
        token = self._choose(self._step_through_blocks() if self.s.decoding.table is None else self._decode())
        self.pos, self.token, self.steps = self.pos + 1, int(token), self.steps + 1
        return self.token

    def _choose(self, argmax: int) -> int:
        """This step's token from the argmax of its logits (-1: they hold NaN or +Inf)."""
        if argmax < 0:
            raise NonFiniteError("the logits contain NaN or +Inf; run with debug=True (--debug) to find the layer "
                                 "and tensor where they first appear")
        return argmax

    def _decode(self) -> int:
        """One K.decode_step, on all threads or on one.

        The threads of a step wait for each other a couple of dozen times. When another process holds a core, the
        thread being waited for may be off the CPU for a whole time slice (milliseconds, against ~0.1 ms for a
        step), and one thread is faster. So a threaded step slower than SLOW_STEP times the recent one-thread steps
        sends the next BACKOFF_STEPS steps to one thread, after which the threads are tried again; each further
        stall doubles that, up to MAX_BACKOFF_STEPS, until the threads have run that many steps without one.
        """
        threaded = self._threads > 1 and not self._one_thread_steps
        start = time.perf_counter()
        if threaded:
            token = K.decode_step(self.token, self.pos, self._threads, *self._args)
        else:
            self._one_thread_steps = max(0, self._one_thread_steps - 1)
            threads = numba.get_num_threads()
            numba.set_num_threads(1)  # for this call: the other threads are not woken
            try:
                token = K.decode_step(self.token, self.pos, 1, *self._args)
            finally:
                numba.set_num_threads(threads)
        elapsed = time.perf_counter() - start
        if threaded and elapsed > SLOW_STEP * self._fastest[False]:
            self._one_thread_steps, self._backoff = self._backoff, min(2 * self._backoff, MAX_BACKOFF_STEPS)
            self._clean_steps = 0
        elif threaded:
            self._clean_steps += 1
            if self._clean_steps == MAX_BACKOFF_STEPS:  # a long run without a stall: the other process has gone
                self._backoff = BACKOFF_STEPS
        self._fastest[threaded] = min(elapsed, 1.02 * self._fastest[threaded])  # 1.02: steps grow with pos
        return token

    def _step_through_blocks(self) -> int:
        from qwen3moe.debug import Debugger
        from qwen3moe.model import Request, forward

        (self.logits[:],) = forward(sys.modules[__name__], self.s, self.s.config,
                                    [Request([self.token], self.pos, self.cache)], self._stats, Debugger())
        return -1 if np.isnan(self.logits).any() or np.isposinf(self.logits).any() else int(np.argmax(self.logits))

    def flush_stats(self, stats: RouterStats) -> None:
        """Add the routing of the steps since the last flush to ``stats``."""
        if self.s.decoding.table is None:
            for layer in self._stats.counts:
                stats.add(layer, self._stats.counts[layer], self._stats.tokens[layer], self._stats.entropy_sum[layer],
                          self._stats.prob_sum[layer])
            self._stats.reset()
        else:
            for m, layer in enumerate(self.s.config.moe_layers):
                stats.add(layer, self._counts[m].copy(), self.steps, float(self._entropy[m]),
                          self._prob_sum[m].copy())
            for a in (self._counts, self._prob_sum, self._entropy):
                a[:] = 0
        self.steps = 0


class SampledDecoder(GreedyDecoder):
    """Sampled decoding of one sequence: GreedyDecoder's whole steps, each token drawn from the step's logits by the
    reference sampler (``qwen3moe.sampling.sample``) with ``sampling`` = (temperature, topk, topp, rng): the same
    draws, one number of ``rng`` a step, as the model loop takes. ``generate`` uses it when the settings sample (the
    bundled model's generation_config.json does): there a step through the model loop took 0.53 ms, through this
    decoder 0.24 (docs/benchmarks.md), most of the difference the loop's own bookkeeping."""

    def __init__(self, s: State, cache, pos: int, token: int, sampling: tuple):
        super().__init__(s, cache, pos, token)
        self.temperature, self.topk, self.topp, self.rng = sampling

    def _choose(self, argmax: int) -> int:
        return sample(self.logits, self.temperature, self.topk, self.topp, self.rng)


@dataclass
class DecodingWeights:
    """The weights as K.decode_step takes them, made once per State by the first GreedyDecoder."""

    table: np.ndarray | None  # (matrices, 3) int64: address, rows, columns (see K.QKV); None: mixed dtypes
    layer_norms: np.ndarray  # (L, 2, H) f32: input and post-attention norms
    qk_norms: np.ndarray  # (L, 2, D) f32
    moe_slot: np.ndarray  # (L,) int64: the layer's MoE index, -1 for a dense layer
    step_bytes: int  # weight bytes one step reads
    keep: list  # the arrays the table points into that nothing else holds (placeholders)


def decoding_weights(s: State) -> DecodingWeights:
    c = s.config
    dense = [l for l in s.layers if l.router is None]
    moe = [l for l in s.layers if l.router is not None]
    placeholder = np.zeros((2, 2), s.embed_tokens.dtype)
    matrices = [m for l in s.layers for m in (l.qkv, l.o_proj, l.gate_up if l.router is None else placeholder,
                                               l.down if l.router is None else placeholder)]
    matrices += [l.router for l in moe] + [m for l in moe for expert in l.expert_matrices for m in expert]
    uniform = all(m.dtype == s.embed_tokens.dtype == s.lm_head.dtype for m in matrices)
    table = np.array([(m.ctypes.data, m.shape[0], m.shape[1]) for m in matrices], np.int64) if uniform else None
    moe_slot = np.full(len(s.layers), -1, np.int64)
    moe_slot[c.moe_layers] = np.arange(len(c.moe_layers))
    step_bytes = s.lm_head.nbytes + sum(l.qkv.nbytes + l.o_proj.nbytes for l in s.layers) + sum(
        l.gate_up.nbytes + l.down.nbytes for l in dense) + sum(
        l.router.nbytes + c.num_experts_per_tok * l.expert_nbytes for l in moe)
    return DecodingWeights(table, np.stack([[l.input_norm, l.post_norm] for l in s.layers]),
                           np.stack([[l.q_norm, l.k_norm] for l in s.layers]), moe_slot, step_bytes, [placeholder])
