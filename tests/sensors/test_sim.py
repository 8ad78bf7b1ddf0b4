"""SimulatedSource and VehicleMotion: determinism, exact timestamps, back-pressure without
skipping, valid and plausible values, and one consistent story across a device's sensors."""

from __future__ import annotations

import math
import time

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.sensors.sim import SimulatedSource, VehicleMotion
from config.schema import SENSOR_KINDS, SensorSettings
from messages.errors import MessageValidationError
from messages.readings import Reading, ReadingBatch, encode_values

START = 1_700_000_000 * 10**9
S = 10**9
KINDS = SENSOR_KINDS


def source(kind: str, rate_hz: float = 10.0, seed: int = 1, device: str = "veh-001", start=START):
    return SimulatedSource(kind, rate_hz, device, f"{kind}0", seed, start)


def pull_all(src: SimulatedSource, seconds: float) -> list[Reading]:
    return src.due(src.start_ns + int(seconds * S), 10**9)


def metres(a: Reading, b: Reading) -> tuple[float, float]:
    """(east, north) metres from fix a to fix b (flat earth: fine over a few metres)."""
    r = 6_371_008.8
    lat = math.radians(a.values["lat"])
    north = math.radians(b.values["lat"] - a.values["lat"]) * r
    east = math.radians(b.values["lon"] - a.values["lon"]) * r * math.cos(lat)
    return east, north


def angle_diff(a_deg: float, b_deg: float) -> float:
    return (a_deg - b_deg + 180.0) % 360.0 - 180.0


# ---- determinism and timestamps ---------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_readings(kind):
    assert pull_all(source(kind, seed=7), 120) == pull_all(source(kind, seed=7), 120)


@pytest.mark.parametrize("kind", ["imu", "gps"])
def test_different_seeds_give_different_noise(kind):
    a, b = pull_all(source(kind, seed=1), 30), pull_all(source(kind, seed=2), 30)
    assert [r.ts for r in a] == [r.ts for r in b]
    assert [r.values for r in a] != [r.values for r in b]


def test_motion_is_a_function_of_device_and_time_only():
    times = [START + k * 7_919_000_123 for k in range(300)]
    forwards = VehicleMotion("veh-001")
    ahead = [(p.t0_ns, p.t1_ns, p.v0, p.a, p.u0) for p in map(forwards.phase_at, times)]
    backwards = VehicleMotion("veh-001")  # random access, in the other order
    behind = [(p.t0_ns, p.t1_ns, p.v0, p.a, p.u0) for p in map(backwards.phase_at, times[::-1])]
    assert ahead == behind[::-1]
    other = VehicleMotion("veh-002")
    assert ahead != [(p.t0_ns, p.t1_ns, p.v0, p.a, p.u0) for p in map(other.phase_at, times)]


@pytest.mark.parametrize(
    ("rate_hz", "period_ns"), [(1000.0, 1_000_000), (10.0, 100_000_000), (1.0, S), (0.5, 2 * S)]
)
def test_timestamps_are_start_plus_k_periods_exactly(rate_hz, period_ns):
    src = source("imu", rate_hz)
    readings = src.due(START + 500 * period_ns, 10**6)
    assert [r.ts for r in readings] == [START + k * period_ns for k in range(501)]


