"""Files pysteer reads and writes as text: reading names the file in its errors; writing goes to a temporary
file in the same directory, renamed into place only when complete, so an interruption never leaves a
half-written one."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Iterator

import gguf


def read_text(path: str | os.PathLike, hint: str = "") -> str:
    """A UTF-8 text file (a leading byte-order mark dropped); ValueError naming the file (and ``hint``) for
    anything else."""
    path = pathlib.Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")  # editors on Windows write a BOM; it is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}){hint}") from None


def lines(text: str) -> list[str]:
    """``text`` split at LF and CRLF only. Not str.splitlines: that also splits at U+2028, U+0085, form
    feeds..., which JSON strings (json.dumps(..., ensure_ascii=False)) and prompts may hold."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_jsonl(path: str | os.PathLike, text: str | None = None) -> list[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON Lines file (or of its ``text``, already read);
    ValueError naming the file and line for one that is not JSON."""
    out = []
    for i, line in enumerate(lines(read_text(path) if text is None else text), 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e})") from None
    return out


def _fsync(path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path next to ``path``; renames it to ``path`` if the block succeeds."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; name a file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no directory {path.parent} to write {path.name} into")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield pathlib.Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        _fsync(tmp)  # the bytes reach the disk before the name does: a crash leaves the old file or the new
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


class _Writer(gguf.GGUFWriter):
    """gguf-py's writer, which also writes an empty array given its element type (legal GGUF, which llama.cpp
    and gguf-py read, and a model copied by pysteer.export may hold; gguf-py's packer refuses it)."""

    def _pack_val(self, val, vtype, *args, **kwargs) -> bytes:
        # gguf 0.17-0.19: (val, vtype, add_vtype, sub_type=None); anything else goes to gguf-py as it is
        add_vtype = args[0] if args else kwargs.get("add_vtype")
        sub_type = args[1] if len(args) > 1 else kwargs.get("sub_type")
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and isinstance(val, (list, tuple)) and not val:
            return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, *args, **kwargs)


@contextlib.contextmanager
def gguf_output(path: str | os.PathLike, arch: str) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter for ``arch``: add keys and tensors in the block; the file appears whole or not at all."""
    with atomic_output(path) as tmp:
        w = _Writer(tmp, arch)
        try:
            yield w
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
