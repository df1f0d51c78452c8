"""Interventions on the residual stream: what to do and where. Data only; steering.py installs them.

    Ablate(r):         h <- h - sum_i (h . r_i) r_i          (r_i orthonormalized)
    Add(v, alpha):     h <- h + alpha v
    Rotate(b1, b2, t): h <- h - P h + |P h| (cos t b1 + sin t b2),  P = b1 b1^T + b2 b2^T
                       (adaptive: only tokens with h . b1 > 0)

Each applies at ``points`` of ``layers`` (None = all layers). ``pre`` of layer i+1 and ``post`` of layer i are
one tensor in llama.cpp; an intervention that names both edits it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import hookpoints

ABLATE, ADD, ROTATE = 0, 1, 2  # op kinds of pysteer._core.Hook.add_op


@dataclass(frozen=True)
class TensorOp:
    """One intervention bound to one llama.cpp tensor of one model."""
    name: str  # llama.cpp tensor name, e.g. "l_out-7"
    layer: int  # the layer whose post/mid/pre first named it
    kind: int
    dirs: np.ndarray  # [k, n_embd] float32
    cos: float = 1.0
    sin: float = 0.0
    adaptive: bool = False


def _vector(v, name: str, n_embd: int | None = None) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values")
    if n_embd is not None and a.size != n_embd:
        raise ValueError(f"{name} has {a.size} features, the model has n_embd={n_embd}")
    return a


def _unit(v, name: str) -> np.ndarray:
    a = _vector(v, name)
    n = np.linalg.norm(a)
    if n == 0 or not np.isfinite(n):
        raise ValueError(f"{name} is zero")
    return a / n


def _check_layers_arg(layers):
    if layers is None:
        return None
    if isinstance(layers, (int, np.integer)):
        return (int(layers),)
    return tuple(int(i) for i in layers)


class Intervention:
    layers: tuple[int, ...] | None
    points: tuple[str, ...]

    def _sites(self, model) -> list[tuple[str, int, str]]:
        """(tensor name, layer, point) for each tensor this intervention edits, first naming wins."""
        layers = hookpoints.check_layers(self.layers, model.n_layers)
        seen, out = set(), []
        for layer in layers:
            for point in self.points:
                name = hookpoints.tensor_name(model.arch, point, layer)
                if name not in seen:
                    seen.add(name)
                    out.append((name, layer, point))
        return out

    def bind(self, model) -> list[TensorOp]:
        raise NotImplementedError


class Ablate(Intervention):
    """Project out one direction or k (orthonormalized on input): ``h <- h - sum_i (h . r_i) r_i``."""

    def __init__(self, directions, layers=None, points: Sequence[str] = ("pre", "mid", "post")):
        d = np.asarray(directions, dtype=np.float64)
        if d.ndim == 1:
            d = d[None, :]
        if d.ndim != 2 or d.shape[0] == 0 or d.shape[1] == 0:
            raise ValueError(f"directions must be [n_embd] or [k, n_embd], got shape {np.shape(directions)}")
        if not np.isfinite(d).all():
            raise ValueError("directions have non-finite values")
        norms = np.linalg.norm(d, axis=1)
        if (norms == 0).any():
            raise ValueError(f"direction(s) {np.nonzero(norms == 0)[0].tolist()} are zero")
        q, r = np.linalg.qr((d / norms[:, None]).T)
        if (np.abs(np.diag(r)) < 1e-6).any():
            raise ValueError("directions are linearly dependent; pass independent ones")
        self.directions = q.T.copy()  # [k, n_embd], orthonormal, spanning the same space
        self.layers = _check_layers_arg(layers)
        self.points = hookpoints.check_points(points)

    def bind(self, model) -> list[TensorOp]:
        if self.directions.shape[1] != model.n_embd:
            raise ValueError(f"Ablate directions have {self.directions.shape[1]} features, "
                             f"the model has n_embd={model.n_embd}")
        dirs = self.directions.astype(np.float32)
        return [TensorOp(name, layer, ABLATE, dirs) for name, layer, _ in self._sites(model)]

    def __repr__(self):
        return f"Ablate(k={len(self.directions)}, layers={self.layers}, points={self.points})"


class Add(Intervention):
    """``h <- h + alpha v``: one vector for all layers ([n_embd]) or one per layer ([n_layers, n_embd])."""

    def __init__(self, vector, alpha: float = 1.0, layers=None, points: Sequence[str] = ("post",)):
        v = np.asarray(vector, dtype=np.float64)
        if v.ndim not in (1, 2) or v.size == 0:
            raise ValueError(f"vector must be [n_embd] or [n_layers, n_embd], got shape {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError("vector has non-finite values")
        if not np.isfinite(alpha):
            raise ValueError(f"alpha must be finite, not {alpha}")
        self.vector, self.alpha = v, float(alpha)
        self.layers = _check_layers_arg(layers)
        self.points = hookpoints.check_points(points)

    def layer_vector(self, layer: int) -> np.ndarray:
        return self.alpha * (self.vector if self.vector.ndim == 1 else self.vector[layer])

    def bind(self, model) -> list[TensorOp]:
        if self.vector.shape[-1] != model.n_embd:
            raise ValueError(f"Add vector has {self.vector.shape[-1]} features, the model has n_embd={model.n_embd}")
        if self.vector.ndim == 2 and self.vector.shape[0] != model.n_layers:
            raise ValueError(f"per-layer Add vector has {self.vector.shape[0]} rows, the model has "
                             f"{model.n_layers} layers")
        return [TensorOp(name, layer, ADD, self.layer_vector(layer)[None, :].astype(np.float32))
                for name, layer, _ in self._sites(model)]

    def __repr__(self):
        return f"Add(alpha={self.alpha}, layers={self.layers}, points={self.points})"


class Rotate(Intervention):
    """Set each activation to angle ``degrees`` in the plane span(b1, b2), keeping its in-plane norm.

    b1 is normalized and b2 Gram-Schmidt'ed against it. With ``adaptive=True`` only tokens with
    ``h . b1 > 0`` change.
    """

    def __init__(self, b1, b2, degrees: float, adaptive: bool = False, layers=None,
                 points: Sequence[str] = ("pre", "mid", "post")):
        u1 = _unit(b1, "b1")
        v2 = _vector(b2, "b2")
        if v2.size != u1.size:
            raise ValueError(f"b1 and b2 differ in size ({u1.size} vs {v2.size})")
        if not np.isfinite(degrees):
            raise ValueError(f"degrees must be finite, not {degrees}")
        w = v2 - (v2 @ u1) * u1
        if np.linalg.norm(w) <= 1e-6 * max(np.linalg.norm(v2), 1e-300):
            raise ValueError("b2 is parallel to b1 (or zero): they do not span a plane")
        self.b1, self.b2 = u1, w / np.linalg.norm(w)
        self.degrees, self.adaptive = float(degrees), bool(adaptive)
        self.layers = _check_layers_arg(layers)
        self.points = hookpoints.check_points(points)

    def bind(self, model) -> list[TensorOp]:
        if self.b1.size != model.n_embd:
            raise ValueError(f"Rotate plane has {self.b1.size} features, the model has n_embd={model.n_embd}")
        t = math.radians(self.degrees)
        dirs = np.stack([self.b1, self.b2]).astype(np.float32)
        return [TensorOp(name, layer, ROTATE, dirs, math.cos(t), math.sin(t), self.adaptive)
                for name, layer, _ in self._sites(model)]

    def __repr__(self):
        return (f"Rotate(degrees={self.degrees}, adaptive={self.adaptive}, layers={self.layers}, "
                f"points={self.points})")
