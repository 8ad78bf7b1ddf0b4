"""Durable small-file writes: replace a file atomically, copy one durably, fsync a directory.

Where this sits: beside the data path, for the state kept in plain files rather than the
journal — the model registry's active pointer, history and installed copies
(actors/model_runner/registry.py) and the central device registry's key files
(central/devices.py). After a power cut a reader finds the old file or the new one, whole,
never a mix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory's entries (a rename, a new file) survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: a temporary file in the same directory, fsynced,
    renamed over it, then the directory fsynced. The temporary file goes on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def copy_durably(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy ``src`` to ``dst`` and fsync the copy (the caller fsyncs the directory)."""
    shutil.copyfile(src, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())
