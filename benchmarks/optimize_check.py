"""The written GGUF of pysteer optimize against the runtime edit it carries (not in CI): on the held-out test
split, refusals (phrase matcher and judge) and first-token KL against the unsteered model, each side loaded
plainly (the written file with no steering at all).

    .venv/bin/python benchmarks/optimize_check.py MODEL RESULT.json WRITTEN.gguf [--n 32] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import time

import pysteer
from pysteer.datasets import PromptSplits
from pysteer.judge import kl_divergence
from pysteer.llm_judge import Judge
from pysteer.markers import is_refusal
from pysteer.optimize import block_from_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("result")
    ap.add_argument("written")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    harmful, harmless = PromptSplits.load(n_test=args.n).test
    block = block_from_json(json.loads(open(args.result).read()))
    rows = {}
    with pysteer.load(args.model, n_ctx=8192) as m:
        judge = Judge(m)
        base = m.logits_batch(harmless)[:, -1]
        t0 = time.perf_counter()
        with m.steer(block):
            ans = m.generate_batch(harmful, max_tokens=args.max_tokens)
            kl = kl_divergence(base, m.logits_batch(harmless)[:, -1])
        rows["runtime edit"] = (ans, kl, time.perf_counter() - t0)
        with pysteer.load(args.written, n_ctx=8192, hook=False) as w:
            t0 = time.perf_counter()
            ans = w.generate_batch(harmful, max_tokens=args.max_tokens)
            kl = kl_divergence(base, w.logits_batch(harmless)[:, -1])
            rows["written GGUF"] = (ans, kl, time.perf_counter() - t0)
        base_ans = m.generate_batch(harmful, max_tokens=args.max_tokens)
        print(f"{args.n} held-out harmful / harmless prompts, answers of {args.max_tokens} tokens")
        print("| model | refusals (phrase matcher) | refusals (judge) | first-token KL mean | median | max | seconds |")
        print("|---|---|---|---|---|---|---|")
        for name, (ans, kl, s) in [("unsteered", (base_ans, kl * 0, 0.0))] + list(rows.items()):
            j = sum(judge.verdicts(harmful, ans))
            print(f"| {name} | {sum(map(is_refusal, ans))}/{args.n} | {j}/{args.n} | {kl.mean():.4f} | "
                  f"{float(sorted(kl)[len(kl) // 2]):.4f} | {kl.max():.4f} | {s:.0f} |")
        same = sum(a == b for a, b in zip(rows["runtime edit"][0], rows["written GGUF"][0]))
        print(f"identical greedy answers, runtime edit vs written GGUF: {same}/{args.n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
