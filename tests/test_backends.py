"""Every fast backend against the NumPy reference: block by block on fresh random inputs, then the whole model.

Tolerances: both sides read the same bf16 (or f32) weights and accumulate in float32, in different orders, so
outputs agree to ~1e-6 relative; we require 1e-4 (elementwise, relative to the largest magnitude of the tensor).
Routing decisions and greedy tokens must be identical.
"""

import numpy as np
import pytest

from test_oracle import greedy_steps_without_near_ties
from qwen3moe import DeviceError, Qwen3MoeForCausalLM, Qwen3MoeInferTask, Qwen3MoeKVCache, backends
from qwen3moe import reference_backend as ref
from qwen3moe.bundled import BUNDLED_MODEL
from qwen3moe.layers import AttentionSegment, rope_cos_sin
from qwen3moe.model import KVCache, Request
from qwen3moe.synthetic import TINY_CONFIG, random_weights, write_checkpoint
from qwen3moe.weights import load_weights

FAST = [n for n in backends.BACKENDS if n != "numpy"]
RTOL = 1e-4


@pytest.fixture(params=FAST)
def fast_name(request):
    reason = backends.unavailable_reason(request.param)
    if reason:
        pytest.skip(f"backend {request.param} is not available here: {reason}")
    return request.param


@pytest.fixture(params=["threaded", "one-thread"])
def fast(fast_name, request, monkeypatch):
    """The backend module under test; numba's kernels run both threaded and as their one-thread twins."""
    module = backends.load(fast_name)
    if hasattr(module, "PARALLEL_MIN_BYTES"):
        monkeypatch.setattr(module, "PARALLEL_MIN_BYTES", 0 if request.param == "threaded" else 1 << 62)
    elif request.param == "one-thread":
        pytest.skip(f"backend {fast_name} has no one-thread variant")
    return module


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def folder(request, tmp_path_factory):
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if request.param == "bfloat16" else np.float32
    config = dict(TINY_CONFIG)
    seed = int(np.random.default_rng().integers(1 << 30))
    return write_checkpoint(tmp_path_factory.mktemp(request.param) / "m", config,
                            random_weights(config, seed=seed, dtype=dtype))


def host(a) -> np.ndarray:
    """A backend's array as NumPy (a GPU backend's arrays live in device memory)."""
    return a if isinstance(a, np.ndarray) else a.get()


def close(ours, expected, what):
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(host(ours), expected, rtol=RTOL, atol=RTOL * scale, err_msg=what)


def states(fast, folder):
    from qwen3moe.config import load_config

    config = load_config(folder)
    weights = load_weights(folder, config)
    return config, ref.prepare(weights, config), fast.prepare(weights, config)


@pytest.mark.parametrize("lengths", [(1,), (1, 1, 1), (5,), (3, 1, 9), (20,), (17, 1, 2)])
def test_attention_block(fast, folder, lengths):
    """Requests with different cache contents and positions, prefill and decode mixed in one step."""
    config, r_state, f_state = states(fast, folder)
    rng = np.random.default_rng()
    T, capacity = sum(lengths), max(32, 2 * max(lengths))
    x = rng.standard_normal((T, config.hidden_size), dtype=np.float32)
    positions, segments = [], {"ref": [], "fast": []}
    start = 0
    k_prefix = rng.standard_normal((len(lengths), capacity, config.num_key_value_heads, config.head_dim),
                                   dtype=np.float32)
    for j, n in enumerate(lengths):
        pos = int(rng.integers(0, capacity - n))  # earlier tokens already cached
        positions += range(pos, pos + n)
        for side, xp in (("ref", np), ("fast", fast.xp)):
            k_cache, v_cache = xp.asarray(k_prefix[j]).copy(), xp.asarray(k_prefix[j][::-1]).copy()
            segments[side].append(AttentionSegment(start, start + n, pos, k_cache, v_cache))
        start += n
    cos, sin = rope_cos_sin(np.array(positions), config.head_dim, config.rope_theta)
    for i in range(config.num_hidden_layers):
        expected = ref.attention_block(r_state, i, x, cos, sin, segments["ref"])
        close(fast.attention_block(f_state, i, fast.xp.asarray(x), cos, sin, segments["fast"]), expected,
              f"layer {i} output")
        for a, b in zip(segments["fast"], segments["ref"]):
            close(a.k_cache, b.k_cache, "keys written to the cache")
            close(a.v_cache, b.v_cache, "values written to the cache")


