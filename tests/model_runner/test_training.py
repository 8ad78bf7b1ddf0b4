"""The trainer (tools/training): reproducible, signed, self-testing models that beat the rules
where the rules are blind; injected anomalies that look like what they claim; the shipped
model verifies and passes its own self-test."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import tools.training  # noqa: F401  (pins BLAS threads before numpy does any work)
from actors.model_runner.features import ANOMALY_TYPES, FEATURE_GROUPS, FEATURE_NAMES
from actors.model_runner.inference import COMPILE_CONFIG, InferenceSession, as_input
from actors.model_runner.manifest import (
    DEFAULT_TRUSTED_KEYS,
    MANIFEST,
    REPO_MODELS,
    REQUIRED_KEYS,
    ManifestError,
    generate_key,
    trusted_keys,
    verify_model_dir,
)
from actors.model_runner.rules import G, check
from tools.training.autoencoder import AutoencoderConfig, calibrate, train_autoencoder
from tools.training.dataset import INJECTORS, NORMAL, device_windows, make_dataset
from tools.training.evaluate import evaluate_model
from tools.training.graph import save_ir
from tools.training.train import (
    MODEL_FILES,
    TrainingError,
    check_out_dir,
    run_training_subprocess,
    train_model,
)

SHIPPED = REPO_MODELS / "2026.11.1"
VERSION = "quick-1"
#: Types no rule looks for: the model must find some of them.
MODEL_ONLY_TYPES = ("harsh_cornering", "rpm_speed_mismatch", "stuck_sensor")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(signing key, trusted keys directory holding its public key)."""
    root = tmp_path_factory.mktemp("keys")
    generate_key(root / "signing.key")
    (root / "trusted").mkdir()
    shutil.copy(root / "signing.key.pub", root / "trusted" / "test.pub")
    return root / "signing.key", root / "trusted"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, key: tuple[Path, Path]
            ) -> tuple[Path, Path]:
    """Two quick trainings, same seed, key and version, in fresh processes, different dirs."""
    root = tmp_path_factory.mktemp("trained")
    for name in ("a", "b"):
        assert run_training_subprocess(root / name, key[0], VERSION, 7, True) == 0
    return root / "a", root / "b"


def self_test_failures(model_dir: Path, manifest: dict) -> list[str]:
    session = InferenceSession(str(model_dir / "model.xml"), manifest["compile"])
    failures = []
    for vector in manifest["self_test"]:
        out = session.run(as_input(vector["input"]))
        for name in ("score", "confidence", "group_error"):
            if not np.allclose(out[name][0], vector["expected"][name], rtol=vector["rtol"],
                               atol=vector["atol"]):
                failures.append(f"{vector['name']}: {name}")
        labels = ANOMALY_TYPES[int(np.argmax(out["group_error"][0]))]
        label = NORMAL if out["score"][0] < manifest["threshold"] else labels
        if label != vector["label"]:
            failures.append(f"{vector['name']}: label {label}")
    return failures


def test_training_twice_gives_byte_identical_files(trained: tuple[Path, Path]) -> None:
    a, b = trained
    assert sorted(p.name for p in a.iterdir()) == sorted(MODEL_FILES)
    for name in MODEL_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_manifest_verifies_and_self_test_vectors_reproduce(trained, key) -> None:
    model_dir = trained[0]
    manifest = verify_model_dir(model_dir, trusted_keys(key[1]))
    assert set(REQUIRED_KEYS) <= set(manifest)
    assert manifest["version"] == VERSION and manifest["labels"] == list(ANOMALY_TYPES)
    assert manifest["input"]["names"] == list(FEATURE_NAMES)
    assert manifest["input"]["groups"] == list(FEATURE_GROUPS)
    assert manifest["compile"] == COMPILE_CONFIG
    body = (model_dir / MANIFEST).read_text()
    assert str(model_dir.parent) not in body and "/tmp" not in body
    names = [v["name"] for v in manifest["self_test"]]
    assert set(ANOMALY_TYPES) <= set(names) and "normal" in names
    assert all(len(v["input"]) == len(FEATURE_NAMES) for v in manifest["self_test"])
    assert self_test_failures(model_dir, manifest) == []
    with pytest.raises(ManifestError):
        verify_model_dir(model_dir, {})


