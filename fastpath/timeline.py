"""Where the time of a captured decode step goes, measured inside the step: every block of every kernel timed on the
GPU.

Timing a kernel alone (events around an eager launch, ``cupy_bench.profile``) says little about what it costs inside
the captured step, where each kernel's blocks are scheduled while the kernel ahead still runs. Kernels compiled with
QWEN3MOE_TIMELINE (``cuda/timeline.cuh``) record, for every block, when it started, when its wait for the kernel ahead
ended ("released") and when it ended. Every kernel of a step waits for the one ahead to finish, so the step is a
chain of launches, and each launch adds to it the time from the end of the launch ahead to its own end:

    adds   = end - end of the launch ahead
    gap    = first release - end of the launch ahead   (handing over: the wait's own latency)
    early  = first release - first start                (how long its first blocks were resident before, doing what
                                                         needs nothing of the kernel ahead: loading weights)

``python -m qwen3moe bench --nvidia --timeline 32,2048`` prints these per kernel for a batch-1 step of Qwen3-30B-A3B
shapes, with the weight bytes each reads and the rate that makes.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import cuda_build

# (The GPU parts import CuPy and the backend where they are used, so that the grouping and the summary, plain NumPy,
# can be checked on any machine: tests/test_timeline.py.)

if TYPE_CHECKING:
    import cupy
    from .cupy_backend import State

ROOM = 1 << 18  # records (blocks) one step may write: a batch-1 step of 48 layers runs ~70,000 (8 MB of records)


def enable() -> None:
    """Compile this process's kernels with the timeline's marks (before the first kernel is compiled)."""
    if cuda_build.LOADED:
        raise RuntimeError("the timeline needs its kernels compiled with QWEN3MOE_TIMELINE, and this process has "
                           f"compiled {', '.join(cuda_build.LOADED)} without: call enable() first")
    os.environ["QWEN3MOE_TIMELINE"] = "1"


@dataclass
class Launch:
    label: str  # the kernel, or for linear.cu's projections the weight it multiplies (q/k/v, o_proj, router, ...)
    blocks: int  # blocks that recorded (those that return before their wait do not)
    started: int  # ns, the first block's start
    released: int  # ns, the first block's release from its wait
    ended: int  # ns, the last block's end


def labelled_capture(s: State, make):
    """``make()`` (which builds a decoder, capturing its step) with the label of every captured launch, in order."""
    import cupy as cp
    from . import cupy_backend as cb

    roles = {id(s.lm_head): "lm_head"}
    for layer in s.layers:
        roles.update({id(layer.qkv): "q/k/v", id(layer.o_proj): "o_proj", id(layer.router): "router"})
    labels, role = [], []
    real_kernel, real_linear = cb.kernel, cb.linear

    def kernel(file, name):
        k = real_kernel(file, name)

        def launch(*args, **kwargs):
            if cp.cuda.get_current_stream().is_capturing():
                labels.append(role[-1] if role else name.split("<")[0])
            k(*args, **kwargs)
        return launch

    def linear(s, x, w, *args, **kwargs):
        role.append(roles.get(id(w), "linear"))
        try:
            real_linear(s, x, w, *args, **kwargs)
        finally:
            role.pop()

    cb.kernel, cb.linear = kernel, linear
    try:
        made = make()
    finally:
        cb.kernel, cb.linear = real_kernel, real_linear
    return made, labels


def arm(buffer: cupy.ndarray | None) -> None:
    """Point every compiled module's ``qwen3moe_timeline`` at ``buffer`` (None: record nothing)."""
    import cupy as cp

    for file in cuda_build.LOADED:
        try:
            where = cuda_build.module(file).get_global("qwen3moe_timeline")
        except Exception:
            raise RuntimeError(f"{file} was compiled without the timeline's marks: call timeline.enable() before "
                               "the first kernel is compiled") from None
        cp.ndarray((1,), cp.uint64, memptr=where)[0] = 0 if buffer is None else buffer.data.ptr


