"""All of pysteer's benchmarks in one run, on each model: capture vs plain prompt evaluation, steered vs
unsteered decode, extraction memory, and the whole refusal pipeline against HF transformers. Prints one
markdown table of ratios against their targets and writes a PNG (and the raw results as JSON).

    .venv/bin/python benchmarks/run_all.py [--models M ...] [--out benchmarks/out]   (make bench)

Each part runs in its own process, one after another: the machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
MODELS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]


def run_json(args: list[str]):
    t0 = time.perf_counter()
    print("$", " ".join(["python"] + args), file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable] + args, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return json.loads(out.strip().splitlines()[-1])


def rows_for(model: str, r: dict) -> list[tuple[str, float, str, bool]]:
    """(measure, value, target, met) for one model's results."""
    rows = [("capture / plain prompt eval", r["capture"]["ratio"], ">= 0.95", r["capture"]["ratio"] >= 0.95)]
    for row in r["steer"]["rows"]:  # ratio: median over rounds of steered / plain llama.cpp of the same round
        name, ratio = row["run"], row["ratio"]
        if name.startswith(("ablate", "add", "rotate")):
            target = 0.99 if "native" in name else 0.95
            rows.append((f"decode: {name} / plain llama.cpp", ratio, f">= {target}", ratio >= target))
    e = r["extract"]
    rows.append(("extraction peak RSS / model file", e["rss_ratio"], "<= 1.5", e["rss_ratio"] <= 1.5))
    if "hf" in r:
        s = r["hf"]["speedup"]
        rows.append(("whole pipeline: transformers time / pysteer time", s, ">= 5", s >= 5))
        rows.append(("direction cosine, pysteer vs transformers", r["hf"]["cosine_at_layer"], "~1", True))
    return rows


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 6), squeeze=False)
    for ax, (model, r) in zip(axes[0], results.items()):
        rows = [x for x in rows_for(model, r) if not x[0].startswith("direction cosine")]
        names = [x[0].replace("decode: ", "").replace(" / unsteered", "") for x in rows]
        targets = [float(x[2].split()[-1]) for x in rows]
        vals = [x[1] / t for x, t in zip(rows, targets)]  # 1 = exactly on target
        good = [x[3] for x in rows]
        ax.barh(range(len(rows)), vals, color=["tab:green" if g else "tab:red" for g in good])
        ax.axvline(1, color="k", lw=1)
        ax.set_yticks(range(len(rows)), [f"{n} ({x[1]:.2f}; {x[2]})" for n, x in zip(names, rows)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("measured / target (green: target met)")
        ax.set_title(model)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "out")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the capture benchmark")
    ap.add_argument("--steer-repeats", type=int, default=7, help="rounds of the decode benchmark")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    results: dict = {}
    steer = run_json([str(HERE / "bench_steer.py"), "--json", "--repeats", str(args.steer_repeats), "--models",
                      *args.models])
    for model in args.models:
        r = results[model] = {"steer": next(x for x in steer if x["model"] == model)}
        r["capture"] = run_json([str(HERE / "bench_capture.py"), "--model", model, "--json",
                                 "--repeats", str(args.repeats)])
        r["extract"] = run_json([str(HERE / "bench_extract.py"), "--model", model, "--json"])
        if not args.no_hf:
            j = args.out / f"{model}-hf.json"
            subprocess.run([sys.executable, str(HERE / "compare_hf.py"), "--model", model, "--json", str(j)],
                           check=True)
            r["hf"] = json.loads(j.read_text())
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    png = args.out / "benchmarks.png"
    plot(results, png)

    print(f"\n## pysteer benchmarks ({time.perf_counter() - t0:.0f} s)\n")
    print("| model | measure | value | target | met |")
    print("|---|---|---|---|---|")
    for model, r in results.items():
        for name, value, target, met in rows_for(model, r):
            print(f"| {model} | {name} | {value:.3f} | {target} | {'yes' if met else '**no**'} |")
    for model, r in results.items():
        if "hf" in r:
            t = r["hf"]["tools"]
            print(f"\n{model}: whole pipeline pysteer {t['pysteer']['wall_s']:.0f} s, {t['pysteer']['peak_rss_mb']:,.0f} MB; "
                  f"transformers {t['hf']['wall_s']:.0f} s, {t['hf']['peak_rss_mb']:,.0f} MB")
    print(f"\ngraph: {png}\nraw results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
