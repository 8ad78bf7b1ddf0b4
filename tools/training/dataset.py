"""A seeded synthetic driving data set: labelled 2-s device windows and their features.

Where this sits: training, offline. The readings come from the gateway's own simulator
(actors/sensors/sim.py: one imu at 50 Hz and one engine sensor at 10 Hz per device) and the
features from the runtime's own `WindowAccumulator` (actors/model_runner/features.py), so the
model is trained on exactly what the runner will compute.

Splits use different devices (so different routes, noise and sensor seeds): ``train`` and
``validation`` hold normal windows only (the autoencoder and its threshold); ``test`` holds
normal windows, the simulator's own rare harsh stops (a motion phase braking harder than
0.45 g labels its windows ``harsh_braking``) and, for every anomaly type, copies of normal
test windows with an injected anomaly of seeded, randomised magnitude and timing. A share of
the injected anomalies is ``subtle`` (about half strength, or a sensor sticking mid-window),
below most of the rules' thresholds. Everything is a pure function of the seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from actors.model_runner.features import ANOMALY_TYPES, CHANNELS, WINDOW_NS, WindowAccumulator
from actors.sensors.sim import DEG, IDLE_RPM, NS, G, SimulatedSource, VehicleMotion

IMU_HZ, ENGINE_HZ = 50, 10
IMU_SENSOR, ENGINE_SENSOR = "imu0", "engine0"
#: All devices start at this (window-aligned) time; their motion models are not in step.
START_NS = 1_800_000_000 * NS
WINDOW_S = WINDOW_NS / NS
NORMAL = "normal"
DEFAULT_SEED = 20261127
SPLITS = ("train", "validation", "test")
#: A motion phase braking harder than this makes its windows natural harsh braking.
NATURAL_HARSH_MS2 = -0.45 * G
SUBTLE_SHARE = 0.3
#: Column of each channel in a window's imu / engine array.
AX, AY, AZ, GX, GY, GZ = range(6)
RPM, SPEED, COOLANT, THROTTLE = range(4)
#: 1 / resolution of each channel, as the simulator rounds it (injected values are rounded too).
SCALE = {"imu": np.array([1e3, 1e3, 1e3, 1e2, 1e2, 1e2]),
         "engine": np.array([1.0, 10.0, 10.0, 10.0, 10.0, 100.0])}


@dataclass(frozen=True)
class SplitSize:
    devices: int
    windows_per_device: int
    anomalies_per_type: int = 0


#: quick -> split -> size (the full set keeps generation + training near 40 s on two cores).
SIZES = {
    False: {"train": SplitSize(8, 600), "validation": SplitSize(4, 800),
            "test": SplitSize(4, 600, 250)},
    True: {"train": SplitSize(2, 300), "validation": SplitSize(1, 500),
           "test": SplitSize(2, 200, 40)},
}


@dataclass(frozen=True)
class Window:
    """One device window: its readings as arrays (rows in time order, columns in
    `CHANNELS` order) and its ground truth. ``variant``: ``sim`` (as simulated), ``natural``
    (a simulated harsh stop), ``full`` or ``subtle`` (injected)."""

    device_id: str
    index: int
    imu: np.ndarray
    engine: np.ndarray
    label: str
    variant: str

    def readings(self) -> Iterator[tuple[str, str, dict[str, float]]]:
        """(kind, sensor_id, values) of every reading, as the runner would see them."""
        for kind, sensor, rows in (("imu", IMU_SENSOR, self.imu),
                                   ("engine", ENGINE_SENSOR, self.engine)):
            for row in rows.tolist():
                yield kind, sensor, dict(zip(CHANNELS[kind], row, strict=True))

    def features(self) -> list[float]:
        acc = WindowAccumulator()
        for kind, sensor, values in self.readings():
            acc.add(kind, sensor, values)
        return acc.features()


@dataclass(frozen=True)
class Split:
    name: str
    devices: tuple[str, ...]
    windows: list[Window]
    X: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return np.array([w.label for w in self.windows])

    def counts(self, variant: str | None = None) -> dict[str, int]:
        """Windows per label (of one ``variant`` only, e.g. ``subtle``, when given)."""
        labels = [w.label for w in self.windows if variant in (None, w.variant)]
        return {label: labels.count(label) for label in sorted(set(labels))}


def _brakes_harshly(motion: VehicleMotion, t0_ns: int, t1_ns: int) -> bool:
    t = t0_ns
    while t < t1_ns:
        phase = motion.phase_at(t)
        if phase.a < NATURAL_HARSH_MS2:
            return True
        t = phase.t1_ns
    return False


def device_windows(device_id: str, seed: int, n_windows: int) -> list[Window]:
    """``n_windows`` consecutive windows of one simulated device (imu seed ``seed``, engine
    seed ``seed + 1``), labelled normal or natural harsh braking."""
    end_ns = START_NS + n_windows * WINDOW_NS - 1
    arrays = {}
    for kind, rate, sensor, sensor_seed in (("imu", IMU_HZ, IMU_SENSOR, seed),
                                            ("engine", ENGINE_HZ, ENGINE_SENSOR, seed + 1)):
        source = SimulatedSource(kind, rate, device_id, sensor, sensor_seed, START_NS)
        readings = source.due(end_ns, n_windows * rate * round(WINDOW_S))
        values = [[r.values[name] for name in CHANNELS[kind]] for r in readings]
        arrays[kind] = np.array(values, dtype=np.float64).reshape(n_windows, -1, 6)
    motion = VehicleMotion(device_id)
    out = []
    for i in range(n_windows):
        t0 = START_NS + i * WINDOW_NS
        harsh = _brakes_harshly(motion, t0, t0 + WINDOW_NS)
        out.append(Window(device_id, t0 // WINDOW_NS, arrays["imu"][i], arrays["engine"][i],
                          "harsh_braking" if harsh else NORMAL, "natural" if harsh else "sim"))
    return out


# ---- injected anomalies -------------------------------------------------------------------
RAMP_S = 0.25
IDLE_NOISE_RPM = 12.0
REDLINE_RPM = 6500.0
#: Relative size of the samples of an impact spike (1 to 3 samples long).
SPIKE_SHAPE = np.array([1.0, 0.6, 0.35])
IDLE_AT_SPEED_SHARE = 0.3
#: A channel that repeats itself more often than this in the window (a standing vehicle's
#: speed or throttle, a slow coolant) is not picked to stick alone: it would read as usual.
MAX_NATURAL_REPEATS = 0.15
#: An injector changes a window's copies in place: (imu, engine, rng, subtle) -> None.
Injector = Callable[[np.ndarray, np.ndarray, np.random.Generator, bool], None]


def _times(rows: np.ndarray, rate_hz: int) -> np.ndarray:
    return np.arange(len(rows)) / rate_hz


def _pulse(t: np.ndarray, start: float, duration: float) -> np.ndarray:
    """0 outside [start, start + duration], 1 inside, with half-cosine ramps of RAMP_S."""
    edge = np.clip(np.minimum(t - start, start + duration - t) / RAMP_S, 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * edge)


def _speed_at_imu(imu: np.ndarray, engine: np.ndarray) -> np.ndarray:
    """The engine's speed (m/s) interpolated to the imu's sample times."""
    return np.interp(_times(imu, IMU_HZ), _times(engine, ENGINE_HZ), engine[:, SPEED]) / 3.6


def harsh_braking(imu, engine, rng, subtle) -> None:
    """ax ramps to -0.5..-0.9 g (subtle: just past -0.45 g) for 0.5-2 s; the vehicle slows
    accordingly (speed, rpm with it, foot off the throttle) and may stop."""
    peak = rng.uniform(0.46, 0.55) * G if subtle else rng.uniform(0.5, 0.9) * G
    duration = rng.uniform(0.5, 0.8) if subtle else rng.uniform(0.5, 2.0)
    start = rng.uniform(0.0, WINDOW_S - duration)
    extra = _pulse(_times(imu, IMU_HZ), start, duration) * (peak + imu[:, AX].mean())
    stopped = np.cumsum(extra) / IMU_HZ >= _speed_at_imu(imu, engine)
    if stopped.any():
        extra[int(np.argmax(stopped)):] = 0.0
    imu[:, AX] -= extra
    t_engine = _times(engine, ENGINE_HZ)
    lost_kmh = 3.6 * np.interp(t_engine, _times(imu, IMU_HZ), np.cumsum(extra) / IMU_HZ)
    speed = np.maximum(engine[:, SPEED] - lost_kmh, 0.0)
    rpm = engine[:, RPM] * speed / engine[:, SPEED]
    idle = IDLE_RPM + IDLE_NOISE_RPM * rng.standard_normal(len(rpm))
    engine[:, RPM] = np.where(rpm < IDLE_RPM, idle, rpm)
    engine[:, SPEED] = speed
    engine[_pulse(t_engine, start, duration) > 0.0, THROTTLE] = 0.0


def impact(imu, engine, rng, subtle) -> None:
    """A 1-3 sample spike of 3-8 g (subtle: 1.5-3 g), mostly vertical with a longitudinal
    part, then damped ringing of the body in acceleration and roll/pitch rate."""
    del engine
    size = rng.uniform(1.5, 3.0) * G if subtle else rng.uniform(3.0, 8.0) * G
    n = int(rng.integers(1, 4))
    i0 = int(rng.integers(0, len(imu) - n))
    theta = rng.uniform(0.0, np.pi / 3)
    direction = np.array([np.sin(theta) * rng.choice((-1.0, 1.0)), 0.0,
                          np.cos(theta) * rng.choice((-1.0, 1.0))])
    spin = rng.uniform(20.0, 80.0, size=2) * rng.choice((-1.0, 1.0), size=2) * size / (8 * G)
    imu[i0:i0 + n, :3] += size * SPIKE_SHAPE[:n, None] * direction
    imu[i0:i0 + n, GX:GZ] += SPIKE_SHAPE[:n, None] * spin
    t = np.arange(1, len(imu) - i0 - n + 1) / IMU_HZ
    decay = np.exp(-t / rng.uniform(0.05, 0.15))
    ring = decay * np.sin(2 * np.pi * rng.uniform(8.0, 20.0) * t)
    imu[i0 + n:, :3] += 0.25 * size * ring[:, None] * direction
    imu[i0 + n:, GX:GZ] += (decay * np.cos(2 * np.pi * rng.uniform(5.0, 15.0) * t))[:, None] * spin


def overheating(imu, engine, rng, subtle) -> None:
    """Coolant at 106-120 degC (subtle: 98-105, running hot below the rule), still rising."""
    del imu
    level = rng.uniform(98.0, 105.0) if subtle else rng.uniform(106.0, 120.0)
    t = _times(engine, ENGINE_HZ)
    coolant = engine[:, COOLANT]
    engine[:, COOLANT] = coolant - coolant.mean() + level + rng.uniform(0.0, 0.5) * (t - t.mean())


def harsh_cornering(imu, engine, rng, subtle) -> None:
    """Lateral ay of 4.5-8 m/s^2 (subtle: 3-4.5) either way for 1-2 s, with the yaw rate gz of
    a turn at that speed (ay / v)."""
    peak = rng.uniform(3.0, 4.5) if subtle else rng.uniform(4.5, 8.0)
    duration = rng.uniform(1.0, 2.0)
    lateral = rng.choice((-1.0, 1.0)) * peak * _pulse(
        _times(imu, IMU_HZ), rng.uniform(0.0, WINDOW_S - duration), duration)
    imu[:, AY] += lateral
    imu[:, GZ] += lateral / _speed_at_imu(imu, engine) * DEG


def rpm_speed_mismatch(imu, engine, rng, subtle) -> None:
    """The rpm signal disagrees with the wheel speed for the whole window: x1.6-2.5 (subtle:
    x1.3-1.5, a gear too low) or at idle while driving on above 30 km/h."""
    del imu
    rpm = engine[:, RPM]
    if not subtle and rng.random() < IDLE_AT_SPEED_SHARE:
        engine[:, RPM] = IDLE_RPM + IDLE_NOISE_RPM * rng.standard_normal(len(rpm))
    else:
        factor = rng.uniform(1.3, 1.5) if subtle else rng.uniform(1.6, 2.5)
        engine[:, RPM] = np.minimum(rpm * factor, REDLINE_RPM)


def stuck_sensor(imu, engine, rng, subtle) -> None:
    """The imu or the engine sensor repeats one reading, or one channel one value, from the
    window's start (subtle: from 30-50 % into it)."""
    mode = int(rng.integers(3))
    rows = (imu, engine)[mode if mode < 2 else int(rng.integers(2))]
    frm = int(rng.uniform(0.3, 0.5) * len(rows)) if subtle else 0
    if mode < 2:
        rows[frm:] = rows[frm]
        return
    repeats = (rows[1:] == rows[:-1]).mean(axis=0)
    channel = int(rng.choice(np.flatnonzero(repeats < MAX_NATURAL_REPEATS)))
    rows[frm:, channel] = rows[frm, channel]


