"""The explorer's ipywidgets view, driven from Python: each control's callback updates the state it should."""

import json

import pytest

pytest.importorskip("ipywidgets", reason="the explorer view needs ipywidgets (pip install -e .[notebooks])")

from qwen3moe import Qwen3MoeForCausalLM  # noqa: E402
from qwen3moe.bundled import BUNDLED_MODEL  # noqa: E402
from qwen3moe.explorer_widget import ExplorerWidget  # noqa: E402

pytestmark = pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="needs the bundled model")


@pytest.fixture(scope="module")
def widget():
    return ExplorerWidget(Qwen3MoeForCausalLM(backend="numpy"), text="JULIET:\nO Romeo, Romeo!")


def test_run_layer_and_token_controls(widget):
    t = widget.trace
    assert widget.token.max == len(t.token_ids) - 1
    layer = widget.layer.options[-1]
    widget.layer.value = layer
    widget.token.value = 3
    detail = t.token_detail(3)["layers"][layer]
    assert f"experts {detail['experts']}" in widget.detail_view.value
    assert widget.tokens_view.value == t.to_html(layer)
    widget.text.value = "HAMLET:\nTo be, or not to be"
    widget.run_button.click()
    assert widget.trace is not t and widget.trace.text == "HAMLET:\nTo be, or not to be"


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
