"""Payload decoder settings: how an MQTT topic's message bytes become readings.

Where this sits on the data path: before step 1. An MQTT sensor maps each topic to one
`DecoderSettings` (a TOML table); `actors.sensors.decoders.build_decoder` turns it into the
decoder that runs on every message. Validation here does no I/O; a decoder that cannot be built
from valid settings does not exist (every check that can be made up front is made here).

Two types, each with its own keys (setting a key of the other type is refused):

``json`` — a JSON object per message, or a top-level array of objects (one reading each)::

    { type = "json", ts_field = "ts", ts_unit = "ms", fields = ["temp", "gps.lat"],
      device_field = "dev", max_depth = 4 }

``struct`` — fixed binary records (Python `struct` formats)::

    { type = "struct", format = "<IiiH", fields = ["ts", "lat", "lon", "_"],
      ts_field = "ts", ts_unit = "s", scale = { lat = 1e-7, lon = 1e-7 }, repeated = true }
"""

from __future__ import annotations

import struct

import attrs

from config.fields import FieldProblem

DECODER_TYPES = ("json", "struct")
TS_UNITS = ("ns", "us", "ms", "s", "iso")
DEFAULT_TS_UNIT = "ms"
DEFAULT_MAX_DEPTH = 4
MAX_DEPTH_LIMIT = 16
#: struct format characters refused: native-only pointer and size types.
_NATIVE_ONLY = frozenset("nNP")
#: A struct field named like this (or empty) is padding: decoded, then skipped.
SKIP = "_"


def _ident_ok(name: str) -> bool:
    from messages.readings import IDENT_RE

    return bool(IDENT_RE.match(name))


def _names(field: str, names: tuple[str, ...], *, allow_skip: bool) -> None:
    seen: set[str] = set()
    for name in names:
        if allow_skip and name in ("", SKIP):
            continue
        if not _ident_ok(name):
            raise FieldProblem(field, f"must hold value names of 1-128 characters from "
                                      f"[A-Za-z0-9_.:-/] starting with a letter or digit "
                                      f"(got {name!r})")
        if name in seen:
            raise FieldProblem(field, f"must not name a field twice (got {name!r} twice)")
        seen.add(name)


def struct_format(fmt: str) -> str:
    """``fmt`` with its byte-order character: a format without one is little-endian (``<``,
    standard sizes, no alignment: what microcontrollers send); ``@`` and ``=`` (the gateway's
    own byte order and alignment) are refused by `DecoderSettings` as not portable."""
    return fmt if fmt[:1] in ("<", ">", "!", "@", "=") else "<" + fmt


