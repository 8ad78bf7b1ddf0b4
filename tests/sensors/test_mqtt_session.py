"""MqttSession against a real mosquitto: connecting (MQTT 5 and 3.1.1), delivery, manual
acknowledgement and redelivery, persistent sessions, broker outages and backoff, keepalive,
passwords, TLS, retained messages, QoS 0, the wake-up socket and a 20,000-message run.

Where this sits: step 1 of the data path for MQTT sensors (actors/sensors/mqtt.py). Topic
mapping, redelivery marks and config are tested without a broker in test_mqtt_logic.py, the
actor end to end in tests/system/test_mqtt_sensor.py. Here the test thread plays the sensor
actor: `pump` calls `step` and `read` as its timer does, and the test calls `ack`.

Synchronisation without sleeps: `connect` returns once the session's subscription is in place
(its SUBACK arrived; `Session` counts them), so whatever a publisher started afterwards sends is
routed to it. Absence ("not redelivered") is shown by a marker published afterwards: the broker
sends a session's messages in order, so anything it would resend arrives before the marker.
`ack` only queues a PUBACK for paho's thread, and a new connection under the same client id
takes the session over before the broker read the old connection's last packets: where that
matters, tests wait for the broker's log (`ack_and_wait`: its PUBACK lines; `leave`: its
DISCONNECT line) before the connection goes.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
import pytest

from actors.sensors.mqtt import CONNECTED, DISCONNECTED, Delivery, MqttSession, Receipt
from config.mqtt import MqttConnection, MqttSettings, MqttSourceSettings, MqttTopicSettings
from tests.clickhouse_server import free_port
from tests.mosquitto import Broker, requires_mosquitto
from tools.provisioning import create_ca, create_device, create_server

pytestmark = requires_mosquitto

TOPIC = "fleet/veh-1/engine"
MARKER = "fleet/marker"
DEADLINE_S = 15.0
POLL_S = 0.005
PROTOCOLS = ("5", "3.1.1")
#: Fast reconnects for tests (the defaults are 0.2 s .. 30 s).
FAST = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.4, "connect_timeout_s": 5.0}
PASSWORD_ENV = "FLEETGW_TEST_MQTT_PASSWORD"


# ---- helpers -------------------------------------------------------------------------------
def connection(broker: Broker, client_id: str, protocol: str = "5", *, qos: int = 1,
               filters: tuple[str, ...] = ("fleet/#",), **broker_settings: Any
               ) -> MqttConnection:
    values: dict[str, Any] = {"host": broker.host, "port": broker.port, "protocol": protocol,
                              **FAST}
    values.update(broker_settings)
    topics = tuple(MqttTopicSettings(filter=f, qos=qos) for f in filters)
    return MqttConnection(MqttSettings(**values), MqttSourceSettings(topics=topics), client_id)


class Session(MqttSession):
    """MqttSession that also counts finished CONNACK handling and, on the current connection,
    SUBSCRIBEs sent and SUBACKs received (paho's thread runs the callbacks), so a test knows when the
    subscription is in place."""

    def __init__(self, conn: MqttConnection, **kw: Any) -> None:
        super().__init__(conn, **kw)
        self.connacks_handled = 0
        self.subscribes = 0
        self.subacks = 0

    def _new_client(self) -> Any:
        client = super()._new_client()
        on_connect, subscribe = client.on_connect, client.subscribe

        def counted_subscribe(*args: Any, **kwargs: Any) -> Any:
            self.subscribes += 1
            return subscribe(*args, **kwargs)

        def counted_on_connect(*args: Any) -> None:
            self.subscribes = self.subacks = 0  # a SUBACK of a lost connection never comes
            on_connect(*args)
            self.connacks_handled += 1

        ours = client.on_subscribe

        def on_subscribe(*args: Any) -> None:
            self.subacks += 1
            ours(*args)

        client.subscribe = counted_subscribe
        client.on_connect = counted_on_connect
        client.on_subscribe = on_subscribe
        return client

    @property
    def subscribed(self) -> bool:
        """Connected, CONNACK handled, and every SUBSCRIBE answered."""
        return (self.state == CONNECTED and self.connacks_handled >= self.counts["connects"]
                and self.subacks >= self.subscribes)


@pytest.fixture(name="sessions")
def fixture_sessions() -> Iterator[Callable[..., Session]]:
    """``sessions(conn, **kw)``: a new Session, closed after the test."""
    made: list[Session] = []

    def make(conn: MqttConnection, **kw: Any) -> Session:
        made.append(Session(conn, **kw))
        return made[-1]

    yield make
    for session in made:
        session.close()


class ManualClock:
    """A monotonic clock the test moves (for the session's own setup retries)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pump(session: MqttSession, until: Callable[[list[Delivery]], Any], what: str,
         deadline_s: float = DEADLINE_S, *, max_messages: int = 100,
         on_turn: Callable[[], None] | None = None) -> list[Delivery]:
    """Drive ``session`` as the actor does (``step``, then ``read``) until ``until(deliveries
    so far)`` holds; fail after ``deadline_s`` naming ``what``."""
    got: list[Delivery] = []
    deadline = time.monotonic() + deadline_s
    while True:
        session.step()
        got += session.read(max_messages)
        if on_turn is not None:
            on_turn()
        if until(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}; "
                                 f"{len(got)} deliveries, {session.figures()}")
        time.sleep(POLL_S)


