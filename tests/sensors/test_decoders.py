"""Payload decoders: every option decodes as documented, every bad payload is refused with a
DecodeError that says what and where (and nothing else escapes), and bad settings are refused
with the key and the rule."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.sensors.decoders import DecodedRecord, DecodeError, build_decoder
from config.decoders import DecoderSettings
from config.loader import ConfigError, structure_strict
from messages.readings import Reading

NOW = 1_715_679_000_123_456_789  # 2024-05-14T09:30:00.123456789Z
T_S = 1_715_679_000


def decoder(**kwargs):
    return build_decoder(DecoderSettings(**kwargs))


def decode(payload: bytes | str, **kwargs) -> list[DecodedRecord]:
    if isinstance(payload, str):
        payload = payload.encode()
    return decoder(**kwargs).decode(payload, NOW)


def refused(payload: bytes | str, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        decode(payload, **kwargs)
    return str(info.value)


def as_readings(records: list[DecodedRecord]) -> list[Reading]:
    """Records become readings without a validation error (the decoder's promise)."""
    return [Reading(r.device_id or "veh-1", "mqtt0", r.ts, "env", r.values) for r in records]


# ---- json: shapes and options ------------------------------------------------------------------
def test_flat_object_is_one_record_at_receive_time():
    [record] = decode('{"temp": 21.5, "hum": 40, "ok": true, "label": "cab"}')
    assert record == DecodedRecord(NOW, {"temp": 21.5, "hum": 40, "ok": True, "label": "cab"})
    as_readings([record])


def test_nested_objects_and_arrays_flatten_with_dots_and_nulls_are_left_out():
    [record] = decode('{"gps": {"lat": 38.7, "fix": {"q": 1}}, "acc": [0.1, -0.2, 9.8], '
                      '"none": null, "empty": {}, "list": []}')
    assert record.values == {"gps.lat": 38.7, "gps.fix.q": 1, "acc.0": 0.1, "acc.1": -0.2,
                             "acc.2": 9.8}


def test_nesting_beyond_max_depth_is_refused_naming_the_path():
    payload = '{"a": {"b": {"c": 1}}}'
    assert decode(payload, max_depth=2)[0].values == {"a.b.c": 1}
    reason = refused(payload, max_depth=1)
    assert "'a.b'" in reason and "max_depth=1" in reason


@pytest.mark.parametrize(
    ("unit", "raw", "expected"),
    [
        ("ns", NOW, NOW),
        ("us", NOW // 1000, NOW // 1000 * 1000),
        ("ms", T_S * 1000 + 123, T_S * 10**9 + 123_000_000),
        ("s", T_S, T_S * 10**9),
        ("s", T_S + 0.25, T_S * 10**9 + 250_000_000),
        ("ms", T_S * 1000 + 0.5, T_S * 10**9 + 500_000),
    ],
)
def test_numeric_timestamps_in_each_unit(unit, raw, expected):
    [record] = decode(json.dumps({"t": raw, "x": 1}), ts_field="t", ts_unit=unit)
    assert record.ts == expected and record.values == {"x": 1}  # the ts field is taken out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-14T09:30:00Z", T_S * 10**9),
        ("2024-05-14T09:30:00.123456789Z", NOW),
        ("2024-05-14T11:30:00.5+02:00", T_S * 10**9 + 500_000_000),
        ("2024-05-14 04:00:00-05:30", T_S * 10**9),
        ("2016-12-31T23:59:60Z", 1_483_228_800 * 10**9),  # a leap second
    ],
)
def test_iso_timestamps_are_rfc3339_with_offset(text, expected):
    [record] = decode(json.dumps({"time": text, "x": 1}), ts_field="time", ts_unit="iso")
    assert record.ts == expected


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("2024-05-14T09:30:00", "RFC 3339 time with a UTC offset"),
        ("2024-02-30T09:30:00Z", "impossible date"),
        ("2024-05-14T25:30:00Z", "impossible time"),
        (1715679000, "must be an RFC 3339 string"),
    ],
)
def test_bad_iso_timestamps_are_refused(value, needle):
    assert needle in refused(json.dumps({"time": value, "x": 1}), ts_field="time", ts_unit="iso")


