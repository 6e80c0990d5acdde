"""The routing explorer's logic: its views agree with the engine's router statistics and with figures recomputed by
hand, the exports carry the trace faithfully, and the what-if changes routing as asked and then restores the model."""

import csv
import dataclasses
import html
import io
import json
import math
import re

import numpy as np
import pytest

from qwen3moe import Qwen3MoeForCausalLM
from qwen3moe.explorer import TOKEN_CLASSES, RoutingExplorer, RoutingTrace, token_class
from qwen3moe.layers import RoutingOverride
from qwen3moe.sharding import plan_sharding

TEXT = ("ROMEO:\nBut soft! What light through yonder window breaks?\nIt is the east, and Juliet is the sun. "
        "1599 <b> & 'tis<|im_end|>")


@pytest.fixture(scope="module")
def _model():
    return Qwen3MoeForCausalLM(backend="numpy")


@pytest.fixture
def model(_model):
    """The bundled model with normal routing, empty statistics and the trace off."""
    _model.routing_override = None
    _model.router_stats.trace_enabled = False
    _model.reset_router_stats()
    return _model


@pytest.fixture
def trace(model) -> RoutingTrace:
    return RoutingExplorer(model).run(TEXT)


def by_hand_counts(experts: np.ndarray, num_experts: int) -> list[int]:
    counts = [0] * num_experts
    for row in experts.tolist():
        for e in row:
            counts[e] += 1
    return counts


# ---- tokens and classes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, name", [
    ("\n", "newline"), (":\n", "newline"), ("?\n\n", "newline"), ("!", "punctuation"), (" ,", "punctuation"),
    (" Juliet", "capitalised"), ("ROMEO", "capitalised"), (" soft", "lowercase"), ("'s", "lowercase"),
    ("1", "digit"), (" 1599", "digit"), (" ", "other"), ("\ufffd", "other"), ("<|im_end|>", "other"),
    ("x2", "other"),
])
def test_token_class_of_hand_picked_texts(text, name):
    assert TOKEN_CLASSES[token_class(text)] == name


def test_trace_tokens_decode_to_the_text_and_carry_their_classes(trace):
    assert "".join(trace.tokens) == TEXT
    classes = {tok: TOKEN_CLASSES[c] for tok, c in zip(trace.tokens, trace.classes)}
    assert classes[" Juliet"] == "capitalised" and classes[" soft"] == "lowercase"
    assert classes["!"] == "punctuation" and classes[":\n"] == "newline" and classes["<|im_end|>"] == "other"
    T, E = len(trace.token_ids), trace.num_experts
    for layer, r in trace.layers.items():
        assert r.experts.shape == r.weights.shape == (T, 2) and r.probs.shape == (T, E)
        np.testing.assert_array_equal(r.experts[:, 0], r.probs.argmax(axis=1))  # top-1 is the most probable


def test_run_matches_the_engine_trace_and_leaves_it_as_it_was(model):
    explorer = RoutingExplorer(model)
    explorer.run(TEXT)
    assert model.router_stats.trace == [] and not model.router_stats.trace_enabled
    model.router_stats.trace_enabled = True  # a caller who traces on their own keeps the records
    trace = explorer.run(TEXT)
    records = model.router_stats.trace
    assert len(records) == len(trace.token_ids) * len(model.config.moe_layers)
    for r in records:
        assert r.token == trace.token_ids[r.position]
        assert r.experts == trace.layers[r.layer].experts[r.position].tolist()
        assert r.probs == trace.layers[r.layer].probs[r.position].tolist()


def test_run_refuses_empty_and_too_long_texts(model):
    explorer = RoutingExplorer(model)
    with pytest.raises(ValueError, match="1..2048 tokens"):
        explorer.run("")
    with pytest.raises(ValueError, match="it has 2049"):
        explorer.run("1" * 2049)  # digits are single tokens


def test_top1_grid_has_each_layers_first_choice(trace):
    grid = trace.top1_grid()
    assert grid.shape == (len(trace.token_ids), 3) and trace.moe_layers == [1, 2, 3]
    for j, layer in enumerate(trace.moe_layers):
        assert grid[:, j].tolist() == [row[0] for row in trace.layers[layer].experts.tolist()]


