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
        with contextlib.suppress(psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


def _is_ours(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        cmd = " ".join(proc.cmdline())
        return any(mark in cmd for mark in ("fleetgw", "tools.cli", "thespian", "pytest"))
    return False


def kill_group(pgid: int, timeout_s: float = 10.0) -> int:
    """SIGKILL a process group and wait until it is gone; returns how many were alive."""
    members = group_members(pgid)
    if not members:
        return 0
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(members)


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
    """Remove what an earlier run on this data dir or admin port left behind.

    Raises StaleSystemError when a live gateway still runs on this data dir, or when the admin
    port belongs to a process that is not a fleetgw gateway.
    """
    actions: list[str] = []
    state = read_state(data_dir)
    run_pid = state.get("run_pid")
    if run_pid and run_pid != os.getpid() and psutil.pid_exists(run_pid):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(run_pid)
            if (abs(proc.create_time() - state.get("run_started", 0)) < 1.0
                    and proc.status() != psutil.STATUS_ZOMBIE):
                raise StaleSystemError(
                    f"another gateway (pid {run_pid}) is running on data dir {data_dir}; "
                    "stop it first (kill -TERM {run_pid})"
                )
    pgid = state.get("pgid")
    if pgid:
        n = kill_group(pgid)
        if n:
            actions.append(f"killed {n} leftover actor process(es) of process group {pgid}")
    if admin_listening(admin_port):
        for pid in listener_pids(admin_port):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if not _is_ours(proc):
                    raise StaleSystemError(
                        f"admin port {admin_port} is in use by pid {pid} "
                        f"({' '.join(proc.cmdline())[:80]}); choose another --admin-port"
                    )
                group = os.getpgid(pid)
                if group == os.getpgid(0):
                    raise StaleSystemError(
                        f"admin port {admin_port} is held by a process of our own group")
                n = kill_group(group)
                actions.append(f"killed {n} process(es) of a stale actor system on port "
                               f"{admin_port}")
    with contextlib.suppress(OSError):
        for name in os.listdir(os.path.join(data_dir, "run")):
            if name.startswith("sup-"):
                os.unlink(os.path.join(data_dir, "run", name))
    return actions


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
