"""``python -m qwen3moe bench --nvidia``: the cupy backend on Qwen3-30B-A3B shapes, against transformers on the same
weights and against the GPU's copy bandwidth, all measured in one run on one GPU.

The weights are random bf16, generated on the GPU by transformers' own initialisation (61 GB for all 48 layers: no
file is written). Our backend reads the very same memory: transformers 5 already holds each layer's experts packed as
(E, 2I, H) gate/up and (E, H, I) down, the layout our kernels take, so only q/k/v are stacked (a 1 GB copy).

Measured: decode tokens/s at batch 1 and at larger batches (greedy, through a captured graph per step; the larger
batches also one step at a time from Python), prefill of a long prompt and batch-1 decoding after it, the weight
bytes a decode step must read against the copy bandwidth, the same decode for transformers, and the time of each
kernel of one batch-1 step against its own bytes.
"""

import json
import sys
import time
from collections import defaultdict

import cupy as cp
import numpy as np

from qwen3moe.bench import QWEN3_30B_A3B
from qwen3moe.config import config_from_dict
from qwen3moe.model import KVCache

from . import cupy_backend as cb
from . import timeline
from .cupy_backend import Layer, State


def copy_bandwidth(nbytes: int = 4 << 30, repeats: int = 10) -> float:
    """Device-to-device copy of a large buffer, bytes read plus bytes written per second (the best repeat)."""
    src, dst = cp.ones(nbytes // 4, cp.float32), cp.empty(nbytes // 4, cp.float32)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    best = 0.0
    for _ in range(repeats):
        start.record()
        dst[...] = src
        end.record()
        end.synchronize()
        best = max(best, 2 * nbytes / (cp.cuda.get_elapsed_time(start, end) / 1e3))
    del src, dst
    cp.get_default_memory_pool().free_all_blocks()
    return best


def build_transformers_model(config: dict):
    """transformers' Qwen3MoeForCausalLM with random bf16 weights, created directly on the GPU."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    hf_config = Qwen3MoeConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(hf_config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def as_cupy(t) -> cp.ndarray:
    """A torch CUDA tensor as a CuPy array of the same memory; bf16 as uint16 words (CuPy has no bf16)."""
    import torch

    if t.dtype == torch.bfloat16:
        return cp.from_dlpack(t.detach().contiguous().view(torch.int16)).view(cp.uint16)
    return cp.from_dlpack(t.detach().contiguous().float())


def state_from_transformers(model, c) -> State:
    import torch

    p = dict(model.named_parameters())
    f32 = lambda name: as_cupy(p[name].float())
    layers = []
    for i in range(c.num_hidden_layers):
        a = f"model.layers.{i}.self_attn."
        qkv = torch.cat([p[a + f"{n}_proj.weight"] for n in "qkv"])
        e = f"model.layers.{i}.mlp."
        layers.append(Layer(f32(f"model.layers.{i}.input_layernorm.weight"), as_cupy(qkv), f32(a + "q_norm.weight"),
                            f32(a + "k_norm.weight"), as_cupy(p[a + "o_proj.weight"]),
                            f32(f"model.layers.{i}.post_attention_layernorm.weight"),
                            as_cupy(p[e + "experts.gate_up_proj"]), as_cupy(p[e + "experts.down_proj"]),
                            as_cupy(p[e + "gate.weight"])))
    return State(c, "bf16_t", as_cupy(p["model.embed_tokens.weight"]), layers, f32("model.norm.weight"),
                 as_cupy(p["lm_head.weight"]), cb.rope_inv_freq(c))


def random_state(c) -> State:
    """Weights of config ``c`` as random bf16 made by CuPy on the GPU (N(0, 0.02); the router's N(0, 0.5), so that
    the picks are decisive; norms near 1): seconds for all 48 layers, where transformers' initialisation takes
    minutes. For timing the decode step alone (``step_ms``)."""
    rs = cp.random.RandomState(0)

    def bf16(*shape, scale=0.02):  # the upper 16 bits of float32 samples: bf16 rounded towards zero
        return ((rs.standard_normal(shape, dtype=cp.float32) * scale).view(cp.uint32) >> 16).astype(cp.uint16)

    near_one = lambda n: 1 + 0.1 * rs.standard_normal(n, dtype=cp.float32)
    H, D, I, E = c.hidden_size, c.head_dim, c.moe_intermediate_size, c.num_experts
    layers = [Layer(near_one(H), bf16((c.num_attention_heads + 2 * c.num_key_value_heads) * D, H), near_one(D),
                    near_one(D), bf16(H, c.num_attention_heads * D), near_one(H), bf16(E, 2 * I, H), bf16(E, H, I),
                    bf16(E, H, scale=0.5)) for _ in range(c.num_hidden_layers)]
    return State(c, "bf16_t", bf16(c.vocab_size, H, scale=1.0), layers, near_one(H), bf16(c.vocab_size, H),
                 cb.rope_inv_freq(c))


def step_ms(s: State, cached: list[int], rounds: int = 3, steps: int = 8) -> dict:
    """ms a token of the captured batch-1 step (``GreedyDecoder``, what ``generate`` replays) after each number of
    cached positions: the best of ``rounds`` rounds of ``steps`` tokens, after 12 tokens of warm-up, which are
    returned too (a change to the kernels must leave them as they are); the cache as ``prefilled`` makes it."""
    rng, out = np.random.default_rng(1), {}
    for n in cached:
        decoder = cb.GreedyDecoder(s, *prefilled(s, n, rng))
        tokens = [decoder.step() for _ in range(12)]
        out[n] = {"ms": 1e3 * replayed_step_s(decoder, rounds, steps), "tokens": tokens}
    return out


def prefilled(s: State, n: int, rng) -> tuple:
    """A cache holding a random prompt of ``n`` tokens and room for 112 more, as ``generate`` sizes it to the prompt
    and the steps asked for: (cache, n, the prompt's greedy successor), what ``GreedyDecoder`` starts from."""
    c = s.config
    cache = KVCache(c, n + 112, xp=cp)
    return cache, n, int(forward_on_device(s, rng.integers(0, c.vocab_size, n), [(0, n, 0)], [cache])[0])


def replayed_step_s(decoder, rounds: int = 3, steps: int = 8) -> float:
    """Seconds a step of a captured decoder: the best of ``rounds`` rounds of ``steps`` steps."""
    return min(timed(lambda: [decoder.step() for _ in range(steps)]) for _ in range(rounds)) / steps


def decode_bytes(c, distinct_experts: float) -> float:
    """Weight bytes one decode step must read (bf16): attention, router and the distinct chosen experts per layer,
    and lm_head."""
    H, D, I = c.hidden_size, c.head_dim, c.moe_intermediate_size
    attention = (c.num_attention_heads + 2 * c.num_key_value_heads) * D * H + H * c.num_attention_heads * D
    per_layer = attention + c.num_experts * H + distinct_experts * 3 * I * H
    return 2 * (c.num_hidden_layers * per_layer + c.vocab_size * H)


def forward_on_device(s: State, ids: np.ndarray, segments: list[tuple[int, int, int]], caches) -> cp.ndarray:
    """One step through the backend's block functions with the logits kept on the GPU; returns the greedy tokens
    of each segment's last row (argmax on the device). Every layer is an MoE layer, as in Qwen3-30B-A3B."""
    c = s.config
    x = cb.embed(s, ids)
    plan = cb.AttentionPlan.build(c, segments, max(p + b - a for a, b, p in segments))
    attn = cb.AttentionBuffers.empty(x.shape[0], c, plan.splits)
    moe = cb.MoeBuffers.empty(x.shape[0], c, c.num_experts_per_tok)
    address = lambda part: cp.asarray(np.array([[a[i].data.ptr for a in part] for i in range(len(s.layers))],
                                               np.uint64))  # (layers, sequences): one copy to the GPU per step
    k_caches, v_caches = address([cache.k for cache in caches]), address([cache.v for cache in caches])
    for i, layer in enumerate(s.layers):
        cb.attention_into(s, layer, x, plan, k_caches[i], v_caches[i], attn)
        cb.moe_into(s, layer, x, c.num_experts_per_tok, None, moe)
    last = x[[b - 1 for _, b, _ in segments]]
    return cb.final_logits(s, last).argmax(axis=1)


def timed(fn) -> float:
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    fn()
    cp.cuda.Device().synchronize()
    return time.perf_counter() - start


SAMPLED_B1 = (0.6, 20, 0.95)  # (temperature, top_k, top_p): Qwen3's generation_config.json in thinking mode


def bench_ours(s: State, batches: list[int], steps: int, prompt_len: int, prefill_len: int, log) -> dict:
    c, rng, out = s.config, np.random.default_rng(0), {}
    # batch 1: prefill, then the captured graph
    cache = KVCache(c, prompt_len + steps + 16, xp=cp)
    prompt = rng.integers(0, c.vocab_size, prompt_len)
    first = int(forward_on_device(s, prompt, [(0, prompt_len, 0)], [cache])[0])
    decoder = cb.GreedyDecoder(s, cache, prompt_len, first)
    for _ in range(4):
        decoder.step()
    seconds = timed(lambda: [decoder.step() for _ in range(steps)])
    out["decode_b1_tokens_per_s"] = steps / seconds
    log(f"ours batch 1: {steps / seconds:.1f} tokens/s")
    out["profile_b1"] = profile(decoder._step, decoder.stream)
    # batch 1 sampled on the device with Qwen3's thinking-mode settings, from the same position again
    decoder = cb.BatchDecoder(s, [cache], [prompt_len], [first], [(*SAMPLED_B1, rng)])
    for _ in range(4):
        decoder.step()
    seconds = timed(lambda: [decoder.step() for _ in range(steps)])
    out["decode_b1_sampled_tokens_per_s"] = steps / seconds
    log(f"ours batch 1, sampled: {steps / seconds:.1f} tokens/s")
    for B in batches:
        n = max(4, steps // 4)
        caches = [KVCache(c, 16 + 2 * n + 8, xp=cp) for _ in range(B)]
        ids = rng.integers(0, c.vocab_size, 16 * B)
        tokens = forward_on_device(s, ids, [(16 * j, 16 * j + 16, 0) for j in range(B)], caches).get().tolist()
        start = time.perf_counter()
        decoder = cb.BatchDecoder(s, caches, [16] * B, tokens)
        out[f"capture_b{B}_ms"] = 1e3 * (time.perf_counter() - start)  # what batch_infer_one_round pays per new set
        decoder.step()  # a warm-up
        seconds = timed(lambda: [decoder.step() for _ in range(n)])
        out[f"decode_b{B}_tokens_per_s"] = B * n / seconds
        tokens = cp.asarray(decoder.step())
        pos = 18 + n

        def step():  # the same sequences on, one step at a time through the block functions
            nonlocal tokens, pos
            tokens = forward_on_device(s, tokens.get(), [(j, j + 1, pos) for j in range(B)], caches)
            pos += 1

        step()
        seconds = timed(lambda: [step() for _ in range(n - 2)])
        out[f"decode_b{B}_steps_tokens_per_s"] = B * (n - 2) / seconds
        log(f"ours batch {B}: {out[f'decode_b{B}_tokens_per_s']:.1f} tokens/s "
            f"(step by step: {out[f'decode_b{B}_steps_tokens_per_s']:.1f}; capturing the step: "
            f"{out[f'capture_b{B}_ms']:.0f} ms)")
    cache = KVCache(c, prefill_len + steps + 16, xp=cp)
    ids = rng.integers(0, c.vocab_size, prefill_len)
    forward_on_device(s, ids, [(0, prefill_len, 0)], [cache])  # warm
    out["prefill_ms"] = 1e3 * timed(lambda: forward_on_device(s, ids, [(0, prefill_len, 0)], [cache]))
    log(f"ours prefill {prefill_len}: {out['prefill_ms']:.1f} ms")
    out["profile_prefill"] = profile(lambda: forward_on_device(s, ids, [(0, prefill_len, 0)], [cache]), hold=False)
    s.precision = "bf16"  # the same prefill with bf16 activations into the tensor cores (cupy_backend.PRECISIONS)
    forward_on_device(s, ids, [(0, prefill_len, 0)], [cache])  # warm
    out["prefill_bf16_ms"] = 1e3 * timed(lambda: forward_on_device(s, ids, [(0, prefill_len, 0)], [cache]))
    log(f"ours prefill {prefill_len}, precision bf16: {out['prefill_bf16_ms']:.1f} ms")
    out["profile_prefill_bf16"] = profile(lambda: forward_on_device(s, ids, [(0, prefill_len, 0)], [cache]),
                                          hold=False)
    s.precision = "float32"
    # batch 1 again, after the long prompt: attention now reads prefill_len cached positions per layer
    first = int(forward_on_device(s, ids, [(0, prefill_len, 0)], [cache])[0])
    decoder = cb.GreedyDecoder(s, cache, prefill_len, first)
    decoder.step()
    seconds = timed(lambda: [decoder.step() for _ in range(steps)])
    out["decode_b1_long_tokens_per_s"] = steps / seconds
    log(f"ours batch 1 after {prefill_len} tokens: {steps / seconds:.1f} tokens/s")
    return out


SAMPLING_SETTINGS = [(0.0, 1, 1.0), SAMPLED_B1, (0.7, 1000, 1.0), (1.0, 0, 1.0), (1.0, 0, 0.9)]


def bench_sampling(V: int, rows: tuple[int, ...] = (1, 64), repeats: int = 20) -> dict:
    """Microseconds per draw of every row's next token (``draw_next_tokens``) over V random logits (normal x 3), per
    setting and row count."""
    rng, out = np.random.default_rng(0), {}
    for settings in SAMPLING_SETTINGS:
        for B in rows:
            logits = cp.asarray(rng.standard_normal((B, V), dtype=np.float32) * 3)
            per_row = tuple(cp.asarray(np.full(B, v), t) for v, t in zip(settings, (cp.float32, cp.int32, cp.float32)))
            state = (cp.zeros(B, cp.int64), cp.zeros(B, cp.int32), cp.zeros(B + 1, cp.int32), cb.sampling_work(B))
            uniform = cp.asarray(rng.random(B, np.float32))
            launch = lambda: cb.draw_next_tokens(logits, V, per_row, uniform, *state)
            launch()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(repeats):
                launch()
            end.record()
            end.synchronize()
            out[f"{settings} x{B}"] = 1e3 * cp.cuda.get_elapsed_time(start, end) / repeats
    return out


HOLD = r"""
extern "C" __global__ void hold(unsigned long long ns) {  // keep the GPU busy while the host queues launches
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""


def profile(run, stream=None, hold: bool = True) -> dict:
    """GPU time of each kernel that ``run()`` launches, summed by kernel (weight types and token counts merged).

    With ``hold`` the work is queued behind a kernel that holds the GPU for 200 ms, so that every launch is queued
    before the first one runs: the events around each kernel then time the GPU alone, not the host's launch overhead
    (for a batch-1 step; a long prefill's kernels outlast their launches anyway)."""
    times, events = defaultdict(float), []
    real_kernel = cb.kernel

    def timed_kernel(file, name):
        k = real_kernel(file, name)

        def launch(*args, **kwargs):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            k(*args, **kwargs)
            end.record()
            events.append((name if name.startswith(("mma", "wgmma")) else name.split("<")[0], start, end))

        return launch

    cb.kernel = timed_kernel
    stream = stream or cp.cuda.Stream.null
    try:
        with stream:
            if hold:
                cp.RawKernel(HOLD, "hold")((1,), (1,), (np.uint64(200_000_000),))
            run()
        stream.synchronize()
    finally:
        cb.kernel = real_kernel
    for name, start, end in events:
        times[name] += cp.cuda.get_elapsed_time(start, end) / 1e3
    return dict(times)


def bench_transformers(model, batches: list[int], steps: int, prompt_len: int, prefill_len: int) -> dict:
    import torch

    out = {}
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (1, prefill_len), device="cuda")
        model(ids, use_cache=True)  # warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids, use_cache=True)
        torch.cuda.synchronize()
        out["prefill_ms"] = 1e3 * (time.perf_counter() - start)
        print(f"transformers prefill {prefill_len}: {out['prefill_ms']:.1f} ms", file=sys.stderr)
        for B in [1, *batches]:
            ids = torch.randint(0, model.config.vocab_size, (B, prompt_len), device="cuda")
            result = model(ids, use_cache=True)
            past, nxt = result.past_key_values, result.logits[:, -1].argmax(-1, keepdim=True)
            n = max(3, steps // (4 if B > 1 else 2))

            def run():
                nonlocal past, nxt
                for _ in range(n):
                    r = model(nxt, past_key_values=past, use_cache=True)
                    past, nxt = r.past_key_values, r.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()

            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            out[f"decode_b{B}_tokens_per_s"] = B * n / (time.perf_counter() - start)
            print(f"transformers batch {B}: {out[f'decode_b{B}_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return out


def run(args) -> int:
    log = lambda m: print(m, file=sys.stderr, flush=True)
    layers = args.layers if args.layers else QWEN3_30B_A3B["num_hidden_layers"]
    config = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    c = config_from_dict(config)
    if args.step_ms:
        return run_step_ms(c, [int(n) for n in args.step_ms.split(",")], args.json)
    if args.timeline:
        return run_timeline(c, [int(n) for n in args.timeline.split(",")], args.json)
    batches = [int(b) for b in args.batch.split(",") if int(b) > 1]
    bandwidth = copy_bandwidth()
    log(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    log(f"creating Qwen3-30B-A3B-shaped weights ({layers} layers) on the GPU ...")
    hf = build_transformers_model(config)
    ours = bench_ours(state_from_transformers(hf, c), batches, args.steps, 32, args.prompt_len, log)
    ours["sample_rows_us"] = bench_sampling(c.vocab_size)
    peer = bench_transformers(hf, batches, args.steps, 32, args.prompt_len)
    floor_b1 = decode_bytes(c, c.num_experts_per_tok) / bandwidth
    result = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "layers": layers,
              "copy_bandwidth_GBps": bandwidth / 1e9, "bytes_per_token_b1": decode_bytes(c, c.num_experts_per_tok),
              "floor_b1_tokens_per_s": 1 / floor_b1, "ours": ours, "transformers": peer}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['device']}, {layers} layers of Qwen3-30B-A3B shapes, copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s")
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers':>12} {'ratio':>7} {'weight GB/s':>11} {'of copy bw':>10} "
          f"{'ours, step by step':>18}")
    for B in [1, *batches]:
        mine, theirs = ours[f"decode_b{B}_tokens_per_s"], peer[f"decode_b{B}_tokens_per_s"]
        distinct = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** B)
        gbps = decode_bytes(c, distinct) * mine / B / 1e9
        steps = ours.get(f"decode_b{B}_steps_tokens_per_s")
        print(f"{B:>5} {mine:>11.1f} {theirs:>12.1f} {mine / theirs:>6.1f}x {gbps:>11.0f} "
              f"{gbps / (bandwidth / 1e9):>9.0%} {'-' if steps is None else f'{steps:.1f}':>18}")
    print("ours: greedy decoding through one captured CUDA graph per step (GreedyDecoder, BatchDecoder); "
          "step by step: the block functions launched from Python, greedy on the device")
    print(f"batch 1 sampled on the device (temperature, top_k, top_p = {SAMPLED_B1}): "
          f"{ours['decode_b1_sampled_tokens_per_s']:.1f} tokens/s")
    print(f"bandwidth floor at batch 1: {1 / floor_b1:.0f} tokens/s; batch 1 after the {args.prompt_len}-token "
          f"prompt: {ours['decode_b1_long_tokens_per_s']:.1f} tokens/s")
    print(f"prefill of {args.prompt_len} tokens: ours {ours['prefill_ms']:.1f} ms (precision float32), "
          f"{ours['prefill_bf16_ms']:.1f} ms (precision bf16); transformers (bf16) {peer['prefill_ms']:.1f} ms")
    print(f"drawing the next tokens from {c.vocab_size} logits ((temperature, top_k, top_p) x rows: us):")
    for key, us in ours["sample_rows_us"].items():
        print(f"  {key:<24} {us:8.1f}")
    for key, title in (("profile_b1", "one batch-1 step, uncaptured"), ("profile_prefill", "the prefill"),
                       ("profile_prefill_bf16", "the prefill, precision bf16")):
        total = sum(ours[key].values())
        print(f"{title}, by kernel (ms):")
        for name, t in sorted(ours[key].items(), key=lambda kv: -kv[1]):
            print(f"  {name:<20} {1e3 * t:8.3f}  {t / total:6.1%}")
    return 0


def run_step_ms(c, cached: list[int], as_json: bool) -> int:
    """``bench --nvidia --step-ms 32,2048``: the batch-1 step alone (``step_ms``), for comparing two versions of the
    kernels: run it once per version, in turns, on the same GPU."""
    result = step_ms(random_state(c), cached)
    if as_json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {c.num_hidden_layers} layers of "
          "Qwen3-30B-A3B shapes, random bf16 weights; the captured batch-1 step:")
    for n, r in result.items():
        print(f"  {n:>6} cached positions: {r['ms']:.3f} ms a token; greedy tokens {r['tokens']}")
    return 0


def run_timeline(c, cached: list[int], as_json: bool) -> int:
    """``bench --nvidia --timeline 32,2048``: what each kernel adds to the captured batch-1 step after each number of
    cached positions (fastpath/timeline.py), on the random weights of ``step_ms``."""
    timeline.enable()
    s, rng, result = random_state(c), np.random.default_rng(1), {}
    for n in cached:
        decoder, result[n] = timeline.greedy_step(s, *prefilled(s, n, rng))
        result[n]["step_us"] = 1e6 * replayed_step_s(decoder)  # the marks compiled in, not recording
    if as_json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {c.num_hidden_layers} layers of "
          "Qwen3-30B-A3B shapes, random bf16 weights; the captured batch-1 step timed inside (every block's start, "
          "release from its wait and end; kernels compiled with the marks, means of 3 steps):")
    for n, r in result.items():
        print(f"\n{n} cached positions: {r['step_us']:.0f} us a token replayed, {r['span_us']:.0f} us from the first "
              "block's start to the last one's end")
        print(f"  {'kernel':<18} {'a step':>6} {'adds us':>8} {'gap us':>7} {'early us':>8} {'weight MB':>9} "
              f"{'GB/s':>6} {'of step':>7}")
        for label, k in r["kernels"].items():
            rate = "-" if k["GBps"] is None else f"{k['GBps']:.0f}"
            print(f"  {label:<18} {k['launches']:>6} {k['adds_us']:>8.2f} {k['gap_us']:>7.2f} {k['early_us']:>8.2f} "
                  f"{k['bytes'] / 1e6:>9.2f} {rate:>6} {k['launches'] * k['adds_us'] / r['span_us']:>7.1%}")
    print("adds: from the end of the launch ahead to this launch's end (what it adds to the chain of the step); gap: "
          "until its first block passes its wait; early: how long its first blocks were resident before that")
    return 0
