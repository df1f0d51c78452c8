"""Automatic abliteration: a two-objective search (Optuna's TPE) over heretic's parameter space, every trial
run at runtime on the loaded GGUF (:class:`pysteer.BlockAblate`, no file written per trial).

A trial's parameters (heretic's, plus the residual point the candidates are read at):
- ``scope``: "global" (one direction: the candidates of the two layers around ``direction_index``,
  interpolated and normalized) or "per layer" (layer l edited along its own candidate);
- ``direction_index`` in [0.4, 0.9] x (n_layers - 1), ``projected``: the candidate's component along the
  harmless mean removed;
- per component c (attn: attention output, ffn: FFN down projection) a weight kernel over layers:
  ``max_weight`` in [0.8, 1.5] at ``max_weight_position`` in [0.6, 1] x (n_layers - 1), falling linearly to
  ``min_weight = min_weight_frac x max_weight`` at ``min_weight_distance`` in [1, 0.6 (n_layers - 1)] layers,
  0 beyond: layer l's matrix gets ``W <- W - w_l r_l r_l^T W``;
- ``point``: pre, mid or post (the candidates are class-mean differences at the last token there; post unless
  the search is given several);
- ``preserve_norms``: the row-norm-preserving edit (heretic's "full" row normalization, :mod:`pysteer.rownorms`)
  instead of the plain one; searched, or fixed by ``search(preserve_norms=...)``;
- ``read_out`` (pysteer's own, plain edits only, with ``search(read_out=True)``): the harmless weight alpha in
  [0.1, 100] (log) of the fitted read-outs ``y <- y - w r (b . y)`` (:mod:`pysteer.readout`).
Objectives: refusals among the validation harmful prompts (the phrase matcher on the first ``trial_tokens``
tokens of each greedy answer), and the mean first-token KL(unsteered || trial) on the validation harmless
prompts; the sampler minimizes heretic's scores of the two (:func:`scores`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import pathlib
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from . import params as check
from .extraction import ExtractResult
from .hookpoints import PLAIN_SUM_ARCHS, check_points
from .interventions import BlockAblate
from .judge import kl_divergence
from .runtime import prompt_list
from .markers import marker_set
from .readout import RIDGE, WriteSamples
from .rownorms import WriteGeometry

SCOPES = ("global", "per layer")
COMPONENTS = ("attn", "ffn")


class Unscorable(ValueError):
    """A point the search cannot score (its global candidate is zero, or its edit breaks the logits): its trial
    fails alone and the search goes on. Any other error stops the search."""


@dataclass(frozen=True)
class Kernel:
    """A component's weight over layers."""
    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weights(self, n_layers: int) -> np.ndarray:
        d = np.abs(np.arange(n_layers) - self.max_weight_position)
        w = self.max_weight + d / self.min_weight_distance * (self.min_weight - self.max_weight)
        return np.where(d <= self.min_weight_distance, w, 0.0)


@dataclass(frozen=True)
class Point:
    """One point of the search space."""
    scope: str
    direction_index: float
    projected: bool
    point: str
    attn: Kernel
    ffn: Kernel
    preserve_norms: bool = False
    read_out: float = 0.0  # alpha of the fitted read-outs; 0: the plain edit reads r

    @classmethod
    def from_params(cls, p: dict) -> "Point":
        """From an Optuna trial's parameters (see :func:`suggest`)."""
        kern = {c: Kernel(p[f"{c}.max_weight"], p[f"{c}.max_weight_position"],
                          p[f"{c}.min_weight_frac"] * p[f"{c}.max_weight"], p[f"{c}.min_weight_distance"])
                for c in COMPONENTS}
        return cls(p["scope"], p["direction_index"], p["projected"], p["point"], kern["attn"], kern["ffn"],
                   p.get("preserve_norms", False), p.get("read_out", 0.0))


READ_OUT_RANGE = (0.1, 100.0)


