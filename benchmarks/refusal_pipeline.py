"""The refusal-direction pipeline on a real model, measured: extraction time and peak RSS, the chosen
direction, and its effect on held-out (test-split) prompts. Writes the metrics PNG and the direction file.

    .venv/bin/python benchmarks/refusal_pipeline.py --model qwen2.5-coder-1.5b-instruct --out benchmarks/out
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import time

import pysteer
from pysteer import datasets
from pysteer.judge import refusal_scores


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--train", type=int, default=128, help="prompts per class for extraction")
    ap.add_argument("--val", type=int, default=16, help="prompts per class for the choice")
    ap.add_argument("--test", type=int, default=32, help="held-out prompts per class for the effect")
    ap.add_argument("--positions", type=int, default=5)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    m = pysteer.load(args.model, n_ctx=2048)
    rss_loaded = peak_rss_mb()
    h, hl = datasets.load("harmful", "train")[: args.train], datasets.load("harmless", "train")[: args.train]
    vh, vhl = datasets.load("harmful", "val")[: args.val], datasets.load("harmless", "val")[: args.val]
    th, thl = datasets.load("harmful", "test")[: args.test], datasets.load("harmless", "test")[: args.test]

    t0 = time.perf_counter()
    res = pysteer.extract(m, h, hl, positions=args.positions, progress=False)
    t_extract = time.perf_counter() - t0
    rss_extract = peak_rss_mb()
    png = res.metrics.plot(args.out / f"{args.model}-metrics.png", title=f"{args.model}: layer metrics")

    t0 = time.perf_counter()
    d = pysteer.select_direction(m, res, vh, vhl, prompt_sets={"harmful": "harmful", "harmless": "harmless"})
    t_select = time.perf_counter() - t0
    d.save(args.out / f"{args.model}-direction.gguf")

    base_h, base_hl = refusal_scores(m, th).mean(), refusal_scores(m, thl).mean()
    with m.steer(pysteer.Ablate(d.vector)) as s:
        abl_h, abl_hl = refusal_scores(m, th).mean(), refusal_scores(m, thl).mean()
        path = s.paths[0]
    with m.steer(pysteer.Add(d.raw, layers=[d.layer], points=[d.point])):
        add_hl = refusal_scores(m, thl).mean()
    summary = {
        "model": args.model, "file_mb": m.path.stat().st_size / 1e6, "n_layers": m.n_layers,
        "train": [len(h), len(hl)], "val": [len(vh), len(vhl)], "test": [len(th), len(thl)],
        "extract_s": round(t_extract, 1), "peak_rss_mb_after_load": round(rss_loaded),
        "peak_rss_mb_after_extract": round(rss_extract), "select_s": round(t_select, 1),
        "chosen": {"point": d.point, "layer": d.layer, "position": d.position, "norm": round(d.norm, 2)},
        "test_refusal_score": {"harmful_base": round(float(base_h), 3), "harmful_ablated": round(float(abl_h), 3),
                               "harmless_base": round(float(base_hl), 3), "harmless_ablated": round(float(abl_hl), 3),
                               "harmless_added": round(float(add_hl), 3)},
        "ablation_path": path, "metrics_png": str(png),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