def connect(session: Session) -> list[Delivery]:
    """Pump until connected and subscribed; returns what arrived meanwhile."""
    return pump(session, lambda _: session.subscribed, "the CONNACK and SUBACK")


def receive(session: MqttSession, count: int, what: str = "", **kw: Any) -> list[Delivery]:
    """Pump until ``count`` deliveries arrived (more may come along in the last read)."""
    return pump(session, lambda got: len(got) >= count, what or f"{count} deliveries", **kw)


def until_marker(session: MqttSession, broker: Broker) -> list[Delivery]:
    """Publish a marker and return every delivery before it: what the broker had queued or
    in flight for the session (the marker itself is acknowledged)."""
    mosquitto_pub(broker, MARKER, "end")
    got = pump(session, lambda got: any(d.topic == MARKER.encode() for d in got),
               "the marker")
    marker = next(d for d in got if d.topic == MARKER.encode())
    session.ack([receipt(marker)])
    return [d for d in got if d.topic != MARKER.encode()]


def receipt(d: Delivery) -> Receipt:
    return Receipt(d.session, d.mid, d.qos)


def mosquitto_pub(broker: Broker, topic: str, *lines: str, retain: bool = False,
                  auth: tuple[str, str] | None = None) -> None:
    """Publish each line as one QoS 1 message with the mosquitto_pub client (returns once
    the broker acknowledged them all)."""
    command = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
               "-t", topic, "-l"]
    if retain:
        command.append("-r")
    if auth is not None:
        command += ["-u", auth[0], "-P", auth[1]]
    done = subprocess.run(command, input="".join(f"{line}\n" for line in lines), text=True,
                          capture_output=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr


def paho_pub(broker: Broker, topic: str, *payloads: str) -> None:
    """Publish with a paho client (MQTT 3.1.1, QoS 1); returns once every PUBACK arrived."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="test-publisher")
    client.connect(broker.host, broker.port)
    try:
        infos = [client.publish(topic, p, qos=1) for p in payloads]
        deadline = time.monotonic() + DEADLINE_S
        while not all(i.is_published() for i in infos):
            assert time.monotonic() < deadline, "paho publisher: no PUBACKs"
            client.loop(0.01)
        client.disconnect()
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()


def payloads(deliveries: list[Delivery]) -> list[str]:
    return [d.payload.decode() for d in deliveries]


@pytest.fixture(name="broker")
def fixture_broker(start_mosquitto) -> Broker:
    """A private broker that logs every packet (`ack_and_wait` reads its PUBACKs)."""
    return start_mosquitto(extra_config=("log_type debug",))


def cut(session: MqttSession) -> None:
    """Cut the session's TCP connection under it without DISCONNECT (a network failure) and
    pump until the session noticed; it then reconnects by itself. (PUBACKs paho's thread has
    not written yet are lost with it: see `ack_and_wait`.)"""
    lost = session.counts["disconnects"] + 1
    session._client.socket().shutdown(socket.SHUT_RDWR)
    pump(session, lambda _: session.counts["disconnects"] >= lost, "the session to notice")


def crash(session: MqttSession) -> None:
    """The gateway dies: its connection ends without DISCONNECT (the socket is shut before
    close() could send one) and the session object is never used again."""
    session._client.socket().shutdown(socket.SHUT_RDWR)
    session.close()


def log_count(broker: Broker, text: str) -> int:
    return Path(broker.launcher.log_path).read_text(errors="replace").count(text)


def wait_for_log(broker: Broker, text: str, count: int = 1,
                 deadline_s: float = DEADLINE_S) -> None:
    """Wait until the broker logged ``text`` ``count`` times."""
    deadline = time.monotonic() + deadline_s
    while log_count(broker, text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the broker's log:\n" + \
            "\n".join(broker.log_tail())
        time.sleep(0.02)


def leave(session: MqttSession, broker: Broker) -> None:
    """close() and wait until the broker handled the DISCONNECT (and so every PUBACK before
    it): a new connection under the client id could otherwise take the session over first,
    and the broker would drop the old connection's unread PUBACKs (and resend those)."""
    text = f"Client {session.conn.client_id} disconnected."
    seen = log_count(broker, text)
    session.close()
    wait_for_log(broker, text, seen + 1)


def ack_and_wait(session: MqttSession, broker: Broker, deliveries: list[Delivery]) -> None:
    """ack() and wait until the broker logged each PUBACK (it needs ``log_type debug``), so a
    connection cut afterwards cannot lose them."""
    texts = [f"Received PUBACK from {session.conn.client_id} (Mid: {d.mid}," for d in deliveries]
    seen = [log_count(broker, t) for t in texts]
    session.ack([receipt(d) for d in deliveries])
    for text, count in zip(texts, seen, strict=True):
        wait_for_log(broker, text, count + 1)


def failure_times(session: MqttSession, count: int, deadline_s: float = DEADLINE_S, *,
                  on_turn: Callable[[], None] | None = None) -> list[float]:
    """Pump until the session counted ``count`` connect failures; when each was seen."""
    seen: list[float] = []

    def note() -> None:
        if on_turn is not None:
            on_turn()
        while session.counts["connect_failures"] > len(seen):
            seen.append(time.monotonic())

    pump(session, lambda _: len(seen) >= count, f"{count} connect failures", deadline_s,
         on_turn=note)
    return seen


def wait_pending(session: MqttSession, count: int) -> None:
    """Wait (without reading) until ``count`` deliveries wait in the session."""
    deadline = time.monotonic() + DEADLINE_S
    while session.pending() < count:
        assert time.monotonic() < deadline, session.figures()
        time.sleep(POLL_S)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


@pytest.fixture
def stopped(request) -> Callable[[Broker], None]:
    """``stopped(broker)``: SIGSTOP it (alive and listening, the kernel still accepts
    connections, but silent); SIGCONT at teardown at the latest."""
    paused: list[Broker] = []

    def stop(broker: Broker) -> None:
        os.kill(broker.pid, signal.SIGSTOP)
        paused.append(broker)

    def resume() -> None:
        for broker in paused:
            if broker.pid:
                os.kill(broker.pid, signal.SIGCONT)

    request.addfinalizer(resume)
    return stop


# ---- connecting and receiving --------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_session_receives_qos1_messages_from_both_publishers_and_resumes_its_session(
        broker, sessions, protocol: str) -> None:
    conn = connection(broker, f"recv-{protocol}", protocol)
    session = sessions(conn)
    assert session.state == DISCONNECTED and session.figures()["mqtt_session"] == 0
    assert connect(session) == []
    assert session.session_present is False
    assert (session.session, session.problem) == (1, "")
    mosquitto_pub(broker, TOPIC, "a1", "a2")
    paho_pub(broker, TOPIC, "p1", "p2")
    got = receive(session, 4)
    assert payloads(got) == ["a1", "a2", "p1", "p2"]
    assert {(d.topic, d.qos, d.dup, d.retain, d.session) for d in got} == {
        (TOPIC.encode(), 1, False, False, 1)}
    assert len({d.mid for d in got}) == 4 and all(d.mid > 0 for d in got)
    assert all(d.received_ns > 0 for d in got)
    session.ack([receipt(d) for d in got])
    assert session.figures()["mqtt_acks"] == 4
    leave(session, broker)
    assert session.state == DISCONNECTED

    again = sessions(conn)
    assert connect(again) == []
    assert again.session_present is True
    assert until_marker(again, broker) == []  # all four were acknowledged
    figures = again.figures()
    assert (figures["mqtt_state"], figures["mqtt_connects"], figures["mqtt_session"]) == (
        "connected", 1, 1)
    assert "mqtt_problem" not in figures


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unacknowledged_deliveries_come_again_after_an_abrupt_drop_and_acknowledged_do_not(
        broker, sessions, protocol: str) -> None:
    conn = connection(broker, f"redeliver-{protocol}", protocol)
    first = sessions(conn)
    connect(first)
    mosquitto_pub(broker, TOPIC, "m1", "m2", "m3", "m4")
    got = receive(first, 4)
    ack_and_wait(first, broker, [got[0], got[2]])
    crash(first)
    wait_for_log(broker, f"Client {conn.client_id} closed its connection.")  # no DISCONNECT

    second = sessions(conn)  # the gateway's next incarnation
    again = connect(second)  # in-flight messages are resent right after the CONNACK
    assert second.session_present is True
    again += until_marker(second, broker)
    assert [(d.payload, d.mid, d.dup) for d in again] == [
        (got[1].payload, got[1].mid, True), (got[3].payload, got[3].mid, True)]
    second.ack([receipt(d) for d in again])
    leave(second, broker)
    third = sessions(conn)
    assert connect(third) + until_marker(third, broker) == []