def test_token_detail_figures_recomputed_by_hand(trace):
    t = trace.tokens.index(" Juliet")
    detail = trace.token_detail(t)
    assert detail["token"] == " Juliet" and detail["class"] == "capitalised"
    for layer, d in detail["layers"].items():
        p = trace.layers[layer].probs[t].tolist()
        ranked = sorted(p, reverse=True)
        assert d["margin"] == pytest.approx(ranked[0] - ranked[1], abs=1e-7)
        assert d["boundary_margin"] == pytest.approx(ranked[1] - ranked[2], abs=1e-7)  # K = 2
        assert d["entropy"] == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-6)
        assert 0 < d["entropy"] < math.log(16)
        e1, e2 = d["experts"]
        assert d["weights"] == pytest.approx([p[e1] / (p[e1] + p[e2]), p[e2] / (p[e1] + p[e2])], rel=1e-5)
        assert sum(d["probs"]) == pytest.approx(1, abs=1e-5)
    with pytest.raises(ValueError, match="position must be in"):
        trace.token_detail(len(trace.token_ids))


# ---- per layer -----------------------------------------------------------------------------------------------


def test_load_agrees_with_the_engine_router_statistics(model, trace):
    for layer in trace.moe_layers:
        engine = model.get_router_stats(layer)
        load = trace.load(layer)
        assert load["counts"].tolist() == engine["counts"] == by_hand_counts(trace.layers[layer].experts, 16)
        assert engine["tokens"] == load["tokens"] == len(trace.token_ids)
        assert load["share"].sum() == pytest.approx(1)
        for key in ("cv", "max_over_mean", "ideal"):
            assert load[key] == pytest.approx(engine[key])
        assert load["unused_experts"] == engine["unused_experts"]
        np.testing.assert_allclose(load["balance"], engine["balance"])
    np.testing.assert_array_equal(trace.load_matrix(), [model.get_router_stats(i)["counts"] for i in (1, 2, 3)])
    with pytest.raises(ValueError, match="layer 0 is not an MoE layer"):
        trace.load(0)


def test_rank_loads_count_each_pick_on_the_ranks_that_hold_its_expert(model, trace):
    for layer in trace.moe_layers:
        picks = trace.layer(layer).experts.ravel()
        ep = trace.rank_loads(plan_sharding(model.config, 2, "ep"))[layer]
        half = model.config.num_experts // 2  # rank 0 holds experts [0, half), rank 1 the rest
        assert ep.slots.tolist() == [int((picks < half).sum()), int((picks >= half).sum())]
        etp = trace.rank_loads(plan_sharding(model.config, 2, "etp"))[layer]
        assert etp.slots.tolist() == [picks.size, picks.size] and etp.balance == 1.0  # a slice of every pick
    with pytest.raises(ValueError, match="experts"):
        trace.rank_loads(plan_sharding(dataclasses.replace(model.config, num_experts=4, num_experts_per_tok=2), 2))


def test_coactivation_counts_pairs_of_experts_on_the_same_token(trace):
    for layer in trace.moe_layers:
        c = trace.coactivation(layer)
        experts = trace.layers[layer].experts.tolist()
        expected = np.zeros((16, 16), dtype=int)
        for a, b in experts:
            expected[a, b] += 1
            expected[b, a] += 1
            expected[a, a] += 1
            expected[b, b] += 1
        np.testing.assert_array_equal(c, expected)
        np.testing.assert_array_equal(c, c.T)
        np.testing.assert_array_equal(np.diag(c), by_hand_counts(trace.layers[layer].experts, 16))
        # with K = 2 every token that chose i has exactly one partner
        np.testing.assert_array_equal(c.sum(axis=1) - np.diag(c), np.diag(c))


