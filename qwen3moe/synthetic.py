"""Synthetic Qwen3-MoE checkpoints: real file layout, real tensor names, random weights.

Real Qwen3 weights cannot always be downloaded (CI, offline machines), yet the loader, the engine and the
benchmarks need folders that look exactly like the real ones. This module writes such a folder for any config:
``config.json``, ``generation_config.json``, a byte-level BPE ``tokenizer.json`` in the Qwen2 format (the 256 bytes
plus Qwen's special tokens, no merges), ``tokenizer_config.json`` with a Qwen3-style chat template, and bf16 (or
f16/f32) weights in safetensors shards with ``model.safetensors.index.json``.
"""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .config import config_from_dict
from .weights import expected_shapes

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen2/Qwen3's pre-tokenisation regex (from their tokenizer.json).
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")

# A Qwen3-style chat template: ChatML turns; with enable_thinking=false an empty think block is pre-filled, as
# Qwen3's own template does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

TINY_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],
    "hidden_act": "silu",
    "eos_token_id": 258,  # <|im_end|> in the byte-level tokenizer below
    "torch_dtype": "bfloat16",
}

def byte_level_tokenizer() -> Tokenizer:
    """A Qwen2-format byte-level BPE with no merges: every byte is a token, then the special tokens."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def random_weights(config: dict, seed: int = 0, dtype=ml_dtypes.bfloat16, router_std: float = 1.0,
                   select=None) -> dict[str, np.ndarray]:
    """Random tensors with every name and shape a checkpoint of ``config`` has (per-expert form).

    Matrices are N(0, 1/sqrt(fan_in)) so activations keep their scale through the layers; norm weights are near 1
    (not exactly 1, so a test notices if a norm weight is dropped); the router is sharper than at initialisation
    (``router_std``) so that top-k choices are decisive, as in trained models. ``select(name)`` keeps only some
    tensors (to write a large checkpoint one shard at a time).
    """
    c = config_from_dict(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(c).items():
        if select is not None and not select(name):
            continue
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            std = router_std if name.endswith("mlp.gate.weight") else 1.0
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std / np.sqrt(shape[1]))
        tensors[name] = w.astype(dtype)
    return tensors


def write_checkpoint(out_dir: str | Path, config: dict, tensors: dict[str, np.ndarray], shards: int = 2,
                     tokenizer: Tokenizer | None = None) -> Path:
    """Write a complete Hugging Face model folder: config, tokenizer files, weights in ``shards`` shards + index."""
    names = list(tensors)
    groups = [names[k::shards] for k in range(shards)] if shards > 1 else [names]
    return _write_folder(out_dir, config, ({n: tensors[n] for n in g} for g in groups), len(groups), tokenizer)


def write_synthetic_checkpoint(out_dir: str | Path, config: dict | None = None, seed: int = 0, shards: int = 2,
                               dtype=ml_dtypes.bfloat16) -> Path:
    config = dict(TINY_CONFIG if config is None else config)
    return write_checkpoint(out_dir, config, random_weights(config, seed=seed, dtype=dtype), shards=shards)


def write_large_synthetic_checkpoint(out_dir: str | Path, config: dict, seed: int = 0) -> Path:
    """Like write_synthetic_checkpoint, but one shard per layer, generated and written one at a time, so that a
    checkpoint of real size (gigabytes per layer) never has to fit in memory twice."""
    layers = config["num_hidden_layers"]
    outside = lambda n: not n.startswith("model.layers.")
    groups = (random_weights(config, seed=seed + k, select=(lambda n, k=k: n.startswith(f"model.layers.{k - 1}.")
                                                            if k else outside(n)))
              for k in range(layers + 1))
    return _write_folder(out_dir, config, groups, layers + 1)


def _write_folder(out_dir, config: dict, groups, n_groups: int, tokenizer: Tokenizer | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = config.get("eos_token_id")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}, indent=2))
    (tokenizer or byte_level_tokenizer()).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    }, indent=2))
    weight_map = {}
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{n_groups:05d}.safetensors" if n_groups > 1 else "model.safetensors"
        save_file({n: np.ascontiguousarray(a) for n, a in group.items()}, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(group, file)
    if n_groups > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2))
    return out
