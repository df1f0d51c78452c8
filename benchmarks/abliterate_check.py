"""Does the abliterated GGUF behave like runtime ablation? Writes it with pysteer.export.abliterate, then loads
it in a context with no pysteer hook (plain llama.cpp through llama-cpp-python) and compares: tensor types
against the source file, next-token logits against runtime ablation (hook path) on held-out prompts, and
refusals of greedy answers to held-out harmful prompts (base, runtime ablation, abliterated file).

    .venv/bin/python benchmarks/abliterate_check.py --model qwen2.5-coder-1.5b-instruct --direction DIR.gguf
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
from pysteer._gguf import read_header
from pysteer.evaluate import judge
from pysteer.export import abliterate


def tensor_types(path) -> dict[str, str]:
    return {name: gguf.GGMLQuantizationType(typ).name for name, _, typ, _ in read_header(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--direction", required=True)
    ap.add_argument("--n", type=int, default=32, help="held-out harmful prompts to answer")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--keep", type=pathlib.Path, help="keep the abliterated file here")
    ap.add_argument("--modified-type", help="store the edited matrices in this type (e.g. Q8_0), not their own")
    args = ap.parse_args()

    m = pysteer.load(args.model)
    d = pysteer.load_direction(args.direction, m)
    prompts = datasets.load("harmful", "test")[: args.n]
    harmless = datasets.load("harmless", "test")[:8]
    with tempfile.TemporaryDirectory(dir=args.keep.parent if args.keep else None) as tmp:
        out = args.keep or pathlib.Path(tmp) / "abliterated.gguf"
        t0 = time.perf_counter()
        abliterate(m, d.vector, out, modified_type=args.modified_type, progress=False)
        t_export = time.perf_counter() - t0
        src, dst = tensor_types(m.path), tensor_types(out)
        changed = {k: (src[k], dst.get(k)) for k in src if src[k] != dst.get(k)}

        base = judge(m, prompts, m.generate_batch(prompts, max_tokens=args.max_tokens), perplexity=False)
        with m.steer(pysteer.Ablate(d.vector), path="hook"):
            runtime = judge(m, prompts, m.generate_batch(prompts, max_tokens=args.max_tokens), perplexity=False)
            ref = m.logits_batch(prompts[:8] + harmless)[:, -1]
        with pysteer.load(out, hook=False) as a:
            abl = judge(a, prompts, a.generate_batch(prompts, max_tokens=args.max_tokens), perplexity=False)
            got = a.logits_batch(prompts[:8] + harmless)[:, -1]
    same_answer = sum(x == y for x, y in zip(runtime.answers, abl.answers))
    res = {
        "model": args.model, "direction": f"{d.point} {d.layer} {d.position}", "export_s": round(t_export, 1),
        "modified_type": args.modified_type,
        "tensors": len(src), "tensor_types_changed": changed,
        "logits_max_abs_diff": float(np.abs(got - ref).max()), "logits_scale": float(np.abs(ref).max()),
        "argmax_agree": int((got.argmax(-1) == ref.argmax(-1)).sum()), "logit_prompts": len(ref),
        "refused": {"base": base.n_refused, "runtime_ablation": runtime.n_refused, "abliterated": abl.n_refused},
        "n": len(prompts), "identical_answers_runtime_vs_abliterated": same_answer,
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
