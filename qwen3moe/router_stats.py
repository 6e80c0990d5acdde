"""Expert-usage statistics for every MoE layer, gathered from every routed token (prefill and decode, all tasks).

Per layer we keep, since the last reset: the number of (token, slot) picks of each expert, the number of tokens
routed, the sum of router entropies and the sum of router probabilities per expert. From these follow the figures
of the user guide: ``share``, ``balance = count / ideal`` with ``ideal = tokens * top_k / num_experts`` (1.0 is
perfectly even), the population variance of the counts; and a few more a researcher wants: coefficient of
variation, max/mean, unused experts, mean router entropy and the auxiliary balance loss
``aux = E * sum_e f_e * P_e`` (f_e: fraction of picks that went to e, P_e: mean router probability of e; perfectly
even routing gives 1).

An optional per-token trace records (layer, task, position, token, experts, weights, router probabilities) for the
routing explorer; it grows with every token, so it is off unless asked for.
"""

from dataclasses import dataclass

import numpy as np

from .config import Qwen3MoeConfig
from .layers import Routing


@dataclass
class RouterTraceRecord:
    layer: int
    task_id: object  # the InferTask's task_id (or None for perplexity/forward calls)
    position: int  # the token's position in its sequence
    token: int  # the token id that was routed
    experts: list[int]
    weights: list[float]
    probs: list[float]  # the router's softmax over all experts


class RouterStats:
    def __init__(self, config: Qwen3MoeConfig):
        self.config = config
        self.trace_enabled = False
        self.reset()

    def reset(self) -> None:
        E = self.config.num_experts
        self.counts = {i: np.zeros(E, dtype=np.int64) for i in self.config.moe_layers}
        self.tokens = dict.fromkeys(self.config.moe_layers, 0)
        self.entropy_sum = dict.fromkeys(self.config.moe_layers, 0.0)
        self.prob_sum = {i: np.zeros(E, dtype=np.float64) for i in self.config.moe_layers}
        self.trace: list[RouterTraceRecord] = []

    def record(self, layer: int, routing: Routing, token_info: list[tuple[object, int, int]]) -> None:
        """Count one step's routing; ``token_info[t] = (task_id, position, token id)`` describes row t."""
        p = routing.probs.astype(np.float64)  # (T, E)
        self.add(layer, np.bincount(routing.experts.ravel(), minlength=self.config.num_experts),
                 routing.experts.shape[0], float(-(p * np.log(np.maximum(p, 1e-30))).sum()), p.sum(axis=0))
        if self.trace_enabled:
            for (task_id, pos, tok), experts, weights, probs in zip(token_info, routing.experts, routing.weights,
                                                                      routing.probs):
                self.trace.append(RouterTraceRecord(layer, task_id, pos, tok, experts.tolist(),
                                                    [float(w) for w in weights], probs.tolist()))

    def add(self, layer: int, counts: np.ndarray, tokens: int, entropy_sum: float, prob_sum: np.ndarray) -> None:
        """Add sums gathered elsewhere (a GPU decode loop counts on the device): picks per expert (E,), tokens
        routed, the sum of their router entropies and of their router probabilities (E,)."""
        self.counts[layer] += counts
        self.tokens[layer] += tokens
        self.entropy_sum[layer] += entropy_sum
        self.prob_sum[layer] += prob_sum

    def layer_stats(self, layer: int) -> dict:
        if layer not in self.counts:
            kinds = ", ".join(map(str, self.config.moe_layers)) or "none"
            raise ValueError(f"layer {layer} is not an MoE layer of this model (MoE layers: {kinds})")
        counts, tokens = self.counts[layer], self.tokens[layer]
        E = self.config.num_experts
        picks = counts.sum()
        ideal = picks / E  # = tokens * top_k / E, with the top_k in force (a RoutingOverride may change it)
        mean = counts.mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "layer": layer,
                "tokens": int(tokens),
                "counts": counts.tolist(),
                "share": (counts / picks).tolist() if picks else [0.0] * E,
                "ideal": ideal,
                "balance": (counts / ideal).tolist() if ideal else [0.0] * E,
                "variance": float(counts.var()),
                "cv": float(counts.std() / mean) if mean else 0.0,
                "max_over_mean": float(counts.max() / mean) if mean else 0.0,
                "unused_experts": np.flatnonzero(counts == 0).tolist(),
                "mean_entropy": self.entropy_sum[layer] / tokens if tokens else 0.0,
                "aux_loss": float(E * np.dot(counts / picks, self.prob_sum[layer] / tokens)) if tokens else 0.0,
            }

    def format_table(self) -> str:
        """One line per MoE layer, ending with its three busiest experts."""
        if not self.counts:
            return "router statistics: this model has no MoE layers"
        lines = [f"{'layer':>5} {'tokens':>8} {'variance':>10} {'cv':>6} {'max/mean':>8} {'unused':>6} "
                 f"{'entropy':>7} {'aux':>6}  busiest (expert:balance)"]
        for layer in self.counts:
            s = self.layer_stats(layer)
            top = np.argsort(s["counts"], kind="stable")[::-1][:3]
            busiest = " ".join(f"{e}:{s['balance'][e]:.2f}" for e in top) if s["tokens"] else "-"
            lines.append(f"{layer:>5} {s['tokens']:>8} {s['variance']:>10.1f} {s['cv']:>6.2f} "
                         f"{s['max_over_mean']:>8.2f} {len(s['unused_experts']):>6} {s['mean_entropy']:>7.3f} "
                         f"{s['aux_loss']:>6.3f}  {busiest}")
        return "\n".join(lines)
