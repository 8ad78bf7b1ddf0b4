"""The router's steps in order (match -> sample -> dedup -> aggregate) over a simulated vehicle
under the example policy; its one JSON state makes a restarted router decide identically."""

import json

import pytest

from actors.journal.reader import Record
from actors.router.router import Router
from actors.router.verdict import KEPT, MOVED, NEAR, SAMPLED_OUT
from actors.sensors.sim import SimulatedSource
from config.policy import Lane, example_policy_path, load_policy, parse_policy
from messages.journal import Position
from messages.readings import encode_values
from tests.router import TS0, S, record

MINUTES = 6


def journal_records(minutes: int = MINUTES) -> list[Record]:
    """The demo vehicle's records in journal order: sensors' batches of 0.2 s interleaved, as
    the journal commits them, with positions and per-device seqs."""
    sources = [SimulatedSource(kind, rate, "veh-001", sensor, seed, TS0)
               for kind, sensor, rate, seed in (("imu", "imu0", 50, 1), ("gps", "gps0", 1, 2),
                                                ("engine", "engine0", 10, 3))]
    out: list[Record] = []
    for tick in range(1, minutes * 60 * 5 + 1):
        now = TS0 + tick * S // 5
        for source in sources:
            for r in source.due(now, 1000):
                n = len(out) + 1
                out.append(Record(Position(n), r.device_id, n, r.sensor_id, r.ts, r.kind,
                                  encode_values(r.values)))
    return out


@pytest.fixture(scope="module")
def stream() -> list[Record]:
    return journal_records()


def test_simulated_vehicle_routes_into_the_documented_lanes(stream):
    router = Router(load_policy(example_policy_path()))
    routed = [router.route(r) for r in stream]
    tail = router.flush(2**62)
    by_rule: dict[str, list] = {}
    for r, out in zip(stream, routed, strict=True):
        by_rule.setdefault(out.decision.name, []).append((r, out))
    # every engine record is in exactly one aggregate, and P3 keeps them all locally
    engine = by_rule["engine-metrics"]
    aggregates = [a for _, o in engine for a in o.aggregates] + [
        a for a in tail if a.rule == "engine-metrics"]
    assert sum(a.count for a in aggregates) == len(engine) == MINUTES * 60 * 10 + 1
    assert all(a.count == 100 and not a.late for a in aggregates[:-1])  # 10 s at 10 Hz
    assert aggregates[-1].count == 1  # the reading at exactly the end opened a new window
    assert all(o.keep and o.verdict.reason == KEPT and o.lane is Lane.P3 for _, o in engine)
    first = aggregates[0].to_reading()
    assert first.kind == "agg:engine-metrics" and "coolant_c.median" in first.values
    # gps: sampled while standing, deduplicated by distance while moving
    gps = by_rule["gps-track"]
    kept = [o for _, o in gps if o.keep]
    reasons = {o.verdict.reason for _, o in gps}
    assert {SAMPLED_OUT, NEAR, MOVED} <= reasons and len(kept) < len(gps) / 2
    assert all(o.lane is Lane.P2 for _, o in gps)
    # harsh braking samples (if the drive had any) are P1 and always kept
    for _, o in by_rule.get("harsh-braking", []):
        assert o.lane is Lane.P1 and o.keep and o.aggregates == ()
    imu = [a for _, o in by_rule["imu-metrics"] for a in o.aggregates]
    assert imu and set(imu[0].fields) == {"ax", "ay", "az", "gx", "gy", "gz"}
    assert set(imu[0].fields["ax"]) == {"min", "max", "mean", "last"}


def test_restarted_router_decides_exactly_as_an_uninterrupted_one(stream):
    policy = load_policy(example_policy_path())
    straight = Router(policy)
    expected = [straight.route(r) for r in stream]
    resumed, got = Router(policy), []
    for i, r in enumerate(stream):
        if i % 4001 == 4000:  # a crash: state persisted with the cursor, then restored
            resumed = Router.from_state(policy, json.loads(json.dumps(resumed.to_state())))
        got.append(resumed.route(r))
    assert got == expected
    assert resumed.to_state() == straight.to_state()


def test_sampling_drops_before_dedup_and_dedup_before_aggregation():
    policy = parse_policy({
        "rules": [{"name": "gps", "kind": "gps", "lane": "P2",
                   "sample": {"every_s": 10, "while": "speed_kmh < 1"},
                   "dedup": {"window_s": 60, "min_distance_m": 10}}],
        "default": {"lane": "P3", "aggregate": {"window_s": 10, "stats": ["count"]}},
    })
    router = Router(policy)
    still = {"lat": 48.1, "lon": 11.5, "speed_kmh": 0.0}
    assert router.route(record(1, TS0, still, kind="gps")).keep
    assert router.route(record(2, TS0 + S, still, kind="gps")).verdict.reason == SAMPLED_OUT
    creeping = {"lat": 48.1, "lon": 11.5, "speed_kmh": 3.0}  # not sampled, but has not moved
    out = router.route(record(3, TS0 + 2 * S, creeping, kind="gps"))
    assert (out.keep, out.verdict.reason) == (False, NEAR)
    # the default aggregates what no rule matched
    router.route(record(4, TS0, {"x": 1}, kind="dtc"))
    (agg,) = router.flush(TS0 + 20 * S)
    assert agg.rule == "default" and agg.fields == {"x": {"count": 1}}
