"""Where pysteer's (point, layer) live in llama.cpp's graph, per architecture.

``pre`` of layer i is the block input (the embedding output for i = 0, otherwise the output of layer
i - 1), ``mid`` the residual after attention and before the MLP, ``post`` the block output.
"""

from __future__ import annotations

from typing import Literal, Sequence

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


def check_points(points: Sequence[str]) -> tuple[Point, ...]:
    if isinstance(points, str):
        points = (points,)
    points = tuple(points)
    if not points:
        raise ValueError("points is empty; choose from 'pre', 'mid', 'post'")
    bad = [p for p in points if p not in POINTS]
    if bad:
        raise ValueError(f"unknown point(s) {bad}; choose from {POINTS}")
    if len(set(points)) != len(points):
        raise ValueError(f"points repeat: {points}")
    return points


def check_layers(layers, n_layers: int) -> tuple[int, ...]:
    """Layers as a tuple of ints in [0, n_layers); None means all."""
    if layers is None:
        return tuple(range(n_layers))
    if isinstance(layers, int):
        layers = (layers,)
    try:
        layers = tuple(int(i) for i in layers)
    except TypeError:
        raise ValueError(f"layers must be an int, an iterable of ints or None, not {type(layers).__name__}")
    if not layers:
        raise ValueError("layers is empty")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has layers 0..{n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeat: {layers}")
    return layers