def test_class_preference_counts_every_pick_under_its_tokens_class(trace):
    layer = 2
    pref = trace.class_preference(layer)
    expected = np.zeros((16, len(TOKEN_CLASSES)), dtype=int)
    for row, tok in zip(trace.layers[layer].experts.tolist(), trace.tokens):
        for e in row:
            expected[e, token_class(tok)] += 1
    np.testing.assert_array_equal(pref["counts"], expected)
    used = expected.sum(axis=1) > 0
    np.testing.assert_allclose(pref["share"][used].sum(axis=1), 1)
    assert not pref["share"][~used].any()
    frequency = np.bincount([token_class(t) for t in trace.tokens], minlength=6) / len(trace.tokens)
    present = frequency > 0
    np.testing.assert_allclose(pref["lift"][:, present] * frequency[present], pref["share"][:, present])
    # on average over picks an expert's lift is 1: sum_e P(e) * P(c|e) / P(c) = 1 for every present class
    p_expert = expected.sum(axis=1) / expected.sum()
    np.testing.assert_allclose(p_expert @ pref["lift"][:, present], 1)


# ---- export --------------------------------------------------------------------------------------------------


def test_json_export_round_trips(trace):
    text = trace.to_json()
    d = json.loads(text)
    assert d["text"] == TEXT and d["token_ids"] == trace.token_ids and d["tokens"] == trace.tokens
    assert d["classes"][trace.tokens.index(" Juliet")] == "capitalised"
    assert sorted(d["layers"]) == ["1", "2", "3"] and d["top_k"] == 2 and d["disabled"] == {}
    for layer, r in trace.layers.items():
        np.testing.assert_array_equal(d["layers"][str(layer)]["experts"], r.experts)
        np.testing.assert_array_equal(np.array(d["layers"][str(layer)]["probs"], dtype=np.float32), r.probs)
    back = RoutingTrace.from_json(text)
    assert back.tokens == trace.tokens and back.top_k == 2 and back.moe_layers == trace.moe_layers
    np.testing.assert_array_equal(back.classes, trace.classes)
    for layer, r in trace.layers.items():
        for name in ("experts", "weights", "probs"):
            np.testing.assert_array_equal(getattr(back.layers[layer], name), getattr(r, name))
    with pytest.raises(ValueError, match="not a routing trace"):
        RoutingTrace.from_json(json.dumps({"format": "something else"}))


def test_csv_has_one_row_per_token_and_layer(trace):
    rows = list(csv.DictReader(io.StringIO(trace.to_csv())))
    assert list(rows[0]) == ["position", "token_id", "token", "class", "layer", "expert_1", "expert_2", "weight_1",
                             "weight_2", "top1_prob", "margin", "entropy"]
    assert len(rows) == len(trace.token_ids) * 3
    assert {(int(r["position"]), int(r["layer"])) for r in rows} == {(t, l) for t in range(len(trace.token_ids))
                                                                      for l in (1, 2, 3)}
    for r in rows:
        t, routing = int(r["position"]), trace.layers[int(r["layer"])]
        assert r["token"] == trace.tokens[t] and int(r["token_id"]) == trace.token_ids[t]
        assert [int(r["expert_1"]), int(r["expert_2"])] == routing.experts[t].tolist()
        assert float(r["weight_1"]) + float(r["weight_2"]) == pytest.approx(1, abs=1e-5)
        ranked = sorted(routing.probs[t].tolist(), reverse=True)
        assert float(r["top1_prob"]) == pytest.approx(ranked[0], rel=1e-5)
        assert float(r["margin"]) == pytest.approx(ranked[0] - ranked[1], rel=1e-5, abs=1e-6)


def test_html_is_self_contained_and_colours_tokens_by_their_top1_expert(trace):
    page = trace.to_html(layer=3)
    for outside in ("http://", "https://", "<script", "<link", "@import", "url("):
        assert outside not in page
    assert all(html.escape(tok) in page for tok in trace.tokens)
    assert "<|im_end|>" not in page and "&lt;|im_end|&gt;" in page and ">&amp;</span>" in page
    spans = re.findall(r'<span class="tok" style="background:([^"]+)" title="[^"]*">(.*?)</span>', page, re.S)
    assert [html.unescape(text) for _, text in spans] == trace.tokens
    top1 = trace.layers[3].experts[:, 0].tolist()
    for (colour_a, _), e_a in zip(spans, top1):  # same colour exactly when the same expert
        for (colour_b, _), e_b in zip(spans, top1):
            assert (colour_a == colour_b) == (e_a == e_b)
    assert page.count("<tr>") == 1 + len(trace.token_ids) + 1 + 3  # grid header and rows, load header and rows
    with pytest.raises(ValueError, match="layer 0 is not an MoE layer"):
        trace.to_html(layer=0)


