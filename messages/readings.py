"""Readings: what a sensor measured, and the batch that carries them to the journal.

Where this sits on the data path: a sensor actor turns what its source produced into
`Reading` values, groups them into a `ReadingBatch` (the wire form: columns, values already
encoded as canonical JSON by the producer so the single journal writer only inserts), and sends
it inside an `Append` (messages.journal).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from messages.errors import MessageValidationError

#: A value a reading may carry for one field.
Value = float | int | str | bool

#: Identifiers (device, sensor, kind, value names): printable, no spaces, bounded.
IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-/]{0,127}$")
MAX_VALUES = 256
MAX_STR_VALUE = 4096
#: Timestamps are nanoseconds since the Unix epoch; accept 2000-01-01 .. 2200-01-01.
TS_MIN_NS = 946_684_800 * 10**9
TS_MAX_NS = 7_258_118_400 * 10**9


def _check_ident(kind: str, field: str, value: object) -> None:
    if not isinstance(value, str) or not IDENT_RE.match(value):
        raise MessageValidationError(
            kind,
            field,
            value,
            "a string of 1-128 characters from [A-Za-z0-9_.:-/] starting with a letter or digit",
        )


def _check_value(field: str, value: object) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise MessageValidationError("Reading", field, value, "an integer that fits in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MessageValidationError("Reading", field, value, "a finite number")
        return
    if isinstance(value, str):
        if len(value) > MAX_STR_VALUE:
            raise MessageValidationError(
                "Reading", field, value, f"a string of at most {MAX_STR_VALUE} characters"
            )
        return
    raise MessageValidationError("Reading", field, value, "a float, int, str or bool")


def _validate_reading(inst: Reading, _attr: Any, _value: Any) -> None:
    _check_ident("Reading", "device_id", inst.device_id)
    _check_ident("Reading", "sensor_id", inst.sensor_id)
    if isinstance(inst.ts, bool) or not isinstance(inst.ts, int):
        raise MessageValidationError(
            "Reading", "ts", inst.ts, "an integer count of nanoseconds since the Unix epoch"
        )
    if not TS_MIN_NS <= inst.ts < TS_MAX_NS:
        raise MessageValidationError(
            "Reading", "ts", inst.ts, "nanoseconds since the epoch between 2000 and 2200"
        )
    _check_ident("Reading", "kind", inst.kind)
    if not isinstance(inst.values, Mapping):
        raise MessageValidationError("Reading", "values", inst.values, "a mapping of name to value")
    if not inst.values:
        raise MessageValidationError("Reading", "values", inst.values, "at least one value")
    if len(inst.values) > MAX_VALUES:
        raise MessageValidationError(
            "Reading", "values", f"<{len(inst.values)} values>", f"at most {MAX_VALUES} values"
        )
    for name, value in inst.values.items():
        if not isinstance(name, str) or not IDENT_RE.match(name):
            raise MessageValidationError(
                "Reading", "values", name, "value names like identifiers ([A-Za-z0-9_.:-/])"
            )
        _check_value(f"values.{name}", value)


@attrs.frozen(slots=True)
class Reading:
    """One measurement: device, sensor, time (ns since epoch), kind and named values.

    Invariants (checked on construction): identifiers match ``IDENT_RE``; ``ts`` is an int of
    nanoseconds in 2000..2200; ``values`` is a non-empty mapping of identifier to a finite float,
    a 64-bit int, a str (<= 4096 chars) or a bool. Treat ``values`` as read-only.
    """

    device_id: str
    sensor_id: str
    ts: int
    kind: str
    values: Mapping[str, Value] = attrs.field(validator=_validate_reading)

    @classmethod
    def from_external(cls, data: object) -> Reading:
        """Build a reading from decoded external input (e.g. a JSON object).

        Raises MessageValidationError naming the bad or missing field.
        """
        if not isinstance(data, Mapping):
            raise MessageValidationError("Reading", "<root>", data, "an object with reading fields")
        fields = ("device_id", "sensor_id", "ts", "kind", "values")
        for name in fields:
            if name not in data:
                raise MessageValidationError("Reading", name, None, "present")
        extra = sorted(set(data) - set(fields))
        if extra:
            raise MessageValidationError("Reading", extra[0], data[extra[0]], "absent (unknown field)")
        values = data["values"]
        return cls(
            device_id=data["device_id"],
            sensor_id=data["sensor_id"],
            ts=data["ts"],
            kind=data["kind"],
            values=dict(values) if isinstance(values, Mapping) else values,
        )

    @classmethod
    def trusted(cls, device_id: str, sensor_id: str, ts: int, kind: str,
                values: Mapping[str, Value]) -> Reading:
        """Build a reading WITHOUT validation, for a producer whose output is valid by
        construction and was checked once (the simulator validates one probe reading per
        source). Never for external input: use `from_external`."""
        reading = _NEW(cls)
        _SET_DEVICE(reading, device_id)
        _SET_SENSOR(reading, sensor_id)
        _SET_TS(reading, ts)
        _SET_KIND(reading, kind)
        _SET_VALUES(reading, values)
        return reading

    def to_external(self) -> dict[str, Any]:
        """The plain-dict form that `from_external` accepts."""
        return {
            "device_id": self.device_id,
            "sensor_id": self.sensor_id,
            "ts": self.ts,
            "kind": self.kind,
            "values": dict(self.values),
        }


#: One encoder for all: json.dumps with options builds a new encoder on every call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode


# Reading.trusted writes the slots directly (attrs' frozen __setattr__ would refuse).
_NEW = object.__new__
_SET_DEVICE, _SET_SENSOR, _SET_TS, _SET_KIND, _SET_VALUES = (
    Reading.__dict__[f].__set__ for f in ("device_id", "sensor_id", "ts", "kind", "values")
)


def encode_values(values: Mapping[str, Value]) -> str:
    """Canonical JSON text of a reading's values (compact, key order kept, no NaN)."""
    return _ENCODE(values)


