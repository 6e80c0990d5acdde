"""Messages between ranks: a JSON header and raw arrays, over a stream socket.

A message is an 8-byte length, the UTF-8 JSON header (a dict), then the bytes of each array the header lists by
dtype and shape. Only plain numeric dtypes are accepted, so nothing a peer sends can make this process execute code
(no pickle anywhere).
"""

import json
import socket
import struct

import numpy as np

LENGTH = struct.Struct("<Q")
NUMBERS = "biuf"  # dtype kinds accepted: bool, signed and unsigned integers, floats


def send(sock: socket.socket, header: dict, arrays=()) -> None:
    arrays = [np.asarray(a) for a in arrays]
    for a in arrays:  # refused before anything is sent, so a refusal never leaves half a message on the stream
        if a.dtype.kind not in NUMBERS:
            raise ValueError(f"only arrays of numbers can be sent to a rank, not {a.dtype}")
    meta = json.dumps(dict(header, arrays=[[a.dtype.str, list(a.shape)] for a in arrays])).encode()
    sock.sendall(LENGTH.pack(len(meta)) + meta)
    for a in arrays:
        if a.nbytes:
            sock.sendall(memoryview(a.reshape(-1) if a.flags.c_contiguous else a.flatten()).cast("B"))


def recv(sock: socket.socket) -> tuple[dict, list[np.ndarray]]:
    """The next message; ConnectionError when the peer has gone."""
    (n,) = LENGTH.unpack(_exactly(sock, LENGTH.size))
    header = json.loads(_exactly(sock, n))
    arrays = []
    for dtype, shape in header.pop("arrays"):
        dtype = np.dtype(dtype)
        if dtype.kind not in NUMBERS:
            raise ValueError(f"a rank sent an array of dtype {dtype}; only numbers are accepted")
        arrays.append(np.frombuffer(_exactly(sock, dtype.itemsize * int(np.prod(shape))), dtype).reshape(shape))
    return header, arrays


def _exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the connection was closed")
        got += k
    return buf


def closed(sock: socket.socket) -> bool:
    """Whether the peer has closed the connection (without consuming anything it sent)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
