"""The quick per-layer look at a model: how far apart harmful and harmless prompts sit in each layer."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from . import hookpoints


def quick_prompts() -> tuple[list[str], list[str]]:
    data = json.loads((pathlib.Path(__file__).parent / "data" / "quick.json").read_text())
    return data["harmful"], data["harmless"]


def layer_summary(model, harmful, harmless, *, positions: int = 1, progress: bool = False) -> dict:
    """Per point and layer, at the last token: mean activation norm, cosine of the two class means, and the
    norm of their difference (the candidate direction's length)."""
    t0 = time.perf_counter()
    acts = model.capture(list(harmful) + list(harmless), points=hookpoints.POINTS, positions=positions,
                         progress=progress)
    seconds = time.perf_counter() - t0
    last = acts[:, :, :, -1, :].astype(np.float64)  # [N, P, L, E]
    a, b = last[: len(harmful)].mean(0), last[len(harmful):].mean(0)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {
        "model": model.path.name, "arch": model.arch, "n_layers": model.n_layers, "n_embd": model.n_embd,
        "n_prompts": len(harmful) + len(harmless), "capture_seconds": seconds,
        "points": list(hookpoints.POINTS),
        "norm": np.linalg.norm(last, axis=-1).mean(0).tolist(),  # [P, L]
        "cos_sim": cos.tolist(),  # [P, L]
        "diff_norm": np.linalg.norm(a - b, axis=-1).tolist(),  # [P, L]
    }


def format_summary(s: dict) -> str:
    points = s["points"]
    head = f"{s['model']} ({s['arch']}, {s['n_layers']} layers, n_embd {s['n_embd']}): " \
           f"{s['n_prompts']} prompts captured in {s['capture_seconds']:.1f} s"
    cols = "layer | " + " | ".join(f"{p:>4} norm  cos(h,hl)  |Δμ|" for p in points)
    lines = [head, "", cols, "-" * len(cols)]
    for l in range(s["n_layers"]):
        cells = [f"{s['norm'][p][l]:9.2f}  {s['cos_sim'][p][l]:9.4f}  {s['diff_norm'][p][l]:6.2f}"
                 for p in range(len(points))]
        lines.append(f"{l:5d} | " + " | ".join(cells))
    best = int(np.argmin(s["cos_sim"][points.index("post")][: max(1, int(0.8 * s["n_layers"]))]))
    lines += ["", f"lowest post cos-sim in the first 80% of layers: layer {best} "
                  f"(a first guess at where a refusal direction separates best)"]
    return "\n".join(lines)
