"""The bundled model (data/qwen3-moe-shakespeare): our engine reproduces what transformers measured on it, on every
backend, and its routing has the properties its model card claims."""

import json

import numpy as np
import pytest

from qwen3moe import Qwen3MoeForCausalLM, Qwen3MoeInferTask, Qwen3MoeKVCache, backends
from qwen3moe.bundled import BUNDLED_MODEL

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(),
                                reason="the bundled model folder data/qwen3-moe-shakespeare is not in this copy")
AVAILABLE = [n for n in backends.BACKENDS if backends.unavailable_reason(n) is None]


@pytest.fixture(scope="module")
def metrics():
    """Numbers the training recipe measured with transformers (float32 on the shipped bf16 weights)."""
    return json.loads((BUNDLED_MODEL / "metrics.json").read_text())


@pytest.fixture(scope="module")
def heldout_start():
    """The first 2048 tokens of the held-out works, as text (the recipe's 'heldout_quick' windows)."""
    model = Qwen3MoeForCausalLM(backend="numpy", max_tokens=512)
    ids = model.tokenizer.encode((BUNDLED_MODEL / "heldout.txt").read_text(encoding="utf-8"))[:2048]
    text = model.tokenizer.decode(ids, skip_special_tokens=False)
    assert model.tokenizer.encode(text) == ids
    return text


@pytest.mark.parametrize("backend", AVAILABLE)
def test_perplexity_equals_transformers(backend, metrics, heldout_start):
    """Four 512-token windows, as the recipe scored them: within 1e-4 relative (the issue asks for 0.1 %)."""
    model = Qwen3MoeForCausalLM(backend=backend, max_tokens=512)
    ours = model.perplexity([heldout_start], window=512)
    assert ours == pytest.approx(metrics["heldout_quick"]["ppl"], rel=1e-4)
    assert ours < metrics["heldout"]["unigram_ppl"] / 5  # far better than a unigram model of the same tokenizer


@pytest.mark.parametrize("backend", [n for n in AVAILABLE if n != "numpy"])
def test_fast_backend_generates_the_reference_tokens(backend):
    """64 greedy tokens after a chat-templated prompt are the same on every backend."""
    out = {}
    for name in ("numpy", backend):
        model = Qwen3MoeForCausalLM(backend=name)
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "Speak of the sea."}])
        task = Qwen3MoeInferTask(model.tokenizer.encode(prompt), temperature=0, end_tokens=[], max_new_tokens=64)
        task.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=256))
        while not task.finished:
            model.batch_infer_one_round([task])
        out[name] = task.generated
    assert out[backend] == out["numpy"]


def test_no_dead_experts_and_chat_generation_stops(heldout_start):
    """The card's claim, measured by our engine: every expert gets at least a quarter of its uniform share."""
    model = Qwen3MoeForCausalLM(max_tokens=512)
    model.perplexity([heldout_start], window=512)
    for layer in model.config.moe_layers:
        stats = model.get_router_stats(layer)
        assert min(stats["balance"]) >= 0.25, (layer, stats["balance"])
        assert stats["unused_experts"] == []
    text, _ = model.generate("Who art thou?", max_steps=100, temperature=0.8, topk=40, topp=0.95, seed=0)
    assert text.strip() and model.last_task.finish_reason in ("stop", "length")
    assert np.isfinite(model.get_router_stats(1)["mean_entropy"])
