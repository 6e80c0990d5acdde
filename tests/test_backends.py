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


def close(ours, expected, what):
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=RTOL * scale, err_msg=what)


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
    T, capacity = sum(lengths), 32
    x = rng.standard_normal((T, config.hidden_size), dtype=np.float32)
    positions, segments = [], {"ref": [], "fast": []}
    start = 0
    k_prefix = rng.standard_normal((len(lengths), capacity, config.num_key_value_heads, config.head_dim),
                                   dtype=np.float32)
    for j, n in enumerate(lengths):
        pos = int(rng.integers(0, capacity - n))  # earlier tokens already cached
        positions += range(pos, pos + n)
        for side in segments:
            k_cache, v_cache = k_prefix[j].copy(), k_prefix[j][::-1].copy()
            segments[side].append(AttentionSegment(start, start + n, pos, k_cache, v_cache))
        start += n
    cos, sin = rope_cos_sin(np.array(positions), config.head_dim, config.rope_theta)
    for i in range(config.num_hidden_layers):
        expected = ref.attention_block(r_state, i, x, cos, sin, segments["ref"])
        close(fast.attention_block(f_state, i, x, cos, sin, segments["fast"]), expected, f"layer {i} output")
        for a, b in zip(segments["fast"], segments["ref"]):
            close(a.k_cache, b.k_cache, "keys written to the cache")
            close(a.v_cache, b.v_cache, "values written to the cache")


@pytest.mark.parametrize("T", [1, 4, 33, 100])
def test_feed_forward_block_and_logits(fast, folder, T):
    config, r_state, f_state = states(fast, folder)
    rng = np.random.default_rng()
    x = rng.standard_normal((T, config.hidden_size), dtype=np.float32)
    for i in range(config.num_hidden_layers):
        expected, r_routing = ref.feed_forward_block(r_state, i, x, config.num_experts_per_tok, None)
        ours, f_routing = fast.feed_forward_block(f_state, i, x, config.num_experts_per_tok, None)
        close(ours, expected, f"layer {i} output")
        assert (f_routing is None) == (r_routing is None) == (not config.is_moe_layer(i))
        if r_routing is not None:
            assert f_routing.experts.tolist() == r_routing.experts.tolist()
            close(f_routing.weights, r_routing.weights, "routing weights")
            close(f_routing.probs, r_routing.probs, "router probabilities")
    close(fast.final_logits(f_state, x), ref.final_logits(r_state, x), "logits")
    ids = rng.integers(0, config.vocab_size, T)
    np.testing.assert_array_equal(fast.embed(f_state, ids), ref.embed(r_state, ids))


def test_router_ties_go_to_the_lower_expert(fast, tmp_path):
    """With an all-zero router every probability ties: every backend must pick experts 0..k-1."""
    config = dict(TINY_CONFIG)
    tensors = random_weights(config, seed=0)
    for name in [n for n in tensors if n.endswith("mlp.gate.weight")]:
        tensors[name] = np.zeros_like(tensors[name])
    cfg, _, f_state = states(fast, write_checkpoint(tmp_path / "ties", config, tensors))
    x = np.random.default_rng().standard_normal((6, cfg.hidden_size), dtype=np.float32)
    _, routing = fast.feed_forward_block(f_state, cfg.moe_layers[0], x, cfg.num_experts_per_tok, None)
    assert routing.experts.tolist() == [list(range(cfg.num_experts_per_tok))] * 6


def test_whole_model_64_greedy_steps_and_logits(fast_name, folder):
    """64 greedy tokens identical, and every step's logits within tolerance of the reference's."""
    models = {name: Qwen3MoeForCausalLM(folder, backend=name) for name in ("numpy", fast_name)}
    prompt = np.random.default_rng().integers(0, 256, 12).tolist()
    tokens, logits = {}, {}
    for name, model in models.items():
        cache, seq, steps = KVCache(model.config, 12 + 64), list(prompt), []
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


# ---- the registry ---------------------------------------------------------------------------------------------


def test_choose_by_argument_environment_and_auto(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.choose("cpu", "numpy") == "numpy"
    available = [n for n in backends.FASTEST_FIRST if backends.unavailable_reason(n) is None]
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