def test_a_receipt_of_an_earlier_connection_is_not_sent(broker, sessions) -> None:
    session = sessions(connection(broker, "stale"))
    connect(session)
    mosquitto_pub(broker, TOPIC, "once")
    [d1] = receive(session, 1)
    assert d1.session == 1
    cut(session)  # the session reconnects by itself
    [d2] = receive(session, 1, "the redelivery on connection 2")
    assert (session.session, d2.session, d2.mid, d2.dup, d2.payload) == (
        2, 2, d1.mid, True, b"once")
    # Connection 2 holds the same packet id in flight: a PUBACK sent now would settle it.
    session.ack([receipt(d1)])
    figures = session.figures()
    assert (figures["mqtt_stale_receipts"], figures["mqtt_acks"]) == (1, 0)
    cut(session)
    [d3] = receive(session, 1, "the redelivery on connection 3")
    assert (d3.session, d3.mid, d3.payload) == (3, d1.mid, b"once")  # the broker still has it
    ack_and_wait(session, broker, [d3])
    assert session.figures()["mqtt_acks"] == 1
    cut(session)
    assert connect(session) + until_marker(session, broker) == []
    assert session.session == 4
    # The one PUBACK for the message's id the broker ever got is d3's.
    assert log_count(broker, f"Received PUBACK from stale (Mid: {d1.mid},") == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_messages_published_while_disconnected_are_queued_by_the_broker(
        broker, sessions, protocol: str) -> None:
    conn = connection(broker, f"queue-{protocol}", protocol)
    session = sessions(conn)
    connect(session)
    leave(session, broker)
    mosquitto_pub(broker, TOPIC, "q1", "q2", "q3")
    later = sessions(conn)
    got = connect(later)
    got += receive(later, 3 - len(got)) if len(got) < 3 else []
    assert later.session_present is True
    assert [(d.payload, d.dup) for d in got] == [(b"q1", False), (b"q2", False),
                                                 (b"q3", False)]


