"""Deduplication of P2 navigation snapshots: drop what repeats the last kept record.

Where this sits on the data path: step 4, for records of a P2 rule with ``dedup`` (after
sampling): a record within ``window_s`` of the last record kept from its stream is dropped when
its compared fields are identical to that record's and (with ``min_distance_m``) its position
moved less than that distance. Anything that cannot be shown to repeat — a changed or missing
field, a missing position, a record a window away — is kept.

The state (per stream: the last kept record's time, compared values and position) is a plain
JSON-able dict (`to_state`/`from_state`) that the router persists with its cursor (I4), so a
restarted router decides exactly as an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from actors.router.verdict import (
    CHANGED,
    DUPLICATE,
    FIRST,
    MOVED,
    NEAR,
    NO_POSITION,
    STATE_VERSION,
    WINDOW,
    Keyed,
    StreamKey,
    Verdict,
    check_state_version,
)
from config.policy import DedupSpec, Rule

#: Mean Earth radius (IUGG), metres — as the simulator uses.
EARTH_R_M = 6_371_008.8

_KEEP_FIRST = Verdict(True, FIRST, "first record of its stream")
_KEEP_WINDOW = Verdict(True, WINDOW, "the last kept record is a window or more away")
_KEEP_NO_POSITION = Verdict(True, NO_POSITION, "no position to compare")


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (haversine; degrees in)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_R_M * math.asin(min(1.0, math.sqrt(h)))


def same_value(a: object, b: object) -> bool:
    """Identical as JSON values: equal and of the same type (1, 1.0 and true all differ)."""
    return type(a) is type(b) and a == b


def _position(values: Mapping[str, Any], spec: DedupSpec) -> tuple[float, float] | None:
    lat, lon = values.get(spec.lat_field), values.get(spec.lon_field)
    if type(lat) not in (int, float) or type(lon) not in (int, float):
        return None
    return float(lat), float(lon)


class _Last:
    """The last kept record of a stream: its ts, the values compared, its position."""

    __slots__ = ("pos", "ts", "values")

    def __init__(self, ts: int, values: dict[str, Any], pos: tuple[float, float] | None) -> None:
        self.ts, self.values, self.pos = ts, values, pos


class Deduplicator:
    """Keep/drop decisions for P2 records, per stream (device, sensor, rule)."""

    def __init__(self) -> None:
        self._last: dict[StreamKey, _Last] = {}

    def __len__(self) -> int:
        return len(self._last)

    def offer(self, record: Keyed, rule: Rule, values: Mapping[str, Any]) -> Verdict:
        """Decide on ``record`` (whose decoded values are ``values``) under ``rule.dedup``;
        a kept record becomes the stream's new reference."""
        spec = rule.dedup
        assert spec is not None, f"{rule.where} has no dedup"
        key = (record.device_id, record.sensor_id, rule.name)
        ts = record.ts
        last = self._last.get(key)
        if last is None:
            verdict = _KEEP_FIRST
        elif abs(ts - last.ts) >= spec.window_ns:
            verdict = _KEEP_WINDOW
        else:
            verdict = self._within_window(spec, last, ts, values)
            if not verdict.keep:
                return verdict
        self._last[key] = _Last(ts, _compared(spec, values), _position(values, spec)
                                if spec.min_distance_m else None)
        return verdict

    @staticmethod
    def _within_window(spec: DedupSpec, last: _Last, ts: int,
                       values: Mapping[str, Any]) -> Verdict:
        # 1. compared fields: any difference (or a field present in one only) keeps it
        if spec.fields is None:
            if values != last.values or any(
                type(v) is not type(last.values[k]) for k, v in values.items()
            ):
                return Verdict(True, CHANGED, "a value differs from the last kept record")
        else:
            for f in spec.fields:
                if f in values:
                    if f not in last.values or not same_value(values[f], last.values[f]):
                        return Verdict(True, CHANGED, f"{f} differs from the last kept record")
                elif f in last.values:
                    return Verdict(True, CHANGED, f"{f} is missing, the last kept record had it")
        ago = f"{abs(ts - last.ts) / 1e9:g} s"
        if not spec.min_distance_m:
            return Verdict(False, DUPLICATE, f"identical to the last kept record {ago} ago")
        # 2. position: moved at least the distance keeps it; no position keeps it
        here = _position(values, spec)
        if here is None or last.pos is None:
            return _KEEP_NO_POSITION
        moved = distance_m(last.pos[0], last.pos[1], here[0], here[1])
        if moved >= spec.min_distance_m:
            return Verdict(True, MOVED, f"moved {moved:.1f} m >= {spec.min_distance_m:g} m")
        return Verdict(False, NEAR, f"moved {moved:.1f} m < {spec.min_distance_m:g} m since the "
                                    f"last kept record {ago} ago")

    def to_state(self) -> dict[str, Any]:
        """JSON-able state: per stream the last kept record's ts, compared values, position."""
        return {
            "version": STATE_VERSION,
            "streams": [
                {"device_id": d, "sensor_id": s, "rule": r, "ts": last.ts,
                 "values": dict(last.values),
                 "position": None if last.pos is None else list(last.pos)}
                for (d, s, r), last in sorted(self._last.items())
            ],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Deduplicator:
        """The deduplicator `to_state` described. Raises ValueError for another version."""
        check_state_version(state, "dedup")
        dedup = cls()
        for s in state["streams"]:
            pos = s["position"]
            dedup._last[(s["device_id"], s["sensor_id"], s["rule"])] = _Last(
                s["ts"], dict(s["values"]), None if pos is None else (pos[0], pos[1]))
        return dedup


def _compared(spec: DedupSpec, values: Mapping[str, Any]) -> dict[str, Any]:
    if spec.fields is None:
        return dict(values)
    return {f: values[f] for f in spec.fields if f in values}

