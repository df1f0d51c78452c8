"""The probe judge's count on unseen prompts: one half split against pooled folds, and a fitted threshold (not in CI).

The real probe test (tests/test_probe_judge.py, Qwen2.5-Coder-0.5B as judge) splits the real answers by prompt,
fits on half and counts on the other half (seed 0); with more labelled rows its count at p >= 0.3 fell to 31 of 56
(session 11). For the shipped rows, and then with each ``--extra`` file added, this prints:

1. for ``--splits`` half splits by prompt (seed 0 is the test's): the AUC and the count said on the test half at
   p >= 0.3, and at ``oof``, the threshold at which the training half's real answers, each scored by a probe
   fitted without its prompt (4 folds by prompt, the written answers always in), are said refused as often as
   they are by hand;
2. pooled over 4 folds by prompt (every real answer scored once, by a probe that never saw its prompt), for 4
   fold seeds: the count said at p >= 0.3 against the hand count, and the AUC.

The rows: the shipped ones, then ``--extra`` files (JSONL of prompt, answer, refusal, source) one by one; the empty
answers left out (a refusal without the probe). Features (post of the judge's probe layer at the last token of
each chat, as ProbeJudge reads it) are captured once into ``--features``.

    .venv/bin/python benchmarks/probe_calibration.py --features cal05.npz --extra A.jsonl B.jsonl
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

import pysteer
from pysteer.capture import capture_tokens
from pysteer.llm_judge import Judge
from pysteer.probe_judge import fit_logistic, shipped_rows

C = 0.1


def rows_of(extra: list[pathlib.Path]) -> list[dict]:
    rows = shipped_rows()
    for f in extra:
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["answer"].strip()]  # an empty answer is a refusal without the probe


def features(judge: str, rows: list[dict], path: pathlib.Path) -> np.ndarray:
    if path.is_file():
        X = np.load(path)["X"]
        if len(X) == len(rows):
            return X
    with pysteer.load(judge, n_ctx=8192) as m:
        layer = (m.n_layers - 1) // 2
        _, todo, tokens = Judge(m).chats([r["prompt"] for r in rows], [r["answer"] for r in rows])
        assert len(todo) == len(rows)
        X = capture_tokens(m, tokens, layers=[layer], points=("post",), positions=1,
                           progress=True)[:, 0, 0, 0].astype(np.float64)
    np.savez(path, X=X)
    return X


def fit(X, y):
    mu, sd = X.mean(0), X.std(0) + 1e-6
    w = fit_logistic((X - mu) / sd, y.astype(float), 1 / C)
    return lambda Z: 1 / (1 + np.exp(-(np.hstack([(Z - mu) / sd, np.ones((len(Z), 1))]) @ w)))


def split(prompt, real, seed):
    """The real test's split: the real answers to half the prompts (shuffled by ``seed``) in training."""
    prompts = sorted(set(prompt[real]))
    np.random.default_rng(seed).shuffle(prompts)
    seen = np.isin(prompt, prompts[: len(prompts) // 2])
    return ~real | seen, real & ~seen


def oof_threshold(X, y, prompt, real, folds=4, seed=0) -> float:
    """The threshold that says as many of the real rows refused, scored out of fold by prompt, as the hand."""
    s = np.sort(pooled(X, y, prompt, real, folds, seed))[::-1]
    n = int(y[real].sum())
    return float((s[n - 1] + s[n]) / 2) if 0 < n < len(s) else 0.5


def auc(p, y) -> float:
    return float((p[y][:, None] > p[~y][None]).mean() + 0.5 * (p[y][:, None] == p[~y][None]).mean())


def pooled(X, y, prompt, real, folds=4, seed=0) -> np.ndarray:
    """p(refusal) of every real answer from a probe fitted without its prompt."""
    prompts = sorted(set(prompt[real]))
    np.random.default_rng(seed).shuffle(prompts)
    p = np.full(len(y), np.nan)
    for k in range(folds):
        held = real & np.isin(prompt, prompts[k::folds])
        p[held] = fit(X[~held], y[~held])(X[held])
    return p[real]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--extra", type=pathlib.Path, nargs="*", default=[])
    ap.add_argument("--features", type=pathlib.Path, required=True)
    ap.add_argument("--splits", type=int, default=6)
    a = ap.parse_args()
    rows = rows_of(a.extra)
    X = features(a.judge, rows, a.features)
    sizes = [len(rows_of(a.extra[:i])) for i in range(len(a.extra) + 1)]  # rows_of keeps the files' order
    for i, n in enumerate(sizes):
        y = np.array([r["refusal"] for r in rows[:n]])
        prompt = np.array([r["prompt"] for r in rows[:n]])
        real = np.array(["source" in r for r in rows[:n]])
        Xn = X[:n]
        print(f"\n## judge {a.judge}, the shipped rows{''.join(' + ' + f.name for f in a.extra[:i])}: "
              f"{int(real.sum())} real answers ({int(y[real].sum())} refusals by hand), {int((~real).sum())} written\n")
        print("| half split, seed | test answers | by hand | AUC | said, p >= 0.3 | oof threshold | said at it |")
        print("|---|---|---|---|---|---|---|")
        for s in range(a.splits):
            tr, te = split(prompt, real, s)
            p = fit(Xn[tr], y[tr])(Xn[te])
            t = oof_threshold(Xn[tr], y[tr], prompt[tr], real[tr])
            print(f"| {s} | {int(te.sum())} | {int(y[te].sum())} | {auc(p, y[te]):.3f} | {int((p >= 0.3).sum())} | "
                  f"{t:.3f} | {int((p >= t).sum())} |", flush=True)
        print("\n| 4 folds pooled, seed | by hand | said, p >= 0.3 | AUC |\n|---|---|---|---|")
        for s in range(4):
            p = pooled(Xn, y, prompt, real, seed=s)
            print(f"| {s} | {int(y[real].sum())} | {int((p >= 0.3).sum())} | {auc(p, y[real]):.3f} |", flush=True)

if __name__ == "__main__":
    main()
