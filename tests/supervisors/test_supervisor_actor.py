"""The Supervisor actor in a real multiprocTCPBase system: strategies, restart types, peers,
and reaping a dead supervisor's orphans. Children are `tests.supervisors.workers.Worker`; the
test process plays the supervisor's parent (it gets ChildReady and every PeersChanged)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from typing import Any

import psutil
import pytest

from messages.supervision import ChildInit, ChildReady, Heartbeat, HeartbeatAck, PeersChanged
from supervisors import hardening
from supervisors.spec import ChildSpec, Restart, Strategy, SupervisorFlags, SupervisorSpec
from tests.system.harness import free_port, wait_for

pytestmark = pytest.mark.system

WORKER = "tests.supervisors.workers.Worker"
_tags = itertools.count(1)


@pytest.fixture(scope="module")
def asys():
    hardening.apply()
    from thespian.actors import ActorSystem

    system = ActorSystem("multiprocTCPBase", hardening.capabilities(free_port()))
    yield system
    system.shutdown()


def flags(strategy: Strategy) -> SupervisorFlags:
    return SupervisorFlags(strategy=strategy, intensity=20, period_s=30.0,
                           backoff_initial_s=0.05, backoff_max_s=0.2, backoff_reset_s=60.0,
                           heartbeat_interval_s=0.1)


def workers(*names: str, restart: Restart = Restart.PERMANENT) -> tuple[ChildSpec, ...]:
    return tuple(ChildSpec(n, WORKER, restart=restart, heartbeat_timeout_s=5.0) for n in names)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Supervised:
    """A Supervisor started by the test process, which plays its parent."""

    def __init__(self, asys: Any, spec: SupervisorSpec, data_dir: str, name: str) -> None:
        from supervisors.supervisor import Supervisor

        self.asys = asys
        self.peers: dict[str, Any] = {}  # worker name -> latest address (from PeersChanged)
        self.address = asys.createActor(Supervisor)
        asys.tell(self.address, ChildInit(name, spec, (), data_dir))
        ready = self.expect(lambda m: isinstance(m, ChildReady) and m.name == name, 30)
        self.pid = ready.pid

    def expect(self, match, timeout_s: float) -> Any:
        """The next message that ``match``es; PeersChanged on the way update ``peers``."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            msg = self.asys.listen(min(remaining, 1.0))
            if isinstance(msg, PeersChanged):
                self.peers.update(dict(msg.peers))
            if msg is not None and match(msg):
                return msg
        raise AssertionError("expected message did not arrive")

    def children(self) -> dict[str, Any]:
        seq = next(_tags)
        self.asys.tell(self.address, Heartbeat(seq))
        ack = self.expect(lambda m: isinstance(m, HeartbeatAck) and m.seq == seq, 10)
        return {n.name: n for n in ack.children}

    def pids(self) -> dict[str, int | None]:
        return {name: c.pid for name, c in self.children().items()}

    def running(self) -> bool:
        return all(c.state == "running" and c.pid for c in self.children().values())

    def replaced(self, names: set[str], before: dict[str, int | None]) -> bool:
        now = self.children()
        return all(now[n].pid not in (None, before[n]) and now[n].state == "running"
                   for n in names)

    def kill_all(self) -> None:
        for pid in [*self.pids().values(), self.pid]:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def supervise(asys, tmp_path):
    started: list[Supervised] = []

    def make(spec: SupervisorSpec, name: str = "sup") -> Supervised:
        sup = Supervised(asys, spec, str(tmp_path), name)
        started.append(sup)
        wait_for(sup.running, 30, "children to run")
        return sup

    yield make
    for sup in started:
        with contextlib.suppress(Exception):
            sup.kill_all()


def test_one_for_one_restarts_only_the_failed_child(supervise):
    sup = supervise(SupervisorSpec(flags(Strategy.ONE_FOR_ONE), workers("a", "b", "c")))
    before = sup.pids()
    os.kill(before["b"], signal.SIGKILL)
    wait_for(lambda: sup.replaced({"b"}, before), 30, "b to be restarted")
    after = sup.pids()
    assert after["a"] == before["a"] and after["c"] == before["c"]


