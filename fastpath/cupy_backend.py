"""The ``cupy`` backend: the reference's block operations (``qwen3moe/reference_backend.py``) as CUDA kernels on one
NVIDIA GPU, plus decoding captured as one CUDA graph per step (``BatchDecoder``, greedy or sampled, for any number
of sequences; ``GreedyDecoder`` for one greedy sequence).

``prepare`` uploads the weights once, in their checkpoint dtype: bf16 stays 16-bit (held as raw uint16 words, since
CuPy has no bfloat16 type, and widened in registers by the kernels); f32 stays f32; f16 is widened to f32 once.
Two layout changes, both plain copies made during the upload: q, k and v projections are stacked into one matrix
(one pass over the normalised input computes all three), and each layer's experts are stacked into one
(E, 2I, H) gate/up and one (E, H, I) down array (a dense MLP is the same with E = 1).

Every tensor of a step stays on the GPU. The kernels (``fastpath/cuda/*.cu``) are:
    linear                RMSNorm (fused) + projection, or projection + residual add        q/k/v, o_proj, lm_head
    linear_streamed       the same at one token, rows streamed by the copy engine (Hopper)   lm_head
    qk_norm_rope_cache    q/k RMSNorm, RoPE, K/V written into the sequence's cache
    attention             grouped-query attention, keys split across blocks and merged by the last (flash-decoding)
    attention_heads       the same at one token per sequence over short caches, a block per query head
    attention_group       the same at one token per sequence over long caches, a block per kv head, each key
                          scored for its query heads at once
    attention_mma         prefill attention on the tensor cores (attention_mma.cu)
    linear + route_topk   RMSNorm + router GEMV; softmax + top-k (+ renormalise) + the experts' normalised input
    route_gate_up         at one token (every expert held): route_topk's routing and expert_gate_up in one kernel
    group_by_expert       a counting sort of the (token, slot) picks by expert (not needed for a single token)
    expert_gate_up        SiLU(gate . x) * (up . x), only for the chosen experts, each expert's rows read once
    expert_down           down . act, scaled by the routing weight
    moe_combine           the weighted sum over a token's experts and the residual add, in a fixed order
    mma_few               small steps (see linear_path, expert_path): the projections and experts on the tensor
                          cores, weights as the 16-row operand and 8 tokens as the columns (mma_few.cu)
    mma_batch             the projections of a small decode batch (2-16 tokens): every token in each block, the
                          activations shared through shared memory, K split over blocks (mma_batch.cu)
    mma_tiles             larger steps (prefill, large matrices at batches over 16): tiles of 64 tokens x 256
                          outputs on the tensor cores (matmul.cu); where the tiles are few, K is split over blocks
                          and add_split_sums adds the splits up
    wgmma_tiles           the same products on Hopper's warpgroup instruction, tiles of 128 tokens fed by a
                          producer warpgroup and the copy engine, for steps of more than 64 tokens on an H100 / H200
                          (wgmma_tiles.cu, see tile_rows)
    argmax_partial + greedy_advance, or topk_candidates + sample_rows
                          a decoded row's next token, chosen on the device (sampling.cu)
    peer_all_reduce       on a rank of a split model, in its decode graph: the sum over the ranks of one machine,
                          moe_combine's sum before it and the next block's RMSNorm after (peer_all_reduce.cu)
Kernels captured into a graph are launched with programmatic dependent launch allowed (``cuda_build.Kernel``).
Kernel ladders that build up to the central ones step by step: ``python -m fastpath.ladder``.
"""

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np

import cupy as cp

try:
    devices = cp.cuda.runtime.getDeviceCount()
except Exception as e:  # no driver: CuPy imports but cannot run anything
    raise ImportError(f"no usable NVIDIA GPU ({type(e).__name__}: {e})") from None
if devices == 0:
    raise ImportError("no NVIDIA GPU is visible")

from qwen3moe.config import Qwen3MoeConfig
from qwen3moe.debug import NonFiniteError
from qwen3moe.errors import UnsupportedConfigError
from qwen3moe.layers import AttentionSegment, Routing
from qwen3moe.router_stats import RouterStats
from qwen3moe.sampling import is_greedy
from qwen3moe.sharding import RankShard
from qwen3moe.weights import Qwen3MoeWeights, SparseMoeBlock

from .cuda_build import MAXT, WG_TILE, kernel, tensor_map

xp = cp  # the array module of this backend's KV caches
BLOCK = 256  # threads per block of every kernel
NULL = np.uint64(0)  # a null pointer argument
KEYS_PER_SPLIT = 32  # attention: the fewest keys worth a block of their own
TARGET_BLOCKS = 264  # attention: keys split until there are this many blocks (132 SMs, twice over)
MAX_KEYS_PER_SPLIT = 256  # attention at decode: and until no block has more keys than this
MAX_ATTENTION_ROWS = 32  # attention: (query token, head) rows one block handles
ATTENTION_MMA_HEAD_DIMS = (64, 128)  # the head_dim values attention_mma.cu is compiled for
ATTENTION_MMA_MIN_TOKENS = 16  # a step with a segment this long (a prefill) runs attention on the tensor cores
# A decoding step over caches of at most this many positions leaves the q/k-norm, RoPE and cache write to the
# attention kernel (AttentionPlan.norm_rope_inside): one kernel fewer a layer. Over longer caches that gained
# nothing. H200, captured batch-1 step of Qwen3-30B-A3B shapes, ms a token, apart -> inside (docs/benchmarks.md):
# cache of 144 positions 3.438 -> 3.370, of 1136 3.602 -> 3.543, of 2160 3.714 -> 3.739, and of 2160 again once no
# kernel asked for memory before its wait (common.cuh) 3.609 -> 3.620.
NORM_ROPE_INSIDE_MAX_KEYS = 1536
# A step of one token per sequence whose caches hold at most this many positions in all (sequences x capacity) runs
# attention.cu's attention_heads (a block per query head, not per kv head: G times the blocks, each key's dot
# product over 8 lanes; and G times the reads of each key, from L2) where head_dim is one of these. H200, captured
# batch-1 step of Qwen3-30B-A3B shapes, ms a token, attention -> attention_heads (docs/benchmarks.md): 144 positions
# 3.29 -> 2.99, 1136 3.47 -> 3.25, 2160 3.64 -> 3.38, 4208 3.90 -> 3.88, 8304 4.23 -> 4.92.
QUERY_HEADS_MAX_KEYS = 3072
QUERY_HEADS_HEAD_DIMS = (64, 128)  # (attention_group's too)
# A step of one token per sequence whose caches each hold more positions than that runs attention.cu's
# attention_group (a block per (split, kv head, token), each key read once for the G query heads that share it) where
# G is one of these, with keys split until there are GROUP_TARGET_BLOCKS blocks (a block takes a multiprocessor's
# registers: 132 SMs once over). H200, Qwen3-30B-A3B shapes, captured steps, attention -> attention_group
# (docs/benchmarks.md): batch 1, ms a token, 3112 positions 3.56 -> 3.28, 4208 3.70 -> 3.38, 8304 4.02 -> 3.66;
# batch 8 over 4136 positions each 14.17 -> 13.97 ms a step. Over shorter caches in larger batches it was no faster
# (batch 8 over 1064 positions 11.55 -> 11.70 ms, batch 64 over 56 21.26 -> 21.33), and those stay on attention.
GROUP_SIZES = (4, 8, 16)
GROUP_TARGET_BLOCKS = 132
MMA_ATTENTION_TOKENS = 64  # query tokens per block of attention_mma.cu
GEMV_MAX_TOKENS = 16  # projections of fewer tokens that mma_batch.cu does not take run on linear.cu's GEMV
FEW_TOKENS = 64  # projections of up to this many tokens (that mma_batch.cu does not take) run on mma_few.cu ...
FEW_MAX_WEIGHTS = 1 << 23  # ... if the matrix is smaller than this; larger ones on matmul.cu's tiles, K split
BATCH_MIN_TOKENS, BATCH_MAX_TOKENS = 2, 16  # projections of these many tokens run on mma_batch.cu (= its MAX_TOKENS)
BATCH_ROWS, BATCH_KSPLIT = 64, 256  # mma_batch.cu: weight rows of a block, k of a split
FEW_PICKS_PER_EXPERT = 16  # likewise the experts, by the picks per expert on average
TILE = 64  # rows (tokens, or pairs of one expert) of a tile of matmul.cu's products
TILE_OUTPUTS = {"LINEAR": 256, "GATE_UP": 128, "DOWN": 256}  # outputs of a block's tile, both tile kernels
TILE_K, TILE_STAGES = 32, 3  # matmul.cu: the k of a pipeline step, and the steps staged in shared memory at once
# wgmma_tiles.cu: rows of a tile (warpgroups of 64 rows), the k of a pipeline step, the steps staged at once
WGMMA_TILE, WGMMA_K, WGMMA_STAGES = 64 * WG_TILE, 64, 3
TILE_MIN_SPLIT_STEPS = 4  # matmul.cu: the fewest k-steps a split of a LINEAR product's K runs
TILE_SPLIT_BLOCKS = 264  # matmul.cu: K is split until a LINEAR product has this many blocks
# The batch-1 expert kernels' shapes, measured on H200s (48 layers of Qwen3-30B-A3B shapes, the captured step):
# expert_down_sum's output rows a warp computes at once for one pick (8: 2.4 % faster a token than 4, as fast as 16),
# and expert_gate_up's rows a block by tokens per pass (at one token 16, two a warp: 1.0 % faster than 8; 9 % faster
# than 8 in route_gate_up). A rank that holds a half or a quarter of each expert's rows (expert tensor parallelism)
# has too few blocks of 16 to fill the GPU: see gate_up_rows.
DOWN_SUM_ROWS = 8
GATE_UP_ROWS = {1: 16, MAXT[-1]: 8}
# The router's rows a block at one token (linear.cu's ``linear``, float32 weights): 2, so that its 128 rows are 64
# blocks, not 16 of 8 rows. Measured on H200s, the captured step: where route_gate_up runs 8 rows a block, 1-2 %
# faster (one rank's part of two 1.977 -> 1.948 ms, of four 1.489 -> 1.478; one GPU 3.003 -> 2.953); one GPU with its
# 16 rows a block, the same within the noise (the commit before this constant against it: 2.802 -> 2.804 ms, means of
# 5 interleaved rounds).
ROUTER_ROWS = 2
# The lm_head's rows a block of linear.cu's ``linear`` computes, by tokens per pass: at one token (before Hopper, where
# linear_streamed does not take it) 32, four a warp (1.2 % faster a token than 64 on an H200; 16: 0.9 % faster, 128:
# 0.9 % slower); 64 for more tokens (not measured again).
LM_HEAD_ROWS = {1: 32, MAXT[-1]: 64}
# linear_streamed: one-token projections of at least this many weights (the lm_head; a layer's q/k/v measured no
# faster), and the shared memory of its block, for its rows in flight and its input (measured on an H200, the
# captured batch-1 step: 224 KB 3.452 -> 3.406 ms a token; 96 KB 3.483, 192 KB no faster)
STREAM_MIN_WEIGHTS = 1 << 26
STREAM_SHARED = 224 * 1024
MAX_EXPERTS = 512  # route_topk holds a token's router probabilities in one warp's registers (moe.cu)
# What the tensor-core products take as activations: "float32" splits each into bf16 hi + lo and multiplies both
# (results within ~1e-5 of the float32 reference, the default); "bf16" rounds them to bf16 and multiplies once, as
# bf16 engines do, where the tensor cores bound the time: the tile products and attention of steps launched from
# Python (prefill). The captured decode steps are bound by weight reads and keep the split products (bf16_products).
PRECISIONS = ("float32", "bf16")


