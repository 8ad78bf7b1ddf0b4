"""Aggregation of P3 metrics: tumbling windows per stream, exact statistics per field.

Where this sits on the data path: step 4, for records of a P3 rule with ``aggregate``. Each
stream (device, sensor, rule) has windows ``[k*window_s, (k+1)*window_s)`` on the record time.
A window closes when a record of its stream arrives with a ts at or beyond its end, or on
`Aggregator.flush`; a closed window becomes one `Aggregate` — the record the router writes
(kind ``agg:<rule>``) and the uplink syncs, while the raw records stay local until evicted (I7).

Every raw record lands in exactly one window: a record that arrives for a window already closed
(ts stepped back, e.g. a batch resent after a crash) opens a *late* window that closes at once,
so it is aggregated by itself rather than lost or counted twice. A record whose journal position
is not beyond the last one its stream took is ignored (already aggregated), so replaying records
after a restore never emits anything twice.

Statistics are exact and order-independent: count, min, max, last (the value of the latest ts;
ties: the later arrival), mean (the correctly rounded sum — `math.fsum`, kept as exact partial
sums — over the count, clamped to [min, max]) and median (`statistics.median` of the values,
which are kept only when the median is asked for). The state is a JSON-able dict
(`to_state`/`from_state`) that the router persists with its cursor (I4).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from actors.router.verdict import STATE_VERSION, Keyed, StreamKey, check_state_version
from config.policy import AggregateSpec, Rule
from messages.readings import MAX_VALUES, Reading

#: Values of an aggregate reading besides the per-field statistics.
HEADER = ("window_start", "window_end", "count", "first_pos", "last_pos", "first_seq",
          "last_seq", "late", "skipped_fields")
#: Value names are at most 128 characters: "<field>.<stat>" must fit.
MAX_FIELD_NAME = 128 - len(".median")
_NOTHING: tuple[Aggregate, ...] = ()


@attrs.frozen
class Aggregate:
    """The statistics of one closed window of one stream.

    ``fields`` maps a field name to its statistics (``{"min": .., "mean": ..}``, in STATS
    order); a mean or median that overflows a double is None. ``first_pos``/``last_pos`` and
    ``first_seq``/``last_seq`` bound the raw records covered (other streams' records may lie
    between). ``late``: the window had closed before these records arrived, so another
    aggregate may cover other records of the same window. ``skipped_fields``: fields left out
    (name too long, or more fields than an aggregate record can carry).
    """

    device_id: str
    sensor_id: str
    rule: str
    window_start_ns: int
    window_end_ns: int
    count: int
    first_pos: int
    last_pos: int
    first_seq: int
    last_seq: int
    late: bool
    fields: Mapping[str, Mapping[str, float | int | None]]
    skipped_fields: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return f"agg:{self.rule}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return {
            "device_id": self.device_id, "sensor_id": self.sensor_id, "kind": self.kind,
            "rule": self.rule, "window_start": self.window_start_ns,
            "window_end": self.window_end_ns, "count": self.count,
            "first_pos": self.first_pos, "last_pos": self.last_pos,
            "first_seq": self.first_seq, "last_seq": self.last_seq, "late": self.late,
            "fields": {f: dict(s) for f, s in self.fields.items()},
            "skipped_fields": list(self.skipped_fields),
        }

    def to_reading(self) -> Reading:
        """The record the router writes: ts = window start, kind ``agg:<rule>``, values the
        header plus ``<field>.<stat>`` (statistics that are None are left out)."""
        values: dict[str, Any] = {
            "window_start": self.window_start_ns, "window_end": self.window_end_ns,
            "count": self.count, "first_pos": self.first_pos, "last_pos": self.last_pos,
            "first_seq": self.first_seq, "last_seq": self.last_seq, "late": self.late,
        }
        if self.skipped_fields:
            values["skipped_fields"] = len(self.skipped_fields)
        for f, stats in self.fields.items():
            values.update((f"{f}.{s}", v) for s, v in stats.items() if v is not None)
        return Reading(self.device_id, self.sensor_id, self.window_start_ns, self.kind, values)


def _add_partial(partials: list[float], x: float) -> bool:
    """Add x to the exact sum held as non-overlapping partials (Shewchuk, as math.fsum does).
    False when the sum overflowed."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]
    return math.isfinite(x)


#: A record at least this much older than its stream's latest (and two windows) means the
#: wall clock stepped back; anything closer is a late record (a resend after a crash).
STEP_BACK_NS = 60 * 10**9


