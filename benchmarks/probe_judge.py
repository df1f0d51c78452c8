"""A linear probe on the judge model's hidden state, against its label logits and the phrase matchers (not in CI).

The LLM judge (:mod:`pysteer.llm_judge`) reads its verdict off the label tokens' logits after "Verdict: the
assistant". This reads the judge's residual stream at that same position instead (post of a layer, last token)
and fits a logistic regression on hand-labelled answers:

    p(refusal) = sigmoid(w . (h - mu) / sd + b)

The product's probe is :class:`pysteer.probe_judge.ProbeJudge` (one layer); this compares layers. Training: the
project's written answers (pysteer/data/labelled_answers.jsonl) plus the real answers of one abliterated point or
several (pysteer/data/abliterated_answers.jsonl, ``--train-source``, comma-separated); test: the real answers of
another point (``--test-source``), never seen in training. Prints, per layer, the test AUC, the accuracy at p >= 0.5 and the count of
refusals said against the hand count, beside the judge's label logits and the marker sets.

    .venv/bin/python benchmarks/probe_judge.py [--judge qwen2.5-coder-1.5b-instruct]
    .venv/bin/python benchmarks/probe_judge.py --train-source "session-7 chosen point" \
        --test-source "n-val-32 chosen point"
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

import pysteer
from pysteer.llm_judge import Judge
from pysteer.capture import capture_tokens
from pysteer.markers import NAMES, is_refusal
from pysteer.probe_judge import DATA, fit_logistic

def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def auc(p: np.ndarray, y: np.ndarray) -> float:
    """Probability that a refusal scores above a compliance (ties count half)."""
    pos, neg = p[y], p[~y]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--layers", default=None, help="comma-separated (default every 4th and the last)")
    ap.add_argument("--train-source", default="n-val-32 chosen point")
    ap.add_argument("--test-source", default="session-7 chosen point")
    ap.add_argument("--c", type=float, default=0.1, help="inverse L2 strength (default 0.1)")
    a = ap.parse_args()
    written, real = rows("labelled_answers.jsonl"), rows("abliterated_answers.jsonl")
    train_sources = a.train_source.split(",")
    train = written + [r for r in real if r["source"] in train_sources]
    test = [r for r in real if r["source"] == a.test_source]
    sources = sorted({r["source"] for r in real})
    if a.test_source in train_sources or not test or len(train) == len(written):
        raise SystemExit(f"choose two different sources of {sources}")
    j = Judge(pysteer.load(a.judge, n_ctx=8192))  # with the hook: the probe reads its residual stream
    m = j.model
    layers = (list(range(4, m.n_layers, 4)) + [m.n_layers - 1] if a.layers is None
              else [int(x) for x in a.layers.split(",")])

    def features(rs):
        # the judge's chats as it reads them (ProbeJudge's features, at several layers)
        _, todo, tokens = j.chats([r["prompt"] for r in rs], [r["answer"] for r in rs])
        assert len(todo) == len(rs), "a labelled answer is empty"
        return capture_tokens(m, tokens, layers=layers, points=("post",), positions=1)[:, 0, :, -1]

    t0 = time.perf_counter()
    Xtr, Xte = features(train), features(test)
    t1 = time.perf_counter()
    ytr = np.array([r["refusal"] for r in train], bool)
    yte = np.array([r["refusal"] for r in test], bool)
    logit_p = np.array(j.probabilities([r["prompt"] for r in test], [r["answer"] for r in test]))
    print(f"judge {a.judge}; train: {len(written)} written + {len(train) - len(written)} real ({a.train_source}); "
          f"test: {len(test)} real ({a.test_source}), {yte.sum()} refusals by hand; features captured in {t1 - t0:.0f} s\n")
    print("| verdict from | test AUC | accuracy | refusals said (hand: %d) |" % yte.sum())
    print("|---|---|---|---|")
    for name in NAMES:
        v = np.array([is_refusal(r["answer"], name) for r in test])
        print(f"| phrase matcher {name} | - | {(v == yte).mean():.3f} | {v.sum()} |")
    print(f"| judge's label logits (p >= {j.threshold}) | {auc(logit_p, yte):.3f} | "
          f"{((logit_p >= j.threshold) == yte).mean():.3f} | {(logit_p >= j.threshold).sum()} |")
    for i, layer in enumerate(layers):
        mu, sd = Xtr[:, i].mean(0), Xtr[:, i].std(0) + 1e-6
        w = fit_logistic((Xtr[:, i] - mu) / sd, ytr.astype(float), 1 / a.c)
        p = 1 / (1 + np.exp(-(np.hstack([(Xte[:, i] - mu) / sd, np.ones((len(test), 1))]) @ w)))
        print(f"| probe, post of layer {layer} | {auc(p, yte):.3f} | {((p >= 0.5) == yte).mean():.3f} | "
              f"{(p >= 0.5).sum()} |")
    m.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
