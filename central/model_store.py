"""The model store: the signed model versions the receiver offers to gateways.

Where this sits: central, beside the ingest path. With a ``[models] directory`` in its config,
``fleetgw central serve`` serves it read-only (`central.receiver`): ``GET /v1/models`` is the
`catalog`, ``GET /v1/models/<version>/<file>`` one file (`open_file`, with `byte_range` for a
resumed download). The gateways' `ModelUpdater` (actors/uplink/model_update.py) fetches newer
versions; their registry verifies the signature and the hashes and runs the self-test before
anything is served. The store verifies no signature: it is a shelf, not an authority.

Layout: DIRECTORY/<version>/ as `fleetgw model train` writes it (model.xml, model.bin,
manifest.json, manifest.sig). A version is listed when its name matches VERSION_RE, it is a
real directory and it holds a manifest.json and a manifest.sig; its files are the regular files
with plain names (`FILE_NAME_RE`). Nothing else is served: no symlink, no subdirectory, no
hidden file, nothing outside DIRECTORY. Each file's sha256 (its ETag) is computed once and kept
while its (inode, size, mtime) stay the same. A version's files should never change once
published: publish a new version instead (the gateway refuses bytes that differ from the
catalog it read, and remembers the refusal).

Catalog (JSON): ``{"format": "fleetgw.models/1", "versions": [{"version": V, "files": {NAME:
{"size": BYTES, "sha256": HEX}}}]}``, versions in ascending order.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs

from actors.model_runner.manifest import MANIFEST, SIGNATURE, VERSION_RE
from actors.model_runner.registry import version_key
from actors.uplink.model_update import CATALOG_FORMAT, FILE_NAME_RE, MODELS_PATH

#: Bytes read (and sent) at a time when hashing or serving a file.
BLOCK_BYTES = 64 << 10
#: ``Range: bytes=N-``, ``bytes=N-M`` or ``bytes=-N`` (the last N), one range only.
RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class ModelStoreError(Exception):
    """A refused model request: the HTTP ``status`` and a ``reason`` for the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@attrs.frozen
class StoredFile:
    """One file of a version, opened: ``size`` bytes with ``sha256`` (of the file as
    opened). Close it (or use it in a ``with``)."""

    version: str
    name: str
    size: int
    sha256: str
    file: BinaryIO = attrs.field(eq=False, repr=False)

    def blocks(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start``..``end`` (inclusive), a block at a time."""
        self.file.seek(start)
        left = end - start + 1
        while left > 0:
            block = self.file.read(min(BLOCK_BYTES, left))
            if not block:
                raise OSError(f"{self.version}/{self.name} shrank while it was served")
            left -= len(block)
            yield block

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> StoredFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte of a single-range ``Range`` header for a file of
    ``size`` bytes; None: serve it whole (no header, or one this store does not support, such
    as several ranges: the standard lets a server ignore those). Raises ModelStoreError 416
    for a range that starts at or after the end."""
    match = RANGE_RE.fullmatch((header or "").replace(" ", ""))
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first:
        start, end = int(first), int(last) if last else size - 1
        if last and end < start:
            return None  # invalid: ignored, as the standard says
    else:  # the last N bytes; none of them: unsatisfiable
        start, end = (size - int(last), size - 1) if int(last) else (size, size)
    if start >= size:
        raise ModelStoreError(416, f"range {header} is beyond the file's {size} bytes")
    return max(0, start), min(end, size - 1)


class ModelStore:
    """The versions under ``directory``, read-only; safe to use from several threads."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._digests: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.directory)!r})"

    def catalog(self) -> dict[str, Any]:
        """Every listed version with its files' sizes and sha256 (JSON-able)."""
        versions = []
        for version in self._versions():
            try:
                files = self._files(version)
            except ModelStoreError:
                continue  # removed meanwhile
            versions.append({"version": version, "files": {
                name: {"size": size, "sha256": digest}
                for name, (size, digest) in sorted(files.items())}})
        return {"format": CATALOG_FORMAT, "versions": versions}

    def open_file(self, version: str, name: str) -> StoredFile:
        """One file the catalog lists, opened. Raises ModelStoreError: 400 for a version or
        file name that is not plain (``..``, ``/``, absolute), 404 for one not in the store."""
        if not VERSION_RE.fullmatch(version):
            raise ModelStoreError(400, f"{version[:80]!r} is not a model version "
                                       f"({VERSION_RE.pattern})")
        if not FILE_NAME_RE.fullmatch(name):
            raise ModelStoreError(400, f"{name[:80]!r} is not a plain file name "
                                       f"({FILE_NAME_RE.pattern})")
        files = self._files(version)
        if name not in files:
            raise ModelStoreError(404, f"model version {version} has no file {name!r} (it "
                                       f"has {', '.join(sorted(files))})")
        path = self.directory / version / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ModelStoreError(404, f"{version}/{name}: {exc.strerror}") from None
        fh = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ModelStoreError(404, f"{version}/{name} is not a file")
            return StoredFile(version, name, st.st_size, self._sha256(path, st, fh), fh)
        except BaseException:
            fh.close()
            raise

    # ---- internals ----------------------------------------------------------------------
    def _versions(self) -> list[str]:
        """Listed version names, ascending; none when the directory is missing."""
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ModelStoreError(503, f"the models directory cannot be read: "
                                       f"{exc.strerror}") from None
        names = [e.name for e in entries if VERSION_RE.fullmatch(e.name)
                 and e.is_dir(follow_symlinks=False)
                 and all(os.path.isfile(os.path.join(e.path, f)) for f in (MANIFEST, SIGNATURE))]
        return sorted(names, key=version_key)

    def _files(self, version: str) -> dict[str, tuple[int, str]]:
        """name -> (size, sha256) of a listed version's files; 404 when not listed."""
        if version not in self._versions():
            raise ModelStoreError(404, f"no model version {version} in this store (GET "
                                       f"{MODELS_PATH} lists them)")
        files = {}
        try:
            for entry in os.scandir(self.directory / version):
                if FILE_NAME_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    files[entry.name] = (st.st_size, self._sha256(Path(entry.path), st))
        except OSError as exc:
            raise ModelStoreError(404, f"model version {version}: {exc.strerror}") from None
        return files

    def _sha256(self, path: Path, st: os.stat_result, fh: BinaryIO | None = None) -> str:
        """The sha256 of ``path`` whose stat is ``st`` (of ``fh`` when it is open), from the
        cache while the file's inode, size and mtime are those it was computed for."""
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._digests.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        if fh is None:
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as opened:
                digest = file_sha256(opened)
        else:
            digest = file_sha256(fh)
        with self._lock:
            self._digests[path] = (key, digest)
        return digest


def file_sha256(fh: BinaryIO) -> str:
    """sha256 of an open file, from its start."""
    fh.seek(0)
    h = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()
