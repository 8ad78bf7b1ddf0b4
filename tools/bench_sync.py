"""`fleetgw bench sync`: P1 latency while a P3 backlog drains, drain goodput, receiver rate.

Where this sits: outside the gateway, beside the other benches. Three figures, each beside its
reference measured in the same run:

1. P1 latency, sensor to visible in ClickHouse, while a large P3 backlog drains. A real gateway
   (``fleetgw run``) posts through a real TCP link (`tools.link_proxy.LinkProxy`) to a real
   receiver process storing in chdb. The link is cut for ``backlog_s`` while a bulk engine
   sensor fills P3; then it comes back with a P2/P3 token bucket of ``rate_bytes_s``, while a
   safety sensor's readings go P1 (policy rule) on P1's reserved budget. A P1 reading is
   visible when the receiver logged its batch's request: that line is written after the
   insert and before the reply (millisecond timestamps, same clock as the sensor's). Bar:
   p99 < 250 ms on loopback.
2. Drain goodput: compressed P3 body bytes the receiver stored per second while the backlog
   lasted (between the second P3 batch, past the bucket's burst, and the last full one),
   beside the bucket's rate. Bar: >= 0.9.
3. Receiver rows/s (`central.receiver.Receiver.accept`: signature, hash, decompress, decode,
   dedup check, Native insert into chdb) beside raw chdb Native inserts of the same rows into
   a plain copy of the table — in this process, after the gateway run, on batches of the demo
   vehicle's simulated drive (`tools.bench_wire.simulate_drive`).

At the end `fleetgw reconcile` checks I5 on the gateway's journal against the receiver's data.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import apsw
import nacl.signing

from tools.bench import _wait_records, print_result
from tools.central_process import CentralProcess, write_device_key
from tools.gateway_process import ROOT, GatewayProcess
from tools.link_proxy import LinkProxy

DEVICE = "veh-001"
BATCH_RECORDS = 5000
P1_BAR_MS = 250.0
GOODPUT_BAR = 0.9
POLICY = """
[[rules]]
name = "safety"
kind = "gps"
lane = "P1"

[default]
lane = "P3"
"""
LOG_RE = re.compile(r"^ts=(\S+) .*event=request method=POST .*status=200 result=(ok|duplicate) "
                    r"device=(\S+) generation=\S+ lane=(P[123]) seq=(\d+)-(\d+) rows=(\d+) "
                    r"bytes=(\d+)")


def _config(port: int, url: str, rate_hz: float, rate_bytes_s: float, policy: str) -> str:
    return f"""
[gateway]
device_id = "{DEVICE}"
admin_port = {port}
status_interval_s = 0
[journal]
disk_budget_bytes = 4294967296
[router]
policy = "{policy}"
poll_s = 0.02
[model]
enabled = false
[uplink]
url = "{url}"
link = "bench"
links = [{{ name = "bench", rate_bytes_s = {rate_bytes_s}, burst_bytes = 16384 }}]
p1_rate_bytes_s = 262144
max_records = {BATCH_RECORDS}
p3_linger_s = 1.0
backoff_base_s = 0.2
backoff_cap_s = 1.0
poll_s = 0.2
[[sensors]]
id = "bulk0"
kind = "engine"
rate_hz = {rate_hz}
seed = 3
[[sensors]]
id = "safety0"
kind = "gps"
rate_hz = 10
seed = 2
batch_max_age_s = 0.01
"""


def _requests(log_text: str) -> list[dict]:
    """The receiver's stored batches: time logged (epoch s), lane, seq range, rows, bytes."""
    out = []
    for line in log_text.splitlines():
        m = LOG_RE.match(line)
        if m and m.group(3) == DEVICE:
            at = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=dt.UTC).timestamp()
            out.append({"at": at, "result": m.group(2), "lane": m.group(4),
                        "lo": int(m.group(5)), "hi": int(m.group(6)), "rows": int(m.group(7)),
                        "bytes": int(m.group(8))})
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def p1_latencies(journal: str, requests: list[dict], since: float, until: float) -> list[float]:
    """Milliseconds from each P1 reading's sensor time to its batch's receiver log line, for
    readings taken between ``since`` and ``until`` (epoch s)."""
    db = apsw.Connection(journal, flags=apsw.SQLITE_OPEN_READONLY)
    rows = db.execute("SELECT seq, ts FROM records WHERE lane = 'P1' AND device_id = ? AND "
                      "ts BETWEEN ? AND ?", (DEVICE, int(since * 1e9), int(until * 1e9)))
    p1 = sorted((r for r in requests if r["lane"] == "P1"), key=lambda r: r["at"])
    latencies = []
    for seq, ts in rows:
        seen = next((r["at"] for r in p1 if r["lo"] <= seq <= r["hi"]), None)
        if seen is not None:
            latencies.append((seen - ts / 1e9) * 1000)
    db.close()
    return latencies


