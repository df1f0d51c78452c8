"""Candidate directions and layer metrics from two classes of prompts (harmful vs harmless).

    res = pysteer.extract(m, harmful, harmless, positions=5)
    res.directions          # [points, layers, positions, n_embd]: mean(harmful) - mean(harmless)
    res.metrics.cos_sim     # [points, layers]: cosine of the two class means (last position)
    res.metrics.var_mean    # [2, points, layers]: mean over features of the per-feature variance (ddof=1)
    res.metrics.var_max     # [2, points, layers]: max over features of it;  class 0 = harmful
    res.metrics.plot("metrics.png")

Activations are read at the last ``positions`` tokens of each templated prompt: with the chat template these
are the post-instruction tokens (``<|im_end|>\\n<|im_start|>assistant\\n`` for ChatML); ``positions="suffix"``
takes exactly as many as the template puts after the user's text. Memory stays bounded: prompts are captured
in chunks and only per-class running means and squared deviations (Chan's update) are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from . import hookpoints
from ._files import atomic_output

Template = Literal["chat", "none", "newline"]
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


def format_prompts(model, prompts: Sequence[str], template: Template) -> tuple[list, bool]:
    """(prompts, chat_template flag) for capture: templated, raw, or raw + newline."""
    if template == "chat":
        return list(prompts), True
    if template == "none":
        return list(prompts), False
    if template == "newline":
        return [p + "\n" for p in prompts], False
    raise ValueError(f"template must be 'chat', 'none' or 'newline', not {template!r}")


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
class Metrics:
    """Per (point, layer) separation of the classes at the last position. Lower is better for all three."""
    points: tuple[str, ...]
    layers: tuple[int, ...]
    cos_sim: np.ndarray  # [P, L]
    var_mean: np.ndarray  # [2, P, L]
    var_max: np.ndarray  # [2, P, L]
    diff_norm: np.ndarray  # [P, L]: |mean(harmful) - mean(harmless)|

    def ranking(self) -> list[dict]:
        """(point, layer) rows sorted by the mean of their ranks in cos-sim, var-mean and var-max (the
        variances averaged over the two classes), best first. Points where the classes do not differ at all
        (e.g. the embedding of a template token both classes share) are left out."""
        keys = [self.cos_sim, self.var_mean.mean(0), self.var_max.mean(0)]
        ranks = sum(np.argsort(np.argsort(k.ravel())) for k in keys).reshape(self.cos_sim.shape) / 3.0
        rows = [{"point": p, "layer": l, "mean_rank": float(ranks[i, j]), "cos_sim": float(self.cos_sim[i, j]),
                 "var_mean": float(self.var_mean[:, i, j].mean()), "var_max": float(self.var_max[:, i, j].mean()),
                 "diff_norm": float(self.diff_norm[i, j])}
                for i, p in enumerate(self.points) for j, l in enumerate(self.layers) if self.diff_norm[i, j] > 0]
        return sorted(rows, key=lambda r: r["mean_rank"])

    def plot(self, path, *, log_var: bool = True, title: str | None = None, classes=("harmful", "harmless")):
        """Three stacked graphs against the layer: cos-sim; var-mean and var-max (one curve per class and
        point). Writes a PNG (atomically) and returns its path."""
        import pathlib

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
        x = np.asarray(self.layers)
        styles = {"pre": "-", "mid": "--", "post": ":"}
        for i, p in enumerate(self.points):
            axes[0].plot(x, self.cos_sim[i], styles.get(p, "-"), marker="o", ms=3, label=p)
            for c, name in enumerate(classes):
                color = f"C{c}"
                axes[1].plot(x, self.var_mean[c, i], styles.get(p, "-"), color=color, label=f"{name} {p}")
                axes[2].plot(x, self.var_max[c, i], styles.get(p, "-"), color=color, label=f"{name} {p}")
        axes[0].set_ylabel("cos-sim of class means")
        axes[1].set_ylabel("var-mean (mean over features)")
        axes[2].set_ylabel("var-max (max over features)")
        axes[2].set_xlabel("layer")
        if log_var:
            axes[1].set_yscale("log")
            axes[2].set_yscale("log")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=3)
        fig.suptitle(title or "layer metrics (last position): lower is better")
        fig.tight_layout()
        path = pathlib.Path(path)
        try:
            with atomic_output(path) as tmp:
                fig.savefig(tmp, dpi=110, format="png")
        finally:
            plt.close(fig)
        return path


@dataclass
class ExtractResult:
    points: tuple[str, ...]
    layers: tuple[int, ...]
    positions: int
    means: np.ndarray  # [2, P, L, K, E] float32: class means (0 = harmful)
    variances: np.ndarray  # [2, P, L, K, E] float32, ddof=1
    counts: tuple[int, int]
    template: str
    metrics: Metrics = field(init=False)

    def __post_init__(self):
        last = self.means[:, :, :, -1].astype(np.float64)  # [2, P, L, E]
        a, b = last[0], last[1]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        v = self.variances[:, :, :, -1].astype(np.float64)
        self.metrics = Metrics(self.points, self.layers, cos, v.mean(-1), v.max(-1), np.linalg.norm(a - b, axis=-1))

    @property
    def directions(self) -> np.ndarray:
        """[P, L, K, E]: mean(harmful) - mean(harmless)."""
        return self.means[0] - self.means[1]

    @property
    def norms(self) -> np.ndarray:
        return np.linalg.norm(self.directions, axis=-1)

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
    if positions == "suffix":
        if template != "chat":
            raise ValueError("positions='suffix' needs template='chat'")
        positions = suffix_length(model)
    if len(harmful) < 2 or len(harmless) < 2:
        raise ValueError(f"need at least 2 prompts per class (got {len(harmful)} harmful, {len(harmless)} harmless)")
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    moments = []
    for prompts in (harmful, harmless):
        texts, chat = format_prompts(model, prompts, template)
        acc = RunningMoments()
        for i in range(0, len(texts), chunk_size):
            acc.update(model.capture(texts[i:i + chunk_size], layers=layers, points=points, positions=positions,
                                     chat_template=chat, progress=progress))
        moments.append(acc)
    return ExtractResult(
        points=points, layers=layers, positions=int(positions),
        means=np.stack([m.mean for m in moments]).astype(np.float32),
        variances=np.stack([m.var(1) for m in moments]).astype(np.float32),
        counts=(moments[0].n, moments[1].n), template=template)
