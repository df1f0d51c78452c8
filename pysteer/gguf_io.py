"""GGUF files pysteer reads and writes itself: a fast header scan of model files, and llama.cpp's control-vector
layout (the one reader and writer of it: direction files and exported control vectors both use it).

The header scan skips array values: gguf.GGUFReader builds numpy views of every field, 7-12 s for a 151k-token
vocabulary, where loading a model needs only the architecture and the tensor extents.
"""

from __future__ import annotations

import mmap
import os
import pathlib
import re
import struct
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .files import gguf_output

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class Header:
    kv: dict  # scalar and string values; arrays as None
    tensors: list  # (name, shape, ggml type, offset from data start)
    data_start: int

    def data_end(self) -> int:
        return max([self.data_start + off + _nbytes(shape, typ) for _, shape, typ, off in self.tensors],
                   default=self.data_start)


def _nbytes(shape, typ: int) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(typ)]
    n = 1
    for d in shape:  # Python ints: no overflow on damaged headers
        n *= d
    return n // block * size


def tensor_bytes(path, header: Header, name: str) -> np.ndarray:
    """One tensor's raw bytes (uint8, memory-mapped), as gguf.quants.dequantize takes them."""
    for n, shape, typ, off in header.tensors:
        if n == name:
            return np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_start + off,
                             shape=(_nbytes(shape, typ),))
    raise KeyError(f"no tensor {name!r} in {path}")


def matrix(path, header: Header, name: str) -> np.ndarray:
    """One weight tensor dequantized to float64 in numpy order (rows: ggml's last dimension, e.g. a block
    output matrix as (n_embd, n_in))."""
    shape, typ = next(((s, t) for n, s, t, _ in header.tensors if n == name), (None, None))
    if shape is None:
        raise KeyError(f"no tensor {name!r} in {path}")
    return dequantize(tensor_bytes(path, header, name), typ, [int(n) for n in reversed(shape)])


def dequantize(data: np.ndarray, typ: int, shape) -> np.ndarray:
    """Raw tensor bytes (or float values) of ggml type ``typ`` as float64 of numpy ``shape``."""
    return gguf.quants.dequantize(data, GGMLQuantizationType(typ)).reshape(shape).astype(np.float64)


#: ggml's GGML_MAX_DIMS: a tensor info with more dimensions is damaged.
MAX_DIMS = 4


