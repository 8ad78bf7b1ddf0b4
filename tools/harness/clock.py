"""A wall-clock jump for a gateway's processes and their children only, through libfaketime.

Where this sits: in the fault-injection harness, outside the gateway. A Raspberry Pi has no
real-time clock: it boots with a stale wall clock and steps it when NTP or a GPS fix arrives,
forwards by days or backwards by hours. `ClockControl` plays that step for one gateway: start
the gateway with `env()`, then `jump(seconds)`; every process started with that environment
(the run process, each actor, the broker it launches) sees ``time.time()`` move by the jump
within `JUMP_SEEN_WITHIN_S`, while the monotonic clock (``time.monotonic``,
``time.perf_counter``: supervision deadlines, Thespian's timers) runs on untouched. Nothing
else on the machine sees the jump: no ``settimeofday``, no privileges needed.

How: the Debian package `PACKAGE` provides libfaketime's preload library. Its
``FAKETIME_TIMESTAMP_FILE`` holds the offset ("+86400.000000"), rewritten atomically by each
jump; each process re-reads it at most once per real second (``FAKETIME_CACHE_DURATION=0``:
the file is read again once the real clock's second has changed). The choices, from
libfaketime 0.9.10's README and source:

- ``libfaketimeMT.so.1``, not ``libfaketime.so.1``: the two differ only in
  PTHREAD_SINGLETHREADED_TIME, a mutex around the faked clock. Without it a thread reading the
  clock while another re-reads the offset file can see a half-updated offset (the parsed
  string and the timespec are unlocked statics), which a gateway with threads (paho's loop,
  the uplink's worker pool, OpenVINO's, the admin HTTP server) would eventually hit. The cost
  is a lock and two signal-mask calls per wall-clock read; monotonic reads do not enter it.
- ``FAKETIME_DONT_FAKE_MONOTONIC=1``: otherwise the offset is applied to CLOCK_MONOTONIC too.
- ``NO_FAKE_STAT=1``: otherwise every stat() result has the offset added to its times (file
  times would move with each jump, which a real clock step does not do: the model runner,
  which watches a file's mtime, would see a change that never happened), and every stat()
  takes a semaphore shared by all the processes, which a SIGKILLed process can leave taken.
- ``FAKETIME_SHARED``: left unset, each process tree's first process creates
  /dev/shm/faketime_shm_<pid> and sem.faketime_sem_<pid>, and a Python process never removes
  them. `ClockControl` creates the pair itself and `close()` removes it.
- A ``sitecustomize`` on ``PYTHONPATH`` replaces ``time.sleep``: libfaketime 0.9.10 (Debian 12)
  converts clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) deadlines as if they were wall-clock
  times even with FAKETIME_DONT_FAKE_MONOTONIC=1 (upstream issue #426), and Python 3.11's
  ``time.sleep`` sleeps exactly so: every call would fail with EINVAL. The replacement sleeps
  in select(), which libfaketime passes through. (Threading waits use sem_clockwait, which
  libfaketime does not intercept.)
- A limit to watch on arm64 (read in libfaketime's source, not seen on amd64): built for ARM,
  its pthread_cond_timedwait converts a CLOCK_MONOTONIC deadline with the faked wall clock, so
  such waits (Python's GIL wait is one) may return at once: same results, more CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import subprocess
import uuid

#: The Debian package that installs libfaketime's preload libraries (`faketime`, the command
#: line wrapper, depends on it).
PACKAGE = "libfaketime"
LIBRARY_NAME = "libfaketimeMT.so.1"
LIBRARY_GLOB = f"/usr/lib/*/faketime/{LIBRARY_NAME}"
#: Loaded by every Python process started with `ClockControl.env` (see the module docstring).
SITECUSTOMIZE = '''"""Written by tools/harness/clock.py: time.sleep for processes under libfaketime 0.9.10,
whose clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) fails with EINVAL (its issue #426)."""

import importlib.machinery
import importlib.util
import os
import select
import sys
import time

_monotonic = time.monotonic


def _sleep(seconds):
    seconds = float(seconds)
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = _monotonic() + seconds
    while True:  # select() at least once: sleep(0) still lets other threads run
        select.select([], [], [], max(0.0, deadline - _monotonic()))
        if _monotonic() >= deadline:
            return


time.sleep = _sleep

# Then the sitecustomize this one shadows, if there is one.
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
'''
#: Real seconds within which every process under `ClockControl.env` sees a jump.
JUMP_SEEN_WITHIN_S = 1.0
SHM_DIR = "/dev/shm"
_SEM_FAILED = ctypes.c_void_p(-1).value


class ClockControlError(RuntimeError):
    """libfaketime is missing or its shared objects cannot be made."""


def find_library() -> str:
    """The multithreaded libfaketime preload library of this machine's architecture."""
    found = sorted(glob.glob(LIBRARY_GLOB))
    if not found:
        try:
            listed = subprocess.run(["dpkg", "-L", PACKAGE], capture_output=True, text=True,
                                    check=False).stdout.split()
        except OSError:  # no dpkg: not Debian
            listed = []
        found = [path for path in listed if path.endswith(f"/{LIBRARY_NAME}")]
    if not found:
        raise ClockControlError(
            f"a clock jump needs libfaketime: {LIBRARY_GLOB} not found; install the Debian "
            f"package {PACKAGE} (apt-get install {PACKAGE})")
    return found[0]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sem_open.restype = ctypes.c_void_p
    libc.sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_uint]
    libc.sem_close.argtypes = [ctypes.c_void_p]
    libc.sem_unlink.argtypes = [ctypes.c_char_p]
    return libc


class ClockControl:
    """The wall-clock offset of the processes started with `env()`; state in ``directory``.

    ``offset_s`` starts at 0; `jump` adds to it (forwards or backwards). ``directory`` holds
    the offset file and the ``sitecustomize`` that gives those processes a working
    ``time.sleep``. Use as a context manager, or call `close()`, to remove the shared objects
    it made in /dev/shm.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.library = find_library()
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.timestamp_file = os.path.join(self.directory, "faketime.rc")
        self.site_dir = os.path.join(self.directory, "site")
        os.makedirs(self.site_dir, exist_ok=True)
        with open(os.path.join(self.site_dir, "sitecustomize.py"), "w") as fh:
            fh.write(SITECUSTOMIZE)
        self._offset_s = 0.0
        self._write_offset()
        name = f"fleetgw-faketime-{uuid.uuid4().hex[:12]}"
        self._sem_name, self._shm_name = f"/{name}-sem", f"/{name}-shm"
        self._make_shared_objects()
        self._closed = False

    @property
    def offset_s(self) -> float:
        """Seconds the faked wall clock is ahead of the real one (negative: behind)."""
        return self._offset_s

    def env(self) -> dict[str, str]:
        """The environment variables to start the gateway with (merged into os.environ by
        the caller). An LD_PRELOAD or PYTHONPATH already set is kept, after ours."""
        preload = " ".join(p for p in (self.library, os.environ.get("LD_PRELOAD")) if p)
        path = os.pathsep.join(p for p in (self.site_dir, os.environ.get("PYTHONPATH")) if p)
        return {
            "LD_PRELOAD": preload,
            "PYTHONPATH": path,
            "FAKETIME_TIMESTAMP_FILE": self.timestamp_file,
            "FAKETIME_CACHE_DURATION": "0",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "NO_FAKE_STAT": "1",
            "FAKETIME_SHARED": f"{self._sem_name} {self._shm_name}",
        }

    def jump(self, seconds: float) -> float:
        """Step the wall clock by ``seconds`` (cumulative, either sign); return the new
        offset. Processes see it within `JUMP_SEEN_WITHIN_S`."""
        self._offset_s += float(seconds)
        self._write_offset()
        return self._offset_s

    def _write_offset(self) -> None:
        # Atomically: a process reading the file mid-write would otherwise parse a prefix
        # ("+86" of "+86400") and run on that until its next read.
        staging = f"{self.timestamp_file}.{os.getpid()}.tmp"
        with open(staging, "w") as fh:
            fh.write(f"{self._offset_s:+.6f}\n")
        os.replace(staging, self.timestamp_file)

    def _make_shared_objects(self) -> None:
        libc = _libc()
        sem = libc.sem_open(self._sem_name.encode(), os.O_CREAT | os.O_EXCL, 0o600, 1)
        if sem in (None, _SEM_FAILED):
            errno = ctypes.get_errno()
            raise ClockControlError(f"cannot create the semaphore {self._sem_name} for "
                                    f"libfaketime: {os.strerror(errno)}")
        libc.sem_close(sem)
        try:
            fd = os.open(os.path.join(SHM_DIR, self._shm_name[1:]),
                         os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            libc.sem_unlink(self._sem_name.encode())
            raise ClockControlError(f"cannot create the shared memory {self._shm_name} for "
                                    f"libfaketime: {exc}") from exc
        try:
            os.ftruncate(fd, os.sysconf("SC_PAGE_SIZE"))  # libfaketime maps its counters
        finally:
            os.close(fd)

    def close(self) -> None:
        """Remove the semaphore and shared memory (idempotent). Processes still running keep
        their mappings; ones started after this create their own."""
        if self._closed:
            return
        self._closed = True
        _libc().sem_unlink(self._sem_name.encode())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self._shm_name[1:]))

    def __enter__(self) -> ClockControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
