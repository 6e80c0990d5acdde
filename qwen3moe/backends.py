"""The backend table: which implementation of the block operations runs the model.

A backend is a module with five functions, which the model loop (``model.py``) calls:

    prepare(weights, config) -> state                       once, at load time (lay weights out for the kernels)
    embed(state, token_ids) -> x                            (T,) -> (T, H) float32
    attention_block(state, i, x, cos, sin, segments) -> x   x + attention(norm(x)); writes the KV caches
    feed_forward_block(state, i, x, top_k, disabled)        x + mlp_or_moe(norm(x)) -> (x, routing | None); top_k and
                                                            the disabled-expert mask (None) come from the config
                                                            unless a RoutingOverride is in force
    final_logits(state, x) -> logits                        (T, H) -> (T, V), an array of ``xp``

and an attribute ``xp``: the array module (numpy or cupy) its KV caches and activations live in. A backend may also
offer ``GreedyDecoder(state, cache, pos, token)`` with ``step() -> token`` and ``flush_stats(stats)``: batch-1 greedy
decoding without the host in the loop, which ``generate`` uses where nothing needs the per-step host path; and
``SampledDecoder(state, cache, pos, token, (temperature, topk, topp, rng))``, the same for a sampled sequence, which
``generate`` uses where the backend has no ``BatchDecoder`` (below).

A backend that can run one rank of a model split over several devices (``ranks.py``) takes ``prepare(weights,
config, shard)`` with the rank's part of the weights (``sharding.shard_weights``) and its ``RankShard``, and names in
the table how its ranks exchange activations: "host" (through rank 0's sockets, any machine) or "nccl" (GPU to GPU).
A backend may offer ``BatchDecoder(state, caches, positions, tokens, sampling, comm)`` (a batch of sequences, each
greedy or sampled with its (temperature, topk, topp, rng); ``step() -> tokens``): ``generate`` uses it for sampled
decoding, and with ``SHARDS = True`` the ranks of a split model decode in whole steps through it.

Every backend computes with float32 activations. A backend that can also give its tensor cores bf16 activations
lists the precisions it takes in the table, and takes ``prepare(..., precision=...)`` (``prepare_options``).

The reference is ``qwen3moe/reference_backend.py``. Fast backends live in the ``fastpath`` package and are named
here only by module path, imported when chosen: the reference never imports the fast path.
"""

import importlib
import os
from dataclasses import dataclass

from .errors import DeviceError

ENV_VAR = "QWEN3MOE_BACKEND"


@dataclass(frozen=True)
class Backend:
    module: str
    device: str  # the device kind it runs on: "cpu" (or "nvidia")
    summary: str
    comm: str | None = None  # how the ranks of a split model exchange data: a module with ``connect`` (None: no
    #                          splitting)
    precisions: tuple = ("float32",)  # what its matrix products may take as activations (the first: the default)


BACKENDS = {
    "numpy": Backend("qwen3moe.reference_backend", "cpu", "the NumPy reference: readable float32 code",
                     "qwen3moe.host_comm"),
    "numba": Backend("fastpath.numba_backend", "cpu", "Numba kernels: bf16 weights, fused blocks, all cores", None,
                     ("float32", "bf16")),
    "cupy": Backend("fastpath.cupy_backend", "nvidia", "CUDA kernels through CuPy, CUDA-graph decoding, NCCL across "
                    "GPUs", "fastpath.nccl_comm", ("float32", "bf16")),
}
FASTEST_FIRST = ["cupy", "numba", "numpy"]  # what "auto" tries, in order, among the backends of the device


def unavailable_reason(name: str) -> str | None:
    """None if the backend can be imported here, else one sentence saying why not."""
    try:
        importlib.import_module(BACKENDS[name].module)
    except ModuleNotFoundError as e:
        extra = "cuda" if BACKENDS[name].device == "nvidia" else "fast"
        return f"its module {BACKENDS[name].module} cannot be imported ({e}); try: pip install -e \".[{extra}]\""
    except ImportError as e:  # installed, but cannot run here (e.g. no GPU)
        return str(e)
    return None


def choose(device: str | None, backend: str | None, split: bool = False) -> str:
    """The backend for ``device``: the argument, else $QWEN3MOE_BACKEND, else the fastest available ("auto").

    ``device`` None means the named backend's device, or the CPU when the backend is "auto". The environment
    variable is a preference: it is passed over for a device its backend does not run on. ``split``: the model is
    split over several devices, which only backends with a communicator can do.
    """
    name = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR, "auto")
    if backend in (None, "auto") and name in BACKENDS and (device not in (None, BACKENDS[name].device)
                                                          or split and not BACKENDS[name].comm):
        name = "auto"
    if device is None:
        device = BACKENDS[name].device if name in BACKENDS else "cpu"
    if name == "auto":
        candidates = [n for n in FASTEST_FIRST if BACKENDS[n].device == device and (BACKENDS[n].comm or not split)]
        reasons = {n: unavailable_reason(n) for n in candidates}
        if not any(r is None for r in reasons.values()):
            raise DeviceError(f"no backend for the {device} device can run here (" +
                              "; ".join(f"{n}: {r}" for n, r in reasons.items()) + "); run on another device, e.g. "
                              "the CPU (--cpu)")
        return next(n for n in candidates if reasons[n] is None)
    if name not in BACKENDS:
        raise DeviceError(f"unknown backend {name!r}; available: auto, {', '.join(BACKENDS)}")
    if BACKENDS[name].device != device:
        raise DeviceError(f"backend {name!r} runs on {BACKENDS[name].device}, not on {device}")
    if split and not BACKENDS[name].comm:
        able = ", ".join(n for n, b in BACKENDS.items() if b.comm)
        raise DeviceError(f"backend {name!r} cannot split a model over several devices; use one that can ({able}) "
                          "or ndev=1")
    reason = unavailable_reason(name)
    if reason:
        raise DeviceError(f"backend {name!r} is not available: {reason}")
    return name


def prepare_options(name: str, precision: str) -> dict:
    """The keyword arguments of backend ``name``'s ``prepare`` for ``precision``: none for float32, which every
    backend computes in; a precision the backend does not list is refused, saying which backend has it."""
    if precision == "float32":
        return {}
    if precision not in BACKENDS[name].precisions:
        able = [n for n, b in BACKENDS.items() if precision in b.precisions]
        offer = ("no backend offers it" if not able else f"only the {able[0]} backend offers it" if len(able) == 1
                 else f"only the {', '.join(able[:-1])} and {able[-1]} backends offer it")
        raise ValueError(f"precision {precision!r} is not available on the {name} backend ({offer}); use "
                         "precision='float32'")
    return {"precision": precision}


def load(name: str):
    return importlib.import_module(BACKENDS[name].module)
