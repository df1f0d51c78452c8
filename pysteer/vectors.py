"""The one owner of user-given vectors: checked, made float32, optionally unit length or orthonormal rows.

Every direction, control vector, plane axis and abliteration direction passes through here once; the rest of
pysteer trusts what comes out (finite float32, the right width).
"""

from __future__ import annotations

import numpy as np

from . import params


def _real(v, name: str) -> np.ndarray:
    """``v`` as float64, refusing what is not real numbers (strings, objects, complex, bools)."""
    raw = np.asarray(v)
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers, not {raw.dtype} values")
    return raw.astype(np.float64)


def checked(v, name: str, *, n_embd: int | None = None, unit: bool = False) -> np.ndarray:
    """``v`` as a finite float32 1-D vector (of ``n_embd`` values when given); with ``unit``, scaled to length 1
    (computed in float64)."""
    a = _real(v, name)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values")
    if n_embd is not None and a.size != n_embd:
        raise ValueError(f"{name} has {a.size} features, the model has n_embd={n_embd}")
    if unit:
        n = np.linalg.norm(a)
        if n == 0 or not np.isfinite(n):
            raise ValueError(f"{name} is zero" if n == 0 else f"{name} is too large to normalize")
        a = a / n
    with np.errstate(over="ignore"):  # overflow is checked right below
        out = a.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} does not fit in float32 (values up to {np.abs(a).max():.3g})")
    return out


def orthonormal(rows, name: str, *, n_embd: int | None = None) -> np.ndarray:
    """Rows ``[k, n]`` (or one vector) replaced by orthonormal rows spanning the same space, float32."""
    d = _real(rows, name)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2 or d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(f"{name} must be [n_embd] or [k, n_embd], got shape {np.shape(rows)}")
    d = np.stack([checked(r, f"{name}[{i}]", n_embd=n_embd, unit=True) for i, r in enumerate(d)]).astype(np.float64)
    if d.shape[0] > d.shape[1]:
        raise ValueError(f"{name}: {d.shape[0]} directions in {d.shape[1]} dimensions cannot be independent")
    q, r = np.linalg.qr(d.T)
    if (np.abs(np.diag(r)) < 1e-6).any():
        raise ValueError(f"{name} are linearly dependent; pass independent ones")
    return q.T.astype(np.float32)


def scaled(v: np.ndarray, alpha: float, name: str) -> np.ndarray:
    """``alpha * v`` in float32, refused when it overflows."""
    alpha = params.number("alpha", alpha)
    with np.errstate(over="ignore"):  # overflow is checked right below
        out = (float(alpha) * np.asarray(v, np.float64)).astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} times alpha={alpha:g} does not fit in float32")
    return out
