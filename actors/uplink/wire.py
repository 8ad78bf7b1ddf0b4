"""The uplink's wire encoding ``fleetgw.cols/1``: one device's records, column by column.

Where this sits on the data path: step 6. The uplink lane takes a batch of one device's records
(one journal generation, one lane, seq order) and `encode`s it into the raw body that
`actors.uplink.envelope.seal` compresses (zstd level 9) and signs; the central receiver opens
the envelope and `decode`s the body back into exactly the same records — payload text byte for
byte — before inserting them.

Layout (``uv``: unsigned varint; ``zz``: zigzag; ``str``: uv UTF-8 length + bytes; ``block``: a
column of 64-bit integers as byte planes — see `actors.uplink.varint`):

    "FGWC", version byte 1
    device_id         str
    n                 uv, records (<= MAX_RECORDS)
    sensors, kinds    uv count + str each: the dictionaries
    shapes            uv count; each: uv sensor, uv kind, layout byte: 0 columns (uv field
                      count, then per field: str name, type byte f/i/s/b) or 1 verbatim
    shape             block: the shape of each record
    seq               block: seq[0], then seq[i] - seq[i-1] - 1 (seqs strictly increase)
    ts                per sensor: uv zz its first ts; then one block, per sensor stream in
                      table order (readings of a sensor are periodic): zz first delta, then
                      zz delta-of-delta
    values            per shape, over its records in record order, a column per field:
        f  byte 0 (decimal): byte d <= 9 + int column m; value = float64(m) / 10**d (IEEE
           division); or byte 1 (binary): block of the float64 bits
        i  int column: byte 0 + block of zz deltas (the first from 0), or byte 1 + uv zz
           base + block of zz offsets from the base (whichever is smaller)
        b  packed bits (numpy.packbits)
        s  dictionary: uv count + str each, then block of indexes
        a verbatim shape has one s-like column: the payload texts as they are

The payload text is rebuilt from the values as ``{"name":value,...}`` with json's spellings
(float repr, int str, true/false, json string escapes, no ASCII escaping): exactly
`messages.readings.encode_values`. The encoder renders every record the way `decode` will and
stores verbatim any record whose text differs (not canonical JSON, nulls, nested values, ...),
and a whole shape verbatim when an int exceeds 64 bits: lossless always wins over size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from json.encoder import encode_basestring
from typing import TYPE_CHECKING

import attrs
import numpy as np

from actors.uplink.varint import (
    Reader,
    WireError,
    put_block,
    put_ints,
    put_str,
    put_uvarint,
    segment_cumsum,
    unzigzag,
    unzigzag_int,
    zigzag,
    zigzag_int,
)

if TYPE_CHECKING:
    from actors.journal.reader import Record

__all__ = ["WireError", "WireRecord", "decode", "encode"]

MAGIC = b"FGWC"
VERSION = 1
#: Limits a decoder enforces (an uplink batch holds up to 5000 records).
MAX_RECORDS = 1 << 17
MAX_FIELDS = 1024
#: Bound on the payload text a body may expand to: a dictionary entry, or a zero-width block,
#: lets a few bytes stand for many values (a batch of 5000 readings is ~0.5 M characters).
MAX_DECODED_CHARS = 64 << 20
#: Fraction digits tried for decimal float columns, and the largest exact float64 integer.
MAX_DECIMALS = 9
EXACT_INT = 2**53
COLUMNS, VERBATIM = 0, 1
FLOAT_DECIMAL, FLOAT_BINARY = 0, 1
#: Value type codes; "t" is a verbatim shape's payload text column (never on the wire).
TYPE_CODES = {float: "f", int: "i", str: "s", bool: "b"}
_PLACEHOLDERS = {"f": "%r", "i": "%d", "s": "%s", "b": "%s"}
#: Longest text of one value: float repr (-2.2250738585072014e-308), int64, false.
_MAX_TEXT = {"f": 24, "i": 20, "b": 5}
_BOOL_WORDS = ("false", "true")
_BOOL_TEXT = np.array(_BOOL_WORDS, dtype=object)
#: A value shape no column layout fits (its records are stored verbatim).
_NO_SHAPE = object()
#: json's C scanner: ``(value, end)`` of the JSON text at an index (any text after the value is
#: ignored here: such a payload cannot render back to itself, so it is stored verbatim).
_scan = json.JSONDecoder().scan_once


@attrs.frozen(slots=True)
class WireRecord:
    """One record as the wire carries it: a journal `Record` without device and position
    (the batch names the device once). ``ts`` is ns since the epoch; ``payload`` is the
    canonical JSON text of the values (`messages.readings.encode_values`)."""

    seq: int
    sensor_id: str
    ts: int
    kind: str
    payload: str

    @classmethod
    def from_record(cls, record: Record) -> WireRecord:
        return cls(record.seq, record.sensor_id, record.ts, record.kind, record.payload)


class _Shape:
    """Records of one sensor and kind whose values have the same names and types in the same
    order (``fields``: (name, type code) pairs), or whose payload is stored verbatim
    (``fields`` None). ``render(row)`` is a record's text from its values, the way `decode`
    renders it: ``template % row`` once str and bool values are turned into JSON text."""

    __slots__ = ("codes", "fields", "kind", "positions", "render", "rows", "sensor",
                 "template")

    def __init__(self, sensor: str, kind: str, fields: tuple[tuple[str, str], ...] | None):
        self.sensor, self.kind, self.fields = sensor, kind, fields
        self.codes = ("t",) if fields is None else tuple(code for _, code in fields)
        self.template = "%s" if fields is None else "{" + ",".join(
            encode_basestring(name).replace("%", "%%") + ":" + _PLACEHOLDERS[code]
            for name, code in fields) + "}"
        # numbers render as they are: no Python frame per record (the encoder's hot path)
        numbers_only = set(self.codes) <= {"f", "i"}
        self.render = self.template.__mod__ if numbers_only else self._render_texts
        self.positions: list[int] = []
        self.rows: list[tuple] = []

    def _render_texts(self, row: tuple) -> str:
        return self.template % tuple(
            encode_basestring(v) if c == "s" else _BOOL_WORDS[v] if c == "b" else v
            for c, v in zip(self.codes, row, strict=True))


# ---- encoding ---------------------------------------------------------------------------------
def encode(device_id: str, records: Sequence[WireRecord]) -> bytes:
    """The wire form of one device's ``records`` (seq strictly increasing, ts int64).

    Raises WireError for records it cannot carry: too many, seqs not increasing or beyond
    0..2**63-1, ts beyond int64, text that is not valid Unicode.
    """
    n = len(records)
    if n > MAX_RECORDS:
        raise WireError(f"{n} records exceed the limit of {MAX_RECORDS} a batch")
    seqs, ts = _int64s([r.seq for r in records], "seq"), _int64s([r.ts for r in records], "ts")
    if n and (seqs[0] < 0 or (np.diff(seqs) <= 0).any()):
        raise WireError("seqs must be >= 0 and strictly increasing")
    shapes: dict[tuple, _Shape | object] = {}
    for i, record in enumerate(records):
        payload = record.payload
        try:
            values = _scan(payload, 0)[0]
        except (ValueError, StopIteration, RecursionError):
            values = None
        if type(values) is dict:
            row = tuple(values.values())
            key = (record.sensor_id, record.kind, tuple(values), tuple(map(type, row)))
            shape = shapes.get(key) or shapes.setdefault(key, _columns_shape(*key))
            if shape is not _NO_SHAPE and shape.render(row) == payload:
                shape.positions.append(i)
                shape.rows.append(row)
                continue
        key = (record.sensor_id, record.kind)
        shape = shapes.get(key) or shapes.setdefault(key, _Shape(*key, None))
        shape.positions.append(i)
        shape.rows.append((payload,))
    used = [s for s in shapes.values() if s is not _NO_SHAPE and s.positions]
    values = [_columns(shape, records) for shape in used]  # may turn shapes verbatim
    sensors = {name: k for k, name in enumerate(dict.fromkeys(s.sensor for s in used))}
    kinds = {name: k for k, name in enumerate(dict.fromkeys(s.kind for s in used))}

    out = bytearray(MAGIC)
    out.append(VERSION)
    put_str(out, device_id)
    put_uvarint(out, n)
    for table in (sensors, kinds):
        put_uvarint(out, len(table))
        for name in table:
            put_str(out, name)
    put_uvarint(out, len(used))
    shape_of, sensor_of = np.zeros(n, np.uint64), np.zeros(n, np.int64)
    for k, shape in enumerate(used):
        shape_of[shape.positions], sensor_of[shape.positions] = k, sensors[shape.sensor]
        _put_shape(out, shape, sensors[shape.sensor], kinds[shape.kind])
    put_block(out, shape_of)
    put_block(out, np.concatenate((seqs[:1], np.diff(seqs) - 1)).view(np.uint64))
    _put_ts(out, ts, sensor_of)
    for data in values:
        out += data
    return bytes(out)


def _int64s(values: list, what: str) -> np.ndarray:
    """``values`` (ints) as int64; WireError for anything else."""
    if not set(map(type, values)) <= {int}:
        raise WireError(f"every {what} must be an int")
    try:
        return np.array(values, np.int64)
    except OverflowError:
        raise WireError(f"a {what} is beyond 64 bits") from None


def _columns_shape(sensor: str, kind: str, names: tuple, types: tuple) -> _Shape | object:
    """The shape of records with these value names and types; _NO_SHAPE if none fits."""
    if len(names) > MAX_FIELDS or not all(t in TYPE_CODES for t in types):
        return _NO_SHAPE
    return _Shape(sensor, kind, tuple((name, TYPE_CODES[t]) for name, t in zip(names, types,
                                                                             strict=True)))


def _columns(shape: _Shape, records: Sequence[WireRecord]) -> bytes:
    """The value columns of a shape; a shape whose ints exceed 64 bits becomes verbatim."""
    out = bytearray()
    try:
        for code, column in zip(shape.codes, zip(*shape.rows, strict=True), strict=True):
            _put_column(out, code, column)
    except OverflowError:
        shape.fields, shape.codes = None, ("t",)
        out.clear()
        _put_column(out, "t", [records[i].payload for i in shape.positions])
    return bytes(out)


def _put_shape(out: bytearray, shape: _Shape, sensor: int, kind: int) -> None:
    """A shape table entry (``sensor``, ``kind``: indexes into the dictionaries)."""
    put_uvarint(out, sensor)
    put_uvarint(out, kind)
    if shape.fields is None:
        out.append(VERBATIM)
        return
    out.append(COLUMNS)
    put_uvarint(out, len(shape.fields))
    for name, code in shape.fields:
        put_str(out, name)
        out += code.encode()


def _put_ts(out: bytearray, ts: np.ndarray, sensor_of: np.ndarray) -> None:
    """Each sensor's first ts, then its stream's first delta and deltas-of-delta."""
    order = np.argsort(sensor_of, kind="stable")
    t, first = ts[order], _firsts(sensor_of[order])
    for value in t[first].tolist():
        put_uvarint(out, zigzag_int(value))
    delta = np.diff(t, prepend=np.int64(0))
    delta[first] = 0
    put_block(out, zigzag(np.diff(delta, prepend=np.int64(0))[~first]))


def _put_column(out: bytearray, code: str, column: Sequence) -> None:
    """One value column of type ``code`` (OverflowError: an int beyond 64 bits)."""
    if code == "f":
        x = np.array(column, np.float64)
        found = _decimal(x)
        if found is None:
            out.append(FLOAT_BINARY)
            put_block(out, x.view(np.uint64))
        else:
            out += bytes((FLOAT_DECIMAL, found[0]))
            put_ints(out, found[1])
    elif code == "i":
        put_ints(out, np.array(column, np.int64))
    elif code == "b":
        out += np.packbits(np.array(column, bool)).tobytes()
    else:
        index: dict[str, int] = {}
        codes = [index.setdefault(s, len(index)) for s in column]
        put_uvarint(out, len(index))
        for text in index:
            put_str(out, text)
        put_block(out, np.array(codes, np.uint64))


def _decimal(x: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(d, m) with every x == float64(m) / 10**d bit for bit (so -0.0 never is), the fewest
    digits d <= MAX_DECIMALS; None if there is none."""
    with np.errstate(over="ignore", invalid="ignore"):
        for d in range(MAX_DECIMALS + 1):
            scale = 10.0**d
            m = np.rint(x * scale)
            if not (np.abs(m) <= EXACT_INT).all():
                return None
            m = m.astype(np.int64)
            if np.array_equal((m / scale).view(np.int64), x.view(np.int64)):
                return d, m
    return None


