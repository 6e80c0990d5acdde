"""The communicator of GPU ranks: NCCL all-reduce and all-gather, launched on the current CUDA stream.

On one machine the small all-reduces of decoding go through peer memory instead (``peer_all_reduce.py``): one
kernel, about half of NCCL's latency for those sizes.

The calls are asynchronous like kernels, so they can sit inside a captured CUDA graph (``GreedyDecoder``). The host
waits for them only in ``wait``, which keeps checking that the other ranks are alive: a GPU waiting for a rank that
has died would wait forever, so the group aborts the communicator instead (``abort``).
"""

import math
import time

import numpy as np

import cupy as cp
from cupy.cuda import nccl

from qwen3moe.errors import DeviceError

from . import peer_all_reduce

TYPES = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.int32): nccl.NCCL_INT32}


def new_id() -> str:
    """Rank 0 makes the id that names the group; the other ranks receive it in the plan."""
    return bytes(nccl.get_unique_id()).hex()


def bind_device(local_rank: int) -> None:
    """Use GPU ``local_rank`` (LOCAL_RANK: the rank's number among the ranks of its machine)."""
    visible = cp.cuda.runtime.getDeviceCount()
    if local_rank >= visible:
        raise DeviceError(f"this rank needs GPU {local_rank} (LOCAL_RANK) but the machine shows {visible}; start at "
                          "most one rank per GPU on each machine")
    cp.cuda.Device(local_rank).use()


class NcclComm:
    def __init__(self, rank: int, ndev: int, unique_id: str, alive):
        self.rank, self.ndev, self.alive = rank, ndev, alive
        self.nccl = nccl.NcclCommunicator(ndev, bytes.fromhex(unique_id), rank)
        self.peer = peer_all_reduce.connect(rank, ndev, self._gather_ints, self._sum_int)

    def all_reduce(self, x: cp.ndarray) -> cp.ndarray:
        """The sum over ranks of ``x``, in place (the same bits on every rank)."""
        if self.peer is not None and self.peer.fits(x):
            return self.peer(x)
        self.nccl.allReduce(x.data.ptr, x.data.ptr, x.size, TYPES[x.dtype], nccl.NCCL_SUM, _stream())
        return x

    def broadcast(self, x: cp.ndarray, root: int = 0) -> cp.ndarray:
        """Rank ``root``'s ``x`` on every rank, in place."""
        self.nccl.broadcast(x.data.ptr, x.data.ptr, x.size, TYPES[x.dtype], root, _stream())
        return x

    def all_gather_into(self, part: cp.ndarray, whole: cp.ndarray) -> None:
        """whole (ndev, *part.shape) = every rank's ``part``, in rank order."""
        self.nccl.allGather(part.data.ptr, whole.data.ptr, part.size, TYPES[part.dtype], _stream())

    def all_gather(self, x: cp.ndarray, width: int) -> cp.ndarray:
        """The ranks' (T, n_r) parts joined along the last axis into (T, width); every part but the last is
        ceil(width / ndev) wide (the vocabulary blocks of sharding.py), so each is padded to that and cut after."""
        T, per = x.shape[0], math.ceil(width / self.ndev)
        padded = cp.zeros((T, per), x.dtype)
        padded[:, :x.shape[1]] = x
        whole = cp.empty((self.ndev, T, per), x.dtype)
        self.all_gather_into(padded, whole)
        return whole.transpose(1, 0, 2).reshape(T, self.ndev * per)[:, :width]

    def wait(self, stream: cp.cuda.Stream | None = None) -> None:
        """Return when ``stream`` (default: the current one) has done its work; raise if a rank fails meanwhile."""
        done = cp.cuda.Event(block=False, disable_timing=True)
        done.record(stream)
        while not done.done:
            self.alive()

    def time_all_reduces(self, rows: int, width: int, count: int, reps: int) -> float:
        """Seconds per replay of a graph of ``count`` all-reduces of (rows, width) float32: the communication of a
        step without its compute (every rank must call it at the same time)."""
        x, stream = cp.zeros((rows, width), cp.float32), cp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            for _ in range(count):
                self.all_reduce(x)
            graph = stream.end_capture()
            graph.launch(stream)
            self.wait(stream)
            start = time.perf_counter()
            for _ in range(reps):
                graph.launch(stream)
            self.wait(stream)
        return (time.perf_counter() - start) / reps

    def abort(self) -> None:
        if self.peer is not None:
            self.peer.abort()
        self.nccl.abort()
        if self.peer is not None:
            self.peer.close()
            self.peer = None

    def _gather_ints(self, ints: np.ndarray) -> np.ndarray:
        whole = cp.empty((self.ndev, ints.size), cp.int32)
        self.all_gather_into(cp.asarray(ints), whole)
        return cp.asnumpy(whole)

    def _sum_int(self, n: int) -> int:
        x = cp.full(1, n, cp.int32)
        self.nccl.allReduce(x.data.ptr, x.data.ptr, 1, nccl.NCCL_INT32, nccl.NCCL_SUM, _stream())
        return int(x.get()[0])


def _stream() -> int:
    return cp.cuda.get_current_stream().ptr


def connect(rank: int, ndev: int, unique_id: str, links, fail, alive) -> NcclComm:
    return NcclComm(rank, ndev, unique_id, alive)
