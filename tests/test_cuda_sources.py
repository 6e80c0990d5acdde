"""Every CUDA kernel compiles for the H100 (sm_90) with nvcc, on any machine that has nvcc -- no GPU needed.

The GPU tests (test_cupy_backend.py) only run where a GPU is; this check runs in CI, so a kernel that does not compile
never lands. Each .cu file is compiled with every instantiation the backend launches (``cuda_build.KERNELS``):
taking a template kernel's address makes nvcc compile that instantiation. Warnings fail the test too.
"""

import shutil
import subprocess

import pytest

from fastpath.cuda_build import KERNELS, LADDER_DIR, LADDER_KERNELS, OPTIONS, SOURCE_DIR, name_expressions

NVCC = shutil.which("nvcc")


CASES = [(SOURCE_DIR / f, name_expressions(f)) for f in sorted(KERNELS)] + \
        [(LADDER_DIR / f, names) for f, names in sorted(LADDER_KERNELS.items())]


@pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed here")
@pytest.mark.parametrize("path, names", CASES, ids=[str(p.relative_to(SOURCE_DIR)) for p, _ in CASES])
def test_kernels_compile_for_sm90(path, names, tmp_path):
    unit = tmp_path / f"all_{path.name}"
    addresses = ", ".join(f"(const void*)&{name}" for name in names)
    unit.write_text(f'#include "{path}"\nconst void* qwen3moe_kernels[] = {{{addresses}}};\n')
    result = subprocess.run([NVCC, "-arch=sm_90", *OPTIONS, "--Werror", "all-warnings", "-c", str(unit), "-o",
                             str(tmp_path / "out.o")], capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {path.name}:\n{result.stderr}"


def test_every_source_file_is_listed():
    assert sorted(p.name for p in SOURCE_DIR.glob("*.cu")) == sorted(KERNELS)
    assert sorted(p.name for p in LADDER_DIR.glob("*.cu")) == sorted(LADDER_KERNELS)