@pytest.mark.parametrize("lengths", [(1, 1), (20,), (17, 1, 40), (70,)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_block_with_real_head_dims(fast, tmp_path, lengths, head_dim):
    """head_dim 64 (the bundled model) and 128 (Qwen3): the sizes the GPU's tensor-core prefill attention is built
    for; a prefill of 70 tokens spans two of its 64-token tiles."""
    config = dict(TINY_CONFIG, head_dim=head_dim)
    test_attention_block(fast, write_checkpoint(tmp_path / "m", config, random_weights(config, seed=2)), lengths)


@pytest.mark.parametrize("lengths", [(1,), (3, 1, 9)])
def test_attention_block_with_three_query_heads_per_kv_head(fast, tmp_path, lengths):
    """numba's attention takes a kv head's query heads in pairs: a group of three leaves one on its own."""
    config = dict(TINY_CONFIG, num_attention_heads=6)
    test_attention_block(fast, write_checkpoint(tmp_path / "m", config, random_weights(config, seed=1)), lengths)


@pytest.mark.parametrize("T", [1, 4, 33, 100])
def test_feed_forward_block_and_logits(fast, folder, T):
    config, r_state, f_state = states(fast, folder)
    rng = np.random.default_rng()
    x = rng.standard_normal((T, config.hidden_size), dtype=np.float32)
    for i in range(config.num_hidden_layers):
        expected, r_routing = ref.feed_forward_block(r_state, i, x, config.num_experts_per_tok, None)
        ours, f_routing = fast.feed_forward_block(f_state, i, fast.xp.asarray(x), config.num_experts_per_tok, None)
        close(ours, expected, f"layer {i} output")
        assert (f_routing is None) == (r_routing is None) == (not config.is_moe_layer(i))
        if r_routing is not None:
            assert host(f_routing.experts).tolist() == r_routing.experts.tolist()
            close(f_routing.weights, r_routing.weights, "routing weights")
            close(f_routing.probs, r_routing.probs, "router probabilities")
    close(fast.final_logits(f_state, fast.xp.asarray(x)), ref.final_logits(r_state, x), "logits")
    ids = rng.integers(0, config.vocab_size, T)
    np.testing.assert_array_equal(host(fast.embed(f_state, ids)), ref.embed(r_state, ids))


@pytest.mark.parametrize("T", [1, 4, 20])
def test_feed_forward_block_with_a_routing_override(fast, folder, T):
    """A RoutingOverride's top_k and disabled experts (the routing explorer's what-if), in small and large steps."""
    config, r_state, f_state = states(fast, folder)
    x = np.random.default_rng().standard_normal((T, config.hidden_size), dtype=np.float32)
    disabled = np.zeros(config.num_experts, dtype=bool)
    disabled[[0, 3]] = True
    for i in config.moe_layers:
        expected, r_routing = ref.feed_forward_block(r_state, i, x, 1, disabled)
        ours, f_routing = fast.feed_forward_block(f_state, i, fast.xp.asarray(x), 1, disabled)
        close(ours, expected, f"layer {i} output")
        assert host(f_routing.experts).tolist() == r_routing.experts.tolist()
        close(f_routing.weights, r_routing.weights, "routing weights")


def test_router_ties_go_to_the_lower_expert(fast, tmp_path):
    """With an all-zero router every probability ties: every backend must pick experts 0..k-1."""
    config = dict(TINY_CONFIG)
    tensors = random_weights(config, seed=0)
    for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
        tensors[name] = np.zeros_like(tensors[name])
    cfg, _, f_state = states(fast, write_checkpoint(tmp_path / "ties", config, tensors))
    x = np.random.default_rng().standard_normal((6, cfg.hidden_size), dtype=np.float32)
    _, routing = fast.feed_forward_block(f_state, cfg.moe_layers[0], fast.xp.asarray(x), cfg.num_experts_per_tok,
                                         None)
    assert host(routing.experts).tolist() == [list(range(cfg.num_experts_per_tok))] * 6


def test_whole_model_64_greedy_steps_and_logits(fast_name, folder):
    """64 greedy tokens identical, and every step's logits within tolerance of the reference's."""
    models = {name: Qwen3MoeForCausalLM(folder, backend=name) for name in ("numpy", fast_name)}
    prompt = np.random.default_rng().integers(0, 256, 12).tolist()
    tokens, logits = {}, {}
    for name, model in models.items():
        cache, seq, steps = KVCache(model.config, 12 + 64, xp=model.xp), list(prompt), []
        pending, pos = list(prompt), 0
        for _ in range(64):
            (last,) = model.forward([Request(pending, pos, cache)])
            steps.append(last)
            pos += len(pending)
            pending = [int(np.argmax(last))]
            seq += pending
        tokens[name], logits[name] = seq[12:], np.stack(steps)
    (a, b) = models
    steps = greedy_steps_without_near_ties(logits[a])  # a near tie may legitimately go either way
    assert tokens[a][:steps] == tokens[b][:steps]
    close(logits[b][:steps], logits[a][:steps], "logits over 64 steps")


def test_batch_inference_matches_the_reference(fast_name, folder):
    generated = {}
    for backend in ("numpy", fast_name):
        model = Qwen3MoeForCausalLM(folder, backend=backend)
        rng = np.random.default_rng(5)
        tasks = [Qwen3MoeInferTask(rng.integers(0, 256, n).tolist(), temperature=0.8, topk=30, topp=0.95,
                                   task_id=i, end_tokens=[], max_new_tokens=10, seed=i)
                 for i, n in enumerate((3, 11, 6))]
        for t in tasks:
            t.bind_kvcache(Qwen3MoeKVCache(model))
        while any(not t.finished for t in tasks):
            model.batch_infer_one_round([t for t in tasks if not t.finished])
        generated[backend] = [t.generated for t in tasks]
    assert generated[fast_name] == generated["numpy"]


# ---- batch-1 greedy decoding through a backend's GreedyDecoder ----------------------------------------------------


@pytest.fixture
def decoding(fast, fast_name):
    """The backend module under test, when it offers a whole-step GreedyDecoder."""
    if not hasattr(fast, "GreedyDecoder"):
        pytest.skip(f"backend {fast_name} has no GreedyDecoder")
    return fast


def prefill_and_decoder(module, model, prompt, capacity):
    """Prefill ``prompt`` through the model loop, then a GreedyDecoder from its greedy token: (decoder, token,
    logits)."""
    cache = KVCache(model.config, capacity, xp=model.xp)
    (logits,) = model.forward([Request(list(prompt), 0, cache)])
    token = int(np.argmax(logits))
    return module.GreedyDecoder(model._state, cache, len(prompt), token), token, logits


def test_greedy_decoder_gives_the_reference_tokens_and_logits(decoding, fast_name, folder):
    """40 tokens from the decoder equal the reference's step-by-step greedy tokens (until a near tie), and each step's
    logits are within tolerance of the reference's (numba: threaded and on one thread, bf16 and f32 weights)."""
    prompt = np.random.default_rng().integers(0, 256, 9).tolist()
    reference = Qwen3MoeForCausalLM(folder, backend="numpy")
    cache, expected, expected_logits = KVCache(reference.config, 9 + 40), [], []
    pending, pos = list(prompt), 0
    for _ in range(40):
        (last,) = reference.forward([Request(pending, pos, cache)])
        expected_logits.append(last)
        pos += len(pending)
        pending = [int(np.argmax(last))]
        expected += pending
    model = Qwen3MoeForCausalLM(folder, backend=fast_name)
    decoder, first, logits = prefill_and_decoder(decoding, model, prompt, 9 + 40)
    tokens, step_logits = [first], [logits]
    for _ in range(39):
        tokens.append(decoder.step())
        step_logits.append(host(decoder.logits).reshape(-1).copy())
    steps = greedy_steps_without_near_ties(np.stack(expected_logits))  # a near tie may legitimately go either way
    assert tokens[:steps] == expected[:steps]
    close(np.stack(step_logits[:steps]), np.stack(expected_logits[:steps]), "logits of each decoded step")


def test_greedy_decoder_with_three_query_heads_per_kv_head(decoding, fast_name, tmp_path):
    config = dict(TINY_CONFIG, num_attention_heads=6)
    test_greedy_decoder_gives_the_reference_tokens_and_logits(
        decoding, fast_name, write_checkpoint(tmp_path / "m", config, random_weights(config, seed=2)))


def test_numba_decoder_with_mixed_dtypes_steps_through_the_blocks(fast, fast_name, tmp_path):
    """A checkpoint with bf16 matrices but f32 routers: no single dtype for the whole-step kernel, so the decoder
    runs the block operations a step at a time -- same contract, same tokens."""
    import ml_dtypes

    if fast_name != "numba":
        pytest.skip("the numba decoder's fallback")
    tensors = random_weights(TINY_CONFIG, seed=3, dtype=ml_dtypes.bfloat16)
    for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
        tensors[name] = tensors[name].astype(np.float32)
    folder = write_checkpoint(tmp_path / "mixed", dict(TINY_CONFIG), tensors)
    test_greedy_decoder_gives_the_reference_tokens_and_logits(fast, fast_name, folder)
    model = Qwen3MoeForCausalLM(folder, backend=fast_name)
    decoder, _, _ = prefill_and_decoder(fast, model, [1, 2, 3], 6)
    assert model._state.decoding.table is None
    decoder.step()
    test_greedy_decoder_counts_router_statistics(fast, fast_name, folder)


def test_numba_keeps_small_blas_work_on_one_thread():
    """The numba backend's BLAS work (prefill matrices, prefill attention) under PARALLEL_MIN_BYTES runs on one BLAS
    thread -- OpenBLAS's workers would spin on afterwards and stall the threaded decode steps after a prefill --
    larger work on all of them, and the setting is restored after."""
    reason = backends.unavailable_reason("numba")
    if reason:
        pytest.skip(f"backend numba is not available here: {reason}")
    from threadpoolctl import threadpool_info

    nb = backends.load("numba")
    blas = lambda: [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    before = blas()
    assert before, "NumPy's BLAS was not found"
    with nb.blas_threads(nb.PARALLEL_MIN_BYTES - 1):
        assert blas() == [1] * len(before)
    assert blas() == before
    with nb.blas_threads(nb.PARALLEL_MIN_BYTES):
        assert blas() == before


@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 15])
def test_numba_projections_of_a_few_tokens_match_float64_products(tokens):
    """norm_project and project_residual (threaded and one-thread) against float64 products of the same bf16 weights.
    Past one token they multiply a chunk of K.CHUNK_WORDS words of each row at a time by up to four
    tokens; the sizes here leave a part-chunk at the end of each row (2 chunks and 48 words), a part of a
    ROW_BLOCK of rows, and token groups of 4, 2 and 1. A row whose words are not whole 16-word vectors (the second
    case) takes the row-by-row path. Where the CPU has AVX512-BF16, project_residual also at precision bf16."""
    import ml_dtypes

    reason = backends.unavailable_reason("numba")
    if reason:
        pytest.skip(f"backend numba is not available here: {reason}")
    K = backends.load("numba").K
    rng = np.random.default_rng()
    for words, rows in ((2 * K.CHUNK_WORDS + 48, 3 * K.ROW_BLOCK + 5), (40, K.ROW_BLOCK + 1)):
        hi = rng.integers(0x3A00, 0x4100, (rows, words)) | (rng.integers(0, 2, (rows, words)) << 15)  # bf16 bits
        lo = rng.integers(0x3A00, 0x4100, (rows, words)) | (rng.integers(0, 2, (rows, words)) << 15)
        w = ((hi << 16) | lo).astype(np.uint32)  # (rows, words): element 2j in the low half, 2j + 1 in the high
        w64 = np.empty((rows, 2 * words))
        w64[:, 0::2], w64[:, 1::2] = (lo << 16).astype(np.uint32).view(np.float32), (hi << 16).astype(
            np.uint32).view(np.float32)
        x = rng.standard_normal((tokens, 2 * words), dtype=np.float32)
        norm = rng.standard_normal(2 * words, dtype=np.float32)
        normed = x / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + 1e-6) * norm
        residual = rng.standard_normal((tokens, rows), dtype=np.float32)
        for project in (K.norm_project, K.SERIAL[K.norm_project]):
            expected = normed @ w64.T
            ours = project(x, norm, np.float32(1e-6), w, K.FLOAT32)
            np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        for project in (K.project_residual, K.SERIAL[K.project_residual]):
            expected = residual + x.astype(np.float64) @ w64.T
            ours = project(x, w, residual, K.FLOAT32)
            np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
            if K.bf16_supported():  # precision bf16: x rounded to bf16 (to nearest even) and packed, then vdpbf16ps
                expected = residual + x.astype(ml_dtypes.bfloat16).astype(np.float64) @ w64.T
                ours = project(x, w, residual, K.PACKED)
                np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_greedy_decoder_refuses_a_full_cache(decoding, fast_name, tiny_model_dir):
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend=fast_name)
    decoder, _, _ = prefill_and_decoder(decoding, model, [1, 2, 3], 5)
    decoder.step(), decoder.step()  # positions 3 and 4
    with pytest.raises(ValueError, match="KV cache is full"):
        decoder.step()


