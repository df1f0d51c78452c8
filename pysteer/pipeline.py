"""The end-to-end jobs behind the CLI: find a refusal direction, and test what ablating it does."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import datasets
from .direction import Direction
from .directions import extract
from .evaluate import AblationReport, judge
from .interventions import Ablate
from .scoring import kl_divergence
from .selection import select_direction


@dataclass
class PromptSplits:
    train: tuple[list[str], list[str]]
    val: tuple[list[str], list[str]]
    test: tuple[list[str], list[str]]

    @classmethod
    def load(cls, harmful: str = "harmful", harmless: str = "harmless", *, n_train: int = 64, n_val: int = 16,
             n_val_harmless: int | None = 32, n_test: int = 32, seed: int = 0) -> "PromptSplits":
        """``n_val_harmless`` (default 32; None: ``n_val``) is larger because the KL criterion is estimated there."""
        def part(split, n, n_hl=None):
            return (datasets.load(harmful, split, seed=seed)[:n],
                    datasets.load(harmless, split, seed=seed)[:n if n_hl is None else n_hl])
        return cls(part("train", n_train), part("val", n_val, n_val_harmless), part("test", n_test))


def find_direction(model, splits: PromptSplits, *, positions: int | str = 5, points=("pre", "mid", "post"),
                   max_candidates: int = 10, layer_step: int = 2, kl_max: float = 0.1, metrics_png=None,
                   verbose: bool = True,
                   progress: bool = False, prompt_sets: dict | None = None) -> tuple[Direction, object]:
    """Extract on the train split, choose on the validation split (every ``layer_step``-th layer, to keep a
    CPU run in minutes); returns (direction, ExtractResult)."""
    t0 = time.perf_counter()
    res = extract(model, *splits.train, positions=positions, points=points, progress=progress)
    t1 = time.perf_counter()
    if metrics_png is not None:
        res.metrics.plot(metrics_png, title=f"{model.path.name}: layer metrics")
    d = select_direction(model, res, *splits.val, max_candidates=max_candidates, layer_step=layer_step, kl_max=kl_max,
                         verbose=verbose, progress=progress, prompt_sets=prompt_sets)
    d.scores["seconds"] = {"extract": round(t1 - t0, 1), "select": round(time.perf_counter() - t1, 1)}
    return d, res


def ablation_test(model, direction: Direction, harmful: Sequence[str], harmless: Sequence[str], *,
                  layers=None, max_tokens: int = 48, progress: bool = False) -> AblationReport:
    """Generate base and ablated answers for held-out prompts; judge them (perplexity under the unsteered
    model); first-token KL on the harmless ones."""
    direction.check(model)
    t = {}
    t0 = time.perf_counter()
    base_h = model.generate_batch(harmful, max_tokens=max_tokens, progress=progress)
    base_hl, base_logits = model.generate_batch(harmless, max_tokens=max_tokens, progress=progress,
                                                return_logits=True)
    t["generate_base"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with model.steer(Ablate(direction.vector, layers=layers)) as s:
        ab_h = model.generate_batch(harmful, max_tokens=max_tokens, progress=progress)
        ab_hl, ab_logits = model.generate_batch(harmless, max_tokens=max_tokens, progress=progress,
                                                return_logits=True)
        path = s.paths[0]
    t["generate_ablated"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The unsteered model's own greedy answers need no perplexity check; the ablated ones are scored by it.
    judged = [judge(model, harmful, base_h, perplexity=False), judge(model, harmful, ab_h),
              judge(model, harmless, base_hl, perplexity=False), judge(model, harmless, ab_hl)]
    t["judge"] = time.perf_counter() - t0
    kl = float(np.mean(kl_divergence(base_logits, ab_logits)))
    info = {"point": direction.point, "layer": direction.layer, "position": direction.position,
            "ablated_layers": "all" if layers is None else list(layers), "path": path}
    return AblationReport(list(harmful), list(harmless), *judged, harmless_kl=kl,
                          seconds={k: round(v, 1) for k, v in t.items()}, direction=info)


def format_report(r: AblationReport, *, width: int = 46) -> str:
    """Side-by-side table of prompts and answers (truncated), then the counts."""
    def cut(s):
        s = " ".join(s.split())
        return (s[: width - 1] + "\u2026") if len(s) > width else s

    def mark(j, i):
        return ("R" if j.refused[i] else "-") + ("" if j.coherent[i] else "?")

    lines = []
    for title, prompts, base, steered in (("harmful (held out)", r.harmful, r.base_harmful, r.steered_harmful),
                                          ("harmless (held out)", r.harmless, r.base_harmless, r.steered_harmless)):
        lines += [f"== {title}: R = refusal, ? = incoherent",
                  f"{'prompt':<{width}} | {'base answer':<{width + 3}} | ablated answer"]
        for i, p in enumerate(prompts):
            lines.append(f"{cut(p):<{width}} | {mark(base, i):<2} {cut(base.answers[i]):<{width}} | "
                         f"{mark(steered, i):<2} {cut(steered.answers[i])}")
        lines.append("")
    s = r.summary()
    h, hl = s["harmful"], s["harmless"]
    lines += [
        f"direction: {s['direction']['point']} of layer {s['direction']['layer']}, position "
        f"{s['direction']['position']}, ablated on {s['direction']['ablated_layers']} layers ({s['direction']['path']})",
        f"harmful : base refused {h['base']['refused']}/{h['base']['n']}; ablated refused "
        f"{h['steered']['refused']}/{h['steered']['n']}; of the {h['base_refused']} the base refused, "
        f"{h['still_refused_after_steering']} still refused ({h['refusal_rate_among_base_refused']:.1%}); "
        f"ablated coherent {h['steered']['coherent']}/{h['steered']['n']}",
        f"harmless: base refused {hl['base']['refused']}/{hl['base']['n']}; ablated refused "
        f"{hl['steered']['refused']}/{hl['steered']['n']}; ablated coherent {hl['steered']['coherent']}/"
        f"{hl['steered']['n']}; first-token KL {hl['first_token_kl']:.3f}",
        "seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()),
    ]
    return "\n".join(lines)
