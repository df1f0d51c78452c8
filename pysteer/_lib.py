"""The one place that touches pysteer._core and llama-cpp-python's loaded library.

The extension links to no llama.cpp library. It receives the addresses of the ggml functions it calls from
the very libggml that llama-cpp-python loaded (``llama_cpp.llama_cpp._lib``), so one process holds one
llama.cpp. The build it finds is checked against the one the extension was compiled for.
"""

from __future__ import annotations

import ctypes
import os

import llama_cpp
import llama_cpp._logger

from . import _core

#: The llama.cpp commit vendored by the pinned llama-cpp-python (ggml_commit() prints it with "-dirty").
LLAMA_CPP_COMMIT = "0c1e570"
#: sizeof(struct ggml_object) on 64-bit platforms: ggml_tensor_overhead() = it + sizeof(struct ggml_tensor).
_GGML_OBJECT_SIZE = 32
_HOOK_FUNCTIONS = ("ggml_backend_buffer_is_host", "ggml_backend_tensor_get", "ggml_backend_tensor_set")


class BuildMismatchError(RuntimeError):
    """The llama.cpp found at run time is not the one pysteer was built against."""


def _c_function(name: str, restype, argtypes=()):
    fn = getattr(llama_cpp.llama_cpp._lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


def build_info() -> dict:
    """What pysteer was built against and what it found loaded."""
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_python_built_against": _core.LLAMA_CPP_PYTHON_VERSION,
        "ggml_commit": _c_function("ggml_commit", ctypes.c_char_p)().decode(),
        "ggml_commit_expected": LLAMA_CPP_COMMIT,
        "ggml_tensor_overhead": _c_function("ggml_tensor_overhead", ctypes.c_size_t)(),
        "sizeof_ggml_tensor": _core.SIZEOF_GGML_TENSOR,
        "library": llama_cpp.llama_cpp._lib._name,
    }


def check_build() -> None:
    """Raise BuildMismatchError unless the loaded llama.cpp is the pinned one (PYSTEER_ALLOW_MISMATCH=1 skips)."""
    info = build_info()
    problems = []
    if info["llama_cpp_python"] != info["llama_cpp_python_built_against"]:
        problems.append(
            f"llama-cpp-python {info['llama_cpp_python']} is installed but pysteer was built against "
            f"{info['llama_cpp_python_built_against']}"
        )
    if not info["ggml_commit"].startswith(LLAMA_CPP_COMMIT):
        problems.append(f"libggml reports commit {info['ggml_commit']!r}, expected {LLAMA_CPP_COMMIT}")
    if info["ggml_tensor_overhead"] != info["sizeof_ggml_tensor"] + _GGML_OBJECT_SIZE:
        problems.append(
            f"struct ggml_tensor layout differs: ggml_tensor_overhead()={info['ggml_tensor_overhead']}, "
            f"pysteer's header gives {info['sizeof_ggml_tensor']} + {_GGML_OBJECT_SIZE}"
        )
    if problems and os.environ.get("PYSTEER_ALLOW_MISMATCH") != "1":
        raise BuildMismatchError(
            "pysteer cannot drive this llama.cpp build (" + info["library"] + "): " + "; ".join(problems)
            + ". Reinstall with scripts/install.sh (or pip install the pinned llama-cpp-python and rebuild "
            "pysteer); PYSTEER_ALLOW_MISMATCH=1 skips this check at your own risk."
        )


def new_hook(n_embd: int) -> "_core.Hook":
    """A hook bound to the ggml functions of the library llama-cpp-python loaded."""
    lib = llama_cpp.llama_cpp._lib
    table = {name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _HOOK_FUNCTIONS}
    return _core.Hook(table, n_embd)


def cuda_kernels_usable() -> bool:
    """pysteer has CUDA kernels and the loaded llama.cpp has a CUDA backend (else device tensors are edited
    through ggml_backend_tensor_get/set)."""
    if not _core.CUDA_BUILT:
        return False
    reg = _c_function("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p])
    return bool(reg(b"CUDA"))


def set_verbose(verbose: bool) -> None:
    llama_cpp._logger.set_verbose(verbose)


check_build()