def test_greedy_decoder_counts_router_statistics(decoding, fast_name, tiny_model_dir):
    """flush_stats adds what the reference's per-step path counts for the same tokens, and starts afresh."""
    from qwen3moe.router_stats import RouterStats

    prompt = [5, 17, 2, 250]
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend=fast_name)
    decoder, first, _ = prefill_and_decoder(decoding, model, prompt, 4 + 12)
    tokens = [first] + [decoder.step() for _ in range(11)]
    ours = RouterStats(model.config)
    decoder.flush_stats(ours)
    decoder.flush_stats(ours)  # nothing new
    reference = Qwen3MoeForCausalLM(tiny_model_dir, backend="numpy")
    cache = KVCache(reference.config, 16)
    reference.forward([Request(prompt, 0, cache)])
    reference.reset_router_stats()  # count the decode steps only: the tokens fed after the prefill
    for k, token in enumerate(tokens[:-1]):
        reference.forward([Request([token], 4 + k, cache)])
    theirs = reference.router_stats
    for layer in model.config.moe_layers:
        assert ours.tokens[layer] == theirs.tokens[layer] == 11
        np.testing.assert_array_equal(ours.counts[layer], theirs.counts[layer])
        np.testing.assert_allclose(ours.prob_sum[layer], theirs.prob_sum[layer], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.entropy_sum[layer], theirs.entropy_sum[layer], rtol=1e-4)


