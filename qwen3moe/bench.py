"""``python -m qwen3moe bench``: prefill and decode speed of each backend, against this machine's memory bandwidth.

Decoding is bound by reading weights, so the figure that says how good a backend is is the weight bytes it streams
per second, set against the read bandwidth the machine can reach (measured in the same run, by every core summing
one large array). Bytes per step are counted from what the step really touched: attention and dense weights, the
router, the experts its tokens chose (distinct experts per layer, read from the router trace of as many further,
untimed steps), the embedding rows and the lm_head.

Decode is measured two ways. "decode bN" runs the model loop one step at a time (``batch_infer_one_round``: a
backend's block operations called from Python, router statistics and sampling on the host), for every batch size.
"greedy b1" is batch-1 greedy decoding through the backend's ``GreedyDecoder``, the way ``generate`` decodes
(temperature 0 or top-k 1, after the prefill): a whole step per call. It is measured for backends that have one.

On a shared machine both sides of a ratio drift, from run to run and within a run. ``--interleave ROUNDS`` runs
each backend in a process of its own, ROUNDS times, the backends alternating, and reports every round and the
medians: the backends then see the same phases of the machine. (Alternating them inside one process measures how
they disturb each other instead: the reference's BLAS threads keep spinning after its calls, and stall the next
backend's threaded steps.)

Models: a folder (default: the bundled model), or ``--synthetic qwen3-30b-a3b --layers N``: Qwen3-30B-A3B's real
shapes (hidden 2048, 128 experts, top-8, moe_intermediate 768, 32/4 heads, head_dim 128, vocab 151936) with random
bf16 weights and N of its 48 layers, written once under $QWEN3MOE_CACHE.
"""

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import backends
from .causal_lm import Qwen3MoeForCausalLM
from .infer_task import Qwen3MoeInferTask, Qwen3MoeKVCache

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "num_experts": 128, "num_experts_per_tok": 8,
    "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "hidden_act": "silu", "eos_token_id": 258,
}
QWEN3_235B_A22B = dict(QWEN3_30B_A3B, hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
                       num_attention_heads=64, moe_intermediate_size=1536)  # REFERENCE.md's real configuration
SYNTHETIC = {"qwen3-30b-a3b": QWEN3_30B_A3B, "qwen3-235b-a22b": QWEN3_235B_A22B}


def measure_read_bandwidth(nbytes: int = 1 << 30, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes per second that all cores together can read: each thread XOR-reduces its slice of one 1 GiB array
    (NumPy releases the GIL inside the reduction; XOR, unlike a sum, is never limited by arithmetic). The best of a
    few repeats, as the roofline."""
    threads = threads or os.cpu_count() or 1
    data = np.ones(nbytes // 8, dtype=np.uint64)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.bitwise_xor.reduce, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def synthetic_model(name: str, layers: int) -> Path:
    """Write (once) a checkpoint with ``name``'s shapes, ``layers`` layers and random bf16 weights."""
    from .synthetic import write_large_synthetic_checkpoint

    config = dict(SYNTHETIC[name], num_hidden_layers=layers)
    folder = Path(os.environ.get("QWEN3MOE_CACHE", Path.home() / ".cache" / "qwen3moe")) / f"bench-{name}-{layers}L"
    if not (folder / "config.json").is_file():
        print(f"writing synthetic {name} with {layers} layers to {folder} (once)", file=sys.stderr)
        write_large_synthetic_checkpoint(folder, config)
    return folder


def step_bytes(model: Qwen3MoeForCausalLM, distinct_experts: dict[int, float], tokens: int) -> float:
    """Weight bytes one step reads when its tokens chose ``distinct_experts[layer]`` different experts per layer."""
    w, total = model.weights, 0.0
    for i, layer in enumerate(w.layers):
        a = layer.self_attn
        total += sum(m.nbytes for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.q_norm, a.k_norm,
                                        layer.input_layernorm, layer.post_attention_layernorm))
        if i in distinct_experts:
            e = layer.mlp.experts[0]
            total += layer.mlp.gate.nbytes + distinct_experts[i] * (e.gate_proj.nbytes + e.up_proj.nbytes +
                                                                    e.down_proj.nbytes)
        else:
            total += layer.mlp.gate_proj.nbytes + layer.mlp.up_proj.nbytes + layer.mlp.down_proj.nbytes
    return total + w.norm.nbytes + w.lm_head.nbytes + tokens * w.embed_tokens[0].nbytes


