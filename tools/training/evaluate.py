"""How well a model finds each anomaly type on held-out devices, beside the rules alone.

Where this sits: training, offline (and benchmarks). The metrics score three systems on the
test split (`dataset.make_split("test", ...)`: devices no model was trained or calibrated on):

- ``per_type``: the whole system as the model runner runs it: a window's type is the most
  severe rule hit among its readings (actors/model_runner/rules.py, `SEVERITY` order) if any,
  else the model's label (``ANOMALY_TYPES[argmax(group_error)]`` when score >= threshold);
- ``rules_only``: the rules alone (a type without a rule has recall 0, precision null);
- ``model_only``: the model alone (the IR through `InferenceSession`, as compiled at runtime).

Per type: ``precision`` (null when nothing was predicted as it), ``recall``,
``recall_subtle`` (of the subtle injected anomalies) and ``detected`` (the share flagged as any
anomaly, right type or not). ``false_positive_rate``: per system, the share of normal test
windows flagged; ``support``: windows per label.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from actors.model_runner.features import ANOMALY_TYPES
from actors.model_runner.inference import InferenceSession
from actors.model_runner.manifest import MODEL_XML, trusted_keys, verify_model_dir
from actors.model_runner.rules import SEVERITY, check
from tools.training.dataset import NORMAL, Split, Window, make_split

SYSTEMS = ("per_type", "rules_only", "model_only")
#: Metrics are rounded to this many decimals (4 is 1/10 of a window in 1000).
DIGITS = 4


def rule_label(window: Window) -> str:
    """The most severe rule any reading of ``window`` breaks, or normal."""
    hits = {hit.rule for kind, _, values in window.readings() for hit in check(kind, values)}
    return next((rule for rule in SEVERITY if rule in hits), NORMAL)


def model_labels(outputs: dict[str, np.ndarray], threshold: float) -> np.ndarray:
    """The runner's label of every window from the model's outputs."""
    types = np.array(ANOMALY_TYPES)[np.argmax(outputs["group_error"], axis=1)]
    return np.where(outputs["score"] >= threshold, types, NORMAL)


def _share(part: np.ndarray) -> float | None:
    return round(float(part.mean()), DIGITS) if part.size else None


def summarize(truth: np.ndarray, subtle: np.ndarray, predicted: dict[str, np.ndarray]
              ) -> dict[str, Any]:
    """The metrics of every system's predictions against the ground truth."""
    normal = truth == NORMAL
    metrics: dict[str, Any] = {}
    for system, pred in predicted.items():
        metrics[system] = {
            label: {
                "precision": _share(truth[pred == label] == label),
                "recall": _share(pred[truth == label] == label),
                "recall_subtle": _share(pred[(truth == label) & subtle] == label),
                "detected": _share(pred[truth == label] != NORMAL),
            }
            for label in ANOMALY_TYPES
        }
    metrics["false_positive_rate"] = {system: _share(pred[normal] != NORMAL)
                                      for system, pred in predicted.items()}
    metrics["support"] = {label: int((truth == label).sum()) for label in (NORMAL, *ANOMALY_TYPES)}
    return metrics


def evaluate_split(split: Split, session: InferenceSession, threshold: float
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metrics of the model behind ``session`` on ``split``, and its raw outputs."""
    outputs = session.run(split.X.astype(np.float32))
    rules = np.array([rule_label(w) for w in split.windows])
    model = model_labels(outputs, threshold)
    predicted = {"per_type": np.where(rules != NORMAL, rules, model), "rules_only": rules,
                 "model_only": model}
    subtle = np.array([w.variant == "subtle" for w in split.windows])
    return summarize(split.labels, subtle, predicted), outputs


def evaluate_model(model_dir: str | os.PathLike[str], seed: int | None = None,
                   quick: bool = False,
                   trusted_keys_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The metrics of a signed model directory on the test split of ``seed`` (default: the
    seed it was trained with, which reproduces its manifest's metrics when ``quick`` matches
    its training). The manifest is verified against ``trusted_keys_dir`` (default: the
    repository's models/trusted_keys) before the IR is loaded."""
    model_dir = Path(model_dir)
    manifest = verify_model_dir(model_dir, trusted_keys(trusted_keys_dir))
    if seed is None:
        seed = int(manifest["training"]["seeds"]["dataset"])
    session = InferenceSession(str(model_dir / MODEL_XML), manifest["compile"])
    metrics, _ = evaluate_split(make_split("test", seed, quick), session,
                                float(manifest["threshold"]))
    return metrics
