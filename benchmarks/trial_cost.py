"""Where a `pysteer optimize` trial's time goes, against plain llama.cpp doing the same decoding.

A trial is two jobs on the validation split: the first-token logits of the harmless prompts (for the KL) and
32-token greedy answers to the harmful prompts (for the refusal count). This runs both jobs with a trial's edit
(a row-norm-preserving global ablation through pysteer's hook) and the same jobs on a plain llama.cpp context of
the same build (no eval callback, no edit), in alternating rounds, and prints the tokens each job decodes and its
time. A ratio near 1 says a trial costs what llama.cpp's own arithmetic on those tokens costs.

    .venv/bin/python benchmarks/trial_cost.py [--model qwen2.5-coder-0.5b-instruct] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pysteer
from pysteer.batching import shared_prefix
from pysteer.datasets import PromptSplits
from pysteer.extraction import extract
from pysteer.markers import marker_set
from pysteer.optimize import Candidates, Kernel, Point
from pysteer.rownorms import WriteGeometry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trial-tokens", type=int, default=32)
    a = ap.parse_args()
    sp = PromptSplits.load(seed=0)
    harmful, harmless = sp.val
    kw = dict(n_ctx=8192)
    hooked, plain = pysteer.load(a.model, **kw), pysteer.load(a.model, hook=False, **kw)
    L = hooked.n_layers
    res = extract(hooked, *sp.train, positions=1, points=("post",), progress=False)
    c = Candidates(res, L, WriteGeometry.read(hooked, progress=False))
    point = Point("global", 0.85 * (L - 1), True, "post", Kernel(1.3, 0.75 * (L - 1), 0.8, 0.3 * (L - 1)),
                  Kernel(0.9, 0.85 * (L - 1), 0.3, 0.15 * (L - 1)), preserve_norms=True)
    block = c.block(point)
    found = marker_set("heretic").found
    toks_hl, toks_h = hooked.encode_prompts(harmless), hooked.encode_prompts(harmful)
    # decoded once per pack, as batching decodes them
    pre_hl, pre_h = shared_prefix(toks_hl, 1), shared_prefix(toks_h, 1)
    jobs = {
        "harmless first-token logits": lambda m: m.logits_batch(harmless),
        f"harmful answers, {a.trial_tokens} tokens": lambda m: m.generate_batch(harmful, max_tokens=a.trial_tokens),
        f"harmful answers, {a.trial_tokens} tokens, ended at a refusal marker":
            lambda m: m.generate_batch(harmful, max_tokens=a.trial_tokens, until=found),
    }
    times = {(j, side): [] for j in jobs for side in ("trial", "plain")}
    answers = {}
    for _ in range(a.rounds):
        for j, fn in jobs.items():
            for side, m in (("trial", hooked), ("plain", plain)):
                t0 = time.perf_counter()
                if side == "trial":
                    with m.steer(block):
                        out = fn(m)
                else:
                    out = fn(m)
                times[(j, side)].append(time.perf_counter() - t0)
                answers[(j, side)] = out

    def gen_tokens(texts):
        return sum(len(hooked.tokenize(t, add_special=False)) for t in texts)

    print(f"{a.model}, {a.rounds} rounds (median s); the prompts share a {pre_hl}-token (harmless) and {pre_h}-token "
          "(harmful) prefix, decoded once per pack")
    print("| job | tokens decoded, trial / plain | trial s | plain s | ratio |")
    print("|---|---|---|---|---|")
    for j in jobs:
        if j.startswith("harmless"):
            n = sum(len(t) - pre_hl for t in toks_hl) + pre_hl
            tok = f"{n} / {n}"
        else:
            pre = sum(len(t) - pre_h for t in toks_h) + pre_h
            tok = f"{pre} + {gen_tokens(answers[(j, 'trial')])} / {pre} + {gen_tokens(answers[(j, 'plain')])}"
        t, p = statistics.median(times[(j, "trial")]), statistics.median(times[(j, "plain")])
        print(f"| {j} | {tok} | {t:.2f} | {p:.2f} | {t / p:.3f} |")
    refused = sum(map(marker_set("heretic"), answers[(list(jobs)[1], "trial")]))
    print(f"trial's refusals (heretic markers): {refused}/{len(harmful)}")


if __name__ == "__main__":
    main()