def suggest(trial, n_layers: int, points: Sequence[str], norm_modes: Sequence[bool] = (False,),
            projected_modes: Sequence[bool] = (False, True), read_out: bool = False) -> Point:
    """Draw a :class:`Point` from an Optuna trial (``norm_modes``, ``projected_modes``: the values
    ``preserve_norms`` and ``projected`` may take; ``read_out``: draw the read-outs' alpha for plain edits)."""
    last = n_layers - 1
    trial.suggest_categorical("scope", SCOPES)
    trial.suggest_float("direction_index", 0.4 * last, 0.9 * last)
    trial.suggest_categorical("projected", tuple(projected_modes))
    trial.suggest_categorical("point", tuple(points))
    if not trial.suggest_categorical("preserve_norms", tuple(norm_modes)) and read_out:
        trial.suggest_float("read_out", *READ_OUT_RANGE, log=True)
    for c in COMPONENTS:
        trial.suggest_float(f"{c}.max_weight", 0.8, 1.5)
        trial.suggest_float(f"{c}.max_weight_position", 0.6 * last, 1.0 * last)
        trial.suggest_float(f"{c}.min_weight_frac", 0.0, 1.0)
        trial.suggest_float(f"{c}.min_weight_distance", 1.0, max(1.0, 0.6 * last))
    return Point.from_params(trial.params)


class Candidates:
    """Per point and layer, the unit refusal direction at the last token and the unit harmless mean."""

    def __init__(self, res: ExtractResult, n_layers: int, norms: WriteGeometry | None = None,
                 writes: WriteSamples | None = None):
        if tuple(res.layers) != tuple(range(n_layers)):
            raise ValueError("the search needs candidates on every layer; extract with layers=None")
        self.points = tuple(res.points)
        self.norms = norms  # the model's row norms, for points that keep them
        self.writes = writes  # the train prompts' writes, for points with fitted read-outs
        self._dirs = res.unit_directions()[:, :, -1].astype(np.float64)  # [P, L, E]
        if not self._dirs.any():  # every trial would fail or edit nothing, and that nothing be chosen
            raise ValueError("the two classes do not differ: their class means are the same at every layer; give "
                             "harmful and harmless prompts that differ")
        m = res.means[1][:, :, -1].astype(np.float64)
        self._harmless = m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-30)

    def directions(self, p: Point) -> np.ndarray:
        """[n_layers, n_embd] unit directions (every row the same one for the global scope); a zero row where
        the per-layer candidate is zero (the classes do not differ there: pre of layer 0 at the last token, a
        template token, is one)."""
        i = self.points.index(p.point)
        d = self._dirs[i].copy()
        if p.projected:  # heretic's projection: the part along the harmless mean removed
            h = self._harmless[i]
            d -= (d * h).sum(-1, keepdims=True) * h
        if p.scope == "global":
            lo = int(math.floor(p.direction_index))
            f = p.direction_index - lo
            d = np.broadcast_to((1 - f) * d[lo] + f * d[min(lo + 1, len(d) - 1)], d.shape)
        n = np.linalg.norm(d, axis=-1, keepdims=True)
        if p.scope == "global" and not n[0, 0] > 1e-8:
            raise Unscorable(f"the candidates at {p.point} around layer {p.direction_index:.2f} are zero")
        return np.divide(d, n, out=np.zeros_like(d), where=n > 1e-8)

    def block(self, p: Point) -> BlockAblate:
        """The edit of point ``p``; layers without a direction (zero candidate) are left unedited."""
        L = self._dirs.shape[1]
        d = self.directions(p)
        attn, ffn = p.attn.weights(L), p.ffn.weights(L)
        if p.preserve_norms and self.norms is None:
            raise ValueError("this point keeps row norms; give Candidates the model's WriteGeometry")
        norms = self.norms if p.preserve_norms else None
        if p.scope == "global":
            d = d[:1]
        else:
            zero = np.linalg.norm(d, axis=-1) == 0
            d[zero] = np.eye(1, d.shape[1])[0]  # any unit vector: its weights are 0
            attn[zero] = ffn[zero] = 0.0
        block = BlockAblate(d, attn, ffn, norms=norms)
        if not p.read_out > 0:
            return block
        if self.writes is None:
            raise ValueError("this point fits read-outs; give Candidates the writes (WriteSamples.capture)")
        outs = np.zeros((L, 2, d.shape[1]))
        for layer, k in block.edited():  # fitted to the direction the edit writes
            outs[layer, k] = self.writes.read_out(layer, k, block.direction(layer), p.read_out)
        return BlockAblate(block.directions, attn, ffn, norms=norms, read_outs=outs)  # refused with norms


@dataclass
class Objectives:
    """What one trial scored (both lower is better)."""
    refusals: int
    kl: float


