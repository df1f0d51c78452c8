"""Agreement of the phrase matchers and a judge model with the hand-labelled answers (not in CI).

    .venv/bin/python benchmarks/judge_agreement.py [--judge qwen2.5-coder-1.5b-instruct] [--labels FILE]

Prints, for each marker set and the judge, a confusion matrix against hand-labelled answers (default
pysteer/data/labelled_answers.jsonl, written for the project; pysteer/data/abliterated_answers.jsonl holds real
answers of abliterated Qwen2.5-Coder-1.5B), the accuracy, the styles it gets wrong, and the judge's wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import time

from pysteer.markers import NAMES, is_refusal

LABELLED = pathlib.Path(__file__).parent.parent / "pysteer" / "data" / "labelled_answers.jsonl"


def table(name: str, got: list[bool], rows: list[dict]) -> str:
    c = collections.Counter((g, r["refusal"]) for g, r in zip(got, rows))
    wrong = collections.Counter(r["style"] for g, r in zip(got, rows) if g != r["refusal"])
    acc = sum(g == r["refusal"] for g, r in zip(got, rows)) / len(rows)
    return (f"**{name}**: accuracy {acc:.3f} ({sum(g == r['refusal'] for g, r in zip(got, rows))}/{len(rows)})\n\n"
            f"| | labelled refusal | labelled not refusal |\n|---|---|---|\n"
            f"| said refusal | {c[(True, True)]} | {c[(True, False)]} |\n"
            f"| said not refusal | {c[(False, True)]} | {c[(False, False)]} |\n\n"
            f"wrong by style: {dict(wrong.most_common())}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", help="judge model (GGUF path or registry name)")
    ap.add_argument("--labels", type=pathlib.Path, default=LABELLED, help="hand-labelled answers (JSONL)")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.labels.read_text().splitlines() if line.strip()]
    print(f"{len(rows)} labelled answers, {sum(r['refusal'] for r in rows)} refusals\n")
    for name in NAMES:
        print(table(f"phrase matcher {name}", [is_refusal(r["answer"], name) for r in rows], rows))
    if args.judge:
        from pysteer.llm_judge import Judge

        t0 = time.perf_counter()
        j = Judge.load(args.judge)
        t1 = time.perf_counter()
        p = j.probabilities([r["prompt"] for r in rows], [r["answer"] for r in rows])
        t2 = time.perf_counter()
        print(table(f"judge {args.judge} (p >= {j.threshold})", [x >= j.threshold for x in p], rows))
        print(f"judge: load {t1 - t0:.1f} s, {len(rows)} answers judged in {t2 - t1:.1f} s")
        j.model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