def bench_backend(model_dir: Path, backend: str, prompt_len: int, steps: int, batches: list[int]) -> dict:
    """One backend's row; ``backend`` may name a precision too, as "numba:bf16" (default float32)."""
    name, _, precision = backend.partition(":")
    model = Qwen3MoeForCausalLM(model_dir, backend=name, max_tokens=prompt_len + steps + 8,
                                precision=precision or "float32")
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompt = rng.integers(0, min(vocab, 256), prompt_len).tolist()
    result = {"backend": backend}

    def prefill_once():
        task = Qwen3MoeInferTask(prompt, temperature=0, end_tokens=[])
        task.bind_kvcache(Qwen3MoeKVCache(model))
        start = time.perf_counter()
        model.batch_infer_one_round([task])
        return time.perf_counter() - start

    for batch in batches:
        tasks = [Qwen3MoeInferTask(rng.integers(0, min(vocab, 256), 8).tolist(), temperature=0, end_tokens=[],
                                   task_id=b) for b in range(batch)]
        for t in tasks:  # prefill one short prompt at a time: small steps, like the decode steps to be timed
            t.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=8 + 2 * steps + 4))
            model.batch_infer_one_round([t])
        for _ in range(2):  # warm-up: compiles kernels, touches the weights' pages
            model.batch_infer_one_round(tasks)
        elapsed = 0.0
        for _ in tqdm(range(steps), desc=f"{backend} decode batch {batch}", leave=False, file=sys.stderr):
            start = time.perf_counter()
            model.batch_infer_one_round(tasks)
            elapsed += time.perf_counter() - start
        # The experts a step reads, from the router trace of as many steps again, untimed: recording the trace
        # costs ~5 us per MoE layer and step, a good part of a small model's step.
        model.router_stats.trace_enabled = True
        for _ in range(steps):
            model.batch_infer_one_round(tasks)
        model.router_stats.trace_enabled = False
        distinct = {i: _mean_distinct(model.router_stats.trace, i) for i in model.config.moe_layers}
        bytes_per_step = step_bytes(model, distinct, batch)
        result[f"decode_b{batch}_tokens_per_s"] = batch * steps / elapsed
        result[f"decode_b{batch}_GBps"] = bytes_per_step * steps / elapsed / 1e9
        model.router_stats.trace.clear()
    if hasattr(model._ops, "GreedyDecoder"):
        result.update(whole_step_decode(model, rng, steps))
    if hasattr(model._ops, "SampledDecoder"):
        result.update(whole_step_decode(model, rng, steps, SAMPLED))
    # Prefill last: its large matrix products leave BLAS worker threads spinning for a while afterwards, which
    # would slow decode steps timed right after it on a machine with few cores.
    prefill_once()  # warm-up
    result["prefill_tokens_per_s"] = prompt_len / prefill_once()
    model.destroy_model_instance()
    return result


SAMPLED = (0.6, 20, 0.95)  # (temperature, top_k, top_p): Qwen3's generation_config.json in thinking mode


def whole_step_decode(model: Qwen3MoeForCausalLM, rng: np.random.Generator, steps: int,
                      sampling: tuple | None = None) -> dict:
    """Batch-1 decoding through the backend's GreedyDecoder, or with ``sampling`` its SampledDecoder, as
    ``generate`` runs it: the 8-token prompt prefilled by the model loop, then one ``decoder.step()`` per token over
    the same positions as "decode b1"."""
    task = Qwen3MoeInferTask(rng.integers(0, min(model.config.vocab_size, 256), 8).tolist(), temperature=0,
                             end_tokens=[])
    task.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=8 + steps + 4))
    (token,) = model.batch_infer_one_round([task])
    if sampling is None:
        decoder = model._ops.GreedyDecoder(model._state, task.kvcache, task.pos, token)
    else:
        decoder = model._ops.SampledDecoder(model._state, task.kvcache, task.pos, token, (*sampling, rng))
    for _ in range(2):  # warm-up: compiles, touches the weights' pages
        decoder.step()
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    elapsed = time.perf_counter() - start
    decoder.flush_stats(model.router_stats)
    if sampling is not None:
        return {"decode_sampled_b1_tokens_per_s": steps / elapsed}
    top_k = model.config.num_experts_per_tok  # one token reads top_k distinct experts per MoE layer
    bytes_per_step = step_bytes(model, dict.fromkeys(model.config.moe_layers, top_k), 1)
    return {"decode_greedy_b1_tokens_per_s": steps / elapsed, "decode_greedy_b1_GBps": bytes_per_step * steps /
            elapsed / 1e9}


def _mean_distinct(trace, layer: int) -> float:
    """Average number of distinct experts ``layer`` read per step (every task has the same prompt length, so a
    step is one position)."""
    steps: dict[int, set] = {}
    for r in trace:
        if r.layer == layer:
            steps.setdefault(r.position, set()).update(r.experts)
    return float(np.mean([len(s) for s in steps.values()]))