def test_timestamp_in_the_wrong_unit_is_refused_with_a_hint():
    reason = refused(json.dumps({"t": T_S, "x": 1}), ts_field="t", ts_unit="ms")
    assert "outside 2000..2200" in reason and "as s it would be 2024-05-14T09:30:00Z" in reason


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"x": 1}, "ts field 't' is missing"),
        ({"t": "1715679000", "x": 1}, "must be a number of s"),
        ({"t": True, "x": 1}, "must be a number of s"),
        ({"t": 10**40, "x": 1}, "outside 2000..2200"),
    ],
)
def test_bad_numeric_timestamps_are_refused(doc, needle):
    assert needle in refused(json.dumps(doc), ts_field="t", ts_unit="s")


def test_nested_ts_and_device_fields_by_flattened_name():
    [record] = decode('{"meta": {"t": 1715679000, "dev": 17}, "x": 1}', ts_field="meta.t",
                      ts_unit="s", device_field="meta.dev")
    assert record == DecodedRecord(T_S * 10**9, {"x": 1}, "17")


def test_top_level_array_is_several_records_each_with_its_device():
    payload = json.dumps([{"dev": "veh-1", "t": T_S, "v": 1.5},
                          {"dev": "veh-2", "t": T_S + 1, "v": 2.5}])
    records = decode(payload, ts_field="t", ts_unit="s", device_field="dev")
    assert [(r.device_id, r.ts, r.values) for r in records] == [
        ("veh-1", T_S * 10**9, {"v": 1.5}), ("veh-2", (T_S + 1) * 10**9, {"v": 2.5})]
    assert [r.device_id for r in as_readings(records)] == ["veh-1", "veh-2"]


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"x": 1}, "device field 'dev' is missing"),
        ({"dev": "veh 1", "x": 1}, "device field 'dev' must be 1-128 characters"),
        ({"dev": 1.5, "x": 1}, "must be a string or an integer"),
        ({"dev": True, "x": 1}, "must be a string or an integer"),
    ],
)
def test_bad_device_fields_are_refused(doc, needle):
    assert needle in refused(json.dumps(doc), device_field="dev")


def test_fields_keeps_only_the_listed_values_and_skips_missing_ones():
    kwargs = {"fields": ("temp", "gps.lat", "absent")}
    [record] = decode('{"temp": 20, "hum": 1e400, "bad name": 1, "gps": {"lat": 1.5}}', **kwargs)
    assert record.values == {"temp": 20, "gps.lat": 1.5}  # unlisted values are not checked
    assert "none of the configured fields" in refused('{"hum": 3}', **kwargs)


def test_a_good_payload_after_garbage_still_decodes():
    dec = decoder(ts_field="t", ts_unit="s")
    for junk in (b"\xff\xfe", b"{", b'{"t": NaN}', b"[]", b"{}", b"[" * 5000):
        with pytest.raises(DecodeError):
            dec.decode(junk, NOW)
    assert dec.decode(b'{"t": 1715679000, "x": 1}', NOW) == [DecodedRecord(T_S * 10**9, {"x": 1})]


# ---- json: refused payloads --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"\xc3\x28", "not UTF-8 text: byte 0xc3 at offset 0"),
        (b'{"x": 1', "not valid JSON: Expecting ',' delimiter at line 1 column 8"),
        (b"", "not valid JSON"),
        (b'{"x": NaN}', "NaN is not a JSON number"),
        (b'{"x": Infinity}', "Infinity is not a JSON number"),
        (b'{"x": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"x": 1e400}', "value 'x' is not a finite number (got inf)"),
        (b'{"x": 9223372036854775808}', "value 'x' = 9223372036854775808 does not fit in a 64-bit"),
        (b'{"x": -9223372036854775809}', "does not fit in a 64-bit integer"),
        (b'{"x": ' + b"9" * 5000 + b"}", "a number has too many digits"),
        (b"{}", "holds no values"),
        (b'{"x": null, "y": {}}', "holds no values"),
        (b"[]", "empty JSON array"),
        (b"[{}, 3]", "record 0: the object holds no values"),
        (b'[{"x": 1}, 3]', "record 1 of the top-level array is a number, expected an object"),
        (b'"text"', "payload is a string, expected a JSON object"),
        (b"null", "payload is null"),
        (b'{"temp C": 1}', "value name 'temp C' is not allowed"),
        (b'{"_x": 1}', "value name '_x' is not allowed"),
        (b'{"a.b": 1, "a": {"b": 2}}', "value name 'a.b' occurs twice after flattening"),
        (json.dumps({"s": "x" * 4097}).encode(), "string of 4097 characters, at most 4096"),
        (json.dumps({f"v{i}": i for i in range(257)}).encode(), "257 values, at most 256"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
    ],
)
def test_bad_json_payloads_are_refused_with_the_reason(payload, needle):
    reason = refused(payload)
    assert needle in reason, reason
    assert not reason.startswith("decoder bug")


