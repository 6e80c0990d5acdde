"""Kernel ladders: ``python -m fastpath.ladder [moe_gemv|moe_down|lm_head|attention|attention_short|attention_long|
router|batch_projection|attention_prefill|prefill_projection ...]``.

In the style of llm.c's dev/cuda: for each central kernel of batch-1 decode, a naive first version and then each
optimisation on its own (``fastpath/cuda/ladder/*.cu``, each with a comment saying what it improves), ending with the
kernel the backend really runs; for a small batch's projections and for prefill attention, the CUDA-core kernel
against the tensor-core ones; for a prefill's projections, small tiles against the production ones. Every version
is checked against a float64 NumPy reference on fresh random inputs (its output poisoned with NaN before it runs)
and timed with CUDA events (median of many runs, inputs rotated so that the weights do not sit in the 50 MB L2
cache), at Qwen3-30B-A3B shapes.
"""

import argparse
import sys
from dataclasses import dataclass
from functools import cache

import cupy as cp
import numpy as np

from qwen3moe.bench import QWEN3_30B_A3B
from qwen3moe.config import config_from_dict

from . import cupy_backend as cb
from .cuda_build import ARCHITECTURE, LADDER_DIR, LADDER_KERNELS, OPTIONS, ArchitectureModule, kernel

CONFIG = config_from_dict(dict(QWEN3_30B_A3B, num_hidden_layers=1))


@cache
def ladder_kernel(file: str, name: str):
    if file in ARCHITECTURE:  # written for one architecture (wgmma: sm_90a)
        return ArchitectureModule(LADDER_DIR / file, LADDER_KERNELS[file]).get_function(name)
    return cp.RawModule(code=(LADDER_DIR / file).read_text(), options=(*OPTIONS, f"-I{LADDER_DIR}"),
                        name_expressions=LADDER_KERNELS[file]).get_function(name)


def random_bf16(*shape, scale=0.02) -> cp.ndarray:
    """Random bf16 weights as uint16 bits (rounded toward zero from float32 normals)."""
    return ((cp.random.standard_normal(shape, dtype=cp.float32) * scale).view(cp.uint32) >> 16).astype(cp.uint16)


def widen(bits: cp.ndarray) -> np.ndarray:
    return (bits.get().astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def median_us(launch, rounds: int = 50) -> float:
    """Median GPU time of one call of ``launch(i)`` (i: the round, to rotate inputs), after a warm-up.

    All rounds are queued behind a kernel that holds the GPU (fastpath/cupy_bench.py: HOLD), so the events time the
    GPU alone, not the host's launch overhead -- which would otherwise dominate the small kernels."""
    from .cupy_bench import HOLD

    for i in range(3):
        launch(i)
    cp.RawKernel(HOLD, "hold")((1,), (1,), (np.uint64(100_000_000),))
    events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(rounds)]
    for i, (start, end) in enumerate(events):
        start.record()
        launch(i)
        end.record()
    events[-1][1].synchronize()
    return float(np.median([cp.cuda.get_elapsed_time(start, end) * 1e3 for start, end in events]))


def relative_error(ours: cp.ndarray, ref: np.ndarray) -> float:
    got = ours.get().astype(np.float64)
    if not np.isfinite(got).all():
        return float("nan")  # an output element was never written (it still holds the poison) or overflowed
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@dataclass
class Row:
    version: str
    why: str
    us: float
    error: float
    amount: float  # bytes the version must read, or floating-point operations (see the ladder's unit)


UNITS = {"GB/s": 1e3, "TFLOP/s": 1e6}  # amount per microsecond -> unit


def report(title: str, rows: list[Row], unit: str) -> None:
    print(f"\n{title}")
    print(f"{'version':<8} {'time us':>9} {unit:>7} {'rel error':>10}  what it improves")
    for r in rows:
        print(f"{r.version:<8} {r.us:>9.1f} {r.amount / r.us / UNITS[unit]:>7.0f} {r.error:>10.1e}  {r.why}")


