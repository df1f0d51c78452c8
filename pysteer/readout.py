"""A rank-1 edit whose read-out is fitted to the harmful writes: ``y' = y - w r (b . y)`` for each edited block
write y (attention output, FFN down), instead of the plain ``y - w r (r . y)``.

``b`` keeps ``b . y`` close to ``r . y`` on the writes of harmful prompts and small on those of harmless ones:

    (alpha G + H + lam I) b = (H + lam I) r,    G, H = E[y y^T] over the harmless and harmful train writes

at the last tokens of each prompt (the chat template's suffix), ``lam = ridge x tr(H) / n_embd`` pulling b
towards r. ``alpha = 0`` gives ``b = r``, the plain edit. As a weight edit it is ``W <- W - w r (b^T W)``: the
hook runs it as the write map ``(a, b, s) = (w r, b, 1)`` and the export writes it (``rownorms.apply``).
The solve is done in the space of the n samples (Woodbury): each trial costs an n x n solve per edited matrix,
less than the n_embd x n_embd one while n < n_embd (64 + 64 train prompts x 5 suffix tokens: n = 640).
"""

from __future__ import annotations

import numpy as np

from . import params
from .rownorms import available_memory

RIDGE = 0.01


class WriteSamples:
    """The attention and FFN writes of every layer at the last ``positions`` tokens of harmful and harmless
    prompts, with their Gram matrices in sample space (float32 samples, float64 Gram)."""

    def __init__(self, sha256: str, harmful: np.ndarray, harmless: np.ndarray):
        """``harmful``, ``harmless``: writes ``[n_layers, 2, n, n_embd]`` (component 0: attention, 1: FFN)."""
        harmful, harmless = np.asarray(harmful), np.asarray(harmless)
        if harmful.ndim != 4 or harmless.ndim != 4 or harmful.shape[1] != 2 or harmless.shape[:2] != harmful.shape[:2] \
                or harmless.shape[3] != harmful.shape[3] or not harmful.shape[2] or not harmless.shape[2]:
            raise ValueError(f"writes must be [n_layers, 2, n, n_embd] for both classes, not {harmful.shape} and "
                             f"{harmless.shape}")
        if not (np.isfinite(harmful).all() and np.isfinite(harmless).all()):
            raise ValueError("the writes are not finite")
        self.sha256 = sha256
        self._n_good = harmless.shape[2]
        # rows scaled so that U^T U = G (harmless rows) + H (harmful rows)
        self._u = np.concatenate([harmless / np.sqrt(harmless.shape[2]), harmful / np.sqrt(harmful.shape[2])],
                                 axis=2).astype(np.float32)
        L, n = self._u.shape[0], self._u.shape[2]
        self._gram = np.empty((L, 2, n, n))  # U U^T of each write, float64 (a slice at a time: BLAS, no full copy)
        self._trace_h = np.empty((L, 2))
        for layer in range(L):
            for k in (0, 1):
                u = self._u[layer, k].astype(np.float64)
                self._gram[layer, k] = u @ u.T
                self._trace_h[layer, k] = np.trace(self._gram[layer, k][self._n_good:, self._n_good:])

    @staticmethod
    def check_memory(model, n_prompts: int, positions: int | None = None) -> None:
        """Refuse, before any work, writes of ``n_prompts`` prompts that would not fit in the memory available."""
        from .extraction import suffix_length

        n = n_prompts * (suffix_length(model) if positions is None else positions)
        # the capture (3 points) and its float32 samples, then the float64 Gram matrices
        need, free = n * model.n_layers * 2 * (4 * model.n_embd * 4 + n * 8), available_memory()
        if free is not None and need > 0.8 * free:
            raise ValueError(f"fitting read-outs on {n} writes a matrix needs {need / 2**30:.1f} GiB and "
                             f"{free / 2**30:.1f} GiB is available; use fewer train prompts or the plain edit")

    @classmethod
    def capture(cls, model, harmful, harmless, *, positions: int | None = None,
                progress: bool = False) -> "WriteSamples":
        """The writes of ``model`` on the prompts, at the chat template's suffix tokens by default."""
        from .extraction import suffix_length

        positions = suffix_length(model) if positions is None else params.integer("positions", positions, 1)
        cls.check_memory(model, len(harmful) + len(harmless), positions)
        L, E = model.n_layers, model.n_embd
        writes = []
        for prompts in (harmful, harmless):
            a = model.capture(prompts, positions=positions, progress=progress)  # [N, pre/mid/post, L, K, E]
            w = np.stack([a[:, 1] - a[:, 0], a[:, 2] - a[:, 1]], axis=2)  # [N, L, 2, K, E]
            writes.append(w.transpose(1, 2, 0, 3, 4).reshape(L, 2, -1, E))
        return cls(model.sha256, *writes)

    def check(self, model) -> None:
        if model.sha256 != self.sha256 or self._u.shape[0] != model.n_layers or self._u.shape[3] != model.n_embd:
            raise ValueError(f"these writes were captured on another model than {model.path.name}; capture them "
                             "with WriteSamples.capture(model, ...)")

    def read_out(self, layer: int, component: int, r: np.ndarray, alpha: float, ridge: float = RIDGE) -> np.ndarray:
        """The read-out ``b`` (float64) of unit direction ``r`` for layer ``layer``'s write ``component``."""
        if not 0 <= layer < self._u.shape[0] or component not in (0, 1):
            raise ValueError(f"no writes of layer {layer} component {component} (layers 0 to {self._u.shape[0] - 1}, "
                             "components 0 and 1)")
        if not params.number("alpha", alpha) >= 0 or not params.number("ridge", ridge) > 0:
            raise ValueError(f"alpha must be >= 0 and ridge > 0, not {alpha!r} and {ridge!r}")
        if alpha == 0:
            return np.asarray(r, np.float64).copy()
        u, gram = self._u[layer, component].astype(np.float64), self._gram[layer, component]
        g = self._n_good
        reg = ridge * self._trace_h[layer, component] / u.shape[1]
        if not reg > 0:
            raise ValueError(f"the harmful writes of layer {layer} component {component} are zero: no read-out")
        r = np.asarray(r, np.float64)
        v = u[:g].T @ (u[:g] @ r)  # G r
        d_inv = np.r_[np.full(g, 1.0 / alpha), np.ones(len(u) - g)]
        # (reg I + U^T D U)^-1 v by Woodbury, D = diag(alpha (harmless), 1 (harmful))
        inv_v = (v - u.T @ np.linalg.solve(gram + reg * np.diag(d_inv), u @ v)) / reg
        return r - alpha * inv_v