def test_receive_time_outside_the_valid_range_is_refused():
    """A gateway booted without a real-time clock sees 1970: say so rather than journal it."""
    with pytest.raises(DecodeError, match="is the gateway's clock set"):
        decoder().decode(b'{"x": 1}', 5 * 10**9)


# ---- struct ------------------------------------------------------------------------------------
GPS_FORMAT = "IiiH2s"
GPS_FIELDS = ("t", "lat", "lon", "_", "name")


def gps_record(t=T_S, lat=387_369_000, lon=-91_427_000, pad=7, name=b"ab") -> bytes:
    return struct.pack("<" + GPS_FORMAT, t, lat, lon, pad, name)


def gps_decoder(**kwargs):
    base = {"type": "struct", "format": GPS_FORMAT, "fields": GPS_FIELDS, "ts_field": "t",
            "ts_unit": "s", "scale": {"lat": 1e-7, "lon": 1e-7}}
    return decoder(**{**base, **kwargs})


def test_struct_record_is_little_endian_by_default_scaled_and_skips_padding():
    [record] = gps_decoder().decode(gps_record(), NOW)
    assert record.ts == T_S * 10**9 and record.device_id is None
    assert record.values == {"lat": pytest.approx(38.7369), "lon": pytest.approx(-9.1427),
                             "name": "ab"}
    assert type(record.values["lat"]) is float
    as_readings([record])


def test_struct_big_endian_format_and_unscaled_ints():
    dec = decoder(type="struct", format=">hHq?", fields=("a", "b", "c", "d"))
    [record] = dec.decode(struct.pack(">hHq?", -2, 65535, -(2**63), True), NOW)
    assert record.values == {"a": -2, "b": 65535, "c": -(2**63), "d": True}
    assert record.ts == NOW


def test_struct_empty_field_names_skip_values_too():
    dec = decoder(type="struct", format="<bbb", fields=("x", "", "_"))
    assert dec.decode(bytes([1, 2, 3]), NOW)[0].values == {"x": 1}


def test_repeated_struct_payload_is_several_records():
    payload = gps_record(T_S) + gps_record(T_S + 1, name=b"c\x00")
    records = gps_decoder(repeated=True).decode(payload, NOW)
    assert [r.ts for r in records] == [T_S * 10**9, (T_S + 1) * 10**9]
    assert [r.values["name"] for r in records] == ["ab", "c"]  # trailing NULs removed


def test_struct_device_field_from_an_integer_or_text():
    dec = decoder(type="struct", format="<H4sf", fields=("unit", "tag", "v"),
                  device_field="unit")
    [record] = dec.decode(struct.pack("<H4sf", 42, b"cab\x00", 1.5), NOW)
    assert record.device_id == "42" and record.values == {"tag": "cab", "v": 1.5}
    dec = decoder(type="struct", format="<4sf", fields=("dev", "v"), device_field="dev")
    assert dec.decode(struct.pack("<4sf", b"v-1\x00", 1.5), NOW)[0].device_id == "v-1"


