"""The end-to-end jobs behind the CLI, each returning a report: a quick per-layer look (summary), find a
refusal direction (extract, then select), test what ablating it does (ablate-test), and sweep a steering
strength.
"""

from __future__ import annotations

import json
import pathlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import hookpoints
from .datasets import PromptSplits
from .direction import Direction
from .extraction import ExtractResult, extract
from .interventions import Ablate
from .judge import Damage, Judged, damage, judge, kl_divergence, spread
from .metrics import class_mean_metrics
from .runtime import prompt_list
from .selection import rotation_plane, select_direction


# -- summary: a quick per-layer look ---------------------------------------------------------------------------

def quick_prompts() -> tuple[list[str], list[str]]:
    data = json.loads((pathlib.Path(__file__).parent / "data" / "quick.json").read_text())
    return data["harmful"], data["harmless"]


def layer_summary(model, harmful, harmless, *, progress: bool = False) -> dict:
    """Per point and layer, at the last token: mean activation norm, cosine of the two class means, and the
    norm of their difference (the candidate direction's length), as extraction's metrics define them."""
    t0 = time.perf_counter()
    prompts = prompt_list(harmful, "harmful") + prompt_list(harmless, "harmless")
    acts = model.capture(prompts, points=hookpoints.POINTS, positions=1,
                         progress=progress)
    seconds = time.perf_counter() - t0
    last = acts[:, :, :, -1, :].astype(np.float64)  # [N, P, L, E]
    cos, diff = class_mean_metrics(last[: len(harmful)].mean(0), last[len(harmful):].mean(0))
    return {
        "model": model.path.name, "arch": model.arch, "n_layers": model.n_layers, "n_embd": model.n_embd,
        "n_prompts": len(harmful) + len(harmless), "capture_seconds": seconds,
        "points": list(hookpoints.POINTS),
        "norm": np.linalg.norm(last, axis=-1).mean(0).tolist(),  # [P, L]
        "cos_sim": cos.tolist(),  # [P, L]
        "diff_norm": diff.tolist(),  # [P, L]
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


# -- find a direction ------------------------------------------------------------------------------------------

def find_direction(model, splits: PromptSplits, *, positions: int | str = 5, points=("pre", "mid", "post"),
                   max_candidates: int = 10, layer_step: int = 2, kl_max: float = 0.1, metrics_png=None,
                   verbose: bool = True, progress: bool = False,
                   prompt_sets: dict | None = None) -> tuple[Direction, ExtractResult, dict]:
    """Extract on the train split, choose on the validation split (every ``layer_step``-th layer, to keep a
    CPU run in minutes), with its rotation plane; returns (direction, ExtractResult, seconds per stage)."""
    t0 = time.perf_counter()
    res = extract(model, *splits.train, positions=positions, points=points, progress=progress)
    t1 = time.perf_counter()
    if metrics_png is not None:
        res.metrics.plot(metrics_png, title=f"{model.path.name}: layer metrics")
    d = select_direction(model, res, *splits.val, max_candidates=max_candidates, layer_step=layer_step, kl_max=kl_max,
                         verbose=verbose, progress=progress, prompt_sets=prompt_sets)
    d.b2 = rotation_plane(res, d)[1]
    return d, res, {"extract": round(t1 - t0, 1), "select": round(time.perf_counter() - t1, 1)}


# -- ablate-test -----------------------------------------------------------------------------------------------

#: Tokens per answer when judging refusals: long enough for refusals that come after a compliant opening (the
#: length curve in BENCHMARKS.md).
MAX_TOKENS = 128

@dataclass
class AblationReport:
    """Base vs steered answers on held-out harmful and harmless prompts."""
    harmful: Sequence[str]
    harmless: Sequence[str]
    base_harmful: Judged
    steered_harmful: Judged
    base_harmless: Judged
    steered_harmless: Judged
    harmless_kl: float | Sequence[float]  # first-token KL per harmless prompt (or only its mean)
    seconds: dict = field(default_factory=dict)
    direction: dict = field(default_factory=dict)
    damage: Damage | None = None  # teacher-forced along the unsteered harmless answers

    def summary(self, *, answers: bool = False) -> dict:
        """Counts, rates with 95% intervals, KL spreads; with ``answers``, every answer and its verdicts."""
        base_refused = [i for i, r in enumerate(self.base_harmful.refused) if r]
        still = [i for i in base_refused if self.steered_harmful.refused[i]]
        kl = np.atleast_1d(np.asarray(self.harmless_kl, np.float64))
        harmless = {"base": self.base_harmless.summary(), "steered": self.steered_harmless.summary(),
                    "first_token_kl": float(kl.mean()), "first_token_kl_spread": spread(kl, self.harmless)
                    if kl.size == len(self.harmless) else None}
        if self.damage is not None:
            harmless["damage"] = self.damage.summary(self.harmless)
        out = {
            "direction": self.direction,
            "harmful": {"base": self.base_harmful.summary(), "steered": self.steered_harmful.summary(),
                        "base_refused": len(base_refused), "still_refused_after_steering": len(still),
                        "refusal_rate_among_base_refused": len(still) / max(len(base_refused), 1)},
            "harmless": harmless,
            "seconds": self.seconds,
        }
        if answers:
            out["answers"] = {
                "harmful": [_verdicts(p, self.base_harmful, self.steered_harmful, i)
                            for i, p in enumerate(self.harmful)],
                "harmless": [dict(_verdicts(p, self.base_harmless, self.steered_harmless, i),
                                  first_token_kl=float(kl[i]) if kl.size == len(self.harmless) else None,
                                  token_kl=self.damage.kl[i] if self.damage else None)
                             for i, p in enumerate(self.harmless)]}
        return out


def _verdicts(prompt, base: Judged, steered: Judged, i: int) -> dict:
    out = {"prompt": prompt, "base": base.answers[i], "steered": steered.answers[i],
           "base_refused": base.refused[i], "steered_refused": steered.refused[i],
           "steered_coherent": steered.coherent[i], "steered_perplexity": steered.perplexity[i],
           "base_matched": base.matched[i], "steered_matched": steered.matched[i]}
    if steered.judge_p is not None:
        out.update(base_judge_p=base.judge_p[i], steered_judge_p=steered.judge_p[i])
    return out


def ablation_test(model, direction: Direction | None, harmful: Sequence[str], harmless: Sequence[str], *,
                  layers=None, max_tokens: int | None = None, markers: str = "pysteer", judge_model=None,
                  intervention=None, progress: bool = False) -> AblationReport:
    """Generate base and ablated answers for held-out prompts (each stops at its end of turn); judge them by the
    phrase matcher ``markers`` and, given ``judge_model`` (a :class:`pysteer.llm_judge.Judge`), by the judge
    (perplexity under the unsteered model); on the harmless ones, first-token KL and the damage along the base
    answers (teacher-forced KL, ablated perplexity). ``intervention`` (e.g. the BlockAblate pysteer optimize
    chose) is tested instead of ablating ``direction`` (then None)."""
    if intervention is None:
        if direction is None:
            raise ValueError("ablation_test needs a direction or an intervention")
        direction.check(model)
    max_tokens = MAX_TOKENS if max_tokens is None else max_tokens
    t = {}
    t0 = time.perf_counter()
    base_h = model.generate_batch(harmful, max_tokens=max_tokens, progress=progress)
    base_hl, base_logits = model.generate_batch(harmless, max_tokens=max_tokens, progress=progress,
                                                return_logits=True)
    t["generate_base"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ablate = Ablate(direction.vector, layers=layers) if intervention is None else intervention
    with model.steer(ablate) as s:
        ab_h = model.generate_batch(harmful, max_tokens=max_tokens, progress=progress)
        ab_hl, ab_logits = model.generate_batch(harmless, max_tokens=max_tokens, progress=progress,
                                                return_logits=True)
        path = s.paths[0]
    t["generate_ablated"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The unsteered model's own greedy answers need no perplexity check; the ablated ones are scored by it.
    kw = dict(markers=markers, judge_model=judge_model)
    judged = [judge(model, harmful, base_h, perplexity=False, **kw), judge(model, harmful, ab_h, **kw),
              judge(model, harmless, base_hl, perplexity=False, **kw), judge(model, harmless, ab_hl, **kw)]
    t["judge"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cost = damage(model, harmless, base_hl, [ablate])
    t["damage"] = time.perf_counter() - t0
    kl = kl_divergence(base_logits, ab_logits).tolist()
    ablated = "all" if layers is None else list(hookpoints.check_layers(layers, model.n_layers))
    info = ({"point": direction.point, "layer": direction.layer, "position": direction.position,
             "ablated_layers": ablated, "path": path} if intervention is None else
            {"intervention": repr(intervention), "path": path})
    return AblationReport(list(harmful), list(harmless), *judged, harmless_kl=kl,
                          seconds={k: round(v, 1) for k, v in t.items()}, direction=info, damage=cost)


def format_report(r: AblationReport, *, width: int = 46) -> str:
    """Side-by-side table of prompts and answers (truncated), then the counts."""
    def cut(text):
        return _cut(text, width)

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
    lines += _disagreement_lines(r, width)
    s = r.summary()
    h, hl = s["harmful"], s["harmless"]
    lines += [
        _what_line(s["direction"]),
        f"harmful : base refused {h['base']['refused']}/{h['base']['n']}; ablated refused "
        f"{h['steered']['refused']}/{h['steered']['n']}; of the {h['base_refused']} the base refused, "
        f"{h['still_refused_after_steering']} still refused ({h['refusal_rate_among_base_refused']:.1%}); "
        f"ablated coherent {h['steered']['coherent']}/{h['steered']['n']}",
        f"harmless: base refused {hl['base']['refused']}/{hl['base']['n']}; ablated refused "
        f"{hl['steered']['refused']}/{hl['steered']['n']}; ablated coherent {hl['steered']['coherent']}/"
        f"{hl['steered']['n']}; first-token KL {hl['first_token_kl']:.3f}",
        *_sureness_lines(s),
        "seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()),
    ]
    return "\n".join(lines)


# -- sweep -----------------------------------------------------------------------------------------------------

def sweep(model, make: Callable[[float], object], values: Sequence[float], prompts: Sequence[str], *,
          max_tokens: int = 48, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Refusal and coherence of answers to ``prompts`` with intervention ``make(v)`` for each value."""
    rows = []
    for v in values:
        with model.steer(make(v)):
            answers = model.generate_batch(prompts, max_tokens=max_tokens)
        j = judge(model, prompts, answers)
        rows.append({"value": v, "refused": j.n_refused, "coherent": j.n_coherent, "n": j.n})
        if on_row is not None:
            on_row(rows[-1])
    return rows


def format_sweep(rows: list[dict], what: str) -> str:
    lines = [f"| {what} | refusal rate | coherence rate | refused | coherent | n |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['value']:g} | {r['refused'] / r['n']:.2f} | {r['coherent'] / r['n']:.2f} | "
                     f"{r['refused']} | {r['coherent']} | {r['n']} |")
    return "\n".join(lines)


def _what_line(d: dict) -> str:
    if "intervention" in d:
        return f"edit: {d['intervention']} ({d['path']})"
    return (f"direction: {d['point']} of layer {d['layer']}, position {d['position']}, ablated on "
            f"{d['ablated_layers']} layers ({d['path']})")


def _disagreement_lines(r: AblationReport, width: int) -> list[str]:
    """Answers where the phrase matcher and the judge model disagree (nothing without a judge)."""
    if r.base_harmful.judge_p is None:
        return []
    rows = []
    for title, prompts, parts in (("harmful", r.harmful, (("base", r.base_harmful), ("ablated", r.steered_harmful))),
                                  ("harmless", r.harmless, (("base", r.base_harmless), ("ablated", r.steered_harmless)))):
        for which, j in parts:
            for i in j.disagreements:
                rows.append(f"{title:8} {which:7} | judge p={j.judge_p[i]:.2f} {'R' if j.refused[i] else '-'} | "
                            f"{j.markers} {'R' if j.matched[i] else '-'} | {_cut(prompts[i], 30):<30} | "
                            f"{_cut(j.answers[i], width + 30)}")
    head = f"== phrase matcher ({r.base_harmful.markers}) and judge disagree on {len(rows)} answers"
    return [head] + rows + [""]


def _sureness_lines(s: dict) -> list[str]:
    """The report's intervals and spreads, one line each."""
    h, hl = s["harmful"], s["harmless"]

    def ci(part):
        lo, hi = part["refusal_rate_ci95"]
        return f"{part['refusal_rate']:.0%} [{lo:.0%}, {hi:.0%}]"

    by = h["base"]["refused_by"]
    lines = [f"refusals by {by}" + (f" (phrase matcher: harmful base {h['base']['matched']}, ablated "
                                    f"{h['steered']['matched']}; harmless base {hl['base']['matched']}, ablated "
                                    f"{hl['steered']['matched']})" if "matched" in h["base"] else "")]
    if by.startswith("markers"):  # pysteer's matcher found 9 of 63 hand-labelled ablated refusals (BENCHMARKS)
        lines.append("a phrase matcher's count is a lower bound on ablated models: it misses deflections (answers "
                     "that do something harmless instead); read the ablated answers above, or count them with "
                     "--judge self --probe (README: Deflections)")
    lines += [f"refusal rate (95% interval): harmful base {ci(h['base'])}, ablated {ci(h['steered'])}; "
             f"harmless base {ci(hl['base'])}, ablated {ci(hl['steered'])}"]
    sp = hl.get("first_token_kl_spread")
    if sp:
        lines.append(f"first-token KL over harmless prompts: median {sp['median']:.3f}, p90 {sp['p90']:.3f}, "
                     f"max {sp['max']:.3f} ({_cut(sp.get('max_prompt', ''), 50)!r})")
    d = hl.get("damage")
    if d:
        t = d["token_kl"]
        lines.append(f"damage along the base harmless answers ({d['tokens']} tokens, teacher-forced): per-token KL "
                     f"mean {t['mean']:.3f}, median {t['median']:.3f}, p90 {t['p90']:.3f}, max {t['max']:.3f}; "
                     f"ablated perplexity median {d['perplexity_median']:.2f}")
    return lines


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"
