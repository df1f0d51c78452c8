"""Where pysteer's (point, layer) live in llama.cpp's graph, per architecture.

``pre`` of layer i is the block input (the embedding output for i = 0, otherwise the output of layer
i - 1), ``mid`` the residual after attention and before the MLP, ``post`` the block output.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

Point = Literal["pre", "mid", "post"]
POINTS: tuple[Point, ...] = ("pre", "mid", "post")

# arch -> (embedding output as the model's first residual, residual after attention)
_ARCH_NAMES = {
    "llama": ("embd", "ffn_inp"),
    "qwen2": ("embd", "ffn_inp"),
    "qwen3": ("embd", "ffn_inp"),
    "gemma3": ("inp_scaled", "sa_out"),
}
SUPPORTED_ARCHS = tuple(sorted(_ARCH_NAMES))
#: Architectures whose residual stream is the plain sum of the embedding and each block's attention-output and
#: FFN-down writes: there, editing those matrices (LoRA ablation, BlockAblate, abliteration) edits the stream
#: exactly. gemma3 normalizes the writes before adding them.
PLAIN_SUM_ARCHS = ("llama", "qwen2", "qwen3")


class UnsupportedArchitectureError(ValueError):
    pass


def check_arch(arch: str) -> None:
    if arch not in _ARCH_NAMES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} has no known hook points; supported: {', '.join(SUPPORTED_ARCHS)}"
        )


def embedding_name(arch: str) -> str:
    """The first residual tensor of every ubatch (also ``pre`` of layer 0)."""
    check_arch(arch)
    return _ARCH_NAMES[arch][0]


def tensor_name(arch: str, point: Point, layer: int) -> str:
    """llama.cpp's name for the tensor holding ``point`` of ``layer``."""
    check_arch(arch)
    embd, mid = _ARCH_NAMES[arch]
    if point == "pre":
        return embd if layer == 0 else f"l_out-{layer - 1}"
    if point == "mid":
        return f"{mid}-{layer}"
    if point == "post":
        return f"l_out-{layer}"
    raise ValueError(f"unknown point {point!r}; choose from {POINTS}")


def graph_order(point_layer: tuple[str, int]) -> tuple[int, int]:
    """Sort key of a (point, layer) in llama.cpp's graph: ``pre`` of layer i is ``post`` of layer i - 1."""
    point, layer = point_layer
    return (layer - 1, 2) if point == "pre" else (layer, POINTS.index(point))


def check_points(points: Sequence[str]) -> tuple[Point, ...]:
    if isinstance(points, str):
        points = (points,)
    if points is None or not hasattr(points, "__iter__"):
        raise ValueError(f"points must be some of 'pre', 'mid', 'post', not {points!r}")
    points = tuple(points)
    if not points:
        raise ValueError("points is empty; choose from 'pre', 'mid', 'post'")
    bad = [p for p in points if p not in POINTS]
    if bad:
        raise ValueError(f"unknown point(s) {bad}; choose from {POINTS}")
    if len(set(points)) != len(points):
        raise ValueError(f"points repeat: {points}")
    return points


def check_layer_spec(spec):
    """``spec`` checked for its form only (no model at hand yet); :func:`check_layers` resolves it.

    A layer spec, everywhere in pysteer (API, CLI, export): None or "all"; an int; an iterable of ints; or a
    string "A:B[:STEP]" (a Python slice of the layers, B excluded) or "i,j,k"."""
    if spec is None or isinstance(spec, str):
        if isinstance(spec, str):
            _parse(spec, 1 << 20)  # form only: a large range so that no real index is out of it
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"layers must be ints, not {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return int(spec)
    if isinstance(spec, (set, frozenset, dict)):
        raise ValueError("layers must be ordered (a list, tuple, range or spec string), not a set")
    try:
        items = list(spec)
    except TypeError:
        raise ValueError(f"layers must be None, 'all', a spec string, an int or ints, not {type(spec).__name__}") from None
    bad = [i for i in items if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if bad:
        raise ValueError(f"layers must be ints, got {bad[:3]}")
    return tuple(int(i) for i in items)


def _parse(spec: str, n_layers: int) -> list[int]:
    s = spec.strip()
    if s == "all":
        return list(range(n_layers))
    try:
        if ":" in s:
            parts = [int(x) if x.strip() else None for x in s.split(":")]
            if len(parts) > 3 or parts[-1] == 0 and len(parts) == 3:
                raise ValueError
            return list(range(n_layers))[slice(*parts)]
        return [int(x) for x in s.split(",")]
    except ValueError:
        raise ValueError(f"bad layer spec {spec!r}: use 'all', 'A:B[:STEP]' or 'i,j,k'") from None


def check_layers(spec, n_layers: int, *, first: int = 0) -> tuple[int, ...]:
    """A layer spec (see :func:`check_layer_spec`) resolved to a tuple of distinct layers in
    [first, n_layers); None and "all" mean all of them."""
    spec = check_layer_spec(spec)
    if spec is None:
        layers = list(range(first, n_layers))
    elif isinstance(spec, str):
        layers = [i for i in _parse(spec, n_layers) if spec.strip() != "all" or i >= first]
    elif isinstance(spec, int):
        layers = [spec]
    else:
        layers = list(spec)
    if not layers:
        raise ValueError(f"layers is empty (layer spec {spec!r} gives none)")
    bad = [i for i in layers if not first <= i < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has layers {first}..{n_layers - 1}"
                         + (" here (llama.cpp has no control vector for layer 0)" if first else ""))
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeat: {layers}")
    return tuple(layers)