@dataclass
class Layer:
    input_norm: cp.ndarray  # (H,) f32
    qkv: cp.ndarray  # ((Hq + 2 Hkv) D, H) weight dtype
    q_norm: cp.ndarray  # (D,) f32
    k_norm: cp.ndarray  # (D,) f32
    o_proj: cp.ndarray  # (H, Hq D)
    post_norm: cp.ndarray  # (H,) f32
    gate_up: cp.ndarray  # (E, 2I, H): rows [0, I) gate, [I, 2I) up; E = 1 for a dense MLP
    down: cp.ndarray  # (E, H, I)
    router: cp.ndarray | None  # (E, H), MoE layers only


@dataclass
class State:
    config: Qwen3MoeConfig
    wtype: str  # the kernels' weight type: "bf16_t" or "float"
    embed_tokens: cp.ndarray  # (V, H)
    layers: list[Layer]
    norm: cp.ndarray  # (H,) f32
    lm_head: cp.ndarray  # (V, H)
    inv_freq: cp.ndarray  # (D/2,) f32, RoPE frequencies exactly as the reference computes them
    # one rank of a split model (qwen3moe/ranks.py) holds a part; the defaults are the whole model
    residual: bool = True  # False: the blocks leave out their input (only rank 0 adds it, see reference_backend)
    expert_lo: int = 0  # the experts held are [expert_lo, expert_hi): a block of them under expert parallelism
    expert_hi: int = MAX_EXPERTS
    first_vocab_row: int = 0  # the token id of lm_head's first row
    precision: str = "float32"  # one of PRECISIONS
    # the workspace of products that split K (mma_batch.cu, matmul.cu's LINEAR): each split's partial sums, and
    # mma_batch.cu's count of the splits done per row block
    split_partial: cp.ndarray = field(init=False)
    split_arrivals: cp.ndarray = field(init=False)

    def __post_init__(self):
        """Allocate the workspace once, for the largest layer projection of BATCH_MAX_TOKENS tokens (mma_batch.cu)
        or of TILE tokens (matmul.cu): a captured graph keeps its address, so it never grows (a product it
        does not fit takes another kernel, or fewer splits)."""
        shapes = [w.shape for l in self.layers for w in (l.qkv, l.o_proj, l.router) if w is not None]
        sizes = [(batch_splits(K) * BATCH_MAX_TOKENS * N, math.ceil(N / BATCH_ROWS)) for N, K in shapes]
        sizes += [(tile_splits(K, N, TILE) * TILE * N, 0) for N, K in shapes]  # (longer steps split within it)
        self.split_partial = cp.empty(max([p for p, _ in sizes], default=0), cp.float32)
        self.split_arrivals = cp.zeros(max([a for _, a in sizes], default=0), cp.uint32)


def upload(w: np.ndarray) -> cp.ndarray:
    """A weight on the GPU in the kernels' form: bf16 as its uint16 bits, f32 as it is, f16 widened to f32."""
    w = np.ascontiguousarray(w)
    return cp.asarray(w.view(np.uint16) if w.dtype.name == "bfloat16" else w.astype(np.float32, copy=False))


def prepare(weights: Qwen3MoeWeights, config: Qwen3MoeConfig, shard: RankShard | None = None,
            precision: str = "float32") -> State:
    """Upload ``weights``; ``shard``: which part of the model they are when they are one rank's (see sharding.py);
    ``precision``: what the tensor-core products take (PRECISIONS)."""
    c = config
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if c.num_attention_heads // c.num_key_value_heads > MAX_ATTENTION_ROWS:
        raise UnsupportedConfigError(f"the cupy backend supports at most {MAX_ATTENTION_ROWS} query heads per "
                                     "key/value head")
    if c.head_dim > 256:
        raise UnsupportedConfigError(f"the cupy backend supports head_dim up to 256, not {c.head_dim}")
    if c.num_experts > MAX_EXPERTS:
        raise UnsupportedConfigError(f"the cupy backend supports up to {MAX_EXPERTS} experts, not {c.num_experts}")
    f32 = lambda v: cp.asarray(np.asarray(v, dtype=np.float32))
    layers = []
    for lw in weights.layers:
        a, m = lw.self_attn, lw.mlp
        experts = [e for e in m.experts if e is not None] if isinstance(m, SparseMoeBlock) else [m]
        layers.append(Layer(
            f32(lw.input_layernorm), upload(np.concatenate([a.q_proj, a.k_proj, a.v_proj])), f32(a.q_norm),
            f32(a.k_norm), upload(a.o_proj), f32(lw.post_attention_layernorm),
            upload(np.stack([np.concatenate([e.gate_proj, e.up_proj]) for e in experts])),
            upload(np.stack([e.down_proj for e in experts])),
            upload(m.gate) if isinstance(m, SparseMoeBlock) else None))
    wtype = "bf16_t" if weights.lm_head.dtype.name == "bfloat16" else "float"
    if any(l.qkv.dtype != layers[0].qkv.dtype for l in layers) or (layers[0].qkv.dtype == cp.uint16) != (
            wtype == "bf16_t"):
        raise UnsupportedConfigError("the cupy backend needs one weight dtype for all matrices of a checkpoint")
    part = {} if shard is None else dict(residual=shard.rank == 0, expert_lo=shard.experts.start,
                                         expert_hi=shard.experts.stop, first_vocab_row=shard.vocab_rows.start)
    return State(c, wtype, upload(weights.embed_tokens), layers, f32(weights.norm), upload(weights.lm_head),
                 rope_inv_freq(c), **part, precision=precision)


def rope_inv_freq(c: Qwen3MoeConfig) -> cp.ndarray:
    """(D/2,) RoPE frequencies, computed exactly as the reference does; the kernels take angle = position * f."""
    exponents = np.arange(0, c.head_dim, 2, dtype=np.float32) / np.float32(c.head_dim)
    return cp.asarray((np.float32(1) / np.float32(c.rope_theta) ** exponents).astype(np.float32))


# ---- launches: every kernel call of the backend goes through one of these -------------------------------------------

def i32(v) -> np.int32:
    return np.int32(v)


def batch_splits(K: int) -> int:
    """Blocks mma_batch.cu splits K over."""
    return math.ceil(K / BATCH_KSPLIT)


