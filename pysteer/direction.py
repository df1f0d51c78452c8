"""A chosen direction and its file: llama.cpp's control-vector GGUF layout plus pysteer keys.

The file holds ``direction.{il}`` (F32, the unit vector) for il = 1..n_layers-1, ``general.architecture =
controlvector`` and ``controlvector.model_hint``, so llama.cpp's ``--control-vector-scaled FILE S`` adds
S times the direction on every layer. pysteer's own keys (``pysteer.*``) record where it came from: model
architecture, n_embd, model file and sha256, point, layer, position, norm of the raw difference of means,
intended operation, prompt sets, scores, date.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import warnings
from dataclasses import dataclass, field

import gguf
import numpy as np

from ._files import gguf_output

FORMAT_VERSION = 1


@dataclass
class Direction:
    vector: np.ndarray  # unit, float32 [n_embd]
    layer: int
    point: str
    position: int  # counted from the end: -1 is the last token
    norm: float = 1.0  # of the raw difference of class means
    arch: str = ""
    n_embd: int = 0
    n_layers: int = 0
    model_file: str = ""
    model_sha256: str = ""
    operation: str = "ablate"
    prompt_sets: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    b2: np.ndarray | None = None  # second axis of the rotation plane (unit, orthogonal to vector), if known
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self):
        v = np.asarray(self.vector, dtype=np.float64)
        if v.ndim != 1 or not np.isfinite(v).all() or np.linalg.norm(v) == 0:
            raise ValueError("a direction needs a finite, non-zero 1-D vector")
        self.vector = (v / np.linalg.norm(v)).astype(np.float32)
        self.n_embd = self.n_embd or v.size
        if self.b2 is not None:
            b2 = np.asarray(self.b2, dtype=np.float32)
            if b2.shape != self.vector.shape or not np.isfinite(b2).all():
                raise ValueError("b2 must be a finite vector of the direction's size")
            self.b2 = b2

    @property
    def raw(self) -> np.ndarray:
        """The difference of means it came from (unit vector times norm)."""
        return self.vector * np.float32(self.norm)

    def check(self, model) -> None:
        """Raise ValueError unless the direction fits ``model`` (architecture, width, depth); warn when the
        model file differs from the one it was extracted from (another quantization may still be fine)."""
        problems = []
        if self.arch and self.arch != model.arch:
            problems.append(f"architecture {self.arch} vs {model.arch}")
        if self.vector.size != model.n_embd:
            problems.append(f"n_embd {self.vector.size} vs {model.n_embd}")
        if self.n_layers and self.n_layers != model.n_layers:
            problems.append(f"{self.n_layers} layers vs {model.n_layers}")
        if problems:
            raise ValueError(f"direction made for {self.model_file or 'another model'} does not fit "
                             f"{model.path.name}: " + "; ".join(problems))
        if self.model_sha256 and self.model_sha256 != model_sha256(model):
            warnings.warn(f"direction was extracted from {self.model_file} (sha256 {self.model_sha256[:12]}...), "
                          f"not from {model.path.name}", stacklevel=2)

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the GGUF file (atomically: a temporary file renamed into place)."""
        path = pathlib.Path(path)
        n_layers = max(self.n_layers, 2)
        with gguf_output(path, "controlvector") as w:
            w.add_string("controlvector.model_hint", self.arch or "unknown")
            w.add_int32("controlvector.layer_count", n_layers - 1)
            meta = {"format_version": FORMAT_VERSION, "layer": self.layer, "point": self.point,
                    "position": self.position, "norm": float(self.norm), "arch": self.arch,
                    "n_embd": int(self.vector.size), "n_layers": self.n_layers, "model_file": self.model_file,
                    "model_sha256": self.model_sha256, "operation": self.operation, "date": self.date}
            for k, v in meta.items():
                if isinstance(v, str):
                    w.add_string(f"pysteer.{k}", v)
                elif isinstance(v, float):
                    w.add_float32(f"pysteer.{k}", v)
                else:
                    w.add_int32(f"pysteer.{k}", int(v))
            w.add_string("pysteer.prompt_sets", json.dumps(self.prompt_sets))
            w.add_string("pysteer.scores", json.dumps(self.scores, default=float))
            if self.b2 is not None:
                w.add_array("pysteer.plane_b2", [float(x) for x in self.b2])
            for il in range(1, n_layers):
                w.add_tensor(f"direction.{il}", self.vector.astype(np.float32))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Direction":
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no direction file {path}")
        try:
            r = gguf.GGUFReader(path)
        except Exception as e:
            raise ValueError(f"{path} is not a GGUF direction file: {e}") from None

        def get(key, default=None):
            f = r.get_field(key)
            return default if f is None else f.contents()

        if get("general.architecture") != "controlvector":
            raise ValueError(f"{path} is not a control-vector GGUF (general.architecture={get('general.architecture')!r})")
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors if t.name.startswith("direction.")}
        if not tensors:
            raise ValueError(f"{path} holds no direction.N tensors")
        layer = get("pysteer.layer")
        vec = tensors.get(f"direction.{layer}") if layer is not None else None
        if vec is None:
            vec = tensors[sorted(tensors, key=lambda n: int(n.split(".")[1]))[0]]
        return cls(vector=vec, layer=int(layer if layer is not None else -1), point=get("pysteer.point", "post"),
                   position=int(get("pysteer.position", -1)), norm=float(get("pysteer.norm", 1.0)),
                   arch=get("pysteer.arch", get("controlvector.model_hint", "")),
                   n_embd=int(get("pysteer.n_embd", vec.size)), n_layers=int(get("pysteer.n_layers", 0)),
                   model_file=get("pysteer.model_file", ""), model_sha256=get("pysteer.model_sha256", ""),
                   operation=get("pysteer.operation", "ablate"),
                   prompt_sets=json.loads(get("pysteer.prompt_sets", "{}")),
                   scores=json.loads(get("pysteer.scores", "{}")), date=get("pysteer.date", ""),
                   b2=None if get("pysteer.plane_b2") is None else np.asarray(get("pysteer.plane_b2"), np.float32))


def load_direction(path: str | os.PathLike, model=None) -> Direction:
    """Read a direction file; with ``model``, also check that it fits."""
    d = Direction.load(path)
    if model is not None:
        d.check(model)
    return d


def model_sha256(model) -> str:
    """sha256 of the model file (from the registry's verified stamp when there is one), cached on the model."""
    if getattr(model, "_sha256", None):
        return model._sha256
    from . import models

    for name, e in models.REGISTRY.items():
        if model.path.resolve() == models.path_of(name).resolve() and models.is_cached(name):
            model._sha256 = e.sha256
            return e.sha256
    h = hashlib.sha256()
    with open(model.path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    model._sha256 = h.hexdigest()
    return model._sha256
