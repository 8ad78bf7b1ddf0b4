"""Readings built from external input are validated, with errors that name the bad field."""

import contextlib
import pickle

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from messages import MessageValidationError, Reading, ReadingBatch

TS = 1_700_000_000_000_000_000
GOOD = {"device_id": "veh-001", "sensor_id": "imu0", "ts": TS, "kind": "imu",
        "values": {"ax": 0.5, "fix": 1, "label": "ok", "moving": True}}


def test_valid_external_reading_round_trips():
    reading = Reading.from_external(GOOD)
    assert reading.to_external() == GOOD
    assert Reading.from_external(reading.to_external()) == reading


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"device_id": ""}, "device_id"),
        ({"device_id": "has space"}, "device_id"),
        ({"sensor_id": 7}, "sensor_id"),
        ({"ts": 1.5e18}, "ts"),
        ({"ts": True}, "ts"),
        ({"ts": 5}, "ts"),
        ({"kind": None}, "kind"),
        ({"values": {}}, "values"),
        ({"values": []}, "values"),
        ({"values": {"ax": float("nan")}}, "values.ax"),
        ({"values": {"ax": float("inf")}}, "values.ax"),
        ({"values": {"ax": [1, 2]}}, "values.ax"),
        ({"values": {"big": 2**64}}, "values.big"),
        ({"values": {"bad name": 1}}, "values"),
    ],
)
def test_bad_field_is_refused_with_an_error_naming_it(change, field):
    with pytest.raises(MessageValidationError) as info:
        Reading.from_external({**GOOD, **change})
    assert info.value.field == field
    assert f"Reading.{field} must be" in str(info.value)


def test_missing_and_unknown_fields_are_named():
    data = dict(GOOD)
    del data["ts"]
    with pytest.raises(MessageValidationError, match=r"Reading\.ts must be present"):
        Reading.from_external(data)
    with pytest.raises(MessageValidationError, match=r"Reading\.extra must be absent"):
        Reading.from_external({**GOOD, "extra": 1})
    with pytest.raises(MessageValidationError, match="Reading.<root>"):
        Reading.from_external(["not", "an", "object"])


def test_readings_are_frozen_values():
    reading = Reading.from_external(GOOD)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        reading.ts = 0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(reading)) == reading


def test_batch_keeps_every_reading_and_refuses_mixed_sensors():
    readings = [Reading("veh-001", "imu0", TS + i, "imu", {"ax": i / 10}) for i in range(5)]
    batch = ReadingBatch.from_readings(readings)
    assert len(batch) == 5 and batch.readings() == tuple(readings)
    with pytest.raises(MessageValidationError, match="ReadingBatch.sensor_id"):
        ReadingBatch.from_readings([*readings, Reading("veh-001", "gps0", TS, "gps", {"x": 1})])
    with pytest.raises(MessageValidationError, match="ReadingBatch.readings"):
        ReadingBatch.from_readings([])


values = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
    st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=50)),
    min_size=1, max_size=10,
)


@given(values)
def test_any_valid_values_survive_the_batch_encoding(vals):
    reading = Reading("veh-001", "s1", TS, "k", vals)
    (back,) = ReadingBatch.from_readings([reading]).readings()
    assert back == reading
    assert {k: type(v) for k, v in back.values.items()} == {k: type(v) for k, v in vals.items()}


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.none(), st.integers(), st.text(),
                                                       st.floats(), st.lists(st.integers())),
                       max_size=6))
def test_arbitrary_external_input_is_accepted_or_refused_never_crashes(data):
    with contextlib.suppress(MessageValidationError):
        Reading.from_external(data)


def test_trusted_reading_equals_a_validated_one_and_passes_validation():
    args = ("veh-001", "imu0", TS, "imu", {"ax": 0.5})
    trusted = Reading.trusted(*args)
    assert trusted == Reading(*args)
    attrs.validate(trusted)
