"""Compile the CUDA C++ kernels of ``fastpath/cuda/`` for the GPU at hand (NVRTC, through CuPy's RawModule).

Kernels are templates over the weight type: ``bf16_t`` (bf16 checkpoints, kept as raw 16-bit words) and ``float``.
``KERNELS`` names every instantiation a backend may launch; the same table lets the test suite compile every file
with ``nvcc`` for sm_90 on a machine without a GPU (tests/test_cuda_sources.py), so a broken kernel never lands.

Kernels captured into a CUDA graph are launched with programmatic dependent launch allowed (``Kernel``), through
the driver's ``cuLaunchKernelEx``: CuPy's own launch has no way to pass launch attributes. ``QWEN3MOE_PDL=0``
launches them the ordinary way (each kernel starts after the one ahead has finished), to compare or to rule the
overlap out.
"""

import ctypes
import functools
import os
import sys
import time
from pathlib import Path

from qwen3moe.errors import DeviceError

SOURCE_DIR = Path(__file__).with_name("cuda")
WEIGHT_TYPES = ("bf16_t", "float")
MAXT = (1, 8)  # tokens per pass of the GEMV kernels: 1 for batch-1 decode, 8 otherwise
WG_TILE = 2  # warpgroups (64 rows each) of a wgmma_tiles.cu block

KERNELS = {
    "linear.cu": ["embed<{W}>", "rms_norm<float>", "rms_norm<bf16_t>", *(f"linear<{{W}}, {m}>" for m in MAXT),
                  "linear_streamed<{W}>"],
    "moe.cu": [*(f"route_topk<{c}>" for c in (4, 8, 16)), *(f"route_gate_up<{{W}}, {c}>" for c in (4, 8, 16)),
               "group_by_expert", "moe_combine",
               *(f"expert_{p}<{{W}}, {m}>" for p in ("gate_up", "down") for m in MAXT), "expert_down_sum<{W}, 8>"],
    "mma_few.cu": ["mma_few<LINEAR>", "mma_few<GATE_UP>", "mma_few<DOWN>"],
    "mma_batch.cu": ["mma_batch"],
    "attention.cu": ["qk_norm_rope_cache", *(f"attention<{v}, {n}>" for v in (1, 2) for n in ("false", "true")),
                     "attention_heads<64>", "attention_heads<128>",
                     *(f"attention_group<{d}, {g}>" for d in (64, 128) for g in (4, 8, 16))],
    "attention_mma.cu": [f"attention_mma<{d}, {v}>" for d in (64, 128)
                         for v in ("true, float", "false, float", "false, bf16_t")],
    "sampling.cu": ["argmax_partial", "greedy_advance", "topk_candidates", "sample_rows"],
    "matmul.cu": [*(f"mma_tiles<{m}, {split}>" for m in ("LINEAR", "GATE_UP", "DOWN") for split in ("true", "false")),
                  "add_split_sums", "to_bf16"],
    "peer_all_reduce.cu": ["peer_all_reduce"],
    "wgmma_tiles.cu": [f"wgmma_tiles<{m}, {WG_TILE}, {a}>" for m in ("LINEAR", "GATE_UP", "DOWN")
                       for a in ("float", "bf16_t")],
}
OPTIONS = ("-std=c++17", f"-I{SOURCE_DIR}")
# QWEN3MOE_TIMELINE=1 compiles every kernel with the block timing of cuda/timeline.cuh (fastpath/timeline.py), read
# when a module is first compiled in a process; the binaries are cached apart, since the options are part of the key.
TIMELINE_OPTION = "-DQWEN3MOE_TIMELINE"
# Files written for one architecture only, compiled for it: wgmma exists on Hopper (sm_90a), not on later GPUs.
ARCHITECTURE = {"wgmma_tiles.cu": "sm_90a", "prefill_wgmma.cu": "sm_90a"}

# The kernel ladders (fastpath/ladder.py): the steps towards the production kernels, for learners.
LADDER_DIR = SOURCE_DIR / "ladder"
LADDER_KERNELS = {
    "moe_gemv.cu": ["moe_gemv_v1", "moe_gemv_v2", "moe_gemv_v3"],
    "attention_decode.cu": ["attention_v1", "attention_v2", "attention_v3_combine"],
    "router.cu": ["router_v1", "router_v2"],
    "prefill_tiles.cu": ["prefill_tiles_v1"],
    "prefill_wgmma.cu": ["prefill_wgmma_v3"],
}


def name_expressions(file: str) -> list[str]:
    """Every instantiation of ``file``'s kernels, one per weight type where the name has ``{W}``."""
    names = [n.format(W=w) for n in KERNELS[file] for w in WEIGHT_TYPES]
    return list(dict.fromkeys(names))


