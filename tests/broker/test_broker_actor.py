"""BrokerActor in a real multiprocTCPBase system: it answers ChildReady with mosquitto
listening, shows the broker in its heartbeat figures, stops it cleanly on StopChild (state
saved), and when the actor process is SIGKILLed the broker goes with it (PR_SET_PDEATHSIG from a
real actor process) so the next incarnation starts on the same port and files. The test process
plays the actor's supervisor."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from actors.broker.actor import BrokerActor
from config.broker import BrokerSettings
from messages.supervision import (
    ChildInit,
    ChildReady,
    ChildStopped,
    Heartbeat,
    HeartbeatAck,
    StopChild,
)
from supervisors import hardening
from tests.mosquitto import (  # noqa: F401
    fixture_mosquitto_installed,
    kill_brokers_of,
    mosquitto_binary,
    requires_mosquitto,
)
from tests.system.harness import free_port, wait_for

pytestmark = [pytest.mark.system, requires_mosquitto]
_seq = itertools.count(1)


@pytest.fixture(scope="module")
def asys():
    hardening.apply()
    from thespian.actors import ActorSystem

    system = ActorSystem("multiprocTCPBase", hardening.capabilities(free_port()))
    yield system
    system.shutdown()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Started:
    """A BrokerActor the test process started and initialised (as its supervisor would)."""

    def __init__(self, asys: Any, data_dir: Path, settings: BrokerSettings) -> None:
        self.asys = asys
        self.address = asys.createActor(BrokerActor)
        asys.tell(self.address, ChildInit("broker", settings, (), str(data_dir)))
        self.pid = self.expect(ChildReady, lambda m: m.name == "broker").pid

    def expect(self, kind: type, match=lambda m: True, timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            msg = self.asys.listen(min(remaining, 1.0))
            if isinstance(msg, kind) and match(msg):
                return msg
        raise AssertionError(f"no {kind.__name__} within {timeout_s} s")

    def figures(self) -> dict[str, Any]:
        seq = next(_seq)
        self.asys.tell(self.address, Heartbeat(seq))
        return dict(self.expect(HeartbeatAck, lambda m: m.seq == seq).figures)


@pytest.fixture
def broker_settings() -> BrokerSettings:
    return BrokerSettings(enabled=True, binary=mosquitto_binary(), port=free_port(),
                          restart_min_s=0.05, restart_max_s=1.0)


@pytest.fixture
def started(asys, tmp_path, broker_settings):
    actors: list[Started] = []

    def start() -> Started:
        actors.append(Started(asys, tmp_path, broker_settings))
        return actors[-1]

    yield start
    for actor in actors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(actor.pid, signal.SIGKILL)
    kill_brokers_of(str(tmp_path / "broker" / "mosquitto.conf"))


def test_broker_actor_runs_mosquitto_and_stops_it_cleanly(started, tmp_path, broker_settings):
    actor = started()
    figures = actor.figures()
    assert figures["broker_state"] == "running", figures
    assert figures["broker_port"] == broker_settings.port and figures["broker_problem"] == ""
    broker_pid = figures["broker_pid"]
    assert psutil.Process(broker_pid).ppid() == actor.pid
    assert (tmp_path / "broker" / "mosquitto.conf").exists()  # DATA_DIR/broker by default

    actor.asys.tell(actor.address, StopChild(7, 5.0))
    stopped = actor.expect(ChildStopped, lambda m: m.request_id == 7)
    assert stopped.clean and stopped.name == "broker"
    assert gone(broker_pid)
    assert "Saving in-memory database" in (tmp_path / "broker" / "mosquitto.log").read_text()


def test_sigkill_of_the_broker_actor_takes_mosquitto_down_and_a_new_one_starts(started):
    first = started()
    broker_pid = first.figures()["broker_pid"]
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: gone(broker_pid), 15, "the broker of the killed actor to exit")

    second = started()
    figures = second.figures()
    assert figures["broker_state"] == "running" and figures["broker_pid"] != broker_pid
