"""Capture throughput against plain llama.cpp prompt evaluation of the same prompts.

Both sides use the same llama.cpp build (the one llama-cpp-python loaded), threads, context, batch packing
and output rows; the only difference is pysteer's eval callback capturing pre/mid/post of every layer at
the last --positions tokens. A third run captures post of one middle layer (--stop-layer) alone: llama.cpp stops
each graph there, as the probe judge's decodes do. Prints a markdown table and the ratios.

    .venv/bin/python benchmarks/bench_capture.py [--model qwen2.5-coder-0.5b-instruct] [--prompts 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import pysteer
from pysteer.jobs import quick_prompts


def make_prompts(n: int) -> list[str]:
    harmful, harmless = quick_prompts()
    base = harmful + harmless
    tails = ["", " Be brief.", " Explain each step.", " Answer in French.", " Use a numbered list.",
             " Keep it under 100 words.", " Add a short summary at the end.", " Write it for a beginner."]
    return [base[i % len(base)] + tails[(i // len(base)) % len(tails)] for i in range(n)]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--positions", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--n-batch", type=int, default=512, help="token budget per llama_decode (both sides)")
    ap.add_argument("--stop-layer", type=int, default=None, help="default the middle layer, (n_layers - 1) // 2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    prompts = make_prompts(args.prompts)
    kw = dict(n_ctx=args.n_ctx, n_threads=args.threads, n_ubatch=args.n_ubatch, n_batch=args.n_batch)
    plain = pysteer.load(args.model, hook=False, **kw)
    hooked = pysteer.load(args.model, **kw)
    n_tokens = sum(len(plain.encode(p)) for p in prompts)

    def run_plain():
        plain.logits_batch(prompts, positions=args.positions)

    def run_capture():
        hooked.capture(prompts, positions=args.positions)

    stop = (hooked.n_layers - 1) // 2 if args.stop_layer is None else args.stop_layer

    def run_stop():
        hooked.capture(prompts, layers=[stop], points=["post"], positions=args.positions)

    run_plain(), run_capture(), run_stop()  # warm-up: page in the weights, build the graphs
    t_plain, t_cap, t_stop = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all sides alike
        t_plain += timed(run_plain, 1)
        t_cap += timed(run_capture, 1)
        t_stop += timed(run_stop, 1)
    plain_tps = n_tokens / statistics.median(t_plain)
    cap_tps = n_tokens / statistics.median(t_cap)
    acts_mb = args.prompts * 3 * hooked.n_layers * args.positions * hooked.n_embd * 4 / 1e6
    res = {
        "model": args.model, "prompts": args.prompts, "tokens": n_tokens, "threads": args.threads,
        "n_ubatch": args.n_ubatch, "n_batch": args.n_batch, "positions": args.positions, "layers": hooked.n_layers,
        "plain_tok_s": plain_tps, "capture_tok_s": cap_tps, "ratio": cap_tps / plain_tps,
        "plain_s": t_plain, "capture_s": t_cap, "activations_mb": acts_mb, "stop_layer": stop, "stop_s": t_stop,
        "build": pysteer.build_info()["ggml_commit"],
    }
    if args.json:
        print(json.dumps(res))
        return
    print(f"{args.model}: {args.prompts} prompts, {n_tokens} tokens, {args.threads} threads, "
          f"n_ubatch {args.n_ubatch}, n_batch {args.n_batch}, llama.cpp {res['build']}")
    print()
    print("| run | median s | tokens/s | ratio |")
    print("|---|---|---|---|")
    print(f"| plain llama.cpp prompt eval | {statistics.median(t_plain):.2f} | {plain_tps:.1f} | 1.000 |")
    print(f"| capture pre/mid/post x {hooked.n_layers} layers x {args.positions} positions "
          f"({acts_mb:.0f} MB) | {statistics.median(t_cap):.2f} | {cap_tps:.1f} | {res['ratio']:.3f} |")
    stop_tps = n_tokens / statistics.median(t_stop)
    print(f"| capture post of layer {stop} alone (the graph stops there) | {statistics.median(t_stop):.2f} | "
          f"{stop_tps:.1f} | {stop_tps / plain_tps:.3f} |")


if __name__ == "__main__":
    main()
