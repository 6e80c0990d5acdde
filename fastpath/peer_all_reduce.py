"""The all-reduce of a decode step on one machine: GPUs reading each other's memory over NVLink (peer_all_reduce.cu).

A decode step all-reduces its hidden state twice per layer: 8 KB at batch 1, 512 KB at batch 64 for Qwen3-30B-A3B.
Messages that small are bound by latency, and NCCL's kernels take ~6.5 us for 8 KB between two H200s. Here each rank
exposes one buffer to the others (CUDA IPC), and a single kernel writes the rank's part into every rank's buffer,
signals, waits for the others' signals and sums what its own buffer received. It works where
every rank is on the same machine and every pair of GPUs can map each other's memory; anywhere else (several
machines, or ``QWEN3MOE_ALL_REDUCE=nccl``) the communicator keeps using NCCL, and it always does for messages over
``MAX_BYTES`` (the prefill's), where NCCL's bandwidth-optimal rings win.

Each block of the kernel holds whole rows of the hidden state, so it also takes the row-wise work on either side of
the sum: an MoE block's weighted sum of its picks before, the next block's RMSNorm after. A decode step's graph then
has two kernels fewer per all-reduce (``cupy_backend.reduce_over_ranks``).
"""

import ctypes
import hashlib
import os
import socket

import numpy as np

import cupy as cp

from . import cuda_build

NULL = np.uint64(0)
MAX_BYTES = 1 << 20  # the largest message, in bytes: batch 128 of a 2048-wide float32 hidden state
SLOTS_OFFSET, MAX_RANKS, MAX_BLOCKS, THREADS = 4096, 8, 64, 512  # as in cuda/peer_all_reduce.cu


def machine_key() -> list[int]:
    """Two int32s naming this machine. NCCL_HOSTID is part of it: ranks told they are on different machines (the
    simulated two-machine run) must not share memory either."""
    name = f"{socket.gethostname()}/{os.environ.get('NCCL_HOSTID', '')}".encode()
    return np.frombuffer(hashlib.sha256(name).digest()[:8], np.int32).tolist()


class PeerAllReduce:
    """One rank's side: its buffer, every rank's buffer mapped here, and the kernel. Made by ``connect``."""

    def __init__(self, rank: int, ndev: int, base: int, peers: list[int], opened: list[int]):
        self.rank, self.ndev, self.base, self.opened = rank, ndev, base, opened
        self.bases = cp.asarray(np.array(peers, np.uint64))  # (ndev,) every rank's buffer, rank order
        self.aborted = cp.cuda.runtime.hostAlloc(4, cp.cuda.runtime.hostAllocMapped)  # read by the spinning kernel
        ctypes.c_int32.from_address(self.aborted).value = 0
        # launched the ordinary way (cupy's RawKernel): programmatic launch measured no faster (2.85 -> 2.97 ms a
        # token on 4 H200s) and would make the slots' reuse depend on every kernel between two all-reduces waiting
        self.kernel = cuda_build.module("peer_all_reduce.cu").get_function("peer_all_reduce")

    def fits(self, x: cp.ndarray) -> bool:
        """Whether ``x`` can go through the kernel: (rows, width) float32, contiguous, rows of whole float4s."""
        return (x.dtype == cp.float32 and x.ndim == 2 and x.shape[1] % 4 == 0 and x.nbytes <= MAX_BYTES
                and x.flags.c_contiguous)

    def __call__(self, x: cp.ndarray, picks: tuple | None = None, norm: tuple | None = None) -> cp.ndarray:
        """x (T, H) (``fits``) = the sum over ranks of each rank's part, in place, on the current stream.

        A rank's part is ``x``, or with ``picks`` = (out (T*K, H), topk_ids (T, K) or NULL, expert_lo, expert_hi,
        residual) the weighted sum of an MoE block's picks of the rank's experts [expert_lo, expert_hi), after x
        where ``residual`` (what ``moe_combine`` would have written into x). ``norm`` = (weight (H,), eps, xn (T, H)):
        xn = RMSNorm(the sum) too."""
        T, H = x.shape
        out, topk_ids, lo, hi, residual = picks or (NULL, NULL, 0, 0, 1)
        weight, eps, xn = norm or (NULL, 0.0, NULL)
        K = out.shape[0] // T if picks else 0
        self.kernel((min(MAX_BLOCKS, T),), (THREADS,),
                    (x, np.int32(T), np.int32(H // 4), out, topk_ids, np.int32(K),
                     np.int32(lo), np.int32(hi), np.int32(residual), weight, np.float32(eps), xn, self.bases,
                     np.int32(self.rank), np.int32(self.ndev), np.int64(MAX_BYTES), np.uint64(self.aborted)))
        return x

    def abort(self) -> None:
        """Let a kernel waiting for a rank that has gone return (with a meaningless sum)."""
        ctypes.c_int32.from_address(self.aborted).value = 1

    def close(self) -> None:
        """Unmap the other ranks' buffers and free this one's (after ``abort``: no kernel is waiting any more)."""
        rt = cp.cuda.runtime
        for p in self.opened:
            rt.ipcCloseMemHandle(p)
        rt.free(self.base)
        rt.freeHost(self.aborted)
        self.opened = []


def connect(rank: int, ndev: int, all_gather, all_sum) -> PeerAllReduce | None:
    """Set up the peer all-reduce, or return None where it cannot work (on every rank alike). A collective call:
    ``all_gather(int32 array (k,)) -> (ndev, k)`` and ``all_sum(int) -> int`` are the group's NCCL collectives."""
    wanted = os.environ.get("QWEN3MOE_ALL_REDUCE", "peer") != "nccl" and 1 < ndev <= MAX_RANKS
    rt = cp.cuda.runtime
    slots = 2 * ndev * MAX_BYTES if wanted else 0  # two sets of a slot per rank
    base = rt.malloc(SLOTS_OFFSET + slots)  # its own allocation: an IPC handle maps a whole allocation
    rt.memset(base, 0, SLOTS_OFFSET)
    rt.deviceSynchronize()  # the flags are zero before any rank can see the buffer
    handle = np.frombuffer(rt.ipcGetMemHandle(base), np.int32)
    mine = np.array([*machine_key(), int(wanted), *handle], np.int32)
    everyone = all_gather(mine)  # (ndev, 3 + 16): a cudaIpcMemHandle_t is 64 bytes
    opened, ok = [], bool(wanted and (everyone[:, :3] == mine[:3]).all() and everyone[:, 2].all())
    peers = [base] * ndev
    for r in range(ndev):
        if ok and r != rank:
            try:
                peers[r] = rt.ipcOpenMemHandle(everyone[r, 3:].tobytes())
                opened.append(peers[r])
            except rt.CUDARuntimeError:  # these two GPUs cannot map each other's memory
                ok = False
    if all_sum(int(ok)) == ndev:
        return PeerAllReduce(rank, ndev, base, peers, opened)
    for p in opened:
        rt.ipcCloseMemHandle(p)
    rt.free(base)
    return None
