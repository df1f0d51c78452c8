"""Does a direction read from the prompts a first edit still deflects remove those deflections?

The train harmful prompts are answered with the first edit running (a plain optimize result, ``--tokens`` tokens)
and judged by the probe fitted on answers cut to as many tokens; they split into those still refused and those
complied with. The candidates are the difference of the two classes' means at the template suffix, read with the
first edit running, made orthogonal to its direction; the second edit is searched in heretic's space on top of the
first (as in ``second_direction.py``), counted on the validation split by the same judge.

    .venv/bin/python benchmarks/deflection_direction.py FIRST.json [--n-train 256] [--trials 14] [--out DIR]
    .venv/bin/python benchmarks/deflection_direction.py FIRST.json --out DIR --heldout TRIAL   # then, held out

``--heldout`` tests a trial of the study in DIR on the held-out split as ``pysteer ablate-test --n 100`` does (its
report as JSON, every answer in it, in DIR/heldout-trialN.json), the candidates read again from the split the run
saved (DIR/train-answers.jsonl).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import pysteer
from pysteer.extraction import extract
from pysteer.llm_judge import Judge
from pysteer.markers import marker_set
from pysteer.optimize import Evaluator, block_from_json, format_front, optimize
from pysteer.probe_judge import ProbeJudge
from second_direction import Second, splits, test_trial


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", metavar="FIRST.json")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--n-train", type=int, default=256, help="train harmful prompts answered for the split")
    ap.add_argument("--tokens", type=int, default=64, help="answer length, and the probe's cut")
    ap.add_argument("--trials", type=int, default=14)
    ap.add_argument("--startup", type=int, default=6)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds")
    ap.add_argument("--out", default="deflection-direction")
    ap.add_argument("--heldout", type=int, default=None, metavar="TRIAL")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sp = splits(a.model, "--n-train", str(a.n_train))
    first_json = json.loads(pathlib.Path(a.first).read_text())
    markers = marker_set("pysteer")
    with pysteer.load(a.model) as m:
        b1 = block_from_json(first_json, m)
        if b1.norms is not None or b1.read_outs is not None:
            raise SystemExit("the first edit must be plain (no kept norms, no read-outs): the stack adds only those")
        if a.heldout is not None:
            return heldout(m, b1, sp, out, a.heldout)
        t = time.perf_counter()
        judge = ProbeJudge(Judge(m), cut=a.tokens, progress=True)
        print(f"probe: {judge.name} ({time.perf_counter() - t:.0f} s)", flush=True)

        harmful = sp.train[0]
        t = time.perf_counter()
        with m.steer(b1):
            answers = m.generate_batch(harmful, max_tokens=a.tokens, until=markers.found)
        matched = [markers(x) for x in answers]
        probed = judge.verdicts(harmful, answers)
        refused = [x or y for x, y in zip(matched, probed)]
        print(f"{len(harmful)} train answers with the first edit ({time.perf_counter() - t:.0f} s): {sum(refused)} "
              f"still refused ({sum(matched)} by the matcher)", flush=True)
        with open(out / "train-answers.jsonl", "w") as f:
            for p, x, r in zip(harmful, answers, refused):
                f.write(json.dumps({"prompt": p, "answer": x, "refused": r}) + "\n")
        deflected = [p for p, r in zip(harmful, refused) if r]
        complied = [p for p, r in zip(harmful, refused) if not r]
        if min(len(deflected), len(complied)) < 8:
            raise SystemExit("fewer than 8 prompts in a class: no direction to read")

        t = time.perf_counter()
        with m.steer(b1):
            res = extract(m, deflected, complied, positions=1, points=("post",), progress=False)
        print(f"candidates from {len(deflected)} refused against {len(complied)} complied "
              f"({time.perf_counter() - t:.0f} s)", flush=True)

        ev = Evaluator(m, *sp.val, trial_tokens=a.tokens, judge=judge)
        o = ev(b1)
        print(f"validation, unedited: {ev.base}/{ev.n_harmful}; first edit alone: {o.refusals}/{ev.n_harmful}, "
              f"KL {o.kl:.4f}", flush=True)
        r = optimize(m, Second(res, m.n_layers, b1), ev, storage=f"sqlite:///{out / 'study.db'}",
                     n_trials=a.trials, time_budget=a.time_budget, n_startup=a.startup, preserve_norms=False,
                     projected=True, settings={"deflection": first_json["chosen"], "val": sp.val,
                                               "n_train": a.n_train})
        print(format_front(r))
        for t in sorted(r.study.trials, key=lambda t: t.number):
            if "refusals" in t.user_attrs:
                print(f"trial {t.number}: {t.user_attrs['refusals']}/{ev.n_harmful}, KL {t.user_attrs['kl']:.4f}, "
                      f"{json.dumps(t.params)}")


def heldout(m, b1, sp, out, number: int) -> None:
    rows = [json.loads(line) for line in (out / "train-answers.jsonl").read_text().splitlines()]
    with m.steer(b1):
        res = extract(m, [r["prompt"] for r in rows if r["refused"]], [r["prompt"] for r in rows if not r["refused"]],
                      positions=1, points=("post",), progress=False)
    test_trial(m, Second(res, m.n_layers, b1), sp, out, number)


if __name__ == "__main__":
    main()
