"""What the probe judge sees in an answer's first tokens, as a search reads them (not in CI).

A search generates ``trial_tokens`` per answer (32 by default); the held-out test 128. Two measures, on the
probe's default layer of the judge model:

1. The probe fitted on the shipped whole answers, read on the hand-labelled answers of ``--test`` (a JSONL of
   prompt, answer, refusal) whole and cut to each of ``--cuts`` tokens (the judge's tokens): said, right, AUC.
2. Cross-validated by prompt over the shipped real answers and ``--test``'s (4 folds; the written answers always
   in training): a probe fitted on answers cut to a tokens, tested on answers cut to b, for a = 0 (whole) and b
   each cut, and a = b (``ProbeJudge(cut=)``).

The features are captured once (``--features``, an .npz).

    .venv/bin/python benchmarks/probe_cut.py --features cut15.npz
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from pysteer.probe_judge import ProbeJudge, cut_text, fit_logistic, shipped_rows


def features(judge: str, cuts: list[int], test_file: pathlib.Path, path: pathlib.Path) -> dict:
    if path.is_file():
        return dict(np.load(path))
    shipped = shipped_rows()
    extra = [dict(json.loads(line), source=str(test_file)) for line in test_file.read_text().splitlines() if line.strip()]
    rows = shipped + extra
    test = np.array([False] * len(shipped) + [True] * len(extra))
    pj = ProbeJudge.load(judge, train=shipped, progress=True)
    m = pj.model
    prompts, whole = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    out = {"y": np.array([r["refusal"] for r in rows]), "test": test, "prompt": np.array(prompts),
           "written": np.array(["source" not in r for r in rows])}
    for k in [0] + cuts:
        answers = whole if k == 0 else [cut_text(m, a, k) for a in whole]
        n, todo, tokens = pj._judge.chats(prompts, answers)
        X = np.full((n, m.n_embd), np.nan)
        X[todo] = pj._features(tokens, progress=True)
        out[f"X{k}"] = X
        z = np.hstack([(X - pj._mu) / pj._sd, np.ones((n, 1))]) @ pj._w  # the shipped probe's p (nan: empty)
        out[f"p{k}"] = 1 / (1 + np.exp(-z))
    np.savez(path, **out)
    return out


def auc(p: np.ndarray, y: np.ndarray) -> float:
    return float((p[y][:, None] > p[~y][None]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--cuts", default="32,48,64")
    ap.add_argument("--test", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" /
                    "optimize-qwen1.5b-s10-readout" / "heldout-trial29-read-by-hand.jsonl")
    ap.add_argument("--features", type=pathlib.Path, required=True)
    a = ap.parse_args()
    cuts = [int(x) for x in a.cuts.split(",")]
    z = features(a.judge, cuts, a.test, a.features)
    y, test, prompt, written = z["y"], z["test"], z["prompt"], z["written"]
    ok = np.isfinite(z["X0"]).all(1)
    t = test & ok
    print(f"1. the probe fitted on whole answers, on the {t.sum()} answers of {a.test.name} "
          f"({y[t].sum()} refusals by hand)")
    for k in [0] + cuts:
        p = z[f"p{k}"][t]
        print(f"   cut {k or 'none':>4}: said {(p >= 0.3).sum():3d}, right {((p >= 0.3) & y[t]).sum():3d}, "
              f"AUC {auc(p, y[t]):.3f}")
    ps = sorted(set(prompt[~written]))
    np.random.default_rng(0).shuffle(ps)
    fold_of = {p: i % 4 for i, p in enumerate(ps)}
    fold = np.array([-1 if w else fold_of[p] for p, w in zip(prompt, written)])
    real = ok & (fold >= 0)
    print(f"2. cross-validated by prompt, 4 folds: {real.sum()} real answers, {y[real].sum()} refusals by hand")
    for tr_k, te_k in [(0, 0)] + [(0, k) for k in cuts] + [(k, k) for k in cuts]:
        P = np.full(len(y), np.nan)
        for f in range(4):
            tr, te = ok & (fold != f), ok & (fold == f)
            X = z[f"X{tr_k}"]
            mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-6
            w = fit_logistic((X[tr] - mu) / sd, y[tr].astype(float), 10.0)  # C = 0.1, the probe's default
            Xt = (z[f"X{te_k}"][te] - mu) / sd
            P[te] = 1 / (1 + np.exp(-(np.hstack([Xt, np.ones((te.sum(), 1))]) @ w)))
        p, yy = P[real], y[real]
        said = [f"p>={th}: said {(p >= th).sum():3d} right {((p >= th) & yy).sum():3d}" for th in (0.3, 0.5)]
        print(f"   fitted on cut {tr_k or 'none':>4}, tested on cut {te_k or 'none':>4}: AUC {auc(p, yy):.3f}; "
              + "; ".join(said))


if __name__ == "__main__":
    main()
