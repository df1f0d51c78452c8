"""Does a read-out fitted to the harmful writes beat the plain rank-1 edit? Two searches side by side.

The plain edit of layer l's write y (attention output or FFN down) is ``y' = y - w r (r . y)``. The fitted one
keeps the correction ``w r`` and reads it off ``b . y`` instead, with ``b`` solving

    (alpha G + H + lam I) b = (H + lam I) r,   G, H = E[y y^T] over the harmless / harmful train writes

(the last ``--positions`` tokens of each prompt): ``b . y`` follows ``r . y`` on harmful writes and is small on
harmless ones; ``alpha = 0`` gives ``b = r``. As a weight edit it is ``W <- W - w r (b^T W)``, which the hook runs
as the write map (a, b, s) = (w r, b, 1). Both searches: heretic's space with the plain edit (no row norms),
refusals counted by the phrase matcher and the probe judge on the validation split, Optuna TPE with the same seed;
the second also draws ``alpha`` (log-uniform). Prints both fronts. With ``--fixed RESULT.json`` (an optimize
result with the plain edit) it scores that one point with the read-outs of ``--alphas`` instead.

    .venv/bin/python benchmarks/detector_search.py [--trials 30] [--model qwen2.5-coder-1.5b-instruct]
    .venv/bin/python benchmarks/detector_search.py --fixed trial39.json --alphas 0,1,3,10,30 [--positions 5]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import optuna

import pysteer
from pysteer.extraction import extract
from pysteer.interventions import BlockAblate
from pysteer.llm_judge import Judge
from pysteer.optimize import Candidates, Evaluator, block_from_json, finished, pareto, scores, suggest
from pysteer.probe_judge import ProbeJudge
from second_direction import splits


def write_grams(model, harmful, harmless, positions: int) -> dict:
    """(layer, component) -> (H, G): second moments of the harmful and harmless writes, float32."""
    out = {}
    acts = [model.capture(p, positions=positions) for p in (harmful, harmless)]  # [N, 3, L, K, E]
    for layer in range(model.n_layers):
        for k in (0, 1):
            pair = []
            for a in acts:
                y = (a[:, k + 1, layer] - a[:, k, layer]).reshape(-1, model.n_embd).astype(np.float64)
                pair.append((y.T @ y / len(y)).astype(np.float32))
            out[(layer, k)] = tuple(pair)
    return out


def read_out(block: BlockAblate, grams: dict, alpha: float, lam: float) -> BlockAblate:
    """``block`` with read-outs solved directly in n_embd dimensions (pysteer.readout solves the same in sample
    space)."""
    outs = np.zeros((len(block.attn), 2, block.directions.shape[1]))
    for layer, k in block.edited():
        H, G = (g.astype(np.float64) for g in grams[(layer, k)])
        r = block.direction(layer)
        reg = lam * np.trace(H) / len(H)
        outs[layer, k] = np.linalg.solve(alpha * G + H + reg * np.eye(len(r)), H @ r + reg * r)
    return BlockAblate(block.directions, block.attn, block.ffn, read_outs=outs)


def run(model, cands, ev, grams, *, detector: bool, trials: int, seed: int, lam: float, storage: str) -> list[dict]:
    sampler = optuna.samplers.TPESampler(n_startup_trials=10, seed=seed, multivariate=True, n_ei_candidates=128)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler, storage=storage,
                                study_name="read-out" if detector else "plain", load_if_exists=True)

    def objective(trial):
        block = cands.block(suggest(trial, model.n_layers, ("post",), (False,), (True,)))
        if detector:
            block = read_out(block, grams, trial.suggest_float("alpha", 0.1, 100.0, log=True), lam)
        o = ev(block)
        trial.set_user_attr("refusals", o.refusals)
        trial.set_user_attr("kl", o.kl)
        print(f"{'read-out' if detector else 'plain'} trial {trial.number}: {o.refusals}/{ev.n_harmful}, "
              f"KL {o.kl:.4f}" + (f", alpha {trial.params['alpha']:.2f}" if detector else ""), flush=True)
        return scores(o, ev.base, 0.01)

    todo = trials - len(finished(study))
    if todo > 0:
        study.optimize(objective, n_trials=todo, catch=(ValueError,))
    return pareto(finished(study))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--positions", type=int, default=5)
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--study", default="detector-search.db")
    ap.add_argument("--json", default="detector-search.json")
    ap.add_argument("--fixed", metavar="RESULT.json", help="score this point's read-outs instead of searching")
    ap.add_argument("--alphas", default="0,1,3,10,30")
    a = ap.parse_args()
    sp = splits(a.model)
    with pysteer.load(a.model) as m:
        t0 = time.perf_counter()
        cands = Candidates(extract(m, *sp.train, positions=1, points=("post",), progress=False), m.n_layers)
        grams = write_grams(m, *sp.train, a.positions)
        ev = Evaluator(m, *sp.val, judge=ProbeJudge(Judge(m), progress=True))
        print(f"setup {time.perf_counter() - t0:.0f} s; unsteered refusals {ev.base}/{ev.n_harmful}", flush=True)
        if a.fixed:
            with open(a.fixed) as f:
                block = block_from_json(json.load(f), m)
            for alpha in (float(x) for x in a.alphas.split(",")):
                o = ev(read_out(block, grams, alpha, a.lam))
                print(f"alpha {alpha:g}: {o.refusals}/{ev.n_harmful}, KL {o.kl:.4f}", flush=True)
            return
        fronts = {}
        for detector in (False, True):
            t0 = time.perf_counter()
            fronts[detector] = run(m, cands, ev, grams, detector=detector, trials=a.trials, seed=a.seed, lam=a.lam,
                                   storage=f"sqlite:///{a.study}")
            print(f"{'read-out' if detector else 'plain'}: {time.perf_counter() - t0:.0f} s", flush=True)
    for detector, front in fronts.items():
        print(f"front, {'read-out' if detector else 'plain'} edit (trial: refusals/{ev.n_harmful}, KL):")
        print("  " + "; ".join(f"{t['number']}: {t['refusals']}, {t['kl']:.4f}" for t in front))
    with open(a.json, "w") as f:
        json.dump({"plain": fronts[False], "read-out": fronts[True], "positions": a.positions, "lam": a.lam}, f, indent=1)


if __name__ == "__main__":
    main()
