"""Is a heretic front point better than pysteer's front by more than the noise? (after heretic_side_by_side.py)

Every front point of both tools is applied again to the same GGUF in pysteer's runtime (heretic's parameters
map one to one onto pysteer's edit: global or per-layer direction at post, projected, row norms kept, the same
weight kernels) and scored per prompt on the validation split: a refusal verdict per harmful prompt (the marker
set both searched with) and a first-token KL per harmless prompt. For each heretic point, pysteer's best front
point with at most as many refusals (else its fewest) is compared prompt by prompt: the KL difference with a
paired bootstrap 95% interval, and the refusal difference with an exact two-sided sign test. "Beyond the noise"
means the interval lies wholly on one side of 0.

    .venv/bin/python benchmarks/front_noise.py [--work ~/.cache/pysteer/heretic-bench]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib

import numpy as np

import pysteer
from pysteer.datasets import PromptSplits
from pysteer.extraction import extract
from pysteer.judge import kl_divergence
from pysteer.markers import marker_set
from pysteer.optimize import Candidates, Kernel, Point, pareto
from pysteer.rownorms import WriteGeometry

HERE = pathlib.Path(__file__).resolve().parent


def heretic_point(params: dict) -> Point:
    k = {c: Kernel(params[f"{h}.max_weight"], params[f"{h}.max_weight_position"],
                   params[f"{h}.min_weight"] * params[f"{h}.max_weight"], params[f"{h}.min_weight_distance"])
         for c, h in (("attn", "attn.o_proj"), ("ffn", "mlp.down_proj"))}
    return Point(params["direction_scope"], params["direction_index"], True, "post", k["attn"], k["ffn"], True)


def sign_test(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact sign test p-value of paired 0/1 verdicts."""
    n_ab, n_ba = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n, k = n_ab + n_ba, min(n_ab, n_ba)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/pysteer/heretic-bench"))
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--markers", default="heretic")
    ap.add_argument("--out", default=str(HERE / "results" / "heretic-side-by-side" / "front-noise.md"))
    ap.add_argument("--boot", type=int, default=10000)
    a = ap.parse_args()
    work = pathlib.Path(a.work)
    her = json.loads((work / "heretic-run.json").read_text())
    pys = json.loads((work / "pysteer.json").read_text())
    h_trials = {t["number"]: t for t in her["trials"]}
    h_front = pareto([{"number": t["number"], "refusals": t["refusals"], "kl": t["kl_divergence"]}
                      for t in her["trials"]])
    p_front = pys["front"]
    sp = PromptSplits.load(seed=0)
    harmful, harmless = sp.val
    found, verdict = marker_set(a.markers).found, marker_set(a.markers)
    rng = np.random.default_rng(0)
    with pysteer.load(a.model, n_ctx=8192) as m:
        points = sorted({t["params"]["point"] for t in p_front} | {"post"})
        c = Candidates(extract(m, *sp.train, positions=1, points=points, progress=False), m.n_layers,
                       WriteGeometry.read(m, progress=False))
        base = m.logits_batch(harmless)[:, -1]

        def score(point: Point):
            with m.steer(c.block(point)):
                answers = m.generate_batch(harmful, max_tokens=32, until=found)
                kl = kl_divergence(base, m.logits_batch(harmless)[:, -1])
            return np.array([verdict(x) for x in answers], int), np.asarray(kl, np.float64)

        hs = {t["number"]: score(heretic_point(h_trials[t["number"]]["params"])) for t in h_front}
        ps = {t["number"]: score(Point.from_params(t["params"])) for t in p_front}
    np.savez(work / "front-noise.npz", **{f"{tool}-{n}-{w}": v for tool, d in (("heretic", hs), ("pysteer", ps))
                                          for n, (r, k) in d.items() for w, v in (("refused", r), ("kl", k))})
    lines = [f"# Front points against the noise ({a.model}, validation split, {a.markers} markers)", "",
             "Every point re-scored in pysteer's runtime on the same GGUF, per prompt. A point of the other tool "
             "covers the row's point within the noise when its KL is not higher beyond the noise (paired bootstrap "
             f"95% interval of the KL difference over the {len(harmless)} harmless prompts, {a.boot} resamples) and "
             "its refusals are not more beyond the noise (exact sign test over the paired harmful prompts, p < "
             "0.05). A row no point covers is better than the other front beyond the noise. Shown: the covering "
             "point with the lowest KL, else the other tool's lowest KL with at most as many refusals."]
    own = {"heretic": {t["number"]: (t["refusals"], t["kl"]) for t in h_front},
           "pysteer": {t["number"]: (t["refusals"], t["kl"]) for t in p_front}}
    for name, mine, other, oname in (("heretic", hs, ps, "pysteer"), ("pysteer", ps, hs, "heretic")):
        lines += ["", f"| {name} trial | its own (refusals, KL) | re-scored | {oname} trial | re-scored | "
                  f"KL difference [95%] | refusal p | covered |", "|---|---|---|---|---|---|---|---|"]
        beaten = 0
        for num, (r_h, k_h) in mine.items():
            rows = {}
            for n, (r_p, k_p) in other.items():
                d = k_h - k_p
                idx = rng.integers(0, len(d), size=(a.boot, len(d)))
                lo, hi = np.percentile(d[idx].mean(1), [2.5, 97.5])
                p_ref = sign_test(r_h, r_p)
                covers = hi >= 0 and (r_p.sum() <= r_h.sum() or p_ref >= 0.05)
                rows[n] = (covers, k_p.mean(), r_p.sum(), d.mean(), lo, hi, p_ref)
            cov = [n for n in rows if rows[n][0]]
            ok = [n for n in rows if rows[n][2] <= r_h.sum()] or list(rows)
            n = min(cov, key=lambda n: rows[n][1]) if cov else min(ok, key=lambda n: (rows[n][1], rows[n][2]))
            covers, kp, rp, dm, lo, hi, p_ref = rows[n]
            beaten += not cov
            o = own[name][num]
            lines.append(f"| {num} | {o[0]}, {o[1]:.4f} | {r_h.sum()}, {k_h.mean():.4f} | {n} | {rp}, {kp:.4f} | "
                         f"{dm:+.4f} [{lo:+.4f}, {hi:+.4f}] | {p_ref:.2f} | {'yes' if cov else 'no'} |")
        lines += ["", f"{name} points better than {oname}'s front beyond the noise: {beaten} of {len(mine)}"]
    text = "\n".join(lines) + "\n"
    pathlib.Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
