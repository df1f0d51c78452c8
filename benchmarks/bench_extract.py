"""Extraction time and peak memory: 128 + 128 prompts, all layers, pre/mid/post, last 5 tokens, difference of
means and variances (pysteer.extract). Peak RSS is the process's (the memory-mapped model file counts when
its pages are touched), compared with the model file's size.

    .venv/bin/python benchmarks/bench_extract.py --model qwen2.5-coder-1.5b-instruct [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import pysteer
from pysteer import datasets


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--n", type=int, default=128, help="prompts per class")
    ap.add_argument("--positions", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    harmful = datasets.load("harmful", "train")[: args.n]
    harmless = datasets.load("harmless")[: args.n]  # the whole pool: its train split alone has fewer
    t0 = time.perf_counter()
    m = pysteer.load(args.model, n_threads=args.threads)
    t_load, rss_load = time.perf_counter() - t0, rss_mb()
    t0 = time.perf_counter()
    res = pysteer.extract(m, harmful, harmless, positions=args.positions)
    t_extract = time.perf_counter() - t0
    tokens = sum(len(m.encode(p)) for p in harmful + harmless)
    file_mb = m.path.stat().st_size / 2**20
    out = {"model": args.model, "prompts": [len(harmful), len(harmless)], "tokens": tokens,
           "layers": m.n_layers, "positions": args.positions, "load_s": t_load, "extract_s": t_extract,
           "tok_s": tokens / t_extract, "file_mb": file_mb, "rss_after_load_mb": rss_load, "peak_rss_mb": rss_mb(),
           "rss_ratio": rss_mb() / file_mb, "directions_shape": list(res.directions.shape)}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{args.model}: {len(harmful)} + {len(harmless)} prompts ({tokens} tokens), {m.n_layers} layers x "
          f"pre/mid/post x {args.positions} positions: {t_extract:.1f} s ({out['tok_s']:.0f} tokens/s); "
          f"peak RSS {out['peak_rss_mb']:,.0f} MiB ({rss_load:,.0f} after loading) = "
          f"{out['rss_ratio']:.2f}x the {file_mb:,.0f} MiB file")


if __name__ == "__main__":
    main()
