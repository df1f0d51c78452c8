"""Does a second direction remove the refusals a first edit leaves? A search on top of a chosen point.

The candidates are extracted again with the first edit (an optimize result with the plain edit) running, made
orthogonal to its direction, and searched in heretic's space with the first edit kept; the two edits add exactly
(each reads its block's write before the other's part of it: the directions are orthogonal). Refusals are counted
by the phrase matcher and the probe judge on the validation split, the KL against the unedited model.

    .venv/bin/python benchmarks/second_direction.py FIRST.json [--trials 30] [--study second.db]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import pysteer
from pysteer import hookpoints
from pysteer.cli import _splits, build_parser
from pysteer.extraction import extract
from pysteer.interventions import BlockAblate, TensorOp
from pysteer.llm_judge import Judge
from pysteer.native import ABLATE_DELTA, SAVE
from pysteer.optimize import Candidates, Evaluator, block_from_json, format_front, optimize
from pysteer.probe_judge import ProbeJudge


class Stack(BlockAblate):
    """Plain BlockAblates whose directions are orthogonal in every layer, as one intervention (a slot each)."""

    def __init__(self, blocks):
        self.blocks = list(blocks)
        b = self.blocks[0]
        self.directions, self.attn, self.ffn, self.norms, self.read_outs = b.directions, b.attn, b.ffn, None, None

    def __repr__(self):
        return f"Stack({', '.join(map(repr, self.blocks))})"

    def _ops(self, model):
        ops = []
        for layer in range(model.n_layers):
            for k, (before, after) in enumerate((("pre", "mid"), ("mid", "post"))):
                saves, edits = [], []
                for j, b in enumerate(self.blocks):
                    w = (b.attn, b.ffn)[k][layer]
                    if w > 0:
                        r = b.directions[layer if len(b.directions) > 1 else 0].astype(np.float64)
                        d = (np.sqrt(w) * r).astype(np.float32)[None, :]
                        saves.append(TensorOp(hookpoints.tensor_name(model.arch, before, layer), SAVE, d, slot=2 * j + k))
                        edits.append(TensorOp(hookpoints.tensor_name(model.arch, after, layer), ABLATE_DELTA, d,
                                              slot=2 * j + k))
                ops += saves + edits  # every save of a tensor before the edits of it
        return ops


class Second(Candidates):
    """Candidates orthogonal to the first edit's directions, each point stacked on the first edit."""

    def __init__(self, res, n_layers: int, first: BlockAblate):
        super().__init__(res, n_layers)
        self.first = first

    def directions(self, p):
        d = super().directions(p).copy()
        r1 = self.first.directions
        d -= (d * r1).sum(-1, keepdims=True) * r1
        n = np.linalg.norm(d, axis=-1, keepdims=True)
        return np.divide(d, n, out=np.zeros_like(d), where=n > 1e-8)

    def block(self, p):
        return Stack([self.first, super().block(p)])


def test_trial(m, cands, sp, out, number: int) -> None:
    """Trial ``number`` of the study in ``out`` (its edit from ``cands``) on the held-out split, as ``pysteer
    ablate-test --n 100`` tests it: the report with every answer in ``out``/heldout-trialN.json."""
    import pathlib
    import time

    import optuna

    from pysteer.jobs import ablation_test
    from pysteer.optimize import Point

    out = pathlib.Path(out)
    storage = f"sqlite:///{out / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)
    (t,) = [t for t in optuna.load_study(study_name=name, storage=storage).trials if t.number == number]
    t0 = time.perf_counter()
    report = ablation_test(m, None, *sp.test, intervention=cands.block(Point.from_params(t.params)), progress=False)
    s = report.summary(answers=True)
    s["trial"], s["params"], s["seconds_wall"] = number, t.params, round(time.perf_counter() - t0, 1)
    (out / f"heldout-trial{number}.json").write_text(json.dumps(s, indent=1, ensure_ascii=False))
    print(json.dumps({k: v for k, v in s.items() if k != "answers"}, indent=1))


def splits(model: str, *extra: str):
    """The CLI's prompt splits as `ablate-test MODEL --n 100 --n-val 32` makes them (the held-out runs' own)."""
    return _splits(build_parser().parse_args(["ablate-test", model, "--n", "100", "--n-val", "32", *extra]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", metavar="FIRST.json")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--study", default="second-direction.db")
    a = ap.parse_args()
    sp = splits(a.model)
    with open(a.first) as f:
        first_json = json.load(f)
    with pysteer.load(a.model) as m:
        b1 = block_from_json(first_json, m)
        if b1.norms is not None:
            raise SystemExit("the first edit keeps row norms; the stacked edits are exact only for plain ones")
        with m.steer(b1):
            res = extract(m, *sp.train, positions=1, points=("post",), progress=False)
        ev = Evaluator(m, *sp.val, judge=ProbeJudge(Judge(m), progress=True))
        print("first edit alone:", ev(b1), "(as a stack of one:", ev(Stack([b1])), ")", flush=True)
        r = optimize(m, Second(res, m.n_layers, b1), ev, storage=f"sqlite:///{a.study}", n_trials=a.trials,
                     preserve_norms=False, projected=True, settings={"second": first_json["chosen"], "val": sp.val})
        print(format_front(r))
        for t in sorted(r.study.trials, key=lambda t: t.number):
            if "refusals" in t.user_attrs:
                print(f"trial {t.number}: {t.user_attrs['refusals']}/{ev.n_harmful}, KL {t.user_attrs['kl']:.4f}")


if __name__ == "__main__":
    main()
