"""Refusals against answer length (not in CI): how many refusals do the phrase matchers (and a judge model) see
in the first 32, 64, 128 and 256 tokens of base and ablated answers to held-out prompts?

    .venv/bin/python benchmarks/length_curve.py [--model NAME] [--n 32] [--judge MODEL]

Answers are generated once at the longest length, greedy, and cut at each shorter length: greedy decoding is
deterministic, so the first k tokens of a 256-token answer are the k-token answer. The answers are kept in
benchmarks/results/ (reused by later runs with the same settings); the direction is extracted and chosen on the
train and validation splits, as ablate-test does.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import pysteer
from pysteer.datasets import PromptSplits
from pysteer.direction import load_direction
from pysteer.interventions import Ablate
from pysteer.jobs import find_direction
from pysteer.markers import NAMES, is_refusal

LENGTHS = (32, 64, 128, 256)
RESULTS = pathlib.Path(__file__).parent / "results"


def cut(model, text: str, k: int) -> str:
    """The first k tokens of an answer (re-tokenized)."""
    return model.detokenize(model.tokenize(text, add_special=False)[:k])


def answers(model, args) -> dict:
    path = RESULTS / f"length-{model.path.stem}-n{args.n}.json"
    if path.is_file():
        return json.loads(path.read_text())
    splits = PromptSplits.load(n_test=args.n)
    dpath = RESULTS / f"direction-{model.path.stem}.gguf"
    t0 = time.perf_counter()
    if dpath.is_file():
        d = load_direction(dpath, model)
    else:
        d, _, _ = find_direction(model, splits, verbose=False)
        d.save(dpath)
    t1 = time.perf_counter()
    harmful, harmless = splits.test
    out = {"model": model.path.name, "max_tokens": LENGTHS[-1], "harmful": harmful, "harmless": harmless,
           "direction": {"point": d.point, "layer": d.layer, "position": d.position}}
    for name, ivs in (("base", ()), ("ablated", (Ablate(d.vector),))):
        with model.steer(*ivs):
            t = time.perf_counter()
            out[name] = {"harmful": model.generate_batch(harmful, max_tokens=LENGTHS[-1], progress=True),
                         "harmless": model.generate_batch(harmless, max_tokens=LENGTHS[-1], progress=True)}
            out[name]["seconds"] = round(time.perf_counter() - t, 1)
    out["direction_seconds"] = round(t1 - t0, 1)
    path.write_text(json.dumps(out, indent=1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--judge", help="also judge with this GGUF (path or registry name; 'self' for the model)")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    with pysteer.load(args.model, n_ctx=8192) as m:
        a = answers(m, args)
        judge = None
        if args.judge:
            from pysteer.llm_judge import Judge
            judge = Judge(m) if args.judge == "self" else Judge.load(args.judge)
        rows = []
        for k in LENGTHS:
            for name in ("base", "ablated"):
                for cls in ("harmful", "harmless"):
                    texts = [cut(m, t, k) for t in a[name][cls]]
                    row = {"tokens": k, "model": name, "prompts": cls, "n": len(texts)}
                    for s in NAMES:
                        row[s] = sum(is_refusal(t, s) for t in texts)
                    if judge is not None:
                        row["judge"] = sum(judge.verdicts(a[cls], texts))
                    rows.append(row)
        cols = list(NAMES) + (["judge"] if judge is not None else [])
        print(f"{a['model']}: refusals in the first k tokens of greedy answers to {args.n} held-out prompts per class")
        print(f"| tokens | answers | prompts | " + " | ".join(cols) + " |")
        print("|---" * (3 + len(cols)) + "|")
        for r in rows:
            print(f"| {r['tokens']} | {r['model']} | {r['prompts']} | " + " | ".join(f"{r[c]}/{r['n']}" for c in cols)
                  + " |")
        print(f"generation seconds at {LENGTHS[-1]} tokens: base {a['base']['seconds']}, "
              f"ablated {a['ablated']['seconds']}")
        (RESULTS / f"length-{m.path.stem}-n{args.n}-table.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
