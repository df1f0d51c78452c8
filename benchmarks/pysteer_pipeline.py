"""The refusal pipeline of the HF comparison, done with pysteer: extract at the last token of every prompt (all
layers, pre/mid/post), difference of means, ablate the direction at spec's layer/point on every layer, generate.
Same interface and output as benchmarks/hf_pipeline.py, so benchmarks/compare_hf.py can run either.

    .venv/bin/python benchmarks/pysteer_pipeline.py --gguf MODEL.gguf --spec spec.json --out result.npz
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import time

import numpy as np

import pysteer
from pysteer.files import atomic_output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    spec = json.loads(pathlib.Path(args.spec).read_text())

    t = {}
    t0 = time.perf_counter()
    m = pysteer.load(args.gguf, n_threads=args.threads)
    t["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = pysteer.extract(m, spec["harmful"], spec["harmless"], positions=1, template="chat")
    directions = res.directions[:, :, -1]  # [points, layers, E]
    t["extract"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    r = directions[res.points.index(spec["point"]), spec["layer"]]
    r = r / np.linalg.norm(r)
    with m.steer(pysteer.Ablate(r)) as s:
        answers = m.generate_batch(spec["generate"], max_tokens=spec["max_tokens"])
        path = s.paths[0]
    t["generate"] = time.perf_counter() - t0
    t["total"] = sum(t.values())

    n_gen = [len(m.tokenize(a, add_special=False)) for a in answers]
    n_prompt = sum(len(m.encode(p)) for p in spec["harmful"] + spec["harmless"])
    with atomic_output(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, directions=directions.astype(np.float32), points=np.array(res.points),
                     seconds=json.dumps(t), answers=json.dumps(answers), generated_tokens=np.array(n_gen),
                     n_prompt_tokens=n_prompt, ablation_path=path)
    print(json.dumps({"seconds": {k: round(v, 1) for k, v in t.items()}, "prompt_tokens": n_prompt,
                      "generated_tokens": int(sum(n_gen)), "ablation_path": path,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
