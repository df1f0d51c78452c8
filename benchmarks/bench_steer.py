"""Steered decode speed against unsteered decode on the same llama.cpp build, context and threads.

Greedy decode of --tokens tokens after a short chat prompt (EOS ignored, so every run decodes the same
count). "plain" is a context without pysteer's callback; the other rows use pysteer's context with the
intervention installed on all layers. Rounds are interleaved (plain, then every row); a row's ratio is the
median over rounds of its tokens/s over the plain run of the same round, so slow drift of the VM cancels.
Prints a markdown table.

    .venv/bin/python benchmarks/bench_steer.py [--models qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import pysteer

PROMPT = "Write a short story about a robot learning to paint."


def hook_counters(m) -> tuple[int, float]:
    h = m.hook_stats
    return (h["data_calls"], h["callback_seconds"]) if h else (0, 0.0)


def decode_tps(m, tokens: list[int], n: int, stats: dict | None = None) -> float:
    """Tokens/s of n single-token decodes after the prompt (prompt time excluded); ``stats`` receives the
    hook's data callbacks (graph splits) and seconds inside them per token."""
    m.decode([tokens], np.array([len(tokens) - 1]))
    tok = int(np.argmax(m.logits_row(len(tokens) - 1)))
    c0, s0 = hook_counters(m)
    t0 = time.perf_counter()
    for i in range(n):
        m.decode_step([tok], [len(tokens) + i], [0])
        tok = int(np.argmax(m.logits_row(0)))
    dt = time.perf_counter() - t0
    if stats is not None:
        c1, s1 = hook_counters(m)
        stats.update(splits_per_token=(c1 - c0) / n, callback_us_per_token=(s1 - s0) / n * 1e6)
    return n / dt


def configs(n_embd: int):
    rng = np.random.default_rng(0)
    r, b2 = rng.standard_normal(n_embd), rng.standard_normal(n_embd)
    return [
        ("unsteered (pysteer context, hook idle)", [], "auto"),
        ("ablate, all layers, pre/mid/post (hook)", [pysteer.Ablate(r)], "hook"),
        ("ablate, all layers (native LoRA)", [pysteer.Ablate(r)], "native"),
        ("add, layers 1..n-1 post (hook)", [pysteer.Add(r, 0.5, layers="1:")], "hook"),
        ("add, layers 1..n-1 post (native cvec)", [pysteer.Add(r, 0.5, layers="1:")], "native"),
        ("rotate 30°, all layers, pre/mid/post (hook)", [pysteer.Rotate(r, b2, 30)], "hook"),
        ("rotate 30° adaptive, all layers (hook)", [pysteer.Rotate(r, b2, 30, adaptive=True)], "hook"),
    ]


def bench_model(name: str, n: int, repeats: int, threads: int) -> dict:
    plain = pysteer.load(name, n_ctx=1024, n_threads=threads, hook=False)
    m = pysteer.load(name, n_ctx=1024, n_threads=threads)
    tokens = m.encode(PROMPT)
    rows = []
    for label, ivs, path in configs(m.n_embd):
        if any(isinstance(iv, pysteer.Add) for iv in ivs):  # clip "all layers" to this model
            ivs = [pysteer.Add(iv.vector, iv.alpha, layers=range(1, m.n_layers)) for iv in ivs]
        rows.append((label, ivs, path))
    times: dict[str, list[float]] = {"plain llama.cpp": []}
    times.update({label: [] for label, _, _ in rows})
    stats: dict[str, dict] = {label: {} for label, _, _ in rows}
    decode_tps(plain, tokens, 8)  # warm-up
    for _ in range(repeats):  # interleaved rounds: machine drift hits every row alike
        times["plain llama.cpp"].append(decode_tps(plain, tokens, n))
        for label, ivs, path in rows:
            with m.steer(*ivs, path=path):
                times[label].append(decode_tps(m, tokens, n, stats[label]))
    plain_runs = times["plain llama.cpp"]
    rows = []
    for k, v in times.items():
        paired = [x / p for x, p in zip(v, plain_runs)]  # each round against the plain run beside it
        rows.append({"run": k, "tok_s": statistics.median(v), "ratio": statistics.median(paired),
                     "ratio_min": min(paired), "ratio_max": max(paired),
                     "ms_per_token_over_plain": 1e3 / statistics.median(v) - 1e3 / statistics.median(plain_runs),
                     **stats.get(k, {}), "all": v})
    return {"model": name, "tokens": n, "repeats": repeats, "threads": threads, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [bench_model(name, args.tokens, args.repeats, args.threads) for name in args.models]
    if args.json:
        print(json.dumps(results))
        return
    for res in results:
        print(f"\n{res['model']}: greedy decode of {res['tokens']} tokens, {res['threads']} threads, "
              f"median of {res['repeats']} interleaved rounds\n")
        print("| run | tokens/s | ratio to plain (median of rounds; min-max) | ms/token over plain "
              "| graph splits/token | µs/token in callback |")
        print("|---|---|---|---|---|---|")
        for row in res["rows"]:
            print(f"| {row['run']} | {row['tok_s']:.1f} | {row['ratio']:.3f} ({row['ratio_min']:.3f}-"
                  f"{row['ratio_max']:.3f}) | {row['ms_per_token_over_plain']:+.2f} "
                  f"| {row.get('splits_per_token', 0):.0f} | {row.get('callback_us_per_token', 0):.0f} |")


if __name__ == "__main__":
    main()
