"""The router what-if (RoutingOverride): changing top-k and disabling experts at inference time, on every backend."""

import numpy as np
import pytest

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.layers import RoutingOverride
from qwen3moe.model import KVCache, Request
from qwen3moe.synthetic import write_synthetic_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("override") / "m", seed=11)


def routed(model, tokens):
    """Logits of every position, and the router trace of that one forward."""
    model.router_stats.reset()
    model.router_stats.trace_enabled = True
    (logits,) = model.forward([Request(tokens, 0, KVCache(model.config, len(tokens), xp=model.xp))], all_logits=True)
    return logits, list(model.router_stats.trace)


def test_disabled_experts_are_never_chosen_and_tokens_move_to_the_next_best(folder, backend_name):
    model = Qwen3MoeForCausalLM(folder, backend=backend_name)
    tokens = np.random.default_rng().integers(0, 256, 40).tolist()
    base_logits, base = routed(model, tokens)
    layer = model.config.moe_layers[0]
    busiest = int(np.argmax(model.get_router_stats(layer)["counts"]))
    model.routing_override = RoutingOverride(disabled={layer: frozenset({busiest})})
    logits, trace = routed(model, tokens)
    for before, after in zip([r for r in base if r.layer == layer], [r for r in trace if r.layer == layer]):
        assert busiest not in after.experts and after.probs[busiest] == 0.0
        # the survivors keep their order: the new choice is the old ranking with the disabled expert skipped
        ranking = [e for e in np.argsort(-np.array(before.probs), kind="stable") if e != busiest]
        assert after.experts == [int(e) for e in ranking[:len(after.experts)]]
    assert not np.allclose(logits, base_logits)
    model.routing_override = None
    restored, _ = routed(model, tokens)
    np.testing.assert_array_equal(restored, base_logits)


def test_top_k_override_and_its_reference_agreement(folder, backend_name):
    model = Qwen3MoeForCausalLM(folder, backend=backend_name)
    reference = Qwen3MoeForCausalLM(folder, backend="numpy")
    tokens = np.random.default_rng().integers(0, 256, 12).tolist()
    override = RoutingOverride(top_k=1, disabled={model.config.moe_layers[-1]: frozenset({0, 3})})
    model.routing_override = reference.routing_override = override
    logits, trace = routed(model, tokens)
    expected, _ = routed(reference, tokens)
    assert all(len(r.experts) == 1 and r.weights == [pytest.approx(1.0)] for r in trace)  # renormalised top-1
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("override, words", [
    (RoutingOverride(top_k=0), "top_k must be in 1..8"),
    (RoutingOverride(top_k=9), "top_k must be in 1..8"),
    (RoutingOverride(disabled={0: frozenset({1})}), "layer 0 is not an MoE layer"),
    (RoutingOverride(disabled={1: frozenset({8})}), "expert ids must be in 0..7"),
    (RoutingOverride(top_k=4, disabled={1: frozenset(range(5))}), "leaves fewer than top_k=4"),
])
def test_invalid_overrides_are_refused_and_change_nothing(folder, override, words):
    model = Qwen3MoeForCausalLM(folder, backend="numpy")
    with pytest.raises(ValueError, match=words):
        model.routing_override = override
    assert model.routing_override is None