def decode_values(text: str | bytes) -> dict[str, Value]:
    """Inverse of `encode_values`."""
    return json.loads(text)


@attrs.frozen(slots=True)
class ReadingBatch:
    """Readings of one sensor in column form: the payload of an `Append`.

    Columns have equal length (>= 1). ``payloads[i]`` is `encode_values` of reading i: the
    producer encodes, so the single journal writer only inserts. Build with `from_readings`.
    """

    sensor_id: str
    device_ids: tuple[str, ...]
    ts: tuple[int, ...]
    kinds: tuple[str, ...]
    payloads: tuple[str, ...]

    @classmethod
    def from_readings(cls, readings: Iterable[Reading]) -> ReadingBatch:
        """Column form of readings that all come from one sensor."""
        readings = tuple(readings)
        if not readings:
            raise MessageValidationError("ReadingBatch", "readings", readings, "at least one reading")
        sensor_id = readings[0].sensor_id
        for r in readings:
            if r.sensor_id != sensor_id:
                raise MessageValidationError(
                    "ReadingBatch", "sensor_id", r.sensor_id, f"{sensor_id!r} like the first reading"
                )
        return cls(
            sensor_id=sensor_id,
            device_ids=tuple(r.device_id for r in readings),
            ts=tuple(r.ts for r in readings),
            kinds=tuple(r.kind for r in readings),
            payloads=tuple(encode_values(r.values) for r in readings),
        )

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def nbytes(self) -> int:
        """Approximate size in bytes (what buffers and budgets count)."""
        return sum(map(len, self.payloads)) + 40 * len(self.ts)

    def readings(self) -> tuple[Reading, ...]:
        """The readings back as values (decodes the payloads)."""
        return tuple(
            Reading(d, self.sensor_id, t, k, decode_values(p))
            for d, t, k, p in zip(self.device_ids, self.ts, self.kinds, self.payloads, strict=True)
        )
