"""Process-level facts and force for supervisors: is a pid alive, kill it, reap orphans.

Where this sits: used by `supervisors.supervisor` only. Thespian offers no kill API and leaves
a dead parent's children running (THESPIAN_NOTES.md), so a supervisor records its children's
pids (with their start times, so a recycled pid is never killed by mistake) in
DATA_DIR/run/sup-<name>.json, and a new incarnation of the supervisor kills what its
predecessor left behind before it starts anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterable, Iterator
from typing import Any

import psutil

from messages.supervision import ActorNode


def create_time(pid: int | None) -> float | None:
    """A process's start identity: its start time in clock ticks since boot (``/proc/PID/stat``
    field 22). Unlike a wall-clock start time it does not move when the clock is stepped (an
    offline Pi's clock jumps at its first NTP sync), so it is compared exactly."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        return float(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        try:
            return psutil.Process(pid).create_time()
        except psutil.Error:
            return None


def alive(pid: int | None, started: float | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, when ``started`` is given, is that process."""
    if pid is None:
        return False
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False
    return started is None or create_time(pid) == started


def kill(pid: int, started: float | None = None) -> bool:
    """SIGKILL ``pid`` and its descendants (if it is still the process started at
    ``started``). Returns whether it was alive.

    Descendants that are other programs than the gateway's Python (the local broker's
    mosquitto) get SIGTERM instead: they are not hung, and mosquitto saves its queued
    messages on SIGTERM, which SIGKILL would lose."""
    if not alive(pid, started):
        return False
    try:
        proc = psutil.Process(pid)
        victims = [proc, *proc.children(recursive=True)]
        ours = proc.exe()
    except psutil.Error:
        return False
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            foreign = victim is not proc and victim.exe() != ours
            victim.send_signal(signal.SIGTERM if foreign else signal.SIGKILL)
    return True


def describe_exit_status(code: int) -> str:
    """A process's exit status for operators: ``exit status 1``, ``killed by SIGKILL``
    (multiprocessing and subprocess give a signal as a negative code)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def pid_of_new_child(actor: Any, address: Any) -> int | None:
    """The pid of a child the actor just created (Thespian starts it synchronously and keeps
    its multiprocessing.Process); None if this Thespian does not expose it."""
    manager = getattr(actor, "_myRef", None)
    for info in reversed(getattr(manager, "_child_procs", []) or []):
        if info.childAddr is address or info.childAddr == address:
            return getattr(info.childProc, "pid", None)
    return None


def walk(nodes: Iterable[ActorNode]) -> Iterator[ActorNode]:
    """Every node of a subtree, depth first."""
    for node in nodes:
        yield node
        yield from walk(node.children)


def _file(data_dir: str, name: str) -> str:
    safe = name.replace(":", "_").replace("/", "_")
    return os.path.join(data_dir, "run", f"sup-{safe}.json")


def record_children(data_dir: str, name: str, records: Iterable[Any]) -> None:
    """Persist the pids (with start times) of a supervisor's children and their subtrees."""
    entries = []
    for rec in records:
        if rec.pid is not None:
            entries.append([rec.spec.name, rec.pid, rec.pid_create_time])
        for node in walk(rec.subtree):
            if node.pid:
                entries.append([node.name, node.pid, create_time(node.pid)])
    path = _file(data_dir, name)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump({"supervisor_pid": os.getpid(), "children": entries}, fh)
        os.replace(tmp, path)
    except OSError as exc:
        # Best effort: a full disk must not take the supervisor down with it (the journal
        # refuses appends cleanly then). Reaping after a crash may miss these children.
        logging.getLogger("fleetgw").warning(
            "supervisor %s could not record its children's pids in %s: %s", name, path, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def reap_predecessor(data_dir: str, name: str) -> list[tuple[str, int]]:
    """Kill the processes a previous incarnation of supervisor ``name`` recorded, if they
    still run. Returns (child name, pid) of each process killed."""
    path = _file(data_dir, name)
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return []
    killed = []
    if data.get("supervisor_pid") == os.getpid():
        return []
    for child, pid, started in data.get("children", []):
        if pid != os.getpid() and started is not None and kill(pid, started):
            killed.append((child, pid))
    with contextlib.suppress(OSError):
        os.unlink(path)
    return killed
