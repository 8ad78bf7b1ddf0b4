"""`fleetgw run` under systemd's notification protocol (tools/sd_notify.py).

The client is tested against real AF_UNIX datagram sockets (a path and an abstract name), the
integration against a real `fleetgw run` whose NOTIFY_SOCKET is a socket this test binds with
SO_PASSCRED, so each message's sender pid is what systemd would see: with NotifyAccess=main
(deploy/fleetgw.service) only messages from the run process itself count.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import uuid

import psutil
import pytest

from actors.broker.launcher import BrokerError, find_binary
from tests.mosquitto import mosquitto_binary
from tests.system.harness import GatewayUnderTest, free_port, wait_for
from tools.sd_notify import Notifier, Watchdog, socket_address, watchdog_usec

CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifyListener:
    """A stand-in for systemd's notification socket: records every datagram as (receive time,
    sender pid, assignments) from a background thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(socket_address(address))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int, list[str]]] = []
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while not self.closed:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    4096, socket.CMSG_SPACE(CREDENTIALS.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = CREDENTIALS.unpack(payload[:CREDENTIALS.size])[0]
            with self.lock:
                self.messages.append((time.monotonic(), pid, data.decode().split("\n")))

    def received(self, assignment: str | None = None, after: float = 0.0) -> list:
        """Messages received after ``after`` (monotonic), those holding ``assignment`` only
        (an exact ``KEY=VALUE`` or a ``KEY=`` prefix)."""
        with self.lock:
            found = [m for m in self.messages if m[0] > after]
        if assignment is None:
            return found
        if assignment.endswith("="):
            return [m for m in found if any(a.startswith(assignment) for a in m[2])]
        return [m for m in found if assignment in m[2]]

    def close(self) -> None:
        self.closed = True
        self.thread.join(5)
        self.sock.close()


def abstract_name() -> str:
    return f"@fleetgw-test-{uuid.uuid4().hex}"


# -- the client --------------------------------------------------------------------------------

def test_socket_address_accepts_paths_and_abstract_names_only():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@name") == "\0name"
    assert socket_address("@") is None
    assert socket_address("relative/path") is None
    assert socket_address("vsock:2:1234") is None


def test_ready_and_status_arrive_in_one_datagram_on_a_path_socket(tmp_path):
    short = os.path.join("/tmp", f"fgw-{uuid.uuid4().hex[:12]}.sock")  # sun_path <= 107 bytes
    listener = NotifyListener(short)
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": short})
        assert notifier.ready("running\nsecond line")
        wait_for(lambda: listener.received("READY=1"), 10, "READY=1")
        (_, pid, fields), = listener.received()
        assert fields == ["READY=1", "STATUS=running second line"]
        assert pid == os.getpid()
    finally:
        listener.close()
        os.unlink(short)


def test_abstract_socket_receives_watchdog_and_stopping():
    name = abstract_name()
    listener = NotifyListener(name)
    try:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "3000000"})
        assert notifier.ping_period_s == 1.5
        assert notifier.watchdog() and notifier.stopping("bye")
        wait_for(lambda: len(listener.received()) == 2, 10, "two datagrams")
        assert [m[2] for m in listener.received()] == [["WATCHDOG=1"],
                                                       ["STOPPING=1", "STATUS=bye"]]
    finally:
        listener.close()


def test_without_notify_socket_every_call_is_a_no_op():
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.ping_period_s is None
    assert not notifier.ready("x") and not notifier.watchdog() and not notifier.stopping()


def test_a_vanished_service_manager_makes_sends_fail_quietly():
    notifier = Notifier(socket_address(abstract_name()), 1_000_000)  # nobody bound it
    assert notifier.notify("READY=1") is False
    assert notifier.watchdog() is False


def test_variables_are_removed_so_children_do_not_inherit_them():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1", "PATH": "/"}
    Notifier.from_environment(env, pid=1)
    assert env == {"PATH": "/"}