def drain_goodput(requests: list[dict], since: float) -> tuple[float, float, int]:
    """(bytes/s, seconds, batches) of P3 bodies stored after ``since`` while the backlog
    lasted: from the second P3 batch (the first may ride the bucket's burst) to the last full
    one."""
    p3 = sorted((r for r in requests if r["lane"] == "P3" and r["at"] >= since
                 and r["result"] == "ok"), key=lambda r: r["at"])
    full = [i for i, r in enumerate(p3) if r["rows"] == BATCH_RECORDS]
    if len(full) < 3:
        raise RuntimeError(f"the P3 backlog drained in {len(full)} full batches: raise "
                           "--backlog-s or lower --rate-bytes")
    window = p3[1:full[-1] + 1]
    seconds = window[-1]["at"] - window[0]["at"]
    return sum(r["bytes"] for r in window[1:]) / seconds, seconds, len(window)


def receiver_rates(workdir: str, seconds: float = 600.0) -> dict:
    """Rows/s of `Receiver.accept` into chdb beside raw Native inserts of the same rows."""
    from central.backend import ChdbBackend
    from central.devices import DeviceRegistry
    from central.receiver import Receiver
    from central.schema import READINGS, TABLE_BY_NAME, record_block
    from tools.bench_wire import simulate_drive

    device_id, records = simulate_drive(seconds)
    key = nacl.signing.SigningKey(b"b" * 32)
    registry = DeviceRegistry(os.path.join(workdir, "devices"))
    registry.register(device_id, key.verify_key.encode().hex())
    from actors.uplink.envelope import HEADER, SIGNATURE, seal
    from actors.uplink.wire import encode

    batches = []
    for i in range(0, len(records), BATCH_RECORDS):
        chunk = records[i:i + BATCH_RECORDS]
        batches.append((chunk, seal(encode(device_id, chunk), key, gateway_id="bench",
                                    device_id=device_id, generation="g1", lane="P3",
                                    seq_lo=chunk[0].seq, seq_hi=chunk[-1].seq,
                                    count=len(chunk))))
    backend = ChdbBackend(os.path.join(workdir, "receiver.chdb"))
    try:
        backend.ensure_schema()
        receiver = Receiver(backend, registry, 64 << 20)
        started = time.perf_counter()
        for _, signed in batches:
            headers = signed.http_headers()
            reply = receiver.accept(headers[HEADER], headers[SIGNATURE], signed.body)
            assert reply.status == 200, reply.body
        accept_s = time.perf_counter() - started
        backend.query(f"CREATE TABLE raw_readings AS {READINGS}", "TSV")
        names = ", ".join(f"`{c.name}`" for c in TABLE_BY_NAME[READINGS].inserted)
        now = dt.datetime.now(dt.UTC)
        blocks = [record_block(READINGS, signed.header, chunk, now) for chunk, signed in batches]
        started = time.perf_counter()
        for block in blocks:
            backend._insert(f"INSERT INTO raw_readings ({names})", block)
        raw_s = time.perf_counter() - started
    finally:
        backend.close()
    return {"receiver_rows_per_s": round(len(records) / accept_s),
            "raw_chdb_native_rows_per_s": round(len(records) / raw_s),
            "receiver_ratio": round(raw_s / accept_s, 2), "receiver_rows": len(records)}


