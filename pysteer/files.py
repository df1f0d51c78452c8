"""Writing files so that an interruption never leaves a half-written one: a temporary file in the same
directory, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Iterator

import gguf


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


@contextlib.contextmanager
def gguf_output(path: str | os.PathLike, arch: str) -> Iterator[gguf.GGUFWriter]:
    """A GGUFWriter for ``arch``: add keys and tensors in the block; the file appears whole or not at all."""
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        try:
            yield w
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
