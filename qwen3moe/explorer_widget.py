"""The routing explorer in Jupyter: a thin ipywidgets view over ``explorer.py``, which holds all the logic.

    from qwen3moe.explorer_widget import ExplorerWidget
    ExplorerWidget(model)          # displays itself in a notebook cell

Controls: the text, a layer, a token; a top-k and experts to disable for the what-if. Each control's callback only
calls the logic module and renders what it returns, so tests drive the callbacks from Python and check the state.
"""

import html

import ipywidgets as w

from .explorer import RoutingExplorer


class ExplorerWidget(w.VBox):
    def __init__(self, model, text: str = "ROMEO:\nBut soft, what light through yonder window breaks?"):
        self.explorer = RoutingExplorer(model)
        c = model.config
        self.text = w.Textarea(value=text, layout=w.Layout(width="100%", height="70px"))
        self.run_button = w.Button(description="Run", button_style="primary")
        self.layer = w.Dropdown(options=c.moe_layers, value=c.moe_layers[0], description="layer")
        self.token = w.IntSlider(min=0, max=0, description="token")
        self.top_k = w.IntSlider(min=1, max=c.num_experts, value=c.num_experts_per_tok, description="top-k")
        self.disabled = w.SelectMultiple(options=list(range(c.num_experts)), description="disable", rows=4)
        self.what_if_button = w.Button(description="What if?")
        self.tokens_view, self.detail_view, self.load_view, self.what_if_view = (w.HTML() for _ in range(4))
        self.trace = None
        self.comparison = None
        self.run_button.on_click(lambda _: self.run())
        self.what_if_button.on_click(lambda _: self.what_if())
        for control in (self.layer, self.token):
            control.observe(lambda _: self.render(), names="value")
        super().__init__([self.text, w.HBox([self.run_button, self.layer, self.token]), self.tokens_view,
                          self.detail_view, self.load_view,
                          w.HBox([self.top_k, self.disabled, self.what_if_button]), self.what_if_view])
        self.run()

    def run(self) -> None:
        self.trace = self.explorer.run(self.text.value)
        self.token.max = len(self.trace.token_ids) - 1
        self.render()

    def render(self) -> None:
        t, layer = self.trace, self.layer.value
        self.tokens_view.value = t.to_html(layer)
        d = t.token_detail(self.token.value)
        per_layer = d["layers"][layer]
        self.detail_view.value = (
            f"<b>token {self.token.value} {html.escape(repr(d['token']))}</b>, layer {layer}: experts "
            f"{per_layer['experts']} weights {[round(x, 3) for x in per_layer['weights']]}, margin "
            f"{per_layer['margin']:.3f}, entropy {per_layer['entropy']:.3f} nats")
        load = t.load(layer)
        self.load_view.value = (f"layer {layer}: cv {load['cv']:.2f}, max/mean {load['max_over_mean']:.2f}, "
                                f"unused experts {load['unused_experts']}")

    def what_if(self) -> None:
        disabled = {self.layer.value: list(self.disabled.value)} if self.disabled.value else None
        self.comparison = self.explorer.what_if(self.text.value, top_k=self.top_k.value, disabled=disabled)
        rows = []
        for side in ("original", "changed"):
            r = self.comparison[side]
            nxt = ", ".join(f"{html.escape(repr(n['token']))} {n['prob']:.2f}" for n in r["next_tokens"])
            ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
            rows.append(f"<tr><td>{side}</td><td>{nxt}</td><td><pre>{html.escape(r['continuation'])}</pre></td>"
                        f"<td>{ppl}</td></tr>")
        self.what_if_view.value = ("<table><tr><th></th><th>next token</th><th>greedy continuation</th>"
                                   "<th>perplexity</th></tr>" + "".join(rows) + "</table>")

    def export(self) -> dict:
        """The current trace as JSON text, CSV text and a self-contained HTML page."""
        return {"json": self.trace.to_json(), "csv": self.trace.to_csv(),
                "html": self.trace.to_html(self.layer.value)}


