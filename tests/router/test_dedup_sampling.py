"""Dedup and sampling: only what provably repeats is dropped, per stream, and the state survives
a restart (to_state -> JSON -> from_state) without changing any decision."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.router.dedup import Deduplicator, distance_m, same_value
from actors.router.predicates import Predicate
from actors.router.sampling import Sampler
from actors.router.verdict import (
    CHANGED,
    DUPLICATE,
    FIRST,
    MOVED,
    NEAR,
    NO_POSITION,
    NOT_SAMPLED,
    SAMPLED,
    SAMPLED_OUT,
    WINDOW,
)
from config.policy import DedupSpec, Lane, Rule, SampleSpec
from tests.router import TS0, S, record

LAT0, LON0 = 48.137, 11.575
M_PER_DEG_LAT = distance_m(0.0, 0.0, 1.0, 0.0)


def p2(dedup: DedupSpec) -> Rule:
    return Rule("gps-track", 0, Lane.P2, dedup=dedup)


def sampled(every_s: float, while_: str | None = None) -> Rule:
    return Rule("gps-track", 0, Lane.P2,
                sample=SampleSpec(every_s, None if while_ is None else Predicate.parse(while_)))


def offer(dedup, rule, pos, ts, values, **kw):
    return dedup.offer(record(pos, ts, values, **kw), rule, values)


def test_distance_is_great_circle_metres():
    assert pytest.approx(111_195, abs=1) == M_PER_DEG_LAT
    assert distance_m(LAT0, LON0, LAT0, LON0) == 0.0
    assert distance_m(LAT0, LON0, LAT0 + 10 / M_PER_DEG_LAT, LON0) == pytest.approx(10, rel=1e-6)


def test_identical_record_within_window_is_dropped_then_kept_after_it():
    dedup, rule = Deduplicator(), p2(DedupSpec(window_s=10))
    v = {"fix": 2, "sats": 9}
    assert offer(dedup, rule, 1, TS0, v).reason == FIRST
    dropped = offer(dedup, rule, 2, TS0 + 3 * S, v)
    assert (dropped.keep, dropped.reason) == (False, DUPLICATE)
    assert dropped.detail == "identical to the last kept record 3 s ago"
    assert offer(dedup, rule, 3, TS0 + 9 * S, {"fix": 2, "sats": 8}).reason == CHANGED
    # the window counts from the last KEPT record (9 s), not from the dropped one
    assert not offer(dedup, rule, 4, TS0 + 18 * S, {"fix": 2, "sats": 8}).keep
    assert offer(dedup, rule, 5, TS0 + 19 * S, {"fix": 2, "sats": 8}).reason == WINDOW


def test_values_of_another_type_or_a_missing_field_are_not_identical():
    dedup, rule = Deduplicator(), p2(DedupSpec(window_s=10, fields=("fix",)))
    offer(dedup, rule, 1, TS0, {"fix": 1})
    assert offer(dedup, rule, 2, TS0 + 1, {"fix": 1.0}).reason == CHANGED
    assert offer(dedup, rule, 3, TS0 + 2, {"fix": True}).reason == CHANGED
    assert offer(dedup, rule, 4, TS0 + 3, {"other": 1}).reason == CHANGED  # fix missing
    assert not offer(dedup, rule, 5, TS0 + 4, {"other": 2}).keep  # both missing: identical
    assert not same_value(1, True) and same_value(0.5, 0.5)


def test_position_dedup_keeps_a_record_that_moved_the_distance():
    dedup = Deduplicator()
    rule = p2(DedupSpec(window_s=60, fields=(), min_distance_m=15))
    north = 1 / M_PER_DEG_LAT  # one metre in degrees of latitude
    offer(dedup, rule, 1, TS0, {"lat": LAT0, "lon": LON0})
    near = offer(dedup, rule, 2, TS0 + S, {"lat": LAT0 + 14.9 * north, "lon": LON0})
    assert (near.keep, near.reason) == (False, NEAR)
    assert near.detail.startswith("moved 14.9 m < 15 m since the last kept record 1 s ago")
    moved = offer(dedup, rule, 3, TS0 + 2 * S, {"lat": LAT0 + 15.1 * north, "lon": LON0})
    assert (moved.keep, moved.reason) == (True, MOVED)
    assert offer(dedup, rule, 4, TS0 + 3 * S, {"lon": LON0}).reason == NO_POSITION


def test_streams_are_separate_per_device_sensor_and_rule():
    dedup, rule = Deduplicator(), p2(DedupSpec(window_s=10))
    v = {"fix": 2}
    assert offer(dedup, rule, 1, TS0, v).keep
    assert offer(dedup, rule, 2, TS0, v, device="veh-2").keep
    assert offer(dedup, rule, 3, TS0, v, sensor="gps1").keep
    assert dedup.offer(record(4, TS0, v), Rule("other", 1, Lane.P2, dedup=DedupSpec(10)), v).keep
    assert not offer(dedup, rule, 5, TS0 + 1, v).keep
    assert len(dedup) == 4


def test_sampler_keeps_one_record_every_interval_while_the_condition_holds():
    sampler, rule = Sampler(), sampled(30, "speed_kmh < 1")
    verdicts = [sampler.offer(record(i, TS0 + i * S, {"speed_kmh": 0.0}), rule,
                              {"speed_kmh": 0.0}) for i in range(100)]
    assert [i for i, v in enumerate(verdicts) if v.keep] == [0, 30, 60, 90]
    assert verdicts[0].reason == FIRST and verdicts[30].reason == SAMPLED
    assert verdicts[1].reason == SAMPLED_OUT and verdicts[1].detail == (
        "1 s since the last sample < every 30 s")
    moving = sampler.offer(record(100, TS0 + 100 * S, {"speed_kmh": 40.0}), rule,
                           {"speed_kmh": 40.0})
    assert (moving.keep, moving.reason) == (True, NOT_SAMPLED)
    # a missing value makes the condition false: kept, not sampled
    assert sampler.offer(record(101, TS0 + 101 * S, {"lat": 1.0}), rule, {"lat": 1.0}).keep


def test_sampler_without_condition_always_samples():
    sampler, rule = Sampler(), sampled(2)
    kept = [i for i in range(10)
            if sampler.offer(record(i, TS0 + i * S // 2, {"a": 1}), rule, {"a": 1}).keep]
    assert kept == [0, 4, 8]


def test_state_of_unknown_version_is_refused():
    with pytest.raises(ValueError, match="dedup state version 99 is not 1"):
        Deduplicator.from_state({"version": 99, "streams": []})
    with pytest.raises(ValueError, match="sampler state version None"):
        Sampler.from_state({})


# ---- properties ------------------------------------------------------------------------------------

SPECS = st.sampled_from([
    DedupSpec(window_s=5),
    DedupSpec(window_s=5, fields=("fix",)),
    DedupSpec(window_s=5, fields=(), min_distance_m=10),
    DedupSpec(window_s=5, fields=("fix",), min_distance_m=10),
    DedupSpec(window_s=5, fields=None, min_distance_m=3, lat_field="y", lon_field="x"),
])


OFFSETS_M = st.sampled_from([None, 0, 0, 4, 8, 12, 16])  # None: no position


@st.composite
def dedup_values(draw):
    """Values with few distinct possibilities, so repeats are common; the position under both
    field namings the specs use."""
    values = {}
    offset = draw(OFFSETS_M)
    if offset is not None:
        lat = LAT0 + offset / M_PER_DEG_LAT
        values.update(lat=lat, lon=LON0, y=lat, x=LON0)
    fix = draw(st.sampled_from([None, 1, 2, 2, 2.0]))
    if fix is not None:
        values["fix"] = fix
    values["sats"] = draw(st.sampled_from([8, 8, 9]))
    return values


STEPS = st.sampled_from([0, S // 2, S, 2 * S, 4 * S, 6 * S, -S])


@st.composite
def dedup_streams(draw):
    rows = draw(st.lists(st.tuples(STEPS, st.sampled_from(["gps0", "gps1"]), dedup_values()),
                         min_size=1, max_size=40))
    ts, out = TS0, []
    for pos, (step, sensor, values) in enumerate(rows, start=1):
        ts += step
        out.append((pos, ts, sensor, values))
    return draw(SPECS), out, draw(st.integers(0, len(out)))


def repeats(spec: DedupSpec, last: tuple, ts: int, values: dict) -> bool:
    """The specification: within the window, identical compared fields and (with a distance)
    both positions known and nearer than it."""
    last_ts, last_values = last
    if abs(ts - last_ts) >= spec.window_ns:
        return False
    names = set(values) | set(last_values) if spec.fields is None else set(spec.fields)
    for f in names:
        if (f in values) != (f in last_values):
            return False
        if f in values and not same_value(values[f], last_values[f]):
            return False
    if not spec.min_distance_m:
        return True
    here = [values.get(spec.lat_field), values.get(spec.lon_field)]
    there = [last_values.get(spec.lat_field), last_values.get(spec.lon_field)]
    if None in here or None in there:
        return False
    return distance_m(*there, *here) < spec.min_distance_m


@settings(deadline=None)  # a loaded 2-core machine: timings vary
@given(dedup_streams())
def test_dedup_drops_exactly_the_records_that_repeat_the_last_kept_one(case):
    spec, stream, cut = case
    rule = p2(spec)
    dedup, last = Deduplicator(), {}
    for i, (pos, ts, sensor, values) in enumerate(stream):
        if i == cut:  # a restart in the middle of the stream
            dedup = Deduplicator.from_state(json.loads(json.dumps(dedup.to_state())))
        verdict = dedup.offer(record(pos, ts, values, sensor=sensor), rule, values)
        prior = last.get(sensor)
        # never drops a record that differs in a compared field or moved the distance;
        # never keeps one that repeats the last kept record within the window
        assert verdict.keep == (prior is None or not repeats(spec, prior, ts, values)), verdict
        if verdict.keep:
            last[sensor] = (ts, values)


@settings(deadline=None)  # a loaded 2-core machine: timings vary
@given(dedup_streams())
def test_dedup_state_round_trip_at_any_point_changes_no_decision(case):
    spec, stream, cut = case
    rule = p2(spec)
    straight, resumed = Deduplicator(), Deduplicator()
    for i, (pos, ts, sensor, values) in enumerate(stream):
        if i == cut:
            resumed = Deduplicator.from_state(json.loads(json.dumps(resumed.to_state())))
        r = record(pos, ts, values, sensor=sensor)
        assert straight.offer(r, rule, values) == resumed.offer(r, rule, values)
    assert straight.to_state() == resumed.to_state()


@settings(deadline=None)  # a loaded 2-core machine: timings vary
@given(st.lists(st.tuples(st.sampled_from([0, S // 3, S, 7 * S, -S]),
                          st.sampled_from([0.0, 0.5, 3.0, None])), max_size=60),
       st.integers(0, 60))
def test_sampled_records_are_at_least_every_s_apart_and_other_records_pass(steps, cut):
    rule = sampled(5, "speed_kmh < 1")
    sampler, ts, last_sample = Sampler(), TS0, None
    for pos, (step, speed) in enumerate(steps, start=1):
        if pos == cut:
            sampler = Sampler.from_state(json.loads(json.dumps(sampler.to_state())))
        ts += step
        values = {"lat": 1.0} if speed is None else {"speed_kmh": speed}
        verdict = sampler.offer(record(pos, ts, values), rule, values)
        if speed is None or speed >= 1:
            assert verdict.keep and verdict.reason == NOT_SAMPLED
            continue
        near = last_sample is not None and abs(ts - last_sample) < 5 * S
        assert verdict.keep is not near
        if verdict.keep:
            last_sample = ts
