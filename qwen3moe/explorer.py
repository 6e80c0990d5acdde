"""The routing explorer's logic: where each token of a text goes, layer by layer, and what changes when the router
is changed. Everything here returns plain data (NumPy arrays, dicts, strings); the widgets and plots live elsewhere.

    explorer = RoutingExplorer(model)
    trace = explorer.run("ROMEO:\\nBut soft! What light through yonder window breaks?")
    trace.top1_grid()            # (T, L) top-1 expert of every token in every MoE layer
    trace.token_detail(3)        # one token: full router distribution, top-k weights, margin, entropy per layer
    trace.load(2), trace.coactivation(2), trace.class_preference(2)
    trace.rank_loads(plan_sharding(model.config, 4))   # the expert work of each of 4 GPUs, per layer
    explorer.what_if(text, disabled={2: [5]})   # the same text with expert 5 of layer 2 switched off
    trace.to_json(), trace.to_csv(), trace.to_html(layer=2)

The figures, per MoE layer (T tokens, E experts, K experts per token):

* **margin** of a token = p1 - p2, its largest minus its second-largest router probability (the full softmax over
  all E experts, before top-k renormalisation). Near 0 the token sits on the border between two top-1 experts; a
  tiny change of the hidden state can swap them. **boundary margin** = pK - p(K+1), the gap between the last
  chosen and the first unchosen expert: near 0 the token nearly went to a different *set* of experts.
* **entropy** of a token = -sum_e p_e ln p_e in nats, between 0 (one expert takes everything) and ln E (uniform).
* **load**: picks per expert over all T*K (token, slot) pairs, their shares, balance = count / ideal with
  ideal = T*K/E, CV = std/mean of the counts (population std), max/mean, unused experts -- the definitions of
  ``router_stats.py``, here for one text and for the K actually used.
* **co-activation** C[i, j] = number of tokens that chose both i and j in that layer; C[i, i] = tokens that chose i.
* **class preference**: each (token, slot) pick is counted under the class of the token it routes (the classes of
  the model card: newline / punctuation / capitalised / lowercase / digit / other). ``share[e, c] = P(c | e)`` and
  ``lift[e, c] = P(c | e) / P(c)``: above 1 the expert sees class c more often than the text contains it.
"""

import csv
import html
import io
import json
from dataclasses import dataclass, field
from collections.abc import Iterable

import numpy as np

from .causal_lm import log_softmax
from .layers import RoutingOverride
from .infer_task import Qwen3MoeKVCache
from .model import Request
from .sharding import RankLoad, ShardingPlan, rank_loads

TOKEN_CLASSES = ("newline", "punctuation", "capitalised", "lowercase", "digit", "other")
JSON_FORMAT = "qwen3moe-routing-trace"


def token_class(text: str) -> int:
    """Index into TOKEN_CLASSES of one token's decoded text; the rule of the model card (data/recipes/moe_metrics.py).

    A token containing a line break is "newline" even with other characters (":\\n"); leading spaces and apostrophes
    do not count ("'s" is lower-case); special tokens and byte pieces of a multi-byte character are "other".
    """
    if "\n" in text or "\r" in text:
        return 0
    s = text.strip()
    if not s or "\ufffd" in s:
        return 5
    if s.isdigit():
        return 4
    core = s.lstrip("'").replace("'", "").replace("-", "")
    if core.isalpha():
        return 2 if core[0].isupper() else 3
    if all(not c.isalnum() for c in s):
        return 1
    return 5


def router_entropy(probs: np.ndarray) -> np.ndarray:
    """(T, E) -> (T,) entropy in nats; disabled experts (probability exactly 0) contribute 0, not NaN."""
    p = probs.astype(np.float64)
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)


def router_margin(probs: np.ndarray, rank: int = 1) -> np.ndarray:
    """(T, E) -> (T,) gap between the rank-th and (rank+1)-th largest probability (rank=1: p1 - p2).

    When rank == E there is no next expert and the gap is to 0.
    """
    p = -np.sort(-probs.astype(np.float64), axis=-1)  # (T, E) most probable first
    p = np.pad(p, ((0, 0), (0, 1)))  # (T, E+1) a trailing 0 for rank == E
    return p[:, rank - 1] - p[:, rank]


