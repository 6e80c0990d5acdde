"""Stage 3 of the recipe: a byte-level BPE tokenizer in the Qwen2/Qwen3 format, trained on the training split only.

Why it looks the way it does:

* **Same pipeline as Qwen.** NFC normaliser, the Qwen2 pre-tokeniser (a ``Split`` on Qwen's regex with behaviour
  ``Isolated``, then ``ByteLevel`` without prefix space and without its own regex), ``ByteLevel`` decoder and
  post-processor, a BPE model with no unknown token. An engine that reads this ``tokenizer.json`` correctly reads
  Qwen3's too: only the vocabulary and the merges differ.
* **Trained on the training works only,** so held-out text is tokenised without having shaped the vocabulary.
* **Regular tokens first, specials after** (ids ``N_REGULAR`` ...), the order Qwen uses (151643 ... 151668), and an
  embedding table padded past ``len(tokenizer)`` to a multiple of 64, as Qwen pads 151669 tokens to 151936 rows.
* **Specials.** ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` are special tokens; ``<think>`` and
  ``</think>`` are added (never split) but, as in Qwen3's own ``tokenizer.json``, not marked special, so decoding
  with ``skip_special_tokens`` keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

#: Qwen2/Qwen3 pre-tokenisation regex, verbatim from their tokenizer.json.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+")
#: Regular (BPE) tokens: 256 bytes + merges.
N_REGULAR = 4000
#: (content, special) in id order after the regular tokens.
SPECIALS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False),
            ("</think>", False)]
#: Rows of the embedding / lm_head: len(tokenizer) rounded up to a multiple of 64 (unused rows never occur).
VOCAB_SIZE = 4096
CHAT_TEMPLATE_FILE = Path(__file__).with_name("qwen3_chat_template.jinja")


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Train the BPE on ``texts`` (the training works) and append the special tokens after the regular ones."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=N_REGULAR, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() != N_REGULAR:
        raise RuntimeError(f"BPE learned {tok.get_vocab_size()} tokens, expected {N_REGULAR}")
    for content, special in SPECIALS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    for i, (content, _) in enumerate(SPECIALS):
        assert tok.token_to_id(content) == N_REGULAR + i, content
    return tok


def special_id(name: str) -> int:
    """Id of a special token by content, e.g. ``special_id("<|im_end|>")``."""
    return N_REGULAR + [c for c, _ in SPECIALS].index(name)


def tokenizer_config(model_max_length: int) -> dict:
    """``tokenizer_config.json`` written the way Qwen3 writes it (chat template inside, eos ``<|im_end|>``)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(special_id(c)): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": s}
            for c, s in SPECIALS
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE_FILE.read_text(),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def save_tokenizer(tok: Tokenizer, folder: Path, model_max_length: int) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_max_length), indent=2,
                                                             ensure_ascii=False) + "\n")
