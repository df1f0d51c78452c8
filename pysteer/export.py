"""Files stock llama.cpp loads: a control vector, and a weight-orthogonalized ("abliterated") model.

Abliteration removes direction r from everything that writes into the residual stream: the token embedding
rows (``E <- E - (E r) r^T``), and each attention-output and FFN-down matrix (``W <- W - r (r^T W)``, biases
``b <- b - r (r.b)``). Every other tensor is copied byte for byte. Edited tensors are re-quantized to their
source type by the libggml llama-cpp-python loaded (``ggml_quantize_chunk``, the quantizer of
``llama_model_quantize``), with error feedback along r: re-rounding an edited 4-bit matrix on its own restores
most of the removed component (Qwen2.5 1.5B, a Q4_K ffn_down: 67% of ``|r^T W|`` came back; with the feedback
1%). For gemma3 the block outputs pass through post-norms before the residual add, so
the result only approximates runtime ablation there.
"""

from __future__ import annotations

import json
import pathlib
import re
import tempfile
import warnings

import gguf
import numpy as np
from tqdm.auto import tqdm

from . import hookpoints, rownorms, vectors
from . import native
from .files import gguf_output
from .gguf_io import dequantize
from .gguf_io import write_control_vector as write_control_vector_file


def write_control_vector(model, vector: np.ndarray, path, *, alpha: float = 1.0, layers=None) -> pathlib.Path:
    """llama.cpp's control-vector GGUF: ``alpha * vector`` as ``direction.{il}`` for each layer of the layer
    spec ``layers`` (default all of 1..n_layers-1; llama.cpp has no control vector for layer 0)."""
    path = pathlib.Path(path)
    if path.exists() and path.samefile(model.path):
        raise ValueError(f"{path} is the model being read; write the control vector to another path")
    v = vectors.scaled(vectors.checked(vector, "control vector", n_embd=model.n_embd), alpha, "control vector")
    layers = hookpoints.check_layers(layers, model.n_layers, first=1)
    return write_control_vector_file(path, {il: v for il in layers}, model_hint=model.arch)


_WRITERS = re.compile(r"blk\.\d+\.(attn_output|ffn_down)\.(weight|bias)")
# Types whose quantizer treats every block on its own (no importance matrix given): a row may be quantized
# block-column by block-column with the same bytes as a whole (tests/test_quantize.py checks each).
_BLOCKWISE = {"F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ4_NL", "MXFP4"}
_EMBD_CHUNK = 16384  # vocabulary rows edited at a time