class Evaluator:
    """Scores interventions on fixed validation prompts against the unsteered model (computed once)."""

    def __init__(self, model, harmful: Sequence[str], harmless: Sequence[str], *, trial_tokens: int = 32,
                 markers: str = "pysteer", judge=None):
        self._model = model
        self._harmful, self._harmless = prompt_list(harmful, "harmful"), prompt_list(harmless, "harmless")
        self.trial_tokens = check.integer("trial_tokens", trial_tokens, 1)
        self.markers = marker_set(markers)
        if getattr(judge, "cut", None) not in (None, self.trial_tokens):
            raise ValueError(f"the probe reads answers cut to {judge.cut} tokens, but trials answer in {trial_tokens}: "
                             f"give it cut={trial_tokens} (or None)")
        self.judge = judge  # a Judge or ProbeJudge: it also reads the answers no marker ended
        self.judge_name = None if judge is None else judge.name
        with model.steer():
            self._base_logits = model.logits_batch(self._harmless)[:, -1]
            if not np.isfinite(self._base_logits).all():
                raise ValueError("the unsteered model's logits on the harmless validation prompts are not finite: "
                                 "no KL can be measured against them (a broken model file?)")
            self.base = self._count(model.generate_batch(self._harmful, max_tokens=self.trial_tokens,
                                                         until=self.markers.found))

    @property
    def n_harmful(self) -> int:
        return len(self._harmful)

    @property
    def prompts(self) -> tuple[list, list]:
        """The validation prompts (harmful, harmless)."""
        return self._harmful, self._harmless

    def _count(self, answers) -> int:
        """Refusals: answers with a marker, and with a judge also those it says refuse (it reads unsteered)."""
        matched = [self.markers(a) for a in answers]
        rest = [i for i, x in enumerate(matched) if not x]
        if self.judge is None or not rest:
            return sum(matched)
        return sum(matched) + sum(self.judge.verdicts([self._harmful[i] for i in rest], [answers[i] for i in rest]))

    def __call__(self, intervention) -> Objectives:
        m = self._model
        with m.steer(intervention):
            try:
                # an answer ends once a marker is found: its verdict is settled (the count is the same)
                answers = m.generate_batch(self._harmful, max_tokens=self.trial_tokens, until=self.markers.found)
                kl = float(kl_divergence(self._base_logits, m.logits_batch(self._harmless)[:, -1]).mean())
            except FloatingPointError as e:  # the model's logits check: the edit overflowed its activations
                raise Unscorable(str(e)) from None
        if not math.isfinite(kl):  # NaN would score best (every comparison with it is False)
            raise Unscorable(f"the edit makes the logits on the harmless validation prompts non-finite (KL {kl})")
        return Objectives(self._count(answers), kl)


@dataclass
class Result:
    """The study, its Pareto front (trial number, refusals, kl, parameters), the chosen trial and its edit."""
    study: object
    front: list[dict]
    chosen: dict
    rule: str
    block: BlockAblate
    base_refusals: int
    n_harmful: int
    seconds: dict = field(default_factory=dict)
    markers: str = "pysteer"  # the marker set that counted the refusals
    judge: str | None = None  # the judge that counted them too (its name), if any

    def to_json(self, model) -> dict:
        """Everything needed to apply the chosen point again (:func:`block_from_json`) and to see the front."""
        b = self.block
        return {"model": model.path.name, "sha256": model.sha256, "rule": self.rule, "chosen": self.chosen,
                "front": self.front, "base_refusals": self.base_refusals, "n_harmful": self.n_harmful,
                "seconds": self.seconds, "markers": self.markers, "judge": self.judge, "study": {"name": self.study.study_name},
                "edit": {"directions": b.directions.tolist(), "attn": b.attn.tolist(), "ffn": b.ffn.tolist(),
                         "preserve_norms": b.norms is not None,
                         # [layer, component, b] of each edited write (the others read nothing)
                         "read_outs": None if b.read_outs is None else [
                             [i, k, b.read_outs[i, k].tolist()] for i, k in b.edited()]}}


