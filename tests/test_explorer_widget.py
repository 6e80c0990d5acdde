"""The explorer's ipywidgets view, driven from Python: each control's callback updates the state it should."""

import json

import pytest

pytest.importorskip("ipywidgets", reason="the explorer view needs ipywidgets (pip install -e .[notebooks])")

from qwen3moe import Qwen3MoeForCausalLM  # noqa: E402
from qwen3moe.bundled import BUNDLED_MODEL  # noqa: E402
from qwen3moe.explorer_widget import SELECTED, ExplorerWidget  # noqa: E402

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="needs the bundled model")


@pytest.fixture(scope="module")
def widget():
    return ExplorerWidget(Qwen3MoeForCausalLM(backend="numpy"), text="JULIET:\nO Romeo, Romeo!")


def test_clicking_a_token_shows_its_router_distribution(widget):
    t = widget.trace
    assert len(widget.token_buttons) == len(t.token_ids)
    assert "".join(b.description for b in widget.token_buttons) == t.text.replace(" ", "\u00a0").replace("\n", "⏎")
    layer = widget.layer.options[-1]
    widget.layer.value = layer
    widget.token_buttons[3].click()
    assert widget.position == 3
    detail = t.token_detail(3)["layers"][layer]
    shown = widget.detail_view.value
    assert "token 3 " in shown and f"experts {detail['experts']}" in shown
    assert f"margin {detail['margin']:.3f}" in shown and f"entropy {detail['entropy']:.3f}" in shown
    assert all(f">{p:.3f}</td>" in shown for p in detail["probs"])  # the whole distribution, not just the top-k
    assert shown.count("chosen, weight") == t.top_k
    assert [b.layout.border for b in widget.token_buttons].count(SELECTED) == 1
    assert widget.token_buttons[3].layout.border == SELECTED
    top1 = t.layer(layer).experts[:, 0]
    assert [b.style.button_color for b in widget.token_buttons] == [t.expert_colour(int(e)) for e in top1]
    assert widget.token_buttons[3].tooltip == t.token_summary(3)  # the hover: its experts in every layer


def test_run_makes_new_token_buttons(widget):
    widget.text.value = "HAMLET:\nTo be, or not to be"
    old = widget.trace
    widget.run_button.click()
    t = widget.trace
    assert t is not old and t.text == "HAMLET:\nTo be, or not to be"
    assert len(widget.token_buttons) == len(t.token_ids)
    assert all(b in widget.tokens.children for b in widget.token_buttons)
    assert len(widget.tokens.children) == len(t.token_ids) + sum("\n" in tok for tok in t.tokens)  # + line breaks
    widget.token_buttons[-1].click()
    assert f"token {len(t.token_ids) - 1} " in widget.detail_view.value


def test_what_if_disables_the_chosen_experts(widget):
    layer = widget.layer.value
    busiest = int(widget.trace.counts(layer).argmax())
    widget.disabled.value = (busiest,)
    widget.top_k.value = 1
    widget.what_if_button.click()
    changed = widget.comparison["changed"]["trace"]
    assert busiest not in changed.layer(layer).experts and changed.layer(layer).experts.shape[1] == 1
    assert widget.explorer.model.routing_override is None
    assert "greedy continuation" in widget.what_if_view.value and "original" in widget.what_if_view.value
    exported = widget.export()
    assert json.loads(exported["json"]) and exported["csv"].count("\n") >= len(widget.trace.token_ids)
