"""Interventions on the residual stream: what to do and where. Data only; steering.py installs them.

    Ablate(r):         h <- h - sum_i (h . r_i) r_i          (r_i orthonormalized)
    Add(v, alpha):     h <- h + alpha v
    Rotate(b1, b2, t): h <- h - P h + |P h| (cos t b1 + sin t b2),  P = b1 b1^T + b2 b2^T
                       (adaptive: only tokens with h . b1 > 0)
    BlockAblate(r, wa, wf): each layer's attention output y <- y - wa_l r_l (r_l . y), FFN output likewise with
                       wf_l: what the weight edit W <- W - w_l r_l r_l^T W of attn_output / ffn_down does

Each applies at ``points`` of ``layers`` (None = all layers). ``pre`` of layer i+1 and ``post`` of layer i are
one tensor in llama.cpp; an intervention that names both edits it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import hookpoints, params, vectors
from .native import ABLATE, ABLATE_DELTA, ADD, ROTATE, SAVE
from .rownorms import WriteGeometry


@dataclass(frozen=True)
class TensorOp:
    """One intervention bound to one llama.cpp tensor of one model."""
    name: str  # llama.cpp tensor name, e.g. "l_out-7"
    kind: int  # native.ABLATE, ADD or ROTATE
    dirs: np.ndarray  # [k, n_embd] float32
    cos: float = 1.0
    sin: float = 0.0
    adaptive: bool = False
    slot: int = -1  # SAVE / ABLATE_DELTA: the saved row values they share


class Intervention:
    layers: object  # a layer spec (pysteer.hookpoints.check_layer_spec), resolved when bound to a model
    points: tuple[str, ...]

    def _sites(self, model) -> list[tuple[str, int]]:
        """(tensor name, layer) for each tensor this intervention edits. A tensor named twice (post of layer l is
        pre of l + 1) is edited once, as the lower layer's: whatever order the layers were given in."""
        layers = hookpoints.check_layers(self.layers, model.n_layers)
        seen, out = set(), []
        for layer in sorted(layers):
            for point in self.points:
                name = hookpoints.tensor_name(model.arch, point, layer)
                if name not in seen:
                    seen.add(name)
                    out.append((name, layer))
        return out

    def _width(self) -> int:
        raise NotImplementedError

    def bind(self, model) -> list[TensorOp]:
        """The tensor ops of this intervention on ``model`` (ValueError when it does not fit)."""
        if self._width() != model.n_embd:
            raise ValueError(f"{type(self).__name__} has {self._width()} features, the model has "
                             f"n_embd={model.n_embd}")
        return self._ops(model)


class Ablate(Intervention):
    """Project out one direction or k (orthonormalized on input): ``h <- h - sum_i (h . r_i) r_i``."""

    def __init__(self, directions, layers=None, points: Sequence[str] = ("pre", "mid", "post")):
        self.directions = vectors.orthonormal(directions, "directions")  # [k, n_embd] float32
        self.layers = hookpoints.check_layer_spec(layers)
        self.points = hookpoints.check_points(points)

    def _width(self) -> int:
        return self.directions.shape[1]

    def _ops(self, model) -> list[TensorOp]:
        return [TensorOp(name, ABLATE, self.directions) for name, _ in self._sites(model)]

    def __repr__(self):
        return f"Ablate(k={len(self.directions)}, layers={self.layers}, points={self.points})"


class Add(Intervention):
    """``h <- h + alpha v``: one vector for all layers ([n_embd]) or one per layer ([n_layers, n_embd]; the
    tensor that is both post of layer l and pre of l + 1 takes row l where both are named)."""

    def __init__(self, vector, alpha: float = 1.0, layers=None, points: Sequence[str] = ("post",)):
        v = np.asarray(vector)
        if v.ndim == 2 and not len(v):
            raise ValueError("vector has no rows; give one [n_embd] vector or one per layer")
        if v.ndim == 2 and v.dtype.kind in "iuf":
            self.vector = np.stack([vectors.checked(row, f"vector[{i}]") for i, row in enumerate(v)])
        else:
            self.vector = vectors.checked(vector, "vector")
        vectors.scaled(self.vector, alpha, "vector")  # overflow is an error now, not NaN logits later
        self.alpha = float(alpha)
        self.layers = hookpoints.check_layer_spec(layers)
        self.points = hookpoints.check_points(points)

    def layer_vector(self, layer: int) -> np.ndarray:
        """``alpha v`` (float32) for one layer."""
        return vectors.scaled(self.vector if self.vector.ndim == 1 else self.vector[layer], self.alpha, "vector")

    def _width(self) -> int:
        return self.vector.shape[-1]

    def _ops(self, model) -> list[TensorOp]:
        if self.vector.ndim == 2 and self.vector.shape[0] != model.n_layers:
            raise ValueError(f"per-layer Add vector has {self.vector.shape[0]} rows, the model has "
                             f"{model.n_layers} layers")
        return [TensorOp(name, ADD, self.layer_vector(layer)[None, :]) for name, layer in self._sites(model)]

    def __repr__(self):
        return f"Add(alpha={self.alpha}, layers={self.layers}, points={self.points})"


