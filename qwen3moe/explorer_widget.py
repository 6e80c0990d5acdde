"""The routing explorer in Jupyter: a thin ipywidgets view over ``explorer.py``, which holds all the logic.

    from qwen3moe.explorer_widget import ExplorerWidget
    ExplorerWidget(model)          # displays itself in a notebook cell

Controls: the text, a layer, the tokens themselves (one button per token, coloured by its top-1 expert in the layer;
hover for its experts in every layer, click for its full router distribution); a top-k and experts to disable for
the what-if. Plain ipywidgets, no frontend code of its own, so it renders wherever ipywidgets 8 does. Each control's
callback only calls the logic module and renders what it returns, so tests drive the callbacks from Python
(``widget.token_buttons[3].click()``) and check the state.
"""

import html

import ipywidgets as w

from .explorer import RoutingExplorer

DEFAULT_TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?"
SELECTED, UNSELECTED = "2px solid #333", "2px solid transparent"  # same width: selecting a token moves nothing


class ExplorerWidget(w.VBox):
    def __init__(self, model, text: str = DEFAULT_TEXT):
        self.explorer = RoutingExplorer(model)
        c = model.config
        self.text = w.Textarea(value=text, layout=w.Layout(width="auto", align_self="stretch", height="70px"))
        self.run_button = w.Button(description="Run", button_style="primary")
        self.layer = w.Dropdown(options=c.moe_layers, value=c.moe_layers[0], description="layer")
        self.tokens = w.Box(layout=w.Layout(flex_flow="row wrap"))  # the token buttons, laid out like the text
        self.tokens.add_class("qwen3moe-tokens")  # a stable hook for the browser test
        self.token_buttons: list[w.Button] = []
        self.position = 0  # the selected token
        self.top_k = w.IntSlider(min=1, max=c.num_experts, value=c.num_experts_per_tok, description="top-k")
        self.disabled = w.SelectMultiple(options=list(range(c.num_experts)), description="disable", rows=4)
        self.what_if_button = w.Button(description="What if?")
        self.detail_view, self.load_view, self.what_if_view = (w.HTML() for _ in range(3))
        self.trace = None
        self.comparison = None
        self.run_button.on_click(lambda _: self.run())
        self.what_if_button.on_click(lambda _: self.what_if())
        self.layer.observe(lambda _: self.render(), names="value")
        super().__init__([self.text, w.HBox([self.run_button, self.layer]), self.tokens, self.detail_view,
                          self.load_view, w.HBox([self.top_k, self.disabled, self.what_if_button]),
                          self.what_if_view])
        self.run()

    def run(self) -> None:
        """Route the text and make one button per token."""
        self.trace = self.explorer.run(self.text.value)
        self.token_buttons = [self._token_button(i) for i in range(len(self.trace.token_ids))]
        children = []
        for token, button in zip(self.trace.tokens, self.token_buttons):
            children += [button, _line_break()] if "\n" in token else [button]
        self.tokens.children = children
        self.position = min(self.position, len(self.token_buttons) - 1)
        self.render()

    def select(self, position: int) -> None:
        """What a click on a token does: show that token's routing."""
        self.position = position
        self.render()

    def render(self) -> None:
        t, layer = self.trace, self.layer.value
        top1 = t.layer(layer).experts[:, 0]  # (T,)
        for i, button in enumerate(self.token_buttons):
            button.style.button_color = t.expert_colour(int(top1[i]))
            button.layout.border = SELECTED if i == self.position else UNSELECTED
        d = t.token_detail(self.position)
        per_layer = d["layers"][layer]
        self.detail_view.value = (
            f"<b>token {self.position} {html.escape(repr(d['token']))}</b> ({d['class']}), layer {layer}: experts "
            f"{per_layer['experts']} weights {[round(x, 3) for x in per_layer['weights']]}, margin "
            f"{per_layer['margin']:.3f} (boundary {per_layer['boundary_margin']:.3f}), entropy "
            f"{per_layer['entropy']:.3f} nats" + _distribution_table(per_layer, t.expert_colour))
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

    def _token_button(self, i: int) -> w.Button:
        # Spaces become no-break spaces and line breaks a visible mark, or the button label would swallow them.
        label = self.trace.tokens[i].replace(" ", "\u00a0").replace("\n", "⏎")
        button = w.Button(description=label, tooltip=self.trace.token_summary(i), style={"font_family": "monospace"},
                          layout=w.Layout(width="auto", height="auto", padding="0 3px", margin="1px"))
        button.on_click(lambda _: self.select(i))
        return button


def _line_break() -> w.Box:
    """A full-width empty box: in a wrapping row it starts a new line, so tokens ending a line of text end a row."""
    return w.Box(layout=w.Layout(width="100%", height="0px", margin="0px"))  # no margin: it would overflow the row


def _distribution_table(per_layer: dict, colour) -> str:
    """The token's router probability for every expert as a bar (the largest fills it), the chosen experts marked
    with their weights.

    Inline styles only: a <style> element in an HTML widget would restyle the whole notebook page.
    """
    weights = dict(zip(per_layer["experts"], per_layer["weights"]))
    probs = per_layer["probs"]
    pad = "padding:0 4px"  # JupyterLab pads table cells generously; one row per expert must stay compact
    rows = "".join(
        f'<tr><td style="{pad}; background:{colour(e)}">{e}</td><td style="{pad}">{p:.3f}</td>'
        f'<td style="{pad}"><div style="width:{200 * p / probs.max():.0f}px; height:10px; background:{colour(e)}">'
        f'</div></td><td style="{pad}">{f"<b>chosen, weight {weights[e]:.3f}</b>" if e in weights else ""}</td></tr>'
        for e, p in enumerate(probs))
    return ('<table style="font-family:monospace; border-collapse:collapse; line-height:1.2">'
            "<tr><th>expert</th><th>p</th><th></th><th></th></tr>" + rows + "</table>")
