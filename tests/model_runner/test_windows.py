"""Window features and device windows: the model's input, built one reading at a time,
persisted with the cursor and resumed without skipping or repeating a window."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.model_runner.features import (
    FEATURE_NAMES,
    N_FEATURES,
    WINDOW_NS,
    WindowAccumulator,
    WindowProblem,
)
from actors.model_runner.windows import CLOCK_STEP_NS, WindowBuilder
from actors.sensors.sim import SimulatedSource

T0 = 1_700_000_000 * 10**9  # a multiple of WINDOW_NS


def sim_records(seconds: float, imu_hz: float = 50, engine_hz: float = 10,
                device: str = "veh-001", t0: int = T0) -> list[tuple]:
    """(pos, device, sensor, ts, kind, values) of a simulated device, in a journal-like
    order: each sensor's readings in batches of 0.2 s, interleaved."""
    imu = SimulatedSource("imu", imu_hz, device, "imu0", 1, t0)
    engine = SimulatedSource("engine", engine_hz, device, "engine0", 3, t0)
    out = []
    end = t0 + int(seconds * 1e9)
    step = 200_000_000
    for now in range(t0 + step, end + 1, step):
        for source in (imu, engine):
            out += [(r.sensor_id, r.ts, r.kind, dict(r.values)) for r in source.due(now, 10**6)]
    return [(pos, device, s, ts, k, v) for pos, (s, ts, k, v) in enumerate(out, 1)]


def window_of(records) -> WindowAccumulator:
    acc = WindowAccumulator()
    for _pos, _dev, sensor, _ts, kind, values in records:
        acc.add(kind, sensor, values)
    return acc


def test_a_window_of_driving_gives_64_finite_features_in_order():
    acc = window_of(r for r in sim_records(2.0) if r[3] < T0 + WINDOW_NS)
    features = acc.features()
    assert len(features) == N_FEATURES == len(FEATURE_NAMES) == 64
    assert all(math.isfinite(x) for x in features)
    named = dict(zip(FEATURE_NAMES, features, strict=True))
    assert 9.0 < named["az_mean"] < 10.6  # gravity
    assert named["imu_frozen"] == 0.0 and named["engine_frozen"] == 0.0
    assert acc.counts() == {"imu": 100, "engine": 20}


def test_features_do_not_depend_on_the_sampling_rate():
    slow = dict(zip(FEATURE_NAMES, window_of(
        r for r in sim_records(2.0, imu_hz=50) if r[3] < T0 + WINDOW_NS).features(), strict=True))
    fast = dict(zip(FEATURE_NAMES, window_of(
        r for r in sim_records(2.0, imu_hz=200) if r[3] < T0 + WINDOW_NS).features(), strict=True))
    for name in ("ax_mean", "az_mean", "az_std", "gz_mean", "ax_eq"):
        assert fast[name] == pytest.approx(slow[name], abs=0.05), name


def test_a_frozen_sensor_shows_as_repeats_not_as_a_crash():
    records = [r for r in sim_records(2.0) if r[3] < T0 + WINDOW_NS]
    first_imu = next(r[5] for r in records if r[4] == "imu")
    frozen = [(p, d, s, ts, k, first_imu if k == "imu" else v) for p, d, s, ts, k, v in records]
    named = dict(zip(FEATURE_NAMES, window_of(frozen).features(), strict=True))
    assert named["imu_frozen"] == 1.0 and named["ax_eq"] == 1.0 and named["ax_std"] == 0.0
    assert named["engine_frozen"] == 0.0


@pytest.mark.parametrize(("values", "reason"), [
    ({"ax": 0.1, "ay": 0.0, "az": 9.8, "gx": 0, "gy": 0}, "imu value 'gz' is missing"),
    ({"ax": True, "ay": 0.0, "az": 9.8, "gx": 0, "gy": 0, "gz": 0}, "'ax' is not a number"),
    ({"ax": "x", "ay": 0.0, "az": 9.8, "gx": 0, "gy": 0, "gz": 0}, "'ax' is not a number"),
])
def test_an_invalid_reading_makes_the_window_an_error_with_the_reason(values, reason):
    acc = window_of(r for r in sim_records(2.0) if r[3] < T0 + WINDOW_NS)
    acc.add("imu", "imu9", values)
    with pytest.raises(WindowProblem, match=reason) as exc:
        acc.features()
    assert "imu9" in str(exc.value)


