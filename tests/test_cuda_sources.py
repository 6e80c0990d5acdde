"""Every CUDA kernel compiles for the H100 (sm_90, or sm_90a for the files ``ARCHITECTURE`` names) with nvcc, on any machine that has nvcc -- no GPU needed.

The GPU tests (test_cupy_backend.py) only run where a GPU is; this check runs in CI, so a kernel that does not compile
never lands. Each .cu file is compiled with every instantiation the backend launches (``cuda_build.KERNELS``):
taking a template kernel's address makes nvcc compile that instantiation. Warnings fail the test too. The kernels
also compile with the timeline's marks (``-DQWEN3MOE_TIMELINE``, cuda/timeline.cuh), which wrap every kernel's wait.
"""

import ctypes
import shutil
import subprocess
import pytest

from fastpath.cuda_build import (ARCHITECTURE, KERNELS, L2_PROMOTION_128B, LADDER_DIR, LADDER_KERNELS, OPTIONS,
                                 PROGRAMMATIC_STREAM_SERIALIZATION, SOURCE_DIR, SWIZZLE_128B, TENSOR_MAP_BF16,
                                 TIMELINE_OPTION,
                                 LaunchAttribute, TensorMap, LaunchConfig, name_expressions)

NVCC = shutil.which("nvcc")


CASES = [(SOURCE_DIR / f, name_expressions(f)) for f in sorted(KERNELS)] + \
        [(LADDER_DIR / f, names) for f, names in sorted(LADDER_KERNELS.items())]


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed here")
@pytest.mark.parametrize("marks", [(), (TIMELINE_OPTION,)], ids=["plain", "timeline"])
@pytest.mark.parametrize("path, names", CASES, ids=[str(p.relative_to(SOURCE_DIR)) for p, _ in CASES])
def test_kernels_compile_for_sm90(path, names, marks, tmp_path):
    unit = tmp_path / f"all_{path.name}"
    addresses = ", ".join(f"(const void*)&{name}" for name in names)
    unit.write_text(f'#include "{path}"\nconst void* qwen3moe_kernels[] = {{{addresses}}};\n')
    arch = ARCHITECTURE.get(path.name, "sm_90").removeprefix("sm_")
    result = subprocess.run([NVCC, f"-gencode=arch=compute_{arch},code=sm_{arch}", *OPTIONS, *marks, "--Werror",
                             "all-warnings", "-c", str(unit), "-o",
                             str(tmp_path / "out.o")], capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {path.name}:\n{result.stderr}"


def test_editing_a_header_changes_the_key_of_the_cached_binaries(tmp_path, monkeypatch):
    """CuPy keys its on-disk binaries by a file's own text, not by the headers it includes: the source handed to it
    carries the headers' hash, so an edited header (or an upgrade that changes one) compiles every file again."""
    import sys
    import types
    import fastpath.cuda_build as build

    sources = tmp_path / "cuda"
    shutil.copytree(SOURCE_DIR, sources)
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=lambda code, **kwargs: code))
    compiled = lambda: (build.module.cache_clear(), build.module("linear.cu"))[1]
    before = compiled()
    assert before.startswith((sources / "linear.cu").read_text())
    assert compiled() == before  # nothing edited: the same key
    (sources / "common.cuh").write_text((sources / "common.cuh").read_text() + "// edited\n")
    assert compiled() != before
    build.module.cache_clear()


def test_a_module_that_compiles_says_so(monkeypatch, capsys):
    """A first run on a machine compiles every .cu file it uses (seconds each): the first kernel of a module that took
    long to get says so on stderr, once; a module loaded quickly from the disk cache says nothing. (CuPy is faked by
    a module that takes ``compile_s`` to compile when its first function is asked for, as CuPy's RawModule does.)"""
    import sys
    import time
    import types
    import fastpath.cuda_build as build

    compile_s = {"now": 0.2}

    class Module:
        def __init__(self, code, **kwargs):
            self.compiled = False

        def get_function(self, name):
            if not self.compiled:
                time.sleep(compile_s["now"])
                self.compiled = True
            return name

    compiler = types.SimpleNamespace(CompileException=RuntimeError)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(RawModule=Module, cuda=types.SimpleNamespace(
        compiler=compiler)))
    monkeypatch.setattr(build, "COMPILE_NOTICE_S", 0.1)
    monkeypatch.setattr(build, "LOADED", [])
    build.module.cache_clear(), build.kernel.cache_clear()
    try:
        build.kernel("linear.cu", "embed<float>")
        build.kernel("linear.cu", "embed<bf16_t>")  # the same module, compiled already
        said = capsys.readouterr().err
        assert said.count("cupy: compiled fastpath/cuda/linear.cu for this GPU in") == 1 and said.count("\n") == 1
        compile_s["now"] = 0.0  # found in the disk cache
        build.kernel("moe.cu", "moe_combine")
        assert capsys.readouterr().err == ""
    finally:
        build.module.cache_clear(), build.kernel.cache_clear()


def test_every_source_file_is_listed():
    assert sorted(p.name for p in SOURCE_DIR.glob("*.cu")) == sorted(KERNELS)
    assert sorted(p.name for p in LADDER_DIR.glob("*.cu")) == sorted(LADDER_KERNELS)


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed here")
def test_launch_structures_match_cuda_h(tmp_path):
    """The kernels captured into a graph are launched through ctypes (fastpath/cuda_build.py: Kernel), which hands the
    driver a CUlaunchConfig and a CUlaunchAttribute of its own making: their sizes, field offsets and the attribute's
    id must be the ones cuda.h declares; and so must the size of a CUtensorMap and the enum values tensor_map passes."""
    program = tmp_path / "layout.c"
    program.write_text("""#include <cuda.h>
#include <stddef.h>
#include <stdio.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu\\n", sizeof(CUlaunchConfig), offsetof(CUlaunchConfig, blockDimX),
           offsetof(CUlaunchConfig, sharedMemBytes), offsetof(CUlaunchConfig, hStream), offsetof(CUlaunchConfig, attrs),
           offsetof(CUlaunchConfig, numAttrs), sizeof(CUlaunchAttribute));
    printf("%zu %d\\n", offsetof(CUlaunchAttribute, value), (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);
    printf("%zu %d %d %d\\n", sizeof(CUtensorMap), (int)CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, (int)CU_TENSOR_MAP_SWIZZLE_128B,
           (int)CU_TENSOR_MAP_L2_PROMOTION_L2_128B);
    return 0;
}
""")
    subprocess.run([NVCC, str(program), "-o", str(tmp_path / "layout")], check=True)  # host code, cuda.h found
    printed = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True).stdout.split()
    ours = [ctypes.sizeof(LaunchConfig), LaunchConfig.block.offset, LaunchConfig.shared_mem.offset,
            LaunchConfig.stream.offset, LaunchConfig.attrs.offset, LaunchConfig.num_attrs.offset,
            ctypes.sizeof(LaunchAttribute), LaunchAttribute.value.offset, PROGRAMMATIC_STREAM_SERIALIZATION,
            ctypes.sizeof(TensorMap), TENSOR_MAP_BF16, SWIZZLE_128B, L2_PROMOTION_128B]
    assert [int(v) for v in printed] == ours
