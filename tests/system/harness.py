"""A gateway under test: a real `fleetgw run` process in a temporary data dir.

Used by the system tests: start it with a config, read its live tree through the real
inspector, inject faults, stop it, and make sure nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tools.gateway_process import ROOT, GatewayProcess
from tools.harness.rig import walk
from tools.harness.toml_text import config_text

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


class GatewayUnderTest(GatewayProcess):
    """A gateway run for one test: its config (fault injection on), data dir and a free port,
    with the inspector and fault injection at hand."""

    def __init__(self, tmp_path, sensors: list[dict], env: dict[str, str] | None = None,
                 **sections: dict) -> None:
        port = free_port()
        config_path = str(tmp_path / "gateway.toml")
        gateway = {"admin_port": port, "status_interval_s": 1, "fault_injection": True}
        gateway.update(sections.pop("gateway", {}))
        # Each test gateway's metrics on a port of its own; no health readings unless asked.
        sections.setdefault("metrics", {"port": free_port(), "health_interval_s": 0})
        with open(config_path, "w") as fh:
            fh.write(config_text(sensors, gateway=gateway, **sections))
        super().__init__(config_path, str(tmp_path / "data"), port, str(tmp_path / "run.out"),
                         env)

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> GatewayUnderTest:
        earlier = self.pgid()
        super().start(env)
        if wait:
            # After a SIGKILLed run the old actor system may still answer on the port: wait
            # for this run's own actor system first.
            wait_for(lambda: self.pgid() not in (None, earlier) or self.proc.poll() is not None,
                     60, "the run to start its actor system")
            wait_for(lambda: self.tree_or_none(), 60, "the gateway to answer the inspector")
            wait_for(self.all_running, 60, "every actor to run")
        return self

    def output(self) -> str:
        with open(self.output_path) as fh:
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
        return all(n["state"] == "running" and n["pid"] for n in walk(self.tree()))

    def node(self, name: str) -> dict:
        return self.nodes()[name]

    def records(self) -> int:
        return int(self.node("journal")["figures"]["records"])

    def inject(self, target: str, kind: str) -> None:
        code = f"from tools.faults import inject; inject({self.port}, {target!r}, {kind!r})"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)

    def gateway_pids(self) -> list[int]:
        return self.pids()