#: Anomaly type -> (its injector, the slowest speed in km/h a base window needs).
INJECTORS: dict[str, tuple[Injector, float]] = {
    "harsh_braking": (harsh_braking, 20.0),
    "impact": (impact, 0.0),
    "overheating": (overheating, 0.0),
    "harsh_cornering": (harsh_cornering, 25.0),
    "rpm_speed_mismatch": (rpm_speed_mismatch, 32.0),
    "stuck_sensor": (stuck_sensor, 0.0),
}
assert tuple(INJECTORS) == ANOMALY_TYPES


def inject_anomalies(bases: list[Window], per_type: int, rng: np.random.Generator
                     ) -> list[Window]:
    """``per_type`` anomalous copies of ``bases`` (normal windows) for every anomaly type."""
    out = []
    for label, (inject, min_speed) in INJECTORS.items():
        eligible = [w for w in bases if w.engine[:, SPEED].min() >= min_speed]
        picks = rng.choice(len(eligible), size=per_type, replace=per_type > len(eligible))
        for i in picks.tolist():
            base = eligible[i]
            imu, engine = base.imu.copy(), base.engine.copy()
            subtle = bool(rng.random() < SUBTLE_SHARE)
            inject(imu, engine, rng, subtle)
            imu, engine = (np.round(a * SCALE[k]) / SCALE[k] for a, k in
                           ((imu, "imu"), (engine, "engine")))
            out.append(Window(base.device_id, base.index, imu, engine, label,
                              "subtle" if subtle else "full"))
    return out


