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
  and a row is read once for all the step's tokens. With several tokens a projection is bound by arithmetic, not
  memory: there each 16 words of a row are widened once for up to four tokens, a chunk of the row at a time so that
  the tokens' x stays in the L1 cache (``_add_token_products``).
* **Fusion where it saves a pass over memory**: the RMSNorm is applied while splitting the input of the projection
  that follows it, projections accumulate into their output so the residual add is free, q/k-norm + RoPE + cache
  write is one pass, the router's GEMV + softmax + top-k is one call, gate/up + SiLU·mul is one pass, and the down
  projection applies the routing weight and adds into the residual.
* **The MoE block reads only chosen experts**, straight from the checkpoint's memory map (experts are passed as a
  list of matrices, so nothing is copied at load), and groups a step's tokens by expert so each expert's rows are
  read once per step however many tokens chose it.
* **Few calls where the work is small.** A call from Python costs ~1 us, and a small model's decode step is a few
  hundred microseconds of work in all, so a kernel takes a block's whole input (the norm inside the projection
  after it, the attention of one request in one call) and ``moe_block`` is a whole small MoE block. Each threaded
  kernel has a one-thread twin (``SERIAL``) for calls too small to pay for waking threads.
* **A whole greedy decode step in one call** (``decode_step``, for the backend's GreedyDecoder): every layer,
  the lm_head and the argmax in one parallel region, its threads sharing each phase's work through atomic
  counters rather than one parallel region (~3 us to start) per kernel.

* **Precision "bf16"** (``decode_step`` with packed activations, and the model loop's kernels with ``like`` =
  PACKED): each product's input is rounded to bf16 once and packed two to a word like the weights, and a row's dot
  product is AVX512-BF16's ``vdpbf16ps`` (32 products and sums a instruction, ``_dpbf16_row``) instead of widening
  every weight. llama.cpp multiplies bf16 weights so. The router keeps float32 products, as on the GPU: rounding
  would change its choices.

Weights may also be float32 (an f32 checkpoint): ``_lo``/``_hi`` read a row's element pairs and Numba compiles one
version per dtype. ``cache=True`` stores the compiled code next to this file, so a second process starts at once.
"""

import sys
from types import FunctionType

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils, event
from numba.extending import intrinsic, overload
from numba.typed import List

# fastmath without 'nnan'/'ninf': sums may be reordered (that is what lets LLVM vectorise them) but NaN and Inf
# still propagate, so debug mode can find them; error_model="numpy": IEEE division, no zero checks in hot loops.
FLAGS = dict(cache=True, fastmath={"reassoc", "contract", "nsz", "arcp", "afn"}, nogil=True, error_model="numpy")
JIT_OPTIONS = {k: v for k, v in FLAGS.items() if k != "cache"}  # (for overloads, which Numba does not cache apart)


class CompileNotice(event.Listener):
    """Says on stderr when Numba starts compiling one of this module's kernels. The first run on a machine compiles
    them all (~30 s on a 2-core CPU, ~17 s of it ``decode_step``); later processes load them from the cache in
    milliseconds. Without a word the first run would look hung. Kernels compiled inside another (inlined helpers,
    NumPy's sort) are part of it and say nothing."""

    def __init__(self):
        self.depth = 0

    def on_start(self, ev):
        self.depth += 1
        kernel = ev.data["dispatcher"].py_func
        if self.depth == 1 and kernel.__module__ == __name__:
            print(f"numba: compiling {kernel.__name__} for this CPU (once: later runs load it from Numba's cache)",
                  file=sys.stderr, flush=True)

    def on_end(self, ev):
        self.depth -= 1


event.register("numba:compile", CompileNotice())
SHIFT, HIGH = np.uint32(16), np.uint32(0xFFFF0000)
# The ``like`` argument of the kernels that multiply activations: products of float32 activations, or (precision bf16,
# bf16 weights) of activations rounded to bf16 and packed two to a word, multiplied by vdpbf16ps.
FLOAT32, PACKED = np.empty(0, np.float32), np.empty(0, np.uint32)


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


@intrinsic
def _bits(typingctx, value):
    """The bits of a float32 as a uint32 (the inverse of _as_float32)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


class _BFloat(ir.types.Type):
    """LLVM's bfloat type, which llvmlite does not name."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


DPBF16 = "llvm.x86.avx512bf16.dpbf16ps.512"  # vdpbf16ps zmm: 16 float32 sums += 32 bf16 x bf16 products
CHAINS = 4  # independent vdpbf16ps accumulators: enough to hide its latency (~6 cycles) behind the loads
GROUP_WORDS = CHAINS * 16  # words (pairs of bf16) of x and of a row one loop step takes


@intrinsic
def _dpbf16_row(typingctx, w_address, x_address, groups):
    """sum_k w[k] x[k] over the first ``groups`` x GROUP_WORDS words of a bf16 weight row and of packed bf16
    activations (addresses as int64), by vdpbf16ps into CHAINS accumulators of 16 float32 sums each, added up at the
    end. Needs AVX512-BF16 (``bf16_supported``)."""
    def codegen(context, builder, signature, args):
        w_at, x_at, n = args
        module, f32, i64 = builder.module, ir.FloatType(), ir.IntType(64)
        sums, pairs = ir.VectorType(f32, 16), ir.VectorType(_BFloat(), 32)
        dp = module.globals.get(DPBF16) or ir.Function(module, ir.FunctionType(sums, [sums, pairs, pairs]), DPBF16)
        name = "llvm.vector.reduce.fadd.v16f32"
        reduce = module.globals.get(name) or ir.Function(module, ir.FunctionType(f32, [f32, sums]), name)
        w, x = builder.inttoptr(w_at, pairs.as_pointer()), builder.inttoptr(x_at, pairs.as_pointer())
        before, loop, after = builder.block, builder.append_basic_block("dp_loop"), builder.append_basic_block("dp_end")
        zero = ir.Constant(sums, [0.0] * 16)
        builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, after)
        builder.position_at_end(loop)
        i = builder.phi(i64)
        i.add_incoming(ir.Constant(i64, 0), before)
        acc = [builder.phi(sums) for _ in range(CHAINS)]
        stepped = []
        for c, a in enumerate(acc):
            a.add_incoming(zero, before)
            at = builder.add(builder.mul(i, ir.Constant(i64, CHAINS)), ir.Constant(i64, c))
            stepped.append(builder.call(dp, [a, builder.load(builder.gep(w, [at]), align=4),
                                             builder.load(builder.gep(x, [at]), align=4)]))
            a.add_incoming(stepped[-1], loop)
        i_next = builder.add(i, ir.Constant(i64, 1))
        i.add_incoming(i_next, loop)
        builder.cbranch(builder.icmp_signed("<", i_next, n), loop, after)
        builder.position_at_end(after)
        final = [builder.phi(sums) for _ in range(CHAINS)]
        for f, a in zip(final, stepped):
            f.add_incoming(zero, before)
            f.add_incoming(a, loop)
        total = final[0]
        for f in final[1:]:
            total = builder.fadd(total, f)
        return builder.call(reduce, [ir.Constant(f32, 0.0), total], fastmath=("reassoc",))

    return types.float32(types.int64, types.int64, types.int64), codegen


CHUNK_WORDS = 256  # words of a row one pass of _rows_times_tokens takes: x's chunk for 8 tokens is 16 KB, in L1


def _rows_times_tokens_intrinsic(tokens: int, packed: bool):
    """An intrinsic: out[t, r] += sum over the first 16 * ``vectors`` words j of row r of bf16 weights times x[t]'s
    elements 2j and 2j + 1, for ``tokens`` tokens t and rows r = 0..n-1. Arguments as int64: the address of row 0 of
    w and the bytes between rows, n, the addresses of token 0's xe and xo and the bytes between tokens, vectors, and
    the address of out[0, 0] and the bytes between its tokens. x is float32 split into even (xe) and odd (xo)
    elements, or with ``packed`` (precision bf16) bf16 pairs packed into the words of xe (xo unused), multiplied
    by vdpbf16ps as in _dpbf16_row.

    Why: a few tokens' products are bound by arithmetic, not memory (see _add_token_products), and _dot, called per
    token and row, widens every weight again for each token and loads it and x for each. Here each 16 words of the
    row are loaded (and widened) once and multiplied by every token's x, into two sums a token in float32 (even and
    odd halves, so that the multiply-adds of consecutive words do not wait for each other), one packed.
    """
    @intrinsic
    def rows_times_tokens(typingctx, w_address, w_stride, n, xe_address, xo_address, x_stride, vectors, out_address,
                          out_stride):
        def codegen(context, builder, signature, args):
            w_at, w_stride, n, xe_at, xo_at, x_stride, vectors, out_at, out_stride = args
            module, f32, i32, i64 = builder.module, ir.FloatType(), ir.IntType(32), ir.IntType(64)
            floats, words = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
            name = "llvm.vector.reduce.fadd.v16f32"
            reduce = module.globals.get(name) or ir.Function(module, ir.FunctionType(f32, [f32, floats]), name)
            fast = ("reassoc", "contract")

            def token_pointers(at, stride, kind):
                return [builder.inttoptr(builder.add(at, builder.mul(ir.Constant(i64, t), stride)), kind.as_pointer())
                        for t in range(tokens)]

            pairs = ir.VectorType(_BFloat(), 32)
            dp = module.globals.get(DPBF16) or ir.Function(module, ir.FunctionType(floats, [floats, pairs, pairs]),
                                                           DPBF16)
            xe = token_pointers(xe_at, x_stride, pairs if packed else floats)
            xo = token_pointers(xo_at, x_stride, floats)
            out = token_pointers(out_at, out_stride, f32)
            shift, high = ir.Constant(words, [int(SHIFT)] * 16), ir.Constant(words, [int(HIGH) - (1 << 32)] * 16)
            zero, i64_0, i64_1 = ir.Constant(floats, [0.0] * 16), ir.Constant(i64, 0), ir.Constant(i64, 1)
            start = builder.block
            row_loop, word_loop = builder.append_basic_block("row"), builder.append_basic_block("words")
            row_end, done = builder.append_basic_block("row_end"), builder.append_basic_block("done")
            builder.cbranch(builder.icmp_signed(">", n, i64_0), row_loop, done)

            builder.position_at_end(row_loop)  # for r in range(n):
            r = builder.phi(i64)
            r.add_incoming(i64_0, start)
            row = builder.inttoptr(builder.add(w_at, builder.mul(r, w_stride)), words.as_pointer())
            builder.branch(word_loop)

            builder.position_at_end(word_loop)  # for v in range(vectors): the sums of every token
            v = builder.phi(i64)
            v.add_incoming(i64_0, row_loop)
            per_token = 1 if packed else 2
            sums = [builder.phi(floats) for _ in range(per_token * tokens)]  # (token[, even/odd])
            word = builder.load(builder.gep(row, [v]), align=4)
            if not packed:  # the row's even elements, then its odd ones, widened to float32
                halves = (builder.bitcast(builder.shl(word, shift), floats),
                          builder.bitcast(builder.and_(word, high), floats))
            stepped = []
            for i, total in enumerate(sums):
                total.add_incoming(zero, row_loop)
                if packed:
                    x = builder.load(builder.gep(xe[i], [v]), align=4)
                    stepped.append(builder.call(dp, [total, builder.bitcast(word, pairs), x]))
                else:
                    x = builder.load(builder.gep((xe, xo)[i % 2][i // 2], [v]), align=4)
                    stepped.append(builder.fadd(total, builder.fmul(halves[i % 2], x, flags=fast), flags=fast))
                total.add_incoming(stepped[-1], word_loop)
            v_next = builder.add(v, i64_1)
            v.add_incoming(v_next, word_loop)
            builder.cbranch(builder.icmp_signed("<", v_next, vectors), word_loop, row_end)

            builder.position_at_end(row_end)  # out[t, r] += the token's two sums, added up
            for t in range(tokens):
                both = stepped[t] if packed else builder.fadd(stepped[2 * t], stepped[2 * t + 1], flags=fast)
                at = builder.gep(out[t], [r])
                total = builder.call(reduce, [ir.Constant(f32, 0.0), both], fastmath=("reassoc",))
                builder.store(builder.fadd(builder.load(at), total), at)
            r_next = builder.add(r, i64_1)
            r.add_incoming(r_next, row_end)
            builder.cbranch(builder.icmp_signed("<", r_next, n), row_loop, done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return types.void(*[types.int64] * 9), codegen

    return rows_times_tokens


# Four tokens a pass at most: with eight, their 16 sums, the row's words and x did not fit AVX-512's 32 registers,
# and a pass was slower than two of four (0.94x against 1.9x the row-by-row products, 8 tokens of 5120 x 2048).
_ROWS_TIMES_TOKENS = {packed: {tokens: _rows_times_tokens_intrinsic(tokens, packed) for tokens in (4, 2, 1)}
                      for packed in (False, True)}


def _rows_times_tokens(tokens, w_at, w_stride, n, xe_at, xo_at, x_stride, vectors, out_at, out_stride, xe):
    """The intrinsic of _rows_times_tokens_intrinsic for 4, 2 or 1 ``tokens``, packed where xe holds bf16 words."""


@overload(_rows_times_tokens, jit_options=JIT_OPTIONS)
def _rows_times_tokens_impl(tokens, w_at, w_stride, n, xe_at, xo_at, x_stride, vectors, out_at, out_stride, xe):
    four, two, one = _ROWS_TIMES_TOKENS[xe.dtype == types.uint32].values()

    def call(tokens, w_at, w_stride, n, xe_at, xo_at, x_stride, vectors, out_at, out_stride, xe):
        if tokens == 4:
            four(w_at, w_stride, n, xe_at, xo_at, x_stride, vectors, out_at, out_stride)
        elif tokens == 2:
            two(w_at, w_stride, n, xe_at, xo_at, x_stride, vectors, out_at, out_stride)
        else:
            one(w_at, w_stride, n, xe_at, xo_at, x_stride, vectors, out_at, out_stride)
    return call


@intrinsic
def _row_address(typingctx, matrix, r):
    """The address of row r of a 2-D array, as an int64 (for the intrinsics that take addresses)."""
    if not (isinstance(matrix, types.Array) and matrix.ndim == 2):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        zero = ir.Constant(ir.IntType(64), 0)
        at = cgutils.get_item_pointer(context, builder, signature.args[0], array, [args[1], zero])
        return builder.ptrtoint(at, ir.IntType(64))

    return types.int64(matrix, types.intp), codegen


def bf16_supported() -> bool:
    """Whether this CPU has AVX512-BF16 (vdpbf16ps), which precision "bf16" decoding needs."""
    from llvmlite import binding
    return bool(binding.get_host_cpu_features().get("avx512bf16", False))


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


@njit(**FLAGS, inline="always")
def _dot2(w, r, v, s, xe, xo, t) -> tuple[np.float32, np.float32]:
    """Row r of w and row s of v times token t of x, in one pass: each load of x serves both rows, and the loop
    overheads and final horizontal sums of the two overlap. Measured ~15 % faster than two _dot calls on rows of
    64-256 words (a small model's) when it was written, but ~25 % slower on large matrices streamed from DRAM, so
    only ``moe_block`` and the whole-step decoder's short rows (PAIR_WORDS) use it. (In session 23, alone on cached
    rows of 128-256 words, _dot was the faster, and in the bundled model's step the two were within the noise:
    docs/benchmarks.md.)"""
    a = b = np.float32(0.0)
    for j in range(xe.shape[1]):
        e, o = xe[t, j], xo[t, j]
        a += e * _lo(w, r, j) + o * _hi(w, r, j)
        b += e * _lo(v, s, j) + o * _hi(v, s, j)
    return a, b


@njit(**FLAGS, inline="always")
def _dot_bf16(w, r, words, t) -> np.float32:
    """Row r of bf16 weights w times token t of x given as packed bf16 ``words`` (precision bf16): vdpbf16ps over
    whole groups of GROUP_WORDS, the rest of the row by the scalar loop."""
    n = words.shape[1]
    groups = n // GROUP_WORDS
    acc = _dpbf16_row(_row_address(w, r), _row_address(words, t), groups)
    for j in range(groups * GROUP_WORDS, n):
        acc += _lo(words, t, j) * _lo(w, r, j) + _hi(words, t, j) * _hi(w, r, j)
    return acc


def _dot_any(w, r, xe, xo, t):
    """Row r of w times token t of x: _dot where x is float32 even/odd (xe, xo), _dot_bf16 where xe holds packed
    bf16 words (precision bf16; xo unused). Chosen by xe's dtype when compiled, so each kernel that calls it is
    compiled once per kind."""


@overload(_dot_any, jit_options=JIT_OPTIONS)
def _dot_any_impl(w, r, xe, xo, t):
    if xe.dtype == types.uint32:
        return lambda w, r, xe, xo, t: _dot_bf16(w, r, xe, t)
    return lambda w, r, xe, xo, t: _dot(w, r, xe, xo, t)


def _store_pair(xe, xo, t, j, a, b):
    """Elements 2j and 2j + 1 of token t of an activation: into xe and xo, or (xe of uint32 words) rounded to bf16
    (to nearest, ties to even) and packed into word j, the even element in the low half as in the weights."""


@njit(**FLAGS, inline="always")
def _rounded_to_bf16(v):
    """The float32 v rounded to bf16 (to nearest, ties to even), as the upper 16 bits of a uint32."""
    u = _bits(np.float32(v))
    return np.uint32((u + np.uint32(0x7FFF) + ((u >> SHIFT) & np.uint32(1))) & HIGH)


@overload(_store_pair, inline="always")
def _store_pair_impl(xe, xo, t, j, a, b):
    if xe.dtype == types.uint32:
        def pack(xe, xo, t, j, a, b):
            xe[t, j] = np.uint32(_rounded_to_bf16(a) >> SHIFT) | _rounded_to_bf16(b)
        return pack

    def store(xe, xo, t, j, a, b):
        xe[t, j], xo[t, j] = a, b
    return store


@njit(**FLAGS, inline="always")
def _silu(g) -> np.float32:
    return g / (np.float32(1.0) + np.exp(-g))


# ---- projections -----------------------------------------------------------------------------------------------


@njit(**FLAGS)
def split_even_odd(x, norm_weight, eps, normalize):
    """(T, K) -> even (T, K/2), odd (T, K/2); with ``normalize``, RMSNorm(x) * norm_weight is split instead."""
    return split_like(x, norm_weight, eps, normalize, FLOAT32)


@njit(**FLAGS)
def split_like(x, norm_weight, eps, normalize, like):
    """split_even_odd, or where ``like`` is uint32 (precision bf16) x packed as bf16 words into the first array
    (the second then unused): the input of kernels that multiply with _dot_any."""
    T, K = x.shape
    xe = np.empty((T, K // 2), like.dtype)
    xo = np.empty((T, K // 2), np.float32)
    split_into(x, norm_weight, eps, normalize, xe, xo)
    return xe, xo


def _router_input(x, norm_weight, eps, xe, xo, re, ro):
    """The router's input, RMSNorm(x) split even/odd in float32: xe, xo themselves where they are float32, else
    (packed bf16) written into re, ro."""


@overload(_router_input, inline="always")
def _router_input_impl(x, norm_weight, eps, xe, xo, re, ro):
    if xe.dtype == types.uint32:
        def split(x, norm_weight, eps, xe, xo, re, ro):
            split_into(x, norm_weight, eps, True, re, ro)
            return re, ro
        return split
    return lambda x, norm_weight, eps, xe, xo, re, ro: (xe, xo)


@njit(**FLAGS)
def split_scaled_into(h, scale, he, ho):
    """Row k of h times scale[k], split into he, ho as split_into does (a pick's h times its routing weight)."""
    for k in range(h.shape[0]):
        for j in range(h.shape[1] // 2):
            _store_pair(he, ho, k, j, h[k, 2 * j] * scale[k], h[k, 2 * j + 1] * scale[k])


@njit(**FLAGS)
def split_into(x, norm_weight, eps, normalize, xe, xo):
    """split_even_odd into the caller's xe, xo (rows T and beyond left as they are)."""
    T, K = x.shape
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
            _store_pair(xe, xo, t, j, a, b)


ROW_BLOCK = 16  # rows of a projection a thread takes at a time: a chunk of each is read from memory at once


def _add_products(w, r0, r1, xe, xo, out):
    """out[t, r] += row r of w times token t of x, for rows r0..r1-1 and every token t of x."""


@njit(**FLAGS, inline="always")
def _add_products_by_row(w, r0, r1, xe, xo, out):
    """_add_products one row and one token at a time (_dot_any)."""
    for r in range(r0, r1):
        for t in range(xe.shape[0]):
            out[t, r] += _dot_any(w, r, xe, xo, t)


@overload(_add_products, jit_options=JIT_OPTIONS)
def _add_products_impl(w, r0, r1, xe, xo, out):
    if w.dtype != types.uint32:  # float32 weights
        def by_row(w, r0, r1, xe, xo, out):
            _add_products_by_row(w, r0, r1, xe, xo, out)
        return by_row

    def by_tokens_where_they_fit(w, r0, r1, xe, xo, out):
        if xe.shape[0] == 1 or w.shape[1] % 16 or w.strides[1] != 4 or xe.strides[1] != 4 or out.strides[1] != 4:
            _add_products_by_row(w, r0, r1, xe, xo, out)  # one token: bound by memory, and _dot streams a row best
        else:
            _add_token_products(w, r0, r1, xe, xo, out)
    return by_tokens_where_they_fit


@njit(**FLAGS)
def _add_token_products(w, r0, r1, xe, xo, out):
    """_add_products for bf16 weights and several tokens: a chunk of CHUNK_WORDS words of every row at a time, each
    pass over it taking up to four tokens (_rows_times_tokens_intrinsic; packed bf16 x at precision bf16).

    Why: with a few tokens a projection is bound by arithmetic. Through _dot, row by row and token by token, a
    Qwen3-30B-A3B q|k|v projection (5120 x 2048) ran at ~14 GB/s of weights for 8 tokens on this project's
    two-core machine, and at 24-30 GB/s so (docs/benchmarks.md). The chunks keep the tokens' x in the L1 cache:
    8 tokens' whole rows of x, 64 KB, do not fit its 48 KB.
    """
    T, n, rows = xe.shape[0], w.shape[1], r1 - r0
    for c in range(0, n, CHUNK_WORDS):
        vectors = min(CHUNK_WORDS, n - c) // 16
        w_at = _row_address(w, r0) + 4 * c
        t = 0
        while t < T:
            tokens = 4 if T - t >= 4 else (2 if T - t >= 2 else 1)
            _rows_times_tokens(tokens, w_at, w.strides[0], rows, _row_address(xe, t) + 4 * c,
                               _row_address(xo, t) + 4 * c, xe.strides[0], vectors, _row_address(out, t) + 4 * r0,
                               out.strides[0], xe)
            t += tokens


@njit(**FLAGS, parallel=True)
def norm_project(x, norm_weight, eps, w, like):
    """RMSNorm(x) * norm_weight @ W.T, (T, K) -> (T, N): a projection that follows a norm (q|k|v, lm_head).
    ``like``: FLOAT32, or PACKED to take the input as bf16 (precision bf16, bf16 weights)."""
    xe, xo = split_like(x, norm_weight, eps, True, like)
    out = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for b in prange((w.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        _add_products(w, b * ROW_BLOCK, min((b + 1) * ROW_BLOCK, w.shape[0]), xe, xo, out)
    return out


@njit(**FLAGS, parallel=True)
def project_residual(h, w, residual, like):
    """residual + h @ W.T, (T, K) -> (T, N): a projection that ends a block (o_proj, a dense MLP's down)."""
    he, ho = split_like(h, h[0], 0.0, False, like)
    out = residual.copy()
    for b in prange((w.shape[0] + ROW_BLOCK - 1) // ROW_BLOCK):
        _add_products(w, b * ROW_BLOCK, min((b + 1) * ROW_BLOCK, w.shape[0]), he, ho, out)
    return out


@njit(**FLAGS)
def embed_rows(table, token_ids, hidden):
    """Rows of the embedding table (V, H/2 words) as float32: (T,) -> (T, H)."""
    out = np.empty((token_ids.shape[0], hidden), np.float32)
    for t in range(token_ids.shape[0]):
        for j in range(hidden // 2):
            out[t, 2 * j], out[t, 2 * j + 1] = _lo(table, token_ids[t], j), _hi(table, token_ids[t], j)
    return out


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
def _norm_rope(src, weight, eps, cos, sin, dst):
    """One head: RMSNorm(src) * weight, rotated by RoPE (NeoX rotate_half) with this position's cos/sin (D,)."""
    D = src.shape[0]
    half = D // 2
    ss = np.float32(0.0)
    for d in range(D):
        ss += src[d] * src[d]
    scale = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
    for d in range(half):
        a = src[d] * scale * weight[d]
        b = src[d + half] * scale * weight[d + half]
        dst[d] = a * cos[d] - b * sin[d]
        dst[d + half] = b * cos[d + half] + a * sin[d + half]


@njit(**FLAGS)
def qk_norm_rope_cache(qkv, q_norm, k_norm, cos, sin, eps, n_heads, n_kv_heads, k_cache, v_cache, pos):
    """Split one request's fused q|k|v rows, RMSNorm q and k per head, rotate them, write k and v to the cache.

    qkv (n, (Hq + 2 Hkv) D) -> q (n, Hq, D), returned; k/v go to cache rows pos..pos+n-1 (NeoX rotate_half RoPE).
    """
    n = qkv.shape[0]
    D = q_norm.shape[0]
    q = np.empty((n, n_heads, D), np.float32)
    for t in range(n):
        for h in range(n_heads + 2 * n_kv_heads):
            src = qkv[t, h * D:(h + 1) * D]
            if h >= n_heads + n_kv_heads:  # v: copied as it is
                v_cache[pos + t, h - n_heads - n_kv_heads, :] = src
            elif h >= n_heads:
                _norm_rope(src, k_norm, eps, cos[t], sin[t], k_cache[pos + t, h - n_heads])
            else:
                _norm_rope(src, q_norm, eps, cos[t], sin[t], q[t, h])
    return q


@njit(**FLAGS, inline="always")
def _exp(x) -> np.float32:
    """exp(x) for float32 x <= 0, as a polynomial that LLVM vectorises (np.exp is a call per element): 2^n * e^r with
    r = x - n ln2 in [-ln2/2, ln2/2] (Cephes' expf); within 3e-7 relative of the exact value, as np.exp is within
    2e-7. Below -87 it returns exp(-87) ~ 1.6e-38 rather than a denormal; NaN stays NaN."""
    x = np.float32(-87.0) if x < np.float32(-87.0) else x
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _as_float32(np.int32(n + np.float32(127.0)) << 23)


@njit(**FLAGS)
def _attend_kv_head(q, t, g, k_cache, v_cache, L, probs, acc, out):
    """Query t's heads of kv head g attend over cache rows 0..L-1: q (n, Hq, D) -> out (Hq D,) at those heads.

    Query heads in pairs, each key and value row read once for both (the last head twice if the group is odd): at
    decode the per-row costs of these short (D) dot products outweigh their arithmetic. probs (2, >= L) and
    acc (2, D) are the caller's scratch. (Rows are taken as views once per key, not indexed per element: that
    lets LLVM drop its per-key checks that the arrays might overlap.)
    """
    _, n_heads, D = q.shape
    group = n_heads // k_cache.shape[1]
    scale = np.float32(D ** -0.5)
    p0, p1, a0, a1 = probs[0], probs[1], acc[0], acc[1]
    for first in range(g * group, (g + 1) * group, 2):
        second = min(first + 1, (g + 1) * group - 1)
        q0, q1 = q[t, first], q[t, second]
        for j in range(L):
            key = k_cache[j, g]
            s0 = s1 = np.float32(0.0)
            for d in range(D):
                s0 += q0[d] * key[d]
                s1 += q1[d] * key[d]
            p0[j], p1[j] = s0 * scale, s1 * scale
        for p in (p0, p1):  # softmax over the L visible keys
            best = p[:L].max()
            total = np.float32(0.0)
            for j in range(L):
                p[j] = _exp(p[j] - best)
                total += p[j]
            for j in range(L):
                p[j] /= total
        a0[:] = 0.0
        a1[:] = 0.0
        for j in range(L):
            value, w0, w1 = v_cache[j, g], p0[j], p1[j]
            for d in range(D):
                a0[d] += w0 * value[d]
                a1[d] += w1 * value[d]
        out[first * D:(first + 1) * D] = a0
        out[second * D:(second + 1) * D] = a1


@njit(**FLAGS, parallel=True)
def attend_segment(qkv, cos, sin, q_norm, k_norm, eps, n_heads, start, stop, k_cache, v_cache, pos, out):
    """One request's attention: its rows start:stop of the step's fused q|k|v, into the same rows of ``out``.

    q/k-norm + RoPE + cache write (``qk_norm_rope_cache``), then causal grouped-query attention of its n queries
    (positions pos..pos+n-1) over the cache; qkv (T, (Hq + 2 Hkv) D), cos/sin (T, D), out (T, Hq D). One call per
    request rather than two plus the reshaping between them: at decode size each call costs about what its work
    does. One thread per kv head: it reads that head's keys and values once for all its query heads and queries.
    """
    n_kv_heads = k_cache.shape[1]
    q = qk_norm_rope_cache(qkv[start:stop], q_norm, k_norm, cos[start:stop], sin[start:stop], eps, n_heads,
                           n_kv_heads, k_cache, v_cache, pos)  # (n, Hq, D)
    n, _, D = q.shape
    for g in prange(n_kv_heads):
        probs = np.empty((2, pos + n), np.float32)  # a pair of query heads' attention over the keys
        acc = np.empty((2, D), np.float32)  # and their outputs
        for t in range(n):
            _attend_kv_head(q, t, g, k_cache, v_cache, pos + t + 1, probs, acc, out[start + t])


# ---- router and experts --------------------------------------------------------------------------------------


@njit(**FLAGS)
def route(xe, xo, gate, top_k, norm_topk_prob, disabled):
    """Router GEMV + softmax over all experts + top-k (ties to the lower expert id) + optional renormalisation.

    ``disabled`` (E,) masks experts out before the softmax (a what-if of the routing explorer; all False normally).
    Returns probs (T, E), experts (T, K) most probable first, weights (T, K).
    """
    T, E = xe.shape[0], gate.shape[0]
    probs = np.empty((T, E), np.float32)
    for t in range(T):
        for e in range(E):
            probs[t, e] = -np.inf if disabled[e] else _dot(gate, e, xe, xo, t)
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
def expert_list(gate, up, down):
    """A typed List of experts' (gate, up, down) matrices, holding this first expert; add_expert appends the rest.

    Built by compiled code, which the on-disk cache keeps: numba.typed.List's own methods, called from Python,
    compile themselves anew in every process (~0.3 s of start-up).
    """
    experts = List()
    experts.append((gate, up, down))
    return experts


@njit(**FLAGS)
def add_expert(experts, gate, up, down):
    experts.append((gate, up, down))


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
def experts_gate_up(xe, xo, experts, active, order, starts, top_k):
    """SiLU(gate(x)) * up(x) for every pick of every active expert: (picks, I), rows in ``order``. x as
    split_like gives it: float32 even/odd, or packed bf16 in xe.

    ``experts`` lists each expert's (gate (I, H/2), up (I, H/2), down (H, I/2)), straight from the checkpoint's
    memory map. Work is split over (expert, block of rows) items so that even one token's 8 experts keep every
    thread busy; each row is read once for all the expert's tokens.
    """
    inter = experts[0][0].shape[0]
    blocks = (inter + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    h = np.empty((order.shape[0], inter), np.float32)
    tokens = order // top_k  # (picks,) the token of each pick, divided once rather than once per row
    for item in prange(active.shape[0] * blocks):
        e = active[item // blocks]
        gate, up = experts[e][0], experts[e][1]
        first = (item % blocks) * ROWS_PER_ITEM
        for r in range(first, min(first + ROWS_PER_ITEM, inter)):
            for a in range(starts[e], starts[e + 1]):
                t = tokens[a]
                h[a, r] = _silu(_dot_any(gate, r, xe, xo, t)) * _dot_any(up, r, xe, xo, t)
    return h


@njit(**FLAGS, parallel=True)
def experts_down(h, experts, active, order, starts, weights, top_k, out, like):
    """out[t] += weight * down_e(h) for every pick: the routing-weighted sum, added into the residual ``out``;
    h taken as ``like`` says (FLOAT32, or PACKED: rounded to bf16).

    Two passes. First every (expert, block of rows) item -- the split of experts_gate_up -- writes down_e(h) for
    the expert's picks into y. Then one thread per output column adds the weighted picks of each token into
    ``out`` (in ascending expert order, as the reference sums them).
    """
    H = experts[0][2].shape[0]
    he, ho = split_like(h, h[0], 0.0, False, like)
    blocks = (H + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
    y = np.empty((order.shape[0], H), np.float32)  # (picks, H), rows in ``order``
    for item in prange(active.shape[0] * blocks):
        e = active[item // blocks]
        down = experts[e][2]
        first = (item % blocks) * ROWS_PER_ITEM
        for r in range(first, min(first + ROWS_PER_ITEM, H)):
            for a in range(starts[e], starts[e + 1]):
                y[a, r] = _dot_any(down, r, he, ho, a)
    tokens = order // top_k  # (picks,) the token of each pick, divided once rather than once per column
    pick_weights = weights.ravel()[order]  # (picks,)
    for r in prange(H):
        for e in active:
            for a in range(starts[e], starts[e + 1]):
                out[tokens[a], r] += pick_weights[a] * y[a, r]


@njit(**FLAGS, parallel=True)
def dense_gate_up(x, norm_weight, eps, gate_up, like):
    """SiLU(gate(x)) * up(x) of a dense MLP, x normalised first (and taken as ``like`` says); gate_up (2I, H/2)
    stacks the gate rows then the up rows. (T, H) -> (T, I)."""
    xe, xo = split_like(x, norm_weight, eps, True, like)
    T, inter = x.shape[0], gate_up.shape[0] // 2
    h = np.empty((T, inter), np.float32)
    for r in prange(inter):
        for t in range(T):
            h[t, r] = _silu(_dot_any(gate_up, r, xe, xo, t)) * _dot_any(gate_up, inter + r, xe, xo, t)
    return h


# ---- serial twins ----------------------------------------------------------------------------------------------


def _serial_twin(kernel):
    """The same Python function compiled without threads, under its own name (so its cache files are its own)."""
    fn = kernel.py_func
    twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    return njit(**FLAGS)(twin)


# The kernels built without threads. Starting a parallel region costs microseconds when the worker threads are
# spinning and tens of microseconds when they have gone to sleep, more than a small model's whole projection
# takes; the backend runs these when a call touches little memory (see PARALLEL_MIN_BYTES).
SERIAL = {kernel: _serial_twin(kernel) for kernel in (norm_project, project_residual, attend_segment, dense_gate_up,
                                                      experts_gate_up, experts_down)}


# ---- a whole MoE block in one call ------------------------------------------------------------------------------


@njit(**FLAGS)
def moe_block(x, norm_weight, eps, router, experts, top_k, norm_topk_prob, disabled):
    """x + MoE(RMSNorm(x)) in one call, on one thread: for steps whose MoE block touches little memory.

    The bundled model's MoE block reads 0.4 MB at decode. As the threaded path's six calls from Python (norm,
    router, grouping, gate/up, down, and the index arithmetic between them) it took ~25 us on one thread; composed
    of the same kernels in one call, ~20 us, for their split into (expert, block of rows) work items and their
    intermediate buffers cost more than the reading. Here each pick is computed straight through instead, gate/up +
    SiLU into h, then the down projection, weighted, into its token's row of the residual (experts in ascending
    order, as the reference sums them): ~13 us. Returns out (T, H) and the routing: probs (T, E), experts (T, K),
    weights (T, K).
    """
    xe, xo = split_even_odd(x, norm_weight, eps, True)
    probs, chosen, weights = route(xe, xo, router, top_k, norm_topk_prob, disabled)
    order, starts = group_by_expert(chosen, router.shape[0])
    out = x.copy()  # the residual
    half = experts[0][0].shape[0] // 2
    he, ho = np.empty((1, half), np.float32), np.empty((1, half), np.float32)  # one pick's h, split (I/2,) x 2
    for e in range(router.shape[0]):
        for a in range(starts[e], starts[e + 1]):
            gate, up, down = experts[e]
            t, k = order[a] // top_k, order[a] % top_k  # the pick's token and slot
            for j in range(half):
                g, u = _dot2(gate, 2 * j, up, 2 * j, xe, xo, t)
                he[0, j] = _silu(g) * u
                g, u = _dot2(gate, 2 * j + 1, up, 2 * j + 1, xe, xo, t)
                ho[0, j] = _silu(g) * u
            for r in range(0, out.shape[1], 2):  # H is even
                y0, y1 = _dot2(down, r, down, r + 1, he, ho, 0)
                out[t, r] += weights[t, k] * y0
                out[t, r + 1] += weights[t, k] * y1
    return out, probs, chosen, weights


# ---- batch-1 greedy decoding: a whole step in one call ----------------------------------------------------------
#
# A step of a small model is ~20 projections of a few hundred kilobytes each. As separate calls from Python each one
# pays for the call, and as separate parallel regions each one pays for starting the threads (~3 us); together that
# is more than the arithmetic. ``decode_step`` does the whole step in one call and one parallel region: every
# thread runs the same sequence of phases (the q|k|v projection of layer 0, its attention, its o_proj, ...), the
# work of a phase is cut into items that threads claim with atomic counters (``_next_item``), and a thread moves on
# to the next phase once every item of this one is done. Nothing waits for a particular thread, so a step completes whatever the
# scheduling: a thread that starts late finds the early phases done and catches up, and one thread alone does it all.

LINE = 8  # int64 counters per cache line: each thread's claim counter of a phase has a line of its own
PAIR_WORDS = 256  # rows of at most this many words go in pairs (_dot2): faster for rows in cache, slower from DRAM
ITEM_BYTES = 1 << 15  # weight bytes of one work item: small enough to even out the threads at the end of a
#                      phase, large enough that claiming it (one atomic increment) is free in comparison


@intrinsic
def _atomic_increment(typingctx, counters, i):
    """counters[i] += 1 as one atomic instruction (x86: ``lock xadd``); returns the value it had before, so two
    threads incrementing at once get different answers. ``counters`` is an int64 array."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        address = cgutils.get_item_pointer(context, builder, signature.args[0], array, [args[1]])
        return builder.atomic_rmw("add", address, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return types.int64(counters, types.intp), codegen


@intrinsic
def _atomic_read(typingctx, counters, i):
    """counters[i], read so that what another thread wrote before its atomic increment is visible afterwards."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        address = cgutils.get_item_pointer(context, builder, signature.args[0], array, [args[1]])
        return builder.load_atomic(address, "acquire", 8)

    return types.int64(counters, types.intp), codegen


@njit(**FLAGS)
def _next_item(sync, phase, me, n_items):
    """Claim a work item of ``phase`` for thread ``me``: the next one of its own share (items me * n / threads up to
    the next thread's), else the next one of another thread's share; ``n_items`` when all are taken.

    Each thread has its share of every phase: the same weight rows step after step, which stay in its core's
    caches; another thread takes them only when it has finished its own share first.
    """
    threads = sync.shape[1] // LINE - 1
    for k in range(threads):
        owner = (me + k) % threads
        item = owner * n_items // threads + _atomic_increment(sync[phase], LINE * owner)
        if item < (owner + 1) * n_items // threads:
            return item
    return n_items


@njit(**FLAGS)
def _item_done(sync, phase):
    _atomic_increment(sync[phase], sync.shape[1] - LINE)


@njit(**FLAGS)
def _wait_phase(sync, phase, n_items):
    """Spin until all ``n_items`` items of ``phase`` are done (each is held by a thread that is computing it).

    A phase normally ends within a microsecond of this thread's last item. When another process holds a core, the
    thread being waited for may be off the CPU for a time slice instead; GreedyDecoder then runs on one thread.
    """
    while _atomic_read(sync[phase], sync.shape[1] - LINE) < n_items:
        pass


@njit(**FLAGS)
def _rows_per_item(w):
    """Rows of ``w`` per work item: ITEM_BYTES of it, an even number, at least 2."""
    return max(2, ITEM_BYTES // (4 * w.shape[1]) // 2 * 2)


# The decoder's products take x split even/odd in float32, or packed bf16 (precision bf16): these two functions are
# compiled once per kind, chosen by the dtype of xe (uint32: packed bf16, xo unused).
def _dot_rows(w, r0, r1, xe, xo, t, out, add):
    """out[r] = (or, with ``add``, +=) row r of w times token t of x, for rows r0..r1-1. Short rows (a small model's)
    go in pairs through _dot2, which shares each load of x between two rows."""


def _gate_up_rows(gate, gate_row, up, up_row, r0, r1, xe, xo, h):
    """h[r] = SiLU(row gate_row + r of gate . x) * (row up_row + r of up . x) for r in r0..r1-1 (x: token 0)."""


@overload(_dot_rows, jit_options=JIT_OPTIONS)
def _dot_rows_impl(w, r0, r1, xe, xo, t, out, add):
    if xe.dtype == types.uint32:
        def rows_bf16(w, r0, r1, xe, xo, t, out, add):
            for r in range(r0, r1):
                y = _dot_bf16(w, r, xe, t)
                out[r] = out[r] + y if add else y
        return rows_bf16

    def rows(w, r0, r1, xe, xo, t, out, add):
        r = r0
        if w.shape[1] <= PAIR_WORDS:
            while r + 1 < r1:
                a, b = _dot2(w, r, w, r + 1, xe, xo, t)
                out[r], out[r + 1] = out[r] + a if add else a, out[r + 1] + b if add else b
                r += 2
        while r < r1:
            y = _dot(w, r, xe, xo, t)
            out[r] = out[r] + y if add else y
            r += 1
    return rows


@overload(_gate_up_rows, jit_options=JIT_OPTIONS)
def _gate_up_rows_impl(gate, gate_row, up, up_row, r0, r1, xe, xo, h):
    if xe.dtype == types.uint32:
        def rows_bf16(gate, gate_row, up, up_row, r0, r1, xe, xo, h):
            for r in range(r0, r1):
                h[r] = _silu(_dot_bf16(gate, gate_row + r, xe, 0)) * _dot_bf16(up, up_row + r, xe, 0)
        return rows_bf16

    def rows(gate, gate_row, up, up_row, r0, r1, xe, xo, h):
        for r in range(r0, r1):
            g, u = _dot2(gate, gate_row + r, up, up_row + r, xe, xo, 0)
            h[r] = _silu(g) * u
    return rows


@njit(**FLAGS)
def _project_phase(sync, phase, me, w, xe, xo, out, add):
    """out[r] = (or, with ``add``, +=) row r of w times x for every row of w; returns the next phase."""
    rows = _rows_per_item(w)
    n_items = (w.shape[0] + rows - 1) // rows
    item = _next_item(sync, phase, me, n_items)
    while item < n_items:
        _dot_rows(w, item * rows, min((item + 1) * rows, w.shape[0]), xe, xo, 0, out, add)
        _item_done(sync, phase)
        item = _next_item(sync, phase, me, n_items)
    _wait_phase(sync, phase, n_items)
    return phase + 1


# The weight matrices a step reads come as one table of (address, rows, columns), an int64 row per matrix, all of one
# dtype (that of ``like``, the embedding table). Passing six typed Lists of matrices instead cost ~6 us per call,
# most of a small model's step budget; an array costs ~0.1 us. Rows 4i..4i+3: layer i's q|k|v, o_proj, and a dense
# layer's gate|up and down (placeholders in an MoE layer); then MoE layer m's router at 4L + m; then expert e of MoE
# layer m: gate, up, down at 4L + M + 3(m E + e) + 0, 1, 2 (M MoE layers of E experts).
QKV, O_PROJ, GATE_UP, DOWN = 0, 1, 2, 3


@intrinsic
def _pointer(typingctx, address, like):
    """The int64 ``address`` as a pointer to elements of the array ``like``'s dtype."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(like.dtype)(types.int64, like), codegen


@njit(**FLAGS, inline="always")
def _matrix(table, k, like):
    """Matrix k of the table as an array: no copy and no reference count (the caller keeps the memory alive)."""
    return carray(_pointer(table[k, 0], like), (table[k, 1], table[k, 2]))


@njit(**FLAGS)
def _expert(table, like, n_layers, n_moe, num_experts, m, e, part):
    """Part 0 (gate), 1 (up) or 2 (down) of expert e of MoE layer m."""
    return _matrix(table, 4 * n_layers + n_moe + 3 * (m * num_experts + e) + part, like)


@njit(**FLAGS)
def _decode_buffers(n_threads, token, embed, lm_head, table, moe_slot, hidden, n_heads, head_dim, top_k,
                    num_experts):
    """The arrays the threads of a step share: the embedded token's hidden state x and every intermediate result."""
    x = np.empty((1, hidden), np.float32)
    for j in range(hidden // 2):
        x[0, 2 * j], x[0, 2 * j + 1] = _lo(embed, token, j), _hi(embed, token, j)
    n_layers, n_moe, dense_inter, moe_inter = moe_slot.shape[0], 0, 1, 1
    for i in range(n_layers):
        if moe_slot[i] < 0:
            dense_inter = max(dense_inter, table[4 * i + GATE_UP, 1] // 2)
        else:
            n_moe += 1
    if n_moe:
        moe_inter = table[4 * n_layers + n_moe, 1]  # rows of the first expert's gate
    n_lm_items = (lm_head.shape[0] + _rows_per_item(lm_head) - 1) // _rows_per_item(lm_head)
    sync = np.zeros((6 * n_layers + 1, LINE * (n_threads + 1)), np.int64)  # per phase (<= 6 a layer): claim
    # counters of each thread's share, then the count of items done, each on a cache line of its own
    return (x, sync,
            np.empty((1, table[QKV, 1]), np.float32), np.empty((1, n_heads * head_dim), np.float32),  # qkv, attn
            np.empty((1, dense_inter), np.float32), np.empty((top_k, moe_inter), np.float32),  # h: dense, experts
            np.empty((max(n_moe, 1), top_k), np.int64), np.empty((max(n_moe, 1), top_k), np.float32),  # routing
            np.empty((max(n_moe, 1), num_experts), np.float32),
            np.empty(n_lm_items, np.float32), np.empty(n_lm_items, np.int64), np.empty(n_lm_items, np.bool_))


@njit(**FLAGS)
def _decode_worker(me, pos, embed, lm_head, table, layer_norms, qk_norms, moe_slot, final_norm, k_cache, v_cache,
                   cos, sin, eps, n_heads, top_k, norm_topk_prob, no_disabled, logits, shared, like):
    """Thread ``me``'s part of a decode step: every phase, in order, doing the items of it that it claims.

    Per layer: q|k|v rows; attention, one item per kv head (q/k-norm, RoPE, cache write, attention over positions
    0..pos); o_proj rows, added into x; then the dense MLP (gate|up rows, down rows added into x) or the MoE block
    (the chosen experts' gate|up rows; down rows summing the experts in ascending id order, as the reference does,
    added into x). Finally the lm_head rows, each item also finding the largest logit of its rows.

    Inputs a phase reads whole (a norm of x, the attention output split into even/odd, the router's choice) each
    thread prepares for itself after the phase before has ended, and x is not written again before the phase that
    uses them has ended. So a thread that prepares them late, when others have already finished the phase, may hold
    a stale copy -- but then it finds no item left to claim, and the copy is never used.
    The products' inputs have ``like``'s dtype: float32 (split even/odd), or uint32 (packed bf16: precision bf16).
    """
    x, sync, qkv_out, attn, h_dense, h_moe, chosen, pick_weights, router_probs, best_val, best_idx, bad = shared
    H, D = x.shape[1], qk_norms.shape[2]
    n_layers, n_kv = layer_norms.shape[0], k_cache.shape[2]
    group = n_heads // n_kv
    num_experts = router_probs.shape[1]
    n_moe = 0
    for i in range(n_layers):
        n_moe += moe_slot[i] >= 0
    xe, xo = np.empty((1, H // 2), like.dtype), np.empty((1, H // 2), np.float32)
    ae, ao = np.empty((1, attn.shape[1] // 2), like.dtype), np.empty((1, attn.shape[1] // 2), np.float32)
    re, ro = np.empty((1, H // 2), np.float32), np.empty((1, H // 2), np.float32)  # the router's, always float32
    q = np.empty((1, n_heads, D), np.float32)
    probs, acc = np.empty((2, pos + 1), np.float32), np.empty((2, D), np.float32)
    y = np.empty(H, np.float32)
    phase = 0
    for i in range(n_layers):
        split_into(x, layer_norms[i, 0], eps, True, xe, xo)
        phase = _project_phase(sync, phase, me, _matrix(table, 4 * i + QKV, embed), xe, xo, qkv_out[0], False)

        g = _next_item(sync, phase, me, n_kv)
        while g < n_kv:
            k_row, v_row = (n_heads + g) * D, (n_heads + n_kv + g) * D
            _norm_rope(qkv_out[0, k_row:k_row + D], qk_norms[i, 1], eps, cos[pos], sin[pos], k_cache[i, pos, g])
            v_cache[i, pos, g, :] = qkv_out[0, v_row:v_row + D]
            for head in range(g * group, (g + 1) * group):
                _norm_rope(qkv_out[0, head * D:(head + 1) * D], qk_norms[i, 0], eps, cos[pos], sin[pos], q[0, head])
            _attend_kv_head(q, 0, g, k_cache[i], v_cache[i], pos + 1, probs, acc, attn[0])
            _item_done(sync, phase)
            g = _next_item(sync, phase, me, n_kv)
        _wait_phase(sync, phase, n_kv)
        phase += 1

        split_into(attn, attn[0], 0.0, False, ae, ao)
        phase = _project_phase(sync, phase, me, _matrix(table, 4 * i + O_PROJ, embed), ae, ao, x[0], True)
        split_into(x, layer_norms[i, 1], eps, True, xe, xo)

        m = moe_slot[i]
        if m < 0:  # dense MLP
            w = _matrix(table, 4 * i + GATE_UP, embed)
            inter = w.shape[0] // 2
            rows = _rows_per_item(w) // 2
            n_items = (inter + rows - 1) // rows
            item = _next_item(sync, phase, me, n_items)
            while item < n_items:
                _gate_up_rows(w, 0, w, inter, item * rows, min((item + 1) * rows, inter), xe, xo, h_dense[0])
                _item_done(sync, phase)
                item = _next_item(sync, phase, me, n_items)
            _wait_phase(sync, phase, n_items)
            phase += 1
            he, ho = np.empty((1, inter // 2), like.dtype), np.empty((1, inter // 2), np.float32)
            split_into(h_dense[:, :inter], h_dense[0], 0.0, False, he, ho)
            phase = _project_phase(sync, phase, me, _matrix(table, 4 * i + DOWN, embed), he, ho, x[0], True)
            continue

        # The router, computed by every thread for itself (a few kilobytes of weights: cheaper than a phase of its
        # own). The gate|up items publish the routing they used; the down phase and the statistics read that.
        router = _matrix(table, 4 * n_layers + m, embed)
        router_e, router_o = _router_input(x, layer_norms[i, 1], eps, xe, xo, re, ro)
        probs_m, experts_m, weights_m = route(router_e, router_o, router, top_k, norm_topk_prob, no_disabled)
        inter = h_moe.shape[1]
        rows = max(1, _rows_per_item(_expert(table, embed, n_layers, n_moe, num_experts, m, 0, 0)) // 2)
        blocks = (inter + rows - 1) // rows
        item = _next_item(sync, phase, me, top_k * blocks)
        while item < top_k * blocks:  # gate|up rows of each pick
            k, block = item // blocks, item % blocks
            if block == 0:
                chosen[m, k], pick_weights[m, k] = experts_m[0, k], weights_m[0, k]
                if k == 0:
                    router_probs[m] = probs_m[0]
            gate_w = _expert(table, embed, n_layers, n_moe, num_experts, m, experts_m[0, k], 0)
            up_w = _expert(table, embed, n_layers, n_moe, num_experts, m, experts_m[0, k], 1)
            _gate_up_rows(gate_w, 0, up_w, 0, block * rows, min((block + 1) * rows, inter), xe, xo, h_moe[k])
            _item_done(sync, phase)
            item = _next_item(sync, phase, me, top_k * blocks)
        _wait_phase(sync, phase, top_k * blocks)
        phase += 1

        he, ho = np.empty((top_k, inter // 2), like.dtype), np.empty((top_k, inter // 2), np.float32)
        split_scaled_into(h_moe, pick_weights[m], he, ho)  # each pick's h times its routing weight
        by_id = np.argsort(chosen[m])  # the picks in ascending expert id, the order the reference sums them in
        rows = _rows_per_item(_expert(table, embed, n_layers, n_moe, num_experts, m, 0, 2))
        n_items = (H + rows - 1) // rows
        item = _next_item(sync, phase, me, n_items)
        while item < n_items:  # down rows: the weighted sum of the picks, added into x
            r0, r1 = item * rows, min((item + 1) * rows, H)
            y[r0:r1] = 0.0
            for k in by_id:
                down_w = _expert(table, embed, n_layers, n_moe, num_experts, m, chosen[m, k], 2)
                _dot_rows(down_w, r0, r1, he, ho, k, y, True)
            x[0, r0:r1] += y[r0:r1]
            _item_done(sync, phase)
            item = _next_item(sync, phase, me, n_items)
        _wait_phase(sync, phase, n_items)
        phase += 1

    split_into(x, final_norm, eps, True, xe, xo)
    rows = _rows_per_item(lm_head)
    item = _next_item(sync, phase, me, best_val.shape[0])
    while item < best_val.shape[0]:
        r0, r1 = item * rows, min((item + 1) * rows, lm_head.shape[0])
        _dot_rows(lm_head, r0, r1, xe, xo, 0, logits, False)
        best, non_finite = r0, False
        for r in range(r0, r1):
            non_finite |= np.isnan(logits[r]) or logits[r] == np.inf
            if logits[r] > logits[best]:  # strict: the lowest id among equals
                best = r
        best_val[item], best_idx[item], bad[item] = logits[best], best, non_finite
        _item_done(sync, phase)
        item = _next_item(sync, phase, me, best_val.shape[0])
    _wait_phase(sync, phase, best_val.shape[0])


@njit(**FLAGS)
def _decode_finish(shared, counts, prob_sum, entropy):
    """The step's token (the argmax over the lm_head items' bests; -1 for NaN/+Inf logits) and its router counts."""
    _, _, _, _, _, _, chosen, _, router_probs, best_val, best_idx, bad = shared
    for m in range(counts.shape[0]):
        for e in chosen[m]:
            counts[m, e] += 1
        for e in range(counts.shape[1]):
            p = np.float64(router_probs[m, e])
            prob_sum[m, e] += p
            entropy[m] -= p * np.log(max(p, 1e-30))
    best = 0
    for item in range(best_val.shape[0]):
        if bad[item]:
            return -1
        if best_val[item] > best_val[best]:
            best = item
    return best_idx[best]


@njit(**FLAGS, parallel=True)
def decode_step(token, pos, n_threads, embed, lm_head, table, layer_norms, qk_norms, moe_slot, final_norm, k_cache,
                v_cache, cos, sin, eps, n_heads, top_k, norm_topk_prob, no_disabled, logits, counts, prob_sum,
                entropy, like):
    """One greedy decode step of one sequence: ``token`` at position ``pos`` -> the next token (-1: NaN/+Inf logits).

    ``table`` lists the layers' weight matrices (see QKV above); ``moe_slot[i]`` is layer i's MoE index, -1 for a
    dense layer. ``layer_norms`` (L, 2, H) are the input and post-attention norms, ``qk_norms`` (L, 2, D); cos/sin
    (capacity, D) the RoPE table. The step writes the keys and values of ``pos`` into k_cache/v_cache (L, capacity,
    Hkv, D), the logits (V,) into ``logits``, and adds its routing to counts/prob_sum/entropy (per MoE layer).
    ``n_threads`` workers run ``_decode_worker``, side by side as far as Numba's threads allow (call it under
    numba.set_num_threads(1) for one thread without waking the others). ``like``: an empty array whose dtype the
    products' inputs take: float32, or uint32 for packed bf16 (precision bf16: bf16 weights and AVX512-BF16 only).
    """
    shared = _decode_buffers(n_threads, token, embed, lm_head, table, moe_slot, layer_norms.shape[2], n_heads,
                             qk_norms.shape[2], top_k, counts.shape[1])
    for me in prange(n_threads):
        _decode_worker(np.int64(me), pos, embed, lm_head, table, layer_norms, qk_norms, moe_slot, final_norm,
                       k_cache, v_cache, cos, sin, eps, n_heads, top_k, norm_topk_prob, no_disabled, logits, shared,
                       like)
    return _decode_finish(shared, counts, prob_sum, entropy)
