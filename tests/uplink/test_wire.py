"""The uplink's wire encoding: lossless on any records, small on real ones, safe on garbage."""

from __future__ import annotations

import contextlib
import gzip
import json
import time

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.uplink import wire
from actors.uplink.envelope import compress
from actors.uplink.varint import put_uvarint
from actors.uplink.wire import MAGIC, VERSION, WireError, WireRecord, decode, encode
from messages.readings import TS_MAX_NS, TS_MIN_NS, encode_values
from tools.bench_wire import (
    BATCH_RECORDS,
    RATIO_BAR,
    baseline_rows,
    sealed_size,
    simulate_drive,
)

EDGE_FLOATS = [0.0, -0.0, 0.1, 0.2, 1.0, -1.5, 1e-7, 1e-4, 1e16, 1e300, -1e300, 5e-324,
               2.0**53, 2.0**53 + 2, 0.30000000000000004, 123456.789, 1.7976931348623157e308,
               9.999999999, -0.000000001]
EDGE_INTS = [0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), -(2**63) + 1, 10**18]
NAMES = ["ax", "ay", "lat", "speed_kmh", "g.z", "a-b", "x/1", "v:2", "100%", "n", "é", "q\"", ""]

floats = st.one_of(st.sampled_from(EDGE_FLOATS),
                   st.floats(allow_nan=False, allow_infinity=False),
                   st.integers(-10**6, 10**6).map(lambda m: m / 1000))
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**63), 2**63 - 1))
texts = st.one_of(st.sampled_from(["", "ok", "é", "日本", "a\"b\\c\n", "\x00\x1f", "😀", "\u2028"]),
                  st.text(max_size=30))
values = st.dictionaries(st.sampled_from(NAMES), st.one_of(floats, ints, texts, st.booleans()),
                         min_size=1, max_size=6)
#: Texts that are not what encode_values makes: they must travel verbatim.
ODD_PAYLOADS = ['{"a": 1}', '{"a":1e5}', '{"a":1,"a":2}', '{"a":NaN}', '{"a":null}', "[1,2]",
                '{"a":{"b":[1]}}', "", "not json", '{"a":1} ', '{"a":"\\u00e9"}', "{}",
                '{"a":123456789012345678901234567890}', '{"a":-0}', '{"a":1.50}', "null"]
payloads = st.one_of(values.map(encode_values), values.map(encode_values),
                     st.sampled_from(ODD_PAYLOADS))


@st.composite
def batches(draw) -> list[WireRecord]:
    """Records of a few sensors and kinds, mixed shapes, seq gaps, periodic or random ts."""
    n = draw(st.integers(0, 40))
    seq = draw(st.integers(0, 2**40))
    period = draw(st.sampled_from([None, 10**7, 10**9]))
    t = draw(st.integers(TS_MIN_NS, TS_MAX_NS - 10**12))
    out = []
    for _ in range(n):
        t = t + period if period else draw(st.integers(-(2**62), 2**62))
        out.append(WireRecord(seq, draw(st.sampled_from(["imu0", "gps0", "s/é"])), t,
                              draw(st.sampled_from(["imu", "gps", "k"])), draw(payloads)))
        seq += draw(st.sampled_from([1, 1, 2, 7, 2**20]))
    return out


@settings(deadline=None, max_examples=200,  # a loaded 2-core machine: timings vary
          suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from(["veh-001", "", "d/é"]))
def test_round_trip_is_exact(records, device_id):
    assert decode(encode(device_id, records)) == (device_id, records)


def test_extreme_seqs_and_ts_round_trip():
    seqs = [0, 1, 2**32, 2**62, 2**63 - 2, 2**63 - 1]
    stamps = [-(2**63), 2**63 - 1, 0, -(2**63), 2**63 - 1, -1]
    records = [WireRecord(s, "s", t, "k", '{"v":1}') for s, t in zip(seqs, stamps, strict=True)]
    assert decode(encode("d", records)) == ("d", records)


def test_decimal_and_binary_float_columns_keep_every_bit():
    xs = EDGE_FLOATS + [x / 7 for x in range(-50, 50)]
    records = [WireRecord(i + 1, "s", TS_MIN_NS + i, "k", encode_values({"x": x, "y": 0.5}))
               for i, x in enumerate(xs)]
    _, back = decode(encode("d", records))
    assert [r.payload for r in back] == [r.payload for r in records]
    assert [json.loads(r.payload)["x"] for r in back] == xs


def test_payloads_that_do_not_render_back_travel_verbatim():
    records = [WireRecord(i + 1, "s", TS_MIN_NS + i, "k", p)
               for i, p in enumerate(ODD_PAYLOADS + ['{"a":5}', '{"a":1}', '{"a":1.5}'])]
    data = encode("d", records)
    assert b'{"a": 1}' in data and b'{"a":1.50}' in data
    assert decode(data) == ("d", records)


def test_empty_batch_and_single_record():
    assert decode(encode("veh-001", [])) == ("veh-001", [])
    one = [WireRecord(7, "imu0", TS_MIN_NS, "imu", '{"ax":0.1}')]
    assert decode(encode("veh-001", one)) == ("veh-001", one)


