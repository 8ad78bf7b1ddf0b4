"""A private mosquitto for tests that need a real MQTT broker (fixtures and a helper class).

`Broker` is one mosquitto (Debian's package: 2.0.11) run by the gateway's own
`MosquittoLauncher` on a free loopback port, with its config, persistence and log in a
temporary directory; `start` again after `stop` or `kill` reuses the port and the persistence
(an outage, not a new broker). Fixtures: ``mosquitto`` (a started broker for one test),
``start_mosquitto`` (a factory, for tests that need several or need to choose settings) and
``mosquitto_installed``. Without the binary the tests that need it are skipped, unless
``FLEETGW_REQUIRE_MOSQUITTO=1`` (CI) makes that a failure; mark such a test (or module) with
``requires_mosquitto`` (it needs no fixture in scope). Readiness is polled against a deadline;
teardown stops every broker it started (SIGKILL if it does not stop) and any leftover started
with its config file.

Fixtures must be visible to the tests that use them: import them into the test module or a
conftest.py. The functions are named ``fixture_<name>`` (the fixture is ``<name>``), so a test's
argument does not shadow the import: ``from tests.mosquitto import fixture_mosquitto  # noqa:
F401`` gives tests the ``mosquitto`` fixture.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from actors.broker.launcher import BrokerError, MosquittoLauncher, find_binary
from config.broker import BrokerSettings
from tests.clickhouse_server import free_port

REQUIRE_ENV = "FLEETGW_REQUIRE_MOSQUITTO"
START_DEADLINE_S = 15.0
STOP_DEADLINE_S = 10.0
POLL_S = 0.01
HOST = "127.0.0.1"


def mosquitto_binary() -> str:
    """mosquitto's path; skips the test (fails it under FLEETGW_REQUIRE_MOSQUITTO=1) when it is
    not installed."""
    try:
        return find_binary("mosquitto")
    except BrokerError as exc:
        reason = f"{exc}; the tests that need a real MQTT broker cannot run"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires it", pytrace=False)
        pytest.skip(reason)


class Broker:
    """One private mosquitto in ``root`` on ``port`` (default: a free one). ``settings`` are
    `BrokerSettings` fields (e.g. ``max_inflight_messages=5``)."""

    def __init__(self, root: Path, port: int | None = None, **settings: Any) -> None:
        self.root = Path(root)
        self.host = HOST
        self.port = port or free_port()
        self.settings = BrokerSettings(enabled=True, binary=mosquitto_binary(), port=self.port,
                                       restart_min_s=0.05, restart_max_s=1.0, **settings)
        self.launcher = MosquittoLauncher(self.settings, str(self.root))

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The running broker's pid (0 when none runs)."""
        return self.launcher.pid

    def start(self, deadline_s: float = START_DEADLINE_S) -> Broker:
        """Start it and return once it accepts connections (or fail with its log)."""
        self.launcher.start()
        self.wait_ready(deadline_s)
        return self

    def wait_ready(self, deadline_s: float = START_DEADLINE_S) -> None:
        """Drive the launcher (``check``, which also restarts a broker that exited) until the
        broker listens; fail with its figures and log after ``deadline_s``."""
        deadline = time.monotonic() + deadline_s
        while not self.launcher.ready():
            self.launcher.check()
            if time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not listen on {self.url} within {deadline_s:.0f} s "
                            f"({self.launcher.figures()}):\n"
                            + "\n".join(self.launcher.log_tail()), pytrace=False)
            process = self.launcher.process
            if process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):  # returns early on exit
                    process.wait(timeout=POLL_S)
            else:
                time.sleep(POLL_S)  # backing off: nothing to wait on

    def stop(self) -> bool:
        """Graceful stop (SIGTERM: mosquitto saves its persistence); True if it was clean."""
        return self.launcher.stop(STOP_DEADLINE_S)

    def kill(self) -> None:
        """SIGKILL: gone at once, unsaved state lost (a crash or a power cut). The launcher
        records the exit."""
        self.launcher.kill()
        self.launcher.check()

    def restart(self) -> Broker:
        """Graceful stop, then start on the same port and files."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 20) -> list[str]:
        return self.launcher.log_tail(lines)

    def close(self) -> None:
        """Teardown: stop it, and kill any mosquitto still running with its config file (e.g.
        one orphaned by a test that killed the process owning a launcher)."""
        with contextlib.suppress(Exception):
            self.stop()
        kill_brokers_of(self.launcher.conf_path)


def kill_brokers_of(conf_path: str) -> None:
    """SIGKILL every mosquitto started with ``conf_path`` and wait until they are gone."""
    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        command = proc.info.get("cmdline") or []
        if command and "mosquitto" in os.path.basename(command[0]) and conf_path in command:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                victims.append(proc)
    psutil.wait_procs(victims, timeout=STOP_DEADLINE_S)


def _missing() -> str:
    """Why mosquitto cannot run here; empty when it is installed."""
    try:
        find_binary("mosquitto")
        return ""
    except BrokerError as exc:
        return str(exc)


#: Marks a test (or a module, in ``pytestmark``) that needs mosquitto: skipped without it;
#: under FLEETGW_REQUIRE_MOSQUITTO=1 not skipped, so it fails where it first needs the broker
#: (`Broker`, `mosquitto_binary` and the fixtures fail with the reason).
requires_mosquitto = pytest.mark.skipif(
    bool(_missing()) and os.environ.get(REQUIRE_ENV) != "1",
    reason=_missing() or "mosquitto is installed")
require_mosquitto = requires_mosquitto


@pytest.fixture(name="mosquitto_installed")
def fixture_mosquitto_installed() -> str:
    """mosquitto's path; skips (or fails under FLEETGW_REQUIRE_MOSQUITTO=1) without it."""
    return mosquitto_binary()


@pytest.fixture(name="start_mosquitto")
def fixture_start_mosquitto(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """``start_mosquitto(**settings)``: a started private broker of this test's own (in
    ``tmp_path/mosquitto-N``); every one is stopped after the test."""
    brokers: list[Broker] = []

    def start(port: int | None = None, **settings: Any) -> Broker:
        brokers.append(Broker(tmp_path / f"mosquitto-{len(brokers)}", port, **settings))
        return brokers[-1].start()

    yield start
    for broker in brokers:
        broker.close()


@pytest.fixture(name="mosquitto")
def fixture_mosquitto(start_mosquitto: Callable[..., Broker]) -> Broker:
    """A started private broker (default settings, free port) for one test."""
    return start_mosquitto()
