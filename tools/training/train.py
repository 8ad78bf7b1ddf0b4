"""`fleetgw model train`: data set -> autoencoder -> IR -> evaluation -> signed model directory.

Where this sits: training, offline; its output is what the model registry installs and the
model runner loads (actors/model_runner: manifest.py verifies it, inference.py runs it, and
features.py computes its input at runtime exactly as the data set here was featurised).

The CLI calls `run_training_subprocess`, which runs ``python -m tools.training.train`` in a
fresh interpreter with one BLAS thread: IR node names come from a process-wide counter and
multithreaded sums may reorder additions, so only a fresh, single-threaded process gives
byte-identical model.xml, model.bin, manifest.json and manifest.sig for the same seed, key and
version. Nothing time- or path-dependent goes into the files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nacl
import numpy as np

from actors.model_runner.features import ANOMALY_TYPES, FEATURE_GROUPS, N_FEATURES, FeatureSpec
from actors.model_runner.inference import (
    COMPILE_CONFIG,
    INPUT_NAME,
    OUTPUT_NAMES,
    InferenceSession,
)
from actors.model_runner.manifest import (
    MANIFEST,
    MODEL_BIN,
    MODEL_XML,
    REPO_ROOT,
    SIGNATURE,
    VERSION_RE,
    ManifestError,
    load_signing_key,
    write_signed,
)
from actors.model_runner.openvino_env import import_openvino
from tools.training import BLAS_THREADS_ENV
from tools.training.autoencoder import (
    SCORE_RULE,
    THRESHOLD_RULE,
    AutoencoderConfig,
    Detector,
    calibrate,
    train_autoencoder,
)
from tools.training.dataset import (
    DEFAULT_SEED,
    NORMAL,
    SPLITS,
    Split,
    data_sha256,
    make_dataset,
)
from tools.training.evaluate import evaluate_split, model_labels
from tools.training.graph import MODEL_NAME, save_ir

TRAIN_MODULE = "tools.training.train"
#: A model directory's files: an out dir holding nothing else may be trained over.
MODEL_FILES = (SIGNATURE, MANIFEST, MODEL_XML, MODEL_BIN)
CONFIG = AutoencoderConfig()
SELF_TEST_TOLERANCE = {"rtol": 1e-3, "atol": 1e-5}
#: Normal self-test vectors: the normal test windows at these quantiles of their scores.
NORMAL_VECTORS = {"normal": 0.5, "normal_p90": 0.9}
#: An anomalous self-test vector scores at least this many thresholds (its label is clear).
SELF_TEST_MARGIN = 2.0
EXIT_OK, EXIT_REFUSED = 0, 2


class TrainingError(ValueError):
    """Training refused before any work (bad version, out dir in use); says why."""


def check_out_dir(out: Path) -> None:
    """Refuse an out dir that exists and holds anything but a model directory's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise TrainingError(f"{out} exists and is not a directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in MODEL_FILES)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise TrainingError(f"{out} is not empty and is not a model directory (it holds "
                            f"{shown}): train into a new or empty directory")


def _prepare_out_dir(out: Path) -> None:
    """Create ``out`` or remove a previous model's files, signature first."""
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        (out / name).unlink(missing_ok=True)


def self_test_vectors(split: Split, outputs: dict[str, np.ndarray], threshold: float,
                      session: InferenceSession) -> list[dict[str, Any]]:
    """Two normal test windows and, per anomaly type, one the model clearly labels as it,
    with the outputs OpenVINO gives for them."""
    truth, score = split.labels, outputs["score"]
    labels = model_labels(outputs, threshold)
    picks = {}
    normal = np.flatnonzero(truth == NORMAL)
    by_score = normal[np.argsort(score[normal], kind="stable")]
    for name, quantile in NORMAL_VECTORS.items():
        picks[name] = int(by_score[round(quantile * (len(by_score) - 1))])
    for label in ANOMALY_TYPES:
        of_type = np.flatnonzero(truth == label)
        clear = of_type[(labels[of_type] == label)
                        & (score[of_type] >= SELF_TEST_MARGIN * threshold)]
        picks[label] = int((clear if clear.size else of_type)[0])
    rows = split.X[list(picks.values())].astype(np.float32)
    out = session.run(rows)
    expected_labels = model_labels(out, threshold)
    return [{"name": name, "input": rows[i].tolist(), "label": str(expected_labels[i]),
             "expected": {"score": float(out["score"][i]),
                          "confidence": float(out["confidence"][i]),
                          "group_error": out["group_error"][i].tolist()},
             **SELF_TEST_TOLERANCE}
            for i, name in enumerate(picks)]


