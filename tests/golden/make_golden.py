"""Regenerate tests/golden: one tiny transformers model per oracle case, with transformers' own outputs.

    python tests/golden/make_golden.py

Each case folder holds the model as ``save_pretrained`` wrote it (plus tokenizer files) and ``expected.npz`` with
transformers' prefill logits, greedy tokens and decode-step logits. The outputs come from transformers, never from
qwen3moe, so the golden test is as independent as the live one.
"""

import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from hf_oracle import CASES, PROMPT_LEN, build_hf_model, hf_reference, save_hf_model  # noqa: E402


def main() -> None:
    for seed, case in enumerate(sorted(CASES), start=1000):
        folder = HERE / case
        shutil.rmtree(folder, ignore_errors=True)
        model = build_hf_model(case, seed)
        prompt = np.random.default_rng(seed).integers(0, 256, PROMPT_LEN)
        ref = hf_reference(model, prompt)
        save_hf_model(model, folder, case)
        np.savez_compressed(folder / "expected.npz", **ref)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{case}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
