"""The one module that touches pysteer._core and llama-cpp-python's loaded library: the build check, the
hook on a context's eval callback, and ggml's quantizer.

The extension links to no llama.cpp library. It receives the addresses of the ggml functions it calls from
the very libggml that llama-cpp-python loaded (``llama_cpp.llama_cpp._lib``), so one process holds one
llama.cpp. The build it finds is checked against the one the extension was compiled for.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os

import llama_cpp
import llama_cpp._logger
import numpy as np

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


#: Whether the extension was compiled with pysteer's CUDA kernels.
CUDA_BUILT = bool(_core.CUDA_BUILT)
#: Op kinds of :meth:`Hook.set_ops`, as the extension defines them.
ABLATE, ADD, ROTATE = _core.OP_ABLATE, _core.OP_ADD, _core.OP_ROTATE
SAVE, ABLATE_DELTA = _core.OP_SAVE, _core.OP_ABLATE_DELTA


class HookError(RuntimeError):
    """An error recorded inside llama.cpp's eval callback, raised after the decode."""


class Hook:
    """pysteer's callback on one llama.cpp context: edits rows in place (ops) and copies watched rows out
    (capture). Python sets ops and watches between decodes; :meth:`finish` after every decode returns the
    callback's first error and re-arms it."""

    def __init__(self, n_embd: int):
        lib = llama_cpp.llama_cpp._lib
        table = {name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _HOOK_FUNCTIONS}
        self._h = _core.Hook(table, n_embd)

    def context_params(self, cparams) -> None:
        """Point a context's eval and abort callbacks at this hook (the context must not outlive it)."""
        # Addresses of C functions: these CFUNCTYPE objects own no thunk.
        cparams.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(self._h.callback_address)
        cparams.abort_callback = llama_cpp.ggml_abort_callback(self._h.abort_address)
        cparams.cb_eval_user_data = cparams.abort_callback_data = self._h.user_data

    def set_ops(self, ops, row_marker: str = "") -> None:
        """Replace all interventions: ``(tensor name, kind, dirs [k, n_embd] float32, cos, sin, adaptive, slot)``
        applied in the given order. ``row_marker``: the first residual tensor of every ubatch, needed by
        ABLATE_DELTA (decodes then :meth:`start` with their output rows)."""
        self._h.set_ops([(name, int(kind), np.ascontiguousarray(dirs, np.float32), float(c), float(s), bool(a),
                          int(slot)) for name, kind, dirs, c, s, a, slot in ops], row_marker)

    def watch(self, names, slots, marker: str, stop_after: str = "") -> None:
        """Copy rows of tensors ``names`` into capture slots (element offsets per name) during decodes that
        :meth:`start` a capture; ``marker`` is the first residual tensor of every ubatch. ``stop_after`` (one of
        ``names``): until :meth:`unwatch`, decodes compute nothing past it, so their logits and later layers'
        KV cells are garbage."""
        self._h.set_capture(list(names), [list(map(int, s)) for s in slots], marker, stop_after)

    def unwatch(self) -> None:
        self._h.clear_capture()

    def start(self, n_tokens: int, n_ubatch: int, outputs, cap_tok, cap_dst, out: np.ndarray) -> None:
        """Before a capturing decode: which batch rows are outputs, which are captured, and where they go."""
        self._h.begin_decode(n_tokens, n_ubatch, outputs, cap_tok, cap_dst, out)

    def finish(self) -> str:
        """After every decode (also a failed or interrupted one): the callback's first error, "" if none."""
        return self._h.end_decode()

    def use_cuda_kernels(self, on: bool) -> None:
        self._h.use_cuda_kernels(on)

    @property
    def stats(self) -> dict:
        """Running counts: rows edited, data callbacks (each ends a graph split), seconds inside them."""
        h = self._h
        return {"edited_rows": h.n_edited_rows, "empty_calls": h.n_empty_calls, "data_calls": h.n_data_calls,
                "callback_seconds": h.callback_seconds, "ops": h.n_ops}


def cuda_kernels_usable() -> bool:
    """pysteer has CUDA kernels and the loaded llama.cpp has a CUDA backend (else device tensors are edited
    through ggml_backend_tensor_get/set)."""
    if not CUDA_BUILT:
        return False
    reg = _c_function("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p])
    return bool(reg(b"CUDA"))


def set_verbose(verbose: bool) -> None:
    llama_cpp._logger.set_verbose(verbose)


check_build()


# Types ggml_quantize_chunk writes (its switch). Of these, llama.cpp's quantizer refuses the lowest-bit IQ types
# without an importance matrix (ggml_quantize_requires_imatrix names three; llama_model_quantize adds the rest).
_QUANTIZABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS",
                "TQ1_0", "TQ2_0", "MXFP4"}
_NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ1_S", "IQ1_M"}


def check_quantizable(ggml_type, row_length: int | None = None) -> None:
    """ValueError unless ggml can write ``ggml_type`` from floats without an importance matrix (and rows of
    ``row_length`` values)."""
    import gguf

    ty = gguf.GGMLQuantizationType(int(ggml_type))
    needs_imatrix = ty.name in _NEEDS_IMATRIX or _c_function(
        "ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int])(int(ggml_type))
    if ty.name not in _QUANTIZABLE or needs_imatrix:
        why = "needs an importance matrix" if needs_imatrix else "cannot be written by ggml_quantize_chunk"
        raise ValueError(f"tensor type {ty.name} {why}; store the edited tensors in another type (e.g. Q8_0)")
    block = gguf.GGML_QUANT_SIZES[ty][0]
    if row_length is not None and (row_length <= 0 or row_length % block):
        raise ValueError(f"rows of {row_length} values cannot be stored as {ty.name} (blocks of {block})")


def quantize(x, ggml_type):
    """Rows of ``x`` in ``ggml_type`` by libggml's own quantizer (``ggml_quantize_chunk``, which
    llama_model_quantize calls): uint8 [rows, bytes per row]."""
    import gguf
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("quantize takes a 2-D array of rows")
    check_quantizable(ggml_type, x.shape[1])
    if not np.isfinite(x).all():  # some ggml quantizers abort the process on NaN or inf
        raise ValueError("cannot quantize non-finite values")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(ggml_type))]
    out = np.empty((x.shape[0], x.shape[1] // block * size), np.uint8)
    fn = _c_function("ggml_quantize_chunk", ctypes.c_size_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                              ctypes.c_void_p])

    def run(lo: int, hi: int) -> int:  # ctypes drops the GIL: row ranges quantize in parallel
        return fn(int(ggml_type), x[lo:hi].ctypes.data, out[lo:hi].ctypes.data, 0, hi - lo, x.shape[1], None)

    cuts = np.unique(np.linspace(0, len(x), min(os.cpu_count() or 1, max(1, x.size // (1 << 18))) + 1).astype(int))
    if len(cuts) <= 2:
        n = run(0, len(x)) if len(x) else 0
    else:
        with concurrent.futures.ThreadPoolExecutor(len(cuts) - 1) as pool:
            n = sum(pool.map(run, cuts[:-1], cuts[1:]))
    assert n == out.nbytes, (n, out.nbytes)
    return out
