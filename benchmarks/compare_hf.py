"""The same refusal pipeline in pysteer and in HF transformers (PyTorch forward hooks, CPU), on the same GGUF
weights: extract 128 + 128 prompts at all layers (last token, pre/mid/post), difference of means, ablate the
direction at one layer on every layer, generate 32 x 64 tokens. Each tool runs in a fresh process; wall time and
peak RSS are the process's. Prints a markdown table and the cosine between the two tools' directions.

    .venv/bin/python benchmarks/compare_hf.py --model qwen2.5-coder-0.5b-instruct [--json out.json]

Needs torch and transformers (``pip install torch==2.13.0 transformers``: see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from pysteer import datasets, models
from pysteer.gguf_io import read_header
from pysteer.model import resolve_path

HERE = pathlib.Path(__file__).resolve().parent


def n_layers(path: pathlib.Path) -> int:
    kv = read_header(path).kv  # not gguf.GGUFReader: it parses the whole vocabulary (seconds)
    return int(kv[f"{kv['general.architecture']}.block_count"])


def run_tool(script: str, gguf_path, spec_path, out_path, threads: int) -> dict:
    """Runs one pipeline script in a fresh process; its wall time, peak RSS and result."""
    cmd = [sys.executable, str(HERE / script), "--gguf", str(gguf_path), "--spec", str(spec_path),
           "--out", str(out_path), "--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout = proc.stdout.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed with exit code {proc.returncode}")
    r = np.load(out_path)
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "seconds": json.loads(str(r["seconds"])),
            "directions": r["directions"], "points": [str(p) for p in r["points"]],
            "generated_tokens": int(r["generated_tokens"].sum()), "answers": json.loads(str(r["answers"])),
            "summary": json.loads(stdout.strip().splitlines()[-1])}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide((a * b).sum(-1), den, out=np.full(den.shape, np.nan), where=den > 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="registry name or GGUF path")
    ap.add_argument("--n-train", type=int, default=128, help="prompts per class for extraction")
    ap.add_argument("--n-gen", type=int, default=32, help="prompts to generate for")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--layer", type=int, default=None, help="direction's layer (default 60%% of the depth)")
    ap.add_argument("--point", default="post", choices=["pre", "mid", "post"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tools", default="pysteer,hf", help="which pipelines to run (comma-separated)")
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = ap.parse_args()

    path = resolve_path(args.model)
    L = n_layers(path)
    harmless = datasets.load("harmless")  # the whole pool: its train split alone has fewer than 128
    spec = {"harmful": datasets.load("harmful", "train")[: args.n_train], "harmless": harmless[: args.n_train],
            "generate": datasets.load("harmful", "test")[: args.n_gen], "max_tokens": args.max_tokens,
            "layer": args.layer if args.layer is not None else round(0.6 * L), "point": args.point}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = pathlib.Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for tool in args.tools.split(","):
            script = {"pysteer": "pysteer_pipeline.py", "hf": "hf_pipeline.py"}[tool]
            print(f"running {tool} ...", file=sys.stderr, flush=True)
            results[tool] = run_tool(script, path, spec_path, pathlib.Path(tmp) / f"{tool}.npz", args.threads)

    name = args.model if args.model in models.REGISTRY else path.name
    file_mb = path.stat().st_size / 1e6
    print(f"\n{name} ({file_mb:,.0f} MB file, {L} layers): {len(spec['harmful'])} + {len(spec['harmless'])} "
          f"prompts extracted, ablation of {spec['point']} of layer {spec['layer']}, "
          f"{len(spec['generate'])} x {spec['max_tokens']} tokens generated\n")
    print("| tool | load s | extract s | generate s (tokens) | whole pipeline s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for tool, r in results.items():
        s = r["seconds"]
        print(f"| {tool} | {s['load']:.1f} | {s['extract']:.1f} | {s['generate']:.1f} ({r['generated_tokens']}) | "
              f"{r['wall_s']:.1f} | {r['peak_rss_mb']:,.0f} |")
    out = {"model": name, "file_mb": file_mb, "n_layers": L,
           "spec": {k: v for k, v in spec.items() if k in ("layer", "point", "max_tokens")},
           "n": [len(spec["harmful"]), len(spec["harmless"]), len(spec["generate"])],
           "tools": {t: {k: v for k, v in r.items() if k != "directions"} for t, r in results.items()}}
    if len(results) == 2:
        a, b = results["pysteer"], results["hf"]
        cos = cosines(a["directions"].astype(np.float64), b["directions"].astype(np.float64))  # [P, L]
        p = a["points"].index(spec["point"])
        out["speedup"] = b["wall_s"] / a["wall_s"]
        out["cosine_at_layer"] = float(cos[p, spec["layer"]])
        # NaN where both directions are zero (pre of layer 0: every prompt ends in the same template token)
        out["cosine_min"] = float(np.nanmin(cos))
        out["cosine_median"] = float(np.nanmedian(cos))
        print(f"\nwhole pipeline: pysteer {out['speedup']:.1f}x faster than transformers; "
              f"direction cosine at {spec['point']} {spec['layer']}: {out['cosine_at_layer']:.4f} "
              f"(all layers and points: median {out['cosine_median']:.4f}, min {out['cosine_min']:.4f})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