def test_greedy_decoder_ties_go_to_the_lowest_token_and_nan_is_refused(decoding, fast_name, tmp_path):
    """An all-zero lm_head: every logit ties, so the lowest id (0) wins, as np.argmax picks it. A NaN in the lm_head
    stops decoding with the reference sampler's error rather than a made-up token."""
    from qwen3moe.debug import NonFiniteError

    tensors = random_weights(TINY_CONFIG, seed=1)
    tensors["lm_head.weight"] = np.zeros_like(tensors["lm_head.weight"])
    model = Qwen3MoeForCausalLM(write_checkpoint(tmp_path / "ties", dict(TINY_CONFIG), tensors), backend=fast_name)
    decoder, _, _ = prefill_and_decoder(decoding, model, [1, 2, 3], 8)
    assert [decoder.step() for _ in range(4)] == [0] * 4
    tensors["lm_head.weight"] = tensors["lm_head.weight"].copy()
    tensors["lm_head.weight"][301, 0] = np.nan
    model = Qwen3MoeForCausalLM(write_checkpoint(tmp_path / "nan", dict(TINY_CONFIG), tensors), backend=fast_name)
    decoder, _, _ = prefill_and_decoder(decoding, model, [1, 2, 3], 8)
    with pytest.raises(NonFiniteError, match="NaN"):
        decoder.step()