def block_from_json(obj: dict, model=None) -> BlockAblate:
    """The chosen edit of an optimize JSON (``Result.to_json``); ``model`` (the one it was made for) is needed
    when the edit keeps row norms: they are read from its weights."""
    try:
        e = obj["edit"]
        keep = e.get("preserve_norms", False)
        if keep not in (False, True):
            raise TypeError(f"edit.preserve_norms must be true or false, not {keep!r}")
        directions = np.asarray(e["directions"], np.float64)
        attn, ffn = e["attn"], e["ffn"]
        outs = e.get("read_outs")
    except (KeyError, TypeError, AttributeError) as ex:
        raise ValueError(f"not a pysteer optimize result (no edit.directions/attn/ffn): {ex}") from None
    if keep and model is None:
        raise ValueError("this edit keeps row norms: give the model it was made for (block_from_json(obj, model))")
    block = BlockAblate(directions, attn, ffn)
    if outs is not None:
        if keep:  # a file no optimize run writes: said before the row norms are read
            raise ValueError("edit.read_outs are for the plain edit, and this edit keeps row norms")
        return BlockAblate(block.directions, block.attn, block.ffn, read_outs=_read_outs(outs, block))
    if not keep:
        return block
    edited = np.flatnonzero((block.attn != 0) | (block.ffn != 0))  # the row norms of these layers alone
    return BlockAblate(block.directions, block.attn, block.ffn,
                       norms=WriteGeometry.read(model, layers=edited, progress=False))


def _read_outs(outs, block: BlockAblate) -> np.ndarray:
    """The ``[n_layers, 2, n_embd]`` read-outs of a JSON's list of [layer, component, vector], one for each
    edited write and none other."""
    L, E = len(block.attn), block.directions.shape[1]
    edited = set(block.edited())
    read_outs, seen = np.zeros((L, 2, E)), set()
    if not isinstance(outs, list):
        raise ValueError(f"edit.read_outs must be a list of [layer, component, vector], not {type(outs).__name__}")
    for item in outs:
        if not (isinstance(item, list) and len(item) == 3):
            raise ValueError(f"edit.read_outs must list [layer, component, vector], not {str(item)[:60]}")
        layer, k, vector = item
        layer = check.integer("edit.read_outs layer", layer, 0, L - 1)
        k = check.integer("edit.read_outs component", k, 0, 1)
        v = np.asarray(vector, dtype=object)
        if v.shape != (E,) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise ValueError(f"edit.read_outs vector of layer {layer} component {k} must be {E} numbers")
        if (layer, k) in seen:
            raise ValueError(f"edit.read_outs names layer {layer} component {k} twice")
        seen.add((layer, k))
        read_outs[layer, k] = v.astype(np.float64)
    if seen != edited:
        raise ValueError(f"edit.read_outs must give one vector for each edited write, exactly: missing "
                         f"{sorted(edited - seen)[:4]}, not edited {sorted(seen - edited)[:4]}")
    return read_outs


def pareto(trials: list[dict]) -> list[dict]:
    """Trials no other trial beats in both objectives (ties kept once), by refusals then KL; a trial whose KL is
    not finite (kept by an earlier pysteer) is never on it."""
    trials = [t for t in trials if math.isfinite(t["kl"])]  # a NaN is beaten by nothing: it would stay on
    out = [t for t in trials if not any(
        (u["refusals"] <= t["refusals"] and u["kl"] <= t["kl"]) and (u["refusals"] < t["refusals"] or u["kl"] < t["kl"])
        for u in trials)]
    seen, front = set(), []
    for t in sorted(out, key=lambda t: (t["refusals"], t["kl"], t["number"])):
        if (t["refusals"], t["kl"]) not in seen:
            seen.add((t["refusals"], t["kl"]))
            front.append(t)
    return front


_FEWEST = "fewest refusals"  # the rule when no point meets the bound (format_front then names the next point)


def refusal_se(refusals: int, n: int) -> float:
    """The standard error of a refusal count out of ``n`` prompts (binomial, the rate estimated as (k + 1) /
    (n + 2), so that 0 of n still has one)."""
    p = (refusals + 1) / (n + 2)
    return math.sqrt(n * p * (1 - p))


