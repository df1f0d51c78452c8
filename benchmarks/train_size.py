"""Does a direction from more train prompts do better at the same search parameters? (not in CI)

Takes the Pareto front of a `pysteer optimize` JSON, rebuilds each point's edit from candidates extracted on
64, 128 and 256 train prompts per class (the harmless class has 102 at most), and scores every edit with the
search's own Evaluator on the validation and test splits together (refusals by the phrase matcher, mean
first-token KL).

    .venv/bin/python benchmarks/train_size.py MODEL OPTIMIZE.json
"""

from __future__ import annotations

import argparse
import json

import pysteer
from pysteer.datasets import PromptSplits
from pysteer.extraction import extract
from pysteer.optimize import Candidates, Evaluator, Point
from pysteer.rownorms import WriteGeometry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("result", help="a pysteer optimize JSON made for MODEL")
    ap.add_argument("--sizes", default="64,128,256")
    a = ap.parse_args()
    front = json.load(open(a.result))["front"]
    m = pysteer.load(a.model, n_ctx=8192)
    sp = PromptSplits.load(seed=0)
    ev = Evaluator(m, sp.val[0] + sp.test[0], sp.val[1] + sp.test[1])
    norms = WriteGeometry.read(m, progress=False) if any(t["params"].get("preserve_norms") for t in front) else None
    print(f"{ev.n_harmful} harmful, {len(sp.val[1] + sp.test[1])} harmless prompts; unsteered refusals {ev.base}\n")
    print("| train prompts (harmful, harmless) | trial | direction index | refusals | KL |\n|---|---|---|---|---|")
    for n in (int(x) for x in a.sizes.split(",")):
        s = PromptSplits.load(seed=0, n_train=n)
        c = Candidates(extract(m, *s.train, positions=1, points=("post",), progress=False), m.n_layers, norms)
        for t in front:
            o = ev(c.block(Point.from_params(t["params"])))
            print(f"| {len(s.train[0])}, {len(s.train[1])} | {t['number']} | {t['params']['direction_index']:.2f} | "
                  f"{o.refusals} | {o.kl:.4f} |", flush=True)
    m.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
