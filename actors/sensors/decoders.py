"""Payload decoders: an MQTT message's bytes -> records (time, values, device) for readings.

Where this sits on the data path: just before step 1. The MQTT sensor maps each topic to a
`DecoderSettings` (config.decoders), builds its decoder once with `build_decoder`, and calls
`PayloadDecoder.decode` for every message; each `DecodedRecord` becomes one `Reading`. A
message that cannot be decoded raises `DecodeError` — and nothing else — whose text tells the
operator what was wrong, where, and what was expected; the sensor quarantines the message with
that reason (I8) and carries on.

Decoded values already satisfy `Reading`'s rules (identifier names, finite floats, 64-bit
ints, strings of at most 4096 characters, bools, 1..256 values, ts in 2000..2200), so a record
never fails later as a reading.

json: a message is an object (one record) or an array of objects (one record each). Nested
objects and arrays are flattened: ``{"gps": {"lat": 1.5}, "acc": [0.1, 9.8]}`` gives
``gps.lat``, ``acc.0`` and ``acc.1``, down to ``max_depth`` levels; ``null`` values are left out.
NaN and Infinity (which Python's json would accept) are refused, as are numbers too large for
a float or a 64-bit integer.

struct: a message is exactly one record of the format, or with ``repeated`` a whole multiple of
it. Byte strings (``s``, ``c``) become text (UTF-8, trailing NULs removed); scaled values are
floats.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs

from config.decoders import SKIP, DecoderSettings, item_codes, struct_format
from messages.readings import (
    IDENT_RE,
    MAX_STR_VALUE,
    MAX_VALUES,
    TS_MAX_NS,
    TS_MIN_NS,
    Value,
)

#: A payload yields at most this many records (a top-level JSON array, a repeated struct).
MAX_RECORDS = 10_000
#: Nanoseconds per unit of a numeric timestamp.
UNIT_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_NAME_CACHE_MAX = 4096
#: Flattening stops with an error beyond this many values (before `fields` picks some).
_MAX_FLAT = 10_000
#: RFC 3339 date-time: 2024-05-14T09:30:00.123456789Z or ...+02:00 (a space for T is allowed).
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


class DecodeError(ValueError):
    """A payload could not be decoded; ``str()`` is the operator-facing reason (what, where,
    what was expected)."""


@attrs.frozen(slots=True)
class DecodedRecord:
    """One record of a payload: its time (ns since the epoch), values (valid for a `Reading`;
    treat as read-only) and device id (None: the sensor's own device)."""

    ts: int
    values: dict[str, Value]
    device_id: str | None = None


class PayloadDecoder:
    """Turns one message payload into records. Subclasses: `JsonDecoder`, `StructDecoder`."""

    def __init__(self, settings: DecoderSettings) -> None:
        self.settings = settings
        self._ts_field = settings.ts_field
        self._device_field = settings.device_field
        self._good_names: set[str] = set()

    def decode(self, payload: bytes, received_ns: int) -> list[DecodedRecord]:
        """The records ``payload`` holds (at least one). ``received_ns`` is the receive time
        (ns since the epoch), the records' time when no ``ts_field`` is configured.
        Raises DecodeError (only) when the payload is refused."""
        try:
            return self._decode(payload, received_ns)
        except DecodeError:
            raise
        except RecursionError:
            raise DecodeError("payload is nested too deeply to decode") from None
        except Exception as exc:  # a decoder bug must not take the sensor down (I8)
            raise DecodeError(f"decoder bug: {type(exc).__name__}: {exc}") from None

    def _decode(self, payload: bytes, received_ns: int) -> list[DecodedRecord]:
        raise NotImplementedError

    # ---- shared checks ---------------------------------------------------------------------
    def _received_ts(self, received_ns: int) -> int:
        if not TS_MIN_NS <= received_ns < TS_MAX_NS:
            raise DecodeError(f"receive time {received_ns} ns is outside 2000..2200: is the "
                              f"gateway's clock set? (or configure ts_field)")
        return received_ns

    def _check_name(self, name: str) -> None:
        if name in self._good_names:
            return
        if not isinstance(name, str) or not IDENT_RE.match(name):
            raise DecodeError(f"value name {_show(name)} is not allowed: names are 1-128 "
                              f"characters from [A-Za-z0-9_.:-/] starting with a letter or "
                              f"digit (set fields to keep only the values you need)")
        if len(self._good_names) < _NAME_CACHE_MAX:
            self._good_names.add(name)

    def _device(self, raw: object, where: str) -> str:
        field = self._device_field
        if raw is None:
            raise DecodeError(f"{where}device field {field!r} is missing")
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            raise DecodeError(f"{where}device field {field!r} must be a string or an integer "
                              f"(got {_show(raw)})")
        text = str(raw)
        if not IDENT_RE.match(text):
            raise DecodeError(f"{where}device field {field!r} must be 1-128 characters from "
                              f"[A-Za-z0-9_.:-/] starting with a letter or digit "
                              f"(got {_show(raw)})")
        return text

    def _ts(self, raw: object, where: str) -> int:
        """Nanoseconds since the epoch from the configured ts field's value."""
        field, unit = self._ts_field, self.settings.ts_unit
        if raw is None:
            raise DecodeError(f"{where}ts field {field!r} is missing")
        if unit == "iso":
            if not isinstance(raw, str):
                raise DecodeError(f"{where}ts field {field!r} must be an RFC 3339 string such "
                                  f"as '2024-05-14T09:30:00Z' (got {_show(raw)})")
            ts = _parse_rfc3339(raw, f"{where}ts field {field!r}")
        else:
            ts = _numeric_ts(raw, unit, f"{where}ts field {field!r}")
        if not TS_MIN_NS <= ts < TS_MAX_NS:
            hint = ""
            if unit != "iso":
                fits = [u for u in UNIT_NS if u != unit and _in_range(raw, u)]
                if fits:
                    hint = f" (as {fits[0]} it would be {_iso(_numeric_ts(raw, fits[0], ''))})"
            raise DecodeError(f"{where}ts field {field!r} = {_show(raw)} ({unit}) is "
                              f"{_iso(ts)}, outside 2000..2200: is ts_unit right?{hint}")
        return ts


def _check_value(name: str, value: Any, where: str) -> None:
    """Raise DecodeError unless ``value`` may be a reading's value."""
    t = type(value)
    if t is float:
        if not math.isfinite(value):
            raise DecodeError(f"{where}value {name!r} is not a finite number (got {value!r})")
    elif t is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise DecodeError(f"{where}value {name!r} = {_show(value)} does not fit in a "
                              f"64-bit integer")
    elif t is str:
        if len(value) > MAX_STR_VALUE:
            raise DecodeError(f"{where}value {name!r} is a string of {len(value)} "
                              f"characters, at most {MAX_STR_VALUE} allowed")
    elif t is not bool:
        raise DecodeError(f"{where}value {name!r} must be a number, string or boolean "
                          f"(got {_show(value)})")


class JsonDecoder(PayloadDecoder):
    """JSON objects (or a top-level array of them), flattened with "." (see module doc)."""

    def __init__(self, settings: DecoderSettings) -> None:
        super().__init__(settings)
        self._keep = settings.fields
        self._max_depth = settings.max_depth
        self._loads: Callable[[str], Any] = json.JSONDecoder(
            parse_constant=_refuse_constant
        ).decode

    def _decode(self, payload: bytes, received_ns: int) -> list[DecodedRecord]:
        try:
            text = payload if isinstance(payload, str) else str(payload, "utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"payload is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} "
                              f"at offset {exc.start} (expected a JSON document)") from None
        try:
            doc = self._loads(text)
        except ValueError as exc:
            if isinstance(exc, DecodeError):
                raise
            raise DecodeError(f"payload is not valid JSON: {_json_problem(exc)}") from None
        if isinstance(doc, dict):
            return [self._record(doc, received_ns, "")]
        if isinstance(doc, list):
            if not doc:
                raise DecodeError("payload is an empty JSON array: no readings "
                                  "(expected an object, or an array of objects)")
            if len(doc) > MAX_RECORDS:
                raise DecodeError(f"payload holds {len(doc)} records, at most {MAX_RECORDS}")
            out = []
            for i, item in enumerate(doc):
                if not isinstance(item, dict):
                    raise DecodeError(f"record {i} of the top-level array is {_kind(item)}, "
                                      f"expected an object")
                out.append(self._record(item, received_ns, f"record {i}: "))
            return out
        raise DecodeError(f"payload is {_kind(doc)}, expected a JSON object or an array of "
                          f"objects")

    def _record(self, obj: dict[str, Any], received_ns: int, where: str) -> DecodedRecord:
        flat: dict[str, Any] = {}
        self._flatten(obj, "", 0, flat, where)
        # time and device come out of the values
        if self._ts_field:
            ts = self._ts(flat.pop(self._ts_field, None), where)
        else:
            ts = self._received_ts(received_ns)
        device = self._device(flat.pop(self._device_field, None), where) \
            if self._device_field else None
        if self._keep:
            values = {name: flat[name] for name in self._keep if name in flat}
            if not values:
                raise DecodeError(f"{where}none of the configured fields "
                                  f"({', '.join(self._keep)}) is in the message")
        else:
            values = flat
            if not values:
                raise DecodeError(f"{where}the object holds no values (empty, or only nulls, "
                                  f"empty containers and the ts/device fields)")
            if len(values) > MAX_VALUES:
                raise DecodeError(f"{where}the object holds {len(values)} values, at most "
                                  f"{MAX_VALUES} (set fields to keep the ones you need)")
            for name in values:
                self._check_name(name)
        for name, value in values.items():
            _check_value(name, value, where)
        return DecodedRecord(ts, values, device)

    def _flatten(self, obj: dict[str, Any] | list[Any], prefix: str, depth: int,
                 out: dict[str, Any], where: str) -> None:
        items = obj.items() if type(obj) is dict else enumerate(obj)
        for key, value in items:
            name = key if not prefix and type(key) is str else f"{prefix}{key}"
            if type(value) in (dict, list):
                if depth >= self._max_depth:
                    raise DecodeError(f"{where}{name!r} nests deeper than max_depth="
                                      f"{self._max_depth} (raise max_depth, up to 16)")
                self._flatten(value, name + ".", depth + 1, out, where)
            elif value is not None:
                if name in out:
                    raise DecodeError(f"{where}value name {name!r} occurs twice after "
                                      f"flattening (a key with '.' and a nested object)")
                out[name] = value
                if len(out) > _MAX_FLAT:
                    raise DecodeError(f"{where}the object holds more than {_MAX_FLAT} values")


