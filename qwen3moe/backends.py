"""The backend table: which implementation of the block operations runs the model.

A backend is a module with five functions, which the model loop (``model.py``) calls:

    prepare(weights, config) -> state                       once, at load time (lay weights out for the kernels)
    embed(state, token_ids) -> x                            (T,) -> (T, H) float32
    attention_block(state, i, x, cos, sin, segments) -> x   x + attention(norm(x)); writes the KV caches
    feed_forward_block(state, i, x, top_k, disabled)        x + mlp_or_moe(norm(x)) -> (x, routing | None); top_k and
                                                            the disabled-expert mask (None) come from the config
                                                            unless a RoutingOverride is in force
    final_logits(state, x) -> logits                        (T, H) -> (T, V)

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


BACKENDS = {
    "numpy": Backend("qwen3moe.reference_backend", "cpu", "the NumPy reference: readable float32 code"),
    "numba": Backend("fastpath.numba_backend", "cpu", "Numba kernels: bf16 weights, fused blocks, all cores"),
}
FASTEST_FIRST = ["numba", "numpy"]  # what "auto" tries, in order


def unavailable_reason(name: str) -> str | None:
    """None if the backend can be imported here, else one sentence saying why not."""
    try:
        importlib.import_module(BACKENDS[name].module)
    except ImportError as e:
        return f"its module {BACKENDS[name].module} cannot be imported ({e}); try: pip install -e \".[fast]\""
    return None


def choose(device: str, backend: str | None) -> str:
    """The backend for ``device``: the argument, else $QWEN3MOE_BACKEND, else the fastest available ("auto")."""
    name = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR, "auto")
    if name == "auto":
        return next(n for n in FASTEST_FIRST if BACKENDS[n].device == device and unavailable_reason(n) is None)
    if name not in BACKENDS:
        raise DeviceError(f"unknown backend {name!r}; available: auto, {', '.join(BACKENDS)}")
    if BACKENDS[name].device != device:
        raise DeviceError(f"backend {name!r} runs on {BACKENDS[name].device}, not on {device}")
    reason = unavailable_reason(name)
    if reason:
        raise DeviceError(f"backend {name!r} is not available: {reason}")
    return name


def load(name: str):
    return importlib.import_module(BACKENDS[name].module)
