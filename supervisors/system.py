"""The actor system's life as seen from outside: start it, attach to it, clean up after it.

Where this sits: `fleetgw run` starts a hardened multiprocTCPBase system on a loopback admin
port and records its process group in DATA_DIR/run/gateway.json; the next run (after a SIGKILL
or a power cut) kills whatever that group left behind before starting. The inspector attaches
to a running system and never starts or shuts one down.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from typing import Any

import psutil

from supervisors import hardening

LOOPBACK = "127.0.0.1"


class StaleSystemError(RuntimeError):
    """Something that is not ours holds what the gateway needs (e.g. its admin port)."""


class NoGatewayError(RuntimeError):
    """Nothing listens on the admin port: no gateway to attach to."""


def admin_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LOOPBACK, port)) == 0


def listener_pids(port: int) -> list[int]:
    """Pids of processes with a listening TCP socket on ``port``."""
    pids = set()
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    pids.add(proc.pid)
    return sorted(pids)


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        # A process may exit between the listing and these calls: skip it.
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def _is_ours(proc: psutil.Process) -> bool:
    """A fleetgw process: actors are forked from the run process and keep its command line."""
    with contextlib.suppress(psutil.Error):
        cmd = " ".join(proc.cmdline())
        return any(mark in cmd for mark in ("fleetgw", "tools.cli", "thespian", "pytest"))
    return False


def kill_group(pgid: int, timeout_s: float = 10.0) -> int:
    """SIGKILL the fleetgw processes of a process group and wait until they are gone; returns
    how many there were. Processes of the group that are not fleetgw's are left alone (a
    recorded group id may have been reused)."""
    if pgid == os.getpgid(0):
        return 0
    members = [p for p in group_members(pgid) if _is_ours(p)]
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                   for p in members if _safe(p)):
            break
        time.sleep(0.05)
    return len(members)


def _safe(proc: psutil.Process) -> bool:
    try:
        proc.status()
        return True
    except psutil.Error:
        return False


def boot_id() -> str:
    """This boot's id: process ids and groups recorded in another boot mean nothing now."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


class RunLocks:
    """Exclusive locks a run holds for its whole life: one on its data dir (two gateways on one
    journal would be two writers, I3) and one on its admin port. flock locks die with the run
    process; forked actor processes close their copies at once (os.register_at_fork), so an
    orphaned actor system never keeps a dead run's locks."""

    _fds: list[int] = []
    _hooked = False

    @classmethod
    def acquire(cls, data_dir: str, admin_port: int) -> None:
        import tempfile

        run_dir = os.path.join(data_dir, "run")
        os.makedirs(run_dir, exist_ok=True)
        cls._take(os.path.join(run_dir, "gateway.lock"),
                  f"another gateway is running on data dir {data_dir}")
        cls._take(os.path.join(tempfile.gettempdir(), f"fleetgw-admin-{admin_port}.lock"),
                  f"admin port {admin_port} is used by a running gateway; choose another "
                  "--admin-port")
        if not cls._hooked:
            os.register_at_fork(after_in_child=cls._close_in_child)
            cls._hooked = True

    @classmethod
    def _take(cls, path: str, busy: str) -> None:
        import fcntl

        try:
            fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), True
        except PermissionError:
            # Left in /tmp by a run as another user (e.g. root, before the service user was
            # set up): a read-only descriptor locks as well; only the holder's pid goes unsaid.
            try:
                fd, writable = os.open(path, os.O_RDONLY), False
            except OSError as exc:
                raise StaleSystemError(f"cannot open the lock file {path}: {exc.strerror}; it "
                                       "was left by a run as another user: remove it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            raise StaleSystemError(f"{busy} ({holder or 'unknown holder'})") from None
        if writable:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}".encode())
        cls._fds.append(fd)

    @classmethod
    def _close_in_child(cls) -> None:
        for fd in cls._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        cls._fds = []

    @classmethod
    def release(cls) -> None:
        cls._close_in_child()


def state_file(data_dir: str) -> str:
    return os.path.join(data_dir, "run", "gateway.json")


def read_state(data_dir: str) -> dict[str, Any]:
    try:
        with open(state_file(data_dir)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def write_state(data_dir: str, **state: Any) -> None:
    path = state_file(data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as fh:
        json.dump(state, fh)
    os.replace(f"{path}.tmp", path)


def clear_state(data_dir: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(state_file(data_dir))


def cleanup_stale(data_dir: str, admin_port: int) -> list[str]:
    """Take the run's locks, then remove what an earlier run on this data dir or admin port
    left behind (after a SIGKILL or a power cut).

    Raises StaleSystemError when a live gateway runs on this data dir or admin port, or when
    the admin port belongs to a process that is not a fleetgw gateway.
    """
    RunLocks.acquire(data_dir, admin_port)
    actions: list[str] = []
    state = read_state(data_dir)
    pgid = state.get("pgid")
    if pgid and state.get("boot_id") == boot_id():
        n = kill_group(pgid)
        if n:
            actions.append(f"killed {n} leftover actor process(es) of process group {pgid}")
    if admin_listening(admin_port):
        # We hold the port's lock, so no live run owns whatever listens there.
        for pid in listener_pids(admin_port):
            with contextlib.suppress(psutil.Error, OSError):
                proc = psutil.Process(pid)
                if not _is_ours(proc):
                    raise StaleSystemError(
                        f"admin port {admin_port} is in use by pid {pid} "
                        f"({' '.join(proc.cmdline())[:80]}); choose another --admin-port"
                    )
                n = kill_group(os.getpgid(pid))
                actions.append(f"killed {n} process(es) of a stale actor system on port "
                               f"{admin_port}")
    with contextlib.suppress(OSError):
        for name in os.listdir(os.path.join(data_dir, "run")):
            if name.startswith("sup-"):
                os.unlink(os.path.join(data_dir, "run", name))
    return actions


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux PR_SET_CHILD_SUBREAPER):
    the double-forked Admin and any actor orphaned by a dead parent are reparented here and
    reaped by `reap_children`, instead of lingering as zombies under an init that reaps
    lazily (a container's pid 1, this sandbox's)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_children() -> int:
    """Collect every child that has exited (never blocks); returns how many."""
    reaped = 0
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


def start_actor_system(admin_port: int, log_defs: dict | None) -> Any:
    """Start a hardened multiprocTCPBase actor system on a loopback admin port."""
    hardening.apply()
    from thespian.actors import ActorSystem

    return ActorSystem("multiprocTCPBase", hardening.capabilities(admin_port), logDefs=log_defs)


def attach(admin_port: int) -> Any:
    """Attach to the running system on ``admin_port`` without ever starting one.

    Thespian's ActorSystem() starts a new Admin when none answers on the port; an inspector
    racing a gateway's restart would then leave a rogue Admin holding the gateway's port. In
    an attaching process that start is replaced by an error.
    """
    if not admin_listening(admin_port):
        raise NoGatewayError(f"no gateway is running on admin port {admin_port}")
    hardening.apply()
    from thespian.actors import ActorSystem
    from thespian.system import multiprocCommon

    def refuse_to_start_admin(*_args: Any, **_kwargs: Any) -> None:
        raise NoGatewayError(f"no gateway is running on admin port {admin_port}")

    multiprocCommon.multiprocessCommon._startAdmin = refuse_to_start_admin
    return ActorSystem("multiprocTCPBase", hardening.capabilities(admin_port))
