"""`fleetgw bench mqtt`: how fast do MQTT messages get from the broker into the journal?

Where this sits: outside the gateway, beside the other benchmarks. A real gateway runs its own
local mosquitto ([broker]) and one MQTT sensor subscribed with QoS 1 (each PUBACK only after
the journal's commit). `mosquitto_sub` subscribes to the same topics with QoS 1 on the same
broker: the reference, a C client that acknowledges on receipt and stores nothing. Then
`mosquitto_pub -l` publishes N JSON messages at QoS 1 as fast as the broker takes them, and both
rates are measured from the first publish to the last message in: for the gateway, the commit
time of the last journaled record (the journal's ``committed_ns``); for `mosquitto_sub`, when
it printed the last message. The ratio says what journaling every message durably before
acknowledging it costs beside a subscriber that only receives (bar: >= 0.5).

Afterwards the journal must hold each message exactly once: the figures are only printed for a
run that lost and doubled nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import apsw

from tools.bench import print_result, start_gateway
from tools.demo import free_port

TOPIC = "bench/veh-{v}/engine"
SUBSCRIPTION = "bench/+/engine"
SENSOR = "mq0"


def _config(admin_port: int, broker_port: int) -> str:
    return "\n".join([
        "[gateway]", f"admin_port = {admin_port}", "status_interval_s = 0",
        "[journal]", "disk_budget_bytes = 8589934592",
        "[model]", "enabled = false",
        "[broker]", "enabled = true", f"port = {broker_port}",
        "[[sensors]]", f'id = "{SENSOR}"', 'type = "mqtt"',
        "[sensors.mqtt]",
        f'topics = [{{ filter = "{SUBSCRIPTION}", device = "{{2}}", kind = "engine", '
        'decoder = { ts_field = "ts", ts_unit = "ms" } }]',
    ]) + "\n"


def _payloads(n: int, vehicles: int) -> list[tuple[int, bytes]]:
    """(vehicle, line) pairs: realistic engine telemetry, ~90 bytes of JSON each."""
    start_ms = int(time.time() * 1000)
    out = []
    for i in range(n):
        v = i % vehicles
        line = (f'{{"ts":{start_ms + i},"n":{i},"rpm":{800 + (i * 37) % 5200},'
                f'"speed_kmh":{(i * 13) % 130}.5,"coolant_c":{70 + i % 30}.25,'
                f'"throttle_pct":{i % 100}}}')
        out.append((v, line.encode()))
    return out


def _journaled(db_path: str, distinct: bool = False) -> tuple[int, int, int | None]:
    """(records of the bench sensor, distinct n values — only counted when asked: it reads
    every payload —, last commit time in ns)."""
    db = apsw.Connection(db_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        db.set_busy_timeout(5000)
        n_distinct = "count(DISTINCT json_extract(payload, '$.n'))" if distinct else "0"
        count, n, last = db.execute(
            f"SELECT count(*), {n_distinct}, max(committed_ns) "
            "FROM records WHERE sensor_id = ? AND kind = 'engine'", (SENSOR,)).fetchone()
        return count, n, last
    finally:
        db.close()


class _SubTimes:
    """Reads `mosquitto_sub`'s output: how many messages and when the last one came."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.count = 0
        self.last_ns: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for _line in self.proc.stdout:
            self.count += 1
            self.last_ns = time.time_ns()


