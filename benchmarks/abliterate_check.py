"""Does the abliterated GGUF behave like runtime ablation? Writes it with pysteer.export.abliterate (one file
per variant), loads each in a context with no pysteer hook (plain llama.cpp through llama-cpp-python) and
compares: tensor types against the source file, next-token logits against runtime ablation (hook path) on
held-out prompts, the largest |h·r|/|h| of the file's residual stream over all layers and points (captured with
pysteer, no intervention), and refusals of greedy answers to held-out harmful prompts (base, runtime ablation,
each file).

    .venv/bin/python benchmarks/abliterate_check.py --direction DIR.gguf [--variants feedback no-feedback q8_0]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import gguf
import numpy as np

import pysteer
from pysteer import datasets
from pysteer.gguf_io import read_header
from pysteer.judge import judge
from pysteer.export import abliterate

VARIANTS = {  # name -> abliterate() keywords
    "feedback": {},
    "no-feedback": {"error_feedback": False},
    "q8_0": {"modified_type": "Q8_0"},
}


def tensor_types(path) -> dict[str, str]:
    return {name: gguf.GGMLQuantizationType(typ).name for name, _, typ, _ in read_header(path).tensors}


def max_projection(m, prompts, r) -> float:
    """Largest |h·r|/|h| over prompts, layers, points and the last 4 tokens (layer 0's input excluded: it is the
    embedding row, zero for some tokens)."""
    h = m.capture(prompts, positions=4, layers=range(1, m.n_layers)).astype(np.float64)
    return float((np.abs(h @ r) / np.linalg.norm(h, axis=-1)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--direction", required=True)
    ap.add_argument("--n", type=int, default=32, help="held-out harmful prompts to answer")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--variants", nargs="+", default=["feedback"], choices=sorted(VARIANTS))
    ap.add_argument("--keep", type=pathlib.Path, help="keep the abliterated files in this folder")
    args = ap.parse_args()

    m = pysteer.load(args.model)
    d = pysteer.load_direction(args.direction, m)
    r = d.vector / np.linalg.norm(d.vector)
    prompts = datasets.load("harmful", "test")[: args.n]
    logit_prompts = prompts[:8] + datasets.load("harmless", "test")[:8]
    res = {"model": args.model, "direction": f"{d.point} {d.layer} {d.position}", "n": len(prompts),
           "logit_prompts": len(logit_prompts), "max_tokens": args.max_tokens}
    base = judge(m, prompts, m.generate_batch(prompts, max_tokens=args.max_tokens), perplexity=False)
    with m.steer(pysteer.Ablate(d.vector), path="hook"):
        runtime = judge(m, prompts, m.generate_batch(prompts, max_tokens=args.max_tokens), perplexity=False)
        ref = m.logits_batch(logit_prompts)[:, -1]
    res["refused"] = {"base": base.n_refused, "runtime_ablation": runtime.n_refused}
    res["logits_scale"] = float(np.abs(ref).max())
    res["max_projection_source"] = max_projection(m, logit_prompts, r)
    src = tensor_types(m.path)
    folder = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="abliterate-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        out = folder / f"{pathlib.Path(m.path).stem}-abliterated-{name}.gguf"
        t0 = time.perf_counter()
        abliterate(m, d.vector, out, progress=False, **VARIANTS[name])
        t_export = time.perf_counter() - t0
        dst = tensor_types(out)
        with pysteer.load(out, hook=False) as a:
            abl = judge(a, prompts, a.generate_batch(prompts, max_tokens=args.max_tokens), perplexity=False)
            got = a.logits_batch(logit_prompts)[:, -1]
        with pysteer.load(out) as a:
            projection = max_projection(a, logit_prompts, r)
        res[name] = {
            "export_s": round(t_export, 1),
            "tensor_types_changed": sum(src[k] != dst.get(k) for k in src), "tensors": len(src),
            "logits_max_abs_diff": float(np.abs(got - ref).max()),
            "argmax_agree": int((got.argmax(-1) == ref.argmax(-1)).sum()),
            "max_projection": projection,
            "refused": abl.n_refused,
            "identical_answers_to_runtime": sum(x == y for x, y in zip(runtime.answers, abl.answers)),
        }
        if not args.keep:
            out.unlink()
        print(json.dumps({name: res[name]}), flush=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