def test_watchdog_is_for_the_named_process_and_a_positive_number_only():
    assert watchdog_usec({"WATCHDOG_USEC": "5000000"}, pid=7) == 5_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "7"}, pid=7) == 5_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_usec({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_usec({"WATCHDOG_USEC": "-5"}, pid=7) is None
    assert watchdog_usec({"WATCHDOG_USEC": "5s"}, pid=7) is None
    assert watchdog_usec({}, pid=7) is None


class CountingNotifier(Notifier):
    def __init__(self, usec: int | None) -> None:
        super().__init__("\0unused", usec)
        self.pings = 0

    def watchdog(self) -> bool:
        self.pings += 1
        return True


def test_watchdog_pings_every_half_timeout_only_while_alive_was_proven_lately():
    dog = Watchdog(CountingNotifier(4_000_000))  # WatchdogSec=4s: a ping every 2 s
    assert dog.period_s == 2.0
    assert not dog.tick(0.0)  # never proven alive: no ping
    dog.alive(0.0)
    assert dog.tick(0.1) and not dog.tick(1.0)  # the next one is due 2 s after the first
    dog.alive(1.5)
    assert dog.tick(2.1)
    assert not dog.tick(4.2)  # last proof 2.7 s ago: pings stop, systemd's deadline runs out
    dog.alive(5.0)
    assert dog.tick(5.0)
    assert dog.notifier.pings == 3


def test_no_watchdog_requested_means_no_pings():
    dog = Watchdog(CountingNotifier(None))
    dog.alive(0.0)
    assert not dog.enabled and not dog.tick(10.0)


# -- a real `fleetgw run` ----------------------------------------------------------------------

#: WatchdogSec=1: a ping every half second.
WATCHDOG_USEC = 1_000_000
SENSORS = [{"id": "imu0", "kind": "imu", "rate_hz": 20, "seed": 1}]


def start_gateway(path, listener: NotifyListener, **sections) -> GatewayUnderTest:
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    return GatewayUnderTest(path, SENSORS, env=env, model={"enabled": False},
                            metrics={"enabled": False}, **sections).start()


@pytest.fixture(scope="module")
def notified(tmp_path_factory):
    listener = NotifyListener(abstract_name())
    try:  # the gateway's own mosquitto: a program started below the run process
        find_binary("mosquitto")
        sections = {"broker": {"enabled": True, "port": free_port()}}
    except BrokerError:
        sections = {}
    gw = start_gateway(tmp_path_factory.mktemp("sd_notify"), listener, **sections)
    yield gw, listener
    gw.stop()
    listener.close()


@pytest.mark.system
def test_ready_comes_once_the_tree_runs_then_watchdog_pings_repeat(notified):
    gw, listener = notified
    (ready_at, ready_pid, ready), = wait_for(lambda: listener.received("READY=1"), 60, "READY=1")
    assert any(a.startswith("STATUS=running") for a in ready)
    assert not listener.received("WATCHDOG=1", after=0.0) or \
        min(m[0] for m in listener.received("WATCHDOG=1")) >= ready_at
    wait_for(lambda: len(listener.received("WATCHDOG=1", after=ready_at)) >= 3, 60,
             "three WATCHDOG=1 pings after READY=1")
    wait_for(lambda: any("journal records=" in a for m in listener.received("STATUS=")
                         for a in m[2]), 30, "a STATUS= line with the journal's figures")
    # NotifyAccess=main: everything comes from the run process (the unit's main pid).
    assert {m[1] for m in listener.received()} == {gw.proc.pid}


@pytest.mark.system
def test_programs_the_gateway_starts_do_not_inherit_the_notify_socket(notified):
    """mosquitto (a child of the broker actor) gets an environment without the variables:
    nothing but the run process can speak for the service. (Actor processes are forked, not
    exec'd: /proc/PID/environ shows their parent's start-up environment, so mosquitto's is the
    one that tells.)"""
    mosquitto_binary()
    gw, _ = notified
    broker = gw.node("broker")
    children = wait_for(lambda: psutil.Process(broker["pid"]).children(), 30, "mosquitto")
    assert any("mosquitto" in c.name() for c in children)
    for child in children:
        env = child.environ()
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(env), child.name()


@pytest.mark.system
def test_watchdog_pings_stop_while_the_root_supervisor_does_not_answer(notified):
    """SIGSTOP the root: the run process's check of the tree gets no answer, so pings stop
    and systemd restarts the service WatchdogSec later; SIGCONT: answers and pings resume.
    (Measured: the run loop then blocks inside Thespian's tell, epoll_wait with a 60 s
    timeout, so its own three-missed-answers exit never comes: only the watchdog ends this.
    A loop that runs while the root is silent is covered by the proof-of-life rule, tested
    on `Watchdog` above.)"""
    gw, listener = notified
    (ready_at, _, _), = wait_for(lambda: listener.received("READY=1"), 60, "READY=1")
    wait_for(lambda: listener.received("WATCHDOG=1", after=ready_at), 30, "a first ping")
    root = psutil.Process(gw.node("gateway")["pid"])
    period_s = WATCHDOG_USEC / 2e6
    root.send_signal(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        # Watch six ping periods: a live loop would ping six times. One ping may already be on
        # its way, and pings go on for one period after the root's last answer was handled (at
        # most two, however late the run process handled it): three at most.
        while time.monotonic() - stopped_at < 6 * period_s:
            late = listener.received("WATCHDOG=1", after=stopped_at)
            assert len(late) <= 3, f"{len(late)} pings while the root was stopped"
            time.sleep(0.05)
    finally:
        root.send_signal(signal.SIGCONT)
    resumed_at = time.monotonic()
    wait_for(lambda: listener.received("WATCHDOG=1", after=resumed_at), 60,
             "pings to resume once the root answers again")
    assert gw.proc.poll() is None


@pytest.mark.system
def test_sigterm_sends_stopping_then_an_orderly_stop_exits_0(notified):
    gw, listener = notified
    wait_for(lambda: listener.received("READY=1"), 60, "READY=1")
    sent = time.monotonic()
    assert gw.terminate() == 0
    (_, pid, fields), *_ = listener.received("STOPPING=1", after=sent)
    assert pid == gw.proc.pid
    assert "STATUS=stopping (SIGTERM)" in fields
    assert "fleetgw: stopping (SIGTERM)" in gw.output()
    if os.geteuid() == 0:  # warned, not refused (tests/deploy/test_unprivileged.py: no warning)
        assert gw.output().count("running as root (uid 0)") == 1


@pytest.mark.system
def test_watchdog_abort_of_a_stuck_run_prints_where_it_was_stuck(tmp_path):
    """What systemd does when the pings stop: SIGABRT to the main process (KillMode=mixed;
    then SIGKILL to the rest). The run process leaves its Python stack on stderr, which is
    the service's journal."""
    listener = NotifyListener(abstract_name())
    gw = start_gateway(tmp_path, listener)
    try:
        (ready_at, _, _), = wait_for(lambda: listener.received("READY=1"), 60, "READY=1")
        wait_for(lambda: listener.received("WATCHDOG=1", after=ready_at), 30, "a first ping")
        psutil.Process(gw.node("gateway")["pid"]).send_signal(signal.SIGSTOP)
        gw.proc.send_signal(signal.SIGABRT)
        assert gw.proc.wait(60) == -signal.SIGABRT
        output = gw.output()
        assert "Fatal Python error: Aborted" in output
        assert "tools/run.py" in output
    finally:
        gw.stop()  # SIGKILLs the actor group, the stopped root included
        listener.close()
