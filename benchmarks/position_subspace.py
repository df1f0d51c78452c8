"""Does ablating the refusal directions of several template positions, not the last one alone, remove more?

The search's candidates are read at the last template token. Here the directions of the last ``k`` template
tokens (the same interpolated layer and heretic's projection as the chosen point, read on the train prompts,
unedited) are made orthonormal, starting from the chosen point's own direction, and ablated together with the
chosen point's weights times a scale: the edit of each write y is ``y - s w P y`` with P the projection onto their
span. Each (k, s) of ``--grid`` is scored on the validation split as a search scores a trial (answers of
``--tokens`` tokens counted by the probe fitted on answers cut to as many).

    .venv/bin/python benchmarks/position_subspace.py CHOSEN.json [--grid 1:1,2:1,3:1,5:1]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import numpy as np

import pysteer
from pysteer.extraction import extract
from pysteer.interventions import BlockAblate
from pysteer.llm_judge import Judge
from pysteer.optimize import Evaluator, block_from_json
from pysteer.probe_judge import ProbeJudge
from second_direction import Stack, splits


def position_directions(res, point: str, index: float) -> np.ndarray:
    """[positions, n_embd] unit directions, last token first: each interpolated between the layers around
    ``index`` with its position's harmless mean projected out (as :class:`pysteer.optimize.Candidates` does)."""
    p = res.points.index(point)
    d = res.directions[p].astype(np.float64)  # [L, T, E]
    h = res.means[1][p].astype(np.float64)
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    lo, f = int(math.floor(index)), index - math.floor(index)
    out = []
    for t in range(d.shape[1] - 1, -1, -1):
        v = (1 - f) * d[lo, t] + f * d[min(lo + 1, len(d) - 1), t]
        hh = (1 - f) * h[lo, t] + f * h[min(lo + 1, len(d) - 1), t]
        hh /= np.linalg.norm(hh)
        v -= (v @ hh) * hh
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chosen", metavar="CHOSEN.json")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--grid", default="1:1,2:1,3:1,5:1", help="k:scale pairs")
    a = ap.parse_args()
    grid = [(int(k), float(s)) for k, s in (x.split(":") for x in a.grid.split(","))]
    ks = [k for k, _ in grid]
    sp = splits(a.model)
    chosen = json.loads(pathlib.Path(a.chosen).read_text())
    params = chosen["chosen"]["params"]
    with pysteer.load(a.model) as m:
        b = block_from_json(chosen, m)
        if b.norms is not None or b.read_outs is not None or params["scope"] != "global":
            raise SystemExit("a plain global edit only")
        t = time.perf_counter()
        res = extract(m, *sp.train, positions=max(ks), points=(params["point"],), progress=False)
        dirs = position_directions(res, params["point"], params["direction_index"])
        r1 = b.directions[0].astype(np.float64)
        print(f"extraction {time.perf_counter() - t:.0f} s; cosine of the chosen direction with the recomputed "
              f"last-token one: {r1 @ dirs[0]:.4f}; with the other positions': "
              f"{', '.join(f'{r1 @ v:.3f}' for v in dirs[1:])}", flush=True)
        basis = [r1]
        for v in dirs[1:]:  # Gram-Schmidt from the chosen direction, last tokens first
            for u in basis:
                v = v - (v @ u) * u
            basis.append(v / np.linalg.norm(v))
        ev = Evaluator(m, *sp.val, trial_tokens=a.tokens, judge=ProbeJudge(Judge(m), cut=a.tokens))
        print(f"unedited: {ev.base}/{ev.n_harmful}\n\n| k | scale | refusals | first-token KL | seconds |\n"
              "|---|---|---|---|---|",
              flush=True)
        for k, sc in grid:
            t = time.perf_counter()
            o = ev(Stack([BlockAblate(u[None].astype(np.float32), sc * b.attn, sc * b.ffn) for u in basis[:k]]))
            print(f"| {k} | {sc:g} | {o.refusals}/{ev.n_harmful} | {o.kl:.4f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
