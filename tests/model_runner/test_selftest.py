"""The self-test: a child process that checks a signed model, and the checks the runner reuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.model_runner.inference import InferenceSession, check_input
from actors.model_runner.manifest import trusted_keys, verify_model_dir
from actors.model_runner.selftest import (
    CRASH_HOOK_ENV,
    MODEL_XML,
    result_from_child,
    run_selftest_child,
    selftest_in_process,
)


@pytest.fixture
def good(tmp_path, make_model):
    return make_model(tmp_path, "1.0.0")


def test_child_passes_a_good_model_and_reports_its_figures(good):
    model_dir, keys_dir = good
    result = run_selftest_child(model_dir, keys_dir)
    assert result.ok, result.problems
    assert result.problems == ()
    assert result.details["version"] == "1.0.0"
    assert result.details["vectors"] == 3
    assert result.details["max_abs_diff"] <= 1e-6
    assert result.details["compile_ms"] > 0


def test_child_fails_a_model_whose_expected_outputs_are_wrong(tmp_path, make_model):
    model_dir, keys_dir = make_model(tmp_path, "1.0.0", break_selftest=True)
    result = run_selftest_child(model_dir, keys_dir)
    assert not result.ok
    assert len(result.problems) == 3
    assert "vector 'calm': score is" in result.problems[0]
    assert "rtol 1e-05" in result.problems[0]


def test_child_fails_a_model_for_another_feature_set_before_loading_it(good, resign):
    model_dir, keys_dir = good
    resign(model_dir, keys_dir, lambda m: m["input"].update(feature_set="other.v9"))
    (model_dir / MODEL_XML).write_text("not xml")  # never read: the contract fails first
    resign(model_dir, keys_dir)
    result = run_selftest_child(model_dir, keys_dir)
    assert result.problems == ("manifest input feature_set is 'other.v9'; this gateway "
                               "computes 'fleetgw.window.v1'",)


def test_child_fails_a_model_signed_by_an_untrusted_key(good, tmp_path, make_model):
    model_dir, _ = good
    _, other_keys = make_model(tmp_path / "other", "2.0.0")
    result = run_selftest_child(model_dir, other_keys)
    assert not result.ok
    assert "not trusted" in result.problems[0]


def test_child_that_segfaults_is_a_failed_selftest_naming_sigsegv(good, monkeypatch):
    monkeypatch.setenv(CRASH_HOOK_ENV, "segv")
    result = run_selftest_child(*good)
    assert not result.ok
    assert result.problems == ("self-test child died with SIGSEGV",)
    assert result.details["returncode"] < 0


def test_child_that_hangs_is_killed_after_the_timeout(good, monkeypatch):
    monkeypatch.setenv(CRASH_HOOK_ENV, "hang")
    result = run_selftest_child(*good, timeout_s=1)
    assert not result.ok
    assert result.problems == ("self-test timed out after 1s (killed)",)


@pytest.mark.parametrize(("returncode", "stdout", "stderr", "problem"), [
    (0, "", "", "self-test child exited with status 0 without a JSON result: no output"),
    (1, "garbage\n", "Traceback...\nImportError: boom\n",
     "self-test child exited with status 1 without a JSON result: ImportError: boom"),
    (0, '{"ok": false, "problems": []}\n', "",
     "self-test child exited with status 0 and no problem"),
    (1, '{"ok": true, "problems": []}\n', "",
     "self-test child exited with status 1 and no problem"),
    (-9, "", "", "self-test child died with SIGKILL"),
])
def test_child_output_that_is_not_a_clean_verdict_fails(returncode, stdout, stderr, problem):
    result = result_from_child(returncode, stdout, stderr)
    assert not result.ok
    assert result.problems == (problem,)


def test_last_json_line_is_the_verdict_whatever_was_printed_before():
    report = {"ok": True, "problems": [], "version": "1", "vectors": 3}
    result = result_from_child(0, "a warning\n" + json.dumps(report) + "\n", "")
    assert result.ok
    assert result.details == report


class _FakeSession:
    """A compiled model's stand-in: a fixed precision, and check_input before answering."""

    def __init__(self, session: InferenceSession, precision: str) -> None:
        self.session, self.precision = session, precision

    def property(self, name: str) -> str:
        return self.precision

    def run(self, batch):
        return self.session.run(check_input(batch))


def test_in_process_selftest_passes_the_served_session(good):
    model_dir, keys_dir = good
    manifest = verify_model_dir(model_dir, trusted_keys(keys_dir))
    session = InferenceSession(str(model_dir / MODEL_XML), manifest["compile"])
    assert selftest_in_process(session, manifest) == []


def test_in_process_selftest_refuses_a_precision_other_than_f32(good):
    model_dir, keys_dir = good
    manifest = verify_model_dir(model_dir, trusted_keys(keys_dir))
    session = InferenceSession(str(model_dir / MODEL_XML), manifest["compile"])
    problems = selftest_in_process(_FakeSession(session, "<Type: 'bfloat16'>"), manifest)
    assert problems == ["compiled inference precision is bfloat16, not f32 (set "
                        "INFERENCE_PRECISION_HINT=f32 in the manifest's compile config)"]


def test_in_process_selftest_reports_malformed_vectors_and_nan_acceptance(good):
    model_dir, keys_dir = good
    manifest = verify_model_dir(model_dir, trusted_keys(keys_dir))
    session = InferenceSession(str(model_dir / MODEL_XML), manifest["compile"])

    class Accepting(_FakeSession):
        def run(self, batch):
            return self.session.run(np.nan_to_num(batch))

    manifest["self_test"][1] = {"name": "short", "input": [0.0]}
    problems = selftest_in_process(Accepting(session, "f32"), manifest)
    assert problems[0] == "NaN input was not refused by check_input"
    assert problems[1].startswith("vector 1 is malformed (KeyError")
    assert len(problems) == 2