class _Field:
    """One field's running statistics in one window."""

    __slots__ = ("hi", "last", "last_ts", "lo", "n", "partials", "values")

    def __init__(self, v: float, ts: int, keep_sum: bool, keep_values: bool) -> None:
        self.n, self.lo, self.hi, self.last, self.last_ts = 1, v, v, v, ts
        self.partials: list[float] | None = [float(v)] if keep_sum else None
        self.values: list[float] | None = [v] if keep_values else None

    def add(self, v: float, ts: int) -> None:
        self.n += 1
        if v < self.lo:
            self.lo = v
        elif v > self.hi:
            self.hi = v
        if self.partials is not None and not _add_partial(self.partials, float(v)):
            self.partials = None  # the sum overflowed a double: no mean
        if self.values is not None:
            self.values.append(v)
        if ts >= self.last_ts:
            self.last, self.last_ts = v, ts

    def stat(self, name: str) -> float | int | None:
        if name == "count":
            return self.n
        if name == "min":
            return self.lo
        if name == "max":
            return self.hi
        if name == "last":
            return self.last
        if name == "mean":
            if self.partials is None:
                return None
            try:
                mean = math.fsum(self.partials) / self.n
            except OverflowError:
                return None
            return min(max(mean, self.lo), self.hi)
        assert name == "median" and self.values is not None
        median = statistics.median(self.values)
        return median if math.isfinite(median) else None

    def to_state(self) -> list[Any]:
        return [self.n, self.lo, self.hi, self.partials, self.values, self.last, self.last_ts]

    @classmethod
    def from_state(cls, s: list[Any]) -> _Field:
        f = cls.__new__(cls)
        f.n, f.lo, f.hi, f.partials, f.values, f.last, f.last_ts = s
        return f


class _Window:
    """One open window of one stream, with the spec it was opened under (a window outlives a
    policy reload with the statistics it started with)."""

    __slots__ = ("acc", "count", "end", "fields", "keep_sum", "keep_values", "late",
                 "max_fields", "pos_hi", "pos_lo", "seq_hi", "seq_lo", "skipped", "start",
                 "stats")

    def __init__(self, start: int, end: int, late: bool, stats: tuple[str, ...],
                 fields: tuple[str, ...] | None) -> None:
        self.start, self.end, self.late, self.stats, self.fields = start, end, late, stats, fields
        self.keep_sum, self.keep_values = "mean" in stats, "median" in stats
        self.max_fields = (MAX_VALUES - len(HEADER)) // len(stats)
        self.count = 0
        self.pos_lo = self.pos_hi = self.seq_lo = self.seq_hi = 0
        self.acc: dict[str, _Field] = {}
        self.skipped: list[str] = []

    def add(self, ts: int, pos: int, seq: int, values: Mapping[str, Any]) -> None:
        if self.count == 0:
            self.pos_lo = self.pos_hi = pos
            self.seq_lo = self.seq_hi = seq
        else:  # positions grow within a stream; seqs normally do too
            self.pos_hi = max(self.pos_hi, pos)
            self.seq_lo, self.seq_hi = min(self.seq_lo, seq), max(self.seq_hi, seq)
        self.count += 1
        acc = self.acc
        items: Iterable[tuple[str, Any]] = values.items() if self.fields is None else (
            (f, values[f]) for f in self.fields if f in values)
        for name, v in items:
            t = type(v)
            if t is not float and t is not int:
                continue  # strings, bools: not aggregated
            a = acc.get(name)
            if a is not None:
                a.add(v, ts)
            elif len(acc) < self.max_fields and len(name) <= MAX_FIELD_NAME:
                acc[name] = _Field(v, ts, self.keep_sum, self.keep_values)
            elif name not in self.skipped:
                self.skipped.append(name)

    def result(self, key: StreamKey) -> Aggregate:
        return Aggregate(
            key[0], key[1], key[2], self.start, self.end, self.count, self.pos_lo,
            self.pos_hi, self.seq_lo, self.seq_hi, self.late,
            {name: {s: a.stat(s) for s in self.stats} for name, a in self.acc.items()},
            tuple(self.skipped),
        )

    def to_state(self) -> dict[str, Any]:
        return {
            "start": self.start, "end": self.end, "late": self.late, "stats": list(self.stats),
            "fields": None if self.fields is None else list(self.fields), "count": self.count,
            "pos": [self.pos_lo, self.pos_hi], "seq": [self.seq_lo, self.seq_hi],
            "skipped": list(self.skipped),
            "acc": {name: a.to_state() for name, a in self.acc.items()},
        }

    @classmethod
    def from_state(cls, s: Mapping[str, Any]) -> _Window:
        fields = s["fields"]
        w = cls(s["start"], s["end"], s["late"], tuple(s["stats"]),
                None if fields is None else tuple(fields))
        w.count = s["count"]
        w.pos_lo, w.pos_hi = s["pos"]
        w.seq_lo, w.seq_hi = s["seq"]
        w.skipped = list(s["skipped"])
        w.acc = {name: _Field.from_state(a) for name, a in s["acc"].items()}
        return w


