"""MosquittoLauncher against the real mosquitto: a config it accepts, loopback only, persistent
sessions that survive a restart, bounded in-flight deliveries, restarts with backoff, dying
with its owner (PR_SET_PDEATHSIG), leftovers stopped first, and errors that say what helps.
Plus `BrokerSettings` validation (no broker needed)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import actors.broker.launcher as launcher_module
from actors.broker.launcher import BrokerError, MosquittoLauncher, find_binary
from config.broker import BrokerSettings
from config.loader import ConfigError, structure_strict
from config.schema import FieldProblem
from tests.clickhouse_server import free_port
from tests.mosquitto import (  # noqa: F401  (fixtures)
    Broker,
    fixture_mosquitto,
    fixture_mosquitto_installed,
    fixture_start_mosquitto,
    kill_brokers_of,
    mosquitto_binary,
    requires_mosquitto,
)

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 15.0


def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S,
               step: Callable[[], None] | None = None) -> Any:
    """Poll ``predicate`` (calling ``step`` between polls) until truthy or the deadline."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        if step is not None:
            step()
        else:
            time.sleep(0.01)
    return value


def drive(launcher: MosquittoLauncher) -> Callable[[], None]:
    """A poll step that advances ``launcher`` and waits a little on its child."""

    def step() -> None:
        launcher.check()
        if launcher.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.process.wait(timeout=0.01)
        else:
            time.sleep(0.01)

    return step


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def fast(**overrides: Any) -> BrokerSettings:
    """Settings for a test broker: installed binary, free port, quick restarts."""
    values: dict[str, Any] = {"enabled": True, "binary": mosquitto_binary(), "port": free_port(),
                              "restart_min_s": 0.05, "restart_max_s": 1.0}
    values.update(overrides)
    return BrokerSettings(**values)