def _p3_backlog(journal: str) -> int:
    """Unsynced P3 records the router has routed."""
    from actors.journal.reader import JournalReader

    with JournalReader(journal) as reader:
        return sum(reader.lane_backlog("P3", reader.cursor("router")).values())


def run_bench(backlog_s: float, drain_s: float, rate_hz: float, rate_bytes_s: float,
              port: int, central_port: int) -> dict:
    workdir = tempfile.mkdtemp(prefix="fleetgw-bench-sync-")
    try:
        key = nacl.signing.SigningKey.generate()
        central = CentralProcess(os.path.join(workdir, "central"), central_port)
        central.register(DEVICE, key)
        data_dir = os.path.join(workdir, "data")
        write_device_key(os.path.join(data_dir, "keys"), DEVICE, key)
        link = LinkProxy(("127.0.0.1", central_port))
        link.cut()
        policy = os.path.join(workdir, "policy.toml")
        with open(policy, "w") as fh:
            fh.write(POLICY)
        config = os.path.join(workdir, "gateway.toml")
        with open(config, "w") as fh:
            fh.write(_config(port, link.url, rate_hz, rate_bytes_s, policy))
        central.start()
        gw = GatewayProcess(config, data_dir, port, os.path.join(workdir, "gateway.out"))
        gw.start()
        try:
            try:
                _wait_records(port, 1, 120)
            except Exception:
                with open(os.path.join(workdir, "gateway.out")) as fh:
                    raise RuntimeError(f"the gateway did not start: {fh.read()[-3000:]}") from None
            time.sleep(backlog_s)  # link cut: P3 piles up in the journal
            restored = time.time()
            link.restore()
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline and _p3_backlog(gw.journal_path) >= BATCH_RECORDS:
                time.sleep(0.5)  # drained: less than a full batch left
            drained = time.time()
            assert gw.terminate() == 0
        finally:
            gw.stop()
            link.close()
        central.stop()
        requests = _requests(central.output())
        latencies = p1_latencies(gw.journal_path, requests, restored + 1.0, drained)
        goodput, window_s, batches = drain_goodput(requests, restored)
        recon = subprocess.run(
            [sys.executable, "-m", "tools.cli", "reconcile", "--data-dir", data_dir,
             "--central-config", str(central.config_path), "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        rows = json.loads(recon.stdout)
        result = {
            "p1_latency_p50_ms": round(_percentile(latencies, 0.5), 1),
            "p1_latency_p99_ms": round(_percentile(latencies, 0.99), 1),
            "p1_latency_max_ms": round(max(latencies), 1),
            "p1_readings": len(latencies),
            "p1_bar_ms": P1_BAR_MS,
            "goodput_bytes_per_s": round(goodput),
            "bucket_rate_bytes_per_s": rate_bytes_s,
            "goodput_ratio": round(goodput / rate_bytes_s, 3),
            "goodput_bar": GOODPUT_BAR,
            "drain_window_s": round(window_s, 1),
            "drain_batches": batches,
            "backlog_records_at_restore": round(rate_hz * backlog_s),
            "drain_s": round(drained - restored, 1),
            "i5_ok": all(r["ok"] for r in rows),
            "synced_records": sum(r["synced"] for r in rows),
        }
        result.update(receiver_rates(workdir))
        result["cpus"] = os.cpu_count()
        return result
    finally:
        if os.environ.get("FLEETGW_BENCH_KEEP"):
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def bench_sync_command(backlog_s: float, drain_s: float, rate_hz: float, rate_bytes_s: float,
                       port: int, central_port: int, as_json: bool) -> int:
    result = run_bench(backlog_s, drain_s, rate_hz, rate_bytes_s, port, central_port)
    print_result(result, as_json)
    ok = (result["p1_latency_p99_ms"] < P1_BAR_MS and result["goodput_ratio"] >= GOODPUT_BAR
          and result["i5_ok"])
    return 0 if ok else 1
