"""Device windows: which readings belong to which 2-second window, and when a window closes.

Where this sits on the data path: step 5, in the model runner, between the journal records it
reads and the features of `actors.model_runner.features`. Windows are tumbling, aligned to
multiples of `WINDOW_NS` on the record time, one series per device. Records of one device
arrive in journal order, which is not time order across sensors (each sensor sends its own
batches): a window closes only once the device's records have passed its end by ``grace_ns``.

- a record older than the device's closed windows is *late*: counted, not added (its window
  was already given to the model; adding it would infer that window twice);
- a record more than `CLOCK_STEP_NS` away from the device's newest time is a *clock step* (an
  RTC-less gateway syncing its clock): every open window closes and the series restarts there,
  so one bad timestamp never silences a device's windows.

The builder's whole state is `to_state()`: the runner commits it with its cursor (I4), so after
a crash every window is completed exactly once from the records after the cursor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from actors.model_runner.features import KINDS, WINDOW_NS, WindowAccumulator

#: Default lateness a window waits for, beyond its end (ns of record time).
DEFAULT_GRACE_NS = 2_000_000_000
#: A jump of the record time larger than this is a clock step, not lateness.
CLOCK_STEP_NS = 300 * 1_000_000_000
STATE_VERSION = 1


@attrs.frozen(slots=True)
class ClosedWindow:
    """A device window that will get no more readings: ``start_ns`` .. ``start_ns +
    WINDOW_NS``; ``first_pos``/``last_pos``: the journal positions of its first and last
    reading."""

    device_id: str
    start_ns: int
    acc: WindowAccumulator
    first_pos: int
    last_pos: int


class _Device:
    __slots__ = ("closed_upto", "max_ts", "open")

    def __init__(self) -> None:
        #: start_ns -> (accumulator, first_pos, last_pos)
        self.open: dict[int, list[Any]] = {}
        self.max_ts = 0
        #: Windows starting before this are closed (given to the model or skipped).
        self.closed_upto = 0


class WindowBuilder:
    """Per-device tumbling windows over imu and engine records."""

    def __init__(self, grace_ns: int = DEFAULT_GRACE_NS) -> None:
        self.grace_ns = grace_ns
        self.devices: dict[str, _Device] = {}
        self.late = 0
        self.clock_steps = 0

    def add(self, pos: int, device_id: str, sensor_id: str, ts: int, kind: str,
            values: Mapping[str, Any]) -> list[ClosedWindow]:
        """Add one record (kinds outside `KINDS` are ignored); returns the windows this record
        closed, oldest first."""
        if kind not in KINDS:
            return []
        dev = self.devices.get(device_id)
        if dev is None:
            dev = self.devices[device_id] = _Device()
        closed: list[ClosedWindow] = []
        if dev.max_ts and abs(ts - dev.max_ts) > CLOCK_STEP_NS:
            self.clock_steps += 1
            closed += self._close(device_id, dev, None)
            dev.max_ts = 0
            dev.closed_upto = 0
        start = ts - ts % WINDOW_NS
        if start < dev.closed_upto:
            self.late += 1
            return closed
        window = dev.open.get(start)
        if window is None:
            window = dev.open[start] = [WindowAccumulator(), pos, pos]
        window[0].add(kind, sensor_id, values)
        window[2] = pos
        if ts > dev.max_ts:
            dev.max_ts = ts
            closed += self._close(device_id, dev, ts - self.grace_ns)
        return closed

    def _close(self, device_id: str, dev: _Device, until_ns: int | None) -> list[ClosedWindow]:
        """Close the device's windows that end at or before ``until_ns`` (None: all)."""
        out = []
        for start in sorted(dev.open):
            if until_ns is not None and start + WINDOW_NS > until_ns:
                break
            acc, first, last = dev.open.pop(start)
            out.append(ClosedWindow(device_id, start, acc, first, last))
            dev.closed_upto = start + WINDOW_NS
        if until_ns is not None:
            # Every window starting below this edge ends by ``until_ns``: closed too when it
            # never opened (no records), so a record for it later is late, not a new window.
            dev.closed_upto = max(dev.closed_upto, until_ns - until_ns % WINDOW_NS)
        return out

    def open_windows(self) -> int:
        return sum(len(d.open) for d in self.devices.values())

    def to_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "grace_ns": self.grace_ns,
            "late": self.late,
            "clock_steps": self.clock_steps,
            "devices": {
                device_id: {
                    "max_ts": d.max_ts,
                    "closed_upto": d.closed_upto,
                    "open": [[start, acc.to_state(), first, last]
                             for start, (acc, first, last) in sorted(d.open.items())],
                }
                for device_id, d in self.devices.items()
            },
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> WindowBuilder:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"window state version {state.get('version')!r} "
                             f"(this runner reads {STATE_VERSION})")
        builder = cls(state["grace_ns"])
        builder.late, builder.clock_steps = state["late"], state["clock_steps"]
        for device_id, d in state["devices"].items():
            dev = builder.devices[device_id] = _Device()
            dev.max_ts, dev.closed_upto = d["max_ts"], d["closed_upto"]
            for start, acc, first, last in d["open"]:
                dev.open[start] = [WindowAccumulator.from_state(acc), first, last]
        return builder