class Client:
    """A paho-mqtt 2 client driven by the test (no background thread), MQTT 3.1.1."""

    def __init__(self, broker: Broker, client_id: str, *, persistent: bool = False,
                 manual_ack: bool = False, username: str = "", password: str = "") -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=not persistent, manual_ack=manual_ack)
        if username:
            self.client.username_pw_set(username, password)
        self.messages: list[mqtt.MQTTMessage] = []
        self.connack: tuple[Any, Any] | None = None
        self.subscribed: list[int] = []
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self.client.on_connect = lambda c, u, flags, rc, p: setattr(self, "connack", (flags, rc))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.append(mid)
        self.client.connect(broker.host, broker.port)
        self.wait(lambda: self.connack is not None, "CONNACK")

    def wait(self, predicate: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
        return wait_until(predicate, what, timeout_s, step=lambda: self.client.loop(0.01))

    @property
    def accepted(self) -> bool:
        assert self.connack is not None
        return not self.connack[1].is_failure

    def subscribe(self, topic: str) -> None:
        _, mid = self.client.subscribe(topic, qos=1)
        self.wait(lambda: mid in self.subscribed, f"SUBACK for {topic}")

    def publish(self, topic: str, payloads: list[bytes], qos: int = 1) -> None:
        infos = [self.client.publish(topic, p, qos=qos) for p in payloads]
        self.wait(lambda: all(i.is_published() for i in infos), "publish acknowledgements")

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop(0.01)


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(("table", "field", "text"), [
    ({"port": 80}, "port", "must be a TCP port in 1024..65535 (got 80)"),
    ({"listen_address": "localhost"}, "listen_address", "must be an IP address"),
    ({"listen_address": "0.0.0.0"}, "allow_anonymous", "must be false when listen_address"),
    ({"allow_anonymous": False}, "password_file", "must be set when allow_anonymous is false"),
    ({"restart_min_s": 5.0, "restart_max_s": 1.0}, "restart_max_s", "must be >= restart_min_s"),
    ({"max_queued_messages": 0}, "max_queued_messages", "must be > 0 (got 0)"),
    ({"max_queued_bytes": -1}, "max_queued_bytes", "must be >= 0 (got -1)"),
    ({"max_inflight_messages": 0}, "max_inflight_messages", "must be > 0 (got 0)"),
    ({"autosave_interval_s": -1}, "autosave_interval_s", "must be >= 0 (got -1)"),
    ({"extra_config": ["a 1\nlistener 1 0.0.0.0"]}, "extra_config", "one mosquitto.conf line"),
    ({"binary": ""}, "binary", "must name the mosquitto executable"),
])
def test_bad_broker_settings_are_refused_naming_field_value_and_rule(table, field, text):
    with pytest.raises(FieldProblem) as problem:
        BrokerSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
    assert problem.value.field == field
    assert text in str(problem.value)
    with pytest.raises(ConfigError) as error:
        structure_strict(table, BrokerSettings, "gateway.toml")
    assert any(field in p and text in p for p in error.value.problems), error.value.problems


def test_default_broker_is_off_and_on_loopback():
    default = BrokerSettings()
    assert not default.enabled and default.loopback and default.listen_address == "127.0.0.1"
    assert structure_strict({}, BrokerSettings) == default


def test_network_listener_needs_a_password_file_and_no_anonymous_clients():
    exposed = BrokerSettings(listen_address="0.0.0.0", allow_anonymous=False,
                             password_file="/etc/fleetgw/mqtt.passwd")
    assert not exposed.loopback
    text = MosquittoLauncher(exposed, "/var/lib/fleetgw/broker").config_text()
    assert "listener 1883 0.0.0.0" in text and "allow_anonymous false" in text
    assert "password_file /etc/fleetgw/mqtt.passwd" in text


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["port", "listen_address", "allow_anonymous", "password_file",
                     "max_queued_messages", "restart_min_s", "restart_max_s", "extra_config",
                     "binary", "data_dir", "autosave_interval_s", "unknown"]),
    st.one_of(st.integers(-2, 70000), st.floats(allow_nan=True), st.booleans(),
              st.text(max_size=12), st.sampled_from(["::1", "127.0.0.2", "10.0.0.1"]),
              st.lists(st.text(max_size=8), max_size=3)),
    max_size=5))
def test_any_broker_table_is_built_or_refused_with_config_error(table):
    try:
        broker = structure_strict(table, BrokerSettings, "gateway.toml")
    except ConfigError as exc:
        assert exc.problems and all(p for p in exc.problems)
        return
    # Accepted: the generated config has exactly one listener and one line per extra line.
    lines = MosquittoLauncher(broker, "/data/broker").config_text().split("\n")[:-1]
    assert [line for line in lines if line.startswith("listener ")] == [
        f"listener {broker.port} {broker.listen_address}"]
    if broker.extra_config:
        assert lines[-len(broker.extra_config):] == list(broker.extra_config)


def test_config_text_has_one_loopback_listener_persistence_and_bounded_queues(tmp_path):
    s = BrokerSettings(port=18830, max_queued_messages=5000, max_queued_bytes=1 << 20,
                       max_inflight_messages=100, autosave_interval_s=3,
                       extra_config=("persistent_client_expiration 14d",))
    lines = MosquittoLauncher(s, str(tmp_path)).config_text().splitlines()
    assert [x for x in lines if x.startswith(("listener", "port", "bind_"))] == [
        "listener 18830 127.0.0.1"]
    for expected in ("persistence true", f"persistence_location {tmp_path}/",
                     "autosave_interval 3", "max_queued_messages 5000",
                     "max_queued_bytes 1048576", "max_inflight_messages 100",
                     "allow_anonymous true", "log_dest stderr"):
        assert expected in lines
    assert lines[-1] == "persistent_client_expiration 14d"


