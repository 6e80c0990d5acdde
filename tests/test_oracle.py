"""Our NumPy engine against transformers' Qwen3MoeForCausalLM, the ground truth.

For every case of ``hf_oracle.CASES``: a 32-token prefill and 16 cached decode steps must give transformers' logits
within a relative tolerance of 1e-4 (elementwise ``|ours - ref| <= 1e-4 * |ref| + 1e-4 * max|ref|``), and greedy
generation through the public batch API must give transformers' tokens exactly; ``perplexity`` must equal
transformers' exp(loss) within 1e-5 relative.

Two sources of the reference: live (builds a fresh random model each run; needs torch and transformers) and golden
(models and transformers outputs stored under tests/golden by ``golden/make_golden.py``; needs neither).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from hf_oracle import (CASES, DECODE_STEPS, PERPLEXITY_TEXT, PROMPT_LEN, build_hf_model, hf_reference,
                       save_hf_model)
from qwen3moe import Qwen3MoeForCausalLM, Qwen3MoeInferTask, Qwen3MoeKVCache
from qwen3moe.model import KVCache, Request

GOLDEN = Path(__file__).parent / "golden"
RTOL = 1e-4


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, what: str) -> float:
    scale = float(np.abs(ref).max())
    err = np.abs(ours - ref)
    worst = float((err / (np.abs(ref) + scale)).max())
    assert np.all(err <= RTOL * np.abs(ref) + RTOL * scale), f"{what}: worst relative error {worst:.2e} > {RTOL}"
    return worst


def greedy_steps_without_near_ties(step_logits: np.ndarray, gap: float = 1e-4) -> int:
    """How many greedy steps are decided by a margin larger than rounding noise: at a near tie between the two best
    tokens (closer than ``gap`` relative), float32 summation order alone may pick either, and after it the two
    continuations legitimately differ. Random weights make such ties rare but possible."""
    top2 = np.sort(step_logits, axis=-1)[:, -2:]
    ties = np.flatnonzero(top2[:, 1] - top2[:, 0] < gap * np.abs(step_logits).max())
    return int(ties[0]) + 1 if len(ties) else len(step_logits)


def engine_logits(model: Qwen3MoeForCausalLM, prompt, continuation) -> tuple[np.ndarray, np.ndarray]:
    """Prefill logits (PROMPT_LEN, V) and the logits that predict each continuation token (DECODE_STEPS, V)."""
    cache = KVCache(model.config, PROMPT_LEN + DECODE_STEPS, xp=model.xp)
    run = lambda tokens, pos, all_logits: model.forward([Request(tokens, pos, cache)], all_logits)[0]
    prefill = run(list(prompt), 0, True)
    steps = [prefill[-1]] + [run([int(t)], PROMPT_LEN + k, False) for k, t in enumerate(continuation[:-1])]
    return prefill, np.stack(steps)


def engine_greedy(model: Qwen3MoeForCausalLM, prompt) -> list[int]:
    task = Qwen3MoeInferTask(prompt, temperature=0.0, end_tokens=[], max_new_tokens=DECODE_STEPS)
    task.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=PROMPT_LEN + DECODE_STEPS))
    while not task.finished:
        model.batch_infer_one_round([task])
    return task.generated


def check_against(model_dir: Path, ref: dict, backend: str = "numpy") -> float:
    model = Qwen3MoeForCausalLM(model_dir, backend=backend)
    prefill, steps = engine_logits(model, ref["prompt"], ref["greedy_tokens"])
    worst = max(assert_logits_close(prefill, ref["prefill_logits"], "prefill logits"),
                assert_logits_close(steps, ref["step_logits"], "decode-step logits"))
    steps = greedy_steps_without_near_ties(ref["step_logits"])
    assert engine_greedy(model, ref["prompt"])[:steps] == ref["greedy_tokens"].tolist()[:steps]
    assert model.perplexity([PERPLEXITY_TEXT]) == pytest.approx(float(ref["perplexity"]), rel=1e-5)
    return worst


@pytest.mark.parametrize("case", sorted(CASES))
def test_live_oracle(case, backend_name, tmp_path):
    pytest.importorskip("torch", reason="the live oracle needs torch (pip install -e .[dev])")
    pytest.importorskip("transformers", reason="the live oracle needs transformers (pip install -e .[dev])")
    seed = int.from_bytes(os.urandom(4), "little")  # a fresh model every run; the seed is in the failure message
    model = build_hf_model(case, seed)
    prompt = np.random.default_rng(seed).integers(0, 256, PROMPT_LEN)
    ref = hf_reference(model, prompt)
    folder = save_hf_model(model, tmp_path / case, case)
    try:
        worst = check_against(folder, ref, backend_name)
    except AssertionError as e:
        raise AssertionError(f"case {case}, seed {seed}: {e}") from None
    print(f"{case} on {backend_name}: worst relative logit error {worst:.2e}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_oracle(case, backend_name):
    folder = GOLDEN / case
    ref = dict(np.load(folder / "expected.npz"))
    check_against(folder, ref, backend_name)


def test_released_config_spelling_gives_the_same_logits(tmp_path):
    """A config.json written as the Qwen3 releases spell it (num_experts, top-level rope_theta) loads the same."""
    src = GOLDEN / "sparse_step_gqa2_bf16_sharded"
    dst = tmp_path / "released"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    raw = json.loads((src / "config.json").read_text())
    raw["num_experts"] = raw.pop("num_local_experts")
    raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]
    raw["rope_scaling"] = None
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(raw))
    ref = dict(np.load(src / "expected.npz"))
    check_against(dst, ref)
