"""A chosen direction and its file: llama.cpp's control-vector GGUF layout plus pysteer keys.

The file holds ``direction.{il}`` (F32, the unit vector) for il = 1..n_layers-1, ``general.architecture =
controlvector`` and ``controlvector.model_hint``, so llama.cpp's ``--control-vector-scaled FILE S`` adds
S times the direction on every layer. pysteer's own keys (``pysteer.*``) record where it came from: model
architecture, n_embd, model file and sha256, point, layer, position, norm of the raw difference of means,
intended operation, prompt sets, scores, date.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import vectors
from .gguf_io import read_control_vector, write_control_vector

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
        self.vector = vectors.checked(self.vector, "a direction", unit=True)
        self.n_embd = self.n_embd or self.vector.size
        if self.b2 is not None:
            self.b2 = vectors.checked(self.b2, "b2", n_embd=self.vector.size)

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
        if self.model_sha256 and self.model_sha256 != model.sha256:
            warnings.warn(f"direction was extracted from {self.model_file} (sha256 {self.model_sha256[:12]}...), "
                          f"not from {model.path.name}", stacklevel=2)

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the GGUF file (atomically: a temporary file renamed into place)."""
        meta = {"format_version": FORMAT_VERSION, "layer": self.layer, "point": self.point,
                "position": self.position, "norm": float(self.norm), "arch": self.arch,
                "n_embd": int(self.vector.size), "n_layers": self.n_layers, "model_file": self.model_file,
                "model_sha256": self.model_sha256, "operation": self.operation, "date": self.date,
                "prompt_sets": json.dumps(self.prompt_sets), "scores": json.dumps(self.scores, default=float)}
        keys = {f"pysteer.{k}": v for k, v in meta.items()}
        if self.b2 is not None:
            keys["pysteer.plane_b2"] = [float(x) for x in self.b2]
        layers = range(1, max(self.n_layers, 2))
        return write_control_vector(path, {il: self.vector for il in layers}, model_hint=self.arch, keys=keys)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Direction":
        """Read a direction file (or any llama.cpp control vector: its first direction is taken)."""
        tensors, keys = read_control_vector(path)

        def get(key, kind, default):
            v = keys.get(key, default)
            if kind is int and isinstance(v, float) and v.is_integer():
                v = int(v)
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
                raise ValueError(f"key {key} holds {v!r}, not a {kind.__name__}")
            return v

        try:
            layer = get("pysteer.layer", int, min(tensors))  # a plain control vector: its first layer's
            vec = tensors.get(layer) if layer in tensors else tensors[min(tensors)]
            plane = keys.get("pysteer.plane_b2")
            return cls(vector=vec, layer=layer, point=get("pysteer.point", str, "post"),
                       position=get("pysteer.position", int, -1), norm=get("pysteer.norm", float, 1.0),
                       arch=get("pysteer.arch", str, keys.get("controlvector.model_hint", "")),
                       n_embd=get("pysteer.n_embd", int, vec.size), n_layers=get("pysteer.n_layers", int, 0),
                       model_file=get("pysteer.model_file", str, ""), model_sha256=get("pysteer.model_sha256", str, ""),
                       operation=get("pysteer.operation", str, "ablate"),
                       prompt_sets=json.loads(get("pysteer.prompt_sets", str, "{}")),
                       scores=json.loads(get("pysteer.scores", str, "{}")), date=get("pysteer.date", str, ""),
                       b2=None if plane is None else plane)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{path}: not a usable direction file ({e})") from None


def load_direction(path: str | os.PathLike, model=None) -> Direction:
    """Read a direction file; with ``model``, also check that it fits."""
    d = Direction.load(path)
    if model is not None:
        d.check(model)
    return d
