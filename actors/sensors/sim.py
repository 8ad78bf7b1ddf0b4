"""Seeded synthetic vehicle telemetry: the source behind the ``sim`` sensor.

Where this sits on the data path: just before step 1. A SimSensor actor asks its
`SimulatedSource` for the readings that are due (`SimulatedSource.due`) while its
`SensorOutbox` has room and hands them to the outbox, which batches them into `Append`s for the
journal. When the outbox is full the actor stops asking: the source keeps its position, so the
data is held at the source and nothing is skipped (timestamps stay exact).

One `VehicleMotion` per device tells the story all of that device's sensors report: a
deterministic function of (device_id, time) — a delivery loop around a rounded-rectangle block,
stopping at each corner and at traffic lights, turning slowly after a corner stop, then
accelerating, cruising, braking (rarely harshly, ~0.5 g) and waiting. The imu, gps and engine
sensors of one device evaluate the same model, so they agree; only their noise (and sensor
bias) comes from each sensor's seed.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from fractions import Fraction
from itertools import accumulate

from config.schema import SENSOR_KINDS, SensorSettings
from messages.readings import Reading

G = 9.80665
EARTH_R_M = 6_371_008.8
NS = 1_000_000_000
DEG = 180.0 / math.pi
#: Cruise speeds (m/s; ~30-60 km/h in town) and the rarer harsh braking (~0.5 g).
V_CRUISE = (8.5, 16.5)
V_TURN = (4.0, 5.5)
HARSH_BRAKE_P = 0.03
HARSH_BRAKE = (4.5, 5.5)
#: Gears of a small van: ratio and the speed (m/s) below which it is used.
GEARS = ((3.6, 4.5), (2.1, 8.5), (1.4, 12.5), (1.0, 17.0), (0.8, 99.0))
FINAL_DRIVE, WHEEL_R_M, IDLE_RPM = 4.1, 0.31, 780.0
#: IMU noise tables (per sensor, built from its seed) are indexed by 12 random bits.
NOISE_BITS = 12

VALUE_NAMES = {
    "imu": ("ax", "ay", "az", "gx", "gy", "gz"),
    "gps": ("lat", "lon", "alt_m", "speed_kmh", "course_deg", "fix", "sats", "hdop"),
    "engine": ("rpm", "speed_kmh", "coolant_c", "throttle_pct", "oil_kpa", "battery_v"),
}


class _Piece:
    """A piece of route: a straight (``k == 0``) or an arc of constant curvature ``k`` (rad/m;
    positive turns clockwise seen from above, i.e. the course grows). Positions are metres
    east/north of the device's home; courses are radians clockwise from north."""

    __slots__ = ("h0", "k", "length", "x0", "y0")

    def __init__(self, x0: float, y0: float, h0: float, k: float, length: float) -> None:
        self.x0, self.y0, self.h0, self.k, self.length = x0, y0, h0, k, length

    def at(self, u: float) -> tuple[float, float, float]:
        """(east, north, course) after ``u`` metres along this piece."""
        if self.k == 0.0:
            return self.x0 + u * math.sin(self.h0), self.y0 + u * math.cos(self.h0), self.h0
        h = self.h0 + self.k * u
        return (
            self.x0 + (math.cos(self.h0) - math.cos(h)) / self.k,
            self.y0 + (math.sin(h) - math.sin(self.h0)) / self.k,
            h,
        )


class MotionPhase:
    """A stretch of time ``t0_ns <= t < t1_ns`` with constant acceleration ``a`` (m/s^2) on one
    route piece, starting at speed ``v0`` (m/s) and ``u0`` metres into the piece."""

    __slots__ = ("a", "piece", "t0_ns", "t1_ns", "u0", "v0")

    def __init__(self, t0_ns: int, t1_ns: int, v0: float, a: float, piece: _Piece, u0: float):
        self.t0_ns, self.t1_ns, self.v0, self.a = t0_ns, t1_ns, v0, a
        self.piece, self.u0 = piece, u0

    def speed(self, ts_ns: int) -> float:
        return max(0.0, self.v0 + self.a * (ts_ns - self.t0_ns) * 1e-9)

    def where(self, ts_ns: int) -> tuple[float, float, float]:
        """(east, north, course) at ``ts_ns``: the piece position after the distance driven."""
        dt = (ts_ns - self.t0_ns) * 1e-9
        if self.a < 0.0:  # never roll backwards past the stop
            dt = min(dt, self.v0 / -self.a)
        return self.piece.at(self.u0 + self.v0 * dt + 0.5 * self.a * dt * dt)