def test_mqtt5_session_expiry_drops_the_queue_of_a_session_offline_too_long(
        start_mosquitto, sessions) -> None:
    # mosquitto 2.0.11 enforces the expiry given in CONNECT: a second or two after the
    # session went offline it logs "Expiring client" and forgets subscriptions and queue.
    broker = start_mosquitto()
    conn = connection(broker, "expiring", session_expiry_s=1)
    session = sessions(conn)
    connect(session)
    session.close()
    offline = time.monotonic()
    mosquitto_pub(broker, TOPIC, "lost")
    wait_for_log(broker, f"Expiring client {conn.client_id} due to timeout.")
    assert time.monotonic() - offline >= 0.5
    later = sessions(conn)
    assert connect(later) == []
    assert later.session_present is False
    assert until_marker(later, broker) == []  # "lost" went with the session


# ---- outages, backoff, keepalive -----------------------------------------------------------
def test_broker_restart_is_noticed_backed_off_and_recovered_with_the_unacknowledged(
        start_mosquitto, sessions) -> None:
    broker = start_mosquitto()
    where = f"{broker.host}:{broker.port}"
    session = sessions(connection(broker, "restart"))
    connect(session)
    mosquitto_pub(broker, TOPIC, "in-flight")
    wait_pending(session, 1)  # delivered to the session, neither read nor acknowledged
    assert broker.stop()
    problems: list[str] = []
    failure_times(session, 2, on_turn=lambda: problems.append(session.problem))
    assert session.state == DISCONNECTED
    figures = session.figures()
    assert (figures["mqtt_disconnects"], figures["mqtt_connects"]) == (1, 1)
    assert figures["mqtt_problem"].startswith(f"cannot connect to {where}: ")
    lost = next(p for p in problems if p)
    assert lost.startswith(f"connection to {where} lost ("), lost
    broker.start()
    mosquitto_pub(broker, TOPIC, "published while the session was away")
    got = receive(session, 2, "both messages after the restart")
    assert session.session_present is True and session.session == 2
    assert [(d.payload, d.dup) for d in got] == [
        (b"in-flight", True), (b"published while the session was away", False)]
    assert session.problem == "" and "mqtt_problem" not in session.figures()
    session.ack([receipt(d) for d in got])
    assert until_marker(session, broker) == []


