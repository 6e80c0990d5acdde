"""The communicator of CPU ranks: all-reduce and all-gather through rank 0's sockets.

Every rank sends its part to rank 0, which adds (or joins) them in rank order and sends the result back, so every
rank ends with the same bits. It is slow (everything crosses rank 0) and simple; it lets a split model run, and be
tested, on any machine. GPUs use NCCL instead (``fastpath/nccl_comm.py``), behind the same three methods.
"""

import socket

import numpy as np

from . import messages


def new_id() -> str:
    return ""  # the sockets are the group: nothing else to agree on


def bind_device(local_rank: int) -> None:
    """CPU ranks share the machine's cores; there is no device to choose."""


class HostComm:
    def __init__(self, rank: int, links: dict[int, socket.socket], fail):
        """``links``: rank 0 holds one socket per other rank, the others one to rank 0; ``fail(rank, cause)`` raises
        when a rank sends an error instead of its part (cause None: its connection broke)."""
        self.rank, self.links, self.fail = rank, links, fail

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        """The sum over ranks of ``x``, in place (added in rank order)."""
        return self._exchange(x, lambda parts: sum(parts[1:], parts[0]), x)

    def all_gather(self, x: np.ndarray, width: int) -> np.ndarray:
        """The ranks' (..., n_r) parts joined along the last axis, in rank order, into (..., width)."""
        whole = self._exchange(x, lambda parts: np.concatenate(parts, axis=-1))
        assert whole.shape[-1] == width
        return whole

    def wait(self, stream=None) -> None:
        """Every exchange above has finished when it returns."""

    def abort(self) -> None:
        """Nothing is left in flight: a failed exchange has raised already."""

    def _exchange(self, x: np.ndarray, combine, out: np.ndarray | None = None) -> np.ndarray:
        if self.rank == 0:
            parts = [x] + [self._receive(r) for r in sorted(self.links)]
            result = combine(parts)
            for r, link in self.links.items():
                try:
                    messages.send(link, {"op": "part"}, [result])
                except OSError:
                    self.fail(r, None)
        else:
            messages.send(self.links[0], {"op": "part"}, [x])
            result = self._receive(0)
        if out is None:
            return result
        out[...] = result
        return out

    def _receive(self, rank: int) -> np.ndarray:
        try:
            header, arrays = messages.recv(self.links[rank])
        except OSError:  # ConnectionError included
            self.fail(rank, None)
        if header["op"] != "part":
            self.fail(rank, header.get("error", f"it sent {header['op']!r} in the middle of a step"))
        return arrays[0]


def connect(rank: int, ndev: int, unique_id: str, links: dict[int, socket.socket], fail, alive) -> HostComm:
    return HostComm(rank, links, fail)