class StructDecoder(PayloadDecoder):
    """Fixed binary records of a Python struct format (see module doc)."""

    def __init__(self, settings: DecoderSettings) -> None:
        super().__init__(settings)
        self._struct = struct.Struct(struct_format(settings.format))
        self._size = self._struct.size
        self._repeated = settings.repeated
        codes = item_codes(self._struct)
        named = [(i, name, codes[i]) for i, name in enumerate(settings.fields)
                 if name not in ("", SKIP)]
        index = {name: i for i, name, _ in named}
        self._ts_index = index.get(settings.ts_field, -1) if settings.ts_field else -1
        self._device_index = index.get(settings.device_field, -1) \
            if settings.device_field else -1
        #: (item index, value name, scale factor or None, is bytes)
        self._values = tuple(
            (i, name, settings.scale.get(name), code == "s" or code == "c")
            for i, name, code in named
            if name not in (settings.ts_field, settings.device_field)
        )

    def _decode(self, payload: bytes, received_ns: int) -> list[DecodedRecord]:
        n = len(payload)
        size = self._size
        fmt = self.settings.format
        if self._repeated:
            if n == 0 or n % size:
                raise DecodeError(f"payload of {n} bytes is not a whole multiple of the "
                                  f"{size}-byte record (format {fmt!r}, repeated)")
            if n // size > MAX_RECORDS:
                raise DecodeError(f"payload holds {n // size} records, at most {MAX_RECORDS}")
            rows = self._struct.iter_unpack(payload)
        elif n != size:
            raise DecodeError(f"payload of {n} bytes, expected exactly {size} (format {fmt!r})")
        else:
            rows = (self._struct.unpack(payload),)
        out = []
        for k, row in enumerate(rows):
            where = f"record {k}: " if self._repeated else ""
            if self._ts_index >= 0:
                ts = self._ts(row[self._ts_index], where)
            else:
                ts = self._received_ts(received_ns)
            device = None
            if self._device_index >= 0:
                raw = row[self._device_index]
                device = self._device(_text(raw, self.settings.device_field, where)
                                      if isinstance(raw, bytes) else raw, where)
            values: dict[str, Value] = {}
            for i, name, factor, is_bytes in self._values:
                value = row[i]
                if is_bytes:
                    value = _text(value, name, where)
                elif factor is not None:
                    value = value * factor
                _check_value(name, value, where)
                values[name] = value
            out.append(DecodedRecord(ts, values, device))
        return out