@dataclass
class LayerRouting:
    """The router's decisions in one MoE layer for every token of the text."""

    experts: np.ndarray  # (T, K) chosen expert ids, most probable first
    weights: np.ndarray  # (T, K) their mixing weights
    probs: np.ndarray  # (T, E) full softmax over all experts


@dataclass
class RoutingTrace:
    """One text, routed: its tokens and, per MoE layer, the experts, weights and router probabilities.

    ``top_k`` and ``disabled`` record the RoutingOverride in force (num_experts_per_tok and {} for normal routing).
    """

    text: str
    token_ids: list[int]
    tokens: list[str]  # decoded text of each token (special tokens kept)
    classes: np.ndarray  # (T,) index into TOKEN_CLASSES
    num_experts: int
    top_k: int
    layers: dict[int, LayerRouting]
    disabled: dict[int, list[int]] = field(default_factory=dict)

    @property
    def moe_layers(self) -> list[int]:
        return list(self.layers)

    def layer(self, layer: int) -> LayerRouting:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer of this trace (MoE layers: {self.moe_layers})")
        return self.layers[layer]

    # ---- tokens -------------------------------------------------------------------------------------------

    def top1_grid(self) -> np.ndarray:
        """(T, L) the top-1 expert of every token (rows) in every MoE layer (columns, in ``moe_layers`` order)."""
        return np.stack([r.experts[:, 0] for r in self.layers.values()], axis=1)

    def token_detail(self, position: int) -> dict:
        """Everything the router decided for one token, per MoE layer (see the module docstring for the figures)."""
        if not 0 <= position < len(self.token_ids):
            raise ValueError(f"position must be in 0..{len(self.token_ids) - 1}, got {position}")
        per_layer = {}
        for layer, r in self.layers.items():
            probs = r.probs[position:position + 1]  # (1, E)
            per_layer[layer] = {
                "probs": r.probs[position].copy(),
                "experts": r.experts[position].tolist(),
                "weights": r.weights[position].tolist(),
                "margin": float(router_margin(probs)[0]),
                "boundary_margin": float(router_margin(probs, self.top_k)[0]),
                "entropy": float(router_entropy(probs)[0]),
            }
        return {"position": position, "token_id": self.token_ids[position], "token": self.tokens[position],
                "class": TOKEN_CLASSES[self.classes[position]], "layers": per_layer}

    # ---- per layer ----------------------------------------------------------------------------------------

    def counts(self, layer: int) -> np.ndarray:
        """(E,) number of tokens that chose each expert (in any of their K slots)."""
        return np.bincount(self.layer(layer).experts.ravel(), minlength=self.num_experts)

    def load(self, layer: int) -> dict:
        """Counts, shares and balance figures of one layer, defined as in router_stats.py."""
        counts = self.counts(layer)  # (E,)
        mean = counts.mean()
        ideal = len(self.token_ids) * self.top_k / self.num_experts
        return {
            "layer": layer,
            "tokens": len(self.token_ids),
            "counts": counts,
            "share": counts / counts.sum(),
            "ideal": ideal,
            "balance": counts / ideal,
            "cv": float(counts.std() / mean),
            "max_over_mean": float(counts.max() / mean),
            "unused_experts": np.flatnonzero(counts == 0).tolist(),
        }

    def rank_loads(self, plan: ShardingPlan) -> dict[int, RankLoad]:
        """Per MoE layer, the expert work each rank of ``plan`` (``plan_sharding`` of this model, ndev GPUs) does
        for this text: the per-GPU statistics of a model split that way."""
        if plan.config.num_experts != self.num_experts:
            raise ValueError(f"the plan is for a model of {plan.config.num_experts} experts, this trace has "
                             f"{self.num_experts}")
        return rank_loads(plan, {layer: self.counts(layer) for layer in self.layers})

    def load_matrix(self) -> np.ndarray:
        """(L, E) counts of every MoE layer (rows in ``moe_layers`` order): the layer x expert heatmap."""
        return np.stack([self.counts(layer) for layer in self.layers])

    def coactivation(self, layer: int) -> np.ndarray:
        """(E, E) tokens that chose both experts i and j; symmetric, the diagonal is ``counts(layer)``."""
        chosen = self._one_hot(layer)  # (T, E) 1 where the token chose the expert
        return chosen.T @ chosen

    def class_preference(self, layer: int) -> dict:
        """Which token classes each expert receives: counts (E, C), share = P(class | expert), lift = share / P(class).

        Rows of unused experts are 0 in share and lift; so is the lift of a class absent from the text.
        """
        chosen = self._one_hot(layer)  # (T, E)
        classes = np.eye(len(TOKEN_CLASSES), dtype=np.int64)[self.classes]  # (T, C) one-hot class of each token
        counts = chosen.T @ classes  # (E, C)
        per_expert = counts.sum(axis=1, keepdims=True)  # (E, 1)
        share = np.divide(counts, per_expert, out=np.zeros(counts.shape), where=per_expert > 0)  # (E, C)
        base = classes.mean(axis=0)  # (C,) P(class): every token makes K picks, so tokens and picks agree
        lift = np.divide(share, base, out=np.zeros(share.shape), where=base > 0)  # (E, C)
        return {"classes": TOKEN_CLASSES, "counts": counts, "share": share, "lift": lift}

    def _one_hot(self, layer: int) -> np.ndarray:
        experts = self.layer(layer).experts  # (T, K)
        chosen = np.zeros((len(experts), self.num_experts), dtype=np.int64)  # (T, E)
        np.put_along_axis(chosen, experts, 1, axis=1)
        return chosen

    # ---- export -------------------------------------------------------------------------------------------

    def to_json(self) -> str:
        """The whole trace as JSON (layer numbers become string keys, classes their names); see ``from_json``."""
        return json.dumps({
            "format": JSON_FORMAT,
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "classes": [TOKEN_CLASSES[c] for c in self.classes],
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "disabled": {str(layer): experts for layer, experts in self.disabled.items()},
            "layers": {str(layer): {"experts": r.experts.tolist(), "weights": r.weights.tolist(),
                                    "probs": r.probs.tolist()} for layer, r in self.layers.items()},
        }, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "RoutingTrace":
        """A trace saved by ``to_json`` (float32 values come back exactly: JSON keeps their shortest repr)."""
        d = json.loads(text)
        if d.get("format") != JSON_FORMAT:
            raise ValueError(f"not a routing trace: expected format {JSON_FORMAT!r}, got {d.get('format')!r}")
        layers = {int(layer): LayerRouting(np.array(r["experts"], dtype=np.int64),
                                           np.array(r["weights"], dtype=np.float32),
                                           np.array(r["probs"], dtype=np.float32))
                  for layer, r in d["layers"].items()}
        return cls(d["text"], d["token_ids"], d["tokens"], np.array([TOKEN_CLASSES.index(c) for c in d["classes"]]),
                   d["num_experts"], d["top_k"], layers, {int(k): v for k, v in d["disabled"].items()})

    def to_csv(self) -> str:
        """One row per (token, MoE layer): position, token, class, layer, the K experts and weights, p1, margin,
        entropy. The full distributions are left to the JSON export."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        K = self.top_k
        writer.writerow(["position", "token_id", "token", "class", "layer",
                         *(f"expert_{k + 1}" for k in range(K)), *(f"weight_{k + 1}" for k in range(K)),
                         "top1_prob", "margin", "entropy"])
        figures = {layer: (r.probs.max(axis=-1), router_margin(r.probs), router_entropy(r.probs))
                   for layer, r in self.layers.items()}
        for t, (tok_id, tok) in enumerate(zip(self.token_ids, self.tokens)):
            for layer, r in self.layers.items():
                p1, margin, entropy = (f[t] for f in figures[layer])
                writer.writerow([t, tok_id, tok, TOKEN_CLASSES[self.classes[t]], layer, *r.experts[t].tolist(),
                                 *(f"{w:.6g}" for w in r.weights[t]), f"{p1:.6g}", f"{margin:.6g}",
                                 f"{entropy:.6g}"])
        return out.getvalue()

    def to_html(self, layer: int | None = None) -> str:
        """A self-contained page (inline CSS, no scripts, no external resources): the text with tokens coloured by
        their top-1 expert in ``layer`` (default: the first MoE layer; hover for every layer's choice), the
        token x layer grid and the per-layer load table."""
        layer = self.moe_layers[0] if layer is None else layer
        top1 = self.layer(layer).experts[:, 0]  # (T,)
        esc = html.escape
        spans = "".join(f'<span class="tok" style="background:{self.expert_colour(int(e))}" '
                        f'title="{esc(self.token_summary(t), quote=True)}">{esc(tok)}</span>'
                        for t, (tok, e) in enumerate(zip(self.tokens, top1)))
        legend = "".join(f'<span class="chip" style="background:{self.expert_colour(e)}">{e}</span>'
                         for e in range(self.num_experts))
        override = f"top-k {self.top_k}" + (f", disabled experts {self.disabled}" if self.disabled else "")
        return "\n".join([
            "<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>Routing trace</title>',
            f"<style>{_CSS}</style></head><body>",
            "<h1>Routing trace</h1>",
            f"<p>{len(self.token_ids)} tokens, MoE layers {self.moe_layers}, {self.num_experts} experts, "
            f"{esc(override)}.</p>",
            f"<h2>Tokens coloured by their top-1 expert in layer {layer}</h2>",
            f'<div class="text">{spans}</div>', f'<p class="legend">experts: {legend}</p>',
            "<h2>Top-1 expert of every token in every MoE layer</h2>", self._grid_table(),
            "<h2>Expert load per layer</h2>", self._load_table(),
            "</body></html>",
        ])

    def expert_colour(self, expert: int) -> str:
        """A pastel colour per expert, hues spread evenly around the wheel (shared by the HTML export and the widget,
        so an expert has the same colour in both)."""
        return f"hsl({round(360 * expert / self.num_experts)}, 70%, 80%)"

    def token_summary(self, t: int) -> str:
        """One line on token ``t``: position, id, class and its experts (weights) in every MoE layer; the hover text."""
        choices = "; ".join(f"layer {layer}: " + ", ".join(f"{e} ({w:.2f})" for e, w in zip(r.experts[t], r.weights[t]))
                            for layer, r in self.layers.items())
        return f"#{t} id {self.token_ids[t]} {TOKEN_CLASSES[self.classes[t]]} | {choices}"

    def _grid_table(self) -> str:
        head = "".join(f"<th>layer {layer}</th>" for layer in self.layers)
        rows = []
        for t, (tok, experts) in enumerate(zip(self.tokens, self.top1_grid())):
            shown = html.escape(tok.replace("\n", "⏎"))  # one table row per token, so line breaks are drawn
            cells = "".join(f'<td style="background:{self.expert_colour(int(e))}">{e}</td>' for e in experts)
            rows.append(f'<tr><td>{t}</td><td class="token">{shown}</td>{cells}</tr>')
        return f'<table><tr><th>#</th><th>token</th>{head}</tr>{"".join(rows)}</table>'

    def _load_table(self) -> str:
        head = "".join(f"<th>{e}</th>" for e in range(self.num_experts))
        rows = []
        for layer in self.layers:
            s = self.load(layer)
            cells = "".join(f'<td style="background:rgba(200, 60, 60, {min(b / 2, 1):.2f})">{c}</td>'
                            for c, b in zip(s["counts"], s["balance"]))
            rows.append(f"<tr><td>{layer}</td><td>{s['cv']:.2f}</td><td>{s['max_over_mean']:.2f}</td>"
                        f"<td>{len(s['unused_experts'])}</td>{cells}</tr>")
        return (f"<table><tr><th>layer</th><th>CV</th><th>max/mean</th><th>unused</th>{head}</tr>"
                f"{''.join(rows)}</table><p>Cells: tokens per expert, shaded by balance (count / ideal).</p>")


_CSS = """body { font-family: sans-serif; margin: 2em; }
.text { font-family: monospace; white-space: pre-wrap; line-height: 1.8; }
.tok { border-radius: 3px; padding: 1px 0; }
.chip { font-family: monospace; padding: 0 4px; margin-right: 2px; }
table { border-collapse: collapse; font-family: monospace; margin-bottom: 1em; }
td, th { border: 1px solid #ccc; padding: 1px 6px; text-align: right; }
td.token { text-align: left; white-space: pre; }"""


class RoutingExplorer:
    """Runs texts through a model with the router trace on, and compares normal routing with a what-if."""

    def __init__(self, model):
        self.model = model

    def run(self, text: str) -> RoutingTrace:
        """Route ``text`` (one prefill, under the model's current routing override) and collect the trace.

        The forward counts in the model's router statistics like any other; the model's own trace is left as it was
        (records are only kept there if the caller had switched it on).
        """
        return self._forward(text)[0]

    def what_if(self, text: str, top_k: int | None = None, disabled: dict[int, Iterable[int]] | None = None,
                max_steps: int = 20, top: int = 5) -> dict:
        """``text`` under normal routing ("original") and under RoutingOverride(top_k, disabled) ("changed").

        Each side has its trace, the ``top`` most likely next tokens after the text, a greedy continuation of
        ``max_steps`` tokens (deterministic, so the two are comparable) and the perplexity of the text itself (None
        for a one-token text). ``next_token_kl`` = KL(original || changed) of the next-token distributions, in nats;
        ``prediction_agreement`` = fraction of positions whose most likely next token is the same.
        The model's previous routing override is restored afterwards, also when something fails.
        """
        override = RoutingOverride(top_k, {int(layer): frozenset(int(e) for e in experts)
                                           for layer, experts in (disabled or {}).items()})
        previous = self.model.routing_override
        try:
            self.model.routing_override = override  # validates before anything runs
            self.model.routing_override = None
            original, original_lp = self._outcome(text, max_steps, top)
            self.model.routing_override = override
            changed, changed_lp = self._outcome(text, max_steps, top)
        finally:
            self.model.routing_override = previous
        p = np.exp(original_lp[-1])  # (V,)
        return {
            "top_k": changed["trace"].top_k,
            "disabled": changed["trace"].disabled,
            "original": original,
            "changed": changed,
            "next_token_kl": float((p * (original_lp[-1] - changed_lp[-1])).sum()),
            "prediction_agreement": float((original_lp.argmax(-1) == changed_lp.argmax(-1)).mean()),
        }

    def _outcome(self, text: str, max_steps: int, top: int) -> tuple[dict, np.ndarray]:
        """One side of a what-if (under the model's current override), and the log-probabilities (T, V) behind it."""
        trace, logits = self._forward(text)
        lp = log_softmax(logits)  # (T, V)
        ids = np.asarray(trace.token_ids)
        nll = -lp[np.arange(len(ids) - 1), ids[1:]]  # (T-1,) each token predicted from the ones before
        best = np.argsort(-lp[-1], kind="stable")[:top]
        continuation, _ = self.model.generate(text, max_steps=max_steps, temperature=0.0, chat=False)
        return {
            "trace": trace,
            "next_tokens": [{"token_id": int(i), "token": self._token_text(i), "prob": float(np.exp(lp[-1, i]))}
                            for i in best],
            "continuation": continuation,
            "perplexity": float(np.exp(nll.mean())) if len(nll) else None,
        }, lp

    def _forward(self, text: str) -> tuple[RoutingTrace, np.ndarray]:
        """One prefill of ``text`` with the router trace on: (trace, logits (T, V))."""
        model = self.model
        ids = model.tokenizer.encode(text)
        if not 1 <= len(ids) <= model.max_tokens:
            raise ValueError(f"the text must have 1..{model.max_tokens} tokens (max_tokens), it has {len(ids)}")
        stats = model.router_stats
        start, was_enabled = len(stats.trace), stats.trace_enabled
        stats.trace_enabled = True
        try:
            (logits,) = model.forward([Request(ids, 0, Qwen3MoeKVCache(model, len(ids)))], all_logits=True)
            records = stats.trace[start:]
        finally:
            stats.trace_enabled = was_enabled
            if not was_enabled:
                del stats.trace[start:]
        return self._trace(text, ids, records), logits

    def _trace(self, text: str, ids: list[int], records: list) -> RoutingTrace:
        """Regroup the engine's per-(layer, token) records into per-layer arrays, in token order."""
        c = self.model.config
        layers = {}
        for layer in c.moe_layers:
            rows = sorted((r for r in records if r.layer == layer), key=lambda r: r.position)
            layers[layer] = LayerRouting(np.array([r.experts for r in rows], dtype=np.int64),  # (T, K)
                                         np.array([r.weights for r in rows], dtype=np.float32),  # (T, K)
                                         np.array([r.probs for r in rows], dtype=np.float32))  # (T, E)
        tokens = [self._token_text(i) for i in ids]
        override = self.model.routing_override or RoutingOverride()
        return RoutingTrace(text, list(ids), tokens, np.array([token_class(s) for s in tokens], dtype=np.int64),
                            c.num_experts, override.top_k or c.num_experts_per_tok, layers,
                            {layer: sorted(e) for layer, e in sorted(override.disabled.items()) if e})

    def _token_text(self, token_id) -> str:
        return self.model.tokenizer.decode([int(token_id)], skip_special_tokens=False)