def read_header(path) -> Header:
    """Keys and tensor infos of a GGUF file; raises ValueError (or struct.error) on a damaged one. Its time and
    memory are bounded by the file's size: every count is checked against the bytes left before it is used."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt):
            nonlocal pos
            v = struct.unpack_from(fmt, buf, pos)[0]
            pos += struct.calcsize(fmt)
            return v

        def string():
            nonlocal pos
            n = take("<Q")
            if pos + n > len(buf):
                raise ValueError("string runs past the end of the file")
            s = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def count(n, least: int, what: str) -> int:
            """``n`` items of at least ``least`` bytes each must fit in what is left of the file."""
            if n > (len(buf) - pos) // least:
                raise ValueError(f"{what} count {n} does not fit in the file")
            return n

        def skip(typ, nested=False):
            nonlocal pos
            if typ in _SCALAR:
                pos += struct.calcsize(_SCALAR[typ])
            elif typ == _STRING:
                n = take("<Q")  # not `pos += take(...)`: that would add to the pos read before take moved it
                pos += n
            elif typ == _ARRAY and not nested:  # gguf has no arrays of arrays
                sub, n = take("<I"), take("<Q")
                if sub in _SCALAR:
                    pos += count(n, struct.calcsize(_SCALAR[sub]), "array") * struct.calcsize(_SCALAR[sub])
                elif sub == _STRING:
                    for _ in range(count(n, 8, "array")):
                        skip(sub, True)
                else:
                    raise ValueError(f"unsupported GGUF array element type {sub}")
            else:
                raise ValueError(f"unknown GGUF value type {typ}")
            if pos > len(buf):
                raise ValueError("a value runs past the end of the file")

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        pos = 4
        take("<I")  # version
        n_tensors, n_kv = take("<Q"), take("<Q")
        kv = {}
        for _ in range(count(n_kv, 12, "key")):
            key, typ = string(), take("<I")
            if typ in _SCALAR:
                kv[key] = take(_SCALAR[typ])
            elif typ == _STRING:
                kv[key] = string()
            else:
                skip(typ)
                kv[key] = None
        tensors = []
        for _ in range(count(n_tensors, 24, "tensor")):
            name, nd = string(), take("<I")
            if not 1 <= nd <= MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {nd} dimensions (1..{MAX_DIMS})")
            shape = [take("<Q") for _ in range(nd)]
            tensors.append((name, shape, take("<I"), take("<Q")))
        align = kv.get("general.alignment") or 32
        if not isinstance(align, int) or align & (align - 1):
            raise ValueError(f"general.alignment {align!r} is not a power of two")
        return Header(kv, tensors, (pos + align - 1) // align * align)


# -- control vectors ------------------------------------------------------------------------------------------

def write_control_vector(path: str | os.PathLike, vectors: dict[int, np.ndarray], *, model_hint: str,
                         keys: dict | None = None) -> pathlib.Path:
    """llama.cpp's control-vector GGUF (``--control-vector FILE``): ``direction.{il}`` (F32) for each layer
    il >= 1 of ``vectors`` (llama.cpp has none for layer 0), plus ``keys`` (str, float, int, bool or a list of
    floats). Written atomically."""
    if not vectors:
        raise ValueError("a control vector needs at least one layer")
    rows = {}
    for il, v in vectors.items():
        if isinstance(il, bool) or not isinstance(il, (int, np.integer)) or il < 1:
            raise ValueError(f"control-vector layers are ints >= 1 (llama.cpp has no layer 0), not {il!r}")
        v32 = np.asarray(v, dtype=np.float32)
        if v32.ndim != 1 or not np.isfinite(v32).all():
            raise ValueError(f"the control vector of layer {il} is not a finite 1-D float32 vector "
                             "(is its scale too large for float32?)")
        rows[int(il)] = v32
    path = pathlib.Path(path)
    with gguf_output(path, "controlvector") as w:
        w.add_string("controlvector.model_hint", model_hint or "unknown")
        w.add_int32("controlvector.layer_count", len(rows))
        for k, v in (keys or {}).items():
            if isinstance(v, str):
                w.add_string(k, v)
            elif isinstance(v, bool):
                w.add_bool(k, v)
            elif isinstance(v, (int, np.integer)):
                w.add_int32(k, int(v))
            elif isinstance(v, (float, np.floating)):
                w.add_float32(k, float(v))
            else:
                w.add_array(k, [float(x) for x in v])
        for il in sorted(rows):
            w.add_tensor(f"direction.{il}", rows[il])
    return path


def read_control_vector(path: str | os.PathLike) -> tuple[dict[int, np.ndarray], dict]:
    """(vectors by layer, keys) of a control-vector GGUF; ValueError for any other file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no control-vector file {path}")
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, struct errors, IndexError... on damaged files
        raise ValueError(f"{path} is not a GGUF direction file (a llama.cpp control vector): {e}") from None
    keys = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        try:
            keys[f.name] = f.contents()
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path}: key {f.name} cannot be read ({e})") from None
    if keys.get("general.architecture") != "controlvector":
        raise ValueError(f"{path} is not a control-vector GGUF "
                         f"(general.architecture={keys.get('general.architecture')!r})")
    vectors = {}
    for t in r.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m:
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise ValueError(f"{path}: {t.name} is {t.tensor_type.name}; control vectors are F32 (or F16)")
            vectors[int(m.group(1))] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not vectors:
        raise ValueError(f"{path} holds no direction.N tensors")
    return vectors, keys
