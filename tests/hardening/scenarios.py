"""Reproduce one Thespian 4.0.1 defect in a fresh process and print the findings as JSON.

    python -m tests.hardening.scenarios NAME --port PORT [--patched] [--deadline S] [...]

Run from the repository root. Each run starts its own multiprocTCPBase system on PORT, with or
without `supervisors.hardening.apply()` (a fresh process, so the patches never leak into the
caller), drives it, then tears it down: ``shutdown()``, SIGKILL of the Admin's process group,
and reaping (this process makes itself a child subreaper, so the double-forked Admin and its
actors are reparented here and reaped here instead of staying zombies under a PID 1 that does
not reap). Stdout is JSON lines: ``{"pgid": N}`` as soon as the system's process group is
known (so a caller can kill it if this process hangs), and last the result, which includes
``leftover``: the pids still in that process group after teardown (must be empty).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psutil
from thespian.actors import ActorExitRequest, ActorSystem

from supervisors import hardening
from tests.hardening.probe_actors import Parent, Probe

PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.01


class Harness:
    """One actor system on one admin port, torn down completely on exit."""

    def __init__(self, port: int, patched: bool) -> None:
        self.port = port
        self.patched = patched
        self.pgid: int | None = None
        self.extra_pids: set[int] = set()  # processes to SIGKILL before shutdown (stuck ones)
        self._tags = itertools.count(1)

    def __enter__(self) -> Harness:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if self.patched:
            hardening.apply()
        self.asys = ActorSystem("multiprocTCPBase", hardening.capabilities(self.port))
        return self

    def ask(self, addr: Any, op: str, *args: Any, timeout: float = 5.0) -> dict | None:
        """Send (op, tag, *args); return the reply dict with that tag, None on timeout."""
        tag = next(self._tags)
        end = time.monotonic() + timeout
        reply = self.asys.ask(addr, (op, tag, *args), timeout)
        while not (isinstance(reply, dict) and reply.get("tag") == tag):
            left = end - time.monotonic()
            if left <= 0:
                return None
            reply = self.asys.listen(left)
        if "pgid" in reply and self.pgid is None:
            self.pgid = reply["pgid"]
            # Tell the caller at once, so it can kill the group if this process hangs.
            print(json.dumps({"pgid": self.pgid}), flush=True)
        return reply

    def tell(self, addr: Any, op: str, *args: Any) -> None:
        self.asys.tell(addr, (op, next(self._tags), *args))

    def group(self) -> list[int]:
        """Pids of the processes (zombies included) in the actor system's process group."""
        return [] if self.pgid is None else process_group(self.pgid)

    def __exit__(self, *exc: Any) -> None:
        for pid in self.extra_pids:
            _kill(pid)
        t0 = time.monotonic()
        try:
            self.asys.shutdown()
        except Exception as ex:  # the Admin may be dead: that is what some scenarios show
            print(f"shutdown: {type(ex).__name__}: {ex}", file=sys.stderr)
        self.shutdown_s = round(time.monotonic() - t0, 2)
        if self.pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
        # Reap everything reparented here until the group is gone (bounded).
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            _reap_children()
            if not self.group():
                break
            time.sleep(POLL_S)
        self.leftover = self.group()


def process_group(pgid: int) -> list[int]:
    """Pids of every process, zombies included, whose process group is ``pgid``."""
    pids = []
    for proc in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(proc.pid) == pgid:
                pids.append(proc.pid)
    return pids


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _wait_exits(h: Harness, parent: Any, keys: set[str], deadline: float) -> tuple[dict, float]:
    """Poll the parent until it has seen ChildActorExited for every key, or the deadline.

    Returns ({key: exit code} for the keys seen, seconds waited)."""
    t0 = time.monotonic()
    while True:
        reply = h.ask(parent, "exits", timeout=2.0)
        seen = {k: code for k, code in (reply["exits"] if reply else []) if k in keys}
        elapsed = time.monotonic() - t0
        if len(seen) == len(keys) or elapsed > deadline:
            return seen, elapsed
        time.sleep(POLL_S)


# ---------------------------------------------------------------------------------------------
# Scenarios