def test_fractional_rate_timestamps_do_not_drift():
    src = source("engine", 3.0)
    readings = src.due(START + 3600 * S, 10**6)
    assert len(readings) == 3 * 3600 + 1
    assert readings[-1].ts == START + 3600 * S  # 10800 periods of 1/3 s, no accumulated error
    assert all(r.ts == START + k * S // 3 for k, r in enumerate(readings))


@settings(max_examples=60, deadline=None)
@given(
    rate_hz=st.floats(0.1, 5000.0),
    steps=st.lists(st.tuples(st.integers(0, 3 * S), st.integers(0, 50)), min_size=1, max_size=20),
)
def test_due_returns_exactly_the_readings_whose_time_has_come(rate_hz, steps):
    src = source("imu", rate_hz)
    now, got = START - S, []
    for advance, max_readings in steps:
        now += advance
        readings = src.due(now, max_readings)
        assert len(readings) <= max_readings
        assert all(r.ts <= now for r in readings)
        got.extend(readings)
        if len(readings) < max_readings:  # the caller took everything that was due
            assert src.backlog(now) == 0 and src.next_ts > now
    assert [r.ts for r in got] == [src.ts_of(k) for k in range(len(got))]
    assert all(a.ts < b.ts for a, b in zip(got, got[1:], strict=False))


@pytest.mark.parametrize("kind", KINDS)
def test_back_pressure_holds_source_without_skipping(kind):
    steady = pull_all(source(kind, rate_hz=50.0), 60)
    # A caller held back by a full outbox: it stops pulling for a while, then catches up
    # in small pieces while time goes on.
    held = source(kind, rate_hz=50.0)
    got = held.due(START + 5 * S, 40)
    now = START + 20 * S  # 15 s of no pulling at all
    assert held.backlog(now) == 20 * 50 + 1 - 40
    while len(got) < len(steady):
        got += held.due(min(now, START + 60 * S), 37)
        now += S // 10
    assert got == steady


# ---- validity, precision and plausibility ------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_generated_readings_pass_reading_validation(kind):
    for r in pull_all(source(kind, rate_hz=5.0), 600):
        attrs.validate(r)  # the validator the fast path skips
        assert Reading(r.device_id, r.sensor_id, r.ts, r.kind, dict(r.values)) == r
        assert r.kind == kind and r.sensor_id == f"{kind}0" and r.device_id == "veh-001"
    batch = ReadingBatch.from_readings(pull_all(source(kind), 10))
    assert batch.readings() == tuple(pull_all(source(kind), 10))  # survives the wire form


def test_values_are_rounded_to_sensor_precision():
    decimals = {"imu": 3, "gps": 6, "engine": 2}
    for kind, places in decimals.items():
        for r in pull_all(source(kind, rate_hz=5.0), 300):
            for name, value in r.values.items():
                text = encode_values({name: value})
                assert len(text.split(".")[1].rstrip("}")) <= places if "." in text else True


def test_gps_fix_sats_and_hdop_are_plausible():
    readings = pull_all(source("gps", rate_hz=1.0), 3600)
    for r in readings:
        v = r.values
        assert type(v["fix"]) is int and v["fix"] in (1, 2)
        assert type(v["sats"]) is int and 3 <= v["sats"] <= 16
        assert 0.3 < v["hdop"] < 5.0
        assert v["fix"] == 2 if v["sats"] >= 6 else v["fix"] == 1
        assert 0.0 <= v["course_deg"] < 360.0 and 0.0 <= v["speed_kmh"] < 80.0
    assert {r.values["fix"] for r in readings} == {1, 2}  # a 2D fix happens, but rarely
    assert sum(r.values["fix"] == 1 for r in readings) < len(readings) / 10


def test_imu_values_stay_plausible_and_show_every_phase():
    # Several devices over two hours each: gravity on z, nothing beyond 50 m/s^2, and the
    # phases of town driving are all there: pulling away, braking, cornering, harsh braking.
    ax_all, gz_all = [], []
    for device in ("veh-001", "veh-002", "veh-003"):
        for r in pull_all(source("imu", rate_hz=10.0, device=device), 2 * 3600):
            v = r.values
            assert all(type(x) is float for x in v.values())
            assert math.sqrt(v["ax"] ** 2 + v["ay"] ** 2 + v["az"] ** 2) < 50.0
            assert 9.0 < v["az"] < 10.6 and abs(v["ay"]) < 4.0
            assert abs(v["gx"]) < 3.0 and abs(v["gy"]) < 3.0 and abs(v["gz"]) < 40.0
            ax_all.append(v["ax"])
            gz_all.append(v["gz"])
    assert max(ax_all) > 1.5  # pulling away
    assert -6.0 < min(ax_all) < -4.0  # a rare harsh braking, ~0.5 g
    assert sum(ax < -4.0 for ax in ax_all) < len(ax_all) / 100  # ... and rare
    assert max(abs(gz) for gz in gz_all) > 10.0  # cornering


def test_engine_idles_when_standing_and_revs_when_driving():
    readings = pull_all(source("engine", rate_hz=2.0), 3600)
    standing = [r.values for r in readings if r.values["speed_kmh"] == 0.0]
    driving = [r.values for r in readings if r.values["speed_kmh"] > 30.0]
    assert standing and driving
    assert all(700 < v["rpm"] < 900 and v["throttle_pct"] < 2.0 for v in standing)
    assert all(1200 < v["rpm"] < 3500 for v in driving)
    for v in readings:
        v = v.values
        assert type(v["rpm"]) is int and 80.0 < v["coolant_c"] < 96.0
        assert 0.0 <= v["throttle_pct"] <= 100.0 and 150.0 < v["oil_kpa"] < 450.0
        assert 13.2 < v["battery_v"] < 14.8


# ---- one story across a device's sensors -------------------------------------------------------
def test_gps_moves_consistently_with_speed_and_course():
    fixes = pull_all(source("gps", rate_hz=1.0), 3600)
    travelled = expected = 0.0
    big_misses = 0
    for a, b in zip(fixes, fixes[1:], strict=False):
        east, north = metres(a, b)
        dist = math.hypot(east, north)
        speed = (a.values["speed_kmh"] + b.values["speed_kmh"]) / 2 / 3.6  # m/s over 1 s
        if speed > 3.0:  # standing still, the fix wanders by itself (GPS noise)
            travelled += dist
            expected += speed
        assert abs(dist - speed) < 4.0, (a, b)
        big_misses += abs(dist - speed) > 2.0
        if min(a.values["speed_kmh"], b.values["speed_kmh"]) > 30.0:  # straight, no noise
            bearing = math.degrees(math.atan2(east, north)) % 360.0
            assert abs(angle_diff(bearing, b.values["course_deg"])) < 10.0
    assert big_misses < len(fixes) / 50
    assert expected > 10_000.0  # it did drive
    assert abs(travelled - expected) / expected < 0.01


def test_engine_and_gps_agree_on_speed():
    gps = pull_all(source("gps", rate_hz=1.0, seed=3), 1800)
    engine = pull_all(source("engine", rate_hz=1.0, seed=4), 1800)
    assert [r.ts for r in gps] == [r.ts for r in engine]
    for g, e in zip(gps, engine, strict=True):
        assert abs(g.values["speed_kmh"] - e.values["speed_kmh"]) < 1.2


def test_imu_acceleration_and_yaw_agree_with_engine_speed_and_gps_course():
    # Over each second: the speed change is the integral of ax, the course change is minus
    # the integral of the yaw rate gz (course grows clockwise, gz is anticlockwise).
    seconds = 1200
    imu = pull_all(source("imu", rate_hz=100.0, seed=5), seconds)
    engine = pull_all(source("engine", rate_hz=1.0, seed=6), seconds)
    gps = pull_all(source("gps", rate_hz=1.0, seed=7), seconds)
    for i in range(seconds):
        window = imu[i * 100 : (i + 1) * 100]
        dv = sum(r.values["ax"] for r in window) / 100
        speed_change = (engine[i + 1].values["speed_kmh"] - engine[i].values["speed_kmh"]) / 3.6
        assert abs(dv - speed_change) < 0.12, i
        turned = -sum(r.values["gz"] for r in window) / 100
        course_change = angle_diff(gps[i + 1].values["course_deg"], gps[i].values["course_deg"])
        assert abs(turned - course_change) < 2.5, i


# ---- construction and cost ---------------------------------------------------------------------
def test_bad_identifiers_and_kinds_are_rejected_at_construction():
    with pytest.raises(MessageValidationError, match="device_id"):
        SimulatedSource("imu", 10.0, "bad id", "imu0", 1, START)
    with pytest.raises(MessageValidationError, match="sensor_id"):
        SimulatedSource("imu", 10.0, "veh-001", "", 1, START)
    with pytest.raises(ValueError, match="kind must be one of imu, gps, engine"):
        SimulatedSource("lidar", 10.0, "veh-001", "l0", 1, START)
    with pytest.raises(ValueError, match="rate_hz must be > 0"):
        SimulatedSource("imu", 0.0, "veh-001", "imu0", 1, START)


def test_from_settings_uses_the_sensor_entry():
    entry = SensorSettings(id="gps9", kind="gps", rate_hz=2.0, seed=9)
    src = SimulatedSource.from_settings(entry, "veh-042", START)
    same = SimulatedSource("gps", 2.0, "veh-042", "gps9", 9, START)
    assert pull_all(src, 10) == pull_all(same, 10)


def test_imu_generation_is_fast():
    # The benchmark pushes ~100k readings/s through a 2-core gateway; generating must be a
    # small part of that. Lenient bound (shared CI machines); typically 250k-400k/s.
    src = source("imu", rate_hz=1000.0)
    t = time.perf_counter()
    n = sum(len(src.due(START + 100 * S, 500)) for _ in range(100))
    rate = n / (time.perf_counter() - t)
    assert n == 50_000
    assert rate > 60_000, f"{rate:,.0f} readings/s"
