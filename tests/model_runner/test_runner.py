"""ModelRunner without an actor system: one record per window, rule events at once, bad input
as inference-error records, and a state that resumes anywhere to the same outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from actors.journal.reader import Record
from actors.model_runner.actor import shipped_model_dir
from actors.model_runner.inference import InferenceSession, InvalidInput, check_input
from actors.model_runner.manifest import model_sha256, trusted_keys, verify_model_dir
from actors.model_runner.runner import (
    INFERENCE,
    INFERENCE_ERROR,
    SAFETY_EVENT,
    ModelRunner,
    ServingModel,
)
from messages.journal import Position
from messages.readings import encode_values
from tests.model_runner.test_windows import T0, sim_records

WINDOW = 2_000_000_000


@pytest.fixture(scope="module")
def model() -> ServingModel:
    path = shipped_model_dir()
    manifest = verify_model_dir(path, trusted_keys())
    session = InferenceSession(os.path.join(path, "model.xml"), manifest["compile"])
    return ServingModel.from_manifest(session, manifest, model_sha256(manifest))


def as_records(rows) -> list[Record]:
    return [Record(Position(pos), dev, pos, sensor, ts, kind, encode_values(values))
            for pos, dev, sensor, ts, kind, values in rows]


def outputs(runner: ModelRunner, records) -> list[tuple[str, int, dict]]:
    return [(r.kind, r.ts, dict(r.values)) for r in runner.process(records)]


def test_every_closed_window_gets_exactly_one_inference_record(model):
    out = outputs(ModelRunner(model, grace_ns=WINDOW // 2), as_records(sim_records(30.0)))
    windows = [(ts, v) for kind, ts, v in out if kind in (INFERENCE, INFERENCE_ERROR)]
    assert [ts for ts, _ in windows] == [T0 + i * WINDOW for i in range(14)]
    for _ts, v in windows:
        assert v["model_version"] == model.version and v["model_sha256"] == model.sha256
        assert len(v["input_sha256"]) == 64 and 0 <= v["confidence"] <= 1
        assert v["label"] in ("normal", *model.labels)
        assert v["imu_n"] == 100 and v["engine_n"] == 20


def test_a_rule_hit_is_a_safety_event_at_once_and_repeats_are_debounced(model):
    rows = sim_records(6.0)
    braking = [(p, d, s, ts, k, {**v, "ax": -6.0} if k == "imu" and ts < T0 + 10**9 else v)
               for p, d, s, ts, k, v in rows]
    runner = ModelRunner(model)
    events = [v for kind, _ts, v in outputs(runner, as_records(braking[:60]))
              if kind == SAFETY_EVENT and v["source"] == "rule"]
    assert len(events) == 1 and events[0]["type"] == "harsh_braking"
    assert events[0]["value"] == -6.0 and events[0]["sensor_id"] == "imu0"
    assert runner.counts["events_debounced"] > 0


def test_an_anomalous_window_becomes_a_model_safety_event(model):
    rows = sim_records(10.0)
    # The engine's rpm signal reads three times too high for 4 s: no rule sees it.
    broken = [(p, d, s, ts, k, {**v, "rpm": v["rpm"] * 3}
               if k == "engine" and T0 + 2 * WINDOW <= ts < T0 + 4 * WINDOW else v)
              for p, d, s, ts, k, v in rows]
    out = outputs(ModelRunner(model, grace_ns=WINDOW // 2), as_records(broken))
    flagged = {ts for kind, ts, v in out if kind == INFERENCE and v["label"] != "normal"}
    assert {T0 + 2 * WINDOW, T0 + 3 * WINDOW} <= flagged
    events = [v for kind, ts, v in out if kind == SAFETY_EVENT and v["source"] == "model"]
    assert events and all(v["score"] >= model.threshold for v in events)
    # Two anomalous windows of one type within the debounce interval: one event.
    assert len({v["type"] for v in events}) == len(events)


def test_bad_windows_are_inference_error_records_with_the_reason(model):
    rows = sim_records(8.0)
    bad = [(p, d, s, ts, k, {**v, "coolant_c": 1e300}
            if k == "engine" and ts < T0 + WINDOW else v) for p, d, s, ts, k, v in rows]
    bad = [r for r in bad if not (r[4] == "imu" and T0 + WINDOW <= r[3] < T0 + 2 * WINDOW)]
    out = outputs(ModelRunner(model, grace_ns=WINDOW // 2), as_records(bad))
    errors = {ts: v["reason"] for kind, ts, v in out if kind == INFERENCE_ERROR}
    assert "coolant_c_mean" in errors[T0] and "finite" in errors[T0]
    assert errors[T0 + WINDOW] == "imu: 0 readings (needs >= 2)"
    assert any(kind == INFERENCE and ts == T0 + 2 * WINDOW for kind, ts, _ in out)


@pytest.mark.parametrize(("array", "reason"), [
    (np.full((1, 64), np.nan, np.float32), "is nan"),
    (np.full((1, 64), np.inf, np.float32), "is inf"),
    (np.zeros((1, 63), np.float32), r"shape is \(1, 63\)"),
    (np.zeros((2, 8, 64), np.float32), r"shape is \(2, 8, 64\)"),
    (np.zeros((1, 64), np.float64), "dtype is float64"),
    ([0.0] * 64, "not an array"),
])
def test_nan_inf_and_wrong_shapes_are_refused_before_the_model(model, array, reason):
    with pytest.raises(InvalidInput, match=reason):
        check_input(array)
    with pytest.raises(InvalidInput, match=reason):
        model.session.infer(array)


def test_without_a_model_every_window_says_why_it_was_not_inferred():
    runner = ModelRunner(None, grace_ns=WINDOW // 2)
    runner.no_model_reason = "model 9.9 was refused: bad signature"
    out = outputs(runner, as_records(sim_records(8.0)))
    assert [k for k, _ts, _v in out] == [INFERENCE_ERROR] * 3
    assert all(v["reason"] == "model 9.9 was refused: bad signature" for _k, _t, v in out)


@pytest.mark.parametrize("cut", [1, 333, 700, 1111])
def test_state_committed_anywhere_resumes_to_the_same_records(model, cut):
    records = as_records(sim_records(16.0))

    def strip(out):  # latency is measured, not computed
        return [(k, ts, {n: x for n, x in v.items() if n != "latency_us"}) for k, ts, v in out]

    whole = strip(outputs(ModelRunner(model), records))
    first = ModelRunner(model)
    before = strip(outputs(first, records[:cut]))
    resumed = ModelRunner.from_state(json.loads(json.dumps(first.to_state())), model)
    assert before + strip(outputs(resumed, records[cut:])) == whole
