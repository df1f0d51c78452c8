"""The probe judge cross-validated over prompts: what its defaults (layer, C, threshold) rest on (not in CI).

The real abliterated answers (pysteer/data/abliterated_answers.jsonl: 3 points x 100 prompts) are split by
prompt, half and half, ``--splits`` times; a probe is fitted on the written answers plus the real answers to one
half and tested on the real answers to the other half, so no test prompt is seen in training with any answer.
For every other layer's post and each C it prints the test AUC (mean and lowest over the splits), and the count
said at p >= 0.3 and 0.5 against the hand count. The judge's features (ProbeJudge's: its chats as it reads them,
post at the last token) are captured once per judge model and kept in ``--features`` (an .npz).

    .venv/bin/python benchmarks/probe_cv.py --judge qwen2.5-coder-0.5b-instruct --features f05.npz
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

import pysteer
from pysteer.capture import capture_tokens
from pysteer.llm_judge import Judge
from pysteer.probe_judge import fit_logistic, shipped_rows
from probe_judge import auc  # benchmarks/probe_judge.py, beside this script


def features(judge: str, path: pathlib.Path):
    """(X [answers, layers, n_embd], layers, y, prompt, source), captured once and kept in ``path``."""
    if not path.is_file():
        rows = [r for r in shipped_rows() if r["answer"].strip()]
        m = pysteer.load(judge, n_ctx=8192)
        j = Judge(m)
        layers = list(range(1, m.n_layers, 2))
        _, _, tokens = j.chats([r["prompt"] for r in rows], [r["answer"] for r in rows])
        t0 = time.perf_counter()
        X = capture_tokens(m, tokens, layers=layers, points=("post",), positions=1)[:, 0, :, 0]
        print(f"{judge}: {len(rows)} chats, {len(layers)} layers captured in {time.perf_counter() - t0:.0f} s")
        np.savez(path, X=X, layers=layers, y=[r["refusal"] for r in rows], prompt=[r["prompt"] for r in rows],
                 source=[r.get("source", "written") for r in rows])
        m.close()
    z = np.load(path)
    return z["X"].astype(np.float64), [int(x) for x in z["layers"]], z["y"].astype(bool), z["prompt"], z["source"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--features", required=True, help=".npz of the judge's features (written if missing)")
    ap.add_argument("--splits", type=int, default=4)
    a = ap.parse_args()
    X, layers, y, prompt, source = features(a.judge, pathlib.Path(a.features))
    real = source != "written"
    prompts = np.array(sorted(set(prompt[real])))
    tests = []
    for s in range(a.splits):
        order = prompts.copy()
        np.random.default_rng(s).shuffle(order)
        seen = np.isin(prompt, order[: len(order) // 2])
        tests.append((~real | seen, real & ~seen))
    print(f"judge {a.judge}: {int(real.sum())} real answers to {len(prompts)} prompts, {int((~real).sum())} written; "
          f"{a.splits} splits by prompt; hand counts per test half: {[int(y[te].sum()) for _, te in tests]}\n")
    print("| post of layer | C | test AUC mean (lowest) | said at p >= 0.3, per split | said at p >= 0.5 |")
    print("|---|---|---|---|---|")
    for i, layer in enumerate(layers):
        for c in (0.01, 0.1, 1.0):
            aucs, at3, at5 = [], [], []
            for tr, te in tests:
                F = X[:, i]
                mu, sd = F[tr].mean(0), F[tr].std(0) + 1e-6
                w = fit_logistic((F[tr] - mu) / sd, y[tr].astype(float), 1 / c)
                p = 1 / (1 + np.exp(-(np.hstack([(F[te] - mu) / sd, np.ones((int(te.sum()), 1))]) @ w)))
                aucs.append(auc(p, y[te]))
                at3.append(int((p >= 0.3).sum()))
                at5.append(int((p >= 0.5).sum()))
            print(f"| {layer} | {c:g} | {np.mean(aucs):.3f} ({min(aucs):.3f}) | {at3} | {at5} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
