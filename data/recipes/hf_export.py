"""Stage 6 of the recipe: write the trained model as a Hugging Face folder that looks like a released Qwen3 checkpoint.

Why not just ``save_pretrained``: transformers 5 keeps the experts of a layer packed in memory
(``mlp.experts.gate_up_proj [E, 2*I, H]``, ``mlp.experts.down_proj [E, H, I]``). Recent versions (5.24 checked)
convert back to per-expert names when saving, but the result depends on the installed version (the GPU image runs an
older 5.x), and ``save_pretrained`` writes the transformers-5 config spelling (``num_local_experts``,
``rope_parameters``) and float32 unless told otherwise. The point of this model is to be read by an engine written
for the released Qwen3-MoE checkpoints, so the folder is written here, by hand, in the released layout whatever the
installed version: one bf16 tensor per expert and projection (``mlp.experts.{j}.{gate,up,down}_proj.weight``), at
least two shards plus ``model.safetensors.index.json`` (the sharded path is the normal path for real checkpoints),
released-style ``config.json`` (``num_experts``, top-level ``rope_theta``) and ``generation_config.json``.
transformers still loads it: its Qwen3-MoE conversion mapping packs per-expert tensors on load, which
``verify_folder`` checks (no missing or unexpected keys, bit-identical tensors).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

MAX_SHARD_BYTES = 10 * 1000 * 1000  # ~17 MB of bf16 weights -> 2 shards, each well under 16 MB


def released_config(cfg, transformers_version: str) -> dict:
    """config.json in the spelling of the released Qwen3-MoE checkpoints (``num_experts``, top-level rope_theta)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": cfg.attention_bias,
        "attention_dropout": cfg.attention_dropout,
        "bos_token_id": cfg.bos_token_id,
        "decoder_sparse_step": cfg.decoder_sparse_step,
        "eos_token_id": cfg.eos_token_id,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "max_window_layers": cfg.num_hidden_layers,
        "mlp_only_layers": list(cfg.mlp_only_layers),
        "model_type": "qwen3_moe",
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "num_attention_heads": cfg.num_attention_heads,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "output_router_logits": False,
        "pad_token_id": cfg.pad_token_id,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": float(rope.get("rope_theta", getattr(cfg, "rope_theta", 1e6))),
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "sliding_window": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": transformers_version,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
    }


def generation_config(eos_ids: list[int], pad_id: int, bos_id: int, transformers_version: str) -> dict:
    """generation_config.json: stop at ``<|im_end|>`` or ``<|endoftext|>``; sampling defaults that suit this model."""
    return {
        "bos_token_id": bos_id,
        "do_sample": True,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "transformers_version": transformers_version,
    }


def released_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the on-disk names of the released checkpoints, in bf16, in a readable order.

    Packed experts are split: ``gate_up_proj[j]`` is ``[gate_j; up_j]`` stacked along its rows (transformers
    chunks the product in two along the output dimension, gate first), ``down_proj[j]`` is expert j's down matrix.
    """
    sd = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    out = {}
    for name, t in sd.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m is None:
            out[name] = t
            continue
        prefix, kind = m.groups()
        for j in range(t.shape[0]):
            if kind == "gate_up_proj":
                gate, up = t[j].chunk(2, dim=0)
                out[f"{prefix}.{j}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{j}.up_proj.weight"] = up.contiguous()
            else:
                out[f"{prefix}.{j}.down_proj.weight"] = t[j].contiguous()

    def order(name: str):
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        expert = re.search(r"\.experts\.(\d+)\.", name)
        group = 0 if name.startswith("model.embed") else 2 if not layer else 1
        group = 3 if name == "model.norm.weight" else 4 if name.startswith("lm_head") else group
        return (group, int(layer.group(1)) if layer else 0, int(expert.group(1)) if expert else -1, name)

    return {k: out[k] for k in sorted(out, key=order)}


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write ``model-0000k-of-0000N.safetensors`` shards greedily in order, and ``model.safetensors.index.json``."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) < 2:
        raise RuntimeError("expected at least two shards: lower max_shard_bytes")
    for old in folder.glob("model*.safetensors"):
        old.unlink()
    names, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        (folder / fname).chmod(0o644)  # safetensors creates 0600 files
        names.append(fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def verify_folder(folder: Path, reference_model) -> dict:
    """Reload the folder with ``from_pretrained`` and check it is exactly the in-memory (bf16-rounded) model.

    Returns the loading info; raises if any key is missing, unexpected or mismatched, or any tensor differs.
    """
    from transformers import Qwen3MoeForCausalLM

    loaded, info = Qwen3MoeForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"from_pretrained({folder}) reported {problems}")
    ref = {k: v.detach().float().cpu() for k, v in reference_model.state_dict().items()}
    got = loaded.state_dict()
    if set(ref) != set(got):
        raise RuntimeError(f"state dict keys differ: {sorted(set(ref) ^ set(got))[:5]}")
    worst = max(float((ref[k] - got[k].float()).abs().max()) for k in ref)
    if worst != 0.0:
        raise RuntimeError(f"reloaded tensors differ from the saved model by up to {worst}")
    cfg = loaded.config
    return {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "max_abs_diff": worst,
            "num_experts": cfg.num_experts, "rope_theta": (cfg.rope_parameters or {}).get("rope_theta"),
            "model": loaded}
