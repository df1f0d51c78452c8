"""The row-norm-preserving rank-1 edit of a block's output matrix (heretic's "full" row normalization, here exact
where heretic stores a rank-3 approximation).

With W's rows normalized (``W = diag(n) Ŵ``), the edit ``Ŵ' = Ŵ - w v (v^T Ŵ)`` is taken on the direction of each
row and the old row lengths put back: ``W' = diag(n / m) Ŵ'``, ``m_i = |Ŵ'_i|``. On the block's write ``y = W x``
this is the map ``y' = s * (y - a (b . y))`` with ``a = w n v``, ``b = v / n``, ``s = 1 / m``, which the hook
applies at runtime and the export applies to the weights (and to a bias, as the runtime map does).
``m_i^2 = 1 - 2 w v_i (G v)_i + w^2 v_i^2 (v . G v)`` with ``G = Ŵ Ŵ^T``: one Gram matrix per edited matrix,
read once from the GGUF, gives every trial's scale at the cost of a matrix-vector product.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from .gguf_io import matrix

COMPONENTS = ("attn_output", "ffn_down")


class WriteGeometry:
    """Row norms and Gram matrices of the attn_output and ffn_down of every layer, or of some (float32; 2 x
    n_embd^2 x 4 bytes a layer: 0.15 GB for all of Qwen2.5 0.5B, 0.53 GB for 1.5B, 2.9 GB for a 7B)."""

    def __init__(self, sha256: str, norms: dict, grams: dict):
        self.sha256 = sha256
        self._norms = norms  # layer -> [2, E]
        self._grams = grams  # layer -> [2, E, E]

    @staticmethod
    def missing(model) -> list[str]:
        """The matrices the edit needs that the model lacks (mixture-of-experts models have no ffn_down)."""
        names = {n for n, *_ in model.header.tensors}
        return [f"blk.{i}.{c}.weight" for i in range(model.n_layers) for c in COMPONENTS
                if f"blk.{i}.{c}.weight" not in names]

    @classmethod
    def read(cls, model, *, layers=None, progress: bool = True) -> "WriteGeometry":
        """Read the layers ``layers`` (default all) from the model file; refused before any reading when the
        Gram matrices would not fit in the memory available now."""
        L, E = model.n_layers, model.n_embd
        layers = list(range(L)) if layers is None else sorted({int(i) for i in layers})
        if any(not 0 <= i < L for i in layers):
            raise ValueError(f"layers must be in [0, {L}), not {layers}")
        missing = cls.missing(model)
        if missing:
            raise ValueError(f"the model has no {missing[0]} (mixture-of-experts or another layout); the "
                             "row-norm-preserving edit needs every layer's attn_output and ffn_down (pysteer "
                             "optimize --preserve-norms no)")
        need, free = len(layers) * 2 * E * E * 4, available_memory()
        if free is not None and need > 0.8 * free:
            raise ValueError(f"the row-norm-preserving edit needs {need / 2**30:.1f} GiB for the Gram matrices of "
                             f"{len(layers)} layers and {free / 2**30:.1f} GiB is available; free memory or use "
                             "the plain edit (pysteer optimize --preserve-norms no)")
        norms, grams = {}, {}
        for i in tqdm(layers, desc="row norms", disable=not progress):
            norms[i] = np.empty((2, E), np.float64)
            grams[i] = np.empty((2, E, E), np.float32)
            for k, c in enumerate(COMPONENTS):
                W = matrix(model.path, model.header, f"blk.{i}.{c}.weight")  # (n_embd, n_in)
                n = np.linalg.norm(W, axis=1)
                Wh = (W / np.where(n > 0, n, 1.0)[:, None]).astype(np.float32)  # a zero row stays zero
                norms[i][k] = n
                grams[i][k] = Wh @ Wh.T
        return cls(model.sha256, norms, grams)

    def check(self, model) -> None:
        if model.sha256 != self.sha256:
            raise ValueError(f"these row norms were read from another model file than {model.path.name}; "
                             "read them with WriteGeometry.read(model)")

    def write_map(self, layer: int, component: int, v: np.ndarray, w: float) -> np.ndarray:
        """[3, n_embd] rows a, b, s of the edited write ``y' = s * (y - a (b . y))`` for unit ``v``, weight ``w``
        (component 0: attn_output, 1: ffn_down)."""
        if layer not in self._norms:
            raise ValueError(f"the row norms of layer {layer} were not read (WriteGeometry.read(model, layers=...) "
                             "must name every layer the edit changes)")
        n = self._norms[layer][component]
        v = np.asarray(v, np.float64)
        gv = (self._grams[layer][component] @ v.astype(np.float32)).astype(np.float64)  # no float64 copy of G
        m2 = 1.0 - 2.0 * w * v * gv + w * w * v * v * (v @ gv)
        live = n > 0
        s = np.where(live, 1.0 / np.sqrt(np.maximum(m2, 1e-12)), 1.0)
        return np.stack([np.where(live, w * n * v, 0.0), np.where(live, v / np.where(live, n, 1.0), 0.0), s])


def available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def apply(W: np.ndarray, abs_: np.ndarray) -> np.ndarray:
    """The edited matrix (or bias, 1-D) ``s * (W - a (b^T W))`` for the map rows ``abs_`` = (a, b, s)."""
    a, b, s = abs_
    if W.ndim == 1:
        return s * (W - a * (b @ W))
    return s[:, None] * (W - np.outer(a, b @ W))
