"""Compile the CUDA C++ kernels of ``fastpath/cuda/`` for the GPU at hand (NVRTC, through CuPy's RawModule).

Kernels are templates over the weight type: ``bf16_t`` (bf16 checkpoints, kept as raw 16-bit words) and ``float``.
``KERNELS`` names every instantiation a backend may launch; the same table lets the test suite compile every file
with ``nvcc`` for sm_90 on a machine without a GPU (tests/test_cuda_sources.py), so a broken kernel never lands.
"""

import functools
from pathlib import Path

from qwen3moe.errors import DeviceError

SOURCE_DIR = Path(__file__).with_name("cuda")
WEIGHT_TYPES = ("bf16_t", "float")
MAXT = (1, 8)  # tokens per pass of the GEMV kernels: 1 for batch-1 decode, 8 otherwise

KERNELS = {
    "linear.cu": ["embed<{W}>", "rms_norm", *(f"linear<{{W}}, {m}>" for m in MAXT)],
    "moe.cu": ["route_topk", "group_by_expert", "moe_combine",
               *(f"expert_{p}<{{W}}, {m}>" for p in ("gate_up", "down") for m in MAXT)],
    "attention.cu": ["qk_norm_rope_cache", "attention", "attention_combine"],
    "sampling.cu": ["argmax_partial", "greedy_advance"],
    "matmul.cu": ["mma_tiles<LINEAR>", "mma_tiles<GATE_UP>", "mma_tiles<DOWN>"],
}
OPTIONS = ("-std=c++17", f"-I{SOURCE_DIR}")

# The kernel ladders (fastpath/ladder.py): the steps towards the production kernels, for learners.
LADDER_DIR = SOURCE_DIR / "ladder"
LADDER_KERNELS = {
    "moe_gemv.cu": ["moe_gemv_v1", "moe_gemv_v2", "moe_gemv_v3"],
    "attention_decode.cu": ["attention_v1"],
    "router.cu": ["router_v1", "router_v2"],
}


def name_expressions(file: str) -> list[str]:
    """Every instantiation of ``file``'s kernels, one per weight type where the name has ``{W}``."""
    names = [n.format(W=w) for n in KERNELS[file] for w in WEIGHT_TYPES]
    return list(dict.fromkeys(names))


@functools.cache
def module(file: str):
    """The compiled module of one .cu file (compiled once per process; CuPy also caches the binary on disk)."""
    import cupy

    return cupy.RawModule(code=(SOURCE_DIR / file).read_text(), options=OPTIONS,
                          name_expressions=name_expressions(file))


@functools.cache
def kernel(file: str, name: str):
    """One kernel, by its name expression in ``KERNELS`` (e.g. ``"linear<bf16_t, 8>"``). The module is compiled
    on first use; a compile error names the file and carries NVRTC's log."""
    import cupy

    try:
        return module(file).get_function(name)
    except cupy.cuda.compiler.CompileException as e:
        raise DeviceError(f"compiling fastpath/cuda/{file} failed:\n{e}") from None
