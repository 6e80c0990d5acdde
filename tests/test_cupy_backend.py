"""The CUDA backend's own checks, beyond the backend-generic ones of test_backends.py / test_oracle.py (which run it
too): the captured decode graph against the reference, kernels writing every output element, and its errors.

Run on a GPU machine (an H100 here); without a GPU every test is skipped with the reason.
"""

import numpy as np
import pytest

from qwen3moe import Qwen3MoeForCausalLM, Qwen3MoeInferTask, Qwen3MoeKVCache, backends
from qwen3moe.debug import NonFiniteError
from qwen3moe import reference_backend as ref
from qwen3moe.bundled import BUNDLED_MODEL
from qwen3moe.config import load_config
from qwen3moe.layers import AttentionSegment, RoutingOverride, rope_cos_sin
from qwen3moe.model import KVCache, Request
from qwen3moe.router_stats import RouterStats
from qwen3moe.sharding import plan_sharding, rank_config, shard_weights
from qwen3moe.synthetic import TINY_CONFIG, random_weights, write_checkpoint
from qwen3moe.weights import load_weights

REASON = backends.unavailable_reason("cupy")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the cupy backend cannot run here: {REASON}")
RTOL = 1e-4  # both sides read the same weights and accumulate in float32 (see test_backends.py)


@pytest.fixture(scope="module")
def cb():
    return backends.load("cupy")


def close(ours, expected, what):
    ours = ours if isinstance(ours, np.ndarray) else ours.get()
    assert np.isfinite(ours).all(), f"{what}: non-finite values (an element never written?)"
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def greedy(model: Qwen3MoeForCausalLM, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens through the model loop, step by step (a routing override that changes nothing keeps the rounds
    from being captured)."""
    task = Qwen3MoeInferTask(prompt, temperature=0, end_tokens=[], max_new_tokens=steps)
    task.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=len(prompt) + steps))
    model.routing_override = RoutingOverride()
    while not task.finished:
        model.batch_infer_one_round([task])
    model.routing_override = None
    return task.generated


@pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="the bundled model is not in this copy")
def test_graph_decoding_gives_the_reference_tokens_and_router_statistics():
    """generate() on the GPU decodes through the captured graph: 64 greedy tokens equal the reference's, and the
    router statistics it counted on the device equal the ones the reference counted on the host."""
    runs = {}
    for name in ("numpy", "cupy"):
        model = Qwen3MoeForCausalLM(backend=name, max_tokens=256)
        text, _ = model.generate("Speak of the sea.", max_steps=64, temperature=0)
        runs[name] = (model.last_task.generated, model.router_stats)
    assert runs["cupy"][0] == runs["numpy"][0]
    (_, ours), (_, theirs) = runs["cupy"], runs["numpy"]
    for layer in theirs.counts:
        assert ours.tokens[layer] == theirs.tokens[layer]
        np.testing.assert_array_equal(ours.counts[layer], theirs.counts[layer])
        np.testing.assert_allclose(ours.prob_sum[layer], theirs.prob_sum[layer], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.entropy_sum[layer], theirs.entropy_sum[layer], rtol=1e-4)


def test_graph_decoder_matches_step_by_step_decoding(cb, tiny_model_dir):
    """The graph decoder replays one captured step; each replay must advance position and token on the device."""
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend="cupy")
    prompt = np.random.default_rng().integers(0, 256, 9).tolist()
    expected = greedy(model, prompt, 40)
    task = Qwen3MoeInferTask(prompt, temperature=0, end_tokens=[], max_new_tokens=40)
    task.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=len(prompt) + 40))
    (first,) = model.batch_infer_one_round([task])
    decoder = cb.GreedyDecoder(model._state, task.kvcache, task.pos, first)
    tokens = [first] + [decoder.step() for _ in range(39)]
    assert tokens == expected
    with pytest.raises(ValueError, match="KV cache is full"):
        decoder.step(), decoder.step()


SAMPLING = [  # (temperature, topk, topp): greedy, then sampling with every filter on and off
    (0.0, 1, 1.0), (1.0, 0, 1.0), (0.8, 20, 0.9), (1.3, 5, 1.0), (0.6, 0, 0.7), (2.0, 1, 0.5),
]


@pytest.mark.parametrize("B, sampled", [(3, False), (20, False), (12, True)])
def test_batch_graph_decoder_matches_batch_rounds(cb, tiny_model_dir, B, sampled):
    """B sequences of different lengths decoded through one captured graph per step give the tokens of batch rounds
    through the model loop, and the router statistics those rounds count (the projections and experts take the
    tensor-core paths inside the graph: mma_batch.cu at 3 and 12 sequences, mma_few.cu at 20). Sampled rows draw on
    the device from their task's seeded generator: the same tokens as the host sampler of the rounds."""
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend="cupy")
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, int(rng.integers(1, 12))).tolist() for _ in range(B)]
    settings = [SAMPLING[j % len(SAMPLING)] if sampled else (0.0, 1, 1.0) for j in range(B)]
    seeds = rng.integers(0, 2**31, B).tolist()
    steps = 12
    runs = {}
    for way in ("graph", "rounds"):  # the rounds last: their prefill would count into the model's statistics
        tasks = [Qwen3MoeInferTask(p, *settings[j], end_tokens=[], max_new_tokens=steps, seed=seeds[j])
                 for j, p in enumerate(prompts)]
        for t in tasks:
            t.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=len(t.tokens) + steps))
        firsts = model.batch_infer_one_round(tasks)  # the prefill
        stats = RouterStats(model.config)
        if way == "rounds":
            model.reset_router_stats()
            model.routing_override = RoutingOverride()  # changes nothing, but keeps the rounds from being captured
            while not all(t.finished for t in tasks):
                model.batch_infer_one_round(tasks)
            runs[way] = ([t.generated for t in tasks], model.router_stats)
            continue
        sampling = [(t.temperature, t.topk, t.topp, t.rng) for t in tasks] if sampled else None
        decoder = cb.BatchDecoder(model._state, [t.kvcache for t in tasks], [t.pos for t in tasks], firsts, sampling)
        tokens = [[f] for f in firsts]
        for _ in range(steps - 1):
            for row, token in zip(tokens, decoder.step()):
                row.append(token)
        decoder.flush_stats(stats)
        runs[way] = (tokens, stats)
        with pytest.raises(ValueError, match="KV cache is full"):
            decoder.step(), decoder.step()  # each cache holds one more position
    (expected, theirs), (got, ours) = runs["rounds"], runs["graph"]
    assert got == expected
    for layer in theirs.counts:
        assert ours.tokens[layer] == theirs.tokens[layer] == B * (steps - 1)
        np.testing.assert_array_equal(ours.counts[layer], theirs.counts[layer])
        np.testing.assert_allclose(ours.prob_sum[layer], theirs.prob_sum[layer], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.entropy_sum[layer], theirs.entropy_sum[layer], rtol=1e-4)


def count_batch_decoders(cb, monkeypatch) -> list[int]:
    """The batch size of every BatchDecoder made from now on, in order."""
    made = []

    class Counted(cb.BatchDecoder):
        def __init__(self, state, caches, *args, **kwargs):
            made.append(len(caches))
            super().__init__(state, caches, *args, **kwargs)

    monkeypatch.setattr(cb, "BatchDecoder", Counted)
    return made