def test_broker_down_at_start_retries_with_doubling_backoff_until_it_comes(
        start_mosquitto, sessions) -> None:
    broker = start_mosquitto()
    broker.stop()
    session = sessions(connection(broker, "late", reconnect_min_s=0.1, reconnect_max_s=0.8))
    times = failure_times(session, 5)
    assert session.state == DISCONNECTED
    assert session.problem.startswith(f"cannot connect to {broker.host}:{broker.port}: ")
    # paho's backoff: 0.1 then 0.2 before the second attempt (its first-connection loop
    # waits once more), then 0.4, then the cap 0.8. Slack for a loaded machine: the
    # attempts are seen by polling, and paho's thread may run late, never early.
    g = gaps(times)
    assert 0.25 <= g[0] <= 0.3 + 0.25, g
    assert 0.35 <= g[1] <= 0.4 + 0.25, g
    assert all(0.75 <= x <= 0.8 + 0.25 for x in g[2:]), g
    broker.start()
    connect(session)
    assert session.counts["connects"] == 1
    # One more attempt may have failed while the broker was starting.
    assert len(times) <= session.counts["connect_failures"] <= len(times) + 1
    assert session.problem == ""
    mosquitto_pub(broker, TOPIC, "hello")
    assert payloads(receive(session, 1)) == ["hello"]


def test_keepalive_holds_an_idle_session_and_a_silent_broker_is_given_up(
        start_mosquitto, sessions, stopped) -> None:
    broker = start_mosquitto()
    session = sessions(connection(broker, "idle", keepalive_s=1))
    connect(session)
    # mosquitto drops a client silent for 1.5 keepalives: paho's PINGREQs keep the session.
    quiet_until = time.monotonic() + 1.8
    pump(session, lambda _: time.monotonic() > quiet_until, "2 s of idle session")
    assert (session.state, session.counts["disconnects"]) == (CONNECTED, 0)
    stopped(broker)
    pump(session, lambda _: session.state == DISCONNECTED, "the unanswered PINGREQ")
    assert session.problem == (f"connection to {broker.host}:{broker.port} lost "
                               "(Keep alive timeout)")
    os.kill(broker.pid, signal.SIGCONT)
    connect(session)
    assert session.session == 2 and session.session_present is True


