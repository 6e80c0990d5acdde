"""``python -m qwen3moe bench --nvidia --ndev 1,2,4``: a model split over several GPUs against one GPU, in one run.

Each rank makes its own part of a model with random bf16 weights directly on its GPU, in the kernels' layout
(``random_part``: no file, nothing copied), so a Qwen3-235B-A22B-shaped model needs no 470 GB checkpoint. For each
device count and expert placement it measures decode at batch 1 (the captured graphs, every rank replaying its own in
lockstep) and at a larger batch (through every rank's captured graph of the batch, and through the model loop with
the logits gathered to rank 0), and the time the collectives alone take: the same number of all-reduces of the same
size, captured and replayed with nothing else. ``--layers`` limits the layers (default: all that fit in the GPUs' memory).
"""

import json
import sys
import time
from types import SimpleNamespace

import cupy as cp
import numpy as np

from qwen3moe.bench import SYNTHETIC
from qwen3moe.config import config_from_dict
from qwen3moe.debug import Debugger
from qwen3moe.model import KVCache, Request, forward
from qwen3moe.ranks import RankGroup
from qwen3moe.router_stats import RouterStats
from qwen3moe.sharding import plan_sharding

from . import cupy_backend as cb

PROMPT = 32  # tokens of the batch-1 prompt; each sequence of the large batch starts with 16
MEMORY_RESERVE = 6e9  # bytes a GPU keeps free for caches, activations, NCCL and the CUDA context


def random_part(spec: dict, rank, ops) -> cb.State:
    """A rank's part of a model with random bf16 weights (std 0.02, norms 1), made on its GPU as the cupy backend
    lays weights out (``rank``: anything with ``shard_config`` and ``shard``; a ``ranks.Rank``)."""
    c, shard = rank.shard_config, rank.shard
    rng = cp.random.default_rng(spec["seed"] + 1000 * shard.rank)

    def bf16(*shape):  # normal(0, 0.02) cut to bf16: the upper 16 bits of each float32
        return ((rng.standard_normal(shape, dtype=cp.float32) * 0.02).view(cp.uint32) >> 16).astype(cp.uint16)

    ones = lambda n: cp.ones(n, cp.float32)
    H, D, I = c.hidden_size, c.head_dim, c.moe_intermediate_size
    E = len(shard.experts)
    layers = []
    for _ in range(c.num_hidden_layers):
        gate_up, down = cp.empty((E, 2 * I, H), cp.uint16), cp.empty((E, H, I), cp.uint16)
        for e in range(E):  # one expert at a time: the float32 draws stay small
            gate_up[e], down[e] = bf16(2 * I, H), bf16(H, I)
        layers.append(cb.Layer(ones(H), bf16((c.num_attention_heads + 2 * c.num_key_value_heads) * D, H), ones(D),
                               ones(D), bf16(H, c.num_attention_heads * D), ones(H), gate_up, down,
                               bf16(c.num_experts, H)))
    return cb.State(c, "bf16_t", bf16(c.vocab_size, H), layers, ones(H), bf16(len(shard.vocab_rows), H),
                    cb.rope_inv_freq(c), residual=shard.rank == 0, expert_lo=shard.experts.start,
                    expert_hi=shard.experts.stop, first_vocab_row=shard.vocab_rows.start)


class OneGpu:
    """The baseline: the same model on one GPU through the plain backend (no communicator at all)."""

    def __init__(self, config, seed: int):
        plan = plan_sharding(config, 1)
        self.state = random_part({"seed": seed}, SimpleNamespace(shard_config=config, shard=plan.ranks[0]), cb)
        self.config, self.ops = config, cb

    def new_cache(self, capacity: int):
        return KVCache(self.config, capacity, xp=cp)

    def forward(self, requests):
        return forward(cb, self.state, self.config, requests, RouterStats(self.config), Debugger(False))

    def greedy_decoder(self, cache, pos: int, token: int):
        return cb.GreedyDecoder(self.state, cache, pos, token)

    def batch_decoder(self, caches, positions: list[int], tokens: list[int]):
        return cb.BatchDecoder(self.state, caches, positions, tokens)

    def time_all_reduces(self, rows: int, count: int, reps: int) -> float:
        return 0.0

    def close(self):
        self.state = None


class Split:
    """The model split over ``ndev`` GPUs: rank 0 here, the other ranks in their own processes."""

    def __init__(self, config, ndev: int, experts: str, seed: int):
        self.group = RankGroup(ndev, "cupy", config, experts, "fastpath.multi_gpu_bench:random_part", seed=seed)
        self.config = config

    def new_cache(self, capacity: int):
        cache = self.group.rank.new_cache(capacity)
        self.group.open_cache(cache)
        return cache

    def forward(self, requests):
        return self.group.forward(requests, False, None, RouterStats(self.config), Debugger(False))

    def greedy_decoder(self, cache, pos: int, token: int):
        return self.group.greedy_decoder(cache, pos, token)

    def batch_decoder(self, caches, positions: list[int], tokens: list[int]):
        return self.group.batch_decoder(caches, positions, tokens)

    def time_all_reduces(self, rows: int, count: int, reps: int) -> float:
        self.group.send("time_all_reduces", rows=rows, count=count, reps=reps)
        return self.group._guarded(self.group.rank.time_all_reduces, rows, count, reps)

    def close(self):
        self.group.close()
        self.group = None  # frees this rank's part