def _wait(predicate, timeout_s: float, what: str) -> None:
    """Poll ``predicate`` (every 0.25 s: the bench must not take the gateway's CPU)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench mqtt: timed out waiting for {what}")
        time.sleep(0.25)


def run_bench(messages: int, vehicles: int, admin_port: int) -> dict:
    for tool in ("mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (Debian: apt-get install "
                               "mosquitto mosquitto-clients)")
    workdir = tempfile.mkdtemp(prefix="fleetgw-bench-mqtt-")
    broker_port = free_port()
    gw = start_gateway(workdir, "gw", _config(admin_port, broker_port), admin_port)
    sub = None
    try:
        db_path = os.path.join(workdir, "gw", "journal.db")
        from tools.bench import _tree, _walk

        def sensor_connected() -> bool:
            try:
                nodes = {n["name"]: n for n in _walk(_tree(admin_port))}
            except Exception:
                return False
            node = nodes.get(f"sensor:{SENSOR}")
            return bool(node and node["figures"].get("mqtt_state") == "connected")

        _wait(sensor_connected, 60, "the gateway's MQTT sensor to connect to its broker")
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker_port), "-q", "1",
             "-t", SUBSCRIPTION, "-i", "fleetgw-bench-sub"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sub_times = _SubTimes(sub)
        # A warm-up message both subscribers must receive before the clock starts (so
        # mosquitto_sub has surely subscribed); it is not counted.
        warmup = f'{{"ts":{int(time.time() * 1000)},"n":-1,"rpm":0}}'

        def warmed_up() -> bool:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker_port), "-q",
                            "1", "-t", TOPIC.format(v="warmup"), "-m", warmup],
                           capture_output=True, timeout=30)
            return sub_times.count >= 1 and _journaled(db_path)[0] >= 1

        _wait(warmed_up, 60, "both subscribers to receive the warm-up message")
        time.sleep(0.5)  # let extra warm-up messages (sent while waiting) arrive
        base_sub, base_journal = sub_times.count, _journaled(db_path)[0]
        payloads = _payloads(messages, vehicles)
        pubs = []
        started_ns = time.time_ns()
        for v in range(vehicles):
            body = b"\n".join(line for vv, line in payloads if vv == v) + b"\n"
            pub = subprocess.Popen(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker_port), "-q", "1",
                 "-t", TOPIC.format(v=v), "-l"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            pubs.append((pub, body))
        for pub, body in pubs:
            threading.Thread(target=pub.communicate, args=(body,), daemon=True).start()
        timeout = 60 + messages / 1000
        _wait(lambda: _journaled(db_path)[0] >= base_journal + messages, timeout,
              f"{messages} messages in the journal")
        _wait(lambda: sub_times.count >= base_sub + messages, timeout,
              "mosquitto_sub to receive them all")
        for pub, _body in pubs:
            pub.wait(timeout=60)
        # A moment for anything extra (a duplicate) to land before counting.
        time.sleep(1.0)
        count, distinct, last_commit_ns = _journaled(db_path, distinct=True)
        count, distinct = count - base_journal, distinct - 1  # the warm-up messages
        if count != messages or distinct != messages:
            raise RuntimeError(f"bench mqtt: the journal holds {count} records of "
                               f"{distinct} distinct messages, expected {messages} once each")
        if sub_times.count != base_sub + messages:
            raise RuntimeError(f"bench mqtt: mosquitto_sub received {sub_times.count - base_sub}"
                               f" messages, expected {messages}")
        assert last_commit_ns is not None and sub_times.last_ns is not None
        journaled_s = (last_commit_ns - started_ns) / 1e9
        sub_s = (sub_times.last_ns - started_ns) / 1e9
        journaled_per_s = messages / journaled_s
        sub_per_s = messages / sub_s
        figures = _sensor_figures(admin_port)
        return {
            "messages": messages,
            "publishers": vehicles,
            "journaled_per_s": round(journaled_per_s),
            "mosquitto_sub_per_s": round(sub_per_s),
            "ratio": round(journaled_per_s / sub_per_s, 3),
            "journaled_once": True,
            "journal_batches": figures.get("acked_batches"),
            "ack_ms_p50": figures.get("ack_ms_p50"),
            "ack_ms_p99": figures.get("ack_ms_p99"),
            "python": sys.version.split()[0],
        }
    finally:
        if sub is not None and sub.poll() is None:
            sub.kill()
        gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _sensor_figures(port: int) -> dict:
    from tools.bench import _tree, _walk

    for node in _walk(_tree(port)):
        if node["name"] == f"sensor:{SENSOR}":
            return node["figures"]
    return {}


def bench_mqtt_command(messages: int, vehicles: int, admin_port: int, as_json: bool) -> int:
    print_result(run_bench(messages, vehicles, admin_port), as_json)
    return 0
