"""The independent oracle: tiny random Qwen3-MoE models built and run with transformers' Qwen3MoeForCausalLM.

Shared by the live oracle test (needs torch + transformers) and by ``golden/make_golden.py``, which stores the same
comparisons as small files so the core tests also run where transformers is not installed.
"""

import json
from pathlib import Path

import numpy as np

from qwen3moe.synthetic import CHAT_TEMPLATE, byte_level_tokenizer

PROMPT_LEN, DECODE_STEPS = 32, 16
PERPLEXITY_TEXT = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate."

# Each case exercises a different corner of the config; together they cover every field the engine reads.
CASES = {
    # MoE every second layer (decoder_sparse_step), GQA 2:1, head_dim != hidden/heads, renormalised top-k, bf16, sharded
    "sparse_step_gqa2_bf16_sharded": dict(
        config=dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[],
                    norm_topk_prob=True, tie_word_embeddings=False, rope_theta=1e6),
        dtype="bfloat16", shards="8KB"),
    # mlp_only_layers, plain multi-head attention (GQA 1:1), tied embeddings, raw top-k weights, f32, one file
    "mlp_only_mha_tied_f32": dict(
        config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                    num_experts=6, num_experts_per_tok=3, decoder_sparse_step=1, mlp_only_layers=[0, 2],
                    norm_topk_prob=False, tie_word_embeddings=True, rope_theta=10000.0),
        dtype="float32", shards=None),
    # GQA 4:1 with head_dim = 2 * hidden/heads, every layer MoE, top-1 routing, tied, bf16, sharded
    "gqa4_top1_tied_bf16": dict(
        config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                    num_experts=4, num_experts_per_tok=1, decoder_sparse_step=1, mlp_only_layers=[],
                    norm_topk_prob=True, tie_word_embeddings=True, rope_theta=5e6),
        dtype="bfloat16", shards="16KB"),
    # untied, norm_topk_prob false, bf16, mixed dense/MoE via both rules at once
    "mixed_rules_untied_bf16": dict(
        config=dict(hidden_size=40, num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=1, head_dim=12,
                    num_experts=5, num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3],
                    norm_topk_prob=False, tie_word_embeddings=False, rope_theta=1e6),
        dtype="bfloat16", shards=None),
}
COMMON = dict(vocab_size=300, intermediate_size=64, moe_intermediate_size=24, rms_norm_eps=1e-6,
              max_position_embeddings=128, hidden_act="silu", eos_token_id=258)


def build_hf_model(case: str, seed: int):
    """A transformers Qwen3MoeForCausalLM of the case's config with weights drawn from ``seed``.

    Weights are re-drawn at a realistic scale (N(0, 1/fan_in) matrices, norms near 1, a decisive router) rather than
    transformers' N(0, 0.02) initialisation, under which every router probability is ~1/E and top-k would be decided
    by rounding noise.
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    spec = CASES[case]
    kwargs = COMMON | spec["config"]
    theta = kwargs.pop("rope_theta")
    config = Qwen3MoeConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                scale = 3.0 if name.endswith("mlp.gate.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * scale / p.shape[-1] ** 0.5)
            if spec["dtype"] == "bfloat16":  # compute in f32 on exactly the weights the bf16 file will hold
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def save_hf_model(model, out_dir: Path, case: str) -> Path:
    """save_pretrained in the case's dtype and sharding, plus our byte-level tokenizer files."""
    import torch

    spec = CASES[case]
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    state = {name: p.detach().to(dtype) for name, p in model.state_dict().items()}
    model.save_pretrained(out_dir, state_dict=state, max_shard_size=spec["shards"] or "1GB")
    byte_level_tokenizer().save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE,
                                                               "eos_token": "<|im_end|>"}))
    return out_dir


def hf_reference(model, prompt: np.ndarray) -> dict[str, np.ndarray]:
    """transformers' prefill logits, its greedy continuation and the logits of every cached decode step."""
    import torch

    ids = torch.tensor(prompt[None], dtype=torch.long)
    with torch.no_grad():
        prefill = model(ids).logits[0].float().numpy()  # (PROMPT_LEN, V)
        model.generation_config.eos_token_id = None  # never stop early: compare all DECODE_STEPS
        # an explicit mask: otherwise generate() masks prompt tokens that equal pad_token_id
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_STEPS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        text_ids = torch.tensor([byte_level_tokenizer().encode(PERPLEXITY_TEXT).ids])
        perplexity = torch.exp(model(text_ids, labels=text_ids).loss).item()  # mean NLL of tokens 2..n
    tokens = out.sequences[0, len(prompt):].numpy()  # (DECODE_STEPS,)
    step_logits = torch.stack(out.logits)[:, 0].float().numpy()  # (DECODE_STEPS, V)
    return {"prompt": prompt, "prefill_logits": prefill, "greedy_tokens": tokens, "step_logits": step_logits,
            "perplexity": np.float64(perplexity)}
