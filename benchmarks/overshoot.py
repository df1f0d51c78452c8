"""Do the deflections a chosen point leaves go when its edit is made stronger than heretic's range allows?

The search draws a component's weight up to 1.5 (heretic's range); at w = 1 the edit removes a write's part along
r, above 1 it reverses part of it. Here the chosen point's weights, every layer and both components, are scaled
by each of ``--scales`` and scored on the validation split as a search scores a trial, answers of ``--tokens``
tokens counted by the probe fitted on answers cut to as many.

    .venv/bin/python benchmarks/overshoot.py CHOSEN.json [--scales 1,1.5,2,3]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import pysteer
from pysteer.interventions import BlockAblate
from pysteer.llm_judge import Judge
from pysteer.optimize import Evaluator, block_from_json
from pysteer.probe_judge import ProbeJudge
from second_direction import splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chosen", metavar="CHOSEN.json")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--scales", default="1,1.5,2,3")
    a = ap.parse_args()
    sp = splits(a.model)
    with pysteer.load(a.model) as m:
        b = block_from_json(json.loads(pathlib.Path(a.chosen).read_text()), m)
        if b.norms is not None or b.read_outs is not None:
            raise SystemExit("a plain edit only: scaled, its weights are the whole of it")
        ev = Evaluator(m, *sp.val, trial_tokens=a.tokens, judge=ProbeJudge(Judge(m), cut=a.tokens))
        print(f"unedited: {ev.base}/{ev.n_harmful}; largest weight at scale 1: attention {b.attn.max():.3f}, "
              f"FFN {b.ffn.max():.3f}\n")
        print("| scale | refusals | first-token KL | seconds |\n|---|---|---|---|", flush=True)
        for k in map(float, a.scales.split(",")):
            t = time.perf_counter()
            o = ev(BlockAblate(b.directions, k * b.attn, k * b.ffn))
            print(f"| {k:g} | {o.refusals}/{ev.n_harmful} | {o.kl:.4f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