def _drive(arc, straight, v_turn, v_cruise, a_launch, a_go, brake):
    """One leg from a standstill to the next stop: [(seconds, v0, a, piece, u0)]."""
    phases = []
    v = 0.0
    if arc is not None:
        # Turn slowly: reach v_turn inside the arc, hold it to the arc's end.
        v = min(v_turn, math.sqrt(2.0 * a_launch * arc.length))
        d = v * v / (2.0 * a_launch)
        phases.append((v / a_launch, 0.0, a_launch, arc, 0.0))
        if arc.length > d:
            phases.append(((arc.length - d) / v, v, 0.0, arc, d))
    # Cap the cruise speed so that speeding up and braking both fit in the straight.
    cap = math.sqrt((straight.length + v * v / (2 * a_go)) / (1 / (2 * a_go) + 1 / (2 * brake)))
    vc = max(v, min(v_cruise, cap))
    d_go = (vc * vc - v * v) / (2.0 * a_go)
    d_cruise = max(0.0, straight.length - d_go - vc * vc / (2.0 * brake))
    if vc > v:
        phases.append(((vc - v) / a_go, v, a_go, straight, 0.0))
    if d_cruise > 0.0:
        phases.append((d_cruise / vc, vc, 0.0, straight, d_go))
    phases.append((vc / brake, vc, -brake, straight, d_go + d_cruise))
    return phases