def headers() -> str:
    """The shared headers (``cuda/*.cuh``) as text: part of every cached binary's key, since the compilers' caches key
    on a file's own text and options, not on what it includes."""
    return "".join(p.read_text() for p in sorted(SOURCE_DIR.glob("*.cuh")))


def options() -> tuple[str, ...]:
    """The compiler options of every module: OPTIONS, and TIMELINE_OPTION where QWEN3MOE_TIMELINE asks for it."""
    return OPTIONS + ((TIMELINE_OPTION,) if os.environ.get("QWEN3MOE_TIMELINE", "0") != "0" else ())


LOADED: list[str] = []  # the files module() has compiled in this process, in order


@functools.cache
def module(file: str):
    """The compiled module of one .cu file (compiled once per process; CuPy also caches the binary on disk, keyed by
    the source, to which a comment with the headers' hash is added so that editing a header compiles again)."""
    import hashlib
    import cupy

    LOADED.append(file)
    if file in ARCHITECTURE:
        return ArchitectureModule(SOURCE_DIR / file, name_expressions(file))
    stamp = hashlib.sha256(headers().encode()).hexdigest()[:16]
    return cupy.RawModule(code=(SOURCE_DIR / file).read_text() + f"\n// headers {stamp}\n", options=options(),
                          name_expressions=name_expressions(file))


class ArchitectureModule:
    """A .cu file (``path``, its kernels' name expressions ``names``) compiled by NVRTC for its ``ARCHITECTURE``
    entry, with ``get_function`` as CuPy's RawModule. CuPy compiles for the card's generic architecture (sm_90 on an
    H100) and refuses a second ``-arch``, so these files go to NVRTC directly; the binary is cached on disk beside
    CuPy's (``CUPY_CACHE_DIR``), keyed by the sources, the options and NVRTC's version, so a second process does not
    compile again."""

    def __init__(self, path: Path, names: list[str]):
        import hashlib
        import cupy
        from cupy_backends.cuda.libs import nvrtc  # (what cupy.cuda.compiler drives NVRTC with)

        file, source = path.name, path.read_text()
        # -ftz as CuPy compiles the other files; the ladder's sources also see their own folder
        flags = (*options(), f"-I{path.parent}", "-ftz=true", f"-arch={ARCHITECTURE[file]}")
        key = hashlib.sha256(repr((source, headers(), flags, names, nvrtc.getVersion())).encode()).hexdigest()[:24]
        folder = Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))
        cubin, lowered = folder / f"qwen3moe_{key}.cubin", folder / f"qwen3moe_{key}.names"
        if not (cubin.exists() and lowered.exists()):
            program = nvrtc.createProgram(source, file, (), ())
            try:
                for name in names:
                    nvrtc.addNameExpression(program, name)
                try:
                    nvrtc.compileProgram(program, flags)
                except nvrtc.NVRTCError:
                    raise DeviceError(f"compiling {path} for {ARCHITECTURE[file]} failed:\n"
                                      f"{nvrtc.getProgramLog(program)}") from None
                binary = nvrtc.getCUBIN(program)
                symbols = "\n".join(nvrtc.getLoweredName(program, name) for name in names)
            finally:
                nvrtc.destroyProgram(program)
            folder.mkdir(parents=True, exist_ok=True)
            for path, data in ((cubin, binary), (lowered, symbols.encode())):  # written whole, then renamed
                temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                temporary.write_bytes(data)
                temporary.replace(path)
        self.symbols = dict(zip(names, lowered.read_text().split("\n")))
        self.raw = cupy.RawModule(path=str(cubin))

    def get_function(self, name: str):
        return self.raw.get_function(self.symbols[name])

    def get_global(self, name: str):
        return self.raw.get_global(name)


COMPILE_NOTICE_S = 1.0  # a module whose first kernel took longer than this to get was compiled, and says so


@functools.cache
def kernel(file: str, name: str) -> "Kernel":
    """One kernel, by its name expression in ``KERNELS`` (e.g. ``"linear<bf16_t, 8>"``). The module is compiled
    on first use; a compile error names the file and carries NVRTC's log. A first run on a machine compiles every
    file it uses (seconds each, the binaries then cached on disk): each says so on stderr, so that the run does not
    look hung."""
    import cupy

    first, start = file not in LOADED, time.perf_counter()
    try:
        k = Kernel(module(file).get_function(name), name)
    except cupy.cuda.compiler.CompileException as e:
        raise DeviceError(f"compiling fastpath/cuda/{file} failed:\n{e}") from None
    took = time.perf_counter() - start
    if first and took > COMPILE_NOTICE_S:
        print(f"cupy: compiled fastpath/cuda/{file} for this GPU in {took:.1f} s (once: later runs load it from the "
              f"disk cache)", file=sys.stderr, flush=True)
    return k


# ---- launching with programmatic dependent launch --------------------------------------------------------------------

class LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
PDL = os.environ.get("QWEN3MOE_PDL", "1") != "0"  # read at each launch
ARGUMENT_TYPES = {"int32": ctypes.c_int32, "int64": ctypes.c_int64, "uint64": ctypes.c_uint64,
                  "float32": ctypes.c_float}


@functools.cache
def driver():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuTensorMapEncodeTiled.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


# ---- tensor maps: how the copy engine (TMA) of a Hopper GPU reads a weight matrix ------------------------------------

TENSOR_MAP_BF16, SWIZZLE_128B, L2_PROMOTION_128B = 9, 3, 2  # CUtensorMapDataType, CUtensorMapSwizzle, ...L2promotion
TensorMap = ctypes.c_uint64 * 16  # CUtensorMap: 128 opaque bytes


def tensor_map(address: int, rows: int, K: int, box_rows: int) -> TensorMap:
    """The CUtensorMap (128 bytes, passed to the kernel by value) of a row-major (rows, K) bf16 matrix at
    ``address``, whose copies take 64 k x ``box_rows`` rows at a time (wgmma_tiles.cu's step), in the 128-byte
    swizzled layout that wgmma reads without bank conflicts; rows and columns past the ends read as zeros. Made on
    the host, in a microsecond or so."""
    encoded = TensorMap()
    status = driver().cuTensorMapEncodeTiled(
        encoded, TENSOR_MAP_BF16, 2, ctypes.c_void_p(address), (ctypes.c_uint64 * 2)(K, rows),
        (ctypes.c_uint64 * 1)(2 * K), (ctypes.c_uint32 * 2)(64, box_rows), (ctypes.c_uint32 * 2)(1, 1), 0,
        SWIZZLE_128B, L2_PROMOTION_128B, 0)
    if status:
        raise DeviceError(f"making the tensor map of a {rows} x {K} bf16 matrix failed (CUresult {status})")
    return encoded


class Kernel:
    """A compiled kernel, called like CuPy's RawKernel: ``k(grid, block, args, shared_mem=0)`` on the current stream.

    Captured into a CUDA graph (the decode step of ``GreedyDecoder``), it is launched through ``cuLaunchKernelEx``
    with programmatic stream serialization allowed: the graph gets a programmatic edge from the kernel ahead, and the
    GPU may schedule this kernel's blocks before that kernel has finished. Each kernel waits for the results it needs
    (``begin_after_previous`` in cuda/common.cuh), so the two overlap only in launch latency and the first weight
    loads: batch-1 decoding 8 % faster on an H200. Launched eagerly (step by step from Python) it goes through CuPy,
    whose compiled argument packing costs a few microseconds where ctypes costs ~4x more, and where programmatic
    launch measured no gain: those steps are paced by the host. Arguments: CuPy arrays (passed as their device
    pointers), NumPy int32, int64, uint64 and float32 scalars, and tensor maps (``TensorMap``, passed by value, which
    CuPy cannot do: a launch with one always goes through ``cuLaunchKernelEx``)."""

    def __init__(self, raw, name: str):
        self.raw, self.name = raw, name  # raw: cupy.RawKernel, whose function attributes apply to our launches too
        self.attribute = LaunchAttribute(PROGRAMMATIC_STREAM_SERIALIZATION)
        self.attribute.value[0] = 1
        self.shared_allowed = 48 * 1024  # dynamic shared memory a launch may take (the most without asking for it)

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        import cupy

        if shared_mem > self.shared_allowed:  # more than a launch may take unasked: allowed once, not every launch
            self.raw.max_dynamic_shared_size_bytes = self.shared_allowed = shared_mem
        stream = cupy.cuda.get_current_stream()
        programmatic = PDL and stream.is_capturing()
        by_value = any(isinstance(a, ctypes.Array) for a in args)  # a tensor map: CuPy cannot pass it
        if not (programmatic or by_value):  # see the class docstring
            self.raw(grid, block, args, shared_mem=shared_mem)
            return
        values = [a if isinstance(a, ctypes.Array) else ctypes.c_uint64(a.data.ptr) if isinstance(a, cupy.ndarray)
                  else ARGUMENT_TYPES[a.dtype.name](a) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        pad = lambda dims: (ctypes.c_uint * 3)(*dims, *(1,) * (3 - len(dims)))
        config = LaunchConfig(pad(grid), pad(block), shared_mem, stream.ptr, ctypes.pointer(self.attribute),
                              int(programmatic))
        status = driver().cuLaunchKernelEx(ctypes.byref(config), self.raw.kernel.ptr, pointers, None)
        if status:
            message = ctypes.c_char_p()
            driver().cuGetErrorString(status, ctypes.byref(message))
            raise DeviceError(f"launching {self.name} failed: {(message.value or b'').decode()} (CUresult "
                              f"{status})")
