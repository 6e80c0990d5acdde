"""The kernel ladders (``python -m fastpath.ladder``) on a GPU: every version of every ladder, from the naive first
kernel to the one the backend runs, matches a float64 NumPy product of the same bf16 weights on fresh random inputs.
The ladders compute these errors themselves (and time each version, which is not checked here); this keeps a
learner's versions honest after the production kernels move on.

Run on a GPU machine; without a GPU every test is skipped with the reason.
"""

import math

import pytest

from qwen3moe import backends

REASON = backends.unavailable_reason("cupy")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the cupy backend cannot run here: {REASON}")
TOLERANCE = 1e-4  # relative error (norm of the difference over the norm of the float64 result); observed <= 6e-6


NAMES = ["moe_gemv", "moe_down", "lm_head", "attention", "attention_short", "attention_long", "router",
         "batch_projection", "attention_prefill", "prefill_projection"]


def test_every_ladder_is_checked():
    from fastpath.ladder import LADDERS

    assert sorted(LADDERS) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_version_matches_float64(name):
    from fastpath.ladder import LADDERS

    title, run, _ = LADDERS[name]
    rows = run()
    assert len(rows) >= 2, f"{title}: a ladder has a first version and the production one"
    for row in rows:  # NaN: an output never written; inf: the router chose other experts
        assert math.isfinite(row.error) and row.error < TOLERANCE, f"{title}, {row.version}: error {row.error}"