class Rotate(Intervention):
    """Set each activation to angle ``degrees`` in the plane span(b1, b2), keeping its in-plane norm.

    b1 is normalized and b2 Gram-Schmidt'ed against it. With ``adaptive=True`` only tokens with
    ``h . b1 > 0`` change.
    """

    def __init__(self, b1, b2, degrees: float, adaptive: bool = False, layers=None,
                 points: Sequence[str] = ("pre", "mid", "post")):
        degrees = params.number("degrees", degrees)
        b1, b2 = vectors.checked(b1, "b1", unit=True), vectors.checked(b2, "b2")
        if b1.size != b2.size:
            raise ValueError(f"b1 and b2 differ in size ({b1.size} vs {b2.size})")
        u1, v2 = b1.astype(np.float64), b2.astype(np.float64)
        w = v2 - (v2 @ u1) * u1
        if np.linalg.norm(w) <= 1e-6 * max(np.linalg.norm(v2), 1e-300):
            raise ValueError("b2 is parallel to b1 (or zero): they do not span a plane")
        self.b1, self.b2 = b1, vectors.checked(w, "b2", unit=True)
        self.degrees, self.adaptive = float(degrees), bool(adaptive)
        self.layers = hookpoints.check_layer_spec(layers)
        self.points = hookpoints.check_points(points)

    def _width(self) -> int:
        return self.b1.size

    def _ops(self, model) -> list[TensorOp]:
        t = math.radians(self.degrees)
        dirs = np.stack([self.b1, self.b2])
        return [TensorOp(name, ROTATE, dirs, math.cos(t), math.sin(t), self.adaptive)
                for name, _ in self._sites(model)]

    def __repr__(self):
        return (f"Rotate(degrees={self.degrees}, adaptive={self.adaptive}, layers={self.layers}, "
                f"points={self.points})")


#: The largest BlockAblate weight: w r r^T subtracts w times the write's component, so w = 1000 already turns a
#: component around a thousandfold; beyond, float32 activations head for overflow (all-zero logits).
MAX_WEIGHT = 1000.0



