"""Does a direction read on the answers, where the deflections turn, remove them?

``deflection_direction.py`` read its second direction at the last template token of the prompts a first edit
still deflects. Most deflections open like compliance and turn later, so this one is read on the answers
themselves: the train answers that script saved (with the first edit running, judged by the probe cut to as many
tokens) are decoded again, prompt and answer, with the first edit running, and ``post`` of every layer is averaged
over the answer's last ``--positions`` tokens; the candidates are the difference of the refused and complied
answers' means, made orthogonal to the first edit's direction, searched on top of the first edit as there.

    .venv/bin/python benchmarks/answer_direction.py FIRST.json --answers DIR/train-answers.jsonl [--out DIR]
    .venv/bin/python benchmarks/answer_direction.py FIRST.json --answers ... --out DIR --heldout TRIAL
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

import pysteer
from pysteer.capture import capture_tokens
from pysteer.extraction import ExtractResult
from pysteer.llm_judge import Judge
from pysteer.optimize import Evaluator, block_from_json, format_front, optimize
from pysteer.probe_judge import ProbeJudge
from second_direction import Second, splits, test_trial


def answer_candidates(m, first, rows, tokens: int, positions: int) -> ExtractResult:
    """Class means of ``post`` (every layer) over each answer's last ``positions`` tokens, the first edit running;
    class 0 the refused answers, class 1 the complied ones."""
    seqs = [m.encode(r["prompt"]) + m.tokenize(r["answer"], add_special=False)[:tokens] for r in rows]
    sums = np.zeros((2, m.n_layers, m.n_embd))
    sq = np.zeros_like(sums)
    counts = [0, 0]
    with m.steer(first):
        for i in range(0, len(seqs), 16):  # [16, 1, L, K, E] at a time: the whole set would not fit
            acts = capture_tokens(m, seqs[i:i + 16], points=("post",), positions=positions)[:, 0].mean(axis=2)
            for row, a in zip(rows[i:i + 16], acts.astype(np.float64)):
                c = 0 if row["refused"] else 1
                sums[c] += a
                sq[c] += a * a
                counts[c] += 1
    n = np.array(counts, float)[:, None, None]
    means = sums / n
    var = (sq - n * means ** 2) / np.maximum(n - 1, 1)
    shape = (2, 1, m.n_layers, 1, m.n_embd)
    return ExtractResult(("post",), tuple(range(m.n_layers)), 1, means.reshape(shape).astype(np.float32),
                         var.reshape(shape).astype(np.float32), tuple(counts), "chat")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", metavar="FIRST.json")
    ap.add_argument("--answers", required=True, help="train-answers.jsonl of deflection_direction.py")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--n-train", type=int, default=256, help="as the answers were made with")
    ap.add_argument("--tokens", type=int, default=64, help="answer length, and the probe's cut")
    ap.add_argument("--positions", type=int, default=16, help="answer tokens averaged, from the end")
    ap.add_argument("--trials", type=int, default=14)
    ap.add_argument("--startup", type=int, default=6)
    ap.add_argument("--out", default="answer-direction")
    ap.add_argument("--heldout", type=int, default=None, metavar="TRIAL")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sp = splits(a.model, "--n-train", str(a.n_train))
    rows = [json.loads(line) for line in pathlib.Path(a.answers).read_text().splitlines() if line]
    if [r["prompt"] for r in rows] != list(sp.train[0]):
        raise SystemExit("the answers are not those of this split's train harmful prompts")
    first_json = json.loads(pathlib.Path(a.first).read_text())
    with pysteer.load(a.model) as m:
        b1 = block_from_json(first_json, m)
        t = time.perf_counter()
        saved = out / f"candidates-{a.positions}.npz"  # minutes to read: kept for the held-out run
        if saved.exists():
            z = np.load(saved)
            res = ExtractResult(("post",), tuple(range(m.n_layers)), 1, z["means"], z["variances"],
                                tuple(int(c) for c in z["counts"]), "chat")
        else:
            res = answer_candidates(m, b1, rows, a.tokens, a.positions)
            np.savez(saved, means=res.means, variances=res.variances, counts=np.array(res.counts))
        print(f"candidates from {res.counts[0]} refused against {res.counts[1]} complied answers, last "
              f"{a.positions} answer tokens ({time.perf_counter() - t:.0f} s)", flush=True)
        cos = [float(np.dot(res.unit_directions()[0, l, -1], b1.directions[min(l, len(b1.directions) - 1)]))
               for l in range(m.n_layers)]
        print("cosine with the first edit's direction per layer:", " ".join(f"{c:+.2f}" for c in cos), flush=True)
        if a.heldout is not None:
            return test_trial(m, Second(res, m.n_layers, b1), sp, out, a.heldout)
        judge = ProbeJudge(Judge(m), cut=a.tokens, progress=True)
        ev = Evaluator(m, *sp.val, trial_tokens=a.tokens, judge=judge)
        o = ev(b1)
        print(f"validation, unedited: {ev.base}/{ev.n_harmful}; first edit alone: {o.refusals}/{ev.n_harmful}, "
              f"KL {o.kl:.4f}", flush=True)
        r = optimize(m, Second(res, m.n_layers, b1), ev, storage=f"sqlite:///{out / 'study.db'}",
                     n_trials=a.trials, n_startup=a.startup, preserve_norms=False, projected=True,
                     settings={"answer-direction": first_json["chosen"], "val": sp.val, "n_train": a.n_train,
                               "positions": a.positions})
        print(format_front(r))
        for t in sorted(r.study.trials, key=lambda t: t.number):
            if "refusals" in t.user_attrs:
                print(f"trial {t.number}: {t.user_attrs['refusals']}/{ev.n_harmful}, KL {t.user_attrs['kl']:.4f}, "
                      f"{json.dumps(t.params)}", flush=True)


if __name__ == "__main__":
    main()