def test_from_record_takes_a_journal_records_fields():
    from actors.journal.reader import Record
    from messages.journal import Position

    record = Record(Position(3), "veh-001", 9, "imu0", TS_MIN_NS, "imu", '{"ax":1}')
    assert WireRecord.from_record(record) == WireRecord(9, "imu0", TS_MIN_NS, "imu", '{"ax":1}')


@pytest.mark.parametrize("records", [
    [WireRecord(2, "s", 0, "k", "{}"), WireRecord(2, "s", 0, "k", "{}")],
    [WireRecord(-1, "s", 0, "k", "{}")],
    [WireRecord(1, "s", 2**63, "k", "{}")],
    [WireRecord(1.0, "s", 0, "k", "{}")],
    [WireRecord(1, "s", 0, "k", '"\ud800"')],
])
def test_encode_refuses_what_it_cannot_carry(records):
    with pytest.raises(WireError):
        encode("d", records)


# ---- the simulated drive ------------------------------------------------------------------
@pytest.fixture(scope="module")
def drive():
    return simulate_drive(200.0)


def test_simulated_drive_round_trips(drive):
    device_id, records = drive
    for i in range(0, len(records), BATCH_RECORDS):
        batch = records[i:i + BATCH_RECORDS]
        assert decode(encode(device_id, batch)) == (device_id, batch)


def test_simulated_drive_is_a_third_of_gzip_json(drive):
    device_id, records = drive
    key = nacl.signing.SigningKey.generate()
    ours = baseline = 0
    for i in range(0, len(records), BATCH_RECORDS):
        batch = records[i:i + BATCH_RECORDS]
        ours += sealed_size(encode(device_id, batch), device_id, batch, key)
        baseline += len(gzip.compress(baseline_rows(device_id, batch), 6, mtime=0))
    assert ours / baseline <= RATIO_BAR  # signed header included; measured ~0.29


# ---- malformed input --------------------------------------------------------------------------
SMALL = [WireRecord(1, "imu0", TS_MIN_NS, "imu", '{"ax":0.1,"ok":true,"s":"é"}'),
         WireRecord(3, "gps0", TS_MIN_NS + 5, "gps", '{"lat":1.5,"fix":2}'),
         WireRecord(4, "imu0", TS_MIN_NS + 9, "imu", '{"ax":0.25,"ok":false,"s":"x"}'),
         WireRecord(8, "gps0", TS_MIN_NS + 9, "gps", "not json")]


def test_every_truncation_is_a_wire_error():
    data = encode("veh-001", SMALL)
    for size in range(len(data)):
        with pytest.raises(WireError):
            decode(data[:size])
    with pytest.raises(WireError, match="after the last column"):
        decode(data + b"\x00")


def test_bad_magic_version_and_utf8():
    data = encode("veh-001", SMALL)
    with pytest.raises(WireError, match="magic"):
        decode(b"XXXX" + data[4:])
    with pytest.raises(WireError, match="version"):
        decode(MAGIC + bytes([VERSION + 1]) + data[5:])
    with pytest.raises(WireError, match="UTF-8"):
        decode(MAGIC + bytes([VERSION, 2]) + b"\xff\xfe" + data[13:])


def _header(n: int, *counts: int) -> bytes:
    out = bytearray(MAGIC + bytes([VERSION]))
    put_uvarint(out, 1)
    out += b"d"
    for value in (n, *counts):
        put_uvarint(out, value)
    return bytes(out)


@pytest.mark.parametrize("data", [
    _header(2**40),                              # records beyond the limit
    _header(2**64 - 1),                          # the largest varint
    _header(3, 2**30),                           # sensors beyond the records
    _header(3, 0, 0, 2**20),                     # shapes beyond the records
    MAGIC + bytes([VERSION]) + b"\xff" * 11,     # a varint that never ends
    MAGIC + bytes([VERSION]) + b"\xff" * 9 + b"\x7f",  # one beyond 64 bits
    _header(1, 1) + b"\x10s",                    # a string longer than the body
])
def test_huge_or_endless_declarations_fail_fast(data):
    t0 = time.monotonic()
    with pytest.raises(WireError):
        decode(data)
    assert time.monotonic() - t0 < 5.0  # microseconds in fact; generous for a loaded machine


def test_expansion_beyond_the_budget_is_refused(monkeypatch):
    long = encode_values({"s": "x" * 4000})
    records = [WireRecord(i + 1, "s", TS_MIN_NS + i, "k", long) for i in range(300)]
    data = encode("d", records)
    assert len(compress(data)) < 2000  # one dictionary entry stands for 1.2 M characters
    monkeypatch.setattr(wire, "MAX_DECODED_CHARS", 1_000_000)
    with pytest.raises(WireError, match="expands beyond"):
        decode(data)


@settings(deadline=None, max_examples=400)
@given(st.data())
def test_corrupted_bodies_raise_only_wire_error(data):
    body = bytearray(encode("veh-001", SMALL + [WireRecord(9, "e", 1, "k", '{"n":-5}')]))
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(WireError):
        decode(bytes(body))


@settings(deadline=None, max_examples=200)
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_wire_error(tail):
    for data in (tail, MAGIC + bytes([VERSION]) + tail):
        with contextlib.suppress(WireError):
            decode(data)
