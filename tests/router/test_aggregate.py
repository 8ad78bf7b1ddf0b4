"""Aggregation: the aggregate of a window equals the statistics of exactly the raw records in
it; every raw record lands in exactly one aggregate; a restart at any point (to_state -> JSON ->
from_state) changes nothing, and replayed records are not counted twice."""

import json
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.router.aggregate import Aggregator
from config.policy import STATS, AggregateSpec, Lane, Rule
from messages.readings import Reading
from tests.router import TS0, S, record


def p3(window_s=10.0, stats=STATS, fields=None, name="metrics") -> Rule:
    return Rule(name, 0, Lane.P3, aggregate=AggregateSpec(window_s, stats, fields))


def add(agg, rule, pos, ts, values, **kw):
    return agg.add(record(pos, ts, values, **kw), rule, values)


BASE = TS0 - TS0 % (10 * S)  # a multiple of 10 s


def test_windows_are_aligned_and_close_when_a_later_record_arrives():
    agg, rule = Aggregator(), p3()
    assert add(agg, rule, 1, BASE + 3 * S, {"rpm": 800, "temp": 90.5}) == ()
    assert add(agg, rule, 2, BASE + 9 * S, {"rpm": 1200, "temp": 91.5}) == ()
    assert add(agg, rule, 3, BASE + 7 * S, {"rpm": 1000, "temp": 91.0}) == ()
    (closed,) = add(agg, rule, 4, BASE + 10 * S, {"rpm": 900, "temp": 92.0})
    assert (closed.window_start_ns, closed.window_end_ns) == (BASE, BASE + 10 * S)
    assert closed.count == 3 and (closed.first_pos, closed.last_pos) == (1, 3)
    assert (closed.first_seq, closed.last_seq) == (1, 3) and not closed.late
    assert closed.kind == "agg:metrics"
    assert closed.fields["rpm"] == {"count": 3, "min": 800, "max": 1200, "mean": 1000.0,
                                    "median": 1000, "last": 1200}  # last: latest ts, not arrival
    assert closed.fields["temp"]["mean"] == 91.0
    assert agg.open_windows() == 1


def test_aggregate_reading_carries_window_positions_and_stats():
    agg, rule = Aggregator(), p3(stats=("mean", "last"), fields=("rpm",))
    add(agg, rule, 5, BASE + S, {"rpm": 800, "state": "idle", "on": True}, seq=17)
    (closed,) = agg.flush(BASE + 10 * S)
    reading = closed.to_reading()
    assert isinstance(reading, Reading)
    assert (reading.ts, reading.kind, reading.sensor_id) == (BASE, "agg:metrics", "s0")
    assert dict(reading.values) == {
        "window_start": BASE, "window_end": BASE + 10 * S, "count": 1, "first_pos": 5,
        "last_pos": 5, "first_seq": 17, "last_seq": 17, "late": False,
        "rpm.mean": 800.0, "rpm.last": 800,
    }
    assert closed.to_dict()["fields"] == {"rpm": {"mean": 800.0, "last": 800}}


def test_flush_closes_windows_and_a_record_for_a_closed_window_is_aggregated_late():
    agg, rule = Aggregator(), p3()
    add(agg, rule, 1, BASE + S, {"a": 1})
    add(agg, rule, 2, BASE + S, {"a": 1}, device="veh-2")
    assert agg.flush(BASE + 9 * S) == ()  # no window ends by then
    closed = agg.flush(BASE + 10 * S)
    assert [c.device_id for c in closed] == ["veh-1", "veh-2"]
    (late,) = add(agg, rule, 3, BASE + 2 * S, {"a": 5})
    assert late.late and late.count == 1 and late.fields["a"]["max"] == 5
    assert agg.open_windows() == 0


def test_replayed_record_is_not_counted_twice():
    agg, rule = Aggregator(), p3()
    add(agg, rule, 1, BASE + S, {"a": 1})
    state = json.loads(json.dumps(agg.to_state()))
    again = Aggregator.from_state(state)
    assert add(again, rule, 1, BASE + S, {"a": 1}) == ()  # already in the window
    (closed,) = again.flush(BASE + 10 * S)
    assert closed.count == 1


def test_mean_that_overflows_is_none_and_others_stay_exact():
    agg, rule = Aggregator(), p3()
    add(agg, rule, 1, BASE, {"x": 1.7e308, "y": 0.1})
    add(agg, rule, 2, BASE + 1, {"x": 1.7e308, "y": 0.2})
    (closed,) = agg.flush(BASE + 10 * S)
    assert closed.fields["x"]["mean"] is None and closed.fields["x"]["max"] == 1.7e308
    assert closed.fields["x"]["median"] is None  # (a + b) / 2 overflows too
    assert closed.fields["y"]["mean"] == 0.15000000000000002 == math.fsum([0.1, 0.2]) / 2
    assert "x.mean" not in closed.to_reading().values