def test_rest_for_one_restarts_the_failed_child_and_those_started_after_it(supervise):
    sup = supervise(SupervisorSpec(flags(Strategy.REST_FOR_ONE), workers("a", "b", "c")))
    before = sup.pids()
    os.kill(before["b"], signal.SIGKILL)
    wait_for(lambda: sup.replaced({"b", "c"}, before), 30, "b and c to be restarted")
    assert sup.pids()["a"] == before["a"]
    assert gone(before["c"])


def test_one_for_all_restarts_every_child(supervise):
    sup = supervise(SupervisorSpec(flags(Strategy.ONE_FOR_ALL), workers("a", "b", "c")))
    before = sup.pids()
    os.kill(before["c"], signal.SIGKILL)
    wait_for(lambda: sup.replaced({"a", "b", "c"}, before), 30, "every child to restart")
    assert all(gone(pid) for pid in before.values())


def test_transient_child_is_not_restarted_after_normal_exit(supervise, asys):
    sup = supervise(SupervisorSpec(flags(Strategy.ONE_FOR_ONE),
                                   workers("t", restart=Restart.TRANSIENT)))
    asys.tell(sup.peers["t"], ("stop_normally", next(_tags)))
    wait_for(lambda: sup.children()["t"].state == "dead", 30, "t to exit")
    child = sup.children()["t"]
    assert child.restarts == 0
    assert child.last_exit.startswith("normal")


def test_transient_child_is_restarted_after_abnormal_exit(supervise):
    sup = supervise(SupervisorSpec(flags(Strategy.ONE_FOR_ONE),
                                   workers("t", restart=Restart.TRANSIENT)))
    before = sup.pids()
    os.kill(before["t"], signal.SIGKILL)
    wait_for(lambda: sup.replaced({"t"}, before), 30, "t to be restarted")


def test_temporary_child_is_never_restarted(supervise):
    spec = SupervisorSpec(flags(Strategy.ONE_FOR_ONE),
                          workers("tmp", restart=Restart.TEMPORARY) + workers("keep"))
    sup = supervise(spec)
    before = sup.pids()
    os.kill(before["tmp"], signal.SIGKILL)
    wait_for(lambda: sup.children()["tmp"].state == "dead", 30, "tmp to be seen dead")
    assert sup.children()["tmp"].restarts == 0
    assert sup.pids()["keep"] == before["keep"]


def test_restarted_child_address_reaches_its_siblings(supervise, asys):
    sup = supervise(SupervisorSpec(flags(Strategy.ONE_FOR_ONE), workers("a", "b")))
    before = sup.pids()
    os.kill(before["a"], signal.SIGKILL)
    wait_for(lambda: sup.replaced({"a"}, before), 30, "a to be restarted")
    new_a = sup.pids()["a"]

    def b_reaches_new_a() -> bool:
        tag = next(_tags)
        asys.tell(sup.peers["b"], ("peer_pid", tag, "a"))
        reply = sup.expect(lambda m: isinstance(m, dict) and m["tag"] == tag, 5)
        return reply["pid"] == new_a

    wait_for(b_reaches_new_a, 30, "b to reach the restarted a at its new address")


def test_new_supervisor_reaps_its_dead_predecessors_orphans(supervise, tmp_path):
    spec = SupervisorSpec(flags(Strategy.ONE_FOR_ONE), workers("a", "b"))
    first = supervise(spec, name="sensors")
    orphans = first.pids()
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: gone(first.pid), 10, "the first supervisor to die")
    # Thespian leaves a dead parent's children running ...
    assert not any(gone(pid) for pid in orphans.values())
    # ... until the next incarnation of the same supervisor starts.
    second = supervise(spec, name="sensors")
    wait_for(lambda: all(gone(pid) for pid in orphans.values()), 30, "the orphans to be reaped")
    assert set(second.pids().values()).isdisjoint(orphans.values())
