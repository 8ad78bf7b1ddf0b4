"""Window features: what the model sees of two seconds of one device's driving.

Where this sits on the data path: step 5. The model runner (and the trainer, through the very
same code) feeds every imu and engine reading of a device window into a `WindowAccumulator`;
when the window closes, `WindowAccumulator.features()` gives the model's input vector: 64
float32 values, in the order of `FEATURE_NAMES`, computed from streaming statistics (so an open
window is a few hundred numbers of state, persisted with the runner's cursor).

Feature set ``fleetgw.window.v1`` (a model's manifest names the feature set it was trained on;
a runner refuses a model whose feature set it does not compute):

- per channel of the imu (ax, ay, az in m/s^2, gx, gy, gz in deg/s) and of the engine (rpm,
  speed_kmh, coolant_c, throttle_pct, oil_kpa, battery_v): mean, std, min, max, and ``eq`` —
  the fraction of consecutive readings that repeat the previous value (a flat-lined channel);
- ``rpm_speed_mean`` / ``rpm_speed_std``: ln((rpm + 1) / (speed_kmh + 5)) per engine reading
  (the gear: a slipping clutch or a wrong rpm signal moves it off the usual values);
- ``imu_frozen`` / ``engine_frozen``: the fraction of readings identical to the previous one in
  every channel (a frozen sensor repeating its last reading).

Every statistic is independent of the sampling rate (no counts, no per-sample derivatives), so
a model trained at 50 Hz reads a 100 Hz IMU. Each feature belongs to one evidence group named
after the anomaly type it points at (`FEATURE_GROUPS`): the model's per-group reconstruction
error names the likely type of an anomaly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

FEATURE_SET = "fleetgw.window.v1"
#: Window length (windows are aligned to multiples of it on the record time).
WINDOW_NS = 2_000_000_000
#: The kinds of records the features are computed from, and their channels.
CHANNELS: dict[str, tuple[str, ...]] = {
    "imu": ("ax", "ay", "az", "gx", "gy", "gz"),
    "engine": ("rpm", "speed_kmh", "coolant_c", "throttle_pct", "oil_kpa", "battery_v"),
}
KINDS = tuple(CHANNELS)
#: A window needs at least this many readings of each kind (std and repeats need two).
MIN_READINGS = 2
#: The anomaly types of the training set, rules and labels (in this order everywhere).
ANOMALY_TYPES = (
    "harsh_braking",
    "impact",
    "overheating",
    "harsh_cornering",
    "rpm_speed_mismatch",
    "stuck_sensor",
)
#: The evidence group of each channel's level statistics (mean, std, min, max).
CHANNEL_GROUP = {
    "ax": "harsh_braking",
    "ay": "harsh_cornering",
    "gz": "harsh_cornering",
    "az": "impact",
    "gx": "impact",
    "gy": "impact",
    "rpm": "rpm_speed_mismatch",
    "speed_kmh": "rpm_speed_mismatch",
    "throttle_pct": "rpm_speed_mismatch",
    "coolant_c": "overheating",
    "oil_kpa": "overheating",
    "battery_v": "overheating",
}
STATS = ("mean", "std", "min", "max", "eq")


def _feature_table() -> tuple[tuple[str, str], ...]:
    table = []
    for kind, channels in CHANNELS.items():
        del kind
        for ch in channels:
            for stat in STATS:
                group = "stuck_sensor" if stat == "eq" else CHANNEL_GROUP[ch]
                table.append((f"{ch}_{stat}", group))
    table += [
        ("rpm_speed_mean", "rpm_speed_mismatch"),
        ("rpm_speed_std", "rpm_speed_mismatch"),
        ("imu_frozen", "stuck_sensor"),
        ("engine_frozen", "stuck_sensor"),
    ]
    return tuple(table)


_TABLE = _feature_table()
#: The model's input, in order.
FEATURE_NAMES: tuple[str, ...] = tuple(name for name, _ in _TABLE)
#: The evidence group (an anomaly type) of each feature, in `FEATURE_NAMES` order.
FEATURE_GROUPS: tuple[str, ...] = tuple(group for _, group in _TABLE)
N_FEATURES = len(FEATURE_NAMES)
#: float32's largest finite value: a feature beyond it would be inf inside the model.
F32_MAX = 3.4028234663852886e38


class WindowProblem(ValueError):
    """A window the model cannot be given; the message is the reason an inference-error record
    carries (e.g. ``"engine: 0 readings (needs >= 2)"``)."""


class _Channel:
    """Streaming statistics of one channel: Welford mean/variance, min, max, repeats."""

    __slots__ = ("eq", "m2", "max", "mean", "min", "n", "prev")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.eq = 0
        self.prev: float | None = None

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x
        if x == self.prev:
            self.eq += 1
        self.prev = x

    def stats(self) -> tuple[float, float, float, float, float]:
        std = math.sqrt(max(self.m2, 0.0) / self.n)
        return self.mean, std, self.min, self.max, self.eq / (self.n - 1)

    def to_state(self) -> list[Any]:
        return [self.n, self.mean, self.m2, self.min, self.max, self.eq, self.prev]

    @classmethod
    def from_state(cls, state: list[Any]) -> _Channel:
        ch = cls()
        ch.n, ch.mean, ch.m2, ch.min, ch.max, ch.eq, ch.prev = state
        return ch


class _Stream:
    """The statistics of one sensor's readings of one kind within a window."""

    __slots__ = ("channels", "frozen", "n", "ratio")

    def __init__(self, kind: str) -> None:
        self.n = 0
        self.frozen = 0
        self.channels = [_Channel() for _ in CHANNELS[kind]]
        self.ratio = _Channel() if kind == "engine" else None

    def add(self, xs: list[float]) -> None:
        self.n += 1
        frozen = self.n > 1
        for ch, x in zip(self.channels, xs, strict=True):
            if x != ch.prev:
                frozen = False
            ch.add(x)
        if frozen:
            self.frozen += 1
        if self.ratio is not None:
            rpm, speed = xs[0], xs[1]
            # A negative rpm or speed is a broken signal; clamp so the log stays defined.
            self.ratio.add(math.log((max(rpm, 0.0) + 1.0) / (max(speed, 0.0) + 5.0)))

    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"n": self.n, "frozen": self.frozen,
                                 "ch": [c.to_state() for c in self.channels]}
        if self.ratio is not None:
            state["ratio"] = self.ratio.to_state()
        return state

    @classmethod
    def from_state(cls, kind: str, state: Mapping[str, Any]) -> _Stream:
        stream = cls(kind)
        stream.n, stream.frozen = state["n"], state["frozen"]
        stream.channels = [_Channel.from_state(c) for c in state["ch"]]
        if "ratio" in state:
            stream.ratio = _Channel.from_state(state["ratio"])
        return stream