def test_mean_of_constant_values_is_that_value():
    agg, rule = Aggregator(), p3()
    for i in range(3):
        add(agg, rule, i + 1, BASE + i, {"v": 0.1})
    (closed,) = agg.flush(BASE + 10 * S)
    assert math.fsum([0.1] * 3) / 3 > 0.1  # a correctly rounded sum, divided, overshoots
    assert closed.fields["v"]["mean"] == 0.1  # clamped into [min, max]


def test_ties_keep_the_first_min_and_max_and_the_latest_last():
    # 2 and 2.0 are equal but not identical: which one is reported is defined (as min()/max()
    # of the values in arrival order; last: the latest ts, then the later arrival)
    agg, rule = Aggregator(), p3(stats=("min", "max", "last"))
    add(agg, rule, 1, BASE + 2, {"v": 2, "w": 5})
    add(agg, rule, 2, BASE + 2, {"v": 2.0, "w": 5.0})
    add(agg, rule, 3, BASE + 1, {"v": 2, "w": 5})
    (closed,) = agg.flush(BASE + 10 * S)
    assert typed(closed.fields) == {"v": {"min": ("int", 2), "max": ("int", 2),
                                          "last": ("float", 2.0)},
                                    "w": {"min": ("int", 5), "max": ("int", 5),
                                          "last": ("float", 5.0)}}


def test_fields_beyond_what_an_aggregate_record_can_carry_are_skipped_and_counted():
    agg, rule = Aggregator(), p3()
    values = {f"f{i:03d}": i for i in range(60)}
    add(agg, rule, 1, BASE, values)
    (closed,) = agg.flush(BASE + 10 * S)
    assert len(closed.fields) == 41 and len(closed.skipped_fields) == 19
    reading = closed.to_reading()  # valid: at most 256 values
    assert reading.values["skipped_fields"] == 19 and len(reading.values) <= 256


def test_window_opened_before_a_policy_change_closes_with_its_own_spec():
    agg = Aggregator()
    add(agg, p3(stats=("count",)), 1, BASE, {"a": 1.0})
    restored = Aggregator.from_state(json.loads(json.dumps(agg.to_state())))
    new_rule = p3(window_s=5, stats=("max",))
    (old,) = add(restored, new_rule, 2, BASE + 11 * S, {"a": 3.0})
    assert old.fields == {"a": {"count": 1}} and old.window_end_ns == BASE + 10 * S
    (new,) = restored.flush(BASE + 15 * S)
    assert new.fields == {"a": {"max": 3.0}} and new.window_end_ns == BASE + 15 * S


def test_state_of_unknown_version_is_refused():
    with pytest.raises(ValueError, match="aggregator state version 0 is not 1"):
        Aggregator.from_state({"version": 0})


# ---- properties -----------------------------------------------------------------------------------

RULES = (p3(3.0, STATS, None, "fast"), p3(5.0, ("count", "mean", "last"), ("a", "b"), "slow"))
# Repeats (0.1 three times overshoots its mean; 2 and 2.0 tie as min/max/last) are common.
field_values = st.one_of(st.sampled_from([0.1, 2, 2.0, -0.0, 0.1, 2, 2.0, 0]),
                         st.integers(-10**6, 10**6), st.floats(-1e6, 1e6, allow_nan=False),
                         st.just("text"), st.booleans())
values_strategy = st.dictionaries(st.sampled_from(["a", "b", "c"]), field_values, min_size=1)