@attrs.frozen
class DecoderSettings:
    """How one topic's payloads decode into readings (see the module docstring for examples).

    Common keys: ``type``, ``ts_field``, ``ts_unit``, ``fields``, ``device_field``.
    json only: ``max_depth``. struct only: ``format``, ``scale``, ``repeated``.
    """

    #: ``json`` (objects, flattened with ".") or ``struct`` (fixed binary records).
    type: str = "json"
    #: The field holding the reading's time; empty means the time the message was received.
    #: json: a flattened name such as ``ts`` or ``meta.time``; struct: one of ``fields``.
    #: The field is taken out of the values.
    ts_field: str = ""
    #: Unit of ``ts_field``: ``ns``, ``us``, ``ms``, ``s`` since the Unix epoch (an integer or
    #: a number with a fraction), or ``iso`` (json only: an RFC 3339 string with a UTC offset,
    #: e.g. ``2024-05-14T09:30:00.25Z``).
    ts_unit: str = DEFAULT_TS_UNIT
    #: json: the flattened value names to keep (empty: every scalar; a listed name missing
    #: from a message is left out, a message with none of them is refused).
    #: struct: one name per value the format unpacks, in order; "_" or "" skips a value.
    fields: tuple[str, ...] = ()
    #: The field naming the device of each record (a string, or an integer used as its text),
    #: so one topic may carry several devices; empty means the sensor's device. Taken out of
    #: the values.
    device_field: str = ""
    #: json: nested objects and arrays are flattened to ``a.b`` and ``a.0`` names down to
    #: this many levels below the record; deeper nesting is refused (1..16).
    max_depth: int = DEFAULT_MAX_DEPTH
    #: struct: a Python struct format, e.g. ``<IiiH``. Without a byte-order character it is
    #: little-endian (``<``); ``>`` and ``!`` are big-endian; ``@``/``=`` (native) are refused.
    format: str = ""
    #: struct: value name -> multiplier (e.g. ``lat = 1e-7``); a scaled value is a float.
    scale: dict[str, float] = attrs.field(factory=dict, hash=False)
    #: struct: a payload may hold several records back to back (a whole multiple of the
    #: record size), one reading each; false: exactly one record.
    repeated: bool = False

    def __attrs_post_init__(self) -> None:
        if self.type not in DECODER_TYPES:
            raise FieldProblem("type", f"must be one of {', '.join(DECODER_TYPES)} "
                                       f"(got {self.type!r})")
        if self.ts_unit not in TS_UNITS:
            raise FieldProblem("ts_unit", f"must be one of {', '.join(TS_UNITS)} "
                                          f"(got {self.ts_unit!r})")
        if not self.ts_field and self.ts_unit != DEFAULT_TS_UNIT:
            raise FieldProblem("ts_unit", f"needs ts_field: without it readings carry the "
                                          f"receive time (got ts_unit={self.ts_unit!r})")
        if self.ts_field and self.ts_field == self.device_field:
            raise FieldProblem("device_field", f"must differ from ts_field "
                                               f"(both {self.ts_field!r})")
        if self.type == "json":
            self._check_json()
        else:
            self._check_struct()

    def _refuse_set(self, names: tuple[str, ...]) -> None:
        defaults = {"max_depth": DEFAULT_MAX_DEPTH, "format": "", "scale": {}, "repeated": False}
        for name in names:
            if getattr(self, name) != defaults[name]:
                owner = "json" if name == "max_depth" else "struct"
                raise FieldProblem(name, f"applies to type = {owner!r} only (this decoder is "
                                         f"type = {self.type!r}); remove it")

    def _check_json(self) -> None:
        self._refuse_set(("format", "scale", "repeated"))
        if isinstance(self.max_depth, bool) or not 1 <= self.max_depth <= MAX_DEPTH_LIMIT:
            raise FieldProblem("max_depth", f"must be in 1..{MAX_DEPTH_LIMIT} "
                                            f"(got {self.max_depth!r})")
        _names("fields", self.fields, allow_skip=False)
        _at_most_max_values(len(self.fields))
        for key in ("ts_field", "device_field"):
            if getattr(self, key) in self.fields:
                raise FieldProblem("fields", f"must not list {key} {getattr(self, key)!r}: "
                                             f"it is taken out of the values")

    def _check_struct(self) -> None:
        self._refuse_set(("max_depth",))
        if not self.format:
            raise FieldProblem("format", "is required for type = \"struct\" "
                                         "(a Python struct format such as '<IiiH')")
        if self.format[:1] in ("@", "="):
            raise FieldProblem("format", f"must not use native byte order/alignment "
                                         f"({self.format[0]!r} depends on the machine): start "
                                         f"with '<' (little-endian) or '>' (big-endian) "
                                         f"(got {self.format!r})")
        bad = sorted(_NATIVE_ONLY & set(self.format))
        if bad:
            raise FieldProblem("format", f"must not use native-only codes {''.join(bad)!r} "
                                         f"(got {self.format!r})")
        try:
            layout = struct.Struct(struct_format(self.format))
        except struct.error as exc:
            raise FieldProblem("format", f"is not a valid struct format: {exc} "
                                         f"(got {self.format!r})") from None
        if layout.size == 0:
            raise FieldProblem("format", f"must unpack at least one byte (got {self.format!r})")
        codes = item_codes(layout)
        if len(self.fields) != len(codes):
            raise FieldProblem("fields", f"must name each of the {len(codes)} values format "
                                         f"{self.format!r} unpacks, in order (\"_\" skips one); "
                                         f"got {len(self.fields)} names")
        _names("fields", self.fields, allow_skip=True)
        named = {name: code for name, code in zip(self.fields, codes, strict=True)
                 if name not in ("", SKIP)}
        if not set(named) - {self.ts_field, self.device_field}:
            raise FieldProblem("fields", "must name at least one value besides ts_field and "
                                         "device_field")
        _at_most_max_values(len(set(named) - {self.ts_field, self.device_field}))
        if self.ts_unit == "iso":
            raise FieldProblem("ts_unit", "iso applies to type = \"json\" only; binary records "
                                          "carry ns, us, ms or s")
        for key in ("ts_field", "device_field"):
            name = getattr(self, key)
            if name and name not in named:
                raise FieldProblem(key, f"must be one of fields ({', '.join(named)}) "
                                        f"(got {name!r})")
        if self.ts_field and named[self.ts_field] in "sc?":
            raise FieldProblem("ts_field", f"must be a numeric value (format code "
                                           f"{named[self.ts_field]!r} is not)")
        if self.device_field and named[self.device_field] not in "bBhHiIlLqQsc":
            raise FieldProblem("device_field", f"must be an integer or a byte string (format "
                                               f"code {named[self.device_field]!r} is not)")
        for name, factor in self.scale.items():
            if name not in named or name in (self.ts_field, self.device_field):
                values = [n for n in named if n not in (self.ts_field, self.device_field)]
                raise FieldProblem("scale", f"must name value fields ({', '.join(values)}) "
                                            f"(got {name!r})")
            if named[name] in "sc?":
                raise FieldProblem("scale", f"{name!r} is not numeric (format code "
                                            f"{named[name]!r})")
            if isinstance(factor, bool) or not isinstance(factor, float | int) or not (
                factor == factor and abs(factor) != float("inf") and factor != 0
            ):
                raise FieldProblem("scale", f"{name!r} must be a finite, non-zero number "
                                            f"(got {factor!r})")


def _at_most_max_values(n: int) -> None:
    from messages.readings import MAX_VALUES

    if n > MAX_VALUES:
        raise FieldProblem("fields", f"must name at most {MAX_VALUES} values (a reading's "
                                     f"limit) (got {n})")


def item_codes(layout: struct.Struct) -> str:
    """One struct code per value ``layout`` unpacks (``"3h2s"`` -> ``"hhhs"``; pads skip)."""
    codes, count = [], ""
    for ch in layout.format.lstrip("<>!@="):
        if ch.isdigit():
            count += ch
        elif ch.isspace():
            continue
        else:
            n = int(count) if count else 1
            if ch in "sp":
                codes.append("s")  # one bytes value of n bytes
            elif ch != "x":
                codes.extend(ch * n)
            count = ""
    return "".join(codes)