def test_model_finds_what_the_rules_cannot(trained, key) -> None:
    manifest = verify_model_dir(trained[0], trusted_keys(key[1]))
    metrics = manifest["metrics"]
    for label in MODEL_ONLY_TYPES:
        assert metrics["rules_only"][label]["recall"] == 0.0
        assert metrics["model_only"][label]["recall"] > 0.1, label
        assert metrics["per_type"][label]["recall"] > metrics["rules_only"][label]["recall"]
    assert metrics["support"][NORMAL] > 0
    # evaluate_model (for benchmarks) reproduces the trainer's own evaluation
    assert evaluate_model(trained[0], quick=True, trusted_keys_dir=key[1]) == metrics


def test_refuses_an_unrelated_out_dir(tmp_path: Path, key, trained, capfd) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("not a model")
    with pytest.raises(TrainingError, match="not a model directory"):
        train_model(out, key[0], quick=True)
    assert run_training_subprocess(out, key[0], None, 7, True) == 2
    assert "todo.txt" in capfd.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["todo.txt"]
    check_out_dir(trained[0])  # a previous model directory may be trained over
    with pytest.raises(TrainingError, match="not a plain name"):
        train_model(tmp_path / "m", key[0], version="../evil", quick=True)


def test_the_ir_computes_what_numpy_computes(tmp_path: Path) -> None:
    splits = make_dataset(3, quick=True)
    config = AutoencoderConfig(epochs=5)
    ae, _ = train_autoencoder(splits["train"].X, 3, config)
    detector = calibrate(ae, splits["train"].X, splits["validation"].X, FEATURE_GROUPS,
                         ANOMALY_TYPES)
    save_ir(detector, tmp_path / "model.xml")
    X = splits["test"].X.astype(np.float32)
    got = InferenceSession(str(tmp_path / "model.xml"), COMPILE_CONFIG).run(X)
    want = detector.outputs(X.astype(np.float64))
    for name in ("score", "confidence", "group_error"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-5)


@pytest.fixture(scope="module")
def bases() -> list:
    return [w for w in device_windows("sim-inject-test", 11, 150) if w.label == NORMAL]


@pytest.mark.parametrize("label", ANOMALY_TYPES)
def test_injected_anomalies_look_like_their_type(bases, label: str) -> None:
    inject, min_speed = INJECTORS[label]
    rng = np.random.default_rng(5)
    base = next(w for w in bases if w.engine[:, 1].min() >= max(min_speed, 40.0))
    imu, engine = base.imu.copy(), base.engine.copy()
    inject(imu, engine, rng, False)
    rules = {hit.rule for row in imu
             for hit in check("imu", dict(zip(("ax", "ay", "az"), row[:3], strict=True)))}
    rules |= {hit.rule for row in engine for hit in check("engine", {"coolant_c": row[2]})}
    if label == "harsh_braking":
        assert -0.95 * G < imu[:, 0].min() < -0.45 * G and "harsh_braking" in rules
        assert engine[-1, 1] < base.engine[-1, 1]  # the vehicle slowed down
    elif label == "impact":
        assert "impact" in rules
    elif label == "overheating":
        assert 105.0 < engine[:, 2].mean() < 121.0 and rules == {"overheating"}
    elif label == "harsh_cornering":
        peak = int(np.argmax(np.abs(imu[:, 1])))
        assert 4.0 < abs(imu[peak, 1]) < 8.5 and np.sign(imu[peak, 5]) == np.sign(imu[peak, 1])
        assert rules == set()
    elif label == "rpm_speed_mismatch":
        assert not np.allclose(engine[:, 0], base.engine[:, 0]) and rules == set()
    else:
        assert (imu[1:] == imu[:-1]).all(axis=0).any() or \
            (engine[1:] == engine[:-1]).all(axis=0).any()


def test_shipped_model_verifies_and_passes_its_self_test() -> None:
    manifest = verify_model_dir(SHIPPED, trusted_keys(DEFAULT_TRUSTED_KEYS))
    assert manifest["version"] == SHIPPED.name and manifest["training"]["quick"] is False
    assert self_test_failures(SHIPPED, manifest) == []
    for label in MODEL_ONLY_TYPES:
        assert manifest["metrics"]["model_only"][label]["recall"] > 0.7, label
    assert manifest["metrics"]["false_positive_rate"]["model_only"] < 0.005
