"""A real full disk: a small tmpfs mounted at a directory, filled and freed on demand.

Where this sits: in the fault-injection harness, outside the gateway. A gateway whose data dir
is on a `SmallDisk` meets a real ENOSPC from the kernel (SQLite's SQLITE_FULL, apsw.FullError)
when `fill()` takes the last free bytes, exactly as on an SD card that filled up; `free()`
gives the space back. Mounting needs root (the tests and CI run as root); the error says so.
`unmount()` (also on leaving the ``with`` block, and at interpreter exit as a last resort)
never leaves a mount behind: a busy mount (a gateway still holding its journal open) is
detached lazily.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import weakref
from typing import NamedTuple

FILLER_NAME = ".filler"
#: Bytes written per call while filling; the last bytes go a page at a time.
CHUNK_BYTES = 1 << 20
PAGE_BYTES = 4096


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


class DiskError(RuntimeError):
    """The tmpfs cannot be mounted (or the directory is not fit for one)."""


def _unmount(directory: str) -> None:
    """Unmount ``directory`` if it is a mount point: normally, else lazily (busy)."""
    if not os.path.ismount(directory):
        return
    done = subprocess.run(["umount", directory], capture_output=True, text=True, check=False)
    if done.returncode != 0 and os.path.ismount(directory):
        subprocess.run(["umount", "--lazy", directory], capture_output=True, check=False)


class SmallDisk:
    """A tmpfs of ``size_mb`` MiB mounted at ``directory`` (created if missing) from
    construction until `unmount()`."""

    def __init__(self, directory: str | os.PathLike[str], size_mb: int) -> None:
        if isinstance(size_mb, bool) or not isinstance(size_mb, int) or size_mb <= 0:
            raise ValueError(f"size_mb must be an int > 0 (got {size_mb!r})")
        self.directory = os.path.abspath(os.fspath(directory))
        self.size_mb = size_mb
        self.filler_path = os.path.join(self.directory, FILLER_NAME)
        os.makedirs(self.directory, exist_ok=True)
        if os.path.ismount(self.directory):
            raise DiskError(f"{self.directory} is already a mount point: refusing to mount a "
                            "tmpfs over it")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs",
             self.directory], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise DiskError(f"a real full disk needs root to mount a tmpfs: mount at "
                            f"{self.directory} failed: {done.stderr.strip() or done.returncode}")
        # Unmounted at interpreter exit if nobody called unmount(); unmount() runs it now.
        self._finalizer = weakref.finalize(self, _unmount, self.directory)

    @property
    def mounted(self) -> bool:
        return self._finalizer.alive and os.path.ismount(self.directory)

    def usage(self) -> DiskUsage:
        """Bytes of the tmpfs: total, used, free."""
        return DiskUsage(*shutil.disk_usage(self.directory))

    def fill(self, leave_bytes: int = 0) -> int:
        """Add to the filler file until the disk is full (ENOSPC) or only about
        ``leave_bytes`` remain free (rounded to whole pages); return the bytes added. May be
        called again, e.g. after the gateway freed space."""
        if leave_bytes < 0:
            raise ValueError(f"leave_bytes must be >= 0 (got {leave_bytes!r})")
        written, size = 0, CHUNK_BYTES
        with open(self.filler_path, "ab", buffering=0) as fh:
            while True:
                room = self.usage().free - leave_bytes
                if leave_bytes == 0:
                    room = max(room, PAGE_BYTES)  # full means: until the kernel says ENOSPC
                if room < PAGE_BYTES:
                    break
                try:
                    written += fh.write(bytes(min(size, room - room % PAGE_BYTES)))
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if size == PAGE_BYTES:
                        break  # not one more page
                    size = PAGE_BYTES  # the last bytes a page at a time
        return written

    def free(self) -> int:
        """Remove the filler; return the bytes it held."""
        try:
            size = os.path.getsize(self.filler_path)
            os.unlink(self.filler_path)
        except FileNotFoundError:
            return 0
        return size

    def unmount(self) -> None:
        """Unmount (lazily when busy). Idempotent."""
        self._finalizer()

    def __enter__(self) -> SmallDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()