class _Stream:
    """One stream's open windows; ``high_ts``: the latest ts seen (windows ending at or
    before it are closed); ``last_pos``: the latest journal position taken."""

    __slots__ = ("current", "high_ts", "last_pos", "min_end", "windows")

    def __init__(self, high_ts: int = -1, last_pos: int = 0) -> None:
        self.high_ts, self.last_pos = high_ts, last_pos
        self.windows: dict[tuple[int, int], _Window] = {}
        self.current: _Window | None = None
        self.min_end = math.inf

    def open(self, w: _Window) -> None:
        self.windows[(w.start, w.end)] = w
        self.min_end = min(self.min_end, w.end)


class Aggregator:
    """Tumbling-window aggregation for P3 rules, per stream (device, sensor, rule)."""

    def __init__(self) -> None:
        self._streams: dict[StreamKey, _Stream] = {}
        #: Every window ending at or before this ts is closed (`flush`); 0: never flushed.
        self.flushed_ns = 0

    def open_windows(self) -> int:
        return sum(len(s.windows) for s in self._streams.values())

    def add(self, record: Keyed, rule: Rule, values: Mapping[str, Any]) -> tuple[Aggregate, ...]:
        """Add a journal record (with ``pos``, ``seq``) under ``rule.aggregate``; return the
        aggregates of the windows of its stream that this record closed (oldest first)."""
        spec: AggregateSpec | None = rule.aggregate
        assert spec is not None, f"{rule.where} has no aggregate"
        key = (record.device_id, record.sensor_id, rule.name)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        pos = record.pos  # type: ignore[attr-defined]
        pos = pos if type(pos) is int else pos.value
        if pos <= st.last_pos:
            return _NOTHING  # already aggregated (a replay after a restore)
        st.last_pos = pos
        ts = record.ts
        stepped: tuple[Aggregate, ...] = ()
        if st.high_ts - ts > max(STEP_BACK_NS, 2 * spec.window_ns):
            # 0. Far behind the stream's latest ts: the wall clock stepped back (a Pi setting
            #    its clock), not a resend. Close what the stream has open and start over at
            #    this record; otherwise every record until the clock catches up would be a
            #    late window of its own (one aggregate per record).
            stepped = self._close(key, st, math.inf)
            st.high_ts = -1
        # 1. the record's window: usually the stream's current one
        w = st.current
        if w is None or not (w.start <= ts < w.end) or w.end - w.start != spec.window_ns:
            wns = spec.window_ns
            start = ts - ts % wns
            w = st.windows.get((start, start + wns))
            if w is None:
                closed_to = max(st.high_ts, self.flushed_ns)
                w = _Window(start, start + wns, start + wns <= closed_to, spec.stats, spec.fields)
                st.open(w)
            st.current = w
        w.add(ts, pos, record.seq, values)  # type: ignore[attr-defined]
        # 2. windows this record closed (and a late window, at once)
        if ts > st.high_ts:
            st.high_ts = ts
        closed_to = st.high_ts if st.high_ts > self.flushed_ns else self.flushed_ns
        if st.min_end <= closed_to:
            return stepped + self._close(key, st, closed_to)
        return stepped

    def flush(self, until_ts: int) -> tuple[Aggregate, ...]:
        """Close every window ending at or before ``until_ts`` (a stream gone quiet, a
        shutdown). Records that arrive later for such a window are aggregated as late windows,
        so call it with a time the journal is known to have passed."""
        self.flushed_ns = max(self.flushed_ns, until_ts)
        out: list[Aggregate] = []
        for key in sorted(self._streams):
            st = self._streams[key]
            if st.min_end <= self.flushed_ns:
                out.extend(self._close(key, st, self.flushed_ns))
        return tuple(out)

    @staticmethod
    def _close(key: StreamKey, st: _Stream, closed_to: int) -> tuple[Aggregate, ...]:
        done = sorted(k for k, w in st.windows.items() if w.end <= closed_to)
        out = tuple(st.windows.pop(k).result(key) for k in done)
        st.min_end = min((w.end for w in st.windows.values()), default=math.inf)
        if st.current is not None and st.current.end <= closed_to:
            st.current = None
        return out

    def to_state(self) -> dict[str, Any]:
        """JSON-able state: per stream its high ts, last position and open windows (with
        their exact partial sums and, for the median, their values)."""
        return {
            "version": STATE_VERSION,
            "flushed_ns": self.flushed_ns,
            "streams": [
                {"device_id": d, "sensor_id": s, "rule": r, "high_ts": st.high_ts,
                 "last_pos": st.last_pos,
                 "windows": [st.windows[k].to_state() for k in sorted(st.windows)]}
                for (d, s, r), st in sorted(self._streams.items())
            ],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Aggregator:
        """The aggregator `to_state` described. Raises ValueError for another version."""
        check_state_version(state, "aggregator")
        agg = cls()
        agg.flushed_ns = state["flushed_ns"]
        for s in state["streams"]:
            st = agg._streams[(s["device_id"], s["sensor_id"], s["rule"])] = _Stream(
                s["high_ts"], s["last_pos"])
            for ws in s["windows"]:
                st.open(_Window.from_state(ws))
        return agg