def record_step(step, stream) -> np.ndarray:
    """The records (blocks, 4) of one call of ``step()``: (source line | grid x << 16 | grid y << 40, started,
    released, ended)."""
    import cupy as cp

    buffer = cp.zeros(2 + 4 * ROOM, cp.uint64)
    buffer[1] = ROOM
    arm(buffer)
    try:
        step()
        stream.synchronize()
    finally:
        arm(None)
    n = int(buffer[0])
    if n > ROOM:
        raise RuntimeError(f"the step ran {n} blocks, more than the timeline's room for {ROOM}")
    return cp.asnumpy(buffer[2:2 + 4 * n]).reshape(n, 4)


def group(records: np.ndarray, labels: list[str]) -> list[Launch]:
    """The records grouped into the step's launches, in order. A launch's blocks are released only once every block
    of the launch ahead has ended, so in order of release the records of one launch come together: a new launch
    begins where the kernel (source line and grid) changes, or where a block is released after every block so far
    has ended."""
    key, started, released, ended = records[:, 0], *records[:, 1:].T.astype(np.int64)
    groups, last_end = [], None
    for i in np.argsort(released, kind="stable"):
        if not groups or key[i] != key[groups[-1][0]] or released[i] >= last_end:
            groups.append([])
            last_end = ended[i]
        groups[-1].append(i)
        last_end = max(last_end, ended[i])
    if len(groups) != len(labels):
        raise RuntimeError(f"the step recorded {len(groups)} launches where {len(labels)} were captured")
    return [Launch(label, len(g), int(started[g].min()), int(released[g].min()), int(ended[g].max()))
            for label, g in zip(labels, map(np.array, groups))]


def summary(steps: list[list[Launch]], weight_bytes: dict[str, int]) -> dict:
    """Per label, in the order of first appearance: launches a step, and the means over every launch of adds, gap
    and early (us), the weight bytes of one launch and the rate they are read at (bytes / adds); and the step's
    span (first start to last end, us)."""
    rows = defaultdict(list)
    for step in steps:
        for ahead, launch in zip([None, *step], step):
            before = launch.started if ahead is None else ahead.ended
            rows[launch.label].append((launch.ended - before, launch.released - before,
                                       launch.released - launch.started))
    out = {}
    for label, values in rows.items():
        adds, gap, early = np.mean(values, axis=0) / 1e3
        nbytes = weight_bytes.get(label, 0)
        out[label] = {"launches": len(values) // len(steps), "adds_us": adds, "gap_us": gap, "early_us": early,
                      "bytes": nbytes, "GBps": nbytes / adds / 1e3 if nbytes else None}
    span = np.mean([(step[-1].ended - step[0].started) / 1e3 for step in steps])
    return {"kernels": out, "span_us": span}


def batch_one_weight_bytes(s: State) -> dict[str, int]:
    """Weight bytes each labelled launch of a batch-1 step reads: the projections' whole matrices, and where every
    layer is an MoE layer (as in Qwen3-30B-A3B; a dense MLP runs the same expert kernels on other sizes) the experts'
    rows of the top_k picks."""
    c, layer = s.config, s.layers[0]
    nbytes = {"q/k/v": layer.qkv.nbytes, "o_proj": layer.o_proj.nbytes, "lm_head": s.lm_head.nbytes}
    if len(c.moe_layers) == c.num_hidden_layers:
        k = c.num_experts_per_tok
        gate_up = k * layer.gate_up[0].nbytes  # (route_gate_up where the state holds every expert)
        nbytes.update({"router": layer.router.nbytes, "expert_gate_up": gate_up, "route_gate_up": gate_up,
                       "expert_down_sum": k * layer.down[0].nbytes})
    return nbytes


def greedy_step(s: State, cache, pos: int, token: int, steps: int = 3) -> tuple:
    """A ``GreedyDecoder`` over ``cache`` (holding ``pos`` positions), and the timeline of its captured step averaged
    over ``steps`` replays after 12 of warm-up."""
    from . import cupy_backend as cb

    decoder, labels = labelled_capture(s, lambda: cb.GreedyDecoder(s, cache, pos, token))
    for _ in range(12):
        decoder.step()
    recorded = [group(record_step(decoder.step, decoder.stream), labels) for _ in range(steps)]
    return decoder, summary(recorded, batch_one_weight_bytes(s))
