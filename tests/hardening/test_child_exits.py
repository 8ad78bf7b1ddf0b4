"""Defect 2 (lost and doubled ChildActorExited), reproduced deterministically at the function
level: Thespian's own `_childExited` / `childDied` against the hardening replacements, driven
through the exact sequence a parent sees when a second child dies while the first one's notice
is in flight. No actor system, no processes: fake child processes and a recording transport.
"""

from __future__ import annotations

import types

import pytest
from thespian.actors import ActorAddress, ChildActorExited
from thespian.system.multiprocCommon import ChildInfo

from supervisors import hardening


class FakeProc:
    """Stands in for a multiprocessing.Process: ``exitcode`` None means running."""

    def __init__(self) -> None:
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        pass


class RecordingTransport:
    def __init__(self) -> None:
        self.myAddress = ActorAddress("parent")
        self.notices: list[str] = []  # str(childAddress) of every ChildActorExited scheduled

    def scheduleTransmit(self, _id, intent) -> None:
        assert intent.targetAddr == self.myAddress and isinstance(intent.message, ChildActorExited)
        self.notices.append(str(intent.message.childAddress))


def _impl(patched: bool) -> dict:
    upstream = hardening._capture_upstream()
    if patched:
        return {
            "_childExited": hardening._child_exited,
            "childDied": hardening._child_died,
            "_checkChildLiveness": staticmethod(hardening._check_child_liveness),
        }
    return {
        "_childExited": upstream["MultiProcReplicator._childExited"],
        "childDied": upstream["MultiProcReplicator.childDied"],
        "_checkChildLiveness": staticmethod(upstream["MultiProcReplicator._checkChildLiveness"]),
    }


def make_parent(patched: bool, names: list[str]) -> tuple[object, dict[str, ChildInfo]]:
    """A replicator-like parent whose children (by name) are connected and running."""
    parent = type("Parent", (), _impl(patched))()
    parent.transport = RecordingTransport()
    children = {}
    for num, name in enumerate(names):
        info = ChildInfo(ActorAddress(f"local-{name}"), "Probe", FakeProc(), num)
        info.childRealAddr = ActorAddress(name)
        children[name] = info
    parent._child_procs = list(children.values())
    return parent, children


def second_child_dies_while_first_notice_is_in_flight(patched: bool) -> tuple[object, dict]:
    parent, kids = make_parent(patched, ["a", "b", "c"])
    kids["a"].childProc.exitcode = -9
    parent.childDied()  # SIGCHLD for a: notice for a scheduled
    kids["b"].childProc.exitcode = -9  # b dies before a's notice is handled
    parent._childExited(kids["a"].childRealAddr)  # a's notice delivered and handled
    parent.childDied()  # SIGCHLD for b
    return parent, kids


def test_upstream_child_exited_drops_a_second_dead_child_without_any_notice() -> None:
    parent, kids = second_child_dies_while_first_notice_is_in_flight(patched=False)
    assert parent.transport.notices == ["ActorAddr-a"]  # b: never announced
    assert parent._child_procs == [kids["c"]]  # and no longer tracked: lost for good


def test_every_dead_child_is_announced_exactly_once() -> None:
    parent, kids = second_child_dies_while_first_notice_is_in_flight(patched=True)
    assert parent.transport.notices == ["ActorAddr-a", "ActorAddr-b"]
    assert parent._child_procs == [kids["c"]]
    parent.childDied()  # a spurious SIGCHLD announces nothing again
    assert parent.transport.notices == ["ActorAddr-a", "ActorAddr-b"]
    assert hardening.pop_exit_code(kids["b"].childRealAddr) == -9
    assert hardening.pop_exit_code(kids["a"].childRealAddr) == -9


def test_upstream_announces_a_child_that_announced_its_own_exit_a_second_time() -> None:
    parent, kids = make_parent(False, ["a"])
    parent._childExited(kids["a"].childRealAddr)  # its goodbye, while it still runs
    kids["a"].childProc.exitcode = 0
    parent.childDied()
    assert parent.transport.notices == ["ActorAddr-a"]  # the second notice


def test_a_child_that_announced_its_own_exit_is_reaped_without_a_second_notice() -> None:
    parent, kids = make_parent(True, ["a", "b"])
    parent._childExited(kids["a"].childRealAddr)
    assert parent._child_procs == [kids["b"]]
    assert parent._hardening_unreaped == [kids["a"]]  # still running: reaped later
    kids["a"].childProc.exitcode = 0
    parent.childDied()
    assert parent.transport.notices == []
    assert parent._hardening_unreaped == []
    assert hardening.pop_exit_code(kids["a"].childRealAddr) is None


@pytest.fixture
def delivered(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stub the upstream message handlers; collects str(childAddress) of delivered notices."""
    hardening._capture_upstream()
    got: list[str] = []
    monkeypatch.setitem(
        hardening._upstream,
        "ActorManager._handleOneMessage",
        lambda self, env: got.append(str(env.message.childAddress)) or True,
    )
    monkeypatch.setitem(
        hardening._upstream, "MultiProcReplicator.h_EndpointConnected", lambda self, env: True
    )
    return got


def test_a_duplicate_notice_is_dropped_until_that_address_connects_again(delivered) -> None:
    actor = types.SimpleNamespace()
    addr = ActorAddress("a")

    def notice() -> bool:
        env = types.SimpleNamespace(sender=ActorAddress("system"), message=ChildActorExited(addr))
        return hardening._handle_one_message(actor, env)

    assert notice() and notice()  # both keep the actor running
    assert delivered == ["ActorAddr-a"]
    # A new child that got the same port connects: its own exit must be announced.
    hardening._endpoint_connected(actor, types.SimpleNamespace(sender=addr, message=None))
    notice()
    assert delivered == ["ActorAddr-a", "ActorAddr-a"]