def make_split(name: str, seed: int, quick: bool = False) -> Split:
    """One split of the data set of ``seed`` (each split is generated on its own)."""
    size, code = SIZES[quick][name], SPLITS.index(name)
    devices = tuple(f"sim-{seed}-{name}-{i:02d}" for i in range(size.devices))
    windows: list[Window] = []
    for i, device in enumerate(devices):
        windows += device_windows(device, seed * 1000 + code * 100 + 2 * i,
                                  size.windows_per_device)
    normal = [w for w in windows if w.label == NORMAL]
    if name == "test":
        rng = np.random.default_rng([seed, code])
        windows += inject_anomalies(normal, size.anomalies_per_type, rng)
    else:
        windows = normal
    X = np.array([w.features() for w in windows], dtype=np.float64)
    return Split(name, devices, windows, X)


def make_dataset(seed: int, quick: bool = False) -> dict[str, Split]:
    return {name: make_split(name, seed, quick) for name in SPLITS}


def data_sha256(splits: dict[str, Split]) -> str:
    """sha256 over every split's name, features (little-endian float64) and labels."""
    h = hashlib.sha256()
    for name, split in splits.items():
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(split.X, dtype="<f8").tobytes())
        h.update("\n".join(split.labels.tolist()).encode() + b"\0")
    return h.hexdigest()