def tile_splits(K: int, N: int, T: int, rows: int = TILE, room: int | None = None) -> int:
    """Blocks the tiles (of ``rows`` rows) split a LINEAR product's K over: enough for TILE_SPLIT_BLOCKS blocks
    where its tiles are fewer (batched decoding), each at least TILE_MIN_SPLIT_STEPS k-steps, and (``room``: the
    workspace's floats) all of their partial sums in the workspace. Rounded so that no split is left without steps."""
    steps, tiles_ = K // TILE_K, math.ceil(N / TILE_OUTPUTS["LINEAR"]) * math.ceil(T / rows)
    if (T * N) % 4 or steps == 0:  # add_split_sums takes float4s; a K under TILE_K never runs on the tiles
        return 1
    splits = max(1, min(TILE_SPLIT_BLOCKS // tiles_, steps // TILE_MIN_SPLIT_STEPS,
                        room // (T * N) if room is not None else steps))
    return math.ceil(steps / math.ceil(steps / splits))


def linear_path(s: State, tokens: int, K: int, N: int) -> str:
    """Which kernel computes a projection of ``tokens`` rows: "batch" (mma_batch.cu) from BATCH_MIN_TOKENS to
    BATCH_MAX_TOKENS where its workspace holds the product's partial sums (not the lm_head); otherwise "gemv"
    (linear.cu, CUDA cores, the RMSNorm fused) below GEMV_MAX_TOKENS (measured faster there than mma_few.cu: a
    32-row block per 8 tokens leaves small matrices too few blocks), for float32 weights, or for a K that is not
    whole 32-column steps; "few" (mma_few.cu) up to FEW_TOKENS for matrices under FEW_MAX_WEIGHTS; "tiles"
    (matmul.cu, 64-token tiles, K split where the tiles are few) beyond. Measured on H200s at batch 64 (graphs): the
    large matrices of Qwen3-30B-A3B's shapes on the tiles, 2838 -> 2921 tokens/s (the lm_head 716 -> 400 us); the
    halves of q/k/v and o_proj that each of two ranks holds on the tiles, 4621 -> 4457 tokens/s."""
    if s.wtype != "bf16_t" or K % 32:
        return "gemv"
    if tokens >= BATCH_MIN_TOKENS and batch_fits(s, tokens, K, N):
        return "batch"
    if tokens < GEMV_MAX_TOKENS:
        return "gemv"
    return "few" if tokens <= FEW_TOKENS and N * K < FEW_MAX_WEIGHTS else "tiles"


@functools.cache
def device_limits() -> tuple[int, int, int]:
    """This GPU's compute capability (e.g. 90), multiprocessors, and the shared memory a block may ask for."""
    d = cp.cuda.Device()
    return int(d.compute_capability), d.attributes["MultiProcessorCount"], d.attributes["MaxSharedMemoryPerBlockOptin"]


def streamed(wtype: str, K: int, N: int) -> tuple[int, int, int] | None:
    """How linear.cu's ``linear_streamed`` computes a one-token K -> N projection of ``wtype`` weights: (rows a
    block, row slots a warp, shared memory bytes); None where ``linear`` does: for matrices under STREAM_MIN_WEIGHTS,
    before Hopper (no bulk copies), for rows that are not whole 16-byte packs, or too long for a slot a warp.
    One block a multiprocessor, its rows a multiple of its warps; each warp gets as many slots as it has rows, or as
    fit in STREAM_SHARED (or what the GPU allows a block, less 1 KB for the kernel's own)."""
    capability, sms, shared = device_limits()
    if N * K < STREAM_MIN_WEIGHTS or capability < 90:
        return None
    row_bytes, warps = K * (2 if wtype == "bf16_t" else 4), BLOCK // 32
    rows = warps * math.ceil(N / (warps * sms))
    # the input's K floats, then per slot a row and its 8-byte barrier (the barriers rounded up to 16 bytes)
    room = min(STREAM_SHARED, shared - 1024) - 4 * K - 15
    slots = min(rows // warps, room // (warps * (row_bytes + 8)))
    if row_bytes % 16 or slots < 1:
        return None
    return rows, slots, (warps * slots * 8 + 15) // 16 * 16 + 4 * K + warps * slots * row_bytes


def one_wave_rows(N: int) -> int:
    """Rows a block of linear.cu's ``linear`` computes at one token, for a layer's projections: as few as let all of
    the blocks be resident at once (two a multiprocessor: their registers allow no more), at least one a warp. A
    second wave of blocks can only ask for its rows once the first has finished. Measured on an H200 (48 layers of
    Qwen3-30B-A3B shapes, the captured step): q/k/v (5120 rows) in 256 blocks of 20 instead of 640 of 8, 3.452 ->
    3.422 ms a token (24 rows: 3.446); o_proj and the router keep 8."""
    return max(BLOCK // 32, math.ceil(N / (2 * device_limits()[1])))


def batch_fits(s: State, tokens: int, K: int, N: int) -> bool:
    """Whether mma_batch.cu takes this many tokens and its workspace holds the product's partial sums."""
    return (tokens <= BATCH_MAX_TOKENS and batch_splits(K) * tokens * N <= s.split_partial.size
            and math.ceil(N / BATCH_ROWS) <= s.split_arrivals.size)


def expert_path(s: State, tokens: int, picks: int, experts: int, H: int, I: int) -> str:
    """Which kernels compute a step's expert products: "few" (mma_few.cu) while the experts serve few tokens each, as
    in batched decoding; "tiles" (matmul.cu) for prefill-sized steps; "gemv" (moe.cu, CUDA cores) for one token
    (measured faster there), float32 weights, or sizes that are not whole 32-column steps."""
    if s.wtype != "bf16_t" or H % 32 or I % 32 or tokens == 1:
        return "gemv"
    return "few" if picks <= FEW_PICKS_PER_EXPERT * experts else "tiles"


@functools.cache
def hopper() -> bool:
    """Whether this GPU runs wgmma_tiles.cu: compute capability 9.0 (H100, H200; wgmma is Hopper's alone) with an
    NVRTC that compiles for sm_90a (CUDA 12 or later), unless ``QWEN3MOE_WGMMA=0`` asks for matmul.cu's tiles
    everywhere (to compare, or to rule the kernel out)."""
    from cupy_backends.cuda.libs import nvrtc

    return (device_limits()[0] == 90 and nvrtc.getVersion() >= (12, 0)
            and os.environ.get("QWEN3MOE_WGMMA", "1") != "0")


def tile_rows(tokens: int) -> int:
    """Rows of the tiles that a step of ``tokens`` rows runs its tile products on: wgmma_tiles.cu's (128) on Hopper
    beyond FEW_TOKENS; matmul.cu's (64) otherwise. Measured on an H200 (Qwen3-30B-A3B shapes): the 2048-token
    prefill 134.4 -> 122.2 ms on the first wgmma_tiles.cu, 92.6 ms with its producer warpgroup; the K-split
    projections of 64 tokens were slower on the first (q/k/v 33 -> 38 us, lm_head 396 -> 480 us), so batched
    decoding keeps matmul.cu."""
    return WGMMA_TILE if tokens > FEW_TOKENS and hopper() else TILE


def bf16_products(precision: str) -> bool:
    """Whether the tile products and prefill attention multiply bf16 activations: under precision "bf16", except in
    a graph capture -- decoding, bound by weight reads, where a new array for them would also outlive its memory."""
    return precision == "bf16" and not cp.cuda.get_current_stream().is_capturing()


def bf16_activations(precision: str, rows: int) -> bool:
    """Whether tile products of ``rows``-row tiles take their activations as bf16 arrays: wgmma_tiles.cu's, under
    bf16_products (matmul.cu's round them as they load them)."""
    return bf16_products(precision) and rows == WGMMA_TILE


def linear_takes_bf16(s: State, T: int, K: int, N: int, precision: str | None = None) -> bool:
    """Whether ``linear`` of T rows, K -> N, takes its input as bf16 (its tile product's bf16_activations), so that
    the kernel ahead may write it so; ``precision``: as linear's."""
    return linear_path(s, T, K, N) == "tiles" and bf16_activations(precision or s.precision, tile_rows(T))


def bf16_half(a: cp.ndarray) -> cp.ndarray:
    """The first half of float32 ``a``'s memory as a uint16 array of a's shape: where a kernel writes activations
    as bf16 for the next product to take."""
    return a.ravel().view(cp.uint16)[:a.size].reshape(a.shape)


def tiles(mode: str, N: int, rows: int, row_tiles: int, args: tuple, splits: int = 1,
          precision: str = "float32") -> None:
    """Launch the tile product ``mode`` over ``row_tiles`` tiles of ``rows`` rows and ``splits`` splits of K:
    wgmma_tiles.cu for 128-row tiles, matmul.cu's mma_tiles for 64-row ones, with the shared memory of their
    pipelines (each kernel's ``SHARED``): activations and bf16 weights (two matrices for GATE_UP) of every stage,
    rows padded (wgmma_tiles.cu: swizzled instead, plus alignment, its mbarriers and the tile's row list). That is
    more than the 48 KB a launch may take without asking: cuda_build.Kernel asks on its first launch.
    wgmma_tiles.cu reads the weights through a tensor map (cuda_build.tensor_map) instead of the weight pointers and
    expert stride: over all rows of ``w`` (every expert's, one after the other), with the rows of one expert.
    ``precision`` "bf16" (``bf16_products``): mma_tiles rounds the activations as it loads them; wgmma_tiles.cu
    takes them as bf16, as given (uint16: written so by the kernel ahead) or rounded first (to_bf16); its GATE_UP
    then writes bf16 (``out`` uint16)."""
    cols = TILE_OUTPUTS[mode]
    bf16 = bf16_products(precision)
    if rows == WGMMA_TILE:
        a, K, w, _, expert_stride, *rest = args
        if bf16 and a.dtype != cp.uint16:
            a = to_bf16(a)
        w_map = tensor_map(w.data.ptr, w.size // int(K), int(K), 128 if mode == "GATE_UP" else 256)
        args = (w_map, a, K, i32(int(expert_stride) // int(K)), *rest)
        smem = WGMMA_STAGES * (256 * WGMMA_K * 2 + rows * WGMMA_K * a.itemsize) + 1024 + 2 * WGMMA_STAGES * 8 + \
            rows * 4
        k = kernel("wgmma_tiles.cu", f"wgmma_tiles<{mode}, {WG_TILE}, {'bf16_t' if bf16 else 'float'}>")
        threads = 128 * (WG_TILE + 1)
    else:
        smem = TILE_STAGES * (rows * (TILE_K + 8) * 4 + (2 if mode == "GATE_UP" else 1) * cols * (TILE_K + 8) * 2)
        k, threads = kernel("matmul.cu", f"mma_tiles<{mode}, {'false' if bf16 else 'true'}>"), 128
    k((math.ceil(N / cols), row_tiles, splits), (threads,), args, shared_mem=smem)


def to_bf16(x: cp.ndarray) -> cp.ndarray:
    """x (float32, a multiple of 4 values) rounded to bf16, as uint16 words of the same shape."""
    y = cp.empty(x.shape, cp.uint16)
    n4 = x.size // 4
    kernel("matmul.cu", "to_bf16")((math.ceil(n4 / BLOCK),), (BLOCK,), (x, np.int64(n4), y))
    return y


def rms_norm(s: State, x: cp.ndarray, weight: cp.ndarray, out: cp.ndarray) -> None:
    """out = RMSNorm(x) * weight, as float32, or rounded to bf16 where ``out`` is uint16."""
    kernel("linear.cu", f"rms_norm<{'bf16_t' if out.dtype == cp.uint16 else 'float'}>")(
        (x.shape[0],), (BLOCK,), (x, i32(x.shape[1]), weight, np.float32(s.config.rms_norm_eps), out))


def linear(s: State, x: cp.ndarray, w: cp.ndarray, out: cp.ndarray, norm: cp.ndarray | None = None,
           residual: cp.ndarray | None = None, rows_per_block: int | None = None, scratch: cp.ndarray | None = None,
           precision: str | None = None) -> None:
    """out = [residual +] w @ [rmsnorm(x, norm)]: x (T, K) -> out (T, N). ``rows_per_block``: of linear.cu's
    ``linear`` (None: one_wave_rows at one token, 8 otherwise). ``scratch`` (T, K): where the normalised input goes
    when the kernel does not fuse the norm (None: a new array; a captured graph passes its own). ``precision``: what
    the tile products take (None: the state's)."""
    T, K = x.shape
    N = w.shape[0]
    path = linear_path(s, T, K, N)
    streams = streamed(s.wtype, K, N) if path == "gemv" and T == 1 else None
    if streams:
        rows, slots, smem = streams
        k = kernel("linear.cu", f"linear_streamed<{s.wtype}>")
        k((math.ceil(N / rows),), (BLOCK,),
          (x, i32(K), NULL if norm is None else norm, np.float32(s.config.rms_norm_eps), w, i32(N), i32(rows),
           i32(slots), NULL if residual is None else residual, out), shared_mem=smem)
        return
    if path == "gemv":
        m = 1 if T == 1 else MAXT[-1]
        rows_per_block = rows_per_block or (one_wave_rows(N) if T == 1 else 8)
        kernel("linear.cu", f"linear<{s.wtype}, {m}>")(
            (math.ceil(N / rows_per_block), math.ceil(T / m)), (BLOCK,),
            (x, i32(T), i32(K), NULL if norm is None else norm, np.float32(s.config.rms_norm_eps), w, i32(N),
             i32(rows_per_block), NULL if residual is None else residual, out))
        return
    if norm is not None:
        xn = cp.empty_like(x) if scratch is None else scratch
        if linear_takes_bf16(s, T, K, N, precision):
            xn = bf16_half(xn)
        rms_norm(s, x, norm, xn)
        x = xn
    residual = NULL if residual is None else residual
    if path == "batch":
        kernel("mma_batch.cu", "mma_batch")(
            (math.ceil(N / BATCH_ROWS), batch_splits(K)), (128,),
            (x, i32(T), i32(K), w, i32(N), residual, s.split_partial, s.split_arrivals, out),
            shared_mem=8 * math.ceil(T / 8) * (BATCH_KSPLIT + 4) * 4)
    elif path == "few":
        kernel("mma_few.cu", "mma_few<LINEAR>")(
            (math.ceil(T / 8), math.ceil(N / 32)), (128,),
            (x, i32(K), w, NULL, np.int64(0), i32(N), i32(T), *(NULL,) * 6, residual, out))
    else:
        rows = tile_rows(T)
        splits = tile_splits(K, N, T, rows, s.split_partial.size)
        tiles("LINEAR", N, rows, math.ceil(T / rows),
              (x, i32(K), w, NULL, np.int64(0), i32(N), i32(T), *(NULL,) * 8, residual, out, s.split_partial),
              splits, precision or s.precision)
        if splits > 1:
            n4 = T * N // 4
            kernel("matmul.cu", "add_split_sums")((math.ceil(n4 / BLOCK),), (BLOCK,),
                                                  (s.split_partial, i32(splits), i32(n4), residual, out))


@dataclass
class Grouping:
    """Which expert each (token, slot) pick goes to, grouped by expert (see moe.cu)."""

    slot_expert: cp.ndarray  # (max_slots,) int32
    slot_offset: cp.ndarray  # (max_slots + 1,) int32
    pair_src: cp.ndarray  # (P,) int32
    pair_token: cp.ndarray  # (P,) int32
    n_slots: cp.ndarray  # (1,) int32
    pair_weight: cp.ndarray | None  # (P,) f32 routing weights by pair number, None for a dense MLP
    tile_slot: cp.ndarray  # (max_tiles,) int32: tiles of at most tile_rows(T) pairs of one slot, for the tensor cores
    tile_row: cp.ndarray  # (max_tiles,) int32: the tile's first pair
    n_tiles: cp.ndarray  # (1,) int32

    @staticmethod
    def empty(P: int, E: int) -> "Grouping":
        slots, tiles = min(P, E), math.ceil(P / TILE) + min(P, E)
        z = lambda n: cp.zeros(n, dtype=cp.int32)
        # n_slots starts at min(P, E): a single token's picks are each a slot of their own, and route_gate_up (moe.cu),
        # which lists them so, leaves n_slots as it is (expert_down_sum reads it before its wait); every other kernel
        # that groups picks writes it
        return Grouping(z(slots), z(slots + 1), z(P), z(P), cp.full(1, slots, dtype=cp.int32),
                        cp.zeros(P, dtype=cp.float32), z(tiles), z(tiles), z(1))

    @staticmethod
    def dense(T: int) -> "Grouping":
        """Every token to the one 'expert' of a dense MLP."""
        rows = tile_rows(T)
        ids, tiles = cp.arange(T, dtype=cp.int32), math.ceil(T / rows)
        return Grouping(cp.zeros(1, cp.int32), cp.asarray([0, T], cp.int32), ids, ids, cp.ones(1, cp.int32), None,
                        cp.zeros(tiles, cp.int32), cp.arange(0, T, rows, dtype=cp.int32),
                        cp.asarray([tiles], cp.int32))


@dataclass
class MoeBuffers:
    """Everything a feed-forward block writes, allocated once per shape so that a captured graph can reuse it."""

    xn: cp.ndarray  # (T, H) normalised input
    logits: cp.ndarray  # (T, E) router logits
    probs: cp.ndarray  # (T, E) router probabilities
    topk_ids: cp.ndarray  # (T, K) int32
    act: cp.ndarray  # (P, I) SiLU(gate) * up per pick (with bf16_activations: as bf16, in its first half)
    out: cp.ndarray  # (P, H) weighted expert output per pick
    grouping: Grouping

    @staticmethod
    def empty(T: int, c: Qwen3MoeConfig, top_k: int) -> "MoeBuffers":
        P = T * top_k
        f = lambda *shape: cp.empty(shape, dtype=cp.float32)
        return MoeBuffers(f(T, c.hidden_size), f(T, c.num_experts), f(T, c.num_experts),
                          cp.empty((T, top_k), cp.int32),
                          f(P, c.moe_intermediate_size), f(P, c.hidden_size), Grouping.empty(P, c.num_experts))


def swiglu_experts_into(s: State, layer: Layer, xn: cp.ndarray, g: Grouping, act: cp.ndarray, out: cp.ndarray,
                        max_slots: int, top_k: int, sum_into: tuple | None = None) -> None:
    """out[pair] = weight * down_e(SiLU(gate_e xn) * up_e xn) for each pick of the experts held, each expert's rows
    read once. ``sum_into`` (x, topk_ids as ``combine`` takes them): then x += each token's picks' sum, by
    ``combine``, or for one token by the down kernel itself (expert_down_sum, same bits; ``out`` is not written)."""
    E, two_i, H = layer.gate_up.shape
    I = two_i // 2
    up = up_rows(layer)
    pair_weight = NULL if g.pair_weight is None else g.pair_weight
    path = expert_path(s, xn.shape[0], xn.shape[0] * top_k, E, H, I)
    if path == "few":
        slots = (g.slot_expert, g.slot_offset, g.pair_token, g.pair_src)
        kernel("mma_few.cu", "mma_few<GATE_UP>")(
            (math.ceil(I / 16), max_slots), (128,),
            (xn, i32(H), layer.gate_up, up, np.int64(two_i * H), i32(I), i32(0), *slots, NULL, g.n_slots, NULL, act))
        kernel("mma_few.cu", "mma_few<DOWN>")(
            (math.ceil(H / 32), max_slots), (128,),
            (act, i32(I), layer.down, NULL, np.int64(H * I), i32(H), i32(0), *slots, pair_weight, g.n_slots, NULL,
             out))
    elif path == "tiles":  # (group_by_expert listed tiles of tile_rows(T) pairs)
        n_tiles, grouped = g.tile_slot.shape[0], (g.tile_slot, g.tile_row, g.n_tiles, g.slot_expert, g.slot_offset,
                                                  g.pair_token, g.pair_src)
        rows = tile_rows(xn.shape[0])
        if bf16_activations(s.precision, rows):  # GATE_UP writes bf16 for DOWN, in the first half of act's memory
            act = bf16_half(act)
        tiles("GATE_UP", I, rows, n_tiles,
              (xn, i32(H), layer.gate_up, up, np.int64(two_i * H), i32(I), i32(0), *grouped, NULL, NULL, act, NULL),
              precision=s.precision)
        tiles("DOWN", H, rows, n_tiles,
              (act, i32(I), layer.down, NULL, np.int64(H * I), i32(H), i32(0), *grouped, pair_weight, NULL, out,
               NULL), precision=s.precision)
    else:
        m = 1 if xn.shape[0] == 1 else MAXT[-1]  # one token: every slot holds one pick
        kernel("moe.cu", f"expert_gate_up<{s.wtype}, {m}>")(
            (math.ceil(I / GATE_UP_ROWS[m]), max_slots), (BLOCK,),
            (xn, i32(H), layer.gate_up, up, np.int64(two_i * H), i32(I), i32(GATE_UP_ROWS[m]), g.slot_expert,
             g.slot_offset, g.pair_token, g.n_slots, act))
        if sum_into is not None and m == 1:
            down_sum(s, layer, act, g, max_slots, sum_into[0])
            return
        kernel("moe.cu", f"expert_down<{s.wtype}, {m}>")(
            (math.ceil(H / 8), max_slots), (BLOCK,),
            (act, i32(I), layer.down, np.int64(H * I), i32(H), i32(8), g.slot_expert, g.slot_offset, g.pair_src,
             pair_weight, g.n_slots, out))
    if sum_into is not None:
        combine(s, sum_into[0], out, sum_into[1])


def down_sum(s: State, layer: Layer, act: cp.ndarray, g: Grouping, max_slots: int, x: cp.ndarray) -> None:
    """x += the weighted sum of one token's picks' down products (expert_down_sum)."""
    _, H, I = layer.down.shape
    kernel("moe.cu", f"expert_down_sum<{s.wtype}, {DOWN_SUM_ROWS}>")(
        (math.ceil(H / DOWN_SUM_ROWS),), (BLOCK,),
        (act, i32(I), layer.down, np.int64(H * I), i32(H), g.slot_expert, g.pair_src,
         NULL if g.pair_weight is None else g.pair_weight, g.n_slots, i32(s.residual), x),
        shared_mem=4 * max_slots * DOWN_SUM_ROWS)


def moe_into(s: State, layer: Layer, x: cp.ndarray, top_k: int, disabled: cp.ndarray | None, b: MoeBuffers,
             stats: tuple | None = None, normed: bool = False, sum_picks: bool = True) -> None:
    """x += MoE(post_attention_layernorm(x)), in place; the routing lands in b.probs, b.topk_ids, b.grouping.
    ``normed``: b.xn holds post_attention_layernorm(x) already. ``sum_picks`` False: the picks' weighted outputs are
    left in b.out, for the all-reduce of a split model to add (``reduce_over_ranks``), and x is unchanged."""
    c, T = s.config, x.shape[0]
    E, g = c.num_experts, b.grouping
    if T == 1 and sum_picks:
        route_and_gate_up(s, layer, x, top_k, disabled, b, stats, normed)
        down_sum(s, layer, b.act, g, top_k, x)
        return
    route(s, layer.router, layer.post_norm, x, top_k, disabled, b, stats, normed)
    P = T * top_k
    if T > 1:  # a single token's picks are grouped already (route_topk wrote them as slots)
        kernel("moe.cu", "group_by_expert")(
            (1,), (1024,), (b.topk_ids, i32(P), i32(top_k), i32(E), g.slot_expert, g.slot_offset, g.pair_src,
                            g.pair_token, g.n_slots, i32(tile_rows(T)), g.tile_slot, g.tile_row, g.n_tiles,
                            i32(s.expert_lo), i32(min(s.expert_hi, E))), shared_mem=8 * E)
    swiglu_experts_into(s, layer, b.xn, g, b.act, b.out, min(P, E), top_k, (x, b.topk_ids) if sum_picks else None)


def router_logits(s: State, gate: cp.ndarray, norm: cp.ndarray, x: cp.ndarray, b: MoeBuffers,
                  normed: bool = False) -> bool:
    """b.logits = gate @ RMSNorm(x) (``normed``: b.xn holds RMSNorm(x) already); returns whether b.xn holds it now."""
    T, H = x.shape
    # the router's logits keep float32 products at any precision: a small matrix, and bf16 rounding would choose
    # other experts wherever two are within ~1e-3 of each other
    rows = ROUTER_ROWS if T == 1 else None
    if normed:
        linear(s, b.xn, gate, b.logits, rows_per_block=rows, precision="float32")
        return True
    linear(s, x, gate, b.logits, norm=norm, rows_per_block=rows, scratch=b.xn, precision="float32")
    # only linear.cu's GEMV fuses the norm; the other kernels have had b.xn = RMSNorm(x) written for them
    return linear_path(s, T, H, gate.shape[0]) != "gemv"


def gate_up_rows(I: int, top_k: int) -> int:
    """Gate/up rows a block of route_gate_up computes for one pick: GATE_UP_ROWS[1] (16) where that makes two blocks
    a multiprocessor, else 8. Measured on an H200, the captured step of one rank's part (expert tensor parallelism)
    alone: I 384 (two ranks), 192 blocks of 16 -> 384 of 8, 2.022 -> 1.989 ms; I 192 (four), 1.575 -> 1.486 ms (4
    rows: 1.504 ms). The whole I 768 keeps 16: 8 was 2.737 -> 3.003 ms."""
    rows = GATE_UP_ROWS[1]
    return rows if math.ceil(I / rows) * top_k >= 2 * device_limits()[1] else rows // 2


def route_chunks(E: int) -> int:
    """A lane's experts in the routing's warp (moe.cu's CHUNKS): ceil(E / 32) rounded up to 4, 8 or 16
    (MAX_EXPERTS = 32 x 16)."""
    return next(n for n in (4, 8, 16) if 32 * n >= E)


def up_rows(layer: Layer) -> np.uint64:
    """The address of expert 0's up rows in the layer's stacked (E, 2I, H) gate/up weights."""
    _, two_i, H = layer.gate_up.shape
    return np.uint64(layer.gate_up.data.ptr + two_i // 2 * H * layer.gate_up.itemsize)


def route(s: State, gate: cp.ndarray, norm: cp.ndarray, x: cp.ndarray, top_k: int, disabled: cp.ndarray | None,
          b: MoeBuffers, stats: tuple | None = None, normed: bool = False) -> None:
    """The router: logits = gate @ RMSNorm(x), then softmax, top-k and weights (route_topk) into b; b.xn gets the
    experts' normalised input (``normed``: it holds it already). ``stats``: device accumulators (counts, prob_sum,
    entropy) or None."""
    c, T = s.config, x.shape[0]
    H, E, g = c.hidden_size, c.num_experts, b.grouping
    normed = router_logits(s, gate, norm, x, b, normed)
    slots = (g.slot_expert, g.slot_offset, g.pair_src, g.pair_token, g.n_slots) if T == 1 else (NULL,) * 5
    kernel("moe.cu", f"route_topk<{route_chunks(E)}>")(
        (T,), (BLOCK,),
        (b.logits, x, i32(H), NULL if normed else norm, np.float32(c.rms_norm_eps), i32(E), i32(top_k),
         i32(c.norm_topk_prob), NULL if disabled is None else disabled, b.xn, b.probs, b.topk_ids, g.pair_weight,
         *(stats or (NULL, NULL, NULL)), *slots, i32(s.expert_lo), i32(min(s.expert_hi, E))), shared_mem=8 * top_k)


def route_and_gate_up(s: State, layer: Layer, x: cp.ndarray, top_k: int, disabled: cp.ndarray | None, b: MoeBuffers,
                      stats: tuple | None = None, normed: bool = False) -> None:
    """One token: the router's logits (linear; ``normed``: from b.xn), then the routing and the chosen experts'
    gate/up products in one kernel (route_gate_up, moe.cu), which writes b.probs, b.topk_ids and b.grouping as
    route_topk does, and b.act; each block normalises x in its shared memory. On a rank of a split model the picks of
    other ranks' experts get no products and slot_expert -1 (expert parallelism); an expert's rows may be a part of
    its rows (expert tensor parallelism)."""
    c, g = s.config, b.grouping
    E, (_, two_i, H) = c.num_experts, layer.gate_up.shape  # (the experts routed among; the rank holds some or parts)
    I, rows = two_i // 2, gate_up_rows(two_i // 2, top_k)
    router_logits(s, layer.router, layer.post_norm, x, b, normed)
    kernel("moe.cu", f"route_gate_up<{s.wtype}, {route_chunks(E)}>")(
        (math.ceil(I / rows), top_k), (BLOCK,),
        (b.logits, x, i32(H), layer.post_norm, np.float32(c.rms_norm_eps), i32(E), i32(top_k), i32(c.norm_topk_prob),
         NULL if disabled is None else disabled, b.probs, b.topk_ids, g.pair_weight, *(stats or (NULL, NULL, NULL)),
         g.slot_expert, g.slot_offset, g.pair_src, g.pair_token, layer.gate_up, up_rows(layer), np.int64(two_i * H),
         i32(I), i32(rows), b.act, i32(s.expert_lo), i32(min(s.expert_hi, E))),
        shared_mem=4 * H + 8 * top_k)


def combine(s: State, x: cp.ndarray, out: cp.ndarray, topk_ids: cp.ndarray | None) -> None:
    """x += the sum of each token's picks' weighted outputs ``out`` (T*K, H), of the experts this state holds
    (``topk_ids`` (T, K); None: every pick, a dense MLP's one); x = that sum alone on ranks without the residual."""
    T, H = x.shape
    kernel("moe.cu", "moe_combine")(
        (math.ceil(T * H / BLOCK),), (BLOCK,), (x, out, i32(T), i32(H), i32(out.shape[0] // T), i32(s.residual),
                                                ids_to_check(s, topk_ids), i32(s.expert_lo), i32(s.expert_hi)))


def ids_to_check(s: State, topk_ids: cp.ndarray | None):
    """The picks' expert ids where some picks may be another rank's (expert parallelism), else NULL: a state that
    holds every expert wrote every pick, and the kernels then read no ids."""
    if topk_ids is None or (s.expert_lo == 0 and s.expert_hi >= s.config.num_experts):
        return NULL
    return topk_ids


def reduce_over_ranks(s: State, comm, x: cp.ndarray, norm: tuple, picks=None) -> bool:
    """x = the sum over the ranks of a split model of their parts, in place (``comm``: fastpath/nccl_comm.py). A
    rank's part is x after attention, and after an MLP or MoE block that left its picks unsummed (``picks``: its
    buffers, ``sum_picks=False``) the sum of its picks (rank 0's after x). On one machine the peer kernel does all of
    it and also writes the next block's normalised input, ``norm`` = (weight, xn): returns True. Elsewhere (NCCL)
    moe_combine sums the picks ahead of the all-reduce, and False says that the next block normalises x itself."""
    if comm.peer is not None and comm.peer.fits(x):
        parts = None if picks is None else (picks.out, ids_to_check(s, picks.topk_ids), s.expert_lo, s.expert_hi,
                                            int(s.residual))
        comm.peer(x, parts, (norm[0], s.config.rms_norm_eps, norm[1]))
        return True
    if picks is not None:
        combine(s, x, picks.out, picks.topk_ids)
    comm.all_reduce(x)
    return False


@dataclass
class DenseBuffers:
    xn: cp.ndarray  # (T, H)
    act: cp.ndarray  # (T, I) (with bf16_activations: as bf16, in its first half)
    out: cp.ndarray  # (T, H)
    grouping: Grouping  # every token to the one "expert"
    topk_ids = None  # (for combine) every token's one pick counts

    @staticmethod
    def empty(T: int, c: Qwen3MoeConfig) -> "DenseBuffers":
        return DenseBuffers(cp.empty((T, c.hidden_size), cp.float32), cp.empty((T, c.intermediate_size), cp.float32),
                            cp.empty((T, c.hidden_size), cp.float32), Grouping.dense(T))


def dense_mlp_into(s: State, layer: Layer, x: cp.ndarray, b: DenseBuffers, normed: bool = False,
                   sum_picks: bool = True) -> None:
    """x += MLP(post_attention_layernorm(x)), in place, through the expert kernels with one expert. ``normed`` and
    ``sum_picks`` as for ``moe_into``."""
    if not normed:
        rms_norm(s, x, layer.post_norm, b.xn)
    swiglu_experts_into(s, layer, b.xn, b.grouping, b.act, b.out, 1, 1, (x, None) if sum_picks else None)


@dataclass
class AttentionPlan:
    """Where a step's tokens go: positions, sequences, query tiles and key splits (the same for every layer).

    A step with a segment of at least ATTENTION_MMA_MIN_TOKENS tokens (a prefill) takes the tensor-core kernel
    (attention_mma.cu: tiles of 64 tokens, all keys in one pass) where head_dim allows; otherwise attention.cu's
    kernel (tiles of up to 32 (token, head) rows, keys split across blocks and merged) serves decoding. Where every
    sequence's tokens fit in one tile (a decoding step) and the caches are short (NORM_ROPE_INSIDE_MAX_KEYS), that
    kernel also normalises and rotates the queries and keys and writes the cache (``norm_rope_inside``). A step of
    one token per sequence over caches of at most QUERY_HEADS_MAX_KEYS positions in all takes attention_heads instead
    (``query_heads``: a block per (split, query head, token)), and one over caches of more than that each takes
    attention_group (``group_heads``: a block per (split, kv head, token), each key scored for its G query heads at
    once); both do that work too."""

    tok_pos: cp.ndarray  # (T,) int32
    tok_seq: cp.ndarray  # (T,) int32
    tile_seq: cp.ndarray  # (tiles,) int32
    tile_row: cp.ndarray  # (tiles,) int32
    tile_rows: cp.ndarray  # (tiles,) int32
    splits: int
    chunk: int  # keys per split
    rows: int  # the most (token, head) rows of a tile
    tensor_cores: bool = False  # attention_mma.cu
    norm_rope_inside: bool = False  # attention.cu does qk_norm_rope_cache's work too
    query_heads: bool = False  # attention.cu's attention_heads
    group_heads: bool = False  # attention.cu's attention_group

    @staticmethod
    def build(c: Qwen3MoeConfig, segments: list[tuple[int, int, int]], max_keys: int,
              tensor_cores: bool | None = None, query_heads: bool | None = None,
              group_heads: bool | None = None) -> "AttentionPlan":
        """``segments``: (first row, end row, first position) per sequence; ``max_keys``: the most keys any query
        may see (the grid is sized for it: a captured step passes the cache capacity); ``tensor_cores``,
        ``query_heads`` and ``group_heads``: which kernel (None: chosen by the step's shape, as above; the kernel
        ladder and the tests compare them)."""
        longest = max(stop - start for start, stop, _ in segments)
        mma = tensor_cores if tensor_cores is not None else (
            c.head_dim in ATTENTION_MMA_HEAD_DIMS and longest >= ATTENTION_MMA_MIN_TOKENS)
        one_token = not mma and longest == 1 and c.head_dim in QUERY_HEADS_HEAD_DIMS
        G = c.num_attention_heads // c.num_key_value_heads
        heads = one_token and (query_heads if query_heads is not None else
                               not group_heads and len(segments) * max_keys <= QUERY_HEADS_MAX_KEYS)
        group = one_token and not heads and G in GROUP_SIZES and (
            group_heads if group_heads is not None else max_keys > QUERY_HEADS_MAX_KEYS)
        if query_heads and not heads or group_heads and not group:
            raise ValueError(f"attention_heads and attention_group take steps of one token per sequence with head_dim "
                             f"in {QUERY_HEADS_HEAD_DIMS} (attention_group: {GROUP_SIZES} query heads per kv head), not "
                             f"this one (head_dim {c.head_dim}, {G} query heads per kv head, {longest} tokens)")
        per_tile = MMA_ATTENTION_TOKENS if mma else max(1, MAX_ATTENTION_ROWS // G)
        pos, seq, tiles = [], [], []
        for j, (start, stop, first) in enumerate(segments):
            pos += range(first, first + stop - start)
            seq += [j] * (stop - start)
            tiles += [(j, r, min(per_tile, stop - r)) for r in range(start, stop, per_tile)]
        blocks = len(tiles) * (c.num_attention_heads if heads else c.num_key_value_heads)
        enough = math.ceil((GROUP_TARGET_BLOCKS if group else TARGET_BLOCKS) / blocks)
        if longest == 1:  # decoding: partial results stay small
            enough = max(enough, math.ceil(max_keys / MAX_KEYS_PER_SPLIT))
        splits = 1 if mma else max(1, min(math.ceil(max_keys / KEYS_PER_SPLIT), enough))
        chunk = math.ceil(max_keys / splits / 32) * 32
        a = lambda v: cp.asarray(np.asarray(v, dtype=np.int32))
        tile_seq, tile_row, tile_rows = zip(*tiles)
        return AttentionPlan(a(pos), a(seq), a(tile_seq), a(tile_row), a(tile_rows), math.ceil(max_keys / chunk),
                             chunk, max(tile_rows) * G, mma,
                             heads or group or (not mma and len(tiles) == len(segments)
                                                and max_keys <= NORM_ROPE_INSIDE_MAX_KEYS), heads, group)

    def shared_bytes(self, c: Qwen3MoeConfig) -> int:
        """Dynamic shared memory of attention.cu's kernel: the tile's queries, then two stages of 32 keys and values
        (key rows padded by 4 floats), which the merge reuses for its weights (rows x splits, and rows); where it
        rotates the queries and keys itself (``norm_rope_inside``), the tile's tokens' cosines and sines (D each) and a
        head vector per warp."""
        D = c.head_dim
        dp = math.ceil(D / 4) * 4
        tokens = self.rows // (c.num_attention_heads // c.num_key_value_heads)
        rotation = (tokens + BLOCK // 32) * D if self.norm_rope_inside else 0
        return 4 * (self.rows * dp + max(2 * 32 * (2 * dp + 4), self.rows * (self.splits + 1)) + rotation)


@dataclass
class AttentionBuffers:
    qkv: cp.ndarray  # (T, (Hq + 2 Hkv) D)
    q: cp.ndarray  # (T, Hq, D) normed and rotated
    part_acc: cp.ndarray  # (splits, T, Hq, D)
    part_m: cp.ndarray  # (splits, T, Hq)
    part_l: cp.ndarray  # (splits, T, Hq)
    attn: cp.ndarray  # (T, Hq D)
    xn: cp.ndarray  # (T, H) the normalised input, where the projection does not fuse the norm
    arrivals: cp.ndarray  # (T, Hq) uint32: blocks of a (tile, kv head) or (token, head) done, zero between launches

    @staticmethod
    def empty(T: int, c: Qwen3MoeConfig, splits: int) -> "AttentionBuffers":
        Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        f = lambda *shape: cp.empty(shape, dtype=cp.float32)
        return AttentionBuffers(f(T, (Hq + 2 * Hkv) * D), f(T, Hq, D), f(splits, T, Hq, D), f(splits, T, Hq),
                                f(splits, T, Hq), f(T, Hq * D), f(T, c.hidden_size), cp.zeros((T, Hq), cp.uint32))


def attention_into(s: State, layer: Layer, x: cp.ndarray, plan: AttentionPlan, k_caches: cp.ndarray,
                   v_caches: cp.ndarray, b: AttentionBuffers, normed: bool = False) -> None:
    """x += o_proj(attention(input_layernorm(x))), in place; writes the step's keys and values into the caches.
    ``k_caches``/``v_caches``: (sequences,) uint64 addresses of each sequence's cache for this layer. ``normed``:
    b.xn holds input_layernorm(x) already."""
    c, T = s.config, x.shape[0]
    Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    if normed:
        linear(s, b.xn, layer.qkv, b.qkv)
    else:
        linear(s, x, layer.qkv, b.qkv, norm=layer.input_norm, scratch=b.xn)
    norms = (b.qkv, layer.q_norm, layer.k_norm, s.inv_freq) if plan.norm_rope_inside else None
    if norms is None:  # a kernel of its own does it; else the attention kernel does
        kernel("attention.cu", "qk_norm_rope_cache")(
            (T, math.ceil((Hq + 2 * Hkv) / 8)), (BLOCK,), (b.qkv, i32(Hq), i32(Hkv), i32(D), layer.q_norm,
                                                           layer.k_norm, np.float32(c.rms_norm_eps), s.inv_freq,
                                                           plan.tok_pos, plan.tok_seq, k_caches, v_caches, b.q),
            shared_mem=4 * 8 * D)
    attn = b.attn  # o_proj's input: as bf16 in the first half of b.attn where its tile product takes bf16
    if plan.tensor_cores and linear_takes_bf16(s, T, Hq * D, layer.o_proj.shape[0]):
        attn = bf16_half(attn)
    attend(c, plan, k_caches, v_caches, b, s.precision, attn, norms)
    linear(s, attn, layer.o_proj, x, residual=x if s.residual else None)


def attend(c: Qwen3MoeConfig, plan: AttentionPlan, k_caches: cp.ndarray, v_caches: cp.ndarray,
           b: AttentionBuffers, precision: str = "float32", out: cp.ndarray | None = None,
           norms: tuple | None = None) -> None:
    """b.attn = grouped-query attention of the queries b.q over the caches (the key splits, merged by the last);
    ``precision`` (PRECISIONS): what attention_mma.cu's products take; ``out``: where it writes instead of b.attn
    (uint16: rounded to bf16, attention_mma.cu only); ``norms`` (qkv, q_norm, k_norm, inv_freq), under a plan
    ``norm_rope_inside`` (as every ``query_heads`` plan is): the queries are normalised and rotated from the
    projection's output qkv instead, and the step's keys and values written into the caches first
    (qk_norm_rope_cache's work)."""
    out = b.attn if out is None else out
    T, Hq, Hkv, D = b.q.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
    if plan.tensor_cores:
        heads = 2 if (Hq // Hkv) % 2 == 0 else 1  # query heads of a block, sharing the kv head's staged keys
        split = "false" if bf16_products(precision) else "true"
        mma = kernel("attention_mma.cu",
                     f"attention_mma<{D}, {split}, {'bf16_t' if out.dtype == cp.uint16 else 'float'}>")
        smem = 2 * 2 * 32 * D * 4 + 2 * 4 * 32 * (D + 8) * 2  # 2 buffers of its 32 keys and values: f32, bf16 hi/lo
        mma((plan.tile_seq.shape[0], Hq // heads), (128 * heads,),
            (b.q, i32(Hq), i32(Hkv), k_caches, v_caches, plan.tile_seq, plan.tile_row, plan.tile_rows, plan.tok_pos,
             np.float32(D ** -0.5), out), shared_mem=smem)
        return
    if norms is not None and not plan.norm_rope_inside or (plan.query_heads or plan.group_heads) and norms is None:
        raise ValueError("attention.cu normalises and rotates the keys itself under a plan that says so, and only then")
    qkv, q_norm, k_norm, inv_freq = norms or (NULL,) * 4
    if plan.query_heads or plan.group_heads:
        G = Hq // Hkv
        name, grid, smem = ((f"attention_group<{D}, {G}>", (plan.splits, Hkv, T), 4 * (BLOCK // 32) * G * D)
                            if plan.group_heads else (f"attention_heads<{D}>", (plan.splits, Hq, T), 0))
        kernel("attention.cu", name)(
            grid, (BLOCK,),
            (qkv, i32(Hq), i32(Hkv), k_caches, v_caches, plan.tok_seq, plan.tok_pos, i32(plan.chunk),
             np.float32(D ** -0.5), q_norm, k_norm, np.float32(c.rms_norm_eps), inv_freq, b.part_acc, b.part_m,
             b.part_l, b.arrivals, out), shared_mem=smem)
        return
    attention = kernel("attention.cu", f"attention<{1 if D <= 128 else 2}, {'false' if norms is None else 'true'}>")
    attention((plan.splits, Hkv, plan.tile_seq.shape[0]), (BLOCK,),
              (b.q, i32(Hq), i32(Hkv), i32(D), k_caches, v_caches, plan.tile_seq, plan.tile_row, plan.tile_rows,
               plan.tok_pos, i32(T), i32(plan.chunk), np.float32(D ** -0.5), b.part_acc, b.part_m, b.part_l,
               b.arrivals, out, qkv, q_norm, k_norm, np.float32(c.rms_norm_eps), inv_freq),
              shared_mem=plan.shared_bytes(c))


# ---- the backend interface (see qwen3moe/backends.py) ----------------------------------------------------------------

def embed_into(s: State, ids: cp.ndarray, x: cp.ndarray) -> None:
    kernel("linear.cu", f"embed<{s.wtype}>")((ids.shape[0],), (BLOCK,), (ids, s.embed_tokens, i32(x.shape[1]), x))


def embed(s: State, token_ids: np.ndarray) -> cp.ndarray:
    ids = cp.asarray(np.asarray(token_ids, dtype=np.int64))
    x = cp.empty((ids.shape[0], s.config.hidden_size), cp.float32)  # (T, H)
    embed_into(s, ids, x)
    return x


def cache_addresses(segments: list[AttentionSegment]) -> tuple[cp.ndarray, cp.ndarray]:
    for seg in segments:
        if not isinstance(seg.k_cache, cp.ndarray):
            raise TypeError("the cupy backend needs KV caches in GPU memory; create them with "
                            "Qwen3MoeKVCache(model) (or KVCache(config, n, xp=cupy))")
    addresses = lambda caches: cp.asarray(np.array([c.data.ptr for c in caches], dtype=np.uint64))
    return addresses([g.k_cache for g in segments]), addresses([g.v_cache for g in segments])


def attention_block(s: State, i: int, x: cp.ndarray, cos, sin, segments: list[AttentionSegment]) -> cp.ndarray:
    """x + self_attn(input_layernorm(x)); positions come from the segments (RoPE is computed on the device)."""
    plan = AttentionPlan.build(s.config, [(g.start, g.stop, g.pos) for g in segments],
                               max(g.pos + g.stop - g.start for g in segments))
    y = x.copy()
    attention_into(s, s.layers[i], y, plan, *cache_addresses(segments),
                   AttentionBuffers.empty(x.shape[0], s.config, plan.splits))
    return y


def feed_forward_block(s: State, i: int, x: cp.ndarray, top_k: int,
                       disabled: np.ndarray | None) -> tuple[cp.ndarray, Routing | None]:
    y = x.copy()
    if not s.config.is_moe_layer(i):
        dense_mlp_into(s, s.layers[i], y, DenseBuffers.empty(x.shape[0], s.config))
        return y, None
    b = MoeBuffers.empty(x.shape[0], s.config, top_k)
    moe_into(s, s.layers[i], y, top_k, None if disabled is None else cp.asarray(disabled.astype(np.uint8)), b)
    T = x.shape[0]
    return y, Routing(b.probs, b.topk_ids, b.grouping.pair_weight.reshape(T, top_k))


def lm_head_rows(tokens: int) -> int:
    """Rows of the lm_head a block of linear.cu's GEMV computes for ``tokens`` rows (LM_HEAD_ROWS)."""
    return LM_HEAD_ROWS[1 if tokens == 1 else MAXT[-1]]


def final_logits(s: State, x: cp.ndarray) -> cp.ndarray:
    logits = cp.empty((x.shape[0], s.lm_head.shape[0]), cp.float32)  # (T, V)
    linear(s, cp.ascontiguousarray(x), s.lm_head, logits, norm=s.norm, rows_per_block=lm_head_rows(x.shape[0]))
    return logits


# ---- decoding as one CUDA graph per step -----------------------------------------------------------------------------

ARGMAX_BLOCKS = 256  # blocks of the argmax over the vocabulary, shared among the rows of a batch
SAMPLE_THREADS = 1024  # threads of a sample_rows block
# sampling.cu's CANDIDATE_BLOCKS and CANDIDATES (the two must agree): topk_candidates' blocks a row, and the
# candidates of a row at most; and TEAM_WORDS, the words of a row's team of sample_rows blocks
CANDIDATE_BLOCKS, CANDIDATES, TEAM_WORDS = 64, 4096, 2 + 3 * 256
SAMPLE_TEAM_MAX = 32  # sample_rows blocks a row at most


def sample_team(rows: int) -> int:
    """sample_rows' blocks a row: a row that keeps more than 64 tokens is read by that many blocks, which meet at
    barriers and so must all be resident at once; so at most one block of 1024 threads per multiprocessor in all."""
    return max(1, min(SAMPLE_TEAM_MAX, device_limits()[1] // rows))


def sampling_work(rows: int) -> tuple:
    """draw_next_tokens' workspace for ``rows`` rows: each row's candidates, its non-finite flag and its team's words
    (both 0 between calls)."""
    return cp.empty((rows, CANDIDATES), cp.uint64), cp.zeros(rows, cp.int32), cp.zeros((rows, TEAM_WORDS), cp.uint64)


def draw_next_tokens(logits: cp.ndarray, V: int, settings: tuple, uniform: cp.ndarray, next_id: cp.ndarray,
                     tok_pos: cp.ndarray, sampled: cp.ndarray, work: tuple, team: int | None = None) -> None:
    """Each row of ``logits`` (its first V entries) -> its next token, drawn as the reference sampler draws it from
    uniform[row] (sampling.cu): where the row keeps at most 64 tokens or is greedy, topk_candidates' 64 blocks first
    find each part's top-k and one block of sample_rows draws from them; other rows are read by ``team`` blocks of
    sample_rows (None: sample_team(rows)). ``settings``: (temperature, topk, topp) per row on the device; the token
    goes to next_id[row] and sampled[row], tok_pos[row] advances, and sampled[rows] becomes 1 where a logit is NaN
    or +Inf. ``work``: sampling_work(rows)."""
    B, stride = logits.shape[0], logits.shape[1]
    team = team or sample_team(B)
    if team > 1 and B * team > device_limits()[1]:  # the teams' barriers would wait for blocks that cannot start
        raise ValueError(f"{B} rows x {team} blocks a row is more than this GPU's {device_limits()[1]} "
                         f"multiprocessors; ask for at most {max(1, device_limits()[1] // B)} blocks a row")
    temperature, topk, topp = settings
    candidates, non_finite_rows, team_words = work
    kernel("sampling.cu", "topk_candidates")(
        (B, CANDIDATE_BLOCKS), (256,), (logits, i32(V), i32(stride), temperature, topk, candidates, non_finite_rows))
    kernel("sampling.cu", "sample_rows")(
        (B, team), (SAMPLE_THREADS,),
        (logits, i32(V), i32(stride), temperature, topk, topp, uniform, candidates, non_finite_rows, team_words,
         next_id, tok_pos, sampled, sampled[B:]))


class BatchDecoder:
    """Decoding of B sequences with the host out of the loop, each greedy or sampled.

    A whole decode step -- embedding, every layer, lm_head and the choice of each row's next token -- is captured
    once as a CUDA graph and replayed for every step. What changes from step to step lives in device memory and is
    advanced by the step itself (sampling.cu): each sequence's input token id and its position. The attention grid is
    sized for the largest cache, and blocks past a sequence's current length return at once. Router statistics are
    counted on the device too (``flush_stats``). Per step the host only reads the B chosen ids back, and, where a row
    samples, writes the uniform number its draw uses (into pinned memory that the graph copies from).

    ``caches[j]`` must already hold positions [0, positions[j]); ``tokens[j]`` is sequence j's input at that
    position. Each sequence may stop at the end of its own cache: ``step`` refuses a step once any cache is full.
    ``sampling``: None (every row greedy), or per row (temperature, topk, topp, rng) as the reference sampler takes
    them (qwen3moe/sampling.py); each step takes one ``rng.random()`` from every row that samples, as ``sample``
    does, so a seeded task draws the same tokens as through the model loop.

    On one rank of a split model (``comm``: its NCCL communicator, fastpath/nccl_comm.py) the graph holds the
    collectives too: an all-reduce of the hidden state after attention and after the MLP/MoE block of every layer
    (``reduce_over_ranks``: on one machine a kernel that also sums the MoE block's picks and normalises the result
    for the block after), and, to choose the tokens, an all-gather of every rank's best candidates from its rows of
    the vocabulary (greedy) or of its logits (sampling; rank 0's uniform numbers are broadcast, the other ranks pass
    ``rng`` None). Every rank replays its graph in lockstep and picks the same tokens.
    """

    SHARDS = True  # takes ``comm``: runs one rank of a split model

    def __init__(self, s: State, caches: list, positions: list[int], tokens: list[int], sampling: list | None = None,
                 comm=None):
        c, B = s.config, len(caches)
        self.s, self.comm, self.steps = s, comm, 0
        if c.vocab_size >= 1 << 24:
            raise ValueError(f"vocab_size {c.vocab_size} is too large for the sampling kernel (ids below 2^24)")
        self.sampling = sampling
        if sampling is not None:  # (B,) settings per row, and the uniform numbers: the host's, then the device's
            temperature, topk, topp, rngs = zip(*sampling)
            self.draws = [(j, rng) for j, (t, k, rng) in enumerate(zip(temperature, topk, rngs))
                          if rng is not None and not is_greedy(t, k)]  # the rows whose generator step() reads
            self.settings = (cp.asarray(np.array(temperature, np.float32)), cp.asarray(np.array(topk, np.int32)),
                             cp.asarray(np.array(topp, np.float32)))
            self.host_uniform = cp.cuda.alloc_pinned_memory(4 * B)
            np.frombuffer(self.host_uniform, np.float32, B)[:] = 0
            self.uniform = cp.zeros(B, cp.float32)
            self.sampling_work = sampling_work(B)
        self.capacities, self.positions, self.first_tokens = [k.capacity for k in caches], list(positions), tokens
        self.ids = cp.zeros(B, cp.int64)
        self.plan = AttentionPlan.build(c, [(j, j + 1, p) for j, p in enumerate(positions)], max(self.capacities),
                                        tensor_cores=False)
        address = lambda arrays: cp.asarray(np.array([a.data.ptr for a in arrays], np.uint64))
        self.k_caches = [address([k.k[i] for k in caches]) for i in range(c.num_hidden_layers)]
        self.v_caches = [address([k.v[i] for k in caches]) for i in range(c.num_hidden_layers)]
        self.x, self.xn = cp.empty((B, c.hidden_size), cp.float32), cp.empty((B, c.hidden_size), cp.float32)
        self.attn = AttentionBuffers.empty(B, c, self.plan.splits)
        self.moe = MoeBuffers.empty(B, c, c.num_experts_per_tok)
        self.dense = DenseBuffers.empty(B, c)
        self.logits = cp.empty((B, s.lm_head.shape[0]), cp.float32)
        self.blocks = max(8, ARGMAX_BLOCKS // B)  # argmax blocks per row
        self.part_val = cp.empty((B, self.blocks), cp.float32)
        self.part_idx = cp.empty((B, self.blocks), cp.int32)
        self.best_val, self.best_idx = self.part_val, self.part_idx  # the best candidates of every rank
        if comm:
            self.best_val = cp.empty((comm.ndev, B, self.blocks), cp.float32)
            self.best_idx = cp.empty((comm.ndev, B, self.blocks), cp.int32)
            if sampling is not None:  # every rank's logits, each padded to the widest rank's rows of the vocabulary
                width = math.ceil(c.vocab_size / comm.ndev)
                self.padded = cp.zeros((B, width), cp.float32)
                self.whole = cp.empty((comm.ndev, B, width), cp.float32)  # as gathered
                self.joined = cp.empty((B, comm.ndev, width), cp.float32)  # each row whole, padding after each rank's
        self.sampled = cp.zeros(B + 1, cp.int32)  # the tokens, and a flag for non-finite logits
        self.host = cp.cuda.alloc_pinned_memory(4 * (B + 1))
        E = c.num_experts
        self.stats = {i: (cp.zeros(E, cp.uint64), cp.zeros(E, cp.float64), cp.zeros(1, cp.float64))
                      for i in c.moe_layers}
        self.stream = cp.cuda.Stream(non_blocking=True)
        cp.cuda.Device().synchronize()  # the prefill (on the default stream) has filled the caches
        with self.stream:
            self._step()  # compiles and loads every kernel; writes the same keys and values a replay will
            self._reset()
            self.stream.begin_capture()
            self._step()
            self.graph = self.stream.end_capture()
            self._reset()

    def _reset(self) -> None:
        self.ids.set(np.asarray(self.first_tokens, np.int64))
        self.plan.tok_pos.set(np.asarray(self.positions, np.int32))
        self.sampled.fill(0)
        for arrays in self.stats.values():
            for a in arrays:
                a.fill(0)

    def _step(self) -> None:
        s, c, comm = self.s, self.s.config, self.comm
        embed_into(s, self.ids, self.x)
        normed = False  # whether the all-reduce ahead wrote the next block's normalised input
        # on a split model a batch-1 MLP block sums its picks into x in its down kernel (expert_down_sum); larger
        # batches leave them to the all-reduce (moe_combine's work in the peer kernel)
        apart = comm is not None and self.x.shape[0] > 1
        for i, layer in enumerate(s.layers):
            attention_into(s, layer, self.x, self.plan, self.k_caches[i], self.v_caches[i], self.attn, normed)
            mlp = self.moe if c.is_moe_layer(i) else self.dense
            if comm:
                normed = reduce_over_ranks(s, comm, self.x, (layer.post_norm, mlp.xn))
            if c.is_moe_layer(i):
                moe_into(s, layer, self.x, c.num_experts_per_tok, None, self.moe, self.stats[i], normed, not apart)
            else:
                dense_mlp_into(s, layer, self.x, self.dense, normed, not apart)
            if comm:
                last = i + 1 == len(s.layers)
                after = (s.norm, self.xn) if last else (s.layers[i + 1].input_norm, self.attn.xn)
                normed = reduce_over_ranks(s, comm, self.x, after, picks=mlp if apart else None)
        if normed:
            linear(s, self.xn, s.lm_head, self.logits, rows_per_block=lm_head_rows(self.x.shape[0]))
        else:
            linear(s, self.x, s.lm_head, self.logits, norm=s.norm, rows_per_block=lm_head_rows(self.x.shape[0]),
                   scratch=self.xn)
        if self.sampling is None:
            self._choose_greedy()
        else:
            self._choose_sampled()

    def _choose_greedy(self) -> None:
        """Each row's argmax: the best of each block's share of the vocabulary (and on a split model of each rank's
        rows), then the best of those."""
        s, B = self.s, self.ids.shape[0]
        kernel("sampling.cu", "argmax_partial")(
            (self.blocks, B), (BLOCK,), (self.logits, i32(self.logits.shape[1]), i32(s.first_vocab_row),
                                         self.part_val, self.part_idx, self.sampled[B:]))
        ranks = 1
        if self.comm:
            self.comm.all_gather_into(self.part_val, self.best_val)
            self.comm.all_gather_into(self.part_idx, self.best_idx)
            self.comm.all_reduce(self.sampled[B:])  # non-finite logits on any rank
            ranks = self.comm.ndev
        kernel("sampling.cu", "greedy_advance")(
            (B,), (32,), (self.best_val, self.best_idx, i32(self.blocks), i32(B), i32(ranks), self.ids,
                          self.plan.tok_pos, self.sampled))

    def _choose_sampled(self) -> None:
        """Each row's token from its whole row of logits (gathered from every rank on a split model) and the uniform
        number the host wrote for it."""
        B, V = self.ids.shape[0], self.s.config.vocab_size
        logits = self.logits
        if self.comm is None or self.comm.rank == 0:
            cp.cuda.runtime.memcpyAsync(self.uniform.data.ptr, self.host_uniform.ptr, 4 * B,
                                        cp.cuda.runtime.memcpyHostToDevice, cp.cuda.get_current_stream().ptr)
        if self.comm:
            self.comm.broadcast(self.uniform)
            part = self.logits
            if part.shape[1] < self.padded.shape[1]:  # the last rank holds fewer rows of the vocabulary
                self.padded[:, :part.shape[1]] = part
                part = self.padded
            self.comm.all_gather_into(part, self.whole)
            cp.copyto(self.joined, self.whole.transpose(1, 0, 2))
            logits = self.joined.reshape(B, -1)  # ids past the last rank's rows are never read
        draw_next_tokens(logits, V, self.settings, self.uniform, self.ids, self.plan.tok_pos, self.sampled,
                         self.sampling_work)

    def step(self) -> list[int]:
        """Decode one token of every sequence: the greedy successor of its previous one (the first time: of its
        ``tokens`` entry)."""
        for pos, capacity in zip(self.positions, self.capacities):
            if pos >= capacity:
                raise ValueError(f"the KV cache is full ({capacity} positions)")
        B = len(self.positions)
        if self.sampling is not None:
            uniform = np.frombuffer(self.host_uniform, np.float32, B)
            for j, rng in self.draws:
                uniform[j] = rng.random()
        self.graph.launch(self.stream)
        cp.cuda.runtime.memcpyAsync(self.host.ptr, self.sampled.data.ptr, 4 * (B + 1),
                                    cp.cuda.runtime.memcpyDeviceToHost, self.stream.ptr)
        if self.comm:
            self.comm.wait(self.stream)  # watching the other ranks meanwhile
        else:
            self.stream.synchronize()
        sampled = np.frombuffer(self.host, np.int32, B + 1)
        if sampled[B]:
            raise NonFiniteError("the logits contain NaN or +Inf; run with debug=True (--debug) to find the layer "
                                 "and tensor where they first appear")
        self.positions = [p + 1 for p in self.positions]
        self.steps += 1
        return sampled[:B].tolist()

    def flush_stats(self, stats: RouterStats) -> None:
        """Add the routing counted on the device since the last flush to ``stats``."""
        if self.steps == 0:  # nothing counted (reading the counters back would cost a copy per layer)
            return
        tokens = self.steps * len(self.positions)
        for i, (counts, prob_sum, entropy) in self.stats.items():
            stats.add(i, counts.get().astype(np.int64), tokens, float(entropy.get()[0]), prob_sum.get())
            for a in (counts, prob_sum, entropy):
                a.fill(0)
        self.steps = 0


class GreedyDecoder(BatchDecoder):
    """Greedy decoding of one sequence (what ``generate`` uses after the prefill): ``BatchDecoder`` with B = 1.
    ``cache`` must already hold positions [0, pos); ``token`` is the input at ``pos``."""

    def __init__(self, s: State, cache, pos: int, token: int, comm=None):
        super().__init__(s, [cache], [pos], [token], comm=comm)

    def step(self) -> int:
        """Decode one token: the greedy successor of the previous one (the first time: of ``token``)."""
        return super().step()[0]