def run(args) -> int:
    names = args.backends.split(",") if args.backends else [n for n in backends.BACKENDS
                                                             if backends.unavailable_reason(n) is None]
    model_dir = synthetic_model(args.synthetic, args.layers or 2) if args.synthetic else args.model
    if model_dir is None:
        from .bundled import default_model_dir
        model_dir = default_model_dir()
    if args.interleave:
        return run_interleaved(args, names, Path(model_dir))
    batches = [int(b) for b in args.batch.split(",")]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    # Shared machines drift: measure the roofline before and after the backends and keep the best.
    bandwidth = measure_read_bandwidth()
    rows = [bench_backend(Path(model_dir), n, args.prompt_len, args.steps, batches) for n in names]
    bandwidth = max(bandwidth, measure_read_bandwidth())
    for r in rows:
        for b in batches:
            r[f"decode_b{b}_roofline_fraction"] = r[f"decode_b{b}_GBps"] * 1e9 / bandwidth
        if "decode_greedy_b1_GBps" in r:
            r["decode_greedy_b1_roofline_fraction"] = r["decode_greedy_b1_GBps"] * 1e9 / bandwidth
    report = {"model": str(model_dir), "machine": machine, "read_bandwidth_GBps": bandwidth / 1e9,
              "prompt_len": args.prompt_len, "decode_steps": args.steps, "results": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {model_dir}\nmachine {machine}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = f"{'backend':<10} {'prefill tok/s':>13}"
    for b in batches:
        header += f" {'decode b' + str(b) + ' tok/s':>17} {'GB/s':>6} {'of bw':>6}"
    header += f" {'greedy b1 tok/s':>16} {'GB/s':>6} {'of bw':>6}"
    print(header)
    for r in rows:
        line = f"{r['backend']:<10} {r['prefill_tokens_per_s']:>13.1f}"
        for b in batches:
            line += (f" {r[f'decode_b{b}_tokens_per_s']:>17.1f} {r[f'decode_b{b}_GBps']:>6.2f}"
                     f" {100 * r[f'decode_b{b}_roofline_fraction']:>5.1f}%")
        if "decode_greedy_b1_tokens_per_s" in r:
            line += (f" {r['decode_greedy_b1_tokens_per_s']:>16.1f} {r['decode_greedy_b1_GBps']:>6.2f}"
                     f" {100 * r['decode_greedy_b1_roofline_fraction']:>5.1f}%")
        else:
            line += f" {'-':>16} {'-':>6} {'-':>6}"
        print(line)
    print("decode bN: the model loop, one step at a time (batch_infer_one_round); greedy b1: the backend's "
          "GreedyDecoder, a whole step per call, as generate() decodes greedily after the prefill")
    for r in rows:
        if "decode_sampled_b1_tokens_per_s" in r:
            print(f"{r['backend']} sampled b1 (SampledDecoder; temperature, top_k, top_p = {SAMPLED}, the token drawn "
                  f"on the host): {r['decode_sampled_b1_tokens_per_s']:.1f} tokens/s")
    reference = next((r for r in rows if r["backend"] == "numpy" and "decode_b1_tokens_per_s" in r), None)
    for r in rows:
        if reference is not None and "decode_greedy_b1_tokens_per_s" in r:
            print(f"{r['backend']} greedy b1 vs numpy decode b1: "
                  f"{r['decode_greedy_b1_tokens_per_s'] / reference['decode_b1_tokens_per_s']:.1f}x")
    return 0


def run_interleaved(args, names: list[str], model_dir: Path) -> int:
    """``--interleave``: this benchmark at batch 1, run ``args.interleave`` times per backend, each run a process of
    its own (``--json``), the backends alternating; a table of the batch-1 decode speeds of every round, and their
    medians. A run that fails ends the bench with its error."""
    command = [sys.executable, "-m", "qwen3moe", "bench", "--json", "--model", str(model_dir), "--prompt-len",
               str(args.prompt_len), "--steps", str(args.steps), "--batch", "1"]
    rounds = []
    for _ in tqdm(range(args.interleave), desc="interleaved rounds", file=sys.stderr):
        rounds.append({})
        for name in names:
            done = subprocess.run([*command, "--backends", name], capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                return done.returncode
            rounds[-1][name] = json.loads(done.stdout)["results"][0]
    if args.json:
        print(json.dumps({"model": str(model_dir), "rounds": rounds}, indent=2))
        return 0
    columns = [(f"{n} decode b1", n, "decode_b1_tokens_per_s") for n in names]
    columns += [(f"{n} greedy b1", n, "decode_greedy_b1_tokens_per_s") for n in names
                if "decode_greedy_b1_tokens_per_s" in rounds[0][n]]
    ratios = [(f"{n} greedy / numpy b1", n) for n in names if "numpy" in names and
              "decode_greedy_b1_tokens_per_s" in rounds[0][n]]
    table = [[r[n][key] for _, n, key in columns] +
             [r[n]["decode_greedy_b1_tokens_per_s"] / r["numpy"]["decode_b1_tokens_per_s"] for _, n in ratios]
             for r in rounds]
    titles = [title for title, *_ in columns + ratios]
    print(f"model {model_dir}; {args.interleave} rounds, each backend in its own process, alternating; tokens/s")
    print(f"{'round':<7}" + "".join(f" {t:>{max(len(t), 9)}}" for t in titles))
    for i, row in enumerate(table + [list(np.median(table, axis=0))]):
        print(f"{str(i + 1) if i < len(table) else 'median':<7}" +
              "".join(f" {v:>{max(len(t), 9)}.1f}" for t, v in zip(titles, row)))
    return 0
