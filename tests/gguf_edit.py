"""Edited copies of GGUF files for tests: keys added or replaced, tensors left out."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np


def rewrite(src, dst, *, keys: dict | None = None, drop=()) -> pathlib.Path:
    """Copy of ``src`` with ``keys`` added or replaced (str, float -> F32, int -> UINT32) and the tensors named in
    ``drop`` left out."""
    keys = keys or {}
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.get_field("general.architecture").contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in keys:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for k, v in keys.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pathlib.Path(dst)