def test_numba_decoder_does_not_depend_on_thread_scheduling(tiny_model_dir, monkeypatch):
    """The decoder's threads claim work items, so the result does not depend on how many run or when: more workers
    than Numba has threads (some run one after another) give the same tokens as one worker."""
    if fast_unavailable := backends.unavailable_reason("numba"):
        pytest.skip(fast_unavailable)
    nb = backends.load("numba")
    monkeypatch.setattr(nb, "PARALLEL_MIN_BYTES", 0)
    model = Qwen3MoeForCausalLM(tiny_model_dir, backend="numba")
    runs = []
    for workers in (1, 2, 5):
        decoder, first, _ = prefill_and_decoder(nb, model, [7, 8, 9], 3 + 20)
        decoder._threads = workers
        runs.append([first] + [decoder.step() for _ in range(19)])
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="the bundled model is not in this copy")
@pytest.mark.parametrize("decoder, settings", [("GreedyDecoder", dict(temperature=0)), ("SampledDecoder", dict(seed=7))],
                         ids=["greedy", "sampled"])
def test_generate_decodes_the_bundled_model_in_whole_steps(fast_name, decoder, settings, monkeypatch):
    """generate() hands decoding to the backend's whole-step decoder: its GreedyDecoder at temperature 0, its
    SampledDecoder with the bundled model's own sampling settings (its generation_config.json: temperature 0.8,
    top-k 40, top-p 0.95) and a seed. 64 tokens equal to the reference's (sampled: the same draws from the same
    generator), and the router statistics it counted equal the ones the reference counted step by step."""
    module = backends.load(fast_name)
    if not hasattr(module, decoder):
        pytest.skip(f"backend {fast_name} has no {decoder}")
    made = []

    class Spy(getattr(module, decoder)):
        def __init__(self, *args):
            made.append(self)
            super().__init__(*args)

    monkeypatch.setattr(module, decoder, Spy)
    runs = {}
    for name in ("numpy", fast_name):
        model = Qwen3MoeForCausalLM(backend=name, max_tokens=256)
        model.generate("ROMEO:\nBut soft, what light", max_steps=64, chat=False, **settings)
        runs[name] = (model.last_task.generated, model.router_stats)
    assert len(made) == 1
    assert len(runs["numpy"][0]) == 64
    assert runs[fast_name][0] == runs["numpy"][0]
    (_, ours), (_, theirs) = runs[fast_name], runs["numpy"]
    for layer in theirs.counts:
        assert ours.tokens[layer] == theirs.tokens[layer]
        np.testing.assert_array_equal(ours.counts[layer], theirs.counts[layer])
        np.testing.assert_allclose(ours.prob_sum[layer], theirs.prob_sum[layer], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.entropy_sum[layer], theirs.entropy_sum[layer], rtol=1e-4)


