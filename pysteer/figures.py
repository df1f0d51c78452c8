"""Every figure pysteer draws (matplotlib stays here, out of the numeric modules). Each writes the format its
path's suffix names (.png, .svg, .pdf...; PNG without one) atomically and returns its path."""

from __future__ import annotations

import pathlib
from contextlib import contextmanager

import numpy as np

from .files import atomic_output


def figure_format(path) -> str:
    """The image format ``path``'s suffix names ("png" without one); ValueError for one matplotlib cannot write."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = pathlib.Path(path).suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise ValueError(f"{path}: matplotlib cannot write .{suffix} figures; name a .png file (or one of "
                         f"{', '.join('.' + f for f in sorted(formats))})")
    return suffix or "png"


@contextmanager
def _figure(path, **kw):
    """A new figure, saved to ``path`` (whole or not at all) when the block succeeds, always closed."""
    fmt = figure_format(path)  # before drawing; and the temporary file's suffix (.tmp) names no format
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**kw)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    finally:
        plt.close(fig)


def metrics_figure(m, path, *, log_var: bool = True, title: str | None = None,
                   classes=("harmful", "harmless")) -> pathlib.Path:
    """Layer metrics (pysteer.metrics.Metrics): cos-sim; var-mean; var-max, stacked against the layer."""
    path = pathlib.Path(path)
    with _figure(path, nrows=3, ncols=1, figsize=(9, 10), sharex=True) as (fig, axes):
        x = np.asarray(m.layers)
        styles = {"pre": "-", "mid": "--", "post": ":"}
        for i, p in enumerate(m.points):
            axes[0].plot(x, m.cos_sim[i], styles.get(p, "-"), marker="o", ms=3, label=p)
            for c, name in enumerate(classes):
                axes[1].plot(x, m.var_mean[c, i], styles.get(p, "-"), color=f"C{c}", label=f"{name} {p}")
                axes[2].plot(x, m.var_max[c, i], styles.get(p, "-"), color=f"C{c}", label=f"{name} {p}")
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
    return path


def sweep_figure(rows: list[dict], what: str, path) -> pathlib.Path:
    """Refusal and coherence rates against the swept value (rows of value, refused, coherent, n)."""
    path = pathlib.Path(path)
    with _figure(path, figsize=(8, 4)) as (fig, ax):
        x = [r["value"] for r in rows]
        ax.plot(x, [r["refused"] / r["n"] for r in rows], "o-", label="refusal rate")
        ax.plot(x, [r["coherent"] / r["n"] for r in rows], "s--", label="coherence rate")
        ax.set_xlabel(what)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend()
    return path


def transfer_figure(scores_by_source: dict[int, dict[str, float]], n_layers: int, path) -> pathlib.Path:
    """Heat map: source layer (rows) x single ablated layer (columns), refusal score."""
    path = pathlib.Path(path)
    rows = sorted(scores_by_source)
    M = np.array([[scores_by_source[s].get(f"layer {i}", np.nan) for i in range(n_layers)] for s in rows])
    with _figure(path, figsize=(10, 1 + 0.4 * len(rows))) as (fig, ax):
        im = ax.imshow(M, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(rows)), [f"from layer {s}" for s in rows])
        ax.set_xlabel("ablated layer (single)")
        fig.colorbar(im, ax=ax, label="refusal score on val harmful")
    return path


def pareto_figure(fronts: dict, path, *, trials: dict | None = None, chosen: dict | None = None,
                  title: str | None = None) -> pathlib.Path:
    """Refusals against first-token KL: each labelled front (lists of {"refusals", "kl"}) as a step line, all
    trials of each label as faint dots, the chosen point starred."""
    path = pathlib.Path(path)
    with _figure(path, figsize=(7, 5)) as (fig, ax):
        for i, (label, front) in enumerate(fronts.items()):
            color = f"C{i}"
            for t in (trials or {}).get(label, []):
                ax.plot(t["kl"], t["refusals"], ".", color=color, alpha=0.25)
            pts = sorted((t["kl"], t["refusals"]) for t in front)
            if pts:
                ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=color, marker="o", label=label)
        if chosen is not None:
            ax.plot(chosen["kl"], chosen["refusals"], "*", color="k", ms=14, label="chosen")
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("first-token KL on harmless prompts (lower is better)")
        ax.set_ylabel("refusals on harmful prompts (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title)
    return path