def scenario_segv(h: Harness, args: argparse.Namespace) -> dict:
    """An actor reads address 0; does its parent get ChildActorExited?"""
    parent = h.asys.createActor(Parent)
    h.ask(parent, "ids")
    ((key, pid),) = h.ask(parent, "spawn", 1)["children"]
    h.extra_pids.add(pid)
    h.tell(parent, "segv-all", args.restore)
    got, elapsed = _wait_exits(h, parent, {key}, args.deadline)
    result = {
        "notice": key in got,
        "exit_code": got.get(key),
        "detect_ms": round(elapsed * 1000, 1),
    }
    try:
        proc = psutil.Process(pid)
        result["child_status"] = proc.status()
        result["child_cpu_percent"] = proc.cpu_percent(0.5)
    except psutil.NoSuchProcess:
        result["child_status"] = "gone"
    return result


def scenario_lost_exits(h: Harness, args: argparse.Namespace) -> dict:
    """Kill N children of one parent at once; how many ChildActorExited arrive?"""
    parent = h.asys.createActor(Parent)
    h.ask(parent, "ids")
    trials, keys = [], []
    for _ in range(args.trials):
        children = h.ask(parent, "spawn", args.children)["children"]
        for _, pid in children:
            _kill(pid)
        keys.append({k for k, _ in children})
        got, elapsed = _wait_exits(h, parent, keys[-1], args.deadline)
        trials.append(
            {
                "received": len(got),
                "exit_codes": sorted(set(map(str, got.values()))),
                "ms": round(elapsed * 1000, 1),
            }
        )
        if args.stop_after_loss and len(got) < args.children:
            break
    time.sleep(args.settle)  # a window for late (or duplicate) notices to show up
    final = h.ask(parent, "exits")
    seen = {k for k, _ in final["exits"]}
    for trial, trial_keys in zip(trials, keys, strict=True):
        trial["final_received"] = len(trial_keys & seen)
    return {"children": args.children, "trials": trials, "duplicates": len(final["unexpected"])}


def scenario_clean_exits(h: Harness, args: argparse.Namespace) -> dict:
    """Stop N children with ActorExitRequest; one notice each, and no zombies left behind?"""
    parent = h.asys.createActor(Parent)
    parent_pid = h.ask(parent, "ids")["pid"]
    trials = []
    for _ in range(args.trials):
        children = h.ask(parent, "spawn", args.children)["children"]
        h.tell(parent, "stop-all")
        got, elapsed = _wait_exits(h, parent, {k for k, _ in children}, args.deadline)
        trials.append(
            {
                "received": len(got),
                "exit_codes": sorted(set(map(str, got.values()))),
                "ms": round(elapsed * 1000, 1),
            }
        )
    time.sleep(args.settle)  # a window for late duplicate notices to show up
    unexpected = h.ask(parent, "exits")["unexpected"]
    zombies = [
        c.pid for c in psutil.Process(parent_pid).children() if c.status() == psutil.STATUS_ZOMBIE
    ]
    return {
        "children": args.children,
        "trials": trials,
        "duplicates": len(unexpected),
        "zombies": len(zombies),
    }


def scenario_logger(h: Harness, args: argparse.Namespace) -> dict:
    """SIGKILL the logger process; does the system still create actors and answer?"""
    probe = h.asys.createActor(Probe)
    ids = h.ask(probe, "ids")
    admin = psutil.Process(ids["ppid"])
    loggers = [c for c in admin.children() if c.pid != ids["pid"]]
    assert len(loggers) == 1, f"expected exactly the logger beside the probe: {loggers}"
    old_logger = loggers[0].pid
    _kill(old_logger)
    # Wait for the Admin to react: a new logger, or its own death.
    end = time.monotonic() + args.deadline
    new_logger = None
    while time.monotonic() < end:
        try:
            if admin.status() == psutil.STATUS_ZOMBIE:
                break
            others = [c.pid for c in admin.children() if c.pid not in (ids["pid"], old_logger)]
        except psutil.NoSuchProcess:
            break
        if others:
            new_logger = others[0]
            break
        time.sleep(POLL_S)
    result: dict[str, Any] = {"new_logger": new_logger is not None}
    try:
        result["admin_alive"] = admin.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        result["admin_alive"] = False
    t0 = time.monotonic()
    try:
        probe2 = h.asys.createActor(Probe)
    except Exception as ex:
        result["create_error"] = type(ex).__name__
        result["create_ms"] = round((time.monotonic() - t0) * 1000, 1)
        result["roundtrip"] = False
        return result
    result["create_error"] = None
    result["roundtrip"] = h.ask(probe2, "ids", timeout=5.0) is not None
    # An actor started before the restart still logs to the old logger's address; it must
    # keep working all the same.
    result["old_actor_answers"] = h.ask(probe, "log", timeout=5.0) is not None
    h.asys.tell(probe2, ActorExitRequest())
    return result


