"""The gateway's health as a reading: the snapshot's figures under stable value names, a valid
`Reading` of kind gateway_health, and figures the gateway does not have left out."""

from __future__ import annotations

from actors.journal.reader import DropStats, LaneBacklog
from actors.metrics.snapshot import HostFacts, JournalFacts, build_snapshot
from actors.sensors.health import KIND, HealthSource, health_values
from tests.journal import TS0
from tests.metrics import tree

NOW_NS = TS0 + 90 * 10**9
FACTS = JournalFacts(5000, 8 << 20, (DropStats("duplicate", "P2", 4, 400),),
                     (LaneBacklog("unrouted", 3, 300, TS0 + 89 * 10**9),
                      LaneBacklog("P1", 0, 0, None), LaneBacklog("P3", 400, 40000, TS0)),
                     NOW_NS, 0.01)
HOST = HostFacts(100, 25, 70, 61.25, (2.345, 1.0, 0.5))


def snapshot(journal=FACTS, host=HOST, **kwargs):
    return build_snapshot(tree(**kwargs), journal, host, device_id="veh-001",
                          budget_bytes=1 << 20, now_ns=NOW_NS)


def test_health_values_carry_the_snapshot_figures() -> None:
    assert health_values(snapshot()) == {
        "restarts_total": 3,
        "actors_down": 1,
        "journal_records": 5000,
        "journal_usage_bytes": 8 << 20,
        "commits_per_s": 12.5,
        "commit_ms_p99": 20.0,
        "drops_total": 4 + 11,
        "backlog_unrouted_records": 3, "backlog_unrouted_bytes": 300,
        "backlog_unrouted_oldest_s": 1.0,
        "backlog_p1_records": 0, "backlog_p1_bytes": 0, "backlog_p1_oldest_s": 0.0,
        "backlog_p3_records": 400, "backlog_p3_bytes": 40000, "backlog_p3_oldest_s": 90.0,
        "disk_used_fraction": 0.25,
        "cpu_temp_c": 61.2,
        "load1": 2.35,
        "inference_p99_us": 2100,
        "sync_failures": 2,
    }


def test_figures_the_gateway_does_not_have_are_left_out() -> None:
    values = health_values(snapshot(journal=None, host=HostFacts(), uplink=False, model=False))
    assert not values.keys() & {"cpu_temp_c", "disk_used_fraction", "load1",
                                "inference_p99_us", "sync_failures"}
    assert not [k for k in values if k.startswith("backlog_")]
    assert values["journal_records"] == 999 and values["restarts_total"] == 3


def test_the_reading_is_a_valid_gateway_health_reading_of_the_gateways_device() -> None:
    s = snapshot()
    reading = HealthSource("health", "veh-001").reading(s)
    assert (reading.device_id, reading.sensor_id, reading.kind, reading.ts) == (
        "veh-001", "health", KIND, NOW_NS)
    assert KIND == "gateway_health"
    assert dict(reading.values) == health_values(s)