# ---- authentication ------------------------------------------------------------------------
@pytest.fixture(name="password_broker")
def fixture_password_broker(start_mosquitto, tmp_path: Path) -> Broker:
    """A broker refusing anonymous clients, with user ``gw`` (password ``s3cret``)."""
    password_file = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(password_file), "gw", "s3cret"],
                   check=True, capture_output=True, timeout=DEADLINE_S)
    return start_mosquitto(allow_anonymous=False, password_file=str(password_file))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_password_from_the_environment_logs_in(password_broker, sessions, monkeypatch,
                                               protocol: str) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    session = sessions(connection(password_broker, f"pw-{protocol}", protocol,
                                  username="gw", password_env=PASSWORD_ENV))
    connect(session)
    mosquitto_pub(password_broker, TOPIC, "in", auth=("gw", "s3cret"))
    assert payloads(receive(session, 1)) == ["in"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_password_is_refused_and_retried_with_backoff(password_broker, sessions,
                                                           monkeypatch, protocol: str) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    session = sessions(connection(password_broker, f"bad-pw-{protocol}", protocol,
                                  username="gw", password_env=PASSWORD_ENV,
                                  reconnect_min_s=0.1, reconnect_max_s=0.8))
    times = failure_times(session, 3)
    assert session.counts["connects"] == 0 and session.state == DISCONNECTED
    # mosquitto 2.0.11 answers a wrong password with "Not authorized" in both versions (MQTT 5
    # reason 0x87 rather than 0x86 "Bad user name or password").
    assert session.problem == (f"broker {password_broker.host}:{password_broker.port} "
                               "refused the connection: Not authorized")
    g = gaps(times)
    assert 0.08 <= g[0] <= 0.1 + 0.25 and 0.18 <= g[1] <= 0.2 + 0.25, g


def test_missing_password_variable_is_named_and_recovers_once_set(password_broker, sessions,
                                                                  monkeypatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    clock = ManualClock()
    session = sessions(connection(password_broker, "no-pw", username="gw",
                                  password_env=PASSWORD_ENV, reconnect_min_s=0.1,
                                  reconnect_max_s=0.8), clock=clock)
    session.step()
    assert session.state == DISCONNECTED and session.counts["connect_failures"] == 1
    assert session.problem == (f"cannot set up the MQTT client: [mqtt] password_env names "
                               f"{PASSWORD_ENV}, which is not set in the gateway's environment")
    session.step()  # not due yet
    assert session.counts["connect_failures"] == 1
    retried_at = []
    while len(retried_at) < 4:  # the setup retries back off too: 0.2, 0.4, 0.8, 0.8
        clock.now += 0.01
        session.step()
        if session.counts["connect_failures"] > len(retried_at) + 1:
            retried_at.append(clock.now)
    for gap, want in zip(gaps([1000.0, *retried_at]), [0.2, 0.4, 0.8, 0.8], strict=True):
        assert want <= gap <= want + 0.011, retried_at
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    clock.now += 0.8
    connect(session)
    assert session.problem == ""


# ---- TLS -----------------------------------------------------------------------------------
@pytest.fixture(name="tls_broker")
def fixture_tls_broker(start_mosquitto, tmp_path: Path) -> tuple[Broker, int, Path]:
    """A broker with a second listener (the returned port) on TLS that requires a client
    certificate from the fleet CA; and a directory with ca.crt, gw-1.crt/.key and another
    CA's certificate (other-ca.crt)."""
    pki = tmp_path / "pki"
    create_ca(pki / "ca")
    server = create_server(pki / "ca", pki / "server", hosts=("127.0.0.1",))
    device = create_device(pki / "ca", pki / "client", "gw-1")
    other = create_ca(pki / "other")
    tls_port = free_port()
    broker = start_mosquitto(extra_config=(
        f"listener {tls_port} 127.0.0.1",
        f"cafile {pki / 'ca' / 'ca.crt'}",
        f"certfile {server.cert}",
        f"keyfile {server.key}",
        "require_certificate true",
    ))
    files = pki / "use"
    files.mkdir()
    for name, source in [("ca.crt", pki / "ca" / "ca.crt"), ("gw-1.crt", device.cert),
                         ("gw-1.key", device.key), ("other-ca.crt", other.cert)]:
        (files / name).write_bytes(Path(source).read_bytes())
    return broker, tls_port, files


def tls_connection(tls_broker: tuple[Broker, int, Path], client_id: str, *, ca: str = "ca.crt",
                   client_cert: bool = True, **kw: Any) -> MqttConnection:
    broker, tls_port, pki = tls_broker
    files = {"tls_ca": str(pki / ca)}
    if client_cert:
        files.update(tls_cert=str(pki / "gw-1.crt"), tls_key=str(pki / "gw-1.key"))
    return connection(broker, client_id, port=tls_port, **files, **kw)


def test_tls_with_a_client_certificate_connects_and_receives(tls_broker, sessions) -> None:
    session = sessions(tls_connection(tls_broker, "tls"))
    connect(session)
    assert isinstance(session._client.socket(), ssl.SSLSocket)
    mosquitto_pub(tls_broker[0], TOPIC, "secret")  # published on the plain listener
    [d] = receive(session, 1)
    assert (d.payload, d.dup) == (b"secret", False)
    session.ack([receipt(d)])
    assert session.counts["acks"] == 1


def test_tls_with_another_ca_is_refused_and_retried(tls_broker, sessions) -> None:
    session = sessions(tls_connection(tls_broker, "tls-other-ca", ca="other-ca.crt"))
    failure_times(session, 2)
    assert session.counts["connects"] == 0 and session.state == DISCONNECTED
    assert session.problem.startswith(f"cannot connect to 127.0.0.1:{tls_broker[1]}: ")


def test_a_missing_tls_file_is_a_setup_problem_retried_until_it_appears(
        tls_broker, sessions, tmp_path: Path) -> None:
    ca = tmp_path / "provisioned-later" / "ca.crt"
    clock = ManualClock()
    session = sessions(tls_connection(tls_broker, "tls-later", ca=str(ca)), clock=clock)
    session.step()
    assert session.state == DISCONNECTED and session.counts["connect_failures"] == 1
    assert session.problem.startswith("cannot set up the MQTT client: "), session.problem
    ca.parent.mkdir()
    ca.write_bytes((tls_broker[2] / "ca.crt").read_bytes())
    clock.now += 0.1  # the first setup retry comes after 2 x reconnect_min_s
    session.step()
    assert session.counts["connect_failures"] == 1
    assert connect(session) == [] and session.problem == ""


def test_a_missing_tls_file_is_named_in_the_problem(tls_broker, sessions,
                                                    tmp_path: Path) -> None:
    ca = tmp_path / "missing" / "ca.crt"
    session = sessions(tls_connection(tls_broker, "tls-missing", ca=str(ca)))
    session.step()
    assert session.counts["connect_failures"] == 1
    assert str(ca) in session.problem or "tls_ca" in session.problem, session.problem


def test_tls_with_another_ca_says_the_certificate_failed(tls_broker, sessions) -> None:
    session = sessions(tls_connection(tls_broker, "tls-other-ca-why", ca="other-ca.crt"))
    failure_times(session, 1)
    assert "certificate verify failed" in session.problem.lower(), session.problem


def test_tls_without_the_required_client_certificate_is_a_counted_problem(
        tls_broker, sessions) -> None:
    session = sessions(tls_connection(tls_broker, "tls-no-cert", client_cert=False))
    session.step()
    # mosquitto 2.0.11 logs "peer did not return a certificate" and closes without a TLS
    # alert: the client only sees its socket end after the handshake.
    wait_for_log(tls_broker[0], "peer did not return a certificate")
    deadline = time.monotonic() + 1.5
    pump(session, lambda _: session.counts["connect_failures"] >= 1 or
         time.monotonic() > deadline, "the refusal")
    assert session.counts["connects"] == 0
    assert session.counts["connect_failures"] >= 1, session.figures()
    assert f"127.0.0.1:{tls_broker[1]}" in session.problem, session.figures()


def test_no_connack_within_connect_timeout_is_a_counted_problem(start_mosquitto, sessions,
                                                                stopped) -> None:
    broker = start_mosquitto()
    stopped(broker)  # the kernel completes the TCP handshake; no CONNACK comes
    session = sessions(connection(broker, "silent", keepalive_s=10, connect_timeout_s=0.5))
    deadline = time.monotonic() + 2.0
    pump(session, lambda _: session.counts["connect_failures"] >= 1 or
         time.monotonic() > deadline, "a CONNACK timeout")
    assert session.counts["connect_failures"] >= 1, session.figures()
    assert "CONNACK" in session.problem, session.figures()


# ---- retained messages, QoS 0 --------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_retained_message_is_delivered_once_not_again_on_reconnect(
        broker, sessions, protocol: str) -> None:
    mosquitto_pub(broker, TOPIC, "kept", retain=True)
    conn = connection(broker, f"retain-{protocol}", protocol)
    session = sessions(conn)
    got = connect(session)
    got += receive(session, 1) if not got else []
    assert [(d.payload, d.retain, d.dup) for d in got] == [(b"kept", True, False)]
    ack_and_wait(session, broker, got)
    cut(session)  # reconnects by itself: MQTT 5 resubscribes, 3.1.1 keeps its subscription
    assert connect(session) + until_marker(session, broker) == []
    assert session.session_present is True and session.session == 2
    leave(session, broker)
    later = sessions(conn, held_filters=session.held_filters)  # as from the journal's marks
    assert connect(later) + until_marker(later, broker) == []


def test_qos0_subscription_delivers_without_acknowledgements(start_mosquitto,
                                                              sessions) -> None:
    broker = start_mosquitto()
    session = sessions(connection(broker, "qos0", qos=0))
    connect(session)
    mosquitto_pub(broker, TOPIC, "z1", "z2", "z3")  # published at QoS 1, delivered at 0
    got = receive(session, 3)
    assert [(d.payload, d.qos, d.dup) for d in got] == [(b"z1", 0, False), (b"z2", 0, False),
                                                        (b"z3", 0, False)]
    cut(session)
    got = connect(session)
    mosquitto_pub(broker, MARKER, "end")  # nothing acknowledged, nothing comes again
    got += pump(session, lambda got: any(d.topic == MARKER.encode() for d in got),
                "the marker")
    assert payloads(got) == ["end"]
    assert session.counts["acks"] == 0


@pytest.mark.parametrize("protocol", [
    "5",
    "3.1.1",
])
def test_a_filter_added_to_the_config_is_subscribed_on_the_next_connect(
        broker, sessions, protocol: str) -> None:
    before = sessions(connection(broker, f"grow-{protocol}", protocol,
                                 filters=("fleet/a/#", MARKER)))
    connect(before)
    leave(before, broker)
    # What the sensor reads back from the journal's marks: the filters the broker holds.
    assert before.take_subscription_change() == tuple(sorted(("fleet/a/#", MARKER)))
    after = sessions(connection(broker, f"grow-{protocol}", protocol,
                                filters=("fleet/a/#", "fleet/b/#", MARKER)),
                     held_filters=before.held_filters)
    connect(after)
    assert after.session_present is True
    mosquitto_pub(broker, "fleet/b/x", "new filter")
    assert payloads(until_marker(after, broker)) == ["new filter"]


# ---- volume --------------------------------------------------------------------------------
def test_twenty_thousand_messages_are_read_and_acknowledged_once_each(
        start_mosquitto, sessions) -> None:
    total = 20_000
    broker = start_mosquitto()
    conn = connection(broker, "bulk")
    session = sessions(conn)
    connect(session)
    publisher = subprocess.Popen(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", TOPIC,
         "-l"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert publisher.stdin is not None
        publisher.stdin.write(b"".join(b"%d-%s\n" % (i, b"x" * (i % 300))
                                       for i in range(total)))
        publisher.stdin.close()
        seen: list[Delivery] = []
        deadline = time.monotonic() + 60.0
        while len(seen) < total:  # the actor's turn: read a batch, commit it, acknowledge
            session.step()
            batch = session.read(1000)
            session.ack([receipt(d) for d in batch])
            seen += batch
            if not batch:
                assert time.monotonic() < deadline, f"{len(seen)} of {total} arrived"
                time.sleep(POLL_S)
        assert publisher.wait(timeout=DEADLINE_S) == 0
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait()
    numbers = [int(d.payload.split(b"-")[0]) for d in seen]
    assert sorted(numbers) == list(range(total))  # none lost, none twice
    assert all(d.payload == b"%d-%s" % (n, b"x" * (n % 300))
               for d, n in zip(seen, numbers, strict=True))
    assert not any(d.dup for d in seen)
    assert session.counts["acks"] == total and session.counts["connects"] == 1
    leave(session, broker)
    later = sessions(conn, held_filters=session.held_filters)  # as from the journal's marks
    assert connect(later) + until_marker(later, broker) == []  # every PUBACK got there


# ---- the socket the actor watches, close ---------------------------------------------------
def readable(fd: int, timeout_s: float = 0.0) -> bool:
    return select.select([fd], [], [], timeout_s)[0] == [fd]


def test_fileno_is_readable_exactly_while_deliveries_wait(start_mosquitto, sessions) -> None:
    broker = start_mosquitto()
    session = sessions(connection(broker, "fd"))
    fd = session.fileno()
    assert fd is not None and not readable(fd)
    connect(session)
    assert session.fileno() == fd and not readable(fd)
    mosquitto_pub(broker, TOPIC, "w1", "w2", "w3")
    assert readable(fd, DEADLINE_S)
    wait_pending(session, 3)
    assert payloads(session.read(1)) == ["w1"]
    assert readable(fd)  # two still wait
    assert payloads(session.read(10)) == ["w2", "w3"]
    assert not readable(fd) and session.read(10) == []


def test_close_while_connecting_is_prompt_and_leaves_no_connection(tls_broker, sessions,
                                                                   stopped) -> None:
    broker, tls_port, _ = tls_broker
    session = sessions(tls_connection(tls_broker, "closing"))
    stopped(broker)  # the kernel accepts the TCP connection; the TLS handshake waits
    session.step()
    client = session._client
    deadline = time.monotonic() + DEADLINE_S
    while not connections_to(tls_port):
        assert time.monotonic() < deadline, "no TCP connection to the TLS listener"
        time.sleep(POLL_S)
    resume = threading.Timer(1.0, os.kill, (broker.pid, signal.SIGCONT))
    resume.start()
    started = time.monotonic()
    session.close()
    took = time.monotonic() - started
    resume.join()
    try:
        deadline = time.monotonic() + 2.0
        while connections_to(tls_port) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        assert not connections_to(tls_port), "the closed session's connection stays open"
        assert took < 0.5, f"close() took {took:.1f} s"
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()


def connections_to(port: int) -> list[Any]:
    """This process's established TCP connections to ``port``."""
    return [c for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]