# ---- what-if (needs RoutingOverride in the engine) -----------------------------------------------------------


def test_what_if_ablated_expert_disappears_only_from_the_changed_run(model):
    explorer = RoutingExplorer(model)
    layer = 2
    busiest = int(np.argmax(explorer.run(TEXT).counts(layer)))
    result = explorer.what_if(TEXT, disabled={layer: [busiest]}, max_steps=8)
    assert model.routing_override is None
    original, changed = result["original"]["trace"], result["changed"]["trace"]
    assert busiest in original.layers[layer].experts and original.disabled == {}
    assert busiest not in changed.layers[layer].experts and changed.disabled == {layer: [busiest]}
    assert not changed.layers[layer].probs[:, busiest].any()
    assert changed.load(layer)["share"][busiest] == 0 and busiest in changed.load(layer)["unused_experts"]
    t = changed.tokens.index(" Juliet")
    p = [q for q in changed.layers[layer].probs[t].tolist() if q > 0]
    assert changed.token_detail(t)["layers"][layer]["entropy"] == pytest.approx(-sum(q * math.log(q) for q in p),
                                                                                  rel=1e-6)
    # each side agrees with the engine's own perplexity and greedy generation under the same routing
    assert result["original"]["perplexity"] == pytest.approx(model.perplexity([TEXT]), rel=1e-9)
    greedy, _ = model.generate(TEXT, max_steps=8, temperature=0.0, chat=False)
    assert result["original"]["continuation"] == greedy
    model.routing_override = RoutingOverride(disabled={layer: frozenset({busiest})})
    assert result["changed"]["perplexity"] == pytest.approx(model.perplexity([TEXT]), rel=1e-9)
    assert result["changed"]["perplexity"] != pytest.approx(result["original"]["perplexity"], rel=1e-9)
    for side in ("original", "changed"):
        probs = [n["prob"] for n in result[side]["next_tokens"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1
    assert result["next_token_kl"] > 0 and 0 <= result["prediction_agreement"] <= 1


def test_what_if_top_k_1_routes_every_token_to_one_expert(model):
    result = RoutingExplorer(model).what_if(TEXT, top_k=1, max_steps=4)
    assert result["top_k"] == 1 and result["original"]["trace"].top_k == 2
    changed = result["changed"]["trace"]
    for layer, r in changed.layers.items():
        assert r.experts.shape == (len(changed.token_ids), 1)
        np.testing.assert_allclose(r.weights, 1.0)  # norm_topk_prob: one expert takes the whole weight
        assert changed.coactivation(layer).sum() == len(r.experts)  # only the diagonal
    assert all(r.experts.shape[1] == 2 for r in result["original"]["trace"].layers.values())
    assert model.routing_override is None


def test_what_if_restores_the_previous_override_even_when_it_fails(model, monkeypatch):
    explorer = RoutingExplorer(model)
    previous = RoutingOverride(top_k=3)
    model.routing_override = previous
    with pytest.raises(ValueError, match="top_k must be in 1..16"):
        explorer.what_if(TEXT, top_k=17)
    assert model.routing_override is previous
    real_generate = model.generate

    def fails_when_changed(*args, **kwargs):
        if model.routing_override is not None and model.routing_override is not previous:
            raise RuntimeError("failure in the changed run")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", fails_when_changed)
    with pytest.raises(RuntimeError, match="failure in the changed run"):
        explorer.what_if(TEXT, disabled={1: [0]}, max_steps=2)
    assert model.routing_override is previous
    model.routing_override = None
    with pytest.raises(RuntimeError):
        explorer.what_if(TEXT, top_k=1, max_steps=2)
    assert model.routing_override is None
