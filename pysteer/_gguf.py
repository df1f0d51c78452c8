"""A GGUF header scan that skips array values: gguf.GGUFReader builds numpy views of every field, 7-12 s for a
151k-token vocabulary, where loading a model needs only the architecture and the tensor extents."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

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


def read_header(path) -> Header:
    """Keys and tensor infos of a GGUF file; raises ValueError (or struct.error) on a damaged one."""
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

        def skip(typ):
            nonlocal pos
            if typ in _SCALAR:
                pos += struct.calcsize(_SCALAR[typ])
            elif typ == _STRING:
                n = take("<Q")  # not `pos += take(...)`: that would add to the pos read before take moved it
                pos += n
            elif typ == _ARRAY:
                sub, n = take("<I"), take("<Q")
                if sub in _SCALAR:
                    n *= struct.calcsize(_SCALAR[sub])
                    pos += n
                else:
                    for _ in range(n):
                        skip(sub)
            else:
                raise ValueError(f"unknown GGUF value type {typ}")

        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        pos = 4
        take("<I")  # version
        n_tensors, n_kv = take("<Q"), take("<Q")
        kv = {}
        for _ in range(n_kv):
            key, typ = string(), take("<I")
            if typ in _SCALAR:
                kv[key] = take(_SCALAR[typ])
            elif typ == _STRING:
                kv[key] = string()
            else:
                skip(typ)
                kv[key] = None
        tensors = []
        for _ in range(n_tensors):
            name, nd = string(), take("<I")
            shape = [take("<Q") for _ in range(nd)]
            tensors.append((name, shape, take("<I"), take("<Q")))
        align = int(kv.get("general.alignment") or 32)
        return Header(kv, tensors, (pos + align - 1) // align * align)
