"""Extraction: class means and variances of activations from two classes of prompts (harmful vs harmless),
and from them candidate directions (difference of means) and layer metrics (pysteer.metrics).

    res = pysteer.extract(m, harmful, harmless, positions=5)
    res.directions          # [points, layers, positions, n_embd]: mean(harmful) - mean(harmless)
    res.metrics.cos_sim     # [points, layers]: cosine of the two class means (last position)
    res.metrics.var_mean    # [2, points, layers]: mean over features of the per-feature variance (ddof=1)
    res.metrics.var_max     # [2, points, layers]: max over features of it;  class 0 = harmful
    res.metrics.plot("metrics.png")

Activations are read at the last ``positions`` tokens of each templated prompt: with the chat template these
are the post-instruction tokens (``<|im_end|>\\n<|im_start|>assistant\\n`` for ChatML); ``positions="suffix"``
takes exactly as many as the template puts after the user's text. ``template`` is the template vocabulary of
:data:`pysteer.runtime.Template` ("chat", "none", "newline" or a Jinja string). Memory stays bounded: prompts are captured
in chunks and only per-class running means and squared deviations (Chan's update) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import hookpoints, params
from .metrics import Metrics, from_moments
from .runtime import Template, check_template, prompt_list

_SENTINEL = "\u2063pysteer-user-text\u2063"


def instruction_suffix(model) -> str:
    """What the chat template puts after the user's text (rendered with and without it)."""
    text = model.apply_chat_template(_SENTINEL)
    if _SENTINEL not in text:
        raise ValueError("the chat template does not include the user's text verbatim")
    return text.split(_SENTINEL, 1)[1]


def suffix_length(model) -> int:
    """Tokens the chat template puts after the user's text."""
    return len(model.tokenize(instruction_suffix(model), add_special=False, parse_special=True))


class RunningMoments:
    """Count, mean and sum of squared deviations of arrays seen in chunks (Chan et al.), in float64."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, x: np.ndarray) -> None:
        """Add samples ``x`` (first axis)."""
        x = np.asarray(x)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0, dtype=np.float64)
        m2b = np.zeros_like(mb)
        for xi in x:  # a sample at a time: no float64 copy of the whole chunk (extraction's peak memory)
            m2b += (xi - mb) ** 2
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta ** 2 * (self.n * nb / n)
        self.n = n

    def var(self, ddof: int = 1) -> np.ndarray:
        if self.n <= ddof:
            raise ValueError(f"variance with ddof={ddof} needs more than {ddof} samples, got {self.n}")
        return self.m2 / (self.n - ddof)


@dataclass
class ExtractResult:
    points: tuple[str, ...]
    layers: tuple[int, ...]
    positions: int
    means: np.ndarray  # [2, P, L, K, E] float32: class means (0 = harmful)
    variances: np.ndarray  # [2, P, L, K, E] float32, ddof=1
    counts: tuple[int, int]
    template: Template  # how the prompts were rendered: the same rendering applies wherever they are reused
    metrics: Metrics = field(init=False)

    def __post_init__(self):
        self.metrics = from_moments(self.points, self.layers, self.means, self.variances)

    @property
    def directions(self) -> np.ndarray:
        """[P, L, K, E]: mean(harmful) - mean(harmless)."""
        return self.means[0] - self.means[1]

    def unit_directions(self) -> np.ndarray:
        """Directions scaled to unit length; all-zero where the classes do not differ."""
        d = self.directions
        n = np.linalg.norm(d, axis=-1, keepdims=True)
        return np.divide(d, n, out=np.zeros_like(d), where=n > 0)

    def index(self, point: str, layer: int, position: int) -> tuple[int, int, int]:
        """Array indices of (point, layer, position); position counts from the end (-1 = last token)."""
        if point not in self.points:
            raise ValueError(f"point {point!r} was not extracted ({self.points})")
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not extracted")
        if not -self.positions <= position < 0:
            raise ValueError(f"position must be in [-{self.positions}, -1], not {position}")
        return self.points.index(point), self.layers.index(layer), self.positions + position


def extract(model, harmful: Sequence[str], harmless: Sequence[str], positions: int | str = 5,
            points: Sequence[str] = ("pre", "mid", "post"), layers=None, *, template: Template = "chat",
            chunk_size: int = 16, progress: bool = False) -> ExtractResult:
    """Class means and variances of activations, and from them directions and layer metrics."""
    points = hookpoints.check_points(points)
    layers = hookpoints.check_layers(layers, model.n_layers)
    template = check_template(template)
    if positions == "suffix":
        if template != "chat":
            raise ValueError("positions='suffix' needs template='chat'")
        positions = suffix_length(model)
    harmful, harmless = prompt_list(harmful, "harmful"), prompt_list(harmless, "harmless")
    if len(harmful) < 2 or len(harmless) < 2:
        raise ValueError(f"need at least 2 prompts per class (got {len(harmful)} harmful, {len(harmless)} harmless)")
    params.integer("chunk_size", chunk_size, 1)
    moments = []
    for prompts in (harmful, harmless):
        acc = RunningMoments()
        for i in range(0, len(prompts), chunk_size):
            acc.update(model.capture(prompts[i:i + chunk_size], layers=layers, points=points, positions=positions,
                                     chat_template=template, progress=progress))
        moments.append(acc)
    return ExtractResult(
        points=points, layers=layers, positions=int(positions),
        means=np.stack([m.mean for m in moments]).astype(np.float32),
        variances=np.stack([m.var(1) for m in moments]).astype(np.float32),
        counts=(moments[0].n, moments[1].n), template=template)
