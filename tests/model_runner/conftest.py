"""Tiny signed models for the registry and self-test tests.

`make_model(root, version)` gives a model directory signed by a key made in ``root`` (its
public key alone in ``root/trusted_keys``), with the layout and manifest of a real fleetgw
model. The IR (``features`` [N, 64] -> ``score``, ``confidence``, ``group_error`` [N, 6]: a
64x64 matmul, squared, averaged) is built once per seed per session in a fresh process
(OpenVINO names nodes from a global counter), which also computes the self-test expectations
with `InferenceSession`. Run as a script, this file is that builder: ``conftest.py OUT SEED``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.model_runner.features import ANOMALY_TYPES, FEATURE_NAMES, N_FEATURES, FeatureSpec
from actors.model_runner.inference import COMPILE_CONFIG, OUTPUT_NAMES, InferenceSession
from actors.model_runner.manifest import MANIFEST, generate_key, load_signing_key, write_signed
from actors.model_runner.openvino_env import import_openvino, import_opset

REPO_ROOT = Path(__file__).resolve().parents[2]
THRESHOLD = 1.5
N_GROUPS = 6
VECTORS = "vectors.json"
SIGNING_KEY = "signing.key"
TRUSTED_KEYS = "trusted_keys"
RTOL, ATOL = 1e-5, 1e-6
BUILD_TIMEOUT_S = 120


def build_ir(out_dir: Path, seed: int) -> None:
    """Write model.xml, model.bin and the self-test vectors with their expected outputs."""
    ov, op = import_openvino(), import_opset()
    rng = np.random.default_rng(seed)
    x = op.parameter([-1, N_FEATURES], np.float32, name="features")
    x.output(0).get_tensor().set_names({"features"})
    weights = np.eye(N_FEATURES) + rng.normal(0.0, 0.05, (N_FEATURES, N_FEATURES))
    groups = np.zeros((N_FEATURES, N_GROUPS))
    groups[np.arange(N_FEATURES), np.arange(N_FEATURES) % N_GROUPS] = 1.0
    groups /= groups.sum(axis=0)
    hidden = op.matmul(x, op.constant(weights.astype(np.float32)), False, False)
    squared = op.multiply(hidden, hidden)
    score = op.reduce_mean(squared, op.constant(np.array([1], np.int64)), keep_dims=False)
    outputs = {
        "score": score,
        "confidence": op.sigmoid(op.subtract(score, op.constant(np.float32(THRESHOLD)))),
        "group_error": op.matmul(squared, op.constant(groups.astype(np.float32)), False, False),
    }
    results = []
    for name, node in outputs.items():
        node.output(0).get_tensor().set_names({name})
        results.append(op.result(node))
    ov.save_model(ov.Model(results, [x], "tiny"), str(out_dir / "model.xml"),
                  compress_to_fp16=False)
    session = InferenceSession(str(out_dir / "model.xml"), COMPILE_CONFIG)
    vectors = []
    for name, label, spread in (("calm", "normal", 0.5), ("rough", "impact", 2.0),
                                ("still", "normal", 0.0)):
        row = rng.normal(0.0, spread, (1, N_FEATURES)).astype(np.float32)
        out = session.run(row)
        vectors.append({"name": name, "label": label, "rtol": RTOL, "atol": ATOL,
                        "input": row[0].tolist(),
                        "expected": {"score": float(out["score"][0]),
                                     "confidence": float(out["confidence"][0]),
                                     "group_error": out["group_error"][0].tolist()}})
    (out_dir / VECTORS).write_text(json.dumps(vectors))


def _manifest(version: str, vectors: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    return {
        "version": version, "name": "tiny-test-model",
        "input": {"name": "features", "shape": [-1, len(FEATURE_NAMES)], "dtype": "float32",
                  **FeatureSpec().to_json()},
        "outputs": list(OUTPUT_NAMES),
        "labels": list(ANOMALY_TYPES), "threshold": THRESHOLD, "compile": dict(COMPILE_CONFIG),
        "training": {"seed": seed}, "libraries": {}, "self_test": vectors,
        "metrics": {"per_type": {"impact": {"precision": 0.9, "recall": 0.8}},
                    "false_positive_rate": {"per_type": 0.001}},
    }


def _signing_key(root: Path) -> Path:
    """``root``'s signing key, made on first use, its public key in ``root/trusted_keys``."""
    key = root / SIGNING_KEY
    if not key.exists():
        (root / TRUSTED_KEYS).mkdir(parents=True)
        generate_key(key)
        shutil.copy(f"{key}.pub", root / TRUSTED_KEYS / "test.pub")
    return key


def resign(model_dir: Path, keys_dir: Path,
           edit: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Sign ``model_dir`` again (file hashes recomputed) with the key of ``keys_dir``, after
    ``edit`` changed its manifest in place."""
    manifest = json.loads((model_dir / MANIFEST).read_text())
    if edit is not None:
        edit(manifest)
    write_signed(model_dir, manifest, load_signing_key(keys_dir.parent / SIGNING_KEY))


@pytest.fixture(scope="session")
def tiny_ir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """seed -> a directory with the IR and vectors of that seed (built once)."""
    built: dict[int, Path] = {}

    def get(seed: int) -> Path:
        if seed not in built:
            out = tmp_path_factory.mktemp(f"ir-seed{seed}")
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
            subprocess.run([sys.executable, __file__, str(out), str(seed)], cwd=REPO_ROOT,
                           env=env, check=True, timeout=BUILD_TIMEOUT_S)
            built[seed] = out
        return built[seed]

    return get


@pytest.fixture
def make_model(tiny_ir: Callable[[int], Path]) -> Callable[..., tuple[Path, Path]]:
    """``make_model(root, version, *, break_selftest=False, seed=1) -> (model_dir,
    keys_dir)``: a signed model; ``break_selftest`` makes its expected scores wrong."""

    def make(root: Path, version: str, *, break_selftest: bool = False,
             seed: int = 1) -> tuple[Path, Path]:
        key = _signing_key(root)
        ir = tiny_ir(seed)
        model_dir = root / f"model-{version}-seed{seed}"
        model_dir.mkdir(parents=True)
        for name in ("model.xml", "model.bin"):
            shutil.copy(ir / name, model_dir / name)
        vectors = json.loads((ir / VECTORS).read_text())
        if break_selftest:
            for vector in vectors:
                vector["expected"]["score"] = vector["expected"]["score"] * 2 + 1
        write_signed(model_dir, _manifest(version, vectors, seed), load_signing_key(key))
        return model_dir, root / TRUSTED_KEYS

    return make


@pytest.fixture(name="resign")
def resign_fixture() -> Callable[..., None]:
    """`resign` (sign a model directory again after editing it)."""
    return resign


if __name__ == "__main__":
    build_ir(Path(sys.argv[1]), int(sys.argv[2]))
