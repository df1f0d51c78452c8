"""The build: CUDA kernels compile wherever nvcc exists (CI has it, even without a GPU)."""

import pathlib
import shutil
import subprocess

import pytest

from pysteer import native

ROOT = pathlib.Path(__file__).parent.parent


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit on this machine")
def test_cuda_kernels_compile(tmp_path):
    r = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_80", "-c", str(ROOT / "csrc/cuda/kernels.cu"),
                        "-o", str(tmp_path / "kernels.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert native.CUDA_BUILT  # the installed extension was built with them too


def test_no_third_party_headers_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if pathlib.Path(f).name in {"ggml.h", "llama.h", "ggml-backend.h", "gguf.h"}]