class VehicleMotion:
    """Where a device's vehicle is and how it moves: a deterministic function of
    (device_id, time), shared by all sensors of the device.

    The vehicle drives a loop of legs (stop to stop). Leg ``i`` always lasts ``leg_s[i]``
    seconds (driving, then waiting at the stop), so any instant maps straight to (loop, leg)
    without replaying history; each (loop, leg) draws its own speeds and accelerations.
    """

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        rng = random.Random(f"fleetgw.sim.vehicle:{device_id}")
        self.lat0 = rng.uniform(-45.0, 60.0)
        self.lon0 = rng.uniform(-120.0, 150.0)
        self.alt0 = rng.uniform(10.0, 600.0)
        self._m_per_deg_lon = EARTH_R_M * math.cos(math.radians(self.lat0)) / DEG
        width, height, radius = rng.uniform(300, 1200), rng.uniform(250, 900), rng.uniform(12, 20)
        turn = rng.choice((1.0, -1.0)) / radius  # clockwise or anticlockwise around the block
        x = y = 0.0
        h = rng.uniform(0.0, 2 * math.pi)
        self.legs: list[tuple[_Piece | None, _Piece]] = []
        for side in range(4):
            arc = _Piece(x, y, h, turn, math.pi / 2 * radius)
            x, y, h = arc.at(arc.length)
            straight = (width if side % 2 == 0 else height) - 2 * radius
            # traffic lights split a side into legs of 150 m or more
            parts = rng.randint(1, max(1, int(straight // 150)))
            cuts = [straight * (j + rng.uniform(-0.15, 0.15)) / parts for j in range(parts)]
            cuts = [0.0, *cuts[1:], straight]
            for j in range(len(cuts) - 1):
                piece = _Piece(x, y, h, 0.0, cuts[j + 1] - cuts[j])
                self.legs.append((arc if j == 0 else None, piece))
                x, y, h = piece.at(piece.length)
        # Leg durations: the slowest possible drive, plus a stop of 8-40 s.
        self.leg_s = []
        for arc, straight in self.legs:
            slowest = _drive(arc, straight, V_TURN[0], V_CRUISE[0], 1.0, 0.8, 1.5)
            self.leg_s.append(math.ceil(sum(p[0] for p in slowest)) + rng.randint(8, 40))
        starts = list(accumulate((s * NS for s in self.leg_s), initial=0))
        self._leg_start_ns, self._period_ns = starts[:-1], starts[-1]
        self._offset_ns = rng.randrange(self._period_ns)  # devices are not in step
        self._key: tuple[int, int] | None = None
        self._phases: list[MotionPhase] = []

    def phase_at(self, ts_ns: int) -> MotionPhase:
        """The motion phase that holds ``ts_ns`` (nanoseconds since the epoch)."""
        loop, rest = divmod(ts_ns - self._offset_ns, self._period_ns)
        leg = bisect_right(self._leg_start_ns, rest) - 1
        if self._key != (loop, leg):
            self._key = (loop, leg)
            self._phases = self._plan(loop, leg, ts_ns - rest + self._leg_start_ns[leg])
        for phase in self._phases:
            if ts_ns < phase.t1_ns:
                return phase
        return self._phases[-1]

    def _plan(self, loop: int, leg: int, start_ns: int) -> list[MotionPhase]:
        rng = random.Random(f"{self.device_id}:{loop}:{leg}")
        harsh = rng.random() < HARSH_BRAKE_P
        arc, straight = self.legs[leg]
        drive = _drive(
            arc, straight, rng.uniform(*V_TURN), rng.uniform(*V_CRUISE), rng.uniform(1.0, 2.2),
            rng.uniform(0.8, 1.8), rng.uniform(*(HARSH_BRAKE if harsh else (1.5, 2.8))),
        )
        phases, t, elapsed = [], start_ns, 0.0
        for seconds, v0, a, piece, u0 in drive:
            elapsed += seconds
            t1 = start_ns + round(elapsed * NS)
            phases.append(MotionPhase(t, t1, v0, a, piece, u0))
            t = t1
        end_ns = start_ns + self.leg_s[leg] * NS
        phases.append(MotionPhase(t, end_ns, 0.0, 0.0, straight, straight.length))  # wait
        return phases

    def lat_lon_alt(self, east: float, north: float) -> tuple[float, float, float]:
        alt = self.alt0 + 4.0 * math.sin(east / 700.0) + 3.0 * math.cos(north / 900.0)
        return self.lat0 + north / EARTH_R_M * DEG, self.lon0 + east / self._m_per_deg_lon, alt


# Readings are built with Reading.trusted (no re-validation, ~7 us each, more than generating
# one): identifiers and value names are checked once per source by building a probe Reading
# the checked way, and every value below is a finite float or small int by construction.
# tests/sensors/test_sim.py checks generated readings with attrs.validate.
_reading = Reading.trusted


class SimulatedSource:
    """Synthetic readings of one sensor (``kind`` imu, gps or engine) at ``rate_hz``.

    Reading ``k`` has the timestamp ``start_ns + k / rate_hz`` (integer ns, exact); `due`
    returns the next readings whose time has come and keeps its place, so a caller that stops
    pulling (back-pressure) loses nothing. Same arguments, same readings: noise comes from
    ``random.Random(seed)`` drawn in reading order, the motion from ``VehicleMotion``.
    """

    def __init__(
        self, kind: str, rate_hz: float, device_id: str, sensor_id: str, seed: int, start_ns: int
    ) -> None:
        if kind not in SENSOR_KINDS:
            choices = ", ".join(SENSOR_KINDS)
            raise ValueError(f"sim sensor kind must be one of {choices} (got {kind!r})")
        if not rate_hz > 0:
            raise ValueError(f"sim sensor rate_hz must be > 0 (got {rate_hz!r})")
        # Checked once: identifiers, start time and value names (raises MessageValidationError).
        Reading(device_id, sensor_id, start_ns, kind, dict.fromkeys(VALUE_NAMES[kind], 0.0))
        self.kind, self.rate_hz, self.seed = kind, rate_hz, seed
        self.device_id, self.sensor_id, self.start_ns = device_id, sensor_id, start_ns
        rate = Fraction(rate_hz).limit_denominator(1_000_000)
        # ts_k = start_ns + k * _num // _den  (period = 1e9 / rate ns, kept as a fraction)
        self._num, self._den = NS * rate.denominator, rate.numerator
        self._next_k = 0
        self.motion = VehicleMotion(device_id)
        self._phase = self.motion.phase_at(start_ns)
        self._rng = random.Random(seed)
        self._generate = getattr(self, f"_{kind}")
        getattr(self, f"_setup_{kind}")()

    @classmethod
    def from_settings(
        cls, sensor: SensorSettings, device_id: str, start_ns: int
    ) -> SimulatedSource:
        """The source of a ``[[sensors]]`` entry; ``device_id`` is the resolved one
        (``GatewayConfig.device_of``)."""
        return cls(sensor.kind, sensor.rate_hz, device_id, sensor.id, sensor.seed, start_ns)

    def ts_of(self, k: int) -> int:
        """The timestamp of reading ``k`` (ns since the epoch)."""
        return self.start_ns + k * self._num // self._den

    @property
    def next_ts(self) -> int:
        """When the next reading is due (ns since the epoch): when to wake up next."""
        return self.ts_of(self._next_k)

    def backlog(self, now_ns: int) -> int:
        """Readings due by ``now_ns`` but not pulled yet (held at the source)."""
        if now_ns < self.start_ns:
            return 0
        # the largest k with start + k*num//den <= now is ((now - start + 1)*den - 1)//num
        return ((now_ns - self.start_ns + 1) * self._den - 1) // self._num + 1 - self._next_k

    def due(self, now_ns: int, max_readings: int) -> list[Reading]:
        """The next readings with ``ts <= now_ns``, at most ``max_readings``, oldest first."""
        n = min(self.backlog(now_ns), max_readings)
        if n <= 0:
            return []
        k0 = self._next_k
        self._next_k = k0 + n
        return self._generate(k0, n)

    def _phase_for(self, ts: int) -> MotionPhase:
        phase = self._phase
        if not phase.t0_ns <= ts < phase.t1_ns:
            phase = self._phase = self.motion.phase_at(ts)
        return phase

    # ---- imu: ax, ay, az (m/s^2, gravity on +z), gx, gy, gz (deg/s); x forward, y left ------
    def _setup_imu(self) -> None:
        # Integer tables of bias + noise in sensor counts (1 mm/s^2, 0.01 deg/s), one per
        # channel, for standing and for moving (road vibration). Per reading 12 random bits
        # pick a row: cheap, and values come out already quantized (short JSON).
        rng, size = self._rng, 1 << NOISE_BITS
        bias = [rng.uniform(-40, 40) for _ in range(3)] + [rng.uniform(-30, 30) for _ in range(3)]
        normals = [[rng.gauss(0.0, 1.0) for _ in range(size)] for _ in range(6)]
        self._imu_tables = tuple(
            [
                [round(b + s * z) for z in col]
                for b, s, col in zip(bias, sigmas, normals, strict=True)
            ]
            for sigmas in ((15, 15, 15, 4, 4, 4), (90, 70, 120, 35, 35, 25))
        )

    def _imu(self, k0: int, n: int) -> list[Reading]:
        out: list[Reading] = []
        reading, dev, sid, start = _reading, self.device_id, self.sensor_id, self.start_ns
        num, den = self._num, self._den
        bits, az = self._rng.getrandbits, round(G * 1000.0)
        t0 = t1 = 0
        for k in range(k0, k0 + n):
            ts = start + k * num // den
            if not t0 <= ts < t1:
                # a new motion phase: its constants, in sensor counts
                phase = self._phase_for(ts)
                t0, t1, v0, a, curv = phase.t0_ns, phase.t1_ns, phase.v0, phase.a, phase.piece.k
                tax, tay, taz, tgx, tgy, tgz = self._imu_tables[v0 > 0.0 or a > 0.0]
                ax, ay, gz = round(a * 1000.0), 0, 0
            if curv != 0.0:
                # cornering: lateral ay = v^2 * k (left positive), yaw rate gz = v * k
                # (anticlockwise positive), where k > 0 turns right
                v = v0 + a * (ts - t0) * 1e-9
                ay, gz = round(-v * v * curv * 1000.0), round(-v * curv * DEG * 100.0)
            i = bits(NOISE_BITS)
            values = {
                "ax": (ax + tax[i]) / 1000, "ay": (ay + tay[i]) / 1000,
                "az": (az + taz[i]) / 1000, "gx": tgx[i] / 100, "gy": tgy[i] / 100,
                "gz": (gz + tgz[i]) / 100,
            }
            out.append(reading(dev, sid, ts, "imu", values))
        return out

    def _setup_normals(self, width: int) -> None:
        # Rows of standard normal noise, one row picked per reading by 12 random bits
        # (a Random.gauss call per value would cost more than the rest of the reading).
        gauss = self._rng.gauss
        self._z = [tuple(gauss(0.0, 1.0) for _ in range(width)) for _ in range(1 << NOISE_BITS)]

    # ---- gps: lat, lon (deg), alt_m, speed_kmh, course_deg, fix (1: 2D, 2: 3D), sats, hdop ----
    def _setup_gps(self) -> None:
        self._setup_normals(6)
        # Position errors drift (~30 s correlation) rather than jump at every fix.
        self._gps_err = [0.0, 0.0, 0.0]
        self._gps_rho = math.exp(-1.0 / (30.0 * self.rate_hz))
        self._sky = (self._rng.uniform(0, 2 * math.pi), self._rng.uniform(0, 2 * math.pi))

    def _gps(self, k0: int, n: int) -> list[Reading]:
        bits, rows, err, rho = self._rng.getrandbits, self._z, self._gps_err, self._gps_rho
        step = math.sqrt(1.0 - rho * rho)
        out = []
        for k in range(k0, k0 + n):
            ts = self.ts_of(k)
            phase = self._phase_for(ts)
            east, north, course = phase.where(ts)
            v = phase.speed(ts)
            z = rows[bits(NOISE_BITS)]
            # Satellites in view change slowly with the sky and the buildings; with few of
            # them the receiver falls back to a 2D fix and the dilution of precision grows.
            t = ts * 1e-9
            sky = 3.5 * math.sin(t / 143.0 + self._sky[0]) + 2.0 * math.sin(t / 35.0 + self._sky[1])
            sats = min(16, max(3, round(10.5 + sky)))
            hdop = 12.0 / sats - 0.3 + 0.05 * abs(z[3])
            for j in range(3):
                err[j] = rho * err[j] + step * z[j]
            sigma = 1.2 * hdop
            lat, lon, alt = self.motion.lat_lon_alt(east + sigma * err[0], north + sigma * err[1])
            if v > 0.5:  # at a standstill the receiver holds the last course
                course += 0.005 * z[5]
            values = {
                "lat": round(lat * 1e6) / 1e6, "lon": round(lon * 1e6) / 1e6,
                "alt_m": round((alt + 2.0 * sigma * err[2]) * 10.0) / 10,
                "speed_kmh": round(max(0.0, v + 0.05 * z[4]) * 36.0) / 10,
                "course_deg": round(course * DEG % 360.0 * 10.0) % 3600 / 10,
                "fix": 2 if sats >= 6 else 1, "sats": sats, "hdop": round(hdop * 10.0) / 10,
            }
            out.append(_reading(self.device_id, self.sensor_id, ts, self.kind, values))
        return out

    # ---- engine: rpm, speed_kmh, coolant_c, throttle_pct, oil_kpa, battery_v -----------------
    def _setup_engine(self) -> None:
        self._setup_normals(5)
        self._coolant_phase = self._rng.uniform(0, 2 * math.pi)
        self._battery_v = self._rng.uniform(13.9, 14.4)  # alternator output (less at idle)

    def _engine(self, k0: int, n: int) -> list[Reading]:
        bits, rows, battery = self._rng.getrandbits, self._z, self._battery_v
        out = []
        for k in range(k0, k0 + n):
            ts = self.ts_of(k)
            phase = self._phase_for(ts)
            v, a = phase.speed(ts), phase.a
            z = rows[bits(NOISE_BITS)]
            if v < 0.3 and a <= 0.0:  # standing: idle, foot off the throttle
                rpm, throttle = IDLE_RPM, 0.0
            else:
                ratio = next(r for r, v_max in GEARS if v < v_max)
                rpm = v * 60.0 / (2 * math.pi * WHEEL_R_M) * ratio * FINAL_DRIVE
                if a > 0.0:  # pulling away slips the clutch above idle
                    rpm = max(rpm, 1300.0)
                rpm = max(rpm, IDLE_RPM)
                throttle = 0.0 if a < 0.0 else 18.0 + 25.0 * a if a > 0.0 else 6.0 + 0.9 * v
            rpm += 12.0 * z[0]
            # the thermostat holds the coolant near 89 C; it drifts with load and air flow
            coolant = 89.0 + 2.5 * math.sin(ts * 1e-9 / 290.0 + self._coolant_phase)
            coolant += 0.001 * (rpm - IDLE_RPM) + 0.05 * z[1]
            volts = battery - (0.3 if rpm < 900 else 0.0) + 0.02 * z[2]
            values = {
                "rpm": round(rpm), "speed_kmh": round(v * 36.0) / 10,
                "coolant_c": round(coolant * 10.0) / 10,
                "throttle_pct": round(min(1000.0, max(0.0, throttle * 10.0 + 3.0 * z[3]))) / 10,
                "oil_kpa": round(1100.0 + 0.9 * rpm + 30.0 * z[4]) / 10,
                "battery_v": round(volts * 100.0) / 100,
            }
            out.append(_reading(self.device_id, self.sensor_id, ts, self.kind, values))
        return out