@pytest.mark.parametrize(
    ("kwargs", "payload", "needle"),
    [
        ({}, gps_record()[:-1], "payload of 15 bytes, expected exactly 16"),
        ({}, gps_record() * 2, "payload of 32 bytes, expected exactly 16"),
        ({"repeated": True}, gps_record() + b"\x00", "not a whole multiple of the 16-byte"),
        ({"repeated": True}, b"", "payload of 0 bytes is not a whole multiple"),
        ({}, gps_record(t=5), "ts field 't' = 5 (s) is 1970-01-01T00:00:05Z, outside"),
        ({}, gps_record(name=b"\xff\x00"), "value 'name' is not UTF-8 text (byte 0xff"),
        ({"repeated": True}, gps_record() + gps_record(t=1),
         "record 1: ts field 't' = 1 (s)"),
    ],
)
def test_bad_struct_payloads_are_refused_with_the_reason(kwargs, payload, needle):
    with pytest.raises(DecodeError) as info:
        gps_decoder(**kwargs).decode(payload, NOW)
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_struct_nan_and_infinity_are_refused(value):
    dec = decoder(type="struct", format="<d", fields=("v",))
    with pytest.raises(DecodeError, match="value 'v' is not a finite number"):
        dec.decode(struct.pack("<d", value), NOW)


def test_struct_unsigned_64_bit_beyond_int64_is_refused():
    dec = decoder(type="struct", format="<Q", fields=("v",))
    assert dec.decode(struct.pack("<Q", 2**63 - 1), NOW)[0].values == {"v": 2**63 - 1}
    with pytest.raises(DecodeError, match="does not fit in a 64-bit integer"):
        dec.decode(struct.pack("<Q", 2**63), NOW)


def test_struct_scaled_overflow_is_refused():
    dec = decoder(type="struct", format="<d", fields=("v",), scale={"v": 1e300})
    with pytest.raises(DecodeError, match="not a finite number"):
        dec.decode(struct.pack("<d", 1e300), NOW)


# ---- settings ----------------------------------------------------------------------------------
def config_problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        structure_strict(data, DecoderSettings, "gw.toml")
    return info.value.problems


def test_settings_from_toml_tables():
    s = structure_strict({"type": "struct", "format": "<Iii", "fields": ["t", "lat", "lon"],
                          "ts_field": "t", "ts_unit": "s", "scale": {"lat": 1, "lon": 1e-7}},
                         DecoderSettings)
    assert s.scale == {"lat": 1.0, "lon": 1e-7} and s.fields == ("t", "lat", "lon")
    assert structure_strict({}, DecoderSettings) == DecoderSettings()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"type": "xml"}, "type: must be one of json, struct (got 'xml')"),
        ({"ts_unit": "min", "ts_field": "t"}, "ts_unit: must be one of ns, us, ms, s, iso"),
        ({"ts_unit": "s"}, "ts_unit: needs ts_field"),
        ({"ts_field": "t", "device_field": "t"}, "device_field: must differ from ts_field"),
        ({"format": "<i"}, "format: applies to type = 'struct' only"),
        ({"repeated": True}, "repeated: applies to type = 'struct' only"),
        ({"scale": {"x": 2.0}}, "scale: applies to type = 'struct' only"),
        ({"max_depth": 0}, "max_depth: must be in 1..16 (got 0)"),
        ({"max_depth": 17}, "max_depth: must be in 1..16"),
        ({"fields": ["ok", "no good"]}, "fields: must hold value names"),
        ({"fields": ["a", "a"]}, "fields: must not name a field twice"),
        ({"fields": ["t", "x"], "ts_field": "t"}, "fields: must not list ts_field 't'"),
        ({"type": "struct", "fields": ["a"]}, "format: is required for type = \"struct\""),
        ({"type": "struct", "format": "@i", "fields": ["a"]}, "must not use native byte order"),
        ({"type": "struct", "format": "=i", "fields": ["a"]}, "must not use native byte order"),
        ({"type": "struct", "format": "<P", "fields": ["a"]}, "native-only codes 'P'"),
        ({"type": "struct", "format": "<iz", "fields": ["a"]}, "is not a valid struct format"),
        ({"type": "struct", "format": "4x", "fields": []}, "must name at least one value"),
        ({"type": "struct", "format": "<ii", "fields": ["a"]},
         "fields: must name each of the 2 values format '<ii' unpacks"),
        ({"type": "struct", "format": "<ii", "fields": ["a", "b"], "max_depth": 3},
         "max_depth: applies to type = 'json' only"),
        ({"type": "struct", "format": "<ii", "fields": ["a", "b"], "ts_field": "c"},
         "ts_field: must be one of fields (a, b) (got 'c')"),
        ({"type": "struct", "format": "<i", "fields": ["t"], "ts_field": "t"},
         "fields: must name at least one value besides ts_field"),
        ({"type": "struct", "format": "<2si", "fields": ["t", "v"], "ts_field": "t"},
         "ts_field: must be a numeric value"),
        ({"type": "struct", "format": "<ii", "fields": ["t", "v"], "ts_field": "t",
          "ts_unit": "iso"}, "iso applies to type = \"json\" only"),
        ({"type": "struct", "format": "<ii", "fields": ["a", "b"], "scale": {"c": 2.0}},
         "scale: must name value fields (a, b) (got 'c')"),
        ({"type": "struct", "format": "<i?", "fields": ["a", "b"], "scale": {"b": 2.0}},
         "scale: 'b' is not numeric"),
        ({"type": "struct", "format": "<ii", "fields": ["a", "b"], "scale": {"a": 0.0}},
         "scale: 'a' must be a finite, non-zero number"),
        ({"type": "struct", "format": "<ii", "fields": ["a", "b"], "scale": {"a": "x"}},
         "scale['a']: expected a number (got 'x')"),
        ({"type": "struct", "format": "<di", "fields": ["d", "v"], "device_field": "d"},
         "device_field: must be an integer or a byte string (format code 'd' is not)"),
        ({"fields": [f"v{i}" for i in range(257)]}, "fields: must name at most 256 values"),
        ({"type": "struct", "format": "<257b", "fields": [f"v{i}" for i in range(257)]},
         "fields: must name at most 256 values"),
        ({"bogus": 1}, "unknown key(s) bogus"),
    ],
)
def test_bad_settings_are_refused_naming_key_value_and_rule(data, needle):
    found = config_problems(data)
    assert any(needle in p for p in found), found


