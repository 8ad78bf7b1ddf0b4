"""The real sources end to end: a CAN bus, a GPS over UDP and TCP, and MQTT through the gateway's
own broker, each feeding a real `fleetgw run` — with bad input and SIGKILLs along the way.

Where this sits: before step 1 of the data path (DESIGN.md), checked from the outside. What a
source hands the journal is read back from journal.db; what an actor reports, through the
inspector. The promises: every good input becomes one reading in the journal; bad input is
quarantined with a reason that names what was wrong and never stops good data (I8); a killed
sensor or broker comes back and data flows again; the broker listens on loopback only (I9).

Every feeder (CAN player, NMEA replay, private broker, publishers) is a real process or socket
started and stopped here; the gateways are torn down by the ``make_gateway`` fixture.
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
from collections import Counter
from pathlib import Path

import can
import cantools
import paho.mqtt.client as paho
import psutil
import pytest

from actors.journal.reader import JournalReader, QuarantinedRow, Record
from actors.sensors.decoders import DecodeError, build_decoder
from actors.sensors.nmea import NmeaParser
from config.decoders import DecoderSettings
from config.nmea import NmeaSourceSettings
from messages.journal import START
from messages.readings import Reading
from tests.mosquitto import Broker, require_mosquitto
from tests.system.harness import ROOT, GatewayUnderTest, free_port, wait_for
from tools.nmea_replay import read_log

pytestmark = pytest.mark.system

DBC = str(Path(ROOT) / "config" / "demo_vehicle.dbc")
DB = cantools.database.load_file(DBC)
NMEA_LOG = str(Path(ROOT) / "config" / "demo_drive.nmea")
#: An administratively scoped group no other test uses (tests/sensors/test_can.py has .187).
CAN_GROUP = "239.74.163.203"
DEVICE = "veh-001"  # the harness's gateways keep [gateway].device_id's default


# ---- helpers ------------------------------------------------------------------------------------
def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_sections(tmp_path: Path) -> dict:
    """No model runner (not under test here, and it costs CPU) and a policy that keeps every
    raw record as it is (no aggregates, samples or dedup between the source and the check)."""
    policy = tmp_path / "keep-all.toml"
    policy.write_text('[default]\nlane = "P3"\n')
    return {"model": {"enabled": False}, "router": {"policy": str(policy)}}


def journaled(gw: GatewayUnderTest, sensor_id: str) -> list[Record]:
    """The raw readings of ``sensor_id`` in the journal, in journal order."""
    out: list[Record] = []
    with JournalReader(gw.journal_path) as reader:
        pos = START
        while batch := reader.read(pos, 5000):
            out += [r for r in batch if r.sensor_id == sensor_id
                    and not r.kind.startswith("agg:")]
            pos = batch[-1].pos
    return out


def quarantined(gw: GatewayUnderTest, sensor_id: str) -> list[QuarantinedRow]:
    with JournalReader(gw.journal_path) as reader:
        rows: list[QuarantinedRow] = []
        while batch := reader.quarantined(5000, sensor_id, rows[-1].id if rows else 0):
            rows += batch
        return rows


def cli_json(gw: GatewayUnderTest, *args: str) -> dict:
    result = gw.cli(*args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def replaced(gw: GatewayUnderTest, name: str, old_pid: int) -> dict | None:
    """The node ``name`` once a new incarnation (not ``old_pid``) runs, else None."""
    node = gw.node(name)
    if node["pid"] not in (None, old_pid) and node["state"] == "running":
        return node
    return None


def figures_show(gw: GatewayUnderTest, name: str, timeout_s: float = 30, **expected) -> dict:
    """The node's figures once they show ``expected`` (they travel with the heartbeats, so they
    lag the journal by a moment); fails with the last figures seen."""
    seen: list[dict] = [{}]

    def check() -> dict | None:
        seen[0] = gw.node(name)["figures"]
        return seen[0] if all(seen[0].get(k) == v for k, v in expected.items()) else None

    try:
        return wait_for(check, timeout_s, f"{name} figures {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen[0]}") from None


def stop_process(proc: subprocess.Popen | None) -> None:
    """Teardown of a feeder process: SIGTERM, SIGKILL if it lingers, reaped either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---- CAN ----------------------------------------------------------------------------------------