def channel_values(kind: str, values: Mapping[str, Any]) -> list[float]:
    """The channels of one reading as floats, in `CHANNELS` order.

    Raises WindowProblem naming the first channel that is missing or not a number."""
    out = []
    for name in CHANNELS[kind]:
        x = values.get(name)
        if isinstance(x, bool) or not isinstance(x, int | float):
            what = "missing" if x is None else f"not a number ({x!r})"
            raise WindowProblem(f"{kind} value {name!r} is {what}")
        out.append(float(x))
    return out


class WindowAccumulator:
    """Everything one device window needs for its features, built one reading at a time.

    Readings of several sensors of one kind (two IMUs) are kept apart; the features use the
    kind's primary sensor: the one with the most readings in the window (ties: the smallest
    sensor id). The first invalid reading makes the window invalid (its problem is kept and
    reported when it closes); later readings are still counted.
    """

    __slots__ = ("n", "problem", "streams")

    def __init__(self) -> None:
        self.streams: dict[tuple[str, str], _Stream] = {}
        self.n = 0
        self.problem: str | None = None

    def add(self, kind: str, sensor_id: str, values: Mapping[str, Any]) -> None:
        """Add one reading of ``kind`` (one of `KINDS`) from ``sensor_id``."""
        self.n += 1
        try:
            xs = channel_values(kind, values)
        except WindowProblem as exc:
            if self.problem is None:
                self.problem = f"{exc} in a reading of sensor {sensor_id}"
            return
        key = (kind, sensor_id)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = _Stream(kind)
        stream.add(xs)

    def primary(self, kind: str) -> tuple[str, _Stream] | None:
        """The sensor id and statistics whose readings represent ``kind`` in this window."""
        best = None
        for (k, sensor_id), stream in self.streams.items():
            if k != kind:
                continue
            if best is None or (-stream.n, sensor_id) < (-best[1].n, best[0]):
                best = (sensor_id, stream)
        return best

    def sensors(self) -> dict[str, str]:
        """Kind -> the primary sensor id (for the inference record)."""
        out = {}
        for kind in KINDS:
            p = self.primary(kind)
            if p is not None:
                out[kind] = p[0]
        return out

    def counts(self) -> dict[str, int]:
        """Kind -> readings of the primary sensor."""
        out = {}
        for kind in KINDS:
            p = self.primary(kind)
            out[kind] = p[1].n if p is not None else 0
        return out

    def features(self) -> list[float]:
        """The model input (`FEATURE_NAMES` order). Raises WindowProblem with the reason when
        the window cannot be given to the model."""
        if self.problem is not None:
            raise WindowProblem(self.problem)
        out: list[float] = []
        streams = {}
        for kind in KINDS:
            p = self.primary(kind)
            n = p[1].n if p is not None else 0
            if n < MIN_READINGS:
                raise WindowProblem(f"{kind}: {n} readings (needs >= {MIN_READINGS})")
            streams[kind] = p[1]
        for kind in KINDS:
            for ch in streams[kind].channels:
                out.extend(ch.stats())
        engine = streams["engine"]
        assert engine.ratio is not None
        ratio = engine.ratio.stats()
        out += [ratio[0], ratio[1]]
        out += [streams["imu"].frozen / (streams["imu"].n - 1),
                engine.frozen / (engine.n - 1)]
        check_features(out)
        return out

    def to_state(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "problem": self.problem,
            "streams": [[k, s, st.to_state()] for (k, s), st in self.streams.items()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> WindowAccumulator:
        acc = cls()
        acc.n, acc.problem = state["n"], state["problem"]
        acc.streams = {(k, s): _Stream.from_state(k, st) for k, s, st in state["streams"]}
        return acc


def check_features(xs: list[float] | Any) -> None:
    """Raise WindowProblem unless ``xs`` is `N_FEATURES` finite values within float32 range."""
    if len(xs) != N_FEATURES:
        raise WindowProblem(f"{len(xs)} features (the model takes {N_FEATURES})")
    for name, x in zip(FEATURE_NAMES, xs, strict=True):
        if not math.isfinite(x) or abs(x) > F32_MAX:
            raise WindowProblem(f"feature {name} is {x!r} (needs a finite float32)")


@attrs.frozen(slots=True)
class FeatureSpec:
    """What a model's input is: the feature set, names and window (stored in its manifest)."""

    feature_set: str = FEATURE_SET
    names: tuple[str, ...] = FEATURE_NAMES
    groups: tuple[str, ...] = FEATURE_GROUPS
    window_ns: int = WINDOW_NS

    def to_json(self) -> dict[str, Any]:
        return {"feature_set": self.feature_set, "names": list(self.names),
                "groups": list(self.groups), "window_ns": self.window_ns}