def pick(front: list[dict], max_refusals: int, n_harmful: int) -> tuple[dict, str]:
    """The chosen point: the lowest KL with at most ``max_refusals`` refusals. When none has so few, the lowest
    KL among the points within one standard error (:func:`refusal_se`) of the fewest refusals: on a few dozen
    prompts they cannot be told apart by their refusals, and the fewest alone may cost several times the KL."""
    if not front:
        raise ValueError("no finished trials to choose from")
    ok = [t for t in front if t["refusals"] <= max_refusals]
    if ok:
        return min(ok, key=lambda t: t["kl"]), f"lowest KL with at most {max_refusals} refusals"
    fewest = min(t["refusals"] for t in front)
    bound = fewest + refusal_se(fewest, n_harmful)
    near = [t for t in front if t["refusals"] <= bound]
    return (min(near, key=lambda t: (t["kl"], t["refusals"])),
            f"lowest KL within one standard error of the {_FEWEST}, {fewest} + {bound - fewest:.1f} (none reached "
            f"{max_refusals})")


def scores(o: Objectives, base_refusals: int, kl_target: float) -> tuple[float, float]:
    """What the sampler minimizes (heretic's scores): the refusals as a fraction of the unsteered model's, and
    the KL; but below ``kl_target`` the KL score is the refusal fraction times the target, so that points which
    barely change the model are told apart by their refusals alone instead of all standing on the front (the
    sampler would keep drawing near them)."""
    r = o.refusals / base_refusals if base_refusals > 0 else float(o.refusals)
    return (o.kl if o.kl >= kl_target else r * kl_target), r


def finished(study) -> list[dict]:
    """Finished trials with what they measured (the user attributes; the values where a study has none: those
    of earlier versions, which minimized the measures themselves)."""
    import optuna

    out = []
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            a = t.user_attrs
            r, kl = (a["refusals"], a["kl"]) if "refusals" in a else t.values
            out.append({"number": t.number, "refusals": int(r), "kl": float(kl), "params": t.params})
    return out


def _check_arch(model) -> None:
    if model.arch not in PLAIN_SUM_ARCHS:
        raise ValueError(f"{model.arch} cannot be abliterated by the rank-1 edits this search makes (the "
                         f"residual must be the plain sum of block outputs: {', '.join(PLAIN_SUM_ARCHS)})")


def check_read_out(read_out, preserve_norms) -> bool:
    """``read_out`` (True or False) where ``preserve_norms`` (None, True or False) leaves plain edits to fit."""
    if read_out not in (False, True):
        raise ValueError(f"read_out must be True or False, not {read_out!r}")
    if read_out and preserve_norms is True:
        raise ValueError("read-outs are fitted for plain edits, and preserve_norms=True leaves none; search the "
                         "norms (None) or turn them off (False)")
    return read_out


def modes(name: str, value) -> tuple:
    """The values a trial's yes/no parameter ``name`` may take: None searches both."""
    if value not in (None, False, True):
        raise ValueError(f"{name} must be None (search both), True or False, not {value!r}")
    return (False, True) if value is None else (value,)


_OPTUNA_TABLES = {"studies", "version_info", "alembic_version", "trials", "study_directions", "trial_values",
                  "trial_params"}


def check_storage(storage: str) -> None:
    """Refuse an SQLite file that is not an Optuna study: Optuna would add its tables to any database."""
    import sqlite3
    import urllib.parse

    if not storage.startswith("sqlite:///"):
        return
    path = pathlib.Path(storage[len("sqlite:///"):].split("?")[0])
    if not path.is_file() or path.stat().st_size == 0:  # a new study
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True)) as db:
            tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    except sqlite3.DatabaseError as e:
        if "locked" in str(e):  # another run writes it: Optuna waits for it
            return
        raise ValueError(f"{path} is not an SQLite database ({e}): name a new file for the study") from None
    # any one of Optuna's tables will do: another run may be making them now, one at a time
    if tables and not tables & _OPTUNA_TABLES:
        raise ValueError(f"{path} is a database of something else (tables {', '.join(sorted(tables)[:5])}), not an "
                         "Optuna study: name a new file for the study")


def _study_prefix(model) -> str:
    """What every study name of this model file starts with."""
    return f"{model.path.stem}-{model.sha256[:12]}-"


