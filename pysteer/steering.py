"""Planning steering: which path each intervention runs on (the Model installs the plan on its context).

Each intervention runs on the fastest path that is exact:
- ``cvec``: llama.cpp's control vector (an in-graph add at ``l_out`` of layers >= 1, no callback) for an
  ``Add`` that touches only ``post`` outputs (or ``pre`` inputs) of layers >= 1, when no earlier intervention
  edits the same tensors in the hook (the control vector is added before the hook sees the tensor);
- ``lora``: a generated rank-k LoRA on every attention-output and FFN-down matrix (see pysteer.lora) for an
  ``Ablate`` of every pre/mid/post of every layer that is the only intervention, on architectures whose
  residual is a plain sum (not gemma3); the embedding tensor alone is still ablated in the hook;
- ``hook``: pysteer's eval callback, for everything else.
``path="hook"`` forces the callback; ``path="native"`` raises where no native path is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from . import hookpoints, lora
from .interventions import BlockAblate, Ablate, Add, Intervention, TensorOp
from .native import ADD

Path = Literal["auto", "hook", "native"]
PATHS = ("auto", "hook", "native")


@dataclass
class Steering:
    """What is installed: each intervention with the path it runs on ("hook" or "cvec")."""
    interventions: tuple[Intervention, ...] = ()
    path: str = "auto"
    paths: list[str] = field(default_factory=list)
    hook_ops: list[TensorOp] = field(default_factory=list)
    cvec: np.ndarray | None = None  # [n_layers, n_embd]; row 0 unused
    lora: np.ndarray | None = None  # [k, n_embd] orthonormal directions ablated by a LoRA adapter

    def __repr__(self):
        items = ", ".join(f"{iv!r} -> {p}" for iv, p in zip(self.interventions, self.paths))
        return f"Steering([{items}])"


def _cvec_reason(iv: Intervention, ops: list[TensorOp], hooked: set[str]) -> str | None:
    """None when ``iv`` can run as a llama.cpp control vector exactly; otherwise why not."""
    if not isinstance(iv, Add):
        return "only Add has a control-vector path"
    for op in ops:
        if not op.name.startswith("l_out-"):
            return f"{op.name} is not a layer output (control vectors add at l_out of layers 1..n-1)"
        if int(op.name[len("l_out-"):]) < 1:
            return "llama.cpp has no control vector for layer 0's output"
        if op.name in hooked:
            return f"an earlier intervention edits {op.name} in the hook, and the control vector would come first"
    return None


def _lora_reason(iv: Intervention, ops: list[TensorOp], model, n_interventions: int) -> str | None:
    """None when ``iv`` can run as a LoRA ablation exactly; otherwise why not."""
    if not isinstance(iv, Ablate):
        return "only Ablate has a LoRA path"
    if n_interventions != 1:
        return "a LoRA ablation is exact only as the sole intervention (others would reintroduce the direction)"
    every = {hookpoints.tensor_name(model.arch, p, i) for i in range(model.n_layers) for p in hookpoints.POINTS}
    if {op.name for op in ops} != every:
        return "a LoRA ablates every residual point; this Ablate covers only some layers or points"
    return lora.unsupported_reason(model) or lora.cache_reason(model, iv.directions)


def plan(model, interventions: Sequence[Intervention], path: str) -> Steering:
    """Validate and bind every intervention and choose its path; changes nothing on the model."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, not {path!r}")
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"expected pysteer.Ablate, Add, Rotate or BlockAblate, got {type(iv).__name__}")
    if len(interventions) > 1 and any(isinstance(iv, BlockAblate) for iv in interventions):
        # its hook ops read each block's write as (residual after) - (residual before): another edit of those
        # tensors would count as part of a write, and two BlockAblates would share saved rows
        raise ValueError("a BlockAblate must be the only intervention in a steer() block")
    s = Steering(tuple(interventions), path)
    hooked: set[str] = set()
    for iv in interventions:
        ops = iv.bind(model)
        if path != "hook" and isinstance(iv, Ablate):
            why = _lora_reason(iv, ops, model, len(interventions))
            if why is None:
                s.lora = iv.directions
                embd = [op for op in ops if op.name == hookpoints.embedding_name(model.arch)]
                s.hook_ops += embd
                hooked.update(op.name for op in embd)
                s.paths.append("lora")
                continue
        else:
            why = _cvec_reason(iv, ops, hooked) if path != "hook" else "path='hook'"
        if why is None:
            if s.cvec is None:
                s.cvec = np.zeros((model.n_layers, model.n_embd), np.float32)
            for op in ops:
                assert op.kind == ADD
                s.cvec[int(op.name[len("l_out-"):])] += op.dirs[0]
            s.paths.append("cvec")
            continue
        if path == "native":
            raise ValueError(f"{iv!r} has no exact native path: {why}")
        s.hook_ops += ops
        hooked.update(op.name for op in ops)
        s.paths.append("hook")
    if s.hook_ops and not model.has_hook:
        raise ValueError("these interventions need pysteer's hook, but the model was loaded with hook=False")
    return s
