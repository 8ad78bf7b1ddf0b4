"""The router in a running gateway: every record routed exactly once across crashes, aggregates
complete and not duplicated, bad policies refused at start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict

import apsw
import pytest

from tests.system.harness import ROOT, wait_for

pytestmark = pytest.mark.system

LOAD = [
    {"id": "imu0", "kind": "imu", "rate_hz": 200, "seed": 1},
    {"id": "gps0", "kind": "gps", "rate_hz": 5, "seed": 2, "batch_max_age_s": 0.05},
    {"id": "engine0", "kind": "engine", "rate_hz": 50, "seed": 3},
]
# Short aggregation windows so windows close many times during a short test.
POLICY = """
[[rules]]
name = "harsh-braking"
kind = "imu"
when = "ax < -4.4"
lane = "P1"

[[rules]]
name = "gps-track"
kind = "gps"
lane = "P2"
dedup = { window_s = 5, fields = ["fix", "sats"] }

[[rules]]
name = "engine-metrics"
kind = "engine"
lane = "P3"
aggregate = { window_s = 1, stats = ["count", "min", "max", "mean", "median", "last"] }

[[rules]]
name = "imu-metrics"
kind = "imu"
lane = "P3"
aggregate = { window_s = 1, stats = ["count", "mean", "max"] }

[default]
lane = "P3"
"""


def routing(journal_path: str):
    db = apsw.Connection(journal_path, flags=apsw.SQLITE_OPEN_READONLY)
    rows = db.execute("SELECT pos, kind, lane, rule, drop_reason FROM records").fetchall()
    aggs = db.execute("SELECT sensor_id, device_id, payload FROM records "
                      "WHERE kind LIKE 'agg:%'").fetchall()
    cursor = db.execute("SELECT pos FROM cursors WHERE consumer = 'router'").fetchone()
    db.close()
    return rows, aggs, cursor[0] if cursor else 0


def test_router_sigkilled_repeatedly_routes_every_record_exactly_once(make_gateway, tmp_path):
    import json

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    gw = make_gateway(sensors=LOAD, router={"policy": str(policy), "batch_records": 300}).start()
    for _ in range(5):
        wait_for(lambda: gw.node("router")["figures"]["commits"] > 2, 30, "the router to route")
        os.kill(gw.node("router")["pid"], signal.SIGKILL)
        wait_for(lambda: gw.node("router")["state"] == "running"
                 and gw.node("router")["figures"]["commits"] > 0, 30, "the router to resume")
    # Let it catch up, then stop in order.
    wait_for(lambda: gw.node("router")["figures"]["backlog"] == 0, 60, "the router to catch up")
    assert gw.terminate() == 0
    rows, aggs, cursor = routing(gw.journal_path)
    raw = [r for r in rows if not r[1].startswith("agg:")]
    routed = [r for r in raw if r[0] <= cursor]
    # Everything up to the cursor has a lane (exactly once: decisions of a resend are ignored).
    assert routed and all(r[2] is not None for r in routed)
    assert all(r[2] == "P3" for r in rows if r[1].startswith("agg:"))
    # Aggregates: per stream, the raw records they cover never overlap, and their counts add up
    # to the raw P3 records of closed windows — none emitted twice, none lost.
    covered = defaultdict(list)
    for sensor, device, payload in aggs:
        v = json.loads(payload)
        covered[(device, sensor)].append((v["first_pos"], v["last_pos"], v["count"]))
    engine_raw = Counter(r[0] for r in routed if r[3] == "engine-metrics")
    for spans in covered.values():
        spans.sort()
        for (_a_lo, a_hi, _), (b_lo, _b_hi, _) in zip(spans, spans[1:], strict=False):
            assert a_hi < b_lo, "two aggregates cover the same raw record"
    engine_spans = covered[("veh-001", "engine0")]
    assert engine_spans, "engine windows closed during the test"
    counted = sum(n for _lo, _hi, n in engine_spans)
    in_spans = sum(1 for pos in engine_raw if any(lo <= pos <= hi for lo, hi, _ in engine_spans))
    assert counted == in_spans


def test_bad_policy_file_is_refused_at_start_with_the_rule_and_key(tmp_path):
    policy = tmp_path / "bad.toml"
    policy.write_text('[[rules]]\nname = "x"\nkind = "imu"\nlane = "P3"\n'
                      'aggregate = { window_s = 0 }\n[default]\nlane = "P9"\n')
    config = tmp_path / "gw.toml"
    config.write_text(f'[router]\npolicy = "{policy}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "run", "--config", str(config),
         "--data-dir", str(tmp_path / "d"), "--admin-port", "22998"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f'{policy}: rules[0] "x": aggregate' in result.stderr
    assert f"{policy}: default: lane" in result.stderr


BUDGET_POLICY = """
# Every GPS fix is P1 here: a steady ~1 KB/s of records that may never be evicted (nothing
# syncs them in this test), so P1 must keep finding room while everything else is evicted.
[[rules]]
name = "gps-as-safety"
kind = "gps"
lane = "P1"

