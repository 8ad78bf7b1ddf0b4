"""A gateway under test: a real `fleetgw run` process in a temporary data dir.

Used by the system tests: start it with a config, read its live tree through the real
inspector, inject faults, stop it, and make sure nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

from supervisors import system

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT_BASE = 22000 + 100 * (int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % 50)
_next_port = [PORT_BASE]


def free_port() -> int:
    """A loopback port nobody listens on (distinct per test worker)."""
    while True:
        port = _next_port[0]
        _next_port[0] += 1
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return port


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
             interval_s: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # polled conditions may fail transiently
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else ""))


def walk(node: dict):
    yield node
    for child in node.get("children", []):
        yield from walk(child)


def config_text(sensors: list[dict], **sections: dict) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    for sensor in sensors:
        lines.append("[[sensors]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in sensor.items()]
    return "\n".join(lines) + "\n"


class GatewayUnderTest:
    def __init__(self, tmp_path, sensors: list[dict], **sections: dict) -> None:
        self.port = free_port()
        self.data_dir = str(tmp_path / "data")
        self.config_path = str(tmp_path / "gateway.toml")
        gateway = {"admin_port": self.port, "status_interval_s": 1, "fault_injection": True}
        gateway.update(sections.pop("gateway", {}))
        with open(self.config_path, "w") as fh:
            fh.write(config_text(sensors, gateway=gateway, **sections))
        self.proc: subprocess.Popen | None = None
        self.log_path = str(tmp_path / "run.out")

    @property
    def journal_path(self) -> str:
        return os.path.join(self.data_dir, "journal.db")

    def start(self, wait: bool = True) -> GatewayUnderTest:
        self._out = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "run", "--config", self.config_path,
             "--data-dir", self.data_dir],
            cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT,
        )
        if wait:
            wait_for(lambda: self.tree_or_none(), 60, "the gateway to answer the inspector")
            wait_for(self.all_running, 60, "every actor to run")
        return self

    def output(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def gateway_log(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.data_dir, "gateway.log")) as fh:
            return fh.read()
        return ""

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def tree(self) -> dict:
        result = self.cli("topology", "--json", "--admin-port", str(self.port))
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip())
        return json.loads(result.stdout)

    def tree_or_none(self) -> dict | None:
        try:
            return self.tree()
        except RuntimeError:
            return None

    def nodes(self) -> dict[str, dict]:
        return {n["name"]: n for n in walk(self.tree())}

    def all_running(self) -> bool:
        nodes = list(walk(self.tree()))
        return all(n["state"] == "running" and n["pid"] for n in nodes)

    def node(self, name: str) -> dict:
        return self.nodes()[name]

    def records(self) -> int:
        return int(self.node("journal")["figures"]["records"])

    def inject(self, target: str, kind: str) -> None:
        code = f"from tools.faults import inject; inject({self.port}, {target!r}, {kind!r})"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)

    def pgid(self) -> int | None:
        return system.read_state(self.data_dir).get("pgid")

    def gateway_pids(self) -> list[int]:
        pids = [self.proc.pid] if self.proc and self.proc.poll() is None else []
        pgid = self.pgid()
        if pgid:
            pids += [p.pid for p in system.group_members(pgid)]
        return pids

    def terminate(self, timeout_s: float = 90) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        """Teardown: whatever state it is in, leave no process behind."""
        pgid = self.pgid()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for group in {pgid, self.pgid()} - {None}:
            system.kill_group(group)
        for pid in system.listener_pids(self.port):
            with contextlib.suppress(psutil.Error, OSError):
                system.kill_group(os.getpgid(pid))
        if hasattr(self, "_out"):
            self._out.close()
