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
from qwen3moe.layers import AttentionSegment, rope_cos_sin
from qwen3moe.model import KVCache, Request
from qwen3moe.router_stats import RouterStats
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
    task = Qwen3MoeInferTask(prompt, temperature=0, end_tokens=[], max_new_tokens=steps)
    task.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=len(prompt) + steps))
    while not task.finished:
        model.batch_infer_one_round([task])
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


@pytest.mark.parametrize("B", [3, 20])
def test_batch_graph_decoder_matches_batch_rounds(cb, tiny_model_dir, B):
    """B sequences of different lengths decoded greedily through one captured graph per step give the tokens of batch
    rounds through the model loop, and the router statistics those rounds count (20 sequences: the projections and
    experts take the tensor-core paths inside the graph)."""
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend="cupy")
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, int(rng.integers(1, 12))).tolist() for _ in range(B)]
    steps = 12
    runs = {}
    for way in ("graph", "rounds"):  # the rounds last: their prefill would count into the model's statistics
        tasks = [Qwen3MoeInferTask(p, temperature=0, end_tokens=[], max_new_tokens=steps) for p in prompts]
        for t in tasks:
            t.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=len(t.tokens) + steps))
        firsts = model.batch_infer_one_round(tasks)  # the prefill
        stats = RouterStats(model.config)
        if way == "rounds":
            model.reset_router_stats()
            while not all(t.finished for t in tasks):
                model.batch_infer_one_round(tasks)
            runs[way] = ([t.generated for t in tasks], model.router_stats)
            continue
        decoder = cb.BatchGreedyDecoder(model._state, [t.kvcache for t in tasks], [t.pos for t in tasks], firsts)
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


@pytest.mark.parametrize("T", [7, 40])
@pytest.mark.parametrize("path", ["gemv", "few", "tiles"])
def test_kernels_write_every_output(cb, tiny_model_dir, T, path, monkeypatch):
    """Buffers poisoned with NaN before the kernels run: every element must be overwritten with the right value.
    Each of the three kernel paths computes the projections and the experts (at 40 tokens x top-2 over 8 experts
    the experts serve more than 8 picks each: several passes of mma_few.cu)."""
    import cupy as cp

    monkeypatch.setattr(cb, "linear_path", lambda *args: path)
    monkeypatch.setattr(cb, "expert_path", lambda *args: path)

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

    logits = cp.full((T, config.vocab_size), np.nan, cp.float32)
    cb.linear(s, cp.asarray(x), s.lm_head, logits, norm=s.norm, rows_per_block=64)
    close(logits, ref.final_logits(r, x), "logits")


def test_long_context_attention_uses_many_splits(cb, tiny_model_dir):
    """Decode against a long cache: the keys are split across blocks and merged (flash-decoding)."""
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend="cupy")
    reference = Qwen3MoeForCausalLM(tiny_model_dir, backend="numpy")
    prompt = np.random.default_rng().integers(0, 256, 300).tolist()
    plan = cb.AttentionPlan.build(model.config, [(0, 1, 299)], 300)
    assert plan.splits > 1
    assert greedy(model, prompt, 8) == greedy(reference, prompt, 8)


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