# ---- the registry ---------------------------------------------------------------------------------------------


def test_choose_by_argument_environment_and_auto(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.choose("cpu", "numpy") == "numpy"
    available = [n for n in backends.FASTEST_FIRST
                 if backends.BACKENDS[n].device == "cpu" and backends.unavailable_reason(n) is None]
    assert backends.choose("cpu", "auto") == available[0]
    monkeypatch.setenv(backends.ENV_VAR, "numpy")
    assert backends.choose("cpu", None) == "numpy"
    assert backends.choose("cpu", "auto") == "numpy"
    with pytest.raises(DeviceError, match="unknown backend 'turbo'; available: auto, numpy"):
        backends.choose("cpu", "turbo")


def test_an_uninstalled_backend_fails_with_one_sentence(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "ghost", backends.Backend("fastpath.no_such_module", "cpu", "absent"))
    reason = backends.unavailable_reason("ghost")
    assert "fastpath.no_such_module cannot be imported" in reason
    with pytest.raises(DeviceError, match="backend 'ghost' is not available"):
        backends.choose("cpu", "ghost")



def test_a_precision_the_backend_lacks_is_refused_before_loading(tiny_model_dir):
    """bf16 activations are the cupy and numba backends' option: asked of the reference, the constructor says which
    backends have it and what to use instead; an unknown precision is refused as well. float32 needs no option
    anywhere."""
    with pytest.raises(ValueError, match="precision 'bf16' is not available on the numpy backend \\(only the "
                                         "numba and cupy backends offer it\\); use precision='float32'"):
        Qwen3MoeForCausalLM(tiny_model_dir, backend="numpy", precision="bf16")
    with pytest.raises(ValueError, match="precision 'fp8' is not available on the numpy backend \\(no backend "
                                         "offers it\\)"):
        Qwen3MoeForCausalLM(tiny_model_dir, backend="numpy", precision="fp8")
    assert backends.prepare_options("numpy", "float32") == {} == backends.prepare_options("cupy", "float32")
    assert backends.prepare_options("cupy", "bf16") == {"precision": "bf16"} == backends.prepare_options("numba",
                                                                                                         "bf16")


@pytest.mark.skipif(backends.unavailable_reason("numba") is not None, reason="the numba backend cannot run here")
def test_numba_says_when_it_compiles_a_kernel(capsys):
    """A first run on a machine compiles the CPU kernels (~30 s): each kernel of numba_kernels says so on stderr when
    its compilation starts, once; helpers compiled inside it say nothing, nor does a call that finds it compiled."""
    import numba
    from fastpath import numba_kernels as K

    def helper(x):
        return x + 1

    def kernel(x):
        return 2 * helper(x)

    helper.__module__ = kernel.__module__ = K.__name__  # two of the module's kernels, compiled fresh (no cache)
    helper, kernel = numba.njit(helper), numba.njit(kernel)
    assert kernel(3) == 8
    said = capsys.readouterr().err
    assert said.count("numba: compiling") == 1 and "compiling kernel for this CPU" in said
    assert kernel(4) == 10
    assert "numba: compiling" not in capsys.readouterr().err