# ---------------------------------------------------------------------------- the broker
@requires_mosquitto
def test_generated_config_is_accepted_and_listens_on_loopback_only(mosquitto):
    listening = [c for c in psutil.Process(mosquitto.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert [(c.laddr.ip, c.laddr.port) for c in listening] == [("127.0.0.1", mosquitto.port)]
    figures = mosquitto.launcher.figures()
    assert figures["state"] == "running" and figures["pid"] == mosquitto.pid
    assert figures["problem"] == "" and figures["port"] == mosquitto.port
    command = psutil.Process(mosquitto.pid).cmdline()
    assert command[0] == "fleetgw-mosquitto" and mosquitto.launcher.conf_path in command
    assert (mosquitto.root / "mosquitto.pid").read_text().strip() == str(mosquitto.pid)
    # It stays in our process group: a group kill of the gateway takes it down too.
    assert os.getpgid(mosquitto.pid) == os.getpgid(0)


@requires_mosquitto
def test_password_file_and_extra_config_are_accepted(start_mosquitto, tmp_path):
    passwd = tmp_path / "mqtt.passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "sensor", "s3cret"],
                   check=True, capture_output=True)
    broker = start_mosquitto(allow_anonymous=False, password_file=str(passwd),
                             extra_config=("persistent_client_expiration 14d",))
    anonymous = Client(broker, "anon")
    assert not anonymous.accepted
    with_password = Client(broker, "sensor", username="sensor", password="s3cret")
    assert with_password.accepted
    with_password.disconnect()


@requires_mosquitto
def test_queued_messages_of_a_persistent_session_survive_a_graceful_restart(mosquitto):
    subscriber = Client(mosquitto, "gw-sensor", persistent=True)
    subscriber.subscribe("veh/#")
    subscriber.disconnect()
    publisher = Client(mosquitto, "device")
    payloads = [f"reading-{i}".encode() for i in range(50)]
    publisher.publish("veh/imu", payloads)  # PUBACKed by the broker: now it must keep them
    publisher.disconnect()

    assert mosquitto.restart() is mosquitto
    assert (mosquitto.root / "mosquitto.db").stat().st_size > 0

    subscriber = Client(mosquitto, "gw-sensor", persistent=True)
    assert subscriber.connack is not None and subscriber.connack[0].session_present
    subscriber.wait(lambda: len(subscriber.messages) >= 50, "the queued messages")
    assert [m.payload for m in subscriber.messages] == payloads
    assert all(m.qos == 1 for m in subscriber.messages)
    subscriber.disconnect()


@requires_mosquitto
def test_unacknowledged_deliveries_are_bounded_by_max_inflight_messages(start_mosquitto):
    broker = start_mosquitto(max_inflight_messages=7)
    subscriber = Client(broker, "gw-sensor", persistent=True, manual_ack=True)
    subscriber.subscribe("veh/#")
    subscriber.subscribe("marker")
    publisher = Client(broker, "device")
    publisher.publish("veh/imu", [b"%d" % i for i in range(30)])
    publisher.publish("marker", [b"done"], qos=0)  # after it, the broker sent what it could
    subscriber.wait(lambda: any(m.topic == "marker" for m in subscriber.messages), "marker")
    held = [m for m in subscriber.messages if m.topic == "veh/imu"]
    assert len(held) == 7
    # Acknowledging (as after a journal commit) lets the rest through.
    done = [0]  # how many of subscriber.messages are acknowledged

    def acknowledge() -> bool:
        for m in subscriber.messages[done[0]:]:
            if m.topic == "veh/imu":
                subscriber.client.ack(m.mid, 1)
        done[0] = len(subscriber.messages)
        return sum(m.topic == "veh/imu" for m in subscriber.messages) >= 30

    subscriber.wait(acknowledge, "the rest after acknowledgements")
    assert sorted(int(m.payload) for m in subscriber.messages if m.topic == "veh/imu") == list(
        range(30))


@requires_mosquitto
def test_killed_broker_is_restarted_with_doubling_backoff_and_counted(tmp_path):
    clock = [1000.0]
    launcher = MosquittoLauncher(fast(restart_min_s=0.2, restart_max_s=1.0), str(tmp_path),
                                 clock=lambda: clock[0])
    try:
        launcher.start()
        wait_until(launcher.ready, "the broker", step=drive(launcher))
        pids = [launcher.pid]
        for delay, ran_s in ((0.2, 0.0), (0.4, 0.0), (0.8, 0.0), (0.2, 1.5)):
            clock[0] += ran_s
            launcher.kill()
            launcher.check()
            figures = launcher.figures()
            assert figures["state"] == "backing_off" and figures["pid"] == 0
            assert figures["last_exit"] == "killed by SIGKILL"
            assert "mosquitto stopped (killed by SIGKILL)" in figures["problem"]
            restarts = figures["restarts"]
            clock[0] += delay - 0.01
            launcher.check()
            assert launcher.state == "backing_off", f"restarted before {delay} s"
            clock[0] += 0.02
            launcher.check()
            assert launcher.state == "starting" and launcher.restarts == restarts + 1
            wait_until(launcher.ready, "the restarted broker", step=drive(launcher))
            assert launcher.figures()["problem"] == ""
            pids.append(launcher.pid)
            assert gone(pids[-2])
        assert launcher.figures()["restarts"] == 4
        assert len(set(pids)) == 5
    finally:
        assert launcher.stop(10.0)


CHILD = """
import sys, time
from config.broker import BrokerSettings
from actors.broker.launcher import MosquittoLauncher
launcher = MosquittoLauncher(BrokerSettings(enabled=True, binary=sys.argv[1],
                                            port=int(sys.argv[2])), sys.argv[3])
launcher.start()
deadline = time.monotonic() + 20
while not launcher.ready() and time.monotonic() < deadline:
    launcher.check()
    time.sleep(0.01)
print(launcher.pid, flush=True)
sys.stdin.read()
"""


def read_line(process: subprocess.Popen, timeout_s: float = 30.0) -> str:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    assert ready, "the child printed nothing"
    return process.stdout.readline().decode().strip()


@requires_mosquitto
def test_broker_dies_with_the_process_that_started_it_and_a_new_one_starts_cleanly(tmp_path):
    s = fast()
    owner = subprocess.Popen([sys.executable, "-c", CHILD, s.binary, str(s.port), str(tmp_path)],
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    conf = str(tmp_path / "mosquitto.conf")
    try:
        broker_pid = int(read_line(owner))
        assert broker_pid and not gone(broker_pid)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        wait_until(lambda: gone(broker_pid), "the orphaned broker to exit")
        # It got SIGTERM (PR_SET_PDEATHSIG), not SIGKILL: it saved its state on the way out.
        log = (tmp_path / "mosquitto.log").read_text()
        assert "terminating" in log and "Saving in-memory database" in log

        launcher = MosquittoLauncher(s, str(tmp_path))
        launcher.start()
        assert launcher.state == "starting"  # nothing left over to wait for
        wait_until(launcher.ready, "the new broker", step=drive(launcher))
        assert launcher.stop(10.0)
    finally:
        owner.kill()
        owner.wait()
        kill_brokers_of(conf)


@requires_mosquitto
def test_leftover_broker_of_an_earlier_incarnation_is_stopped_first(tmp_path):
    s = fast()
    earlier, later = MosquittoLauncher(s, str(tmp_path)), MosquittoLauncher(s, str(tmp_path))
    try:
        earlier.start()
        wait_until(earlier.ready, "the first broker", step=drive(earlier))
        leftover = earlier.process
        assert leftover is not None
        later.start()
        assert later.state == "waiting"
        wait_until(later.ready, "the second broker", step=drive(later))
        assert leftover.poll() == 0  # SIGTERM: it saved and exited cleanly
        assert later.pid != leftover.pid
    finally:
        later.stop(10.0)
        earlier.stop(10.0)
        kill_brokers_of(str(tmp_path / "mosquitto.conf"))


# ------------------------------------------------------------------------------- errors
def test_missing_binary_names_the_debian_package_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError) as by_name:
        find_binary("no-such-mosquitto")
    with pytest.raises(BrokerError) as by_path:
        find_binary(str(tmp_path / "mosquitto"))
    for error in (by_name, by_path):
        assert "apt-get install mosquitto" in str(error.value)
        assert "[broker] binary" in str(error.value)

    launcher = MosquittoLauncher(BrokerSettings(binary="no-such-mosquitto", restart_min_s=0.1),
                                 str(tmp_path / "broker"), clock=lambda: 50.0)
    launcher.start()  # never raises: the actor keeps running and retries
    figures = launcher.figures()
    assert figures["state"] == "backing_off" and "apt-get install mosquitto" in figures["problem"]
    assert not launcher.ready()
    launcher.clock = lambda: 60.0
    launcher.check()
    assert launcher.restarts == 1 and launcher.state == "backing_off"
    assert launcher.stop() is True


@requires_mosquitto
def test_port_in_use_is_a_clear_problem_and_recovers_when_freed(tmp_path):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    launcher = MosquittoLauncher(fast(port=port), str(tmp_path))
    try:
        launcher.start()

        def failed() -> bool:
            assert not launcher.ready(), "ready() trusted another process's listener"
            return launcher.state == "backing_off"

        wait_until(failed, "the broker to fail", step=drive(launcher))
        problem = launcher.figures()["problem"]
        assert "Address already in use" in problem
        assert f"another process listens on 127.0.0.1:{port}" in problem
        assert "[broker] port" in problem
        assert launcher.last_exit == "exit status 1"

        squatter.close()
        wait_until(launcher.ready, "the broker once the port is free", step=drive(launcher))
        assert launcher.figures()["problem"] == "" and launcher.restarts >= 1
    finally:
        squatter.close()
        launcher.stop(10.0)


@requires_mosquitto
def test_a_bad_extra_config_line_is_reported_with_mosquittos_message(tmp_path):
    launcher = MosquittoLauncher(fast(extra_config=("bogus_option 1",)), str(tmp_path))
    try:
        launcher.start()
        wait_until(lambda: launcher.state == "backing_off", "the broker to refuse its config",
                   step=drive(launcher))
        problem = launcher.problem
        assert 'Unknown configuration variable "bogus_option"' in problem
        assert "[broker] extra_config" in problem
    finally:
        launcher.stop(10.0)


@requires_mosquitto
def test_stop_saves_the_state_and_removes_the_pid_file(mosquitto):
    assert (mosquitto.root / "mosquitto.pid").exists()
    pid = mosquitto.pid
    assert mosquitto.stop() is True
    assert gone(pid) and not (mosquitto.root / "mosquitto.pid").exists()
    assert (mosquitto.root / "mosquitto.db").exists()
    assert mosquitto.launcher.figures()["state"] == "stopped"
    assert mosquitto.launcher.figures()["last_exit"] == "exit status 0"
    mosquitto.launcher.check()  # a stopped broker stays stopped
    assert mosquitto.pid == 0


@requires_mosquitto
def test_the_log_is_rotated_while_the_broker_runs(mosquitto, monkeypatch):
    monkeypatch.setattr(launcher_module, "LOG_MAX_BYTES", 100)
    log = mosquitto.root / "mosquitto.log"
    assert log.stat().st_size > 100
    mosquitto.launcher.check(time.monotonic() + launcher_module.LOG_CHECK_S)
    assert (mosquitto.root / "mosquitto.log.1").stat().st_size > 100
    Client(mosquitto, "after-rotation").disconnect()
    wait_until(lambda: "after-rotation" in log.read_text(), "a log line after the rotation")
    assert log.read_text().startswith(time.strftime("%Y"))
