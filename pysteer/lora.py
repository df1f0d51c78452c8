"""Static directional ablation as a rank-k LoRA adapter: llama.cpp applies it inside the matmuls, no callback.

For orthonormal directions R (k x n_embd) and each matrix W writing into the residual stream (attention
output, FFN down), ``(I - R^T R) W x = W x + B (A x)`` with ``B = -R^T`` and ``A = R W``. With every such
matrix covered and the embedding ablated (pysteer's hook does that one tensor: a token_embd LoRA aborts
llama.cpp on models with a tied output), no residual point ever has a component along R: the same result
as the hook ablating every pre/mid/post, up to llama.cpp quantizing activations before quantized matmuls.
"""

from __future__ import annotations

import ctypes
import hashlib
import pathlib
import tempfile

import llama_cpp
import numpy as np
from llama_cpp._utils import suppress_stdout_stderr

from . import hookpoints
from ._pypi import cache_root
from .files import atomic_output, gguf_output
from .gguf_io import matrix

_WRITERS = ("attn_output", "ffn_down")


def unsupported_reason(model) -> str | None:
    """None when a LoRA ablation is exact for this model; otherwise why not."""
    if model.arch not in hookpoints.PLAIN_SUM_ARCHS:
        return (f"{model.arch} adds normalized block outputs to the residual (only "
                f"{', '.join(hookpoints.PLAIN_SUM_ARCHS)} qualify)")
    names = {name for name, _, _, _ in model.header.tensors}
    for i in range(model.n_layers):
        for w in _WRITERS:
            if f"blk.{i}.{w}.weight" not in names:
                return f"blk.{i}.{w}.weight is missing"
            if f"blk.{i}.{w}.bias" in names:
                return f"blk.{i}.{w} has a bias, which a LoRA does not ablate"
    return None


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(path: pathlib.Path) -> bool:
    """The cached adapter matches the checksum written next to it when it was built."""
    stamp = path.with_name(path.name + ".sha256")
    try:
        return path.is_file() and stamp.read_text().strip() == _digest(path)
    except OSError:
        return False


def _cached(model, directions: np.ndarray) -> pathlib.Path:
    """Where the adapter of ``directions`` for this model file is cached."""
    st = model.path.stat()
    key = hashlib.sha256()
    key.update(f"v1|{model.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
    key.update(np.ascontiguousarray(directions, dtype=np.float32).tobytes())
    return cache_root() / "lora" / f"ablate-{key.hexdigest()[:24]}.gguf"


def cache_reason(model, directions: np.ndarray) -> str | None:
    """None when the adapter is cached or can be built there; otherwise why not (checked before steering)."""
    out = _cached(model, directions)
    if out.is_file():  # (not checksummed here: this runs at every steer())
        return None
    try:  # tried, not inferred: links, /proc and root's permissions fool every test short of writing
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        return (f"its adapter cannot be written under {out.parent} ({type(e).__name__}: {e.strerror or e}): "
                "set PYSTEER_CACHE to a writable folder")
    return None


def adapter_path(model, directions: np.ndarray, *, rebuild: bool = False) -> pathlib.Path:
    """A cached GGUF LoRA that ablates ``directions`` (orthonormal rows) from every residual write; built again
    when missing, damaged (checksum) or ``rebuild``."""
    out = _cached(model, directions)
    if not rebuild and _intact(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    R = np.asarray(directions, dtype=np.float64)
    header = model.header  # not gguf.GGUFReader: it parses the whole vocabulary (7-12 s on Qwen)
    with gguf_output(out, model.arch) as w:
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 0.0)  # alpha 0: scale = the adapter scale given at run time
        w.add_string("pysteer.kind", "directional-ablation")
        for i in range(model.n_layers):
            for name in _WRITERS:
                tname = f"blk.{i}.{name}.weight"
                W = matrix(model.path, header, tname)  # (n_embd, n_in)
                w.add_tensor(f"blk.{i}.{name}.weight.lora_a", (R @ W).astype(np.float32))  # (k, n_in)
                w.add_tensor(f"blk.{i}.{name}.weight.lora_b", (-R.T).astype(np.float32))  # (n_embd, k)
    with atomic_output(out.with_name(out.name + ".sha256")) as tmp:
        tmp.write_text(_digest(out))
    return out


class Adapters:
    """The LoRA adapters one model has loaded (by directions) and the one active on its context; freed with
    the model, after its context."""

    def __init__(self, llama_model, *, verbose: bool = False):
        self._model, self._verbose = llama_model, verbose
        self._loaded: dict[bytes, int] = {}
        self._active = False

    def get(self, model, directions: np.ndarray):
        """The loaded adapter ablating ``directions`` (built and cached on first use)."""
        key = np.ascontiguousarray(directions, dtype=np.float32).tobytes()
        if key not in self._loaded:
            adapter = self._load(adapter_path(model, directions))
            if not adapter:  # damaged in a way the checksum did not see (e.g. the stamp too): build it again
                adapter = self._load(adapter_path(model, directions, rebuild=True))
            if not adapter:
                raise RuntimeError("llama.cpp could not load the generated ablation adapter")
            self._loaded[key] = adapter
        return self._loaded[key]

    def _load(self, path: pathlib.Path):
        with suppress_stdout_stderr(disable=self._verbose):  # per-tensor buffer-type notes on stderr
            return llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())

    def activate(self, ctx, adapter) -> None:
        """Make ``adapter`` (or none) the only LoRA on ``ctx``, at scale 1."""
        if adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
                raise RuntimeError("llama_set_adapters_lora failed")
        elif self._active:
            llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        self._active = adapter is not None

    def close(self) -> None:
        for adapter in self._loaded.values():
            llama_cpp.llama_adapter_lora_free(adapter)
        self._loaded = {}