def test_batch_rounds_are_captured_and_replayed(cb, tiny_model_dir, monkeypatch):
    """batch_infer_one_round captures a round whose tasks decode and are the tasks of the round before, and replays it
    while they continue: as tasks finish and leave, the smaller set is captured again. Tokens and router statistics
    equal the model loop's (which a routing override that changes nothing forces), greedy and sampled tasks mixed."""
    made = count_batch_decoders(cb, monkeypatch)
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend="cupy")
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, int(rng.integers(1, 12))).tolist() for _ in range(6)]
    seeds = rng.integers(0, 2**31, 6).tolist()
    lengths = [3, 9, 9, 14, 14, 14]  # tasks leave after 3, 9 and 14 tokens
    runs = {}
    for way in ("loop", "captured"):
        model.reset_router_stats()
        model.routing_override = RoutingOverride() if way == "loop" else None
        tasks = [Qwen3MoeInferTask(p, *SAMPLING[j], end_tokens=[], max_new_tokens=lengths[j], seed=seeds[j])
                 for j, p in enumerate(prompts)]
        for t in tasks:
            t.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=len(t.tokens) + 14))
        running = tasks
        while running:
            model.batch_infer_one_round(running)
            running = [t for t in running if not t.finished]
        stats = model.router_stats
        runs[way] = ([t.generated for t in tasks], dict(stats.counts), dict(stats.tokens))  # reset() makes new ones
    assert made == [6, 5, 3]  # captured once per set of tasks, each on its first round after a change
    assert runs["captured"][0] == runs["loop"][0]
    assert runs["captured"][2] == runs["loop"][2]
    for layer, counts in runs["loop"][1].items():
        np.testing.assert_array_equal(runs["captured"][1][layer], counts)


class Fixed:
    """A stand-in for a numpy Generator whose next random() is u (what the reference sampler draws)."""

    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


def sample_on_device(cb, logits: np.ndarray, settings: list, uniform: np.ndarray, padding: int = 0, work=None,
                     team=None):
    """draw_next_tokens on (B, V) logits, rows ``padding`` NaNs apart (a split model's rows have padding), with
    ``team`` blocks a row for rows read whole: (tokens, the positions it advanced, the non-finite flag). ``work``: its
    workspace (None: a new one), whose teams' words must be 0 again afterwards."""
    import cupy as cp

    B, V = logits.shape
    padded = np.full((B, V + padding), np.nan, np.float32)  # past V: never read
    padded[:, :V] = logits
    temperature, topk, topp = (np.array(v) for v in zip(*settings))
    next_id, tok_pos, sampled = cp.full(B, -1, cp.int64), cp.zeros(B, cp.int32), cp.full(B + 1, -1, cp.int32)
    sampled[B] = 0
    work = work or cb.sampling_work(B)
    cb.draw_next_tokens(cp.asarray(padded), V, (cp.asarray(temperature, cp.float32), cp.asarray(topk, cp.int32),
                                                cp.asarray(topp, cp.float32)),
                        cp.asarray(uniform, cp.float32), next_id, tok_pos, sampled, work, team)
    tokens = sampled[:B].get()
    np.testing.assert_array_equal(next_id.get(), tokens)
    assert not work[2].any(), "a team left its barrier counters or sums behind"
    return tokens, tok_pos.get(), int(sampled[B].get())


