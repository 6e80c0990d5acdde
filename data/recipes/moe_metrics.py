"""Stage 5 of the recipe: the numbers the model card promises, computed with transformers on held-out text.

* **Held-out loss / perplexity.** The held-out stream is ``tokenizer(heldout.txt)`` (the file shipped in the model
  folder: the held-out works, each followed by ``<|endoftext|>``). It is cut into consecutive, non-overlapping
  windows of ``window`` tokens (the last one may be shorter); every window is one forward pass from position 0 and
  every token after the first of its window is predicted. Loss is the mean negative log-likelihood (nats) over those
  predictions, perplexity its exponential. Simple on purpose: any engine can reproduce it exactly.
* **Unigram baseline.** Token frequencies of the training stream with add-one smoothing over the ``len(tokenizer)``
  ids, scored on exactly the same predicted tokens. The model has to beat "no context at all" by a wide margin.
* **Specialisation.** For every MoE layer, the contingency table of (token class of the *input* token at a position,
  top-1 expert chosen there). Token classes come from the token's decoded text: newline / punctuation / capitalised
  word / lower-case word / digit / other. Normalised mutual information ``2 I(C;E) / (H(C) + H(E))`` (the arithmetic
  normalisation, scikit-learn's default) is 0 when routing ignores the class and 1 when one determines the other.
  It is computed for the trained model and for the same seed's initialisation: random routers already route by
  token identity, so the fair comparison is against init, not against 0.
* **Load.** Per MoE layer, each expert's share of all (token, slot) picks on held-out text, and ``balance`` =
  count / ideal with ``ideal = tokens * top_k / num_experts`` (the engine's router statistics use the same
  definition). A dead expert would show balance 0; the card requires every balance >= 0.25.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# The token classes and their rule live in the engine's routing explorer, so that the model card's figures and the
# explorer's views classify tokens the same way.
from qwen3moe.explorer import TOKEN_CLASSES, token_class  # noqa: E402,F401


def token_classes(tokenizer, vocab_rows: int) -> np.ndarray:
    """Class of every id (specials and padding rows are "other")."""
    classes = np.full(vocab_rows, 5, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    for i in range(len(tokenizer)):
        if i not in special:
            classes[i] = token_class(tokenizer.decode([i]))
    return classes


def windows(ids: np.ndarray, window: int) -> list[np.ndarray]:
    """Consecutive non-overlapping windows of ``window`` tokens; the last may be shorter (but has >= 2 tokens)."""
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


def unigram_log_probs(train_ids: np.ndarray, n_tokens: int, vocab_rows: int) -> np.ndarray:
    """log p(id) of an add-one smoothed unigram model over the ``n_tokens`` real ids (padding rows get -inf)."""
    counts = np.bincount(train_ids, minlength=vocab_rows)[:vocab_rows].astype(np.float64)
    logp = np.full(vocab_rows, -np.inf)
    logp[:n_tokens] = np.log((counts[:n_tokens] + 1.0) / (counts[:n_tokens].sum() + n_tokens))
    return logp


def nmi(table: np.ndarray) -> float:
    """Normalised mutual information 2 I / (H(row) + H(col)) of a contingency table of counts."""
    p = table / table.sum()
    pr, pc = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pr, pc)[nz])).sum())
    h = -sum(float((q[q > 0] * np.log(q[q > 0])).sum()) for q in (pr, pc))
    return 2.0 * mi / h if h > 0 else 0.0


@torch.no_grad()
def evaluate(model, ids: np.ndarray, window: int, classes: np.ndarray, unigram_logp: np.ndarray | None,
             device: torch.device, batch: int = 16) -> dict:
    """Held-out loss, unigram loss on the same targets, and per-MoE-layer routing tables, in float32.

    Returns a dict with ``loss``, ``ppl``, ``tokens`` (predictions), ``unigram_loss``/``unigram_ppl`` (if given),
    and per MoE layer: the class x top-1 expert table, NMI, top-k pick counts, shares and balance.
    """
    model.eval()
    cfg = model.config
    n_exp, top_k = cfg.num_experts, cfg.num_experts_per_tok
    ws = windows(ids, window)
    nll_sum, n_pred, uni_sum = 0.0, 0, 0.0
    tables, picks = None, None
    for start in range(0, len(ws), batch):
        group = ws[start:start + batch]
        for length in sorted({len(w) for w in group}):  # equal lengths batch together (only the last differs)
            rows = [w for w in group if len(w) == length]
            x = torch.tensor(np.stack(rows), dtype=torch.long, device=device)
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            tgt = x[:, 1:]
            nll = -logp[:, :-1].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            nll_sum += float(nll.double().sum())
            n_pred += tgt.numel()
            if unigram_logp is not None:
                uni_sum += float(-unigram_logp[tgt.cpu().numpy()].sum())
            cls = torch.tensor(classes, device=device)[x.reshape(-1)]
            if tables is None:
                n_moe = len(out.router_logits)
                tables = np.zeros((n_moe, len(TOKEN_CLASSES), n_exp), dtype=np.int64)
                picks = np.zeros((n_moe, n_exp), dtype=np.int64)
            for layer, logits in enumerate(out.router_logits):
                probs = torch.softmax(logits.float(), dim=-1)
                top = torch.topk(probs, top_k, dim=-1).indices  # ties: lower index first, as torch.topk does
                flat = cls * n_exp + top[:, 0]
                tables[layer] += torch.bincount(flat, minlength=len(TOKEN_CLASSES) * n_exp).view(
                    len(TOKEN_CLASSES), n_exp).cpu().numpy()
                picks[layer] += torch.bincount(top.reshape(-1), minlength=n_exp).cpu().numpy()
    result = {"loss": nll_sum / n_pred, "ppl": math.exp(nll_sum / n_pred), "tokens": n_pred, "windows": len(ws)}
    if unigram_logp is not None:
        result["unigram_loss"] = uni_sum / n_pred
        result["unigram_ppl"] = math.exp(uni_sum / n_pred)
    moe_layers = [i for i in range(cfg.num_hidden_layers)
                  if i not in cfg.mlp_only_layers and (i + 1) % cfg.decoder_sparse_step == 0]
    result["moe_layers"] = {}
    for layer, idx in enumerate(moe_layers):
        share = picks[layer] / picks[layer].sum()
        result["moe_layers"][str(idx)] = {
            "nmi_class_top1": nmi(tables[layer]),
            "class_top1_table": tables[layer].tolist(),
            "picks": picks[layer].tolist(),
            "share": share.tolist(),
            "balance": (share * n_exp).tolist(),
            "min_balance": float((share * n_exp).min()),
            "max_balance": float((share * n_exp).max()),
        }
    return result