# ---- fuzz --------------------------------------------------------------------------------------
JSON_DECODERS = [
    decoder(),
    decoder(ts_field="t", ts_unit="ms", device_field="dev"),
    decoder(ts_field="t", ts_unit="iso", fields=("a", "b.c")),
    decoder(max_depth=1),
]
STRUCT_DECODERS = [
    gps_decoder(),
    gps_decoder(repeated=True),
    decoder(type="struct", format=">d?4sQ", fields=("a", "b", "c", "d")),
]
GOOD = [(JSON_DECODERS[0], b'{"x": 1}'),
        (JSON_DECODERS[1], b'{"t": 1715679000000, "dev": "veh-2", "x": 1.5}'),
        (JSON_DECODERS[2], b'{"t": "2024-05-14T09:30:00Z", "a": 1, "b": {"c": "z"}}'),
        (JSON_DECODERS[3], b'{"x": {"y": 2}}'),
        (STRUCT_DECODERS[0], gps_record()), (STRUCT_DECODERS[1], gps_record() * 3),
        (STRUCT_DECODERS[2], struct.pack(">d?4sQ", 1.5, False, b"ab", 3))]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.sampled_from(["t", "dev", "a", "b", "c", "x.y", "b.c", "", "bad key",
                                       "é"]) | st.text(max_size=6), inner, max_size=5),
    max_leaves=30,
)


def check_outcome(dec, payload: bytes) -> None:
    try:
        records = dec.decode(payload, NOW)
    except DecodeError as exc:
        assert str(exc) and not str(exc).startswith("decoder bug"), str(exc)
        return
    assert records
    as_readings(records)  # whatever is accepted is a valid reading


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=200), which=st.integers(0, 6))
def test_random_bytes_give_records_or_decode_error_only(payload, which):
    dec, good = GOOD[which]
    check_outcome(dec, payload)
    assert dec.decode(good, NOW)  # good data after garbage still comes through


@settings(max_examples=300, deadline=None)
@given(doc=json_values, which=st.integers(0, 3))
def test_random_json_structures_give_records_or_decode_error_only(doc, which):
    dec, good = GOOD[which]
    check_outcome(dec, json.dumps(doc, allow_nan=True).encode())
    assert dec.decode(good, NOW)


@settings(max_examples=200, deadline=None)
@given(good=st.sampled_from(GOOD[4:]), cut=st.integers(0, 60), junk=st.binary(max_size=40))
def test_mangled_struct_payloads_give_records_or_decode_error_only(good, cut, junk):
    dec, payload = good
    check_outcome(dec, payload[:cut] + junk)