def assert_decoded_per_dbc(records: list[Record]) -> None:
    """Every reading is a DBC message (its name the kind) with that message's signals, each
    inside its DBC range (one scale step of rounding allowed)."""
    names = {m.name for m in DB.messages}
    for rec in records:
        assert rec.kind in names, f"kind {rec.kind!r} is no message of {DBC}"
        assert rec.device_id == DEVICE
        message = DB.get_message_by_name(rec.kind)
        signals = {s.name: s for s in message.signals}
        values = rec.values
        assert values and set(values) <= set(signals), (rec.kind, values)
        if not message.is_multiplexed():
            assert set(values) == set(signals), (rec.kind, values)
        for name, value in values.items():
            sig = signals[name]
            step = abs(sig.scale)
            assert sig.minimum - step <= value <= sig.maximum + step, (rec.kind, name, value)


def test_can_bus_is_decoded_per_dbc_bad_frames_quarantined_and_a_killed_sensor_restarted(
        make_gateway, tmp_path):
    port = free_udp_port()
    sensor = {"id": "can0", "type": "can", "batch_max_age_s": 0.05,
              "can": {"dbc": DBC, "interface": "udp_multicast", "channel": CAN_GROUP,
                      "port": port}}
    gw = make_gateway(sensors=[sensor], **quiet_sections(tmp_path)).start()
    figures_show(gw, "sensor:can0", state="open")  # bound to the group
    player = subprocess.Popen(
        [sys.executable, "-m", "tools.can_player", "--interface", "udp_multicast",
         "--channel", CAN_GROUP, "--port", str(port), "--dbc", DBC, "--rate", "20",
         "--seconds", "150"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bus = None
    try:
        # 1. Readings per the DBC: every message of the player, decoded and in range.
        wanted = {m.name for m in DB.messages}
        wait_for(lambda: {r.kind for r in journaled(gw, "can0")} >= wanted
                 and len(journaled(gw, "can0")) >= 100, 60,
                 "readings of every DBC message")
        records = journaled(gw, "can0")
        assert_decoded_per_dbc(records)
        engine = [r.values for r in records if r.kind == "EngineData"]
        assert all(0 <= v["EngineSpeed"] <= 8000 and -40 <= v["CoolantTemp"] <= 150
                   for v in engine)
        battery = [r.values for r in records if r.kind == "BatteryStatus"]
        assert all(0 <= v["StateOfCharge"] <= 100 for v in battery)
        figures = figures_show(gw, "sensor:can0", decode_failures=0, state="open")
        assert figures["frames"] >= figures["readings"] > 0, figures
        assert quarantined(gw, "can0") == []

        # 2. Bad frames on the same bus: a known id with the wrong length, and a datagram
        # that is no frame at all. Each is quarantined with a reason naming what it is.
        bus = can.Bus(interface="udp_multicast", channel=CAN_GROUP, port=port,
                      ignore_config=True)
        bad = [
            can.Message(arbitration_id=0x1A0, is_extended_id=False, data=b"\x01\x02\x03"),
            can.Message(arbitration_id=0x220, is_extended_id=False, data=bytes(8)),
            can.Message(arbitration_id=0x18FF50E5, is_extended_id=True, data=b"\x10\x20"),
        ]
        expected_reasons = {
            "can:0x1a0": "EngineData (0x1A0): 3 data bytes, demo_vehicle.dbc says 8",
            "can:0x220": "BrakeStatus (0x220): 8 data bytes, demo_vehicle.dbc says 4",
            "can:0x18ff50e5": "BatteryStatus (0x18FF50E5): 2 data bytes, "
                              "demo_vehicle.dbc says 8",
        }
        junk_source = f"can:udp_multicast:{CAN_GROUP}"
        rounds = 3
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            for _ in range(rounds):
                for msg in bad:
                    bus.send(msg)
                raw.sendto(b"\xc1 not a frame", (CAN_GROUP, port))
        before_bad = len(journaled(gw, "can0"))
        wait_for(lambda: len(quarantined(gw, "can0")) >= rounds * (len(bad) + 1), 30,
                 "the bad frames to be quarantined")
        rows = quarantined(gw, "can0")
        by_source = Counter(row.source for row in rows)
        assert by_source == {**dict.fromkeys(expected_reasons, rounds), junk_source: rounds}, \
            by_source
        for row in rows:
            if row.source == junk_source:
                assert row.reason.startswith(f"undecodable datagram on udp_multicast:"
                                             f"{CAN_GROUP}"), row.reason
            else:
                assert row.reason == expected_reasons[row.source], row.reason
        wrong_length = [r for r in rows if r.source == "can:0x1a0"]
        assert wrong_length[0].raw == b"\x00\x00\x01\xa0\x01\x02\x03"  # id + data
        # ... the operator's view says the same
        listing = cli_json(gw, "journal", "quarantine", "--db", gw.journal_path,
                           "--sensor", "can0")
        assert listing["totals"]["can0"]["quarantined"] == rounds * (len(bad) + 1)
        assert {i["reason"] for i in listing["inputs"]} >= set(expected_reasons.values())
        # ... and good frames keep flowing after them, from the same incarnation.
        wait_for(lambda: len(journaled(gw, "can0")) > before_bad + 100, 30,
                 "good frames after the bad ones")
        figures_show(gw, "sensor:can0", decode_failures=rounds * (len(bad) + 1),
                     quarantined=rounds * (len(bad) + 1), state="open")
        node = gw.node("sensor:can0")
        assert node["restarts"] == 0

        # 3. SIGKILL the sensor: restarted, and the bus is decoded again.
        os.kill(node["pid"], signal.SIGKILL)
        new = wait_for(lambda: replaced(gw, "sensor:can0", node["pid"]), 60,
                       "the CAN sensor to be restarted")
        assert new["restarts"] == 1 and "SIGKILL" in (new["last_exit"] or "")
        at_restart = len(journaled(gw, "can0"))
        wait_for(lambda: len(journaled(gw, "can0")) > at_restart + 100, 30,
                 "the restarted CAN sensor to journal")
        wait_for(lambda: (n := gw.node("sensor:can0"))["pid"] == new["pid"]
                 and n["figures"].get("readings", 0) > 0, 30,
                 "the new incarnation's figures to show its readings")
        assert_decoded_per_dbc(journaled(gw, "can0"))
        assert player.poll() is None, player.communicate()
    finally:
        if bus is not None:
            bus.shutdown()
        stop_process(player)


# ---- NMEA ---------------------------------------------------------------------------------------
def nmea_key(ts: int, values: dict) -> tuple[int, str, str]:
    """A reading of the drive as (ts, sentence type, values): what tells readings apart."""
    return ts, str(values["sentence"]), json.dumps(values, sort_keys=True)


def expected_nmea(source: str) -> tuple[Counter, list[tuple[bytes, str]]]:
    """What the demo drive log must become, by the project's own parser: its readings (a
    multiset: a sentence without a time of its own after a bad timed one shares the previous
    epoch's time, and may repeat its values) and the bad lines with their reasons."""
    parser = NmeaParser(NmeaSourceSettings(source=source), "gps0", DEVICE, source)
    readings: Counter = Counter()
    bad: list[tuple[bytes, str]] = []
    for line in read_log(NMEA_LOG):
        out = parser.parse(line, time.time_ns(), 0.0)
        if isinstance(out, Reading):
            readings[nmea_key(out.ts, dict(out.values))] += 1
        elif out is not None:
            bad.append((line, out.reason))
    return readings, bad


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_nmea_drive_is_journaled_sentence_by_sentence_and_bad_lines_quarantined(
        transport, make_gateway, tmp_path):
    port = free_udp_port() if transport == "udp" else free_port()
    source = f"{transport}://127.0.0.1:{port}"
    expected, bad = expected_nmea(source)
    assert sum(expected.values()) == 1195 and len(bad) == 5
    # TCP: the gateway connects to the replay's server (retrying every 0.2 s until it
    # listens); UDP: the gateway binds the port and the replay sends to it.
    sensor = {"id": "gps0", "type": "nmea", "batch_max_age_s": 0.05,
              "nmea": {"source": source, "reconnect_min_s": 0.2, "reconnect_max_s": 0.2}}
    gw = make_gateway(sensors=[sensor], **quiet_sections(tmp_path)).start()
    if transport == "udp":
        figures_show(gw, "sensor:gps0", state="open")  # bound: nothing sent is lost
    # 300 epochs (~1230 lines) at 75 epochs/s: about 4 s.
    replay = subprocess.Popen(
        [sys.executable, "-m", "tools.nmea_replay", NMEA_LOG, source, "--rate", "75"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = replay.communicate(timeout=90)
        assert replay.returncode == 0, out + err
        assert f"sent 1230 lines to {source}" in out
        wait_for(lambda: len(journaled(gw, "gps0")) >= sum(expected.values())
                 and len(quarantined(gw, "gps0")) >= len(bad), 60,
                 "every sentence of the drive to be journaled")
        records = journaled(gw, "gps0")
        assert {(r.device_id, r.kind) for r in records} == {(DEVICE, "gps")}
        got = Counter(nmea_key(r.ts, r.values) for r in records)
        strangers = got - expected
        assert not strangers, f"not sentences of the log, or journaled twice: {strangers}"
        missing = expected - got
        assert not missing, f"{sum(missing.values())} sentences missing: {list(missing)[:5]}"
        # 300 epochs of each type, less the bad lines: 2 RMC, 1 VTG (the junk), 2 GGA.
        assert Counter(k[1] for k in got.elements()) == {"RMC": 298, "VTG": 299, "GGA": 298,
                                                         "GSA": 300}
        # The five bad lines: quarantined with their reasons (and nothing else is).
        rows = quarantined(gw, "gps0")
        assert sorted((row.raw.rstrip(b"\r\n"), row.reason) for row in rows) == sorted(bad)
        reasons = " | ".join(row.reason for row in rows)
        assert reasons.count("checksum mismatch") == 2, reasons
        assert reasons.count("no checksum: '*hh' missing") == 2, reasons  # truncated lines
        assert reasons.count("not NMEA text: byte 0xb5") == 1, reasons  # binary junk
        assert all(row.source == source for row in rows)
        # The sensor's own count agrees (the GSV lines are ignored: not configured).
        figures_show(gw, "sensor:gps0", readings=1195, quarantined=5, ignored=30,
                     quarantined_bad_checksum=2, quarantined_no_checksum=2,
                     quarantined_not_ascii=1)
        assert gw.node("sensor:gps0")["restarts"] == 0
        stats = cli_json(gw, "journal", "stats", "--db", gw.journal_path)
        assert stats["quarantine"]["gps0"]["quarantined"] == 5
    finally:
        stop_process(replay)


# ---- MQTT through the gateway's own broker --------------------------------------------------------
TOPIC = "fleet/{device}/engine"


def mqtt_sensor(client_id: str) -> dict:
    return {"id": "mq0", "type": "mqtt", "batch_max_age_s": 0.05,
            "mqtt": {"client_id": client_id,
                     "topics": [{"filter": "fleet/+/engine", "device": "{2}",
                                 "kind": "engine"}]}}


def journaled_n(gw: GatewayUnderTest) -> Counter:
    """Good MQTT message number -> how many times the journal holds it."""
    return Counter(r.values["n"] for r in journaled(gw, "mq0") if r.kind == "engine")


def mosquitto_pub(port: int, n: int, device: str = "veh-7") -> bool:
    """One QoS 1 message; True when its PUBACK came (exit status 0)."""
    result = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
         "-t", TOPIC.format(device=device), "-m", json.dumps({"n": n, "rpm": 900.0 + n})],
        capture_output=True, timeout=30)
    return result.returncode == 0


def wait_or_none(predicate, timeout_s: float):
    """``wait_for`` that gives None instead of failing when the deadline passes."""
    try:
        return wait_for(predicate, timeout_s, "")
    except AssertionError:
        return None


def flowing(gw: GatewayUnderTest, port: int, first_n: int, deadline_s: float = 60) -> int:
    """Publish probes (first_n, first_n + 1, ...) until one is journaled: the broker runs and
    the sensor is subscribed again. Returns the next free message number."""
    n = [first_n]

    def probe() -> bool:
        mosquitto_pub(port, n[0])
        n[0] += 1
        # Give each probe a moment before the next: a slow commit is not a lost probe.
        return bool(wait_or_none(lambda: set(range(first_n, n[0])) & set(journaled_n(gw)), 2))

    wait_for(probe, deadline_s, "MQTT messages to be journaled again", interval_s=0)
    return n[0]


def publish_and_check(gw: GatewayUnderTest, port: int, first_n: int, count: int = 10) -> int:
    """``count`` messages, each acknowledged by the broker, each journaled once."""
    numbers = range(first_n, first_n + count)
    for n in numbers:
        assert mosquitto_pub(port, n), f"message {n} was not acknowledged by the broker"
    wait_for(lambda: set(numbers) <= set(journaled_n(gw)), 60, f"messages {numbers}")
    return first_n + count


@require_mosquitto
def test_local_broker_is_supervised_restarted_and_listens_on_loopback_only(
        make_gateway, tmp_path):
    broker_port = free_port()
    gw = make_gateway(sensors=[mqtt_sensor("fleetgw-test-mq0")],
                      broker={"enabled": True, "port": broker_port, "restart_min_s": 0.2,
                              "restart_max_s": 2.0},
                      mqtt={"reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
                      **quiet_sections(tmp_path)).start()
    figures = figures_show(gw, "broker", broker_state="running", broker_port=broker_port)
    broker = gw.node("broker")
    # The broker's files are in the default place, DATA_DIR/broker.
    broker_dir = Path(gw.data_dir) / "broker"
    assert f"listener {broker_port} 127.0.0.1" in (broker_dir / "mosquitto.conf").read_text()
    assert (broker_dir / "mosquitto.pid").read_text().strip() == str(figures["broker_pid"])
    mosquitto_pid = figures["broker_pid"]
    assert mosquitto_pid and psutil.Process(mosquitto_pid).ppid() == broker["pid"]

    # I9: the broker (and everything else of the gateway) listens on loopback only.
    listening = []
    for pid in gw.gateway_pids():
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.append((pid, conn.laddr.ip, conn.laddr.port))
    on_broker_port = [entry for entry in listening if entry[2] == broker_port]
    assert on_broker_port and all(ip == "127.0.0.1" for _pid, ip, _port in on_broker_port), \
        listening
    assert mosquitto_pid in {pid for pid, _ip, _port in on_broker_port}
    assert all(ip in ("127.0.0.1", "::1") for _pid, ip, _port in listening), listening

    # Published with mosquitto_pub -> journaled.
    n = flowing(gw, broker_port, 1)
    n = publish_and_check(gw, broker_port, n)
    records = [r for r in journaled(gw, "mq0") if r.kind == "engine"]
    assert {(r.device_id, r.values["rpm"] - r.values["n"]) for r in records} == {
        ("veh-7", 900.0)}

    # SIGKILL mosquitto: the broker actor restarts it; the sensor reconnects.
    sensor_pid = gw.node("sensor:mq0")["pid"]
    os.kill(mosquitto_pid, signal.SIGKILL)

    def broker_restarted() -> dict | None:
        fig = gw.node("broker")["figures"]
        if (fig["broker_restarts"] >= 1 and fig["broker_state"] == "running"
                and fig["broker_pid"] not in (0, mosquitto_pid)):
            return fig
        return None

    fig = wait_for(broker_restarted, 60, "the broker actor to restart mosquitto")
    assert "SIGKILL" in fig["broker_last_exit"], fig
    assert gw.node("broker")["pid"] == broker["pid"]  # the actor itself did not restart
    n = flowing(gw, broker_port, n)
    n = publish_and_check(gw, broker_port, n)
    wait_for(lambda: (f := gw.node("sensor:mq0")["figures"])["mqtt_connected"]
             and f["mqtt_connects"] >= 2, 30, "the MQTT sensor to reconnect")
    sensor = gw.node("sensor:mq0")
    assert sensor["pid"] == sensor_pid and sensor["restarts"] == 0  # it reconnected

    # SIGKILL the broker actor: its mosquitto goes with it; the supervisor restarts the actor,
    # which starts a fresh mosquitto on the same port.
    second_mosquitto = fig["broker_pid"]
    os.kill(broker["pid"], signal.SIGKILL)
    new = wait_for(lambda: replaced(gw, "broker", broker["pid"]), 60,
                   "the broker actor to be restarted")
    assert new["restarts"] == 1 and "SIGKILL" in (new["last_exit"] or "")
    fresh = wait_for(lambda: (f := gw.node("broker")["figures"])["broker_state"] == "running"
                     and f["broker_pid"] not in (0, second_mosquitto) and f, 60,
                     "a fresh mosquitto under the new broker actor")
    assert fresh["broker_port"] == broker_port
    wait_for(lambda: gone(second_mosquitto), 30, "the old mosquitto to be gone")
    assert psutil.Process(fresh["broker_pid"]).ppid() == new["pid"]
    n = flowing(gw, broker_port, n)
    n = publish_and_check(gw, broker_port, n)
    sensor = gw.node("sensor:mq0")
    assert sensor["pid"] == sensor_pid and sensor["figures"]["mqtt_connects"] >= 3
    twice = {k: c for k, c in journaled_n(gw).items() if c > 1}
    assert not twice, f"journaled more than once: {sorted(twice)[:10]}"
    listening = [(conn.laddr.ip, conn.laddr.port)
                 for conn in psutil.Process(fresh["broker_pid"]).net_connections(kind="inet")
                 if conn.status == psutil.CONN_LISTEN]
    assert listening == [("127.0.0.1", broker_port)], listening


# ---- a flood of malformed MQTT input --------------------------------------------------------------
#: Payloads the JSON decoder refuses, one quarantined input each.
GARBAGE = (
    b"",
    b"\xff\xfe\x00garbage",
    b"{not json",
    b"[1, 2, 3]",
    b'{"x": NaN}',
    b'{"x": 1e999}',
    b'"just a string"',
    b'{"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}',
    b'{"bad name!": 1}',
    b'{"s": "' + b"x" * 5000 + b'"}',
    b"{}",
    b'{"n": 9223372036854775808}',
    b"[]",
    b"\x00" * 64,
)
GOOD_EVERY = 10


@require_mosquitto
def test_flood_of_malformed_mqtt_input_never_stops_good_data(make_gateway, tmp_path):
    decoder = build_decoder(DecoderSettings())
    for payload in GARBAGE:  # the premise: each one is refused by the decoder
        with pytest.raises(DecodeError):
            decoder.decode(payload, time.time_ns())
    broker = Broker(tmp_path / "broker", port=free_port()).start()
    client = None
    try:
        gw = make_gateway(sensors=[mqtt_sensor("fleetgw-test-flood")],
                          mqtt={"port": broker.port, "reconnect_max_s": 1.0},
                          **quiet_sections(tmp_path)).start()
        n = flowing(gw, broker.port, 1)  # subscribed: the session exists from now on
        sensor = gw.node("sensor:mq0")
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311,
                             client_id="flood-publisher")
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", broker.port, keepalive=30)
        client.loop_start()
        infos, good = [], []
        garbage_sent = 2000
        for i in range(garbage_sent):
            payload = GARBAGE[i % len(GARBAGE)]
            # A bad device id in the topic is refused too (not an identifier).
            topic = TOPIC.format(device="bad device!" if i % 7 == 3 else "veh-9")
            infos.append(client.publish(topic, payload, qos=1))
            if i % GOOD_EVERY == 0:
                good.append(n)
                infos.append(client.publish(TOPIC.format(device="veh-9"),
                                            json.dumps({"n": n, "rpm": 900.0 + n}), qos=1))
                n += 1
        for info in infos:
            info.wait_for_publish(timeout=60)
            assert info.is_published()
        # Every good message journaled, once; every bad one quarantined and counted.
        wait_for(lambda: set(good) <= set(journaled_n(gw)), 60, "the good messages")
        wait_for(lambda: len(quarantined(gw, "mq0")) >= garbage_sent, 60,
                 "the garbage to be quarantined")
        counts = journaled_n(gw)
        assert all(counts[k] == 1 for k in good), {k: counts[k] for k in good if counts[k] != 1}
        assert max(counts.values()) == 1
        stats = cli_json(gw, "journal", "stats", "--db", gw.journal_path)
        totals = stats["quarantine"]["mq0"]
        assert totals["quarantined"] == garbage_sent and totals["kept"] == garbage_sent, totals
        rows = quarantined(gw, "mq0")
        assert len(rows) == garbage_sent
        reasons = Counter(row.reason.split(":")[0] for row in rows)
        assert reasons["payload is not valid JSON"] > 0 and reasons[
            "payload is not UTF-8 text"] > 0, reasons
        assert any("device" in row.reason for row in rows), "bad device ids quarantined"
        assert all(row.source for row in rows)
        figures = figures_show(gw, "sensor:mq0", mqtt_quarantined=garbage_sent)
        assert figures["mqtt_readings"] >= len(good), figures
        after = gw.node("sensor:mq0")
        assert after["pid"] == sensor["pid"] and after["restarts"] == 0
    finally:
        if client is not None:
            client.disconnect()
            client.loop_stop()
        broker.close()