class BlockAblate(Intervention):
    """Weighted ablation of what each layer's attention and FFN write into the residual stream:
    ``y <- y - w_l r_l (r_l . y)`` for the attention output (weights ``attn``) and the FFN output (``ffn``) of
    layer l, with the unit direction ``r_l`` (one row per layer, or one direction for all). This is exactly the
    abliteration weight edit ``W <- W - w_l r_l r_l^T W`` of ``attn_output`` and ``ffn_down`` (no biases),
    applied to the activations. The hook reads each write as the residual after the block minus the one before
    it: it keeps the rows before the block and subtracts ``w_l r_l (r_l . (after - before))`` after it.

    ``norms`` (a :class:`pysteer.rownorms.WriteGeometry` of the model): the row-norm-preserving edit instead
    (heretic's "full" row normalization, exact), ``y <- s * (y - a (b . y))``; see :mod:`pysteer.rownorms`.
    ``read_outs`` (``[n_layers, 2, n_embd]``, component 0 attention, 1 FFN): ``y <- y - w_l r_l (b . y)`` with the
    fitted read-out b of that write instead of r (:mod:`pysteer.readout`); for the plain edit only."""

    def __init__(self, directions, attn, ffn, *, norms=None, read_outs=None):
        d = np.asarray(directions)
        if d.ndim == 2 and not len(d):
            raise ValueError("directions has no rows; give one [n_embd] direction or one per layer")
        if d.ndim == 2 and d.dtype.kind in "iuf":
            self.directions = np.stack([vectors.checked(row, f"directions[{i}]", unit=True) for i, row in enumerate(d)])
        else:
            self.directions = vectors.checked(directions, "directions", unit=True)[None, :]
        self.attn, self.ffn = self._weights(attn, "attn"), self._weights(ffn, "ffn")
        if len(self.attn) != len(self.ffn):
            raise ValueError(f"attn has {len(self.attn)} layer weights, ffn {len(self.ffn)}")
        if len(self.directions) not in (1, len(self.attn)):
            raise ValueError(f"{len(self.directions)} directions for {len(self.attn)} layers: give one per layer or one")
        if norms is not None and not isinstance(norms, WriteGeometry):
            raise TypeError(f"norms must be a pysteer.rownorms.WriteGeometry (WriteGeometry.read(model)), not "
                            f"{type(norms).__name__}")
        self.norms = norms
        self.read_outs = None
        if read_outs is not None:
            if norms is not None:
                raise ValueError("read_outs are fitted for the plain edit; give them without norms")
            ro = np.asarray(read_outs)
            shape = (len(self.attn), 2, self._width())
            if ro.shape != shape or ro.dtype.kind not in "iuf" or not np.isfinite(ro).all():
                raise ValueError(f"read_outs must be a finite array of shape {list(shape)} (layers, attn/ffn, "
                                 f"n_embd), not {getattr(ro, 'shape', None)} of {ro.dtype}")
            self.read_outs = ro.astype(np.float64)

    @staticmethod
    def _weights(w, name: str) -> np.ndarray:
        a = np.asarray(w)
        if a.ndim != 1 or a.dtype.kind not in "iuf" or a.dtype.kind == "b" or not a.size:
            raise ValueError(f"{name} must be a non-empty 1-D array of per-layer weights, not {w!r:.60}")
        a = a.astype(np.float64)
        if not np.isfinite(a).all() or (a < 0).any() or (a > MAX_WEIGHT).any():
            raise ValueError(f"{name} weights must be finite, >= 0 and at most {MAX_WEIGHT:g} (1 removes the "
                             "direction from that write; far beyond it the activations overflow)")
        return a

    def _width(self) -> int:
        return self.directions.shape[1]

    def _ops(self, model) -> list[TensorOp]:
        if model.arch not in hookpoints.PLAIN_SUM_ARCHS:  # a block's write is then ``after - before``
            raise ValueError(f"BlockAblate needs a residual stream that is the plain sum of block outputs "
                             f"({', '.join(hookpoints.PLAIN_SUM_ARCHS)}); {model.arch} normalizes them first")
        if len(self.attn) != model.n_layers:
            raise ValueError(f"{len(self.attn)} layer weights for a model of {model.n_layers} layers")
        if self.norms is not None:
            self.norms.check(model)
        ops = []
        for layer in range(model.n_layers):
            r = self.direction(layer)
            points = (("pre", "mid", self.attn[layer]), ("mid", "post", self.ffn[layer]))
            for k, (before, after, w) in enumerate(points):
                if w == 0:
                    continue
                d = (math.sqrt(w) * r).astype(np.float32)[None, :]
                m = self.write_map(layer, k)
                edit = d if m is None else m.astype(np.float32)
                # one slot per component: layers run in order, so a slot is read before the next layer fills it
                ops += [TensorOp(hookpoints.tensor_name(model.arch, before, layer), SAVE, d, slot=k),
                        TensorOp(hookpoints.tensor_name(model.arch, after, layer), ABLATE_DELTA, edit, slot=k)]
        return ops

    def edited(self) -> list[tuple[int, int]]:
        """(layer, component) of every write the edit changes (component 0: attention, 1: FFN)."""
        return [(int(i), int(k)) for i, k in zip(*np.nonzero(np.stack([self.attn, self.ffn], axis=1)))]

    def direction(self, layer: int) -> np.ndarray:
        """Layer ``layer``'s unit direction r (float64)."""
        return self.directions[layer if len(self.directions) > 1 else 0].astype(np.float64)

    def write_map(self, layer: int, component: int) -> np.ndarray | None:
        """The rows (a, b, s) of layer ``layer``'s edited write ``y' = s * (y - a (b . y))`` (component 0:
        attention, 1: FFN), or None for the plain ``y - w r (r . y)``: the hook and the export both apply it."""
        w = (self.attn, self.ffn)[component][layer]
        r = self.direction(layer)
        if self.norms is not None:
            return self.norms.write_map(layer, component, r, w)
        if self.read_outs is not None:
            return np.stack([w * r, self.read_outs[layer, component], np.ones_like(r)])
        return None

    def __repr__(self):
        kind = ", row norms kept" if self.norms else ", fitted read-outs" if self.read_outs is not None else ""
        return (f"BlockAblate({len(self.directions)} directions, attn layers {np.flatnonzero(self.attn).tolist()}, "
                f"ffn layers {np.flatnonzero(self.ffn).tolist()}{kind})")
