"""Where the default model lives.

The repository ships a small Qwen3-MoE trained on Shakespeare in ``data/qwen3-moe-shakespeare`` (see its model card
and ``data/recipes/``). When the package runs from a copy without that folder, a synthetic model with random weights
is written once to ``~/.cache/qwen3moe/`` instead, so every command still works (its text is gibberish).
"""

import os
from pathlib import Path

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "data" / "qwen3-moe-shakespeare"


def default_model_dir() -> Path:
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    from .synthetic import write_synthetic_checkpoint

    cache = Path(os.environ.get("QWEN3MOE_CACHE", Path.home() / ".cache" / "qwen3moe")) / "synthetic-tiny"
    if not (cache / "config.json").is_file():
        write_synthetic_checkpoint(cache)
    return cache