def logit_rows(rng, B: int, V: int) -> np.ndarray:
    """Rows of logits of several kinds: spread out, peaked, rounded to few values (many ties), all equal."""
    rows = rng.standard_normal((B, V)).astype(np.float32) * rng.choice([0.5, 3.0, 10.0], (B, 1)).astype(np.float32)
    rows[1::4] = np.round(rows[1::4])  # ties everywhere
    rows[2::4, :V // 3] = -np.inf  # masked tokens, as a grammar would mask them
    rows[3::8] = 1.5  # every token ties
    return rows


@pytest.mark.parametrize("way", ["together", "one block a row", "one row at a time"])
@pytest.mark.parametrize("V, padding", [(384, 0), (1000, 2), (5000, 0), (151936, 0)])
def test_sample_rows_draws_what_the_reference_sampler_draws(cb, V, padding, way):
    """draw_next_tokens against qwen3moe.sampling.sample, from the same uniform number u, over every setting of
    SAMPLING and rows with ties, masked tokens and equal logits: the same token (the reference sorts the vocabulary;
    the kernels select by radix without moving anything, and sort only a small top-k set: top-k up to 64 from the
    candidates of 64 blocks, 65 over the whole row). Rows with padding after them are what a split model
    gathers. Rows read whole are split among a team of blocks: a few a row when all rows are drawn together, one,
    or as many as a batch of one gets (sample_team)."""
    from qwen3moe.sampling import sample

    rng = np.random.default_rng()
    settings = SAMPLING * 4 + [(0.9, 3, 1.0), (1.0, 0, 0.999), (0.7, 64, 0.95), (0.7, 65, 0.95), (1.0, V, 1.0),
                               (1.0, V + 5, 0.5)]
    B = len(settings)
    logits = logit_rows(rng, B, V)
    uniform = rng.random(B)
    uniform[:4] = [0.0, 0.999999, 0.5, 0.25]
    if way == "one row at a time":
        drawn = [sample_on_device(cb, logits[j:j + 1], settings[j:j + 1], uniform[j:j + 1], padding) for j in range(B)]
        tokens, advanced = (np.concatenate([d[i] for d in drawn]) for i in (0, 1))
        non_finite = max(d[2] for d in drawn)
    else:
        tokens, advanced, non_finite = sample_on_device(cb, logits, settings, uniform, padding,
                                                        team=1 if way == "one block a row" else None)
    expected = [sample(logits[j], *settings[j], Fixed(float(np.float32(uniform[j])))) for j in range(B)]
    assert tokens.tolist() == expected
    assert advanced.tolist() == [1] * B and non_finite == 0


def test_sample_rows_refuses_teams_that_cannot_all_be_resident(cb):
    """A team's blocks wait at barriers for each other: more blocks than multiprocessors could wait forever."""
    sms = cb.device_limits()[1]
    with pytest.raises(ValueError, match=f"at most {sms // 2} blocks a row"):
        sample_on_device(cb, np.zeros((2, 1000), np.float32), [(1.0, 0, 1.0)] * 2, np.zeros(2), team=sms // 2 + 1)


@pytest.mark.parametrize("setting", [(1.0, 0, 0.9), (0.6, 20, 0.95), (0.0, 1, 1.0)])
def test_sample_rows_flags_nan_and_infinite_logits(cb, setting):
    """Over the whole row (top-k of every token) and from the candidates (top-k 20, greedy); a later draw with the
    same workspace and finite logits is not flagged."""
    rng = np.random.default_rng()
    logits = rng.standard_normal((3, 5000)).astype(np.float32)
    work = cb.sampling_work(3)
    for bad in (np.nan, np.inf):
        poisoned = logits.copy()
        poisoned[1, 3210] = bad
        assert sample_on_device(cb, poisoned, [setting] * 3, rng.random(3), work=work)[2] == 1
        assert sample_on_device(cb, logits, [setting] * 3, rng.random(3), work=work)[2] == 0


@pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="the bundled model is not in this copy")
def test_sampled_generate_decodes_through_the_graph(monkeypatch):
    """generate() with sampling settings and a seed decodes through the captured graph (BatchDecoder, sampling on the
    device) and gives the text of the model loop with the host sampler (which a routing override that changes
    nothing forces)."""
    cb = backends.load("cupy")
    made = count_batch_decoders(cb, monkeypatch)
    model = Qwen3MoeForCausalLM(backend="cupy", max_tokens=256)
    settings = dict(temperature=0.9, topk=40, topp=0.95, seed=int(np.random.default_rng().integers(2**31)))
    graph_text, _ = model.generate("Speak of the sea.", max_steps=64, **settings)
    assert made, "generate did not decode through BatchDecoder"
    model.routing_override = RoutingOverride()
    loop_text, _ = model.generate("Speak of the sea.", max_steps=64, **settings)
    assert len(made) == 1
    assert graph_text == loop_text


@pytest.mark.parametrize("T", [1, 7, 40, 100])
@pytest.mark.parametrize("path", ["gemv", "few", "tiles", "batch"])
def test_kernels_write_every_output(cb, tiny_model_dir, T, path, monkeypatch):
    """Buffers poisoned with NaN before the kernels run: every element must be overwritten with the right value.
    Each kernel path computes the projections and the experts (at 40 tokens x top-2 over 8 experts the experts
    serve more than 8 picks each: several passes of mma_few.cu); "batch" is mma_batch.cu for every projection its
    workspace holds, with the experts on mma_few.cu; "tiles" at 100 tokens runs on wgmma_tiles.cu on Hopper (one
    partly filled 128-row tile of tokens; experts' tiles of 128 pairs). At one token the experts take their GEMV
    kernels on every path (expert_down_sum adding the picks into the hidden state)."""
    import cupy as cp

    batch = lambda s, tokens, K, N: "batch" if cb.batch_fits(s, tokens, K, N) else "few"
    monkeypatch.setattr(cb, "linear_path", batch if path == "batch" else lambda *args: path)
    if T > 1:  # one token's picks are listed by its router for the GEMV kernels, the only ones it takes
        monkeypatch.setattr(cb, "expert_path", lambda *args: "few" if path == "batch" else path)

    config = load_config(tiny_model_dir)
    weights = load_weights(tiny_model_dir, config)
    s, r = cb.prepare(weights, config), ref.prepare(weights, config)
    rng = np.random.default_rng()
    pos = 5
    capacity = pos + T + 4
    x = rng.standard_normal((T, config.hidden_size), dtype=np.float32)
    k0 = rng.standard_normal((capacity, config.num_key_value_heads, config.head_dim), dtype=np.float32)
    ref_k, ref_v = k0.copy(), k0[::-1].copy()
    expected = ref.attention_block(r, 1, x, *rope_cos_sin(np.arange(pos, pos + T), config.head_dim, config.rope_theta),
                                   [AttentionSegment(0, T, pos, ref_k, ref_v)])
    k, v = cp.asarray(k0), cp.asarray(k0[::-1].copy())
    plan = cb.AttentionPlan.build(config, [(0, T, pos)], pos + T)
    buffers = cb.AttentionBuffers.empty(T, config, plan.splits)
    for a in vars(buffers).values():
        if a.dtype == cp.float32:  # not the arrival counters, which must start at zero
            a.fill(np.nan)
    y = cp.asarray(x)
    addr = lambda a: cp.asarray(np.array([a.data.ptr], np.uint64))
    cb.attention_into(s, s.layers[1], y, plan, addr(k), addr(v), buffers)
    close(y, expected, "attention block")
    close(k, ref_k, "keys in the cache")
    close(v, ref_v, "values in the cache")

    expected, routing = ref.feed_forward_block(r, 1, x, config.num_experts_per_tok, None)
    b = cb.MoeBuffers.empty(T, config, config.num_experts_per_tok)
    for a in (b.xn, b.probs, b.act, b.out, b.grouping.pair_weight):
        a.fill(np.nan)
    y = cp.asarray(x)
    cb.moe_into(s, s.layers[1], y, config.num_experts_per_tok, None, b)
    close(y, expected, "MoE block")
    close(b.probs, routing.probs, "router probabilities")
    assert b.topk_ids.get().tolist() == routing.experts.tolist()

    assert not config.is_moe_layer(0)  # the dense MLP: the expert kernels with one expert
    expected, _ = ref.feed_forward_block(r, 0, x, config.num_experts_per_tok, None)
    d = cb.DenseBuffers.empty(T, config)
    for a in (d.xn, d.act, d.out):
        a.fill(np.nan)
    y = cp.asarray(x)
    cb.dense_mlp_into(s, s.layers[0], y, d)
    close(y, expected, "dense MLP block")

    logits = cp.full((T, config.vocab_size), np.nan, cp.float32)
    cb.linear(s, cp.asarray(x), s.lm_head, logits, norm=s.norm, rows_per_block=64)
    close(logits, ref.final_logits(r, x), "logits")


@pytest.mark.parametrize("shape", ["tiny", "top-8"])
def test_one_token_down_sum_gives_the_bits_of_expert_down_and_moe_combine(cb, tiny_model_dir, tmp_path, shape):
    """At one token the experts' down product adds the weighted picks into x itself (expert_down_sum), in place of
    expert_down + moe_combine: on fresh random inputs, x must come out with the same bits, for a MoE layer (8 picks
    at "top-8", over a hidden size that leaves the last block part of its rows) and for the dense MLP (one pick,
    weight 1), and the MoE block must still match the reference."""
    import cupy as cp

    top8 = dict(TINY_CONFIG, hidden_size=260, num_experts=16, num_experts_per_tok=8, moe_intermediate_size=96,
                num_hidden_layers=2)
    folder = tiny_model_dir if shape == "tiny" else write_checkpoint(tmp_path / "m", top8, random_weights(top8))
    config = load_config(folder)
    weights = load_weights(folder, config)
    s, r = cb.prepare(weights, config), ref.prepare(weights, config)
    K, i = config.num_experts_per_tok, config.moe_layers[0]
    x = np.random.default_rng().standard_normal((1, config.hidden_size), dtype=np.float32)
    expected, routing = ref.feed_forward_block(r, i, x, K, None)
    b = cb.MoeBuffers.empty(1, config, K)
    y = cp.asarray(x)
    cb.moe_into(s, s.layers[i], y, K, None, b)
    close(y, expected, "MoE block of one token")
    assert b.topk_ids.get().tolist() == routing.experts.tolist()

    d = cb.DenseBuffers.empty(1, config)
    cb.rms_norm(s, cp.asarray(x), s.layers[i].post_norm, b.xn)  # (route_gate_up normalised x in shared memory only)
    cb.rms_norm(s, cp.asarray(x), s.layers[0].post_norm, d.xn)
    for layer, xn, g, slots, ids, act, out in ((s.layers[i], b.xn, b.grouping, K, b.topk_ids, b.act, b.out),
                                               (s.layers[0], d.xn, d.grouping, 1, None, d.act, d.out)):
        y_apart, y_fused = cp.asarray(x), cp.asarray(x)
        out.fill(np.nan)
        cb.swiglu_experts_into(s, layer, xn, g, act, out, slots, slots)
        cb.combine(s, y_apart, out, ids)
        cb.swiglu_experts_into(s, layer, xn, g, act, out, slots, slots, (y_fused, ids))
        assert np.isfinite(y_apart.get()).all()
        np.testing.assert_array_equal(y_fused.get(), y_apart.get())


@pytest.mark.parametrize("E, top_k, H", [(128, 8, 2048), (60, 4, 72), (512, 10, 256), (8, 2, 20)])
@pytest.mark.parametrize("variant", ["whole", "normed", "disabled", "rank"])
def test_one_token_router_matches_the_reference_router(cb, E, top_k, H, variant):
    """The router at one token (its projection with the norm fused, then route_topk, which writes the picks as the
    expert kernels' slots) against the reference router on fresh random inputs, twice in a row: probabilities, the
    chosen experts, their weights, the experts' normalised input, the slots and the device-side statistics (summed
    over both). E = 60 leaves the last projection block part of its experts; 512 is the most route_topk takes.
    "normed": the input comes normalised already (as from a split model's all-reduce); "disabled": masked experts,
    among them the favourite, and norm_topk_prob off; "rank": only the picks of experts [E/4, E/2) become slots."""
    import cupy as cp
    from qwen3moe.config import config_from_dict
    from qwen3moe.layers import rms_norm, route

    c = config_from_dict(dict(TINY_CONFIG, hidden_size=H, num_experts=E, num_experts_per_tok=top_k,
                              norm_topk_prob=variant != "disabled"))
    lo, hi = (E // 4, E // 2) if variant == "rank" else (0, E)
    s = cb.State(c, "bf16_t", None, [], None, None, None, expert_lo=lo, expert_hi=hi)
    rng = np.random.default_rng()
    gate = round_to_bf16(rng.standard_normal((E, H), dtype=np.float32) * np.float32(4 / np.sqrt(H)))
    norm = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    stats = (cp.zeros(E, cp.uint64), cp.zeros(E, cp.float64), cp.zeros(1, cp.float64))
    b = cb.MoeBuffers.empty(1, c, top_k)
    counts, prob_sum, entropy = np.zeros(E), np.zeros(E), 0.0
    for _ in range(2):
        x = rng.standard_normal((1, H), dtype=np.float32)
        xn = rms_norm(x, norm, c.rms_norm_eps)
        disabled = None
        if variant == "disabled":
            disabled = rng.random(E) < 0.3
            disabled[int(np.argmax(xn @ gate.T))] = True
        expected = route(xn, gate, top_k, c.norm_topk_prob, disabled)
        for a in (b.xn, b.probs, b.grouping.pair_weight):
            a.fill(np.nan)
        if variant == "normed":
            b.xn[...] = cp.asarray(xn)
        cb.route(s, cp.asarray(bf16_bits(gate)), cp.asarray(norm), cp.asarray(x), top_k,
                 None if disabled is None else cp.asarray(disabled.astype(np.uint8)), b, stats,
                 normed=variant == "normed")
        close(b.probs, expected.probs, "router probabilities")
        picks = expected.experts[0].tolist()
        assert b.topk_ids.get()[0].tolist() == picks
        close(b.grouping.pair_weight, expected.weights[0], "routing weights")
        close(b.xn, xn, "the experts' normalised input")
        held = [j for j, e in enumerate(picks) if lo <= e < hi]
        g = b.grouping
        assert int(g.n_slots.get()[0]) == len(held)
        assert g.slot_expert.get()[:len(held)].tolist() == [picks[j] - lo for j in held]
        assert g.pair_src.get()[:len(held)].tolist() == held
        assert g.slot_offset.get()[:len(held) + 1].tolist() == list(range(len(held) + 1))
        np.add.at(counts, picks, 1)
        prob_sum += expected.probs[0]
        p = expected.probs[0]
        entropy -= float(np.sum(p * np.log(np.maximum(p, 1e-30))))
    assert stats[0].get().tolist() == counts.tolist()
    np.testing.assert_allclose(stats[1].get(), prob_sum, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats[2].get()[0], entropy, rtol=1e-5)


@pytest.mark.parametrize("E, top_k, H", [(128, 8, 256), (60, 4, 72), (8, 2, 20)])
@pytest.mark.parametrize("variant", ["whole", "disabled"])
def test_one_token_routing_and_gate_up_in_one_kernel(cb, tmp_path, E, top_k, H, variant):
    """The MoE block of one token on a model that holds every expert: the router's projection, then route_gate_up
    (every block routes the token itself and computes its pick's gate/up rows; block (0, 0) writes the routing out),
    then expert_down_sum. Against the reference on fresh random inputs, twice in a row: the block's output, the
    probabilities, the chosen experts and their weights, the picks as slots (n_slots is not written by the kernel and
    must hold top_k from the buffers' creation), and the device-side statistics summed over both. E = 60 leaves the
    last projection block part of its experts; "disabled": masked experts, among them the favourite, and
    norm_topk_prob off."""
    import cupy as cp
    from qwen3moe.config import config_from_dict

    config = dict(TINY_CONFIG, hidden_size=H, num_experts=E, num_experts_per_tok=top_k, num_hidden_layers=1,
                  mlp_only_layers=[], norm_topk_prob=variant != "disabled")
    c = config_from_dict(config)
    weights = load_weights(write_checkpoint(tmp_path / "m", config, random_weights(config)), c)
    s, r = cb.prepare(weights, c), ref.prepare(weights, c)
    launched = []
    real_kernel = cb.kernel
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cb, "kernel", lambda file, name: launched.append(name) or real_kernel(file, name))
        rng = np.random.default_rng()
        stats = (cp.zeros(E, cp.uint64), cp.zeros(E, cp.float64), cp.zeros(1, cp.float64))
        b = cb.MoeBuffers.empty(1, c, top_k)
        counts, prob_sum, entropy = np.zeros(E), np.zeros(E), 0.0
        for _ in range(2):
            x = rng.standard_normal((1, H), dtype=np.float32)
            disabled = None
            if variant == "disabled":
                disabled = rng.random(E) < 0.3
                disabled[ref.feed_forward_block(r, 0, x, top_k, None)[1].experts[0][0]] = True
            expected, routing = ref.feed_forward_block(r, 0, x, top_k, disabled)
            for a in (b.probs, b.act, b.grouping.pair_weight):
                a.fill(np.nan)
            y = cp.asarray(x)
            cb.moe_into(s, s.layers[0], y, top_k, None if disabled is None else cp.asarray(disabled.astype(np.uint8)),
                        b, stats)
            close(y, expected, "MoE block of one token")
            close(b.probs, routing.probs, "router probabilities")
            picks = routing.experts[0].tolist()
            assert b.topk_ids.get()[0].tolist() == picks
            close(b.grouping.pair_weight, routing.weights[0], "routing weights")
            g = b.grouping
            assert int(g.n_slots.get()[0]) == top_k
            assert g.slot_expert.get().tolist() == picks
            assert g.pair_src.get().tolist() == g.slot_offset.get()[:top_k].tolist() == list(range(top_k))
            np.add.at(counts, picks, 1)
            prob_sum += routing.probs[0]
            entropy -= float(np.sum(routing.probs[0] * np.log(np.maximum(routing.probs[0], 1e-30))))
    assert "route_topk" not in " ".join(launched) and any(name.startswith("route_gate_up") for name in launched)
    assert stats[0].get().tolist() == counts.tolist()
    np.testing.assert_allclose(stats[1].get(), prob_sum, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats[2].get()[0], entropy, rtol=1e-5)


@pytest.mark.parametrize("capacity", [700, 1700], ids=["inside", "apart"])
@pytest.mark.parametrize("heads, head_dim", [((32, 4), 128), ((6, 2), 18)])
def test_decoding_attention_block_matches_the_reference(cb, tmp_path, heads, head_dim, capacity):
    """A decoding step (each sequence's tokens in one tile) over short caches leaves the q/k-norm, RoPE and cache
    write to the attention kernel itself ("inside": the block of the split that holds a token's position writes its
    key and value before it stages them); over long ones qk_norm_rope_cache does them first ("apart"). The attention
    block against the reference's on fresh random caches, for sequences whose new key is the first of a split (the
    only one of its block), the last of one, at position 0, at the cache's end, and a few tokens in one tile that
    cross a split boundary; run twice (the arrival counters must be back at zero)."""
    c, s, r = one_attention_layer(cb, tmp_path, heads, head_dim)
    lengths = [1, 1, 1, 1, 1, 3]
    starts = np.cumsum([0] + lengths)
    chunk = cb.AttentionPlan.build(c, [(a, b, 0) for a, b in zip(starts, starts[1:])], capacity).chunk
    firsts = [chunk, chunk - 1, 0, capacity - 1, 2 * chunk + 5, 2 * chunk - 2]  # the last: 2c-2, 2c-1, 2c
    segments = [(a, b, p) for a, b, p in zip(starts, starts[1:], firsts)]
    plan = cb.AttentionPlan.build(c, segments, capacity)
    assert plan.chunk == chunk and plan.splits > 2
    assert plan.norm_rope_inside == (capacity <= cb.NORM_ROPE_INSIDE_MAX_KEYS)
    assert not cb.AttentionPlan.build(c, [(0, 40, 0)], 700, tensor_cores=False).norm_rope_inside  # many tiles
    attention_block_twice(cb, s, r, plan, segments, capacity)


def one_attention_layer(cb, tmp_path, heads: tuple[int, int], head_dim: int):
    """A one-layer model of (query, kv) ``heads`` and ``head_dim`` with random weights: (config, the cupy backend's
    state, the reference's)."""
    from qwen3moe.config import config_from_dict

    config = dict(TINY_CONFIG, num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=head_dim,
                  num_hidden_layers=1, mlp_only_layers=[0])
    c = config_from_dict(config)
    weights = load_weights(write_checkpoint(tmp_path / "m", config, random_weights(config)), c)
    return c, cb.prepare(weights, c), ref.prepare(weights, c)


def attention_block_twice(cb, s, r, plan, segments: list, capacity: int) -> None:
    """Layer 0's attention block of ``plan`` over fresh random caches (one per segment) against the reference's, run
    twice (the arrival counters must be back at zero): its output, and the keys and values it writes into the
    caches."""
    import cupy as cp

    c, rng = s.config, np.random.default_rng()
    T, Hkv, D = segments[-1][1], c.num_key_value_heads, c.head_dim
    caches = [(rng.standard_normal((capacity, Hkv, D), dtype=np.float32),
               rng.standard_normal((capacity, Hkv, D), dtype=np.float32)) for _ in segments]
    x = rng.standard_normal((T, c.hidden_size), dtype=np.float32)
    positions = np.concatenate([np.arange(p, p + b - a) for a, b, p in segments])
    ref_caches = [(k.copy(), v.copy()) for k, v in caches]
    expected = ref.attention_block(r, 0, x, *rope_cos_sin(positions, D, c.rope_theta),
                                   [AttentionSegment(a, b, p, k, v) for (a, b, p), (k, v) in zip(segments, ref_caches)])
    device = [(cp.asarray(k), cp.asarray(v)) for k, v in caches]
    addr = lambda arrays: cp.asarray(np.array([a.data.ptr for a in arrays], np.uint64))
    buffers = cb.AttentionBuffers.empty(T, c, plan.splits)
    for _ in range(2):
        for a in vars(buffers).values():
            if a.dtype == cp.float32:
                a.fill(np.nan)
        y = cp.asarray(x)
        cb.attention_into(s, s.layers[0], y, plan, addr([k for k, _ in device]), addr([v for _, v in device]),
                          buffers)
        close(y, expected, "attention block")
        for (k, v), (ref_k, ref_v) in zip(device, ref_caches):
            close(k, ref_k, "keys in the cache")
            close(v, ref_v, "values in the cache")


def one_token_steps(cb, c, capacity: int, later: tuple[int, int], **kernel):
    """A step of one token for each of seven sequences over caches of ``capacity`` positions, whose new keys are the
    first of a split, the last of one, ``later`` keys past a split's first (in a warp's later rounds), at position 0,
    at the cache's end and past the second split's first: (segments, the plan of ``kernel``). The chunk does not
    depend on the positions."""
    chunk = cb.AttentionPlan.build(c, [(j, j + 1, 0) for j in range(7)], capacity, **kernel).chunk
    firsts = [chunk, chunk - 1, 0, capacity - 1, *(chunk + n for n in later), min(2 * chunk + 5, capacity - 2)]
    segments = [(j, j + 1, p) for j, p in enumerate(firsts)]
    plan = cb.AttentionPlan.build(c, segments, capacity, **kernel)
    assert plan.chunk == chunk
    return segments, plan


@pytest.mark.parametrize("capacity", [300, 1500])
@pytest.mark.parametrize("heads, head_dim", [((32, 4), 128), ((8, 2), 64)])
def test_attention_over_query_heads_matches_the_reference(cb, tmp_path, heads, head_dim, capacity):
    """attention_heads (a block per (split, query head, token), for steps of one token per sequence over short caches)
    against the reference's attention block, on fresh random caches: new keys that are the first of a split, the last
    of one, the first of a warp's round past the block's first, at position 0 and at the cache's end; each block of a
    split computes the new key itself and the first query head's block writes it, so the caches must match too. Run
    twice: the arrival counters must be back at zero. Also which plans take it."""
    c, s, r = one_attention_layer(cb, tmp_path, heads, head_dim)
    segments, plan = one_token_steps(cb, c, capacity, (32, 63), query_heads=True)
    assert plan.query_heads and plan.norm_rope_inside and plan.splits >= 2
    # which plans take it by themselves: steps of one token per sequence up to QUERY_HEADS_MAX_KEYS cached positions
    # in all, not more, nor a step with more than one token of a sequence
    most = cb.QUERY_HEADS_MAX_KEYS
    assert cb.AttentionPlan.build(c, [(0, 1, 0), (1, 2, 0)], most // 2).query_heads
    assert not cb.AttentionPlan.build(c, [(0, 1, 0), (1, 2, 0)], most // 2 + 1).query_heads
    assert not cb.AttentionPlan.build(c, [(0, 2, 0)], capacity).query_heads
    with pytest.raises(ValueError, match="one token per sequence"):
        cb.AttentionPlan.build(c, [(0, 2, 0)], capacity, query_heads=True)
    attention_block_twice(cb, s, r, plan, segments, capacity)


@pytest.mark.parametrize("capacity", [300, 2100])
@pytest.mark.parametrize("heads, head_dim", [((32, 4), 128), ((8, 2), 64), ((64, 4), 128), ((16, 2), 64)])
def test_attention_over_groups_of_query_heads_matches_the_reference(cb, tmp_path, heads, head_dim, capacity):
    """attention_group (a block per (split, kv head, token) scoring each key for the kv head's G query heads at once,
    for steps of one token per sequence over long caches) against the reference's attention block, on fresh random
    caches, for G = 4, 8 and 16: new keys that are the first of a split, the last of one, in a warp's later rounds, at
    position 0 and at the cache's end; the block of the new key's split writes it into the caches, which must match
    too. Run twice: the arrival counters must be back at zero. Also which plans take it."""
    c, s, r = one_attention_layer(cb, tmp_path, heads, head_dim)
    segments, plan = one_token_steps(cb, c, capacity, (33, 70), group_heads=True)
    assert plan.group_heads and not plan.query_heads and plan.norm_rope_inside and plan.splits >= 2
    # which plans take it by themselves: steps of one token per sequence over caches of more than QUERY_HEADS_MAX_KEYS
    # positions each (attention_heads takes those up to it in all, attention the rest), not steps with more than one
    # token of a sequence
    most = cb.QUERY_HEADS_MAX_KEYS
    assert cb.AttentionPlan.build(c, [(0, 1, 0)], most + 1).group_heads
    assert cb.AttentionPlan.build(c, [(0, 1, 0), (1, 2, 0)], most + 1).group_heads
    assert cb.AttentionPlan.build(c, [(0, 1, 0)], most).query_heads
    plan_apart = cb.AttentionPlan.build(c, [(0, 1, 0), (1, 2, 0)], most // 2 + 1)
    assert not plan_apart.group_heads and not plan_apart.query_heads
    assert not cb.AttentionPlan.build(c, [(0, 2, 0)], most + 1).group_heads
    with pytest.raises(ValueError, match="one token per sequence"):
        cb.AttentionPlan.build(c, [(0, 2, 0)], capacity, group_heads=True)
    attention_block_twice(cb, s, r, plan, segments, capacity)


def test_attention_over_groups_takes_only_the_group_sizes_it_is_compiled_for(cb, tmp_path):
    """Three query heads per kv head: attention_group is not compiled for it; asked for, the plan says so, and a long
    cache takes another kernel by itself."""
    c, _, _ = one_attention_layer(cb, tmp_path, (6, 2), 64)
    with pytest.raises(ValueError, match="query heads per kv head"):
        cb.AttentionPlan.build(c, [(0, 1, 0)], 4000, group_heads=True)
    assert not cb.AttentionPlan.build(c, [(0, 1, 0)], 4000).group_heads


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("experts", ["ep", "etp"])
def test_a_rank_adds_only_the_picks_of_its_own_experts(cb, tiny_model_dir, T, experts):
    """Each rank's MoE block adds only its part and only rank 0 the residual, so the ranks' parts add up to the whole
    block. Expert parallelism: a rank adds only the picks of its block of experts (the others' rows of the picks and
    activation buffers are never written; poisoned with NaN here, they must not leak in); at one token route_gate_up
    marks the other ranks' picks and expert_down_sum skips them, at 7 the grouping kernel lists the rank's picks.
    Expert tensor parallelism: a rank holds a slice of every expert's intermediate rows."""
    import cupy as cp

    config = load_config(tiny_model_dir)
    weights = load_weights(tiny_model_dir, config)
    plan = plan_sharding(config, 2, experts)
    i = config.moe_layers[0]
    x = np.random.default_rng().standard_normal((T, config.hidden_size), dtype=np.float32)
    expected, _ = ref.feed_forward_block(ref.prepare(weights, config), i, x.copy(), config.num_experts_per_tok, None)
    total = np.zeros_like(x)
    for r in range(plan.ndev):
        s = cb.prepare(shard_weights(weights, plan, r), rank_config(plan, r), plan.ranks[r])
        b = cb.MoeBuffers.empty(T, s.config, config.num_experts_per_tok)
        b.out.fill(np.nan)
        b.act.fill(np.nan)
        y = cp.asarray(x)
        cb.moe_into(s, s.layers[i], y, config.num_experts_per_tok, None, b)
        total += y.get()
    close(total, expected, "the ranks' MoE blocks added up")


@pytest.mark.parametrize("path, T, K, N", [("batch", 16, 2048, 5120), ("batch", 9, 800, 200), ("batch", 2, 96, 130),
                                           ("batch", 8, 4096, 64), ("tiles", 300, 2048, 5120), ("tiles", 129, 96, 200),
                                           ("tiles", 65, 32, 520), ("tiles", 40, 2048, 5120),
                                           ("tiles", 100, 4096, 600)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("wgmma", [False, True], ids=["", "wgmma"])
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_projection_matches_float64(cb, path, T, K, N, with_residual, wgmma, precision, monkeypatch):
    """mma_batch.cu and matmul.cu against a float64 product on fresh random bf16 weights. mma_batch.cu: K split over
    1-16 blocks (the last split short when K is not a multiple of 256), rows that are not a whole number of blocks,
    token counts that fill one or two eight-token tiles wholly or partly. matmul.cu: K of 1, 3 and 64 pipeline
    steps (fewer than its stages, and more), tokens and outputs that end inside a tile, and K split where the tiles
    are few (13 splits of 5 steps, the last 4; 19 of 7, the last 2, as many as the workspace holds); on Hopper the
    same products of more than 64 tokens again on wgmma_tiles.cu's 128-row tiles (``wgmma``). The residual
    added in place. Launched twice: mma_batch.cu's arrival counters must be back at zero after a launch. The output
    is poisoned with NaN first. Tolerance: 4e-5 of the products' root sum of squares, the scale of the rounding
    errors' random walk
    (hi/lo products accumulated in float32: at K = 2048 errors up to ~5.5e-4 are seen, by mma_few.cu too, against a
    bound of ~1.8e-3; a lost split, step or token would be off by ~10). Precision "bf16": the tile products must
    equal the float64 product of the activations rounded to bf16 to the same bound (a tile that still split them
    would be off by ~1e-2, beyond it); mma_batch.cu keeps the split products at any precision."""
    import cupy as cp

    if wgmma and (path != "tiles" or T <= cb.FEW_TOKENS):
        pytest.skip("wgmma_tiles.cu takes tile products of more than 64 tokens")
    if wgmma and not cb.hopper():
        pytest.skip("wgmma_tiles.cu runs on compute capability 9.0 (H100, H200) only")
    if not wgmma:
        monkeypatch.setattr(cb, "hopper", lambda: False)  # matmul.cu's tiles, whatever the GPU
    assert cb.tile_rows(T) == (cb.WGMMA_TILE if wgmma else cb.TILE)
    rng = np.random.default_rng()
    layer = cb.Layer(*(None,) * 8, router=None)
    layer.qkv, layer.o_proj = cp.empty((N, K), cp.uint16), cp.empty((N, K), cp.uint16)
    s = cb.State(None, "bf16_t", None, [layer], None, None, None, precision=precision)
    assert cb.linear_path(s, T, K, N) == path
    w = bf16_bits(rng.standard_normal((N, K), dtype=np.float32))
    w64 = (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    x = rng.standard_normal((T, K), dtype=np.float32)
    residual = rng.standard_normal((T, N), dtype=np.float32)
    taken = round_to_bf16(x) if precision == "bf16" and path == "tiles" else x
    expected = taken.astype(np.float64) @ w64.T + (residual if with_residual else 0)
    bound = 4e-5 * np.sqrt(x.astype(np.float64) ** 2 @ (w64 ** 2).T) + 1e-6 * np.abs(expected)
    for _ in range(2):
        out = cp.asarray(residual) if with_residual else cp.full((T, N), np.nan, cp.float32)
        cb.linear(s, cp.asarray(x), cp.asarray(w), out, residual=out if with_residual else None)
        ours = out.get()
        assert np.isfinite(ours).all()
        worst = np.unravel_index(np.argmax(np.abs(ours - expected) / bound), ours.shape)
        assert np.all(np.abs(ours - expected) <= bound), f"at {worst}: {ours[worst]} against {expected[worst]}"


@pytest.mark.parametrize("K, N", [(2048, 5120), (4096, 2048), (2048, 20000), (96, 130), (40, 7), (36, 10)],
                         ids=["qkv", "o_proj", "refilled", "small", "few-packs", "not-packs"])
@pytest.mark.parametrize("wtype", ["bf16_t", "float"])
@pytest.mark.parametrize("norm, with_residual", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("kernel", ["linear_streamed", "linear"])
def test_one_token_projection_matches_float64(cb, K, N, wtype, norm, with_residual, kernel, monkeypatch):
    """linear.cu at one token, both kernels: ``linear_streamed`` (Hopper; the backend gives it only the lm_head, here
    every shape) and ``linear``, against float64 on fresh random weights (bf16 or float32), with the RMSNorm fused,
    or the residual added in place. Shapes: the q/k/v and o_proj of Qwen3-30B-A3B; 20000 rows, so that each warp of
    linear_streamed refills its slots (19 rows a warp; 6 slots of bf16 rows of 2048, 3 of float32 ones); rows
    shorter than a warp's 32 packs, rows fewer than a block's warps, and (36, bf16) rows that are not whole 16-byte
    packs, which linear_streamed leaves to ``linear``. The output is poisoned with NaN first. Tolerance as in
    test_projection_matches_float64 (float32 sums of K products: errors ~1e-6 of the products' root sum of squares;
    a lost or misplaced row or pack would be off by ~1)."""
    import types
    import cupy as cp

    monkeypatch.setattr(cb, "STREAM_MIN_WEIGHTS", 0)
    if kernel == "linear_streamed" and cb.streamed(wtype, K, N) is None:
        pytest.skip("linear_streamed runs on compute capability 9.0 and later, on rows of whole 16-byte packs")
    if kernel == "linear":
        monkeypatch.setattr(cb, "streamed", lambda *args: None)
    rng = np.random.default_rng()
    eps = 1e-6
    s = cb.State(types.SimpleNamespace(rms_norm_eps=eps), wtype, None, [], None, None, None)
    assert cb.linear_path(s, 1, K, N) == "gemv"
    if wtype == "bf16_t":
        bits = bf16_bits(rng.standard_normal((N, K), dtype=np.float32))
        w, w64 = cp.asarray(bits), (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        w64 = rng.standard_normal((N, K), dtype=np.float32)
        w, w64 = cp.asarray(w64), w64.astype(np.float64)
    x = rng.standard_normal((1, K), dtype=np.float32) * 3
    g = rng.uniform(0.5, 1.5, K).astype(np.float32)
    residual = rng.standard_normal((1, N), dtype=np.float32)
    taken = x.astype(np.float64)
    if norm:
        taken = taken / np.sqrt(np.mean(taken ** 2) + eps) * g
    expected = taken @ w64.T + (residual if with_residual else 0)
    bound = 4e-5 * np.sqrt(taken ** 2 @ (w64 ** 2).T) + 1e-6 * np.abs(expected)
    out = cp.asarray(residual) if with_residual else cp.full((1, N), np.nan, cp.float32)
    cb.linear(s, cp.asarray(x), w, out, norm=cp.asarray(g) if norm else None,
              residual=out if with_residual else None)
    ours = out.get()
    assert np.isfinite(ours).all()
    worst = np.unravel_index(np.argmax(np.abs(ours - expected) / bound), ours.shape)
    assert np.all(np.abs(ours - expected) <= bound), f"at {worst}: {ours[worst]} against {expected[worst]}"


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 (to nearest even, as the GPU's cvt.rn.bf16x2.f32), as their 16 bits."""
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16, as float32."""
    return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)


def test_long_context_attention_uses_many_splits(cb, tiny_model_dir):
    """Decode against a long cache: the keys are split across blocks and merged (flash-decoding)."""
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend="cupy")
    reference = Qwen3MoeForCausalLM(tiny_model_dir, backend="numpy")
    prompt = np.random.default_rng().integers(0, 256, 300).tolist()
    plan = cb.AttentionPlan.build(model.config, [(0, 1, 299)], 300)
    assert plan.splits > 1
    assert greedy(model, prompt, 8) == greedy(reference, prompt, 8)


@pytest.mark.parametrize("heads, head_dim", [((32, 4), 128), ((6, 2), 18)])
@pytest.mark.parametrize("decode", [True, False])
def test_attention_kernel_matches_float64_attention(cb, heads, head_dim, decode):
    """attention.cu against plain float64 attention on fresh random caches: one-token rows of sequences of many
    lengths (decoding: keys split over many blocks, the last to finish merging them; sequences whose keys all sit in
    one split; splits past a sequence's end), or those mixed with multi-token chunks whose rows see different key
    ranges (rows that see nothing of a split). Qwen3's shapes, and a head_dim that is not a multiple of 4."""
    import cupy as cp
    from qwen3moe.config import config_from_dict

    c = config_from_dict(dict(TINY_CONFIG, num_attention_heads=heads[0], num_key_value_heads=heads[1],
                              head_dim=head_dim))
    Hq, Hkv, D, G = c.num_attention_heads, c.num_key_value_heads, c.head_dim, heads[0] // heads[1]
    rng = np.random.default_rng()
    capacity = 1100
    lengths = [(1, 1099), (1, 0), (1, 40), (1, 511)] + ([] if decode else [(5, 318), (9, 0), (3, 777)])
    segments, row = [], 0
    for n, first in lengths:
        segments.append((row, row + n, first))
        row += n
    caches = [(rng.standard_normal((capacity, Hkv, D), dtype=np.float32),
               rng.standard_normal((capacity, Hkv, D), dtype=np.float32)) for _ in segments]
    q = rng.standard_normal((row, Hq, D), dtype=np.float32)
    plan = cb.AttentionPlan.build(c, segments, capacity, tensor_cores=False, query_heads=False,
                                  group_heads=False)
    assert plan.splits >= 4 and (decode or 320 % plan.chunk == 0)  # the 5-token chunk straddles a split
    b = cb.AttentionBuffers.empty(row, c, plan.splits)
    for a in vars(b).values():
        if a.dtype == cp.float32:
            a.fill(np.nan)
    b.q[...] = cp.asarray(q)
    device = [(cp.asarray(k), cp.asarray(v)) for k, v in caches]
    addr = lambda arrays: cp.asarray(np.array([a.data.ptr for a in arrays], np.uint64))
    for _ in range(2):  # twice: the arrival counters must be back at zero after a launch
        cb.attend(c, plan, addr([k for k, _ in device]), addr([v for _, v in device]), b)
    close(b.attn.reshape(row, Hq, D), float64_attention(q, segments, caches, G), "attention")


def float64_attention(q: np.ndarray, segments: list, caches: list, G: int) -> np.ndarray:
    """Causal grouped-query attention in float64: row t of segment (start, stop, first) sits at position
    first + t - start of its sequence and sees that sequence's keys up to it; query head h reads kv head h // G."""
    T, Hq, D = q.shape
    expected = np.empty((T, Hq, D))
    for (start, stop, first), (k, v) in zip(segments, caches):
        for t in range(start, stop):
            seen = first + t - start + 1
            for h in range(Hq):
                scores = k[:seen, h // G].astype(np.float64) @ q[t, h].astype(np.float64) / np.sqrt(D)
                p = np.exp(scores - scores.max())
                expected[t, h] = p @ v[:seen, h // G] / p.sum()
    return expected


@pytest.mark.parametrize("heads, head_dim", [((32, 4), 128), ((6, 2), 64), ((4, 4), 128)])
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_prefill_attention_kernel_matches_float64_attention(cb, heads, head_dim, precision):
    """attention_mma.cu against plain float64 attention on fresh random caches: prompts of several sequences in one
    step, some starting after keys already cached (a chunked prefill), with 64-token tiles whole and partial; 8 query
    heads per kv head (two heads a block), 3 and 1 (one a block); head_dim 128 and 64, the two compiled. Precision
    "bf16" rounds q, k, v and the probabilities to bf16 before each product: within 1e-2 of the largest output
    (errors of ~2e-3 are seen; a wrong key, mask or scale is off by ~1)."""
    import cupy as cp
    from qwen3moe.config import config_from_dict

    c = config_from_dict(dict(TINY_CONFIG, num_attention_heads=heads[0], num_key_value_heads=heads[1],
                              head_dim=head_dim))
    Hq, Hkv, D, G = c.num_attention_heads, c.num_key_value_heads, c.head_dim, heads[0] // heads[1]
    rng = np.random.default_rng()
    capacity = 1100
    segments, row = [], 0
    for n, first in [(130, 0), (17, 300), (64, 0), (70, 1000)]:
        segments.append((row, row + n, first))
        row += n
    caches = [(rng.standard_normal((capacity, Hkv, D), dtype=np.float32),
               rng.standard_normal((capacity, Hkv, D), dtype=np.float32)) for _ in segments]
    q = rng.standard_normal((row, Hq, D), dtype=np.float32)
    plan = cb.AttentionPlan.build(c, segments, capacity)
    assert plan.tensor_cores
    b = cb.AttentionBuffers.empty(row, c, plan.splits)
    b.attn.fill(np.nan)
    b.q[...] = cp.asarray(q)
    addr = lambda arrays: cp.asarray(np.array([a.data.ptr for a in arrays], np.uint64))
    device = [(cp.asarray(k), cp.asarray(v)) for k, v in caches]
    cb.attend(c, plan, addr([k for k, _ in device]), addr([v for _, v in device]), b, precision)
    expected = float64_attention(q, segments, caches, G)
    if precision == "float32":
        close(b.attn.reshape(row, Hq, D), expected, "prefill attention")
        return
    ours = b.attn.reshape(row, Hq, D).get()
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-2 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("wgmma", [False, True], ids=["", "wgmma"])
def test_bf16_precision_prefill_stays_within_bf16_rounding_of_the_reference(cb, tmp_path, wgmma, dtype,
                                                                            monkeypatch):
    """Precision "bf16" end to end: the logits of a 100-token prompt against the float32 reference, through the tile
    products (on wgmma_tiles.cu's 128-row tiles on Hopper, else matmul.cu's) and prefill attention (head_dim 64:
    attention_mma.cu), all with bf16 activations: within 5e-2 of the largest logit (bf16 rounds to 2^-9 relative;
    errors of ~1e-2 are seen; a broken product is off by ~1), but not within 1e-5, or nothing was rounded. A float32
    checkpoint's projections run on the GEMV kernels, which take float32 activations: only attention multiplies bf16
    there, and its output must stay float32 for o_proj.
    Every token goes to every expert (num_experts_per_tok = num_experts): with top-2 of 8, over 100 tokens and two
    MoE layers, some token's second and third expert were nearly always within bf16 rounding of each other, and a
    token routed elsewhere changes its output wholly, which says nothing about rounding. With all experts chosen the
    routing weights still come from the softmax, and each expert multiplies a 100-row group."""
    if wgmma and not cb.hopper():
        pytest.skip("wgmma_tiles.cu runs on compute capability 9.0 (H100, H200) only")
    if not wgmma:
        monkeypatch.setattr(cb, "hopper", lambda: False)
    config = dict(TINY_CONFIG, head_dim=64, num_experts_per_tok=TINY_CONFIG["num_experts"])
    rng = np.random.default_rng()
    tensors = random_weights(config, seed=int(rng.integers(1 << 30)))
    if dtype == "float32":
        tensors = {name: t.astype(np.float32) for name, t in tensors.items()}
    folder = write_checkpoint(tmp_path / "model", config, tensors)
    prompt = rng.integers(0, 256, 100).tolist()
    logits = {}
    for name, precision in (("numpy", "float32"), ("cupy", "bf16")):
        model = Qwen3MoeForCausalLM(folder, backend=name, precision=precision)
        (logits[name],) = model.forward([Request(prompt, 0, Qwen3MoeKVCache(model, max_tokens=128))])
    scale = np.abs(logits["numpy"]).max()
    np.testing.assert_allclose(logits["cupy"], logits["numpy"], rtol=0, atol=5e-2 * scale)
    assert np.abs(logits["cupy"] - logits["numpy"]).max() > 1e-5 * scale, "no bf16 rounding took place"


def test_non_finite_logits_are_refused_in_graph_decoding(cb, tmp_path):
    """A NaN reaching the logits stops graph decoding with the reference sampler's error, not a made-up token."""
    tensors = random_weights(TINY_CONFIG, seed=1)
    tensors["lm_head.weight"] = tensors["lm_head.weight"].copy()
    tensors["lm_head.weight"][5, 0] = np.nan
    model = Qwen3MoeForCausalLM(write_checkpoint(tmp_path / "nan", dict(TINY_CONFIG), tensors), backend="cupy")
    cache = Qwen3MoeKVCache(model, max_tokens=8)
    model.forward([Request([1, 2, 3], 0, cache)])
    decoder = cb.GreedyDecoder(model._state, cache, 3, 4)
    with pytest.raises(NonFiniteError, match="NaN"):
        decoder.step()


def test_a_cpu_cache_is_refused_with_a_clear_error(tiny_model_dir):
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend="cupy")
    with pytest.raises(TypeError, match="Qwen3MoeKVCache"):
        model.forward([Request([1, 2], 0, KVCache(model.config, 4))])
    (logits,) = model.forward([Request([1, 2], 0, Qwen3MoeKVCache(model, max_tokens=4))])  # still usable
    assert np.isfinite(logits).all()


TIMELINE_SCRIPT = """
import json, sys
import cupy as cp, numpy as np
from fastpath import cupy_backend as cb, timeline
timeline.enable()  # before anything compiles: every kernel then carries the marks
from fastpath.cupy_bench import forward_on_device, random_state
from qwen3moe.config import config_from_dict
from qwen3moe.model import KVCache
from qwen3moe.synthetic import TINY_CONFIG
c = config_from_dict(dict(TINY_CONFIG, mlp_only_layers=[], num_hidden_layers=2))
s, n = random_state(c), 5
cache = KVCache(c, 64, xp=cp)
first = int(forward_on_device(s, np.arange(n), [(0, n, 0)], [cache])[0])
decoder, labels = timeline.labelled_capture(s, lambda: cb.GreedyDecoder(s, cache, n, first))
for _ in range(3):
    decoder.step()
steps = [timeline.group(timeline.record_step(decoder.step, decoder.stream), labels) for _ in range(2)]
json.dump([[[l.label, l.blocks, l.started, l.released, l.ended] for l in step] for step in steps], sys.stdout)
"""


def test_the_timeline_sees_every_launch_of_the_step_wait_for_the_one_ahead(tmp_path):
    """``bench --nvidia --timeline`` (fastpath/timeline.py): with the kernels compiled with the marks (in a process of
    its own, since they are compiled once per process), one replay of a captured batch-1 step records every launch the
    capture made, in the order captured -- the embedding, per layer q/k/v, attention (which normalises and rotates
    itself over a short cache), o_proj, the router, its top-k with the experts' gate/up, down with the sum, then the
    lm_head and the greedy choice -- and the GPU clock shows the chain that programmatic launch must keep: no block
    of a launch gets past its wait before every block of the launch ahead has ended."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", TIMELINE_SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    layer = ["q/k/v", "attention", "o_proj", "router", "route_gate_up", "expert_down_sum"]
    for step in json.loads(done.stdout):
        assert [label for label, *_ in step] == ["embed", *layer, *layer, "lm_head", "argmax_partial",
                                                 "greedy_advance"]
        for (ahead, *_, ahead_end), (label, blocks, started, released, ended) in zip(step, step[1:]):
            assert blocks >= 1 and started <= released <= ended
            assert released >= ahead_end, f"{label} passed its wait {ahead_end - released} ns before {ahead} ended"