[[rules]]
name = "engine-metrics"
kind = "engine"
lane = "P3"
aggregate = { window_s = 1, stats = ["count", "mean"] }

[[rules]]
name = "imu-metrics"
kind = "imu"
lane = "P3"
aggregate = { window_s = 1, stats = ["count", "mean", "max"] }

[default]
lane = "P3"
"""


def p1_records(journal_path: str) -> int:
    db = apsw.Connection(journal_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return db.execute("SELECT count(*) FROM records WHERE lane = 'P1'").fetchone()[0]
    finally:
        db.close()


def file_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def test_tiny_budget_under_full_load_keeps_p1_and_the_file_within_budget(make_gateway, tmp_path):
    import json
    import time

    seconds = float(os.environ.get("FLEETGW_BUDGET_TEST_S", "120"))
    budget = 3 << 20
    policy = tmp_path / "policy.toml"
    policy.write_text(BUDGET_POLICY)
    sensors = [{"id": "imu0", "kind": "imu", "rate_hz": 1000, "seed": 1},
               {"id": "imu1", "kind": "imu", "rate_hz": 1000, "seed": 2},
               {"id": "gps0", "kind": "gps", "rate_hz": 10, "seed": 3},
               {"id": "engine0", "kind": "engine", "rate_hz": 100, "seed": 4}]
    # A routing commit's page writes all go to the WAL before a checkpoint: on a 3 MiB budget
    # a 2000-record commit is a sixth of it, so consumers commit small batches here (under
    # CPU load a lagging router otherwise commits full batches and the WAL outgrows its
    # reserve; real budgets are hundreds of MiB).
    gw = make_gateway(sensors=sensors, router={"policy": str(policy), "batch_records": 250},
                      model={"batch_records": 250},
                      journal={"disk_budget_bytes": budget, "refused_retry_s": 0.2}).start()
    deadline = time.monotonic() + seconds
    p1_seen, biggest = [], 0
    while time.monotonic() < deadline:
        biggest = max(biggest, file_bytes(gw.journal_path))
        p1_seen.append(p1_records(gw.journal_path))
        time.sleep(1.0)
    assert biggest <= budget, f"journal files reached {biggest} bytes (budget {budget})"
    # P1 keeps being journaled through the last stretch, when the budget is long full.
    tail = p1_seen[len(p1_seen) * 2 // 3:]
    assert tail[-1] > tail[0], f"P1 stopped growing: {tail}"
    stats = json.loads(gw.cli("journal", "stats", "--db", gw.journal_path, "--json").stdout)
    evicted = {reason for reason, lanes in stats["drops"].items()
               if any(v["records"] for v in lanes.values())}
    assert evicted & {"aggregated", "oldest_p2", "synced", "expired", "policy_dropped"}, stats
    assert gw.terminate() == 0
    assert file_bytes(gw.journal_path) <= budget
    verify = gw.cli("journal", "verify", "--db", gw.journal_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