def ladder_moe_gemv() -> list[Row]:
    c = CONFIG
    E, I, H, K = c.num_experts, c.moe_intermediate_size, c.hidden_size, c.num_experts_per_tok
    gate_up = random_bf16(E, 2 * I, H)  # (E, 2I, H): gate rows then up rows, as the backend holds them
    up = np.uint64(gate_up.data.ptr + I * H * 2)
    x = cp.random.standard_normal(H, dtype=cp.float32)
    choices = [cp.asarray(np.random.default_rng(i).choice(E, K, replace=False).astype(np.int32)) for i in range(8)]
    experts = choices[0].get()
    w = widen(gate_up[cp.asarray(experts)])  # (K, 2I, H) float64
    g, u = w[:, :I] @ x.get().astype(np.float64), w[:, I:] @ x.get().astype(np.float64)
    ref = g / (1 + np.exp(-g)) * u  # (K, I)
    act = cp.empty((K, I), cp.float32)
    stride = np.int64(2 * I * H)
    nbytes = K * 2 * I * H * 2
    versions = {
        "v1": ("one thread per row: uncoalesced", lambda ex: ladder_kernel("moe_gemv.cu", "moe_gemv_v1")(
            (I // 256 + 1, K), (256,), (x, gate_up, up, stride, ex, np.int32(H), np.int32(I), act))),
        "v2": ("one warp per row: coalesced 2-byte loads, shuffle reduction", lambda ex: ladder_kernel(
            "moe_gemv.cu", "moe_gemv_v2")((I // 8, K), (256,), (x, gate_up, up, stride, ex, np.int32(H), np.int32(I),
                                                                act))),
        "v3": ("16-byte loads: 8 bf16 per lane per load", lambda ex: ladder_kernel("moe_gemv.cu", "moe_gemv_v3")(
            (I // 8, K), (256,), (x, gate_up, up, stride, ex, np.int32(H), np.int32(I), act))),
    }
    offsets, zeros, n = cp.arange(K + 1, dtype=cp.int32), cp.zeros(K, cp.int32), cp.asarray([K], cp.int32)
    per_block = cb.GATE_UP_ROWS[1]  # rows
    versions["v4"] = ("production: gate and up rows together, 8 packs in flight per lane, x as float4, two rows a "
                      "warp (moe.cu)", lambda ex: kernel("moe.cu", "expert_gate_up<bf16_t, 1>")(
                          (I // per_block, K), (256,), (x[None], np.int32(H), gate_up, up, stride, np.int32(I),
                                                   np.int32(per_block), ex, offsets, zeros, n, act)))
    rows = []
    for name, (why, run) in versions.items():
        act.fill(np.nan)
        run(choices[0])
        error = relative_error(act, ref)
        rows.append(Row(name, why, median_us(lambda i: run(choices[i % len(choices)])), error, nbytes))
    return rows


def ladder_moe_down() -> list[Row]:
    """The experts' down product at one token and the weighted sum of the picks: x = sum_k w_k down_k @ act_k (the
    residual add left out, so that every run writes the same x)."""
    c = CONFIG
    E, I, H, K = c.num_experts, c.moe_intermediate_size, c.hidden_size, c.num_experts_per_tok
    down = random_bf16(E, H, I)  # (E, H, I)
    act = cp.random.standard_normal((K, I), dtype=cp.float32)  # (K, I) SiLU(gate) * up of each pick
    rng = np.random.default_rng()
    weight = cp.asarray(rng.dirichlet(np.ones(K)).astype(np.float32))  # (K,) the picks' routing weights
    choices = [cp.asarray(np.random.default_rng(i).choice(E, K, replace=False).astype(np.int32)) for i in range(8)]
    w = widen(down[choices[0]])  # (K, H, I) float64
    ref = np.einsum("k,khi,ki->h", weight.get().astype(np.float64), w, act.get().astype(np.float64))  # (H,)
    offsets, picks, n = cp.arange(K + 1, dtype=cp.int32), cp.arange(K, dtype=cp.int32), cp.asarray([K], cp.int32)
    out, x = cp.empty((K, H), cp.float32), cp.empty((1, H), cp.float32)
    stride, rows = np.int64(H * I), cb.DOWN_SUM_ROWS

    def apart(ex):
        kernel("moe.cu", "expert_down<bf16_t, 1>")(
            (H // 8, K), (256,), (act, np.int32(I), down, stride, np.int32(H), np.int32(8), ex, offsets, picks,
                                  weight, n, out))
        kernel("moe.cu", "moe_combine")((H // 256,), (256,), (x, out, np.int32(1), np.int32(H), np.int32(K),
                                                             np.int32(0), cb.NULL, np.int32(0), np.int32(E)))

    versions = {
        "v1": ("a warp per output row of one pick, 8 rows a block (expert_down), each pick's output to memory; then "
               "moe_combine adds them: two launches", apart),
        "v2": ("production: one launch; a warp per pick computes a block's 8 rows at once (they share the pick's "
               "input), the block adds the picks (expert_down_sum)", lambda ex: kernel(
                   "moe.cu", f"expert_down_sum<bf16_t, {rows}>")(
                       (H // rows,), (256,), (act, np.int32(I), down, stride, np.int32(H), ex, picks, weight, n,
                                              np.int32(0), x), shared_mem=4 * K * rows)),
    }
    result = []
    for name, (why, run) in versions.items():
        x.fill(np.nan)
        run(choices[0])
        error = relative_error(x[0], ref)
        result.append(Row(name, why, median_us(lambda i: run(choices[i % len(choices)])), error, K * H * I * 2))
    return result


def ladder_lm_head() -> list[Row]:
    """The lm_head at one token, logits = lm_head @ RMSNorm(x): the vocabulary-sized GEMV that ends every decode step
    (the largest matrix a step reads; one of 622 MB needs no rotation to stay out of L2)."""
    c = CONFIG
    V, H, eps = c.vocab_size, c.hidden_size, c.rms_norm_eps
    w = random_bf16(V, H)  # (V, H)
    x = cp.random.standard_normal((1, H), dtype=cp.float32)  # (1, H)
    g = cp.asarray(np.random.default_rng().uniform(0.5, 1.5, H).astype(np.float32))  # (H,) the final norm's weight
    x64 = x.get()[0].astype(np.float64)
    ref = widen(w) @ (x64 / np.sqrt(np.mean(x64 ** 2) + eps) * g.get())  # (V,)
    logits = cp.empty((1, V), cp.float32)
    state = cb.State(c, "bf16_t", None, [], None, None, None)

    def gemv(rows):
        return lambda i: kernel("linear.cu", "linear<bf16_t, 1>")(
            ((V + rows - 1) // rows, 1), (256,), (x, np.int32(1), np.int32(H), g, np.float32(eps), w, np.int32(V),
                                          np.int32(rows), cb.NULL, logits))

    versions = {"v1": ("a warp per row, 8 packs a lane in flight, the norm fused; 8 rows a block (linear)", gemv(8)),
                "v2": (f"{cb.LM_HEAD_ROWS[1]} rows a block: fewer blocks to schedule, each warp's rows one after the "
                       "other (linear, before Hopper)", gemv(cb.LM_HEAD_ROWS[1]))}
    if cb.streamed("bf16_t", H, V):
        versions["v3"] = ("production on Hopper: a block a multiprocessor, each warp's next rows streamed into shared "
                          "memory by the copy engine (linear_streamed)",
                          lambda i: cb.linear(state, x, w, logits, norm=g))
    rows = []
    for name, (why, run) in versions.items():
        logits.fill(np.nan)
        run(0)
        rows.append(Row(name, why, median_us(run, rounds=20), relative_error(logits[0], ref), V * H * 2))
    return rows


def ladder_attention(L: int = 8192) -> list[Row]:
    c = CONFIG
    Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    caches = [(cp.random.standard_normal((L, Hkv, D), dtype=cp.float32),
               cp.random.standard_normal((L, Hkv, D), dtype=cp.float32)) for _ in range(3)]
    q = cp.random.standard_normal((1, Hq, D), dtype=cp.float32)
    k, v = (a.get().astype(np.float64) for a in caches[0])
    qh = q.get()[0].astype(np.float64)  # (Hq, D)
    kv_of = np.arange(Hq) // (Hq // Hkv)
    scores = np.einsum("hd,lhd->hl", qh, k[:, kv_of]) / np.sqrt(D)  # (Hq, L)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    ref = np.einsum("hl,lhd->hd", p / p.sum(axis=1, keepdims=True), v[:, kv_of])  # (Hq, D)
    out = cp.empty((Hq, D), cp.float32)
    scratch = cp.empty((Hq, L), cp.float32)
    nbytes = 2 * L * Hkv * D * 4
    addr = lambda a: cp.asarray(np.array([a.data.ptr], np.uint64))
    addresses = [(addr(kc), addr(vc)) for kc, vc in caches]

    def old_kernels(split: bool):  # v2 and v3: attention_v2 over one split or many, then attention_v3_combine
        plan = cb.AttentionPlan.build(c, [(0, 1, L - 1)], L, query_heads=False, group_heads=False)
        if not split:
            plan.splits, plan.chunk = 1, L
        b = cb.AttentionBuffers.empty(1, c, plan.splits)
        b.q[...] = q
        smem = 4 * (cb.MAX_ATTENTION_ROWS * D + 32 * (2 * D + 1))
        attention = ladder_kernel("attention_decode.cu", "attention_v2")
        attention.max_dynamic_shared_size_bytes = smem

        def run(i):
            k_cache, v_cache = addresses[i % 3]
            attention((plan.splits, Hkv, 1), (256,), (b.q, np.int32(Hq), np.int32(Hkv), np.int32(D), k_cache,
                                                      v_cache, plan.tile_seq, plan.tile_row, plan.tile_rows,
                                                      plan.tok_pos, np.int32(1), np.int32(plan.chunk),
                                                      np.float32(D ** -0.5), b.part_acc, b.part_m, b.part_l),
                      shared_mem=smem)
            ladder_kernel("attention_decode.cu", "attention_v3_combine")(
                (1, Hq), (D,), (b.part_acc, b.part_m, b.part_l, np.int32(plan.splits), np.int32(1), np.int32(Hq),
                                np.int32(D), b.attn))
        return b, run

    plan = cb.AttentionPlan.build(c, [(0, 1, L - 1)], L, query_heads=False, group_heads=False)
    b4 = cb.AttentionBuffers.empty(1, c, plan.splits)
    b4.q[...] = q
    b2, run2 = old_kernels(False)
    b3, run3 = old_kernels(True)
    versions = {
        "v1": ("a block per query head, scores via global memory", out, lambda i: ladder_kernel(
            "attention_decode.cu", "attention_v1")((Hq,), (256,), (q, caches[i % 3][0], caches[i % 3][1],
                                                                    np.int32(Hq), np.int32(Hkv), np.int32(D),
                                                                    np.int32(L), scratch, out))),
        "v2": ("a block per kv head: K/V read once for G heads, online softmax", b2.attn, run2),
        "v3": (f"keys split over {b3.part_m.shape[0]} blocks per head, then a merge kernel", b3.attn, run3),
        "v4": (f"production: {plan.splits} splits, the next stage in flight via cp.async, unpredicated row loops, "
               "the last block merges", b4.attn, lambda i: cb.attend(c, plan, *addresses[i % 3], b4)),
    }
    rows = []
    for name, (why, result, run) in versions.items():
        result.fill(np.nan)
        run(0)
        error = relative_error(result.reshape(Hq, D), ref)
        rows.append(Row(name, why, median_us(run), error, nbytes))
    return rows


def ladder_attention_short(L: int = 1024) -> list[Row]:
    """The whole attention step of one new token at the end of a cache of L positions: its q/k RMSNorm, RoPE and
    cache write, then its attention over the L keys -- the three production kernels of a decoding step do all of it,
    from the q/k/v projection's output. v4 has a block per (split, kv head), each lane a whole 128-long dot product
    (what steps of several tokens a sequence still take); over a short cache that is a chain of dependent steps
    rather than bytes. v5 has a block per (split, query head), 8 lanes a key: G = 8 times the blocks, but also G
    times the reads of each key (from L2 after the first), which over long caches cost more than they save. v6 has a
    block per (split, kv head) again, a lane 4 elements of each key and query, each key scored for the G query heads
    at once."""
    c = CONFIG
    Hq, Hkv, D, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    caches = [(cp.random.standard_normal((L, Hkv, D), dtype=cp.float32),
               cp.random.standard_normal((L, Hkv, D), dtype=cp.float32)) for _ in range(3)]
    qkv = cp.random.standard_normal((1, (Hq + 2 * Hkv) * D), dtype=cp.float32)
    q_norm, k_norm = (1 + 0.1 * cp.random.standard_normal(D, dtype=cp.float32) for _ in range(2))
    norms = (qkv, q_norm, k_norm, cb.rope_inv_freq(c))

    # the angles rounded to float32 as the model defines them (position x float32 frequency), the rest in float64
    angles = (np.float32(L - 1) * norms[3].get()).astype(np.float64)
    cos, sin = np.tile(np.cos(angles), 2), np.tile(np.sin(angles), 2)

    def norm_rope(x, weight):  # (heads, D): RMSNorm over D, then RoPE at position L - 1 (rotate-half form)
        x = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * weight.get()
        return x * cos + np.concatenate([-x[:, D // 2:], x[:, :D // 2]], axis=1) * sin

    raw = qkv.get()[0].astype(np.float64)
    q = norm_rope(raw[:Hq * D].reshape(Hq, D), q_norm)
    k, v = (a.get().astype(np.float64) for a in caches[0])
    k[L - 1] = norm_rope(raw[Hq * D:(Hq + Hkv) * D].reshape(Hkv, D), k_norm)
    v[L - 1] = raw[(Hq + Hkv) * D:].reshape(Hkv, D)
    kv_of = np.arange(Hq) // (Hq // Hkv)
    scores = np.einsum("hd,lhd->hl", q, k[:, kv_of]) / np.sqrt(D)  # (Hq, L)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    ref = np.einsum("hl,lhd->hd", p / p.sum(axis=1, keepdims=True), v[:, kv_of])  # (Hq, D)
    addr = lambda a: cp.asarray(np.array([a.data.ptr], np.uint64))
    addresses = [(addr(kc), addr(vc)) for kc, vc in caches]

    versions = {}
    for name, query_heads, group_heads, why in (
            ("v4", False, False, "attention: a block per (split, kv head), {} x {} blocks, a lane per key, the new key "
                                 "normalised, rotated and written by its split's block"),
            ("v5", True, False, "production over short caches (attention_heads): a block per (split, query head), {} "
                                "x {} blocks, 8 lanes a key (4 keys a warp at once, each warp its own online softmax), "
                                "every block of the new key's split computes it"),
            ("v6", False, True, "production over long caches (attention_group): a block per (split, kv head), {} x {} "
                                "blocks, each key read once for its 8 query heads: a lane's 4 elements of it against "
                                "theirs, then one reduce-scatter over the warp for 4 keys x 8 heads")):
        plan = cb.AttentionPlan.build(c, [(0, 1, L - 1)], L, query_heads=query_heads, group_heads=group_heads)
        if not plan.norm_rope_inside:  # (attention over long caches leaves that to qk_norm_rope_cache: "attention")
            continue
        b = cb.AttentionBuffers.empty(1, c, plan.splits)
        versions[name] = (why.format(plan.splits, Hq if query_heads else Hkv), b,
                          lambda i, plan=plan, b=b: cb.attend(c, plan, *addresses[i % 3], b, norms=norms))
    rows = []
    for name, (why, b, run) in versions.items():
        b.attn.fill(np.nan)
        run(0)
        error = relative_error(b.attn.reshape(Hq, D), ref)  # before the timing's runs over the other caches
        rows.append(Row(name, why, median_us(run), error, 2 * L * Hkv * D * 4))
    return rows


def ladder_router() -> list[Row]:
    c = CONFIG
    E, H, K = c.num_experts, c.hidden_size, c.num_experts_per_tok
    gates = [random_bf16(E, H) for _ in range(8)]
    norm = cp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, H).astype(np.float32))
    x = cp.random.standard_normal((1, H), dtype=cp.float32)
    xn = x.get()[0].astype(np.float64) * norm.get() / np.sqrt(np.mean(x.get().astype(np.float64) ** 2) + c.rms_norm_eps)
    logits = widen(gates[0]) @ xn
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:K]
    ref = probs[top] / probs[top].sum()
    ids, weights = cp.empty(K, cp.int32), cp.empty(K, cp.float32)
    state = cb.State(c, "bf16_t", None, [], None, None, None)
    b = cb.MoeBuffers.empty(1, c, K)
    eps = np.float32(c.rms_norm_eps)
    versions = {
        "v1": ("one block, a thread per expert, one thread for top-k", (ids, weights), lambda i: ladder_kernel(
            "router.cu", "router_v1")((1,), (E,), (x, norm, eps, gates[i % 8], np.int32(H), np.int32(E),
                                                   np.int32(K), ids, weights), shared_mem=4 * E)),
        "v2": ("one block, a warp per expert (16-byte loads), warp top-k", (ids, weights), lambda i: ladder_kernel(
            "router.cu", "router_v2")((1,), (256,), (x, norm, eps, gates[i % 8], np.int32(H), np.int32(E),
                                                     np.int32(K), ids, weights), shared_mem=4 * E)),
        "v3": ("GEMV over E/8 blocks, then route_topk (production for more tokens; at batch-1 decode "
               "route_gate_up also computes the picks' gate/up rows)",
               (b.topk_ids, b.grouping.pair_weight),
               lambda i: cb.route(state, gates[i % 8], norm, x, K, None, b)),
    }
    rows = []
    for name, (why, (got_ids, got_w), run) in versions.items():
        got_w.fill(np.nan)
        run(0)
        same = got_ids.get().ravel().tolist() == top.tolist()
        error = relative_error(got_w.ravel(), ref) if same else float("inf")  # inf: it chose other experts
        rows.append(Row(name, why, median_us(run), error, E * H * 2))
    return rows


def ladder_attention_prefill(T: int = 1024) -> list[Row]:
    """Causal attention of a T-token prompt over itself, its keys and values already in the cache."""
    c = CONFIG
    Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = cp.random.standard_normal((T, Hq, D), dtype=cp.float32)
    k, v = (cp.random.standard_normal((T, Hkv, D), dtype=cp.float32) for _ in range(2))
    kv_of = np.arange(Hq) // (Hq // Hkv)
    per_head = lambda a: a.get().astype(np.float64)[:, kv_of].transpose(1, 0, 2)  # (Hq, T, D)
    scores = q.get().astype(np.float64).transpose(1, 0, 2) @ per_head(k).transpose(0, 2, 1) / np.sqrt(D)
    scores[:, np.triu(np.ones((T, T), bool), 1)] = -np.inf  # (Hq, T, T), causal
    p = np.exp(scores - scores.max(axis=2, keepdims=True))
    ref = ((p / p.sum(axis=2, keepdims=True)) @ per_head(v)).transpose(1, 0, 2)  # (T, Hq, D)
    addresses = [cp.asarray(np.array([a.data.ptr], np.uint64)) for a in (k, v)]
    flops = 4 * Hq * D * T * (T + 1) / 2  # two products over the visible (query, key) pairs
    versions = {"v1": (False, "the decode kernel's tiles (4 tokens x 8 heads a block), CUDA cores"),
                "v2": (True, "production: tensor cores, 64 tokens x 2 query heads a block sharing their keys, copied "
                              "by cp.async a block of keys ahead, bf16 hi/lo products (attention_mma.cu)")}
    rows = []
    for name, (tensor_cores, why) in versions.items():
        plan = cb.AttentionPlan.build(c, [(0, T, 0)], T, tensor_cores=tensor_cores)
        b = cb.AttentionBuffers.empty(T, c, plan.splits)
        b.q[...] = q
        run = lambda i, plan=plan, b=b: cb.attend(c, plan, *addresses, b)
        b.attn.fill(np.nan)
        run(0)
        rows.append(Row(name, why, median_us(run, rounds=10), relative_error(b.attn.reshape(T, Hq, D), ref), flops))
    return rows


def ladder_batch_projection(T: int = 8) -> list[Row]:
    """The q/k/v projection of a decode batch of T tokens: the same product on the CUDA cores and on the tensor
    cores two ways (each version is a kernel the backend has; linear_path picks among them by the token count)."""
    c = CONFIG
    N, K = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, c.hidden_size
    ws = [random_bf16(N, K) for _ in range(8)]  # rotated: 168 MB, so a version never finds its weights in L2
    x = cp.random.standard_normal((T, K), dtype=cp.float32)
    ref = x.get().astype(np.float64) @ widen(ws[0]).T  # (T, N)
    out = cp.empty((T, N), cp.float32)
    layer = cb.Layer(*(None,) * 8, router=None)
    layer.qkv, layer.o_proj = ws[0], ws[0]
    state = cb.State(c, "bf16_t", None, [layer], None, None, None)  # for mma_batch.cu's workspace
    i32, null, eps = np.int32, np.uint64(0), np.float32(c.rms_norm_eps)
    versions = {
        "v1": ("CUDA cores: a warp per row, 8 tokens per pass over it (linear.cu)", lambda i: kernel(
            "linear.cu", "linear<bf16_t, 8>")((N // 8, 1), (256,), (x, i32(T), i32(K), null, eps, ws[i % 8], i32(N),
                                                                   i32(8), null, out))),
        "v2": ("tensor cores: weights as the 16-row operand, 8 tokens a block, warps split K (mma_few.cu)",
               lambda i: kernel("mma_few.cu", "mma_few<LINEAR>")(
                   ((T + 7) // 8, N // 32), (128,), (x, i32(K), ws[i % 8], null, np.int64(0), i32(N), i32(T),
                                                    *(null,) * 6, null, out))),
        "v3": ("production: every token in a block, activations split once in shared memory, weights loaded before "
               "the wait, K split over blocks (mma_batch.cu)",
               lambda i: cb.linear(state, x, ws[i % 8], out)),
    }
    assert cb.linear_path(state, T, K, N) == "batch"
    rows = []
    for name, (why, run) in versions.items():
        out.fill(np.nan)
        run(0)
        error = relative_error(out, ref)  # before the timing rounds, which multiply the other weights
        rows.append(Row(name, why, median_us(run), error, N * K * 2))
    return rows


V3_SHARED = 4 * (128 * 40 * 4 + 4 * (256 * 16 + 32))  # ladder/prefill_wgmma.cu: its 4 stages (v3::SHARED)


def ladder_prefill_projection(T: int = 2048) -> list[Row]:
    """The q/k/v projection of a T-token prefill (5120 x 2048 weights), on the tensor cores: 64 x 64 tiles loaded
    through registers (v1), the wide mma.sync tiles (matmul.cu, v2) and, on Hopper, the warpgroup tiles fed by every
    thread (v3) and by a producer warpgroup (wgmma_tiles.cu, v4): the production kernels off and on an H100 / H200;
    and v4 with bf16 activations (v5, precision "bf16"), whose error is against the float64 product of the
    activations it multiplies, rounded to bf16 (against the float32 activations it is ~2e-3)."""
    c = CONFIG
    N, K = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, c.hidden_size
    w = random_bf16(N, K)
    x = cp.random.standard_normal((T, K), dtype=cp.float32)
    ref = x.get().astype(np.float64) @ widen(w).T  # (T, N)
    out = cp.empty((T, N), cp.float32)
    tiles = lambda rows, precision="float32": lambda i: cb.tiles("LINEAR", N, rows, (T + rows - 1) // rows, (
        x, np.int32(K), w, cb.NULL, np.int64(0), np.int32(N), np.int32(T), *(cb.NULL,) * 8, cb.NULL, out, cb.NULL),
        precision=precision)
    references = {}  # the versions that multiply something else than x
    versions = {
        "v1": ("64 x 64 tiles, each 32-wide step loaded through registers, then a barrier (ladder/prefill_tiles.cu)",
               lambda i: ladder_kernel("prefill_tiles.cu", "prefill_tiles_v1")(
                   ((N + 63) // 64, (T + 63) // 64), (128,), (x, np.int32(T), np.int32(K), w, np.int32(N), out))),
        "v2": ("64 x 256 tiles (64 x 64 a warp, mma.sync), a 3-stage cp.async pipeline (matmul.cu)",
               tiles(cb.TILE)),
    }
    if cb.hopper():
        v3 = ladder_kernel("prefill_wgmma.cu", "prefill_wgmma_v3")
        v3.max_dynamic_shared_size_bytes = V3_SHARED
        versions["v3"] = ("wgmma: 128 x 256 tiles, weights read by the tensor cores from shared memory, each step "
                          "issued before the last one's products finish (ladder/prefill_wgmma.cu)",
                          lambda i: v3((N // 256, T // 128), (256,), (x, np.int32(K), w, out, np.int32(N)),
                                       shared_mem=V3_SHARED))
        versions["v4"] = ("a producer warpgroup: weights by the copy engine (TMA, swizzled), activations by cp.async, "
                          "stages handed over by mbarriers, no block-wide barrier (wgmma_tiles.cu)",
                          tiles(cb.WGMMA_TILE))
        versions["v5"] = ("bf16 activations (precision bf16): rounded once (to_bf16, timed too), half the bytes "
                          "staged, read by the tensor cores from shared memory: one product a step instead of two",
                          tiles(cb.WGMMA_TILE, "bf16"))
        bits = x.get().view(np.uint32)  # x rounded to bf16 on the host (to nearest even), independently of to_bf16
        rounded = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).view(np.float32)
        references["v5"] = rounded.astype(np.float64) @ widen(w).T
    rows = []
    for name, (why, run) in versions.items():
        out.fill(np.nan)
        run(0)
        rows.append(Row(name, why, median_us(run, rounds=10), relative_error(out, references.get(name, ref)),
                        2 * T * N * K))
    return rows


LADDERS = {"moe_gemv": ("MoE gate/up GEMV, 8 of 128 experts (50 MB)", ladder_moe_gemv, "GB/s"),
           "moe_down": ("MoE down GEMV and the weighted sum, 8 of 128 experts (25 MB)", ladder_moe_down, "GB/s"),
           "lm_head": ("lm_head at one token: 151936 x 2048 GEMV, the RMSNorm fused (622 MB)", ladder_lm_head, "GB/s"),
           "attention": ("attention decode, 8192 cached positions (33 MB of K/V)", ladder_attention, "GB/s"),
           "attention_short": ("attention decode with q/k-norm, RoPE and the cache write, 1024 cached positions "
                               "(4 MB of K/V)", ladder_attention_short, "GB/s"),
           "attention_long": ("the same over 8192 cached positions (33 MB of K/V)",
                              lambda: ladder_attention_short(8192), "GB/s"),
           "router": ("router: 128 x 2048 GEMV, softmax, top-8 (0.5 MB)", ladder_router, "GB/s"),
           "batch_projection": ("q/k/v projection of 8 tokens: 5120 x 2048 (21 MB)", ladder_batch_projection, "GB/s"),
           "attention_prefill": ("attention prefill, 1024 tokens (causal)", ladder_attention_prefill, "TFLOP/s"),
           "prefill_projection": ("q/k/v projection of 2048 tokens: 5120 x 2048", ladder_prefill_projection,
                                  "TFLOP/s")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastpath.ladder", description=__doc__.split("\n\n")[0])
    parser.add_argument("ladders", nargs="*", help=f"any of {', '.join(LADDERS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.ladders) - set(LADDERS)
    if unknown:
        parser.error(f"unknown ladder(s) {', '.join(sorted(unknown))}; choose from {', '.join(LADDERS)}")
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, Qwen3-30B-A3B shapes")
    for name in args.ladders or LADDERS:
        title, run, unit = LADDERS[name]
        report(title, run(), unit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