def build_manifest(version: str, seed: int, quick: bool, splits: dict[str, Split],
                   detector: Detector, final_loss: float, metrics: dict[str, Any],
                   self_test: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest (``format`` and ``files`` are added by `write_signed`)."""
    ov = import_openvino()
    return {
        "version": version,
        "name": MODEL_NAME,
        "input": {"name": INPUT_NAME, "shape": [-1, N_FEATURES], "dtype": "float32",
                  **FeatureSpec().to_json()},
        "outputs": list(OUTPUT_NAMES),
        "labels": list(ANOMALY_TYPES),
        "threshold": detector.threshold,
        "compile": dict(COMPILE_CONFIG),
        "training": {
            "seeds": {"dataset": seed, "autoencoder": seed},
            "quick": quick,
            "data_sha256": data_sha256(splits),
            "devices": {name: list(split.devices) for name, split in splits.items()},
            "windows": {name: split.counts() for name, split in splits.items()},
            "subtle_windows": splits["test"].counts("subtle"),
            **CONFIG.to_json(),
            "final_loss": final_loss,
            "score": SCORE_RULE,
            "threshold_rule": THRESHOLD_RULE,
            "confidence_temperature": detector.temperature,
        },
        "libraries": {"openvino": ov.__version__.split("-")[0], "numpy": np.__version__,
                      "pynacl": nacl.__version__,
                      "python": f"{sys.version_info.major}.{sys.version_info.minor}"},
        "metrics": metrics,
        "self_test": self_test,
    }


def train_model(out_dir: str | os.PathLike[str], signing_key_path: str | os.PathLike[str],
                version: str | None = None, seed: int = DEFAULT_SEED, quick: bool = False
                ) -> dict[str, Any]:
    """Train, evaluate and sign a model into ``out_dir``; return its manifest. Byte-identical
    output needs a fresh process: call `run_training_subprocess` (or ``python -m``)."""
    out = Path(os.path.abspath(out_dir))
    version = out.name if version is None else version
    if not VERSION_RE.fullmatch(version):
        raise TrainingError(f"version {version!r} is not a plain name (letters, digits, "
                            "'.', '_', '-'; at most 64; give --version)")
    key = load_signing_key(signing_key_path)
    check_out_dir(out)
    splits = make_dataset(seed, quick)
    # The IR sees float32 features: train and calibrate on exactly those values.
    X = {name: split.X.astype(np.float32).astype(np.float64) for name, split in splits.items()}
    ae, history = train_autoencoder(X["train"], seed, CONFIG)
    detector = calibrate(ae, X["train"], X["validation"], FEATURE_GROUPS, ANOMALY_TYPES)
    _prepare_out_dir(out)
    save_ir(detector, out / MODEL_XML)
    session = InferenceSession(str(out / MODEL_XML), COMPILE_CONFIG)
    metrics, outputs = evaluate_split(splits["test"], session, detector.threshold)
    self_test = self_test_vectors(splits["test"], outputs, detector.threshold, session)
    write_signed(out, build_manifest(version, seed, quick, splits, detector, history[-1],
                                     metrics, self_test), key)
    return json.loads((out / MANIFEST).read_bytes())


def _pr(entry: dict[str, Any]) -> str:
    precision = "-" if entry["precision"] is None else f"{entry['precision']:.3f}"
    return f"{precision:>5}/{entry['recall']:.3f}"


def print_summary(out: Path, manifest: dict[str, Any], seconds: float) -> None:
    windows = manifest["training"]["windows"]
    sizes = ", ".join(f"{sum(windows[name].values())} {name}" for name in SPLITS)
    kb = {name: (out / name).stat().st_size / 1024 for name in (MODEL_XML, MODEL_BIN)}
    print(f"trained {manifest['name']} {manifest['version']} in {seconds:.1f} s "
          f"(seed {manifest['training']['seeds']['dataset']}): {sizes} windows")
    print(f"threshold {manifest['threshold']:.4g}; IR {MODEL_XML} {kb[MODEL_XML]:.1f} KB + "
          f"{MODEL_BIN} {kb[MODEL_BIN]:.1f} KB")
    metrics = manifest["metrics"]
    print(f"{'precision/recall':20} {'system':>11} {'rules only':>11} {'model only':>11}")
    for label in ANOMALY_TYPES:
        print(f"{label:20} " + " ".join(_pr(metrics[s][label]) for s in
                                        ("per_type", "rules_only", "model_only")))
    fpr = metrics["false_positive_rate"]
    print(f"{'false positive rate':20} {fpr['per_type']:>11.4f} {fpr['rules_only']:>11.4f} "
          f"{fpr['model_only']:>11.4f}")
    signer = json.loads((out / SIGNATURE).read_text())["key_id"]
    print(f"wrote {out} ({MANIFEST} signed by key {signer})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {TRAIN_MODULE}",
                                     description="Train, evaluate and sign the anomaly model.")
    parser.add_argument("--out", required=True, help="model directory to write (new or empty)")
    parser.add_argument("--signing-key", required=True, help="Ed25519 signing key file")
    parser.add_argument("--version", default=None, help="model version (default: out's name)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="data and init seed")
    parser.add_argument("--quick", action="store_true", help="a much smaller data set (tests)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        manifest = train_model(args.out, args.signing_key, args.version, args.seed, args.quick)
    except (TrainingError, ManifestError) as exc:
        print(f"fleetgw model train: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    print_summary(Path(os.path.abspath(args.out)), manifest, time.perf_counter() - t0)
    return EXIT_OK


def run_training_subprocess(out_dir: str | os.PathLike[str],
                            signing_key_path: str | os.PathLike[str], version: str | None = None,
                            seed: int = DEFAULT_SEED, quick: bool = False) -> int:
    """Train in a fresh interpreter (one BLAS thread, fixed hash seed, cwd the repository);
    its output goes to this process's stdout/stderr. Returns its exit status: 0 trained,
    2 refused (the reason on stderr), other: failed."""
    cmd = [sys.executable, "-m", TRAIN_MODULE, "--out", os.path.abspath(out_dir),
           "--signing-key", os.path.abspath(signing_key_path), "--seed", str(seed)]
    if version is not None:
        cmd += ["--version", version]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, **BLAS_THREADS_ENV, "PYTHONHASHSEED": "0"}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
