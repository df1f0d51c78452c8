"""Layer metrics: how far apart two classes of prompts sit at each (point, layer), from their means and
variances at the last position. Lower is better for all three:

    cos_sim   [P, L]     cosine of the two class means
    var_mean  [2, P, L]  mean over features of the per-class variance (ddof=1); class 0 = harmful
    var_max   [2, P, L]  max over features of it
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of a and b along the last axis (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def class_mean_metrics(mean_a: np.ndarray, mean_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cosine of the class means, norm of their difference) along the last axis: the one definition that
    extraction and the per-layer summary share."""
    a, b = np.asarray(mean_a, np.float64), np.asarray(mean_b, np.float64)
    return cosine(a, b), np.linalg.norm(a - b, axis=-1)


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
        from .figures import metrics_figure

        return metrics_figure(self, path, log_var=log_var, title=title, classes=classes)


def from_moments(points, layers, means: np.ndarray, variances: np.ndarray) -> Metrics:
    """Metrics at the last position from class means and variances ``[2, P, L, K, E]``."""
    last = means[:, :, :, -1].astype(np.float64)  # [2, P, L, E]
    cos, diff = class_mean_metrics(last[0], last[1])
    v = variances[:, :, :, -1].astype(np.float64)
    return Metrics(tuple(points), tuple(layers), cos, v.mean(-1), v.max(-1), diff)
