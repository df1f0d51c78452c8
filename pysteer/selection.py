"""Choosing the refusal direction among the candidates, the rotation plane, iterative directions, and how a
direction transfers across layers.

Selection (Arditi et al.'s criteria, scored from next-token logits so no generation is needed):
  (a) refusal score on validation harmful prompts with the candidate ablated on every layer: lower is better;
  (b) refusal score on validation harmless prompts with the raw candidate added at its own layer: must rise;
  (c) first-token KL on harmless prompts under the ablation: at most ``kl_max``.
Of the candidates meeting (b) and (c), the least disruptive (lowest KL) among those whose ablation brings the
refusal score below ``ablate_max`` is chosen; see :func:`select_direction`.
The grid is points x positions x layers (the last ``skip_last`` of layers left out). On a CPU every full
score is a forward pass over the validation prompts, so the grid is narrowed first: per layer (every
``layer_step``-th), the (point, position) whose direction best separates the validation classes (effect size
of the projections, one capture); those per-layer candidates are scored by (a) on the first ``n_quick``
validation prompts, and the best ``max_candidates`` (within 1 of ``ablate_max``) by (a) and (c) on all of them
and, where (c) holds, by (b) on the first ``n_add`` harmless ones. The KL is heavy-tailed over prompts (a few sensitive-sounding harmless
prompts carry most of it), so (c) wants more harmless validation prompts than (a) and (b) do.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tqdm.auto import tqdm

from . import hookpoints, params
from .direction import Direction
from .extraction import ExtractResult, extract
from .interventions import Ablate, Add
from .judge import kl_divergence, refusal_scores_from_logits, refusal_tokens
from .runtime import Template, check_template, prompt_list


MIN_VAL = 2  # validation prompts per class a direction is chosen on, at least


@dataclass
class Candidate:
    point: str
    layer: int
    position: int
    separation: float
    ablate_score: float = math.nan  # (a) mean refusal score, val harmful, ablated
    add_score: float = math.nan  # (b) mean refusal score, val harmless, added
    kl: float = math.nan  # (c) mean first-token KL, val harmless, ablated
    passed: bool = False


def _separation(model, res: ExtractResult, harmful, harmless, points, layers) -> tuple[np.ndarray, np.ndarray]:
    """[P, L, K] effect size (Cohen's d) of the validation projections on each unit candidate, and the
    next-token logits of the validation prompts (harmful, then harmless: lists) from the same decode."""
    acts, logits = model.capture(harmful + harmless, layers=layers, points=points, positions=res.positions,
                                 chat_template=res.template, return_logits=True)
    pi = [res.points.index(p) for p in points]
    li = [res.layers.index(layer) for layer in layers]
    u = res.unit_directions()[np.ix_(pi, li)]  # [P, L, K, E]
    proj = np.einsum("npLke,pLke->npLk", acts.astype(np.float64), u.astype(np.float64))
    a, b = proj[: len(harmful)], proj[len(harmful):]
    pooled = np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / 2)
    d = np.divide(a.mean(0) - b.mean(0), pooled, out=np.full(pooled.shape, -np.inf), where=pooled > 0)
    d[np.linalg.norm(u, axis=-1) == 0] = -np.inf  # no candidate where the classes did not differ
    return d, logits[:, -1]


def _mean_score(model, prompts, tokens, template) -> tuple[float, np.ndarray]:
    logits = model.logits_batch(prompts, chat_template=template)[:, -1]
    return float(refusal_scores_from_logits(logits, tokens).mean()), logits


def choose(cands: Sequence[Candidate], ablate_max: float | None) -> tuple[Candidate, bool]:
    """The selection rule on scored candidates: of those that passed ((b) and (c)), the lowest KL among the
    ones whose ablation score is at most ``ablate_max``; failing that, the passed one with the lowest ablation
    score; failing that (none passed), the lowest KL, since a direction that breaks harmless prompts is worse
    than one that removes fewer refusals. Returns (chosen, whether any passed)."""
    if not cands:
        raise ValueError("no candidates to choose from")
    passed = [c for c in cands if c.passed]
    enough = [c for c in passed if ablate_max is not None and c.ablate_score <= ablate_max]
    if enough:
        return min(enough, key=lambda c: c.kl), True
    if passed:
        return min(passed, key=lambda c: c.ablate_score), True
    return min(cands, key=lambda c: (np.nan_to_num(c.kl, nan=np.inf), c.ablate_score)), False


def select_direction(model, res: ExtractResult, val_harmful: Sequence[str], val_harmless: Sequence[str], *,
                     points: Sequence[str] | None = None, skip_last: float = 0.2, kl_max: float = 0.1,
                     ablate_max: float | None = -2.0,
                     max_candidates: int = 4, layer_step: int = 1, n_quick: int = 8, n_add: int = 16,
                     with_interventions: Sequence = (), prompt_sets: dict | None = None,
                     verbose: bool = True, progress: bool = False) -> Direction:
    """Among the candidates whose addition raises refusal on harmless prompts and whose ablation keeps harmless
    KL <= kl_max: the one with the lowest KL whose ablation brings the validation refusal score to
    ``ablate_max`` (log-odds) or below, i.e. the least disruptive direction that removes refusal; if none
    gets there (or ``ablate_max`` is None), the one that lowers the refusal score most (Arditi et al.'s rule).
    ``with_interventions`` stay active throughout (used by iterative extraction). The scored table is in
    ``direction.scores``."""
    vh, vhl, chat = prompt_list(val_harmful, "val_harmful"), prompt_list(val_harmless, "val_harmless"), res.template
    if len(vh) < MIN_VAL or len(vhl) < MIN_VAL:
        raise ValueError(f"need at least {MIN_VAL} validation prompts per class")
    if params.number("kl_max", kl_max) < 0:
        raise ValueError(f"kl_max must be >= 0, not {kl_max!r}")
    if ablate_max is not None:
        params.number("ablate_max", ablate_max)
    points = tuple(res.points) if points is None else hookpoints.check_points(points)
    if missing := [p for p in points if p not in res.points]:
        raise ValueError(f"points {missing} were not extracted (this result has {list(res.points)}): extract them "
                         "or leave points=None")
    n_keep = max(1, int(math.ceil(model.n_layers * (1 - skip_last))))
    layers = tuple(layer for layer in res.layers if layer < n_keep)[::max(1, layer_step)]
    if not layers:
        raise ValueError(f"no extracted layer lies in the first {1 - skip_last:.0%} of the model")
    tokens = refusal_tokens(model)
    base = list(with_interventions)

    with model.steer(*base):
        sep, logits = _separation(model, res, vh, vhl, points, layers)  # [P, L, K]
    base_logits = logits[len(vh):]
    base_h = float(refusal_scores_from_logits(logits[:len(vh)], tokens).mean())
    base_hl = float(refusal_scores_from_logits(base_logits, tokens).mean())
    base_hl_add = float(refusal_scores_from_logits(base_logits[:n_add], tokens).mean())
    cands, seen = [], set()
    for j, layer in enumerate(layers):
        p, k = np.unravel_index(np.argmax(sep[:, j]), sep[:, j].shape)
        # pre of layer i+1 is post of layer i: one tensor, one candidate
        key = (hookpoints.tensor_name(model.arch, points[p], layer), int(k))
        if np.isfinite(sep[p, j, k]) and key not in seen:
            seen.add(key)
            cands.append(Candidate(points[p], layer, int(k) - res.positions, float(sep[p, j, k])))

    units = res.unit_directions()  # once: every candidate below indexes into it

    def unit(c):
        return units[res.index(c.point, c.layer, c.position)]

    def raw(c):
        return res.directions[res.index(c.point, c.layer, c.position)]

    quick, rest = vh[: max(2, n_quick)], vh[max(2, n_quick):]
    for c in tqdm(cands, desc="score (a)", disable=not progress):
        with model.steer(*base, Ablate(unit(c)), path="hook"):
            c.ablate_score, _ = _mean_score(model, quick, tokens, chat)
    ranked = sorted(cands, key=lambda c: c.ablate_score)[:max_candidates]
    # A candidate whose quick score is far from removing refusal will not be chosen: skip its costly KL.
    top = [c for c in ranked if ablate_max is None or c.ablate_score <= ablate_max + 1.0] or ranked[:1]
    for c in tqdm(top, desc="score (a, b, c)", disable=not progress):
        with model.steer(*base, Ablate(unit(c)), path="hook"):
            if rest:  # the quick prompts are scored already: add the others
                c.ablate_score = (c.ablate_score * len(quick) + _mean_score(model, rest, tokens, chat)[0]
                                  * len(rest)) / len(vh)
            logits = model.logits_batch(vhl, chat_template=chat)[:, -1]
        c.kl = float(kl_divergence(base_logits, logits).mean())
        if c.kl > kl_max:
            continue  # (b) cannot rescue it
        with model.steer(*base, Add(raw(c), layers=[c.layer], points=[c.point]), path="hook"):
            c.add_score, _ = _mean_score(model, vhl[:n_add], tokens, chat)
        c.passed = c.add_score > base_hl_add
    best, any_passed = choose(top, ablate_max)
    if not any_passed and verbose:
        print(f"pysteer: no candidate passed (KL <= {kl_max} and addition raising refusal); taking the one "
              "with the lowest KL", file=sys.stderr)
    table = [dict(c.__dict__, full=c in top, chosen=c is best) for c in sorted(cands, key=lambda c: (c not in top, c.ablate_score))]
    if verbose:
        print(format_table(table, base_h, base_hl, kl_max))
        if len(quick) < len(vh):
            print(f"(rows without add/KL: ablate(h) on the first {len(quick)} validation prompts only)")
    return Direction(
        vector=unit(best), layer=best.layer, point=best.point, position=best.position,
        norm=float(np.linalg.norm(raw(best))), arch=model.arch, n_embd=model.n_embd, n_layers=model.n_layers,
        model_file=model.path.name, model_sha256=model.sha256, operation="ablate",
        prompt_sets=dict(prompt_sets or {}, template=res.template, n_train=list(res.counts),
                         n_val=[len(val_harmful), len(val_harmless)]),
        scores={"chosen": dict(best.__dict__), "base_harmful": base_h, "base_harmless": base_hl,
                "base_harmless_add": base_hl_add,
                "kl_max": kl_max, "ablate_max": ablate_max, "candidates": table})


def format_table(rows: list[dict], base_h: float, base_hl: float, kl_max: float) -> str:
    lines = [f"refusal score (log-odds), unsteered: harmful {base_h:+.2f}, harmless {base_hl:+.2f}; ok (*): KL <= "
             f"{kl_max} and add(hl) above the unsteered harmless score",
             "point layer pos  separation  ablate(h)  add(hl)     KL  ok",
             "----- ----- ---  ----------  ---------  -------  -----  --"]
    for r in rows:
        def f(x, fmt):
            return format(x, fmt) if not math.isnan(x) else "-".rjust(len(format(0.0, fmt)))
        lines.append(f"{r['point']:>5} {r['layer']:5d} {r['position']:3d}  {r['separation']:10.2f}  "
                     f"{f(r['ablate_score'], '+9.2f')}  {f(r['add_score'], '+7.2f')}  {f(r['kl'], '5.3f')}  "
                     f"{'*' if r['passed'] else ''}{' <- chosen' if r.get('chosen') else ''}")
    return "\n".join(lines)


def rotation_plane(res: ExtractResult, direction: Direction, *, rule: str = "chosen") -> tuple[np.ndarray, np.ndarray]:
    """(b1, b2) for angular steering: b1 the chosen direction (``rule="chosen"``) or the per-layer candidate
    with the largest mean cosine to the others (``"max_mean_cos"``); b2 the first principal component of the
    per-layer candidates (at the direction's point and position), orthogonalized against b1."""
    p, _, k = res.index(direction.point, direction.layer, direction.position)
    U = res.unit_directions()[p, :, k].astype(np.float64)  # [L, E]
    if rule == "chosen":
        b1 = direction.vector.astype(np.float64)
    elif rule == "max_mean_cos":
        C = U @ U.T
        b1 = U[np.argmax((C.sum(1) - 1) / (len(U) - 1))]
    else:
        raise ValueError(f"rule must be 'chosen' or 'max_mean_cos', not {rule!r}")
    b1 = b1 / np.linalg.norm(b1)
    _, _, vt = np.linalg.svd(U - U.mean(0), full_matrices=False)
    for pc in vt:
        w = pc - (pc @ b1) * b1
        if np.linalg.norm(w) > 1e-3:
            return b1.astype(np.float32), (w / np.linalg.norm(w)).astype(np.float32)
    raise ValueError("the per-layer candidates do not span a plane with b1")


def iterative_directions(model, harmful: Sequence[str], harmless: Sequence[str], val_harmful: Sequence[str],
                         val_harmless: Sequence[str], *, max_directions: int = 3, positions: int | str = 5,
                         points: Sequence[str] = ("pre", "mid", "post"), template: Template = "chat",
                         min_gain: float = 0.1, verbose: bool = True, **select_kw) -> list[Direction]:
    """r1 from the model, r2 from the model with r1 ablated, ...; stops when ablating the next direction too
    lowers the validation refusal score by less than ``min_gain``. Ablate all of them together with
    ``pysteer.Ablate(np.stack([d.vector for d in dirs]))``."""
    dirs: list[Direction] = []
    tokens = refusal_tokens(model)
    vh, chat = prompt_list(val_harmful, "val_harmful"), check_template(template)
    vhl = prompt_list(val_harmless, "val_harmless")
    harmful, harmless = prompt_list(harmful, "harmful"), prompt_list(harmless, "harmless")  # read once a round
    with model.steer():
        best, _ = _mean_score(model, vh, tokens, chat)
    for _ in range(max_directions):
        given = [Ablate(np.stack([d.vector for d in dirs]))] if dirs else []
        with model.steer(*given, path="hook"):
            res = extract(model, harmful, harmless, positions=positions, points=points, template=chat)
        d = select_direction(model, res, vh, vhl, with_interventions=given, verbose=verbose,
                             **select_kw)
        with model.steer(Ablate(np.stack([x.vector for x in dirs + [d]])), path="hook"):
            score, _ = _mean_score(model, vh, tokens, chat)
        if verbose:
            print(f"direction {len(dirs) + 1}: ablating {len(dirs) + 1} gives refusal score {score:+.2f} "
                  f"(before {best:+.2f})", file=sys.stderr)
        if dirs and best - score < min_gain:
            break
        d.scores["iterative_score"] = score
        dirs.append(d)
        best = score
    return dirs


def transfer(model, direction: Direction, val_harmful: Sequence[str], *, layer_sets: dict | None = None,
             res: ExtractResult | None = None, n_lowest: int = 5, template: Template | None = None) -> dict[str, float]:
    """Mean refusal score on ``val_harmful`` when ablating ``direction`` on each layer set (all layers;
    every other layer from its own; each single layer; the ``n_lowest`` layers by cos-sim when ``res`` is
    given). Keys name the sets; ``"none"`` is unsteered. Prompts are rendered with ``template`` (default:
    ``res``'s, else the direction's, else the chat template)."""
    n = model.n_layers
    sets = dict(layer_sets or {})
    if not layer_sets:
        sets["all"] = list(range(n))
        sets[f"range({direction.layer}, {n}, 2)"] = list(range(direction.layer, n, 2))
        if res is not None:
            p = res.points.index(direction.point) if direction.point in res.points else 0
            order = np.argsort(res.metrics.cos_sim[p])[:n_lowest]
            sets[f"lowest cos-sim {n_lowest}"] = sorted(res.layers[i] for i in order)
        for i in range(n):
            sets[f"layer {i}"] = [i]
    tokens = refusal_tokens(model)
    if template is None:
        template = res.template if res is not None else direction.prompt_sets.get("template", "chat")
    vh, chat = prompt_list(val_harmful, "val_harmful"), check_template(template)
    out = {}
    with model.steer():
        out["none"], _ = _mean_score(model, vh, tokens, chat)
    for name, layers in sets.items():
        with model.steer(Ablate(direction.vector, layers=layers), path="hook"):
            out[name], _ = _mean_score(model, vh, tokens, chat)
    return out
