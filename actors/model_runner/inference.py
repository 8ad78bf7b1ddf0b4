"""Running a model: an OpenVINO IR compiled for the CPU, fed validated window features.

Where this sits on the data path: step 5, inside the model runner (and in the registry's
self-test child). `InferenceSession` reads an IR whose files were verified against a signed
manifest (`actors.model_runner.manifest`) — never an unverified one: corrupted weight bytes
load and run silently with wrong scores — and compiles it with `COMPILE_CONFIG`:

- ``PERFORMANCE_HINT=LATENCY`` and ``INFERENCE_NUM_THREADS=1``: one window at a time on one
  core (the throughput hint is slower for batch 1; the other core journals);
- ``INFERENCE_PRECISION_HINT=f32``: the CPU default is bf16 on x86 and f16 on ARM, which flips
  decisions near the threshold.

The graph (built by tools/training/graph.py) takes ``features`` [N, 64] f32 and returns
``score`` [N] (mean squared reconstruction error of the scaled features), ``confidence`` [N]
(sigmoid of the score against the threshold: 0.5 at it) and ``group_error`` [N, G] (the error
per evidence group, normalised so 1 is typical of normal driving). OpenVINO itself converts
float64 silently, propagates NaN and maps Inf to confidence 1.0: `check_input` refuses all of
these first, with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from actors.model_runner.features import N_FEATURES, WindowProblem
from actors.model_runner.openvino_env import import_openvino

#: How every fleetgw model is compiled (recorded in each manifest; the manifest's own wins).
COMPILE_CONFIG: dict[str, Any] = {
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_NUM_THREADS": 1,
    "INFERENCE_PRECISION_HINT": "f32",
}
INPUT_NAME = "features"
OUTPUT_NAMES = ("score", "confidence", "group_error")


class InvalidInput(WindowProblem):
    """Input the model must not be given (wrong shape or dtype, NaN/Inf); the message says
    what and is the reason of the inference-error record."""


class ModelLoadError(RuntimeError):
    """The IR could not be read or compiled (truncated, malformed, unknown op, wrong outputs)."""


@attrs.frozen(slots=True)
class Inference:
    """The model's answer for one window. ``latency_us``: the inference call, wall time."""

    score: float
    confidence: float
    group_error: tuple[float, ...]
    latency_us: int


def check_input(features: Any, n_features: int = N_FEATURES) -> np.ndarray:
    """``features`` as a [1, n] or [N, n] float32 array; raises InvalidInput with the reason
    for anything else: wrong type, dtype, shape, or values that are not finite."""
    if not isinstance(features, np.ndarray):
        raise InvalidInput(f"input is a {type(features).__name__}, not an array")
    if features.dtype != np.float32:
        raise InvalidInput(f"input dtype is {features.dtype}, the model takes float32")
    if features.ndim == 1:
        features = features.reshape(1, -1)
    if features.ndim != 2 or features.shape[1] != n_features or features.shape[0] < 1:
        raise InvalidInput(f"input shape is {tuple(features.shape)}, the model takes "
                           f"[N, {n_features}]")
    finite = np.isfinite(features)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        raise InvalidInput(f"input value {col} of row {row} is {float(features[row, col])} "
                           "(needs a finite number)")
    return features


def as_input(features: Sequence[float]) -> np.ndarray:
    """A feature list as the model's float32 row (values beyond float32 become inf and are
    then refused by `check_input`)."""
    with np.errstate(over="ignore"):
        return np.asarray(features, dtype=np.float64).astype(np.float32).reshape(1, -1)


def openvino_reason(exc: BaseException) -> str:
    """The telling line of an OpenVINO error (its first line only names a C++ source file)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class InferenceSession:
    """One compiled model and its infer request (not thread-safe: one per actor)."""

    def __init__(self, xml_path: str, compile_config: Mapping[str, Any] | None = None,
                 n_features: int = N_FEATURES) -> None:
        ov = import_openvino()
        self.n_features = n_features
        self.config = dict(COMPILE_CONFIG if compile_config is None else compile_config)
        core = ov.Core()
        try:
            model = core.read_model(xml_path)
            compiled = core.compile_model(model, "CPU", self.config)
        except RuntimeError as exc:
            raise ModelLoadError(f"{xml_path}: {openvino_reason(exc)}") from exc
        names = {out.get_any_name() for out in compiled.outputs}
        missing = [n for n in OUTPUT_NAMES if n not in names]
        if missing:
            raise ModelLoadError(f"{xml_path}: the model lacks outputs {missing}")
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._outputs = [compiled.output(n) for n in OUTPUT_NAMES]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs for a validated [N, F] batch (copies, safe to keep)."""
        batch = check_input(batch, self.n_features)
        result = self._request.infer({INPUT_NAME: batch})
        return {name: np.array(result[out]) for name, out in
                zip(OUTPUT_NAMES, self._outputs, strict=True)}

    def infer(self, features: np.ndarray) -> Inference:
        """The model's answer for one window's features ([F] or [1, F] float32)."""
        row = check_input(features, self.n_features)
        if row.shape[0] != 1:
            raise InvalidInput(f"input shape is {tuple(row.shape)}, one window is [1, "
                               f"{self.n_features}]")
        t0 = time.perf_counter()
        result = self._request.infer({INPUT_NAME: row})
        latency_us = round((time.perf_counter() - t0) * 1e6)
        score, confidence, groups = (result[out] for out in self._outputs)
        return Inference(float(score[0]), float(confidence[0]),
                         tuple(float(g) for g in groups[0]), latency_us)

    def property(self, name: str) -> str:
        """A compiled-model property as text (e.g. INFERENCE_PRECISION_HINT)."""
        return str(self._compiled.get_property(name))
