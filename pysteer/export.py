"""Files stock llama.cpp loads: a control vector, and a weight-orthogonalized ("abliterated") model.

Abliteration removes direction r from everything that writes into the residual stream: the token embedding
rows (``E <- E - (E r) r^T``), and each attention-output and FFN-down matrix (``W <- W - r (r^T W)``, biases
``b <- b - r (r.b)``). Every other tensor is copied byte for byte. Modified tensors are written as F32 and
re-quantized by libllama (``llama_model_quantize``) with every tensor pinned to its source type, so the result
has the source's type map. For gemma3 the block outputs pass through post-norms before the residual add, so
the result only approximates runtime ablation there.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import re
import tempfile
import warnings

import gguf
import llama_cpp
import numpy as np
from tqdm.auto import tqdm

from ._files import atomic_output, gguf_output


def write_control_vector(model, vector: np.ndarray, path, *, alpha: float = 1.0, layers=None) -> pathlib.Path:
    """llama.cpp's control-vector GGUF: ``alpha * vector`` as ``direction.{il}`` for each chosen layer
    (default 1..n_layers-1; llama.cpp has no control vector for layer 0)."""
    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (model.n_embd,) or not np.isfinite(v).all():
        raise ValueError(f"control vector must be finite with n_embd={model.n_embd} values")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite, not {alpha}")
    layers = list(range(1, model.n_layers)) if layers is None else sorted(set(int(i) for i in layers))
    if 0 in layers:
        raise ValueError("llama.cpp control vectors start at layer 1; leave layer 0 out")
    if not layers or max(layers) >= model.n_layers:
        raise ValueError(f"control-vector layers must lie in 1..{model.n_layers - 1}")
    path = pathlib.Path(path)
    with gguf_output(path, "controlvector") as w:
        w.add_string("controlvector.model_hint", model.arch)
        w.add_int32("controlvector.layer_count", len(layers))
        for il in layers:
            w.add_tensor(f"direction.{il}", (alpha * v).astype(np.float32))
    return path


def read_control_vector(path, n_embd: int, n_layers: int) -> np.ndarray:
    """[n_layers - 1, n_embd] as llama.cpp's common_control_vector_load lays it out (row il-1 = layer il)."""
    r = gguf.GGUFReader(path)
    out = np.zeros((n_layers - 1, n_embd), np.float32)
    for t in r.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m and 1 <= int(m.group(1)) < n_layers:
            out[int(m.group(1)) - 1] += np.asarray(t.data, np.float32)
    return out


_WRITERS = re.compile(r"blk\.\d+\.(attn_output|ffn_down)\.(weight|bias)")


def _ablate_tensor(name: str, W: np.ndarray, r: np.ndarray) -> np.ndarray:
    """W in gguf's numpy shape (reversed ggml ne)."""
    if name == "token_embd.weight":  # (n_vocab, n_embd): rows are embeddings
        return W - np.outer(W @ r, r)
    if name.endswith(".bias"):
        return W - r * (r @ W)
    return W - np.outer(r, r @ W)  # (n_embd, n_in): outputs along the first axis


def abliterate(model, vector: np.ndarray, out, *, direction_info: dict | None = None,
               modified_type: str | None = None, progress: bool = True) -> pathlib.Path:
    """Write a weight-orthogonalized copy of the model's GGUF that stock llama.cpp loads.

    ``modified_type`` (e.g. "Q8_0", "F16") stores the modified matrices in that type instead of their source
    type: a 4-bit re-quantization adds noise of the size of the edit itself (SmolLM2 Q4_1: logits 9% of their
    scale away from runtime ablation), 8 bits keep it small.
    """
    r = np.asarray(vector, dtype=np.float64)
    if r.shape != (model.n_embd,) or not np.isfinite(r).all() or not np.linalg.norm(r):
        raise ValueError(f"direction must be a finite non-zero vector of n_embd={model.n_embd}")
    r = r / np.linalg.norm(r)
    if model.arch == "gemma3":
        warnings.warn("gemma3's post-norms rescale block outputs: the abliterated weights only approximate "
                      "runtime ablation", stacklevel=2)
    src = gguf.GGUFReader(model.path)
    out = pathlib.Path(out)
    types = {t.name: int(t.tensor_type) for t in src.tensors}
    modified = [t.name for t in src.tensors if t.name == "token_embd.weight" or _WRITERS.fullmatch(t.name)]
    if modified_type is not None:
        try:
            qt = gguf.GGMLQuantizationType[modified_type.upper()]
        except KeyError:
            raise ValueError(f"unknown tensor type {modified_type!r}") from None
        shapes = {t.name: t.shape for t in src.tensors}
        types.update({n: int(qt) for n in modified if len(shapes[n]) > 1})  # biases stay F32
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".abliterate-") as tmp:
        stage = pathlib.Path(tmp) / "f32.gguf"
        with gguf_output(stage, model.arch) as w:
            for f in src.fields.values():
                if f.name.startswith("GGUF.") or f.name == "general.architecture":
                    continue
                if f.name == "general.alignment":
                    w.add_custom_alignment(int(f.contents()))
                    continue
                sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
            w.add_string("pysteer.abliterated", "directional ablation of one unit vector")
            w.add_array("pysteer.abliterated_direction", [float(x) for x in r])
            for k, v in (direction_info or {}).items():
                w.add_string(f"pysteer.abliterated_{k}", str(v))
            for t in tqdm(src.tensors, desc="abliterate", disable=not progress):
                if t.name in modified:
                    W = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
                    W = W.reshape([int(n) for n in reversed(t.shape)])
                    w.add_tensor(t.name, _ablate_tensor(t.name, W, r).astype(np.float32))
                else:
                    w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        _quantize_to(stage, out, types, src)
    return out


def _quantize_to(stage: pathlib.Path, out: pathlib.Path, types: dict[str, int], src: gguf.GGUFReader) -> None:
    """Re-quantize ``stage`` into ``out`` with every tensor pinned to its type in the source."""
    overrides = (llama_cpp.llama_model_tensor_override * (len(types) + 1))()
    keep = []
    for i, (name, ty) in enumerate(types.items()):
        keep.append(f"^{re.escape(name)}$".encode())
        overrides[i].pattern, overrides[i].type = keep[-1], ty
    overrides[len(types)].pattern = None
    params = llama_cpp.llama_model_quantize_default_params()
    ft = src.get_field("general.file_type")
    params.ftype = int(ft.contents()) if ft is not None else int(gguf.LlamaFileType.MOSTLY_Q8_0)
    params.nthread = os.cpu_count() or 1
    params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    with atomic_output(out) as tmp:
        rc = llama_cpp.llama_model_quantize(str(stage).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed ({rc}) re-quantizing {stage.name}")