def build_decoder(settings: DecoderSettings) -> PayloadDecoder:
    """The decoder for ``settings`` (already validated by `DecoderSettings`)."""
    return JsonDecoder(settings) if settings.type == "json" else StructDecoder(settings)


# ---- helpers ---------------------------------------------------------------------------------
def _refuse_constant(name: str) -> None:
    raise DecodeError(f"payload is not valid JSON: {name} is not a JSON number "
                      f"(send null or leave the value out)")


def _json_problem(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno} (offset {exc.pos})"
    text = str(exc)
    if "integer string conversion" in text or "digits" in text:
        return "a number has too many digits"
    return text


def _numeric_ts(raw: Any, unit: str, what: str) -> int:
    mult = UNIT_NS[unit]
    t = type(raw)
    if t is int:
        return raw * mult
    if t is float and math.isfinite(raw):
        whole = int(raw)
        return whole * mult + round((raw - whole) * mult)
    raise DecodeError(f"{what} must be a number of {unit} since the Unix epoch "
                      f"(got {_show(raw)})")


def _in_range(raw: object, unit: str) -> bool:
    try:
        return TS_MIN_NS <= _numeric_ts(raw, unit, "") < TS_MAX_NS
    except DecodeError:
        return False


def _parse_rfc3339(text: str, what: str) -> int:
    m = _RFC3339.fullmatch(text)
    if not m:
        raise DecodeError(f"{what} must be an RFC 3339 time with a UTC offset such as "
                          f"'2024-05-14T09:30:00.25Z' (got {_show(text)})")
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    try:
        day = datetime(int(y), int(mo), int(d), tzinfo=UTC)
    except ValueError as exc:
        raise DecodeError(f"{what} has an impossible date: {exc} (got {_show(text)})") from None
    h, mi, s = int(h), int(mi), int(s)
    if h > 23 or mi > 59 or s > 60 or (not z and (int(oh) > 23 or int(om) > 59)):
        raise DecodeError(f"{what} has an impossible time of day or offset (got {_show(text)})")
    offset = 0 if z else (1 if sign == "+" else -1) * (int(oh) * 3600 + int(om) * 60)
    seconds = int(day.timestamp()) + h * 3600 + mi * 60 + s - offset
    return seconds * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)


def _text(raw: bytes, name: str, where: str) -> str:
    try:
        return raw.rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{where}value {name!r} is not UTF-8 text (byte "
                          f"0x{raw[exc.start]:02x} at offset {exc.start})") from None


def _iso(ts_ns: int) -> str:
    try:
        return datetime.fromtimestamp(ts_ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return "far out of range"


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def _show(value: object) -> str:
    if type(value) is int and not -(10**30) < value < 10**30:
        return f"<integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