def study_name(model, settings: dict) -> str:
    """One study per model file and search settings: a resumed run continues only a study it can extend."""
    return _study_prefix(model) + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def optimize(model, candidates: Candidates, evaluator: Evaluator, *, storage: str, n_trials: int | None = 40,
             time_budget: float | None = None, n_startup: int = 10, seed: int = 0,
             max_refusals: int | None = None, pick_trial: int | None = None, settings: dict | None = None,
             preserve_norms: bool | None = False, projected: bool | None = True, read_out: bool = False,
             kl_target: float = 0.01, progress: bool = True) -> Result:
    """Run (or resume) the study in ``storage`` (an SQLAlchemy URL, e.g. ``sqlite:///study.db``) until it holds
    ``n_trials`` finished trials or ``time_budget`` seconds have passed; then the front and the chosen point
    (``pick_trial``: that trial number instead of the rule). ``preserve_norms``: None searches both edits, True
    or False fixes one (keeping norms needs ``candidates.norms``); ``projected`` likewise (default: heretic's
    projection always); ``read_out``: plain edits also draw the fitted read-outs' alpha (needs
    ``candidates.writes``). The sampler minimizes :func:`scores` with ``kl_target``; the front and the chosen point
    are in the measures themselves. The study is named by the model, the evaluator's prompts, these settings and
    ``settings`` (what else must match to resume it: :func:`search` names the candidates' train prompts there)."""
    import optuna

    _check_arch(model)
    if n_trials is not None:
        check.integer("n_trials", n_trials, 1)
    if time_budget is not None and not check.number("time_budget", time_budget) > 0:
        raise ValueError(f"time_budget must be > 0 seconds, not {time_budget!r}")
    check.integer("n_startup", n_startup, 0)
    check.integer("seed", seed, 0)
    if not check.number("kl_target", kl_target) >= 0:
        raise ValueError(f"kl_target must be >= 0, not {kl_target!r}")
    max_refusals = (max(0, math.floor(0.03 * evaluator.n_harmful)) if max_refusals is None
                    else check.integer("max_refusals", max_refusals, 0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    norm_modes, projected_modes = modes("preserve_norms", preserve_norms), modes("projected", projected)
    if True in norm_modes and candidates.norms is None:
        raise ValueError("keeping row norms needs Candidates(..., norms=WriteGeometry.read(model))")
    if check_read_out(read_out, preserve_norms):
        if candidates.writes is None:
            raise ValueError("fitted read-outs need Candidates(..., writes=WriteSamples.capture(model, ...))")
        candidates.writes.check(model)
    # the validation prompts themselves: a study resumed on others would mix trials measured on both
    named = dict(settings or {}, val=[len(x) for x in evaluator.prompts],
                 val_sha=hashlib.sha256(json.dumps(evaluator.prompts).encode()).hexdigest()[:12],
                 trial_tokens=evaluator.trial_tokens, kl_target=kl_target,
                 preserve_norms=norm_modes, projected=projected_modes, markers=dataclasses.asdict(evaluator.markers))
    if evaluator.judge_name is not None:  # only then: studies made without a judge keep their names and resume
        named["judge"] = evaluator.judge_name
    if read_out:  # likewise
        named["read_out"] = [*READ_OUT_RANGE, RIDGE]
    name = study_name(model, named)
    check_storage(storage)
    for attempt in (1, 2):
        try:
            study = optuna.create_study(directions=["minimize", "minimize"], storage=storage, study_name=name,
                                        load_if_exists=True)
            break
        except Exception as e:  # e.g. a study from another Optuna version
            race = type(e).__name__ == "IntegrityError" or "database is locked" in str(e)
            if race and attempt == 1:  # another run made the tables at the same moment: they are there now
                time.sleep(1.0)
                continue
            hint = "; another run may be using this study: run this again once it ended" if race else ""
            raise ValueError(f"cannot open the study in {storage}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0]}{hint}") from None
    others = [n for n in optuna.get_all_study_names(storage) if n != name and n.startswith(_study_prefix(model))]
    if others:  # e.g. made by an earlier pysteer, whose objectives differ: a run does not resume them
        warnings.warn(f"{storage} also holds {len(others)} other studies of this model, made with other search "
                      f"settings or an earlier pysteer; this run resumes only {name}", stacklevel=2)
    done = len(finished(study))
    # seeded by the trials already run: a resumed study draws new startup points, not the first ones again
    study.sampler = optuna.samplers.TPESampler(n_startup_trials=n_startup, seed=seed + len(study.trials),
                                               multivariate=True, n_ei_candidates=128)  # heretic's
    todo = None if n_trials is None else max(0, n_trials - done)
    ran = []  # this run's trials (another run on the same study adds its own meanwhile)
    t0 = time.perf_counter()

    def objective(trial):
        o = evaluator(candidates.block(suggest(trial, model.n_layers, candidates.points, norm_modes, projected_modes,
                                               read_out)))
        trial.set_user_attr("refusals", o.refusals)
        trial.set_user_attr("kl", o.kl)
        return scores(o, evaluator.base, kl_target)

    with tqdm(total=todo, desc="optimize", unit="trial", disable=not progress) as bar:
        def report(study, trial):
            bar.update(1)
            ran.append(trial.state == optuna.trial.TrialState.COMPLETE)
            front = pareto(finished(study))
            if front:
                best = min(front, key=lambda t: (t["refusals"], t["kl"]))
                bar.set_postfix_str(f"fewest refusals {best['refusals']}/{evaluator.n_harmful} at KL "
                                    f"{best['kl']:.3f}; front {len(front)}")
        if todo != 0:
            # an unscorable point fails alone; anything else stops the search (a judge that cannot read the
            # answers, say: caught, it would fail every trial it touches and leave a biased front)
            try:
                with _stop_on_signals(study):
                    study.optimize(objective, n_trials=todo, timeout=time_budget, callbacks=[report],
                                   catch=(Unscorable,), gc_after_trial=False)
            except ValueError as e:
                raise ValueError(f"the search stopped: {e} (its finished trials are kept in {storage}: run the "
                                 "same search again to resume it)") from e
    search = time.perf_counter() - t0
    trials = finished(study)
    front = pareto(trials)
    if pick_trial is not None:
        chosen = next((t for t in trials if t["number"] == pick_trial), None)
        if chosen is None:
            raise ValueError(f"no finished trial {pick_trial} in the study (finished: "
                             f"{', '.join(str(t['number']) for t in trials)})")
        rule = f"trial {pick_trial}, picked by hand"
    else:
        if not trials and time_budget is not None:
            raise ValueError(f"no trial finished within the time budget of {time_budget:g} s (--time-budget): "
                             "give the search more time")
        chosen, rule = pick(front, max_refusals, evaluator.n_harmful)
    block = candidates.block(Point.from_params(chosen["params"]))
    return Result(study, front, chosen, rule, block, evaluator.base, evaluator.n_harmful,
                  {"search": round(search, 1), "trials_run": sum(ran), "trials": len(trials)},
                  evaluator.markers.name, evaluator.judge_name)


@contextlib.contextmanager
def _stop_on_signals(study):
    """Ctrl-C or SIGTERM (as ``timeout`` and service managers stop a process) lets the running trial finish and
    ends the search, so that the study file keeps no trial half-run; then the signal goes on as it would have:
    to the handler there before when it is a function (Ctrl-C: KeyboardInterrupt), SIGTERM's default ends the
    process, and otherwise (a signal the process ignored: a background job's Ctrl-C) KeyboardInterrupt. A second
    signal goes on at once."""
    hits = []
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in sigs}

    def restore():
        for s, h in previous.items():
            signal.signal(s, h)

    def go_on(signum, frame):
        restore()
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL and signum != signal.SIGINT:
            signal.raise_signal(signum)
        raise KeyboardInterrupt

    def on_signal(signum, frame):
        hits.append(signum)
        if len(hits) > 1:
            go_on(signum, frame)
        try:
            study.stop()
        except RuntimeError:  # outside study.optimize (just before or after it): nothing to stop
            pass

    for s in sigs:
        signal.signal(s, on_signal)
    try:
        yield
    finally:
        restore()
    if hits:
        go_on(hits[0], None)


def format_front(r: Result) -> str:
    lines = [f"Pareto front ({len(r.front)} of {r.seconds.get('trials')} trials; unsteered: {r.base_refusals}/"
             f"{r.n_harmful} refusals)", "| trial | refusals | first-token KL | scope | point | direction index |",
             "|---|---|---|---|---|---|"]
    for t in r.front:
        p = t["params"]
        mark = " (chosen)" if t["number"] == r.chosen["number"] else ""
        lines.append(f"| {t['number']}{mark} | {t['refusals']}/{r.n_harmful} | {t['kl']:.4f} | {p['scope']} | "
                     f"{p['point']} | {p['direction_index']:.2f} |")
    lines.append(f"chosen: trial {r.chosen['number']} ({r.rule}): {r.chosen['refusals']}/{r.n_harmful} refusals, "
                 f"KL {r.chosen['kl']:.4f}")
    more = [t for t in r.front if t["refusals"] > r.chosen["refusals"]]
    if more and _FEWEST in r.rule:  # no point met the bound: the next may cost much less KL
        t = min(more, key=lambda t: (t["refusals"], t["kl"]))
        lines.append(f"next on the front: trial {t['number']}, {t['refusals']}/{r.n_harmful} refusals at KL "
                     f"{t['kl']:.4f} ({r.chosen['kl'] / max(t['kl'], 1e-12):.1f}x less KL than the chosen); "
                     f"--pick {t['number']} takes it")
    return "\n".join(lines)


def search(model, splits, *, storage: str, n_trials: int | None = 40, time_budget: float | None = None,
           points: Sequence[str] = ("post",), trial_tokens: int = 32, n_startup: int = 10,
           seed: int = 0, max_refusals: int | None = None, pick_trial: int | None = None,
           preserve_norms: bool | None = None, projected: bool | None = True, read_out: bool = False,
           markers: str = "pysteer", judge=None, progress: bool = True) -> Result:
    """The whole search on a :class:`pysteer.datasets.PromptSplits`: candidates from the train split (class
    means at the last token of every layer), trials scored on the validation split; the test split is left
    for ``pysteer ablate-test --edit``. ``preserve_norms`` as :func:`optimize` (default: searched, where the model has
    every attn_output and ffn_down), ``projected`` and ``read_out`` too (the read-outs are fitted to the train
    split's writes); ``points``: the residual points the candidates are read
    at (searched when several); ``markers``: the marker set that counts refusals; ``judge`` (a
    :class:`~pysteer.llm_judge.Judge` or :class:`~pysteer.probe_judge.ProbeJudge`) counts those it says refuse
    among the answers no marker ended; a ProbeJudge is best fitted with ``cut=trial_tokens`` (as the CLI's), since
    most deflections show only after the opening a trial reads."""
    from .extraction import extract

    _check_arch(model)  # before the extraction, not after
    if sorted(map(json.dumps, splits.train[0])) == sorted(map(json.dumps, splits.train[1])):  # the same means
        raise ValueError("the two classes do not differ: the harmful and harmless train prompts are the same; give "
                         "harmful and harmless prompts that differ")
    modes("preserve_norms", preserve_norms)  # checked before the row norms are read
    modes("projected", projected)
    if check_read_out(read_out, preserve_norms):  # and their memory, before any reading
        WriteSamples.check_memory(model, len(splits.train[0]) + len(splits.train[1]))
    points = check_points(points)
    marker_set(markers)  # and the marker set
    if preserve_norms is None and WriteGeometry.missing(model):
        preserve_norms = False  # searched where the model has the matrices (not mixture-of-experts)
    t0 = time.perf_counter()
    norms = None if preserve_norms is False else WriteGeometry.read(model, progress=progress)
    t1 = time.perf_counter()
    res = extract(model, *splits.train, positions=1, points=points, progress=progress)
    t2 = time.perf_counter()
    writes = WriteSamples.capture(model, *splits.train, progress=progress) if read_out else None
    t_writes = time.perf_counter() - t2
    t2 = time.perf_counter()
    evaluator = Evaluator(model, *splits.val, trial_tokens=trial_tokens, markers=markers, judge=judge)
    t3 = time.perf_counter()
    # the prompts themselves: a study resumed on other train prompts would mix trials of other candidates
    settings = {"points": list(points), "train": [len(x) for x in splits.train],
                "train_sha": hashlib.sha256(json.dumps(splits.train).encode()).hexdigest()[:12]}
    r = optimize(model, Candidates(res, model.n_layers, norms, writes), evaluator, storage=storage,
                 n_trials=n_trials, time_budget=time_budget, n_startup=n_startup, seed=seed,
                 max_refusals=max_refusals, pick_trial=pick_trial, settings=settings, preserve_norms=preserve_norms,
                 projected=projected, read_out=read_out, progress=progress)
    r.seconds.update(row_norms=round(t1 - t0, 1), extract=round(t2 - t1 - t_writes, 1), baseline=round(t3 - t2, 1))
    if read_out:
        r.seconds["writes"] = round(t_writes, 1)
    return r
