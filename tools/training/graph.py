"""The trained detector as an OpenVINO IR (opset13), scaler and scoring inside the graph.

Where this sits: training, offline; the runtime reads the IR with
actors/model_runner/inference.py. The graph takes ``features`` [N, 64] f32 and computes, as
`autoencoder.Detector.outputs` does in float64:

    z = (features - mean) / std; reconstruction = decoder(encoder(z))  (tanh hidden layers)
    err = (reconstruction - z)^2 * feature_weights                      [N, 64]
    score = mean(err, axis 1)                                           [N]
    confidence = sigmoid((score - threshold) / temperature)             [N] (0.5 at threshold)
    group_error = err @ group_matrix                                    [N, 6]

Outputs carry the tensor names ``score``, ``confidence`` and ``group_error``. Weights are
stored as f32 (``compress_to_fp16=False``). OpenVINO names nodes from a process-wide counter:
build one model per fresh process for byte-identical files (train.py does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from actors.model_runner.features import N_FEATURES
from actors.model_runner.inference import INPUT_NAME
from actors.model_runner.openvino_env import import_openvino, import_opset
from tools.training.autoencoder import Detector

MODEL_NAME = "fleetgw-anomaly"


def _const(op, value) -> object:
    return op.constant(np.asarray(value, dtype=np.float32))


def build_model(detector: Detector) -> object:
    """The detector as an ``openvino.Model``."""
    ov, op = import_openvino(), import_opset()
    ae = detector.ae
    features = op.parameter([-1, N_FEATURES], np.float32, name=INPUT_NAME)
    features.output(0).get_tensor().set_names({INPUT_NAME})
    z = op.divide(op.subtract(features, _const(op, ae.mean)), _const(op, ae.std))
    h = z
    last = len(ae.weights) - 1
    for i, (W, b) in enumerate(zip(ae.weights, ae.biases, strict=True)):
        h = op.add(op.matmul(h, _const(op, W), False, False), _const(op, b))
        if i != last:
            h = op.tanh(h)
    err = op.multiply(op.squared_difference(h, z), _const(op, detector.feature_weights))
    score = op.reduce_mean(err, op.constant(np.array([1], dtype=np.int64)), keep_dims=False)
    logit = op.divide(op.subtract(score, _const(op, detector.threshold)),
                      _const(op, detector.temperature))
    outputs = {
        "score": score,
        "confidence": op.sigmoid(logit),
        "group_error": op.matmul(err, _const(op, detector.group_matrix), False, False),
    }
    results = []
    for name, node in outputs.items():
        node.set_friendly_name(name)
        node.output(0).get_tensor().set_names({name})
        results.append(op.result(node))
    return ov.Model(results, [features], MODEL_NAME)


def save_ir(detector: Detector, xml_path: Path) -> None:
    """Write ``xml_path`` and the .bin beside it (f32 weights)."""
    ov = import_openvino()
    ov.save_model(build_model(detector), str(xml_path), compress_to_fp16=False)