def test_a_window_without_enough_engine_readings_says_so():
    acc = window_of(r for r in sim_records(2.0) if r[3] < T0 + WINDOW_NS and r[4] == "imu")
    with pytest.raises(WindowProblem, match=r"engine: 0 readings \(needs >= 2\)"):
        acc.features()


def test_values_beyond_float32_are_refused_as_not_finite():
    acc = window_of(r for r in sim_records(2.0) if r[3] < T0 + WINDOW_NS)
    acc.add("engine", "engine0", {"rpm": 1e300, "speed_kmh": 0, "coolant_c": 90,
                                  "throttle_pct": 0, "oil_kpa": 300, "battery_v": 14})
    with pytest.raises(WindowProblem, match="needs a finite float32"):
        acc.features()


def test_with_two_imus_the_one_with_more_readings_is_the_window_s_imu():
    records = [r for r in sim_records(2.0) if r[3] < T0 + WINDOW_NS]
    acc = window_of(records)
    for r in records[:5]:
        if r[4] == "imu":
            acc.add("imu", "imu-seat0", r[5])
    assert acc.sensors() == {"imu": "imu0", "engine": "engine0"}


def test_accumulator_state_round_trip_gives_the_same_features():
    records = [r for r in sim_records(2.0) if r[3] < T0 + WINDOW_NS]
    whole = window_of(records).features()
    half = window_of(records[:70])
    resumed = WindowAccumulator.from_state(json.loads(json.dumps(half.to_state())))
    for _p, _d, sensor, _ts, kind, values in records[70:]:
        resumed.add(kind, sensor, values)
    assert resumed.features() == whole


def run(builder: WindowBuilder, records) -> list[tuple[str, int, int, int]]:
    closed = []
    for pos, dev, sensor, ts, kind, values in records:
        for w in builder.add(pos, dev, sensor, ts, kind, values):
            closed.append((w.device_id, w.start_ns, w.acc.n, w.first_pos))
    return closed


def test_windows_close_once_each_in_order_after_the_grace():
    builder = WindowBuilder(grace_ns=1_000_000_000)
    closed = run(builder, sim_records(20.0))
    starts = [start for _d, start, _n, _p in closed]
    # 20 s of records: windows up to the one ending 1 s (grace) before the newest time.
    assert starts == [T0 + i * WINDOW_NS for i in range(len(starts))]
    assert len(starts) == 9
    assert all(n == 120 for _d, _s, n, _p in closed)
    assert builder.open_windows() == 2 and builder.late == 0  # [18, 20) and [20, 22)


def test_a_record_for_a_closed_window_is_late_and_counted_not_added():
    builder = WindowBuilder(grace_ns=500_000_000)
    records = sim_records(6.0)
    closed = run(builder, records)
    engine = next(r for r in records if r[4] == "engine")
    assert run(builder, [(999, *engine[1:])]) == []
    assert builder.late == 1
    assert [c[1] for c in closed] == [T0, T0 + WINDOW_NS]


def test_a_clock_step_closes_open_windows_and_restarts_the_series():
    builder = WindowBuilder(grace_ns=500_000_000)
    run(builder, sim_records(3.0))
    later = sim_records(3.0, t0=T0 + CLOCK_STEP_NS + 100 * WINDOW_NS)
    closed = run(builder, [(1000 + p, *rest) for p, *rest in later])
    assert builder.clock_steps == 1
    assert closed[0][1] == T0 + WINDOW_NS  # the open window before the step
    assert builder.late == 0


def test_devices_have_their_own_windows():
    a = sim_records(7.0, device="veh-a")
    b = sim_records(7.0, device="veh-b")
    merged = sorted(a + b, key=lambda r: (r[3], r[1]))
    closed = run(WindowBuilder(grace_ns=500_000_000), [(i, *r[1:]) for i, r in enumerate(merged, 1)])
    assert sorted({c[0] for c in closed}) == ["veh-a", "veh-b"]
    assert [c[1] for c in closed if c[0] == "veh-a"] == [c[1] for c in closed if c[0] == "veh-b"]


@settings(max_examples=25, deadline=None)
@given(cut=st.integers(min_value=0, max_value=1200), grace_ms=st.sampled_from([0, 500, 2000]))
def test_state_saved_anywhere_resumes_to_the_same_windows(cut, grace_ms):
    records = sim_records(20.0)
    whole = run(WindowBuilder(grace_ns=grace_ms * 10**6), records)
    first = WindowBuilder(grace_ns=grace_ms * 10**6)
    before = run(first, records[:cut])
    resumed = WindowBuilder.from_state(json.loads(json.dumps(first.to_state())))
    assert before + run(resumed, records[cut:]) == whole
