"""The MQTT sensor end to end: a real mosquitto, real publishers (paho and `mosquitto_pub`), a
real gateway whose MQTT sensor is SIGKILLed again and again while the broker restarts once.

The promise (DESIGN.md step 2, I1): every message a publisher was told was delivered (its
PUBACK) is journaled, and none twice — the sensor acknowledges the broker only after the
journal committed, and recognises the broker's redeliveries of what it had already committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter

import paho.mqtt.client as paho
import pytest

from actors.journal.reader import JournalReader
from messages.journal import START
from tests.mosquitto import Broker, require_mosquitto
from tests.system.harness import free_port, wait_for

pytestmark = [pytest.mark.system, require_mosquitto]

TOPIC = "fleet/{device}/engine"


def mqtt_sensor(client_id: str = "", **extra) -> dict:
    mqtt = {"topics": [{"filter": "fleet/+/engine", "device": "{2}", "kind": "engine"}]}
    if client_id:
        mqtt["client_id"] = client_id
    return {"id": "mq0", "type": "mqtt", "mqtt": mqtt, "batch_max_age_s": 0.05, **extra}


class Ledger:
    """What the publishers were told: acknowledged, or unknown (no PUBACK seen)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: set[tuple[str, int]] = set()
        self.unknown: set[tuple[str, int]] = set()

    def record(self, key: tuple[str, int], acked: bool) -> None:
        with self.lock:
            (self.acked if acked else self.unknown).add(key)


def paho_publisher(port: int, ledger: Ledger, stop: threading.Event, device: str) -> None:
    """QoS 1 publishes in rounds of 50, each round on a fresh clean connection; a message
    counts as delivered only when its PUBACK came back. A round cut by the broker's restart
    leaves its unacknowledged messages unknown: they are never resent (a resend would be a
    second, legitimately distinct publish)."""
    n = 0
    while not stop.is_set():
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311,
                             reconnect_on_failure=False)
        try:
            client.connect("127.0.0.1", port, keepalive=10)
        except OSError:
            time.sleep(0.05)  # the broker is restarting: try again
            continue
        client.loop_start()
        infos = []
        for _ in range(50):
            n += 1
            payload = json.dumps({"n": n, "src": "paho"})
            infos.append((n, client.publish(TOPIC.format(device=device), payload, qos=1)))
        for i, info in infos:
            with contextlib.suppress(RuntimeError, ValueError):  # the connection went
                info.wait_for_publish(timeout=5)
            ledger.record(("paho", i), info.is_published())
        client.disconnect()
        client.loop_stop()


def cli_publisher(port: int, ledger: Ledger, stop: threading.Event, device: str) -> None:
    """One `mosquitto_pub -q 1` per message: exit status 0 means its PUBACK arrived."""
    n = 0
    while not stop.is_set():
        n += 1
        payload = json.dumps({"n": n, "src": "cli"})
        result = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
             "-t", TOPIC.format(device=device), "-m", payload],
            capture_output=True, timeout=30)
        ledger.record(("cli", n), result.returncode == 0)


def journaled(data_dir: str) -> Counter:
    """(publisher, n) -> how many times the journal holds it."""
    counts: Counter = Counter()
    with JournalReader(os.path.join(data_dir, "journal.db")) as reader:
        pos = START
        while batch := reader.read(pos, 5000):
            for rec in batch:
                if rec.sensor_id == "mq0" and rec.kind == "engine":  # not aggregates
                    values = rec.values
                    counts[(values["src"], values["n"])] += 1
            pos = batch[-1].pos
    return counts


def test_every_acknowledged_message_is_journaled_once_through_kills_and_a_broker_restart(
        tmp_path, make_gateway):
    broker = Broker(tmp_path / "broker", port=free_port()).start()
    try:
        gw = make_gateway(sensors=[mqtt_sensor()], mqtt={"port": broker.port},
                          model={"enabled": False}).start()
        ledger, stop = Ledger(), threading.Event()
        publishers = [
            threading.Thread(target=paho_publisher, args=(broker.port, ledger, stop, "veh-1")),
            threading.Thread(target=cli_publisher, args=(broker.port, ledger, stop, "veh-2")),
        ]
        for t in publishers:
            t.start()
        try:
            kills = 0
            for round_no in range(6):
                wait_for(lambda r=round_no: gw.records() > 100 * (r + 1), 60,
                         "the MQTT sensor to journal")
                node = gw.node("sensor:mq0")
                os.kill(node["pid"], signal.SIGKILL)
                kills += 1
                wait_for(lambda old=node["pid"]: (n := gw.node("sensor:mq0"))["pid"]
                         not in (None, old) and n["state"] == "running", 60,
                         "the MQTT sensor to be restarted")
                if round_no == 2:
                    broker.stop()  # graceful: mosquitto saves its sessions and queues
                    broker.start()
        finally:
            stop.set()
            for t in publishers:
                t.join(60)
        assert kills == 6
        acked = set(ledger.acked)
        assert len(acked) > 500 and any(k[0] == "cli" for k in acked)
        # Everything acknowledged reaches the journal (the broker redelivers what the killed
        # incarnations had not acknowledged).
        wait_for(lambda: acked <= set(journaled(gw.data_dir)), 120,
                 "every acknowledged message to be journaled")
        counts = journaled(gw.data_dir)
        twice = {k: c for k, c in counts.items() if c > 1}
        assert not twice, f"journaled more than once: {sorted(twice)[:10]}"
        strangers = set(counts) - acked - ledger.unknown
        assert not strangers, f"journaled but never published: {sorted(strangers)[:10]}"
        # The journal knows what the broker's session is subscribed to (a restart with a
        # changed topic list subscribes the difference, also with MQTT 3.1.1).
        with JournalReader(os.path.join(gw.data_dir, "journal.db")) as reader:
            marks = reader.source_marks("mq0")
        assert json.loads(marks["mqtt:subscriptions"]) == ["fleet/+/engine"]
    finally:
        broker.stop()
