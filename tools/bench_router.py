"""`fleetgw bench router`: can the router keep up, and what does the policy save on the wire?

Where this sits: outside the gateway, beside `fleetgw bench journal`. Phase 1 drives a real
gateway (simulated vehicles, the example policy) and measures the journal's ingest rate. Phase
2 copies that journal with its routing undone (as if the router had been down the whole time)
and starts a gateway with no sensors on the copy: the router drains the backlog and its rate
is measured. The ratio says how much faster than ingest the router routes (bar: >= 1.5).
Finally the routed journal gives the bytes the policy keeps for sync against all raw bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import apsw

from tools.bench import (
    _journal_records,
    _tree,
    _wait_records,
    _walk,
    print_result,
    start_gateway,
)

#: Sensors of one simulated vehicle: the demo's, at realistic rates.
VEHICLE = [("imu0", "imu", 100), ("gps0", "gps", 1), ("engine0", "engine", 10)]
#: Per-record overhead on the wire beside the payload (device, seq, ts, kind, framing).
RECORD_OVERHEAD = 40


def _config(vehicles: int, port: int, with_sensors: bool) -> str:
    lines = ["[gateway]", f"admin_port = {port}", "status_interval_s = 0",
             "[journal]", "disk_budget_bytes = 8589934592", "[router]", "batch_records = 2000"]
    if with_sensors:
        for v in range(vehicles):
            for sid, kind, rate in VEHICLE:
                lines += ["[[sensors]]", f'id = "{sid}-{v}"', f'kind = "{kind}"',
                          f"rate_hz = {rate * 10}", f'device_id = "veh-{v:03d}"',
                          f"seed = {v * 10 + len(sid)}"]
    return "\n".join(lines) + "\n"


def _router(port: int) -> dict:
    return next(n for n in _walk(_tree(port)) if n["name"] == "router")["figures"]


def _undo_routing(path: str) -> None:
    """The copied journal as if the router had never run: lanes, aggregates and its cursor
    gone (the copy is ours alone: no gateway writes it while we do)."""
    db = apsw.Connection(path)
    with db:
        db.execute("DELETE FROM records WHERE kind LIKE 'agg:%'")
        db.execute("UPDATE records SET lane = NULL, rule = NULL, drop_reason = NULL, "
                   "expires_ns = NULL, aggregated = NULL")
        db.execute("DELETE FROM cursors WHERE consumer = 'router'")
        db.execute("DELETE FROM drops")
    db.close()


def _wire_bytes(path: str) -> tuple[int, int]:
    """(all raw records' bytes, bytes the policy sends: P1, P2 kept, P3 aggregates)."""
    db = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    raw = db.execute("SELECT coalesce(sum(length(payload)), 0) + count(*) * ? FROM records "
                     "WHERE kind NOT LIKE 'agg:%'", (RECORD_OVERHEAD,)).fetchone()[0]
    synced = db.execute(
        "SELECT coalesce(sum(length(payload)), 0) + count(*) * ? FROM records WHERE "
        "drop_reason IS NULL AND (lane IN ('P1', 'P2') OR (lane = 'P3' AND kind LIKE 'agg:%'))",
        (RECORD_OVERHEAD,)).fetchone()[0]
    db.close()
    return raw, synced


def run_bench(seconds: float, vehicles: int, port: int) -> dict:
    workdir = tempfile.mkdtemp(prefix="fleetgw-bench-router-")
    try:
        gw = start_gateway(workdir, "ingest", _config(vehicles, port, True), port)
        try:
            _wait_records(port, 1000, 60)
            t0, n0 = _journal_records(port)
            time.sleep(max(seconds / 2, 3.0))
            t1, n1 = _journal_records(port)
        finally:
            gw.stop()
        ingest_per_s = (n1 - n0) / (t1 - t0)
        # Phase 2: the same records, all unrouted, drained by a router with nothing else to do.
        backlog_dir = os.path.join(workdir, "backlog")
        os.makedirs(backlog_dir)
        shutil.copy(gw.journal_path, os.path.join(backlog_dir, "journal.db"))
        _undo_routing(os.path.join(backlog_dir, "journal.db"))
        config = os.path.join(workdir, "backlog.toml")
        with open(config, "w") as fh:
            fh.write(_config(vehicles, port + 1, False))
        from tools.gateway_process import GatewayProcess

        gw2 = GatewayProcess(config, backlog_dir, port + 1).start()
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    first = _router(port + 1)
                    if first.get("commits", 0) > 0:
                        break
                except Exception:  # not up yet
                    pass
                time.sleep(0.2)
            r0, c0 = time.monotonic(), first["cursor"]
            while time.monotonic() < deadline:
                figures = _router(port + 1)
                if figures["backlog"] == 0:
                    break
                time.sleep(0.5)
            r1, c1 = time.monotonic(), figures["cursor"]
        finally:
            gw2.stop()
        routed_per_s = (c1 - c0) / (r1 - r0)
        raw_bytes, synced_bytes = _wire_bytes(gw2.journal_path)
        return {
            "routed_per_s": round(routed_per_s),
            "ingest_per_s": round(ingest_per_s),
            "ratio": round(routed_per_s / ingest_per_s, 2),
            "raw_bytes": raw_bytes,
            "synced_bytes": synced_bytes,
            "byte_reduction": round(1 - synced_bytes / raw_bytes, 3) if raw_bytes else None,
            "records": c1,
            "vehicles": vehicles,
            "policy": "config/policy.example.toml",
            "cpus": os.cpu_count(),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bench_router_command(seconds: float, vehicles: int, port: int, as_json: bool) -> int:
    print_result(run_bench(seconds, vehicles, port), as_json)
    return 0