def _feedback_order(energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Units (rows or block columns) in order of growing share of r, and the share of r not yet done at each."""
    order = np.argsort(energy, kind="stable")
    return order, np.cumsum(energy[order][::-1])[::-1]


def _quantize_outputs_orthogonal(W: np.ndarray, r: np.ndarray, ty: int) -> np.ndarray:
    """W (n_embd, n_in), already edited (``r^T W`` is what it should keep), outputs along the first axis.

    Rounding each row on its own would undo much of the edit (the rows were on a quantization grid; rounded
    again they fall back near it). Rows are quantized in order of growing ``|r_i|``, each aiming at
    ``W_i - r_i acc / sum_{j not done} r_j^2`` where ``acc = sum_{done} r_j (Q(W_j) - W_j)``: the error along r
    the rows so far left is spread over the rows still to come, and ``r^T Q(W)`` ends near ``r^T W`` (0 for a
    full ablation). Rows go in groups
    of 1/32 of those left (one row at a time at the end), so a matrix takes a few hundred quantizer calls."""
    order, left = _feedback_order(r ** 2)
    acc = np.zeros(W.shape[1])
    out = None
    j = 0
    while j < len(order):
        g = order[j:j + max(1, (len(order) - j) // 32)]
        target = W[g] - np.outer(r[g] / left[j], acc) if left[j] > 0 else W[g]
        q = native.quantize(target, ty)
        if out is None:
            out = np.empty((len(W), q.shape[1]), np.uint8)
        out[g] = q
        acc += r[g] @ (dequantize(q, ty, target.shape) - W[g])
        j += len(g)
    return out


def _quantize_rows_orthogonal(E: np.ndarray, r: np.ndarray, ty: int) -> np.ndarray:
    """E (n_vocab, n_embd) with rows already orthogonal to r (the token embedding): the same error feedback
    along each row, block column by block column (in order of growing ``|r_block|``)."""
    name = gguf.GGMLQuantizationType(ty).name
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ty)][0]
    if name not in _BLOCKWISE:
        return native.quantize(E, ty)
    rb = r.reshape(-1, block)
    order, left = _feedback_order((rb ** 2).sum(1))
    acc = np.zeros(E.shape[0])
    cols = [None] * len(rb)
    for j, b in enumerate(order):
        x = E[:, b * block:(b + 1) * block].astype(np.float64)
        target = x - np.outer(acc / left[j], rb[b]) if left[j] > 0 else x
        cols[b] = native.quantize(target, ty)
        acc += (dequantize(cols[b], ty, x.shape) - x) @ rb[b]
    return np.concatenate(cols, axis=1)


def _ablated(t, r: np.ndarray, w: float, out_type: int, feedback: bool, scratch: pathlib.Path,
             write_map: np.ndarray | None = None) -> np.ndarray:
    """Tensor ``t`` with ``w`` times its component along r removed (``write_map``: the row-norm-preserving edit
    of :mod:`pysteer.rownorms` instead), in ``out_type`` (float32 for F32, else raw bytes), in a memory-mapped file
    under ``scratch``: the writer holds it until the end, and a model's edited tensors need not fit in RAM."""
    ty = int(t.tensor_type)
    shape = [int(n) for n in reversed(t.shape)]  # numpy order: rows, then values per row
    n_rows, n_cols = (1, shape[0]) if len(shape) == 1 else shape
    f32 = out_type == gguf.GGMLQuantizationType.F32
    width = n_cols if f32 else gguf.quants.quant_shape_to_byte_shape((n_cols,), gguf.GGMLQuantizationType(out_type))[0]
    dst = np.lib.format.open_memmap(scratch / f"{t.name}.npy", mode="w+",
                                    dtype=np.float32 if f32 else np.uint8, shape=(n_rows, width))

    def store(rows: slice, x: np.ndarray, orthogonal) -> None:
        dst[rows] = x if f32 else orthogonal(x, r, out_type) if feedback else native.quantize(x, out_type)

    if len(shape) == 1:  # a bias: b - w r (r.b); one row, nothing to feed the error to
        b = dequantize(t.data, ty, shape)
        b = b - w * r * (r @ b) if write_map is None else rownorms.apply(b, write_map)
        dst[0] = b if f32 else native.quantize(b[None], out_type)[0]
        return dst[0]
    if t.name == "token_embd.weight":  # (n_vocab, n_embd): rows are embeddings, each edited on its own
        r32 = r.astype(np.float32)
        for i in range(0, n_rows, _EMBD_CHUNK):
            rows = slice(i, min(i + _EMBD_CHUNK, n_rows))
            E = np.array(gguf.quants.dequantize(t.data[rows], gguf.GGMLQuantizationType(ty)), np.float32)
            E = E.reshape(-1, n_cols)
            E -= np.float32(w) * np.outer(E @ r32, r32)
            store(rows, E, _quantize_rows_orthogonal)
        return dst
    W = dequantize(t.data, ty, shape)  # (n_embd, n_in): outputs along the first axis
    W = W - w * np.outer(r, r @ W) if write_map is None else rownorms.apply(W, write_map)
    store(slice(None), W, _quantize_outputs_orthogonal)
    return dst


def abliterate(model, vector: np.ndarray, out, *, direction_info: dict | None = None,
               modified_type: str | None = None, error_feedback: bool = True,
               progress: bool = True) -> pathlib.Path:
    """Write a weight-orthogonalized copy of the model's GGUF that stock llama.cpp loads.

    Each edited tensor keeps its source type (``modified_type``, e.g. "Q8_0", stores the edited matrices in
    that type instead), re-quantized by the loaded libggml with error feedback that keeps it orthogonal to r
    (``error_feedback=False``: each row rounded on its own, for comparison).
    """
    r = vectors.checked(vector, "direction", n_embd=model.n_embd, unit=True).astype(np.float64)
    src = gguf.GGUFReader(_check_out(model, out))
    edits = {t.name: (r, 1.0, None) for t in src.tensors if t.name == "token_embd.weight" or _WRITERS.fullmatch(t.name)}
    keys = {"abliterated": "directional ablation of one unit vector", "abliterated_direction": [float(x) for x in r]}
    keys.update({f"abliterated_{k}": str(v) for k, v in (direction_info or {}).items()})
    return _write(model, src, out, edits, keys, modified_type, error_feedback, progress)


def abliterate_blocks(model, block, out, *, info: dict | None = None, modified_type: str | None = None,
                      error_feedback: bool = True, progress: bool = True) -> pathlib.Path:
    """Write the GGUF that carries a :class:`pysteer.BlockAblate` in its weights: ``W <- W - w_l r_l r_l^T W``
    for each layer's attn_output (weights ``block.attn``) and ffn_down (``block.ffn``), biases alike (the
    row-norm-preserving edit where ``block.norms`` is set, ``W <- W - w_l r_l b^T W`` with ``block.read_outs``);
    the embedding and every other tensor are copied.
    Re-quantized as :func:`abliterate` does."""
    if model.arch not in hookpoints.PLAIN_SUM_ARCHS:
        raise ValueError(f"{model.arch} normalizes block outputs; the weight edit would not be the runtime one")
    if len(block.attn) != model.n_layers or block.directions.shape[1] != model.n_embd:
        raise ValueError(f"the edit has {len(block.attn)} layers and width {block.directions.shape[1]}; the model "
                         f"{model.n_layers} and {model.n_embd}")
    if block.norms is not None:
        block.norms.check(model)
    src = gguf.GGUFReader(_check_out(model, out))
    names = {t.name for t in src.tensors}
    edits = {}
    for layer in range(model.n_layers):
        r = block.direction(layer)
        for k, (comp, w) in enumerate((("attn_output", block.attn[layer]), ("ffn_down", block.ffn[layer]))):
            if w > 0 and f"blk.{layer}.{comp}.weight" not in names:
                raise ValueError(f"the edit weights layer {layer}'s {comp}, but the model has no "
                                 f"blk.{layer}.{comp}.weight (mixture-of-experts or other layout); it cannot be written")
            for kind in ("weight", "bias"):
                name = f"blk.{layer}.{comp}.{kind}"
                if w > 0 and name in names:
                    edits[name] = (r, float(w), block.write_map(layer, k))
    keys = {"abliterated": "weighted rank-1 edits of attn_output and ffn_down (pysteer optimize)"
                           + (", row norms kept" if block.norms is not None else "")
                           + (", fitted read-outs" if block.read_outs is not None else ""),
            "abliterated_attn_weights": [float(x) for x in block.attn],
            "abliterated_ffn_weights": [float(x) for x in block.ffn]}
    keys.update({f"abliterated_{k}": str(v) for k, v in (info or {}).items()})
    return _write(model, src, out, edits, keys, modified_type, error_feedback, progress)


def check_abliterate(model, out, *, modified_type: str | None = None) -> None:
    """The checks :func:`abliterate` makes before it writes (the output path; ``modified_type`` and the source
    types, each one ggml can write at its row width), for a caller that writes other files first."""
    _check_out(model, out)
    tensors = {name: (typ, int(shape[0])) for name, shape, typ, _ in model.header.tensors}
    _out_types(tensors, [n for n in tensors if n == "token_embd.weight" or _WRITERS.fullmatch(n)], modified_type)


def _out_types(tensors: dict, edited, modified_type) -> dict[str, int]:
    """The ggml type each tensor is written in, from ``tensors`` (name -> (source type, values per row)); the
    ``edited`` ones in ``modified_type`` where given. ValueError for a type ggml cannot write at a row width."""
    types = {n: int(typ) for n, (typ, _) in tensors.items()}
    if modified_type is not None:
        try:
            qt = gguf.GGMLQuantizationType[str(modified_type).upper()]
        except KeyError:
            raise ValueError(f"unknown tensor type {modified_type!r}; name a ggml type such as Q8_0, Q4_K, F16 "
                             "or F32") from None
        types.update({n: int(qt) for n in edited if not n.endswith(".bias")})
    for n in sorted(edited):
        if types[n] != gguf.GGMLQuantizationType.F32:
            native.check_quantizable(types[n], tensors[n][1])
    return types


def _check_out(model, out) -> pathlib.Path:
    out = pathlib.Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; name the .gguf file to write")
    if out.exists() and out.resolve() == model.path.resolve() or out.exists() and out.samefile(model.path):
        raise ValueError(f"{out} is the model being read; write the abliterated model to another path")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no directory {out.parent} to write {out.name} into")
    return model.path


def _write(model, src, out, edits: dict, keys: dict, modified_type, error_feedback: bool,
           progress: bool) -> pathlib.Path:
    """A copy of ``src`` (the model's GGUF) with the tensors of ``edits`` (name -> (r, w, write map or None))
    edited and re-quantized, and ``pysteer.*`` keys added."""
    out = pathlib.Path(out)
    # before anything is written; ne0 (t.shape[0]) is the values per row
    types = _out_types({t.name: (t.tensor_type, int(t.shape[0])) for t in src.tensors}, edits, modified_type)
    if model.arch == "gemma3":
        warnings.warn("gemma3's post-norms rescale block outputs: the abliterated weights only approximate "
                      "runtime ablation", stacklevel=3)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".abliterate-") as scratch, \
            gguf_output(out, model.arch) as w:
        previous = {}
        for f in src.fields.values():
            if f.name.startswith("GGUF.") or f.name == "general.architecture":
                continue
            if f.name == "general.alignment":
                w.add_custom_alignment(int(f.contents()))
                continue
            if f.name.startswith("pysteer.abliterated"):  # the source was abliterated: its record (the keys
                previous[f.name[len("pysteer."):]] = f.contents()  # written below) describes an earlier edit
                continue
            sub = None
            if f.types[0] == gguf.GGUFValueType.ARRAY:  # an empty array's types hold no element type: its header does
                sub = f.types[-1] if len(f.types) > 1 else gguf.GGUFValueType(int(f.parts[3][0]))
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
        if previous:  # each edit's record nests the one before it: the whole history
            keys = {**keys, "abliterated_previous": json.dumps(previous)}
        for k, v in keys.items():
            if isinstance(v, list):
                w.add_array(f"pysteer.{k}", v)
            else:
                w.add_string(f"pysteer.{k}", v)
        for t in tqdm(src.tensors, desc="abliterate", disable=not progress):
            if t.name not in edits:
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
                continue
            r, wt, write_map = edits[t.name]
            data = _ablated(t, r, wt, types[t.name], error_feedback, pathlib.Path(scratch), write_map)
            if data.dtype == np.uint8:
                w.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType(types[t.name]))
            else:
                w.add_tensor(t.name, data)
    return out
