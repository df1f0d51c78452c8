"""pysteer optimize against heretic 1.4.0, side by side on one GGUF (not in CI; run it alone on the machine).

Both tools get the same prompts (pysteer's train split for the directions, its validation split for the trials),
the same chat text (heretic's system prompt set to the one the GGUF's template inserts), the same number of
trials and random startup trials, and the same answer length per trial. heretic runs on CPU torch in its own
environment, on the GGUF dequantized to float32 by transformers. Afterwards each tool's chosen point (pysteer's
rule for both: the lowest KL with at most 3% of the validation harmful prompts refused) answers the held-out
test split, judged the same way for both (phrase matchers and the judge model), and its first-token KL is taken
against its own unedited model.

    python -m venv H && H/bin/pip install torch==2.13.0 && H/bin/pip install torch==2.13.0 heretic-llm==1.4.0 gguf
    .venv/bin/python benchmarks/heretic_side_by_side.py --heretic-python H/bin/python [--trials 30]

Writes OUT/side-by-side.md, OUT/side-by-side.json and OUT/fronts.png (OUT: --out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def timed(cmd, log: pathlib.Path, cwd=None) -> tuple[int, float, float]:
    """Exit code, wall seconds and peak RSS (GB) of a command (GNU time), its output in ``log``."""
    rss = log.with_suffix(".rss")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(["/usr/bin/time", "-o", str(rss), "-f", "%M"] + [str(c) for c in cmd], cwd=cwd,
                             stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return rc, wall, int(rss.read_text().split()[-1]) / 1e6


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def heretic_config(a, hf: pathlib.Path, data: pathlib.Path) -> str:
    def ds(name):
        return f'{{ dataset = {toml_str(str(data / name))}, split = "train", column = "text" }}'
    return "\n".join([
        f"model = {toml_str(str(hf))}",
        'dtypes = ["float32"]',
        f"batch_size = {a.batch_size}",
        f"max_response_length = {a.trial_tokens}",
        f"n_trials = {a.trials}",
        f"n_startup_trials = {a.startup}",
        f"seed = {a.seed}",
        f"system_prompt = {toml_str(QWEN_SYSTEM)}",
        'study_checkpoint_dir = "checkpoints"',
        f"good_prompts = {ds('train_harmless')}",
        f"bad_prompts = {ds('train_harmful')}",
        f"good_evaluation_prompts = {ds('val_harmless')}",
        f"bad_evaluation_prompts = {ds('val_harmful')}",
    ]) + "\n"


def run_heretic(a, work: pathlib.Path, splits) -> dict:
    hp = a.heretic_python
    hf, data, run = work / "hf", work / "data", work / "heretic-run"
    side = HERE / "heretic_side.py"
    if not (hf / "config.json").exists():
        t0 = time.perf_counter()
        subprocess.check_call([hp, side, "convert", a.gguf, hf])
        print(f"dequantized {a.gguf} into {hf} in {time.perf_counter() - t0:.0f} s", flush=True)
    shutil.rmtree(data, ignore_errors=True)
    (work / "prompts.json").write_text(json.dumps({
        "train_harmful": splits.train[0], "train_harmless": splits.train[1],
        "val_harmful": splits.val[0], "val_harmless": splits.val[1]}))
    subprocess.check_call([hp, side, "prompts", work / "prompts.json", data])
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "config.toml").write_text(heretic_config(a, hf, data))
    heretic = pathlib.Path(hp).with_name("heretic")
    print(f"heretic: {a.trials} trials ...", flush=True)
    rc, wall, rss = timed([heretic], work / "heretic.log", cwd=run)
    studies = list((run / "checkpoints").glob("*.jsonl"))
    if len(studies) != 1:
        raise SystemExit(f"heretic wrote no study (exit {rc}); see {work / 'heretic.log'}")
    subprocess.check_call([hp, side, "trials", studies[0], work / "heretic-trials.json"])
    out = json.loads((work / "heretic-trials.json").read_text())
    # heretic ends at an interactive menu; with no terminal it exits there, after the study is complete
    if len(out["trials"]) != a.trials:
        raise SystemExit(f"heretic finished {len(out['trials'])} of {a.trials} trials (exit {rc}); see the log")
    return {"wall": wall, "rss_gb": rss, "exit": rc, **out}


def run_pysteer(a, work: pathlib.Path) -> dict:
    base = work / "pysteer"
    for f in work.glob("pysteer*"):
        f.unlink()
    exe = pathlib.Path(sys.executable).with_name("pysteer")
    print(f"pysteer: {a.trials} trials ...", flush=True)
    rc, wall, rss = timed([exe, "optimize", a.model, "-o", f"{base}.gguf", "--trials", a.trials, "--startup",
                           a.startup, "--trial-tokens", a.trial_tokens, "--seed", a.seed, "--markers", a.markers,
                           "--quiet"],
                          work / "pysteer.log")
    if rc != 0:
        raise SystemExit(f"pysteer optimize failed (exit {rc}); see {work / 'pysteer.log'}")
    import optuna
    from pysteer.optimize import finished

    res = json.loads(pathlib.Path(f"{base}.json").read_text())
    study = optuna.load_study(study_name=res["study"]["name"], storage=f"sqlite:///{base}.study.db")
    seconds = {t.number: (t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
               if t.datetime_complete is not None}
    trials = [{"number": t["number"], "refusals": t["refusals"], "kl": t["kl"], "seconds": seconds[t["number"]]}
              for t in finished(study)]
    write = re.search(r"abliterated model: .* \((\d+) s\)", (work / "pysteer.log").read_text())
    return {"wall": wall, "rss_gb": rss, "result": res, "trials": trials,
            "write_s": float(write.group(1)) if write else None}


def heldout(a, work: pathlib.Path, splits, her: dict, pys: dict) -> dict:
    import pysteer
    from pysteer.judge import kl_divergence
    from pysteer.optimize import block_from_json, pareto, pick

    n_val = len(splits.val[0])
    max_ref = max(0, int(0.03 * n_val))
    h_trials = [{"number": t["number"], "refusals": t["refusals"], "kl": t["kl_divergence"], **t}
                for t in her["trials"]]
    h_front = pareto(h_trials)
    h_chosen, rule = pick(h_front, max_ref, n_val)
    chosen = json.dumps({**h_chosen, "response_prefix": her["response_prefix"], "max_tokens": a.max_tokens,
                         "test": list(splits.test)})
    done = work / "heretic-heldout.json"
    if "heretic" not in a.skip or not done.exists() or (work / "heretic-chosen.json").read_text() != chosen:
        (work / "heretic-chosen.json").write_text(chosen)
        (work / "test.json").write_text(json.dumps(list(splits.test)))
        print(f"heretic trial {h_chosen['number']} ({rule}) on the held-out split ...", flush=True)
        subprocess.check_call([a.heretic_python, HERE / "heretic_side.py", "heldout", work / "heretic-run",
                               work / "heretic-chosen.json", work / "test.json", done,
                               "--max-tokens", str(a.max_tokens)], stdout=subprocess.DEVNULL)
    h = json.loads(done.read_text())
    harmful, harmless = splits.test
    with pysteer.load(a.model, n_ctx=8192) as m:
        base = m.logits_batch(harmless)[:, -1]
        base_answers = m.generate_batch(harmful, max_tokens=a.max_tokens)
        with m.steer(block_from_json(pys["result"], m)):
            answers = m.generate_batch(harmful, max_tokens=a.max_tokens)
            kl = kl_divergence(base, m.logits_batch(harmless)[:, -1])
    return {"heretic": {"chosen": h_chosen, "rule": rule, "front": h_front, "answers": h["answers"],
                        "base_answers": h["base_answers"], "kl": h["kl"]},
            "pysteer": {"chosen": pys["result"]["chosen"], "rule": pys["result"]["rule"],
                        "front": pys["result"]["front"], "answers": answers, "base_answers": base_answers,
                        "kl": kl.tolist()}}


def judged(a, splits, ev: dict) -> dict:
    import numpy as np
    from pysteer.llm_judge import Judge
    from pysteer.markers import is_refusal, marker_set

    harmful = splits.test[0]
    sets = {name: marker_set(name) for name in ("pysteer", "heretic")}
    out = {}
    judge = Judge.load(a.judge) if a.judge else None
    try:
        for tool, e in ev.items():
            row = {}
            for which in ("base_answers", "answers"):
                r = {f"matcher {n}": sum(is_refusal(x, s) for x in e[which]) for n, s in sets.items()}
                if judge is not None:
                    r["judge"] = int(sum(judge.verdicts(harmful, e[which])))
                row[which] = r
            kl = np.asarray(e["kl"])
            row["kl"] = {"mean": float(kl.mean()), "median": float(np.median(kl)), "max": float(kl.max())}
            out[tool] = row
    finally:
        if judge is not None:
            judge.model.close()
    return out


def report(a, splits, her, pys, ev, scores) -> str:
    n_val, n_test = len(splits.val[0]), len(splits.test[0])
    lines = [f"# pysteer optimize vs heretic {a.heretic_version} on {pathlib.Path(a.gguf).name}", "",
             f"{a.trials} trials ({a.startup} random startup trials), answers of {a.trial_tokens} tokens per "
             f"trial; {len(splits.train[0])}+{len(splits.train[1])} train prompts, {n_val}+{len(splits.val[1])} "
             f"validation prompts (harmful+harmless), held-out test split {n_test}+{len(splits.test[1])}.", "",
             "| | pysteer | heretic |", "|---|---|---|",
             f"| wall time, whole run | {pys['wall']:.0f} s | {her['wall']:.0f} s |",
             f"| ratio | 1 | {her['wall'] / pys['wall']:.1f}x |",
             f"| wall time without writing the model (heretic writes none) | {pys['wall'] - (pys.get('write_s') or 0):.0f} s "
             f"| {her['wall'] / (pys['wall'] - (pys.get('write_s') or 0)):.1f}x |",
             f"| seconds per trial, median | {med([t['seconds'] for t in pys['trials']]):.1f} | "
             f"{med([t['seconds'] for t in her['trials']]):.1f} |",
             f"| peak RSS | {pys['rss_gb']:.2f} GB | {her['rss_gb']:.2f} GB |",
             f"| Pareto front (validation: refusals/{n_val}, KL) | {fmt_front(ev['pysteer']['front'])} | "
             f"{fmt_front(ev['heretic']['front'])} |",
             f"| chosen trial (validation) | {fmt_pt(ev['pysteer']['chosen'])} | {fmt_pt(ev['heretic']['chosen'])} |"]
    for which, label in (("base_answers", "unedited"), ("answers", "chosen point")):
        for k in scores["pysteer"][which]:
            lines.append(f"| held-out refusals, {label}, {k} | {scores['pysteer'][which][k]}/{n_test} | "
                         f"{scores['heretic'][which][k]}/{n_test} |")
    for k in ("mean", "median", "max"):
        lines.append(f"| held-out first-token KL, {k} | {scores['pysteer']['kl'][k]:.4f} | "
                     f"{scores['heretic']['kl'][k]:.4f} |")
    pc = ev["pysteer"]["chosen"]["params"]
    hc = ev["heretic"]["chosen"]
    lines += ["", f"pysteer's chosen trial: {pc['scope']}, index {pc['direction_index']:.2f}, point {pc['point']}, "
              f"projected {pc['projected']}, row norms kept {pc.get('preserve_norms', False)}. heretic's: "
              f"{hc['params']['direction_scope']}, index {hc['params']['direction_index']:.2f} (heretic projects "
              "and keeps row norms by default)."]
    lines += ["", f"pysteer's whole run includes writing the abliterated GGUF; its stages (s): "
              f"{json.dumps(pys['result']['seconds'])}. heretic's includes loading the float32 model, its "
              f"response-prefix check and direction extraction; heretic exits at its interactive menu "
              f"(exit {her['exit']}) once the study is complete. Each KL is against the tool's own unedited model "
              "(pysteer: the quantized GGUF in llama.cpp; heretic: the dequantized float32 model in torch)."]
    return "\n".join(lines) + "\n"


def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def fmt_pt(t):
    return f"{t['refusals']}, {t['kl']:.4f} (trial {t['number']})"


def fmt_front(front):
    return "; ".join(f"{t['refusals']}, {t['kl']:.4f}" for t in sorted(front, key=lambda t: t["refusals"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heretic-python", required=True, help="python of an environment with heretic-llm 1.4.0")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--startup", type=int, default=10)
    ap.add_argument("--trial-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128, help="answer length on the held-out split")
    ap.add_argument("--batch-size", type=int, default=32, help="heretic's batch size (its automatic search "
                    "tries batches up to 128 of generation, minutes on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markers", default="heretic", help="marker set pysteer's trials count refusals with "
                    "(default heretic: heretic's trials count with its markers, so the fronts are comparable)")
    ap.add_argument("--judge", default="qwen2.5-coder-1.5b-instruct", help="judge model ('' for none)")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/pysteer/heretic-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "heretic-side-by-side"))
    ap.add_argument("--skip", choices=("heretic", "pysteer"), action="append", default=[],
                    help="reuse that tool's last run in --work (heretic: its held-out answers too)")
    a = ap.parse_args()
    from pysteer.datasets import PromptSplits
    from pysteer.figures import pareto_figure
    from pysteer.runtime import resolve_path

    a.gguf = str(resolve_path(a.model))
    a.heretic_version = subprocess.check_output(
        [a.heretic_python, "-c", "from importlib.metadata import version; print(version('heretic-llm'))"],
        text=True).strip()
    work, out = pathlib.Path(a.work), pathlib.Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    splits = PromptSplits.load(seed=a.seed)
    cache = {"heretic": work / "heretic-run.json", "pysteer": work / "pysteer-run.json"}
    runs = {}
    for tool, fn in (("pysteer", lambda: run_pysteer(a, work)), ("heretic", lambda: run_heretic(a, work, splits))):
        if tool not in a.skip:
            cache[tool].write_text(json.dumps(fn()))
        runs[tool] = json.loads(cache[tool].read_text())
        print(f"{tool}: {runs[tool]['wall']:.0f} s, peak RSS {runs[tool]['rss_gb']:.2f} GB", flush=True)
    her, pys = runs["heretic"], runs["pysteer"]
    ev = heldout(a, work, splits, her, pys)
    scores = judged(a, splits, ev)
    text = report(a, splits, her, pys, ev, scores)
    (out / "side-by-side.md").write_text(text)
    home = os.path.expanduser("~")
    settings = {k: v.replace(home, "~") if isinstance(v, str) else v for k, v in vars(a).items()}
    (out / "side-by-side.json").write_text(json.dumps({"settings": settings,
                                                       "heretic": {k: v for k, v in her.items()},
                                                       "pysteer": {k: v for k, v in pys.items() if k != "result"},
                                                       "heldout": ev, "scores": scores}, indent=1))
    pareto_figure({"pysteer": ev["pysteer"]["front"], "heretic": ev["heretic"]["front"]}, out / "fronts.png",
                  trials={"pysteer": pys["trials"],
                          "heretic": [{"refusals": t["refusals"], "kl": t["kl_divergence"]} for t in her["trials"]]},
                  title=f"{pathlib.Path(a.gguf).name}: {a.trials} trials each (validation split)")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