def _firsts(sorted_keys: np.ndarray) -> np.ndarray:
    """Mask of the first element of each run of equal keys."""
    first = np.ones(len(sorted_keys), bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return first


# ---- decoding ---------------------------------------------------------------------------------
def decode(data: bytes) -> tuple[str, list[WireRecord]]:
    """(device_id, records) of a wire body; WireError if it is malformed in any way."""
    reader = Reader(bytes(data))
    if reader.take(len(MAGIC), "magic") != MAGIC:
        raise WireError(f"not a {MAGIC.decode()} wire body (bad magic)")
    version = reader.byte("version")
    if version != VERSION:
        raise WireError(f"wire version {version} is not supported (this decoder reads "
                        f"{VERSION})")
    device_id = reader.text("device_id")
    n = reader.count("record count", MAX_RECORDS)
    sensors = [reader.text("sensor_id") for _ in range(reader.count("sensor count", n))]
    kinds = [reader.text("kind") for _ in range(reader.count("kind count", n))]
    table = [_read_shape(reader, sensors, kinds) for _ in range(reader.count("shape count", n))]
    shapes = [shape for _, shape in table]
    shape_of = reader.block(n, "shapes of records")
    if n and shape_of.max() >= len(shapes):
        raise WireError("a record's shape index is beyond the shape table")
    shape_of = shape_of.astype(np.int64)
    sensor_of = np.array([sensor for sensor, _ in table], np.int64)[shape_of]
    seqs = _read_seqs(reader, n)
    ts = _read_ts(reader, sensor_of, len(sensors))
    payloads: list[str] = [""] * n
    order = np.argsort(shape_of, kind="stable").tolist()
    budget, end = MAX_DECODED_CHARS, 0
    for shape, m in zip(shapes, np.bincount(shape_of, minlength=len(shapes)).tolist(),
                        strict=True):
        positions, end = order[end:end + m], end + m
        # the numbers' bound before their columns are built, then each text column's size
        budget = _spend(budget, m * (len(shape.template)
                                     + sum(_MAX_TEXT.get(c, 0) for c in shape.codes)))
        columns = []
        for code in shape.codes:
            column, size = _read_column(reader, code, m)
            columns.append(column)
            budget = _spend(budget, size)
        rows = zip(*columns, strict=True) if columns else [()] * m
        for p, row in zip(positions, rows, strict=True):
            payloads[p] = shape.template % row
    if reader.left:
        raise WireError(f"{reader.left} bytes after the last column")
    names = np.array([(s.sensor, s.kind) for s in shapes] or np.empty((0, 2)), object)
    return device_id, [
        WireRecord(*fields) for fields in zip(
            seqs.tolist(), names[shape_of, 0].tolist(), ts.tolist(), names[shape_of, 1].tolist(),
            payloads, strict=True)]


def _spend(budget: int, chars: int) -> int:
    """What is left of the decoded-text budget; WireError when it runs out."""
    if chars > budget:
        raise WireError(f"the body expands beyond {MAX_DECODED_CHARS} characters of text")
    return budget - chars


def _read_shape(reader: Reader, sensors: list[str], kinds: list[str]) -> tuple[int, _Shape]:
    """(index of its sensor, shape) of a shape table entry."""
    sensor = reader.count("shape sensor index", len(sensors) - 1)
    kind = kinds[reader.count("shape kind index", len(kinds) - 1)]
    layout = reader.byte("shape layout")
    if layout == VERBATIM:
        return sensor, _Shape(sensors[sensor], kind, None)
    if layout != COLUMNS:
        raise WireError(f"unknown shape layout {layout}")
    fields = []
    for _ in range(reader.count("field count", MAX_FIELDS)):
        name = reader.text("field name")
        code = chr(reader.byte("field type"))
        if code not in _PLACEHOLDERS:
            raise WireError(f"unknown value type {code!r} of field {name!r}")
        fields.append((name, code))
    return sensor, _Shape(sensors[sensor], kind, tuple(fields))


def _read_seqs(reader: Reader, n: int) -> np.ndarray:
    """The records' seqs (int64), checked to be >= 0 and strictly increasing."""
    steps = reader.block(n, "seq")
    steps[1:] += np.uint64(1)
    seqs = np.cumsum(steps, dtype=np.uint64).view(np.int64)
    if (seqs < 0).any() or (np.diff(seqs) <= 0).any():
        raise WireError("seqs are not strictly increasing 64-bit values")
    return seqs


def _read_ts(reader: Reader, sensor_of: np.ndarray, sensors: int) -> np.ndarray:
    """The records' ts (int64), from per-sensor streams (``sensor_of``: each record's)."""
    firsts = np.array([unzigzag_int(reader.uvarint("first ts")) for _ in range(sensors)],
                      np.int64)
    order = np.argsort(sensor_of, kind="stable")
    key = sensor_of[order]
    first = _firsts(key)
    delta = np.zeros(len(key), np.int64)
    delta[~first] = unzigzag(reader.block(int((~first).sum()), "ts"))
    delta = segment_cumsum(delta, first)
    delta[first] = firsts[key[first]]
    ts = np.empty(len(key), np.int64)
    ts[order] = segment_cumsum(delta, first)
    return ts


def _read_column(reader: Reader, code: str, m: int) -> tuple[list, int]:
    """A column's render-ready items (floats, ints, or text) and the size of its text items
    (0 for numbers and bools: their bound is counted before)."""
    if code == "f":
        codec = reader.byte("float codec")
        if codec == FLOAT_DECIMAL:
            digits = reader.byte("decimal digits")
            if digits > MAX_DECIMALS:
                raise WireError(f"{digits} decimal digits exceed {MAX_DECIMALS}")
            x = reader.ints(m, "int column") / 10.0**digits
        elif codec == FLOAT_BINARY:
            x = reader.block(m, "float64 column").view(np.float64)
            if not np.isfinite(x).all():
                raise WireError("a float column holds NaN or infinity")
        else:
            raise WireError(f"unknown float codec {codec}")
        return x.tolist(), 0
    if code == "i":
        return reader.ints(m, "int column").tolist(), 0
    if code == "b":
        bits = np.unpackbits(np.frombuffer(reader.take((m + 7) // 8, "bools"), np.uint8),
                             count=m)
        return _BOOL_TEXT[bits].tolist(), 0
    entries = [reader.text("dictionary entry") for _ in range(reader.count("dictionary", m))]
    if code == "s":
        entries = [encode_basestring(entry) for entry in entries]
    index = reader.block(m, "dictionary indexes")
    if m and index.max() >= len(entries):
        raise WireError("a dictionary index is beyond its dictionary")
    sizes = np.array([len(entry) for entry in entries], np.int64)
    return np.array(entries, object)[index].tolist(), int(sizes[index].sum())
