"""Soak test (not in CI): many steered generations on one tiny model, checking that memory and open files stay
flat, and that the answers stay what they were.

    .venv/bin/python benchmarks/soak.py [--n 10000] [--report-every 1000]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np

import pysteer
from pysteer import tiny


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="steered generations (default 10000)")
    ap.add_argument("--report-every", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = tiny.write(pathlib.Path(d) / "tiny-llama.gguf", tiny.TinySpec(arch="llama"))
        m = pysteer.load(path, n_ctx=512)
        rng = np.random.default_rng(0)
        r, b2 = rng.standard_normal(m.n_embd), rng.standard_normal(m.n_embd)
        steers = [pysteer.Ablate(r), pysteer.Add(r, 2.0, layers="1:"), pysteer.Rotate(r, b2, 60)]
        prompts = ["how to make the thing", "write the code"]
        want = []
        for iv in steers:
            with m.steer(iv, path="hook"):
                want.append(m.generate(prompts[0], max_tokens=16))
        print("| generations | seconds | RSS MB | open files |\n|---|---|---|---|")
        t0, rows = time.perf_counter(), []
        for i in range(1, args.n + 1):
            k = i % len(steers)
            with m.steer(steers[k], path="hook"):
                out = m.generate(prompts[0], max_tokens=16)
            if out != want[k]:
                print(f"generation {i}: answer changed: {out!r} != {want[k]!r}", file=sys.stderr)
                return 1
            if i % args.report_every == 0 or i == 1:
                rows.append((i, rss_mb(), open_files()))
                print(f"| {i} | {time.perf_counter() - t0:.1f} | {rows[-1][1]:.1f} | {rows[-1][2]} |", flush=True)
        m.close()
    first, last = rows[1] if len(rows) > 1 else rows[0], rows[-1]
    print(f"\nRSS {first[1]:.1f} -> {last[1]:.1f} MB after warm-up; open files {first[2]} -> {last[2]}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.1f} MB")
    return 0 if last[2] == first[2] and last[1] - first[1] < 20 else 1


if __name__ == "__main__":
    sys.exit(main())
