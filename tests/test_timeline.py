"""The timeline's bookkeeping (fastpath/timeline.py), on records made up here: grouping a step's block records into
its launches, and what each launch adds to the step. Recording them takes a GPU (test_cupy_backend.py); this part is
plain NumPy and runs anywhere."""

import numpy as np
import pytest

from fastpath.timeline import Launch, group, summary


def key(line: int, grid_x: int, grid_y: int = 1) -> int:
    """A record's first word, as cuda/timeline.cuh writes it."""
    return line | grid_x << 16 | grid_y << 40


# (key, started, released, ended) of every block of one step, as the launches ran (ns)
BLOCKS = [
    (key(10, 3), 0, 100, 250), (key(10, 3), 5, 100, 300), (key(10, 3), 2, 100, 280),  # "a": 3 blocks
    (key(20, 2), 290, 310, 400), (key(20, 2), 295, 312, 420),  # "b": 2 blocks
    (key(20, 2), 300, 430, 500),  # "b" again, same kernel and grid: released once the first "b" had ended
    # "c" runs 3 blocks in two waves: the third starts once a first-wave block has ended, before the other has
    (key(40, 3, 2), 480, 510, 550), (key(40, 3, 2), 490, 510, 600), (key(40, 3, 2), 555, 560, 580),
]
LABELS = ["a", "b", "b", "c"]


def shuffled(blocks, seed):
    """The records in the order the blocks happened to finish (the atomic counter's order), as an array."""
    records = np.array(blocks, dtype=np.uint64)
    return records[np.random.default_rng(seed).permutation(len(records))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_records_are_grouped_into_the_launches_in_order(seed):
    assert group(shuffled(BLOCKS, seed), LABELS) == [
        Launch("a", 3, 0, 100, 300), Launch("b", 2, 290, 310, 420), Launch("b", 1, 300, 430, 500),
        Launch("c", 3, 480, 510, 600)]


def test_a_step_whose_launches_do_not_match_the_capture_is_refused():
    with pytest.raises(RuntimeError, match="recorded 4 launches where 3 were captured"):
        group(shuffled(BLOCKS, 0), LABELS[:3])


def test_each_launch_adds_the_time_from_the_end_of_the_launch_ahead():
    """adds = end - end of the launch ahead (the first launch: from its own start), gap = first release - end of the
    launch ahead, early = first release - first start; means over the launches of a label and over the steps; the
    rate is the label's weight bytes over what it adds."""
    step = group(shuffled(BLOCKS, 0), LABELS)
    later = [Launch(launch.label, launch.blocks, *(t + 10_000 for t in (launch.started, launch.released,
                                                                         launch.ended))) for launch in step]
    out = summary([step, later], {"b": 2_000})
    assert list(out["kernels"]) == ["a", "b", "c"]
    a, b, c = (out["kernels"][label] for label in "abc")
    assert (a["launches"], b["launches"], c["launches"]) == (1, 2, 1)
    assert a["adds_us"] == pytest.approx(0.300) and a["gap_us"] == pytest.approx(0.100)
    assert b["adds_us"] == pytest.approx((0.120 + 0.080) / 2) and b["gap_us"] == pytest.approx(0.010)
    assert b["early_us"] == pytest.approx((0.020 + 0.130) / 2)
    assert c["adds_us"] == pytest.approx(0.100) and c["gap_us"] == pytest.approx(0.010)
    assert b["GBps"] == pytest.approx(2_000 / 100e-9 / 1e9) and a["GBps"] is None
    assert out["span_us"] == pytest.approx(0.600)