def scenario_attach(h: Harness, args: argparse.Namespace) -> dict:
    """Can another process (the inspector) attach, create an actor and get an answer?"""
    probe = h.asys.createActor(Probe)
    h.ask(probe, "ids")
    cmd = [sys.executable, "-m", "tests.hardening.scenarios", "client", "--port", str(h.port)]
    if args.client_patched:
        cmd.append("--patched")
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    client = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    return {
        "client": client,
        "client_stderr": out.stderr[-2000:] if client is None else "",
        "client_s": round(time.monotonic() - t0, 2),
    }


def client(port: int, patched: bool) -> dict:
    """The attaching side of scenario_attach: no shutdown, the system is not ours."""
    if patched:
        hardening.apply()
    try:
        asys = ActorSystem("multiprocTCPBase", hardening.capabilities(port))
        probe = asys.createActor(Probe)
        reply = asys.ask(probe, ("ids", 1), 5.0)
        asys.tell(probe, ActorExitRequest())
    except Exception as ex:
        return {"attached": False, "error": type(ex).__name__}
    return {"attached": isinstance(reply, dict), "pgid": reply and reply.get("pgid")}


def _listening(proc: psutil.Process) -> list[list[Any]]:
    try:
        conns = proc.net_connections(kind="inet")
    except psutil.Error:
        return []
    return [[proc.pid, c.laddr.ip, c.laddr.port] for c in conns if c.status == psutil.CONN_LISTEN]


def scenario_bind(h: Harness, args: argparse.Namespace) -> dict:
    """Where does every process of the actor system (and this driver) listen?"""
    parent = h.asys.createActor(Parent)
    h.ask(parent, "ids")
    h.ask(parent, "spawn", 3)
    probe = h.asys.createActor(Probe)
    h.ask(probe, "ids")
    system = [s for pid in h.group() for s in _listening(psutil.Process(pid))]
    return {
        "processes": len(h.group()),
        "system": system,
        "driver": _listening(psutil.Process()),
        "base_ipaddr_env": os.environ.get("THESPIAN_BASE_IPADDR"),
    }


SCENARIOS = {
    "segv": scenario_segv,
    "lost_exits": scenario_lost_exits,
    "logger": scenario_logger,
    "clean_exits": scenario_clean_exits,
    "attach": scenario_attach,
    "bind": scenario_bind,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=[*sorted(SCENARIOS), "client"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--patched", action="store_true", help="call hardening.apply() first")
    ap.add_argument("--deadline", type=float, default=5.0, help="seconds to wait for an effect")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--children", type=int, default=5)
    ap.add_argument(
        "--settle", type=float, default=0.3, help="seconds to keep watching for duplicate notices"
    )
    ap.add_argument(
        "--restore",
        action="store_true",
        help="segv: the actor calls restore_fatal_signal_defaults() first",
    )
    ap.add_argument("--base-ipaddr", help="set THESPIAN_BASE_IPADDR before starting")
    ap.add_argument(
        "--stop-after-loss",
        action="store_true",
        help="lost_exits: stop at the first trial that misses a notice",
    )
    ap.add_argument(
        "--client-patched",
        action="store_true",
        help="attach: the attaching process calls hardening.apply() too",
    )
    args = ap.parse_args(argv)
    if args.base_ipaddr:
        os.environ["THESPIAN_BASE_IPADDR"] = args.base_ipaddr
    if args.name == "client":
        print(json.dumps(client(args.port, args.patched)), flush=True)
        return 0
    t0 = time.monotonic()
    with Harness(args.port, args.patched) as h:
        result = SCENARIOS[args.name](h, args)
    result.update(
        scenario=args.name,
        patched=args.patched,
        pgid=h.pgid,
        leftover=h.leftover,
        shutdown_s=h.shutdown_s,
        seconds=round(time.monotonic() - t0, 2),
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
