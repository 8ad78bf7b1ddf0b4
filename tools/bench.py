"""`fleetgw bench journal`: sustained durable journaling through the actors, beside the raw
apsw batched-insert rate of the same rows measured in the same run.

Where this sits: outside the gateway. It runs a real `fleetgw run` (several simulated sensors
-> the JournalWriter actor, synchronous=FULL) in a temporary data dir and reads its figures
through the inspector; then it inserts the very rows that run journaled into a bare table with
plain apsw (500 rows a transaction, WAL, synchronous=FULL) and prints both and their ratio.

Two phases: throughput with the sensors saturating the journal (what the journal sustains),
then ack latency at a steady offered load of half that throughput (what a sensor sees in
normal operation; at saturation latency only measures queue length).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import apsw
import psutil

from actors.sensors.actor import LATENCY_WINDOW_S
from supervisors import system
from tools.gateway_process import GatewayProcess
from tools.harness.rig import walk

RAW_BATCH = 500
#: Seconds to let a freshly started gateway settle before measuring.
WARM_UP_S = 2.0
#: Shortest measuring window of a phase, whatever --seconds says.
MIN_PHASE_S = 3.0


def _config(sensors: int, rate_hz: float, port: int, sealed: bool = False) -> str:
    lines = [
        "[gateway]", 'device_id = "bench-001"', f"admin_port = {port}", "status_interval_s = 0",
        "[journal]", 'synchronous = "FULL"', "disk_budget_bytes = 8589934592",
    ]
    if sealed:  # encryption at rest (the key is made on the first start)
        lines.append('key_file = "journal.key"')
    for i in range(sensors):
        lines += [
            "[[sensors]]", f'id = "imu{i}"', 'kind = "imu"', f"rate_hz = {rate_hz}",
            f"seed = {i + 1}", f'device_id = "bench-{i:03d}"', "batch_max_readings = 500",
            "batch_max_age_s = 0.02", "max_in_flight = 4",
        ]
    return "\n".join(lines) + "\n"


def _tree(port: int) -> dict:
    """The gateway's tree through the real inspector, in its own process (a process attaches
    to one actor system only, and the two phases use two)."""
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli", "topology", "--json", "--admin-port", str(port)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


def _journal_records(port: int) -> tuple[float, int]:
    journal = next(n for n in walk(_tree(port)) if n["name"] == "journal")
    return time.monotonic(), int(journal["figures"]["records"])


def _wait_records(port: int, minimum: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.SubprocessError, StopIteration, KeyError):
            if _journal_records(port)[1] >= minimum:
                return
        time.sleep(0.2)
    raise RuntimeError("the gateway did not start journaling in time")


def _memory(pid: int, pgid: int | None) -> tuple[float, float]:
    procs = [psutil.Process(pid)]
    if pgid:
        procs += system.group_members(pgid)
    rss = uss = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            rss += info.rss
            uss += info.uss
    return rss / 2**20, uss / 2**20


def _latencies(port: int) -> tuple[float, float]:
    p50s, p99s = [], []
    for node in walk(_tree(port)):
        figures = node["figures"]
        if "ack_ms_p99" in figures:
            p50s.append(figures["ack_ms_p50"])
            p99s.append(figures["ack_ms_p99"])
    return sorted(p50s)[len(p50s) // 2], max(p99s)


def start_gateway(workdir: str, name: str, config: str, port: int) -> GatewayProcess:
    data_dir = os.path.join(workdir, name)
    config_path = os.path.join(workdir, f"{name}.toml")
    with open(config_path, "w") as fh:
        fh.write(config)
    return GatewayProcess(config_path, data_dir, port).start()


def raw_apsw_rate(source_db: str, workdir: str, max_rows: int = 300_000) -> float:
    """Rows/s of plain apsw inserting the rows the gateway journaled, 500 a transaction."""
    src = apsw.Connection(source_db, flags=apsw.SQLITE_OPEN_READONLY)
    rows = list(src.execute(
        "SELECT device_id, seq, sensor_id, ts, kind, payload FROM records ORDER BY pos LIMIT ?",
        (max_rows,)))
    src.close()
    path = os.path.join(workdir, "raw.db")
    db = apsw.Connection(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (pos INTEGER PRIMARY KEY, device_id TEXT, seq INTEGER, "
               "sensor_id TEXT, ts INTEGER, kind TEXT, payload TEXT, UNIQUE(device_id, seq))")
    started = time.perf_counter()
    for i in range(0, len(rows), RAW_BATCH):
        with db:
            db.executemany("INSERT INTO t (device_id, seq, sensor_id, ts, kind, payload) "
                           "VALUES (?, ?, ?, ?, ?, ?)", rows[i:i + RAW_BATCH])
    elapsed = time.perf_counter() - started
    db.close()
    return len(rows) / elapsed


def run_bench(seconds: float, sensors: int, rate: float | None, port: int,
              sealed: bool = False) -> dict:
    workdir = tempfile.mkdtemp(prefix="fleetgw-bench-")
    try:
        # Phase 1: saturate the journal.
        offered = rate or 1_000_000.0
        gw = start_gateway(workdir, "throughput", _config(sensors, offered, port, sealed), port)
        try:
            _wait_records(port, 5000, 60)
            time.sleep(WARM_UP_S)  # let the queues settle
            t0, n0 = _journal_records(port)
            time.sleep(max(seconds / 2, MIN_PHASE_S))
            t1, n1 = _journal_records(port)
            rss, uss = _memory(gw.proc.pid, gw.pgid())
        finally:
            gw.stop()
        readings_per_s = (n1 - n0) / (t1 - t0)
        raw = raw_apsw_rate(gw.journal_path, workdir)
        # Phase 2: ack latency at half the sustained rate.
        steady = max(10.0, readings_per_s / 2 / sensors)
        gw2 = start_gateway(workdir, "latency", _config(sensors, steady, port + 1, sealed),
                            port + 1)
        try:
            _wait_records(port + 1, 1000, 60)
            # The sensors report latency over their last LATENCY_WINDOW_S: let the window see
            # only the steady state.
            time.sleep(WARM_UP_S + max(seconds / 2, LATENCY_WINDOW_S + 0.5))
            p50, p99 = _latencies(port + 1)
        finally:
            gw2.stop()
        return {
            "readings_per_s": round(readings_per_s),
            "raw_apsw_rows_per_s": round(raw),
            "ratio": round(readings_per_s / raw, 3),
            "ack_latency_ms_p50": p50,
            "ack_latency_ms_p99": p99,
            "latency_offered_readings_per_s": round(steady * sensors),
            "rss_mb_total": round(rss, 1),
            "uss_mb_total": round(uss, 1),
            "sensors": sensors,
            "seconds": seconds,
            "synchronous": "FULL",
            "payloads": "sealed" if sealed else "clear",
            "cpus": os.cpu_count(),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_result(result: dict, as_json: bool) -> None:
    """A benchmark's figures: one JSON object, or one ``name value`` line each."""
    if as_json:
        print(json.dumps(result))
    else:
        width = max(map(len, result)) + 2
        for key, value in result.items():
            print(f"{key:{width}} {value}")


def bench_journal_command(seconds: float, sensors: int, rate: float | None, port: int,
                          sealed: bool, as_json: bool) -> int:
    print_result(run_bench(seconds, sensors, rate, port, sealed), as_json)
    return 0