# Mostly small steps (several records per window), sometimes back (late) or far ahead;
# mostly one stream, so windows fill up, sometimes others interleaved.
STEPS = st.sampled_from([0, S // 4, S // 2, S // 2, S, S, S, 2 * S, -3 * S, 20 * S])
ROWS = st.tuples(STEPS, st.sampled_from(["v1", "v1", "v1", "v2"]),
                 st.sampled_from(["s0", "s0", "s1"]), st.sampled_from([0, 0, 1]),
                 values_strategy)


@st.composite
def aggregate_streams(draw):
    """(pos, ts, device, sensor, rule index, values) rows, ts mostly rising, sometimes stepping
    back; a restart point, a flush point and the flush time."""
    rows = draw(st.lists(ROWS, min_size=3, max_size=40))
    ts, stream = BASE, []
    for pos, (step, device, sensor, r, values) in enumerate(rows, start=1):
        ts += step
        stream.append((pos, ts, device, sensor, r, values))
    n = len(stream)
    flush_at = draw(st.integers(0, n))
    # a flush a little behind the latest record (what the router does for quiet streams)
    flush_until = stream[max(0, flush_at - 1)][1] - draw(st.integers(0, 8)) * S
    return stream, draw(st.integers(0, n)), flush_at, flush_until


def run(stream, cut, flush_at, flush_until, restart: bool):
    """Outputs of an aggregator fed the stream, with a flush at ``flush_at`` and (restart) a
    to_state -> JSON -> from_state at ``cut``; ends with a flush of everything."""
    agg, out = Aggregator(), []
    for i, (pos, ts, device, sensor, r, values) in enumerate(stream):
        if restart and i == cut:
            agg = Aggregator.from_state(json.loads(json.dumps(agg.to_state())))
        if i == flush_at:
            out.extend(agg.flush(flush_until))
        out.extend(agg.add(record(pos, ts, values, device=device, sensor=sensor), RULES[r],
                           values))
    out.extend(agg.flush(2**62))
    return out, agg


def reference_groups(stream, flush_at, flush_until):
    """The raw records of each window, by the specification: a record goes to its stream's
    window of its ts unless that window had closed (its end at or before the stream's latest
    ts or the flush time), in which case it is aggregated alone (late)."""
    high, flushed, groups = {}, 0, {}
    for i, (pos, ts, device, sensor, r, values) in enumerate(stream):
        if i == flush_at:
            flushed = max(flushed, flush_until)
        key = (device, sensor, RULES[r].name)
        wns = RULES[r].aggregate.window_ns
        start = ts - ts % wns
        late = start + wns <= max(high.get(key, -1), flushed)
        group_key = (key, start, pos if late else None)
        groups.setdefault(group_key, (late, []))[1].append((pos, ts, values, RULES[r]))
        high[key] = max(high.get(key, -1), ts)
    return groups


def expected_fields(members, spec: AggregateSpec):
    per_field: dict[str, list] = {}
    for _pos, ts, values, _rule in members:
        names = values if spec.fields is None else [f for f in spec.fields if f in values]
        for name in names:
            v = values[name]
            if type(v) in (int, float):
                per_field.setdefault(name, []).append((ts, v))
    out = {}
    for name, tv in per_field.items():
        vs = [v for _, v in tv]
        last_ts, last = tv[0]
        for ts, v in tv:
            if ts >= last_ts:
                last_ts, last = ts, v
        stats = {"count": len(vs), "min": min(vs), "max": max(vs),
                 "mean": min(max(math.fsum(vs) / len(vs), min(vs)), max(vs)),
                 "median": statistics.median(vs), "last": last}
        out[name] = {s: stats[s] for s in spec.stats}
    return out


def typed(fields):
    """Statistics with their types, so 1 and 1.0 (and True) are told apart."""
    return {f: {s: (type(v).__name__, v) for s, v in stats.items()} for f, stats in fields.items()}


@settings(deadline=None)  # a loaded 2-core machine: timings vary
@given(aggregate_streams())
def test_each_aggregate_equals_the_statistics_of_exactly_its_raw_records(case):
    stream, cut, flush_at, flush_until = case
    out, agg = run(stream, cut, flush_at, flush_until, restart=True)
    groups = reference_groups(stream, flush_at, flush_until)
    assert agg.open_windows() == 0
    # every raw record lands in exactly one aggregate
    assert sum(a.count for a in out) == len(stream)
    assert len(out) == len(groups)
    by_identity = {(a.device_id, a.sensor_id, a.rule, a.window_start_ns, a.first_pos): a
                   for a in out}
    assert len(by_identity) == len(out)
    for (key, start, _), (late, members) in groups.items():
        aggregate = by_identity[(*key, start, members[0][0])]
        spec = members[0][3].aggregate
        assert aggregate.count == len(members) and aggregate.late == late
        assert aggregate.window_end_ns == start + spec.window_ns
        assert (aggregate.first_pos, aggregate.last_pos) == (members[0][0], members[-1][0])
        assert typed(aggregate.fields) == typed(expected_fields(members, spec))
        assert all(start <= ts < start + spec.window_ns for _, ts, _, _ in members)


@settings(deadline=None)  # a loaded 2-core machine: timings vary
@given(aggregate_streams())
def test_restart_at_any_point_gives_the_same_aggregates_as_an_uninterrupted_run(case):
    stream, cut, flush_at, flush_until = case
    straight, a1 = run(stream, cut, flush_at, flush_until, restart=False)
    resumed, a2 = run(stream, cut, flush_at, flush_until, restart=True)
    assert [a.to_dict() for a in resumed] == [a.to_dict() for a in straight]
    assert a1.to_state() == a2.to_state()


@settings(deadline=None)  # a loaded 2-core machine: timings vary
@given(aggregate_streams(), st.integers(1, 10))
def test_replaying_records_after_a_restore_emits_nothing_twice(case, back):
    stream, cut, _, _ = case
    agg, out = Aggregator(), []
    for i, (pos, ts, device, sensor, r, values) in enumerate(stream):
        if i == cut:
            agg = Aggregator.from_state(json.loads(json.dumps(agg.to_state())))
            for p2, t2, d2, s2, r2, v2 in stream[max(0, i - back):i]:  # replayed: ignored
                assert agg.add(record(p2, t2, v2, device=d2, sensor=s2), RULES[r2], v2) == ()
        out.extend(agg.add(record(pos, ts, values, device=device, sensor=sensor), RULES[r],
                           values))
    out.extend(agg.flush(2**62))
    assert sum(a.count for a in out) == len(stream)
