"""Load for a gateway under test: acknowledged MQTT publishes, and floods of malformed input.

Where this sits: outside the gateway, feeding its sources the way real devices do. `MqttLoad`
publishes QoS 1 messages, each with a unique number, and keeps a ledger of what the broker
acknowledged (its PUBACK) — the acknowledged readings I1 is about; `journaled_numbers` reads
back which numbers the journal holds and how often. `flood_mqtt`, `flood_udp` send malformed
input (bytes no decoder accepts) to an MQTT topic or a UDP source (NMEA, CAN over UDP).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections import Counter

import paho.mqtt.client as paho

from actors.journal.keys import keyring_from
from actors.journal.reader import JournalReader
from messages.journal import START

#: Publishes per connection round: a round cut by a broker restart leaves only its own
#: unacknowledged messages unknown.
ROUND = 50


class MqttLoad:
    """QoS 1 publishes at ``rate_hz`` to ``topic`` (JSON ``{"n", "src", "ts"}``) from a thread.

    A message counts as acknowledged only when its PUBACK came back; one whose round was cut
    (the broker went away) is "unknown" and never resent (a resend would be another message).
    """

    def __init__(self, host: str, port: int, topic: str, rate_hz: float = 100.0,
                 src: str = "load") -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0 (got {rate_hz})")
        self.host, self.port, self.topic, self.rate_hz, self.src = host, port, topic, rate_hz, src
        self.acked: set[int] = set()
        self.unknown: set[int] = set()
        self.published = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> MqttLoad:
        self._thread = threading.Thread(target=self._run, daemon=True, name="mqtt-load")
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        n = 0
        period = 1.0 / self.rate_hz
        next_at = time.monotonic()
        while not self._stop.is_set():
            client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311,
                                 reconnect_on_failure=False)
            try:
                client.connect(self.host, self.port, keepalive=10)
            except OSError:
                self._stop.wait(0.1)  # the broker is (re)starting
                continue
            client.loop_start()
            infos = []
            for _ in range(ROUND):
                if self._stop.is_set():
                    break
                n += 1
                payload = json.dumps({"n": n, "src": self.src, "ts": time.time_ns()})
                infos.append((n, client.publish(self.topic, payload, qos=1)))
                with self._lock:
                    self.published += 1
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_at = time.monotonic()  # behind: do not burst to catch up
            for i, info in infos:
                with contextlib.suppress(RuntimeError, ValueError):  # the connection went
                    info.wait_for_publish(timeout=10)
                with self._lock:
                    (self.acked if info.is_published() else self.unknown).add(i)
            client.disconnect()
            client.loop_stop()


def journaled_numbers(data_dir: str, sensor_id: str, src: str = "load",
                      key_file: str = "") -> Counter:
    """n -> how many times the journal holds the `MqttLoad` message numbered n (``key_file``:
    the journal's, when its payloads are sealed)."""
    counts: Counter = Counter()
    with JournalReader(os.path.join(data_dir, "journal.db"), keyring_from(key_file)) as reader:
        pos = START
        while batch := reader.read(pos, 5000):
            for rec in batch:
                if rec.sensor_id == sensor_id and not rec.kind.startswith("agg:"):
                    values = rec.values
                    if values.get("src") == src and "n" in values:
                        counts[int(values["n"])] += 1
            pos = batch[-1].pos
    return counts


#: Payloads no decoder accepts: not JSON, truncated JSON, a bare number, binary.
MALFORMED = (b"{\"ts\": 1, \"v\": oops}", b"{\"ts\": 17", b"\xff\xfe\x00garbage", b"[1, 2",
             b"null", b"\x00" * 64)


def flood_mqtt(host: str, port: int, topic: str, count: int) -> int:
    """``count`` malformed QoS 1 payloads to ``topic``; returns how many the broker acked."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        infos = [client.publish(topic, MALFORMED[i % len(MALFORMED)], qos=1)
                 for i in range(count)]
        acked = 0
        for info in infos:
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=30)
            acked += info.is_published()
        return acked
    finally:
        client.disconnect()
        client.loop_stop()


#: Lines an NMEA source must quarantine: bad checksum, no checksum, binary, truncated.
MALFORMED_LINES = (b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*00\r\n",
                   b"$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W\r\n",
                   b"\x80\x81\x82\xff\r\n", b"$GPGGA,1235\r\n")


def flood_udp(host: str, port: int, count: int, payloads: tuple[bytes, ...] = MALFORMED_LINES,
              rate_hz: float = 5000.0) -> int:
    """``count`` malformed datagrams to a UDP source; returns how many were sent."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            sock.sendto(payloads[i % len(payloads)], (host, port))
            sent += 1
            if i % 100 == 99:
                time.sleep(100 / rate_hz)  # a fast flood, not a kernel buffer overrun
    return sent