def measure(model, c, steps: int, batch: int, log, label: str) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    cache = model.new_cache(PROMPT + steps + 8)
    (logits,) = model.forward([Request(rng.integers(0, c.vocab_size, PROMPT).tolist(), 0, cache)])
    decoder = model.greedy_decoder(cache, PROMPT, int(np.argmax(logits)))
    for _ in range(4):
        decoder.step()
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    out["b1_ms_per_token"] = 1e3 * (time.perf_counter() - start) / steps
    n = max(4, steps // 8)
    caches = [model.new_cache(16 + 2 * n + 8) for _ in range(batch)]
    logits = model.forward([Request(rng.integers(0, c.vocab_size, 16).tolist(), 0, k) for k in caches])
    decoder = model.batch_decoder(caches, [16] * batch, [int(np.argmax(l)) for l in logits])
    tokens = decoder.step()  # a warm-up
    start = time.perf_counter()
    for _ in range(n):
        tokens = decoder.step()
    out[f"b{batch}_tokens_per_s"] = batch * n / (time.perf_counter() - start)
    for i in range(n + 1):  # the same sequences on through the model loop (the logits of every step to the host)
        if i == 1:
            start = time.perf_counter()
        logits = model.forward([Request([t], 17 + n + i, k) for t, k in zip(tokens, caches)])
        tokens = [int(np.argmax(l)) for l in logits]
    out[f"b{batch}_loop_tokens_per_s"] = batch * n / (time.perf_counter() - start)
    count = 2 * c.num_hidden_layers
    out["b1_all_reduce_ms"] = 1e3 * model.time_all_reduces(1, count, 20)
    out[f"b{batch}_all_reduce_ms"] = 1e3 * model.time_all_reduces(batch, count, 5)
    log(f"{label}: batch 1 {out['b1_ms_per_token']:.2f} ms/token ({out['b1_all_reduce_ms']:.2f} ms of it "
        f"all-reduces), batch {batch} {out[f'b{batch}_tokens_per_s']:.0f} tokens/s "
        f"({out[f'b{batch}_all_reduce_ms']:.2f} ms a step in all-reduces; model loop: "
        f"{out[f'b{batch}_loop_tokens_per_s']:.0f})")
    return out


def layers_that_fit(config: dict, ndev: int) -> int:
    """The most layers whose largest rank part fits in one GPU's free memory (less MEMORY_RESERVE)."""
    c = config_from_dict(dict(config, num_hidden_layers=1))
    per_layer = max(r.total_bytes for r in plan_sharding(c, ndev, "etp").ranks)
    fixed = max(r.weight_bytes["embed_tokens"] + r.weight_bytes["lm_head"] for r in plan_sharding(c, ndev).ranks)
    free = cp.cuda.runtime.memGetInfo()[0]
    return max(1, min(config["num_hidden_layers"], int((free - MEMORY_RESERVE - fixed) // (per_layer - fixed))))


def run(args) -> int:
    log = lambda m: print(m, file=sys.stderr, flush=True)
    name = args.synthetic or "qwen3-30b-a3b"
    full = SYNTHETIC[name]
    counts = [int(n) for n in args.ndev.split(",")]
    placements = args.experts.split(",") if args.experts else ["ep", "etp"]
    batch = max(int(b) for b in args.batch.split(","))
    layers = args.layers or layers_that_fit(full, min(counts))
    c = config_from_dict(dict(full, num_hidden_layers=layers))
    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    log(f"{device} x {cp.cuda.runtime.getDeviceCount()}: {name}, {layers} of {full['num_hidden_layers']} layers")
    results = {"device": device, "model": name, "layers": layers, "batch": batch, "runs": []}
    for ndev in counts:
        for experts in (["-"] if ndev == 1 else placements):
            label = f"{ndev} GPU" + ("" if ndev == 1 else f"s, {experts}")
            model = OneGpu(c, seed=1) if ndev == 1 else Split(c, ndev, experts, seed=1)
            try:
                results["runs"].append(dict(ndev=ndev, experts=experts, **measure(model, c, args.steps, batch, log,
                                                                                     label)))
            finally:
                model.close()
                cp.get_default_memory_pool().free_all_blocks()
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(format_results(results, full["num_hidden_layers"]))
    return 0


def format_results(results: dict, all_layers: int) -> str:
    B, runs = results["batch"], results["runs"]
    base = next((r for r in runs if r["ndev"] == 1), None)
    lines = [f"{results['device']}: {results['model']} shapes, {results['layers']} layers",
             f"{'GPUs':>4} {'experts':>7} {'b1 ms/token':>11} {'x 1 GPU':>7} {'all-reduce ms':>13} "
             f"{'b' + str(B) + ' tok/s':>10} {'x 1 GPU':>7} {'loop tok/s':>10} {'x 1 GPU':>7} {'ms/layer b1':>11} "
             f"{'all layers, ms':>14}"]
    ratio = lambda r, key: f"{r[key] / base[key]:.2f}" if base else "-"
    for r in runs:
        per_layer = r["b1_ms_per_token"] / results["layers"]
        lines.append(f"{r['ndev']:>4} {r['experts']:>7} {r['b1_ms_per_token']:>11.2f} "
                     f"{ratio(r, 'b1_ms_per_token'):>7} {r['b1_all_reduce_ms']:>13.2f} "
                     f"{r[f'b{B}_tokens_per_s']:>10.0f} {ratio(r, f'b{B}_tokens_per_s'):>7} "
                     f"{r[f'b{B}_loop_tokens_per_s']:>10.0f} {ratio(r, f'b{B}_loop_tokens_per_s'):>7} "
                     f"{per_layer:>11.3f} {per_layer * all_layers:>14.1f}")
    lines.append(f"batch {B}: greedy decoding through each rank's captured graph (BatchDecoder); loop: the same "
                 "through the model loop, the logits of every step gathered to the host")
    lines.append(f"all layers: ms per layer x {all_layers} (the extrapolated batch-1 latency of the whole model)")
    return "\n".join(lines)
