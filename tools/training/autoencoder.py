"""A small autoencoder of normal driving windows, trained with numpy (float64).

Where this sits: training, offline. `train_autoencoder` learns to reconstruct the standardised
features of normal windows; graph.py copies the result (scaler, weights, biases) into the
OpenVINO IR the runtime runs, where the reconstruction error is the anomaly score.

Deterministic: seeded initialisation and shuffling, and numpy's BLAS pinned to one thread by
importing the `tools.training` package first (train.py runs it in a fresh interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Adam's moment decay rates and the epsilon guarding its division.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and optimiser: tanh hidden layers, a linear output layer, Adam on the mean
    squared error, the learning rate decayed by cosine to ``lr_floor`` of it."""

    layers: tuple[int, ...] = (64, 32, 16, 32, 64)
    epochs: int = 120
    batch_size: int = 64
    learning_rate: float = 3e-3
    lr_floor: float = 0.05
    #: The smallest std a feature is scaled by: a feature that (almost) never moves in normal
    #: driving (``imu_frozen``, the repeat fractions) has a finite, modest weight, so the odd
    #: repeated reading of a real sensor is not an anomaly on its own.
    std_floor: float = 0.05

    def to_json(self) -> dict[str, object]:
        """The manifest's description of the training (under ``training``)."""
        return {"architecture": {"layers": list(self.layers), "hidden_activation": "tanh",
                                 "output_activation": "linear", "std_floor": self.std_floor},
                "optimizer": "adam", "loss": "mse", "epochs": self.epochs,
                "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "lr_schedule": f"cosine decay to {self.lr_floor} of the learning rate"}


@dataclass
class Autoencoder:
    """The trained model: input scaler and dense layers (``weights[i]`` is [in, out])."""

    mean: np.ndarray
    std: np.ndarray
    weights: list[np.ndarray] = field(default_factory=list)
    biases: list[np.ndarray] = field(default_factory=list)

    def scale(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.std

    def activations(self, Z: np.ndarray) -> list[np.ndarray]:
        """Every layer's output for scaled inputs Z (the last is the reconstruction)."""
        out = [Z]
        last = len(self.weights) - 1
        for i, (W, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = out[-1] @ W + b
            out.append(h if i == last else np.tanh(h))
        return out

    def errors(self, X: np.ndarray) -> np.ndarray:
        """Per-feature squared reconstruction error of raw features X [N, F] -> [N, F]."""
        Z = self.scale(X)
        return (self.activations(Z)[-1] - Z) ** 2


def fit_scaler(X: np.ndarray, std_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and floored std of the training features."""
    return X.mean(axis=0), np.maximum(X.std(axis=0), std_floor)


def _gradients(model: Autoencoder, Z: np.ndarray) -> tuple[float, list[np.ndarray],
                                                           list[np.ndarray]]:
    """The batch's loss (mean squared error) and its gradients by backpropagation."""
    acts = model.activations(Z)
    diff = acts[-1] - Z
    loss = float(np.mean(diff * diff))
    delta = 2.0 * diff / diff.size
    grads_w, grads_b = [], []
    for i in range(len(model.weights) - 1, -1, -1):
        grads_w.append(acts[i].T @ delta)
        grads_b.append(delta.sum(axis=0))
        if i:
            delta = (delta @ model.weights[i].T) * (1.0 - acts[i] ** 2)
    return loss, grads_w[::-1], grads_b[::-1]


def train_autoencoder(X: np.ndarray, seed: int, config: AutoencoderConfig
                      ) -> tuple[Autoencoder, list[float]]:
    """Train on the normal windows X [N, F]; return the model and the loss of every epoch."""
    rng = np.random.default_rng(seed)
    mean, std = fit_scaler(X, config.std_floor)
    model = Autoencoder(mean, std)
    for n_in, n_out in zip(config.layers[:-1], config.layers[1:], strict=True):
        limit = np.sqrt(6.0 / (n_in + n_out))  # Glorot uniform
        model.weights.append(rng.uniform(-limit, limit, size=(n_in, n_out)))
        model.biases.append(np.zeros(n_out))
    params = model.weights + model.biases
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    Z = model.scale(X)
    b1, b2 = ADAM_BETAS
    step, history = 0, []
    for epoch in range(config.epochs):
        cosine = 0.5 * (1.0 + np.cos(np.pi * epoch / config.epochs))
        lr = config.learning_rate * (config.lr_floor + (1.0 - config.lr_floor) * cosine)
        order = rng.permutation(len(Z))
        losses = []
        for start in range(0, len(Z), config.batch_size):
            loss, gw, gb = _gradients(model, Z[order[start:start + config.batch_size]])
            losses.append(loss)
            step += 1
            for p, g, m, v in zip(params, gw + gb, moments, squares, strict=True):
                m *= b1
                m += (1.0 - b1) * g
                v *= b2
                v += (1.0 - b2) * g * g
                p -= lr * (m / (1.0 - b1**step)) / (np.sqrt(v / (1.0 - b2**step)) + ADAM_EPS)
        history.append(float(np.mean(losses)))
    return model, history


# ---- the scoring head -------------------------------------------------------------------
#: The threshold is this quantile of the validation (normal) scores: about one false alarm in
#: a thousand normal windows.
THRESHOLD_QUANTILE = 0.999
#: The confidence of a normal window of median score (0.5 is at the threshold).
MEDIAN_CONFIDENCE = 0.05
#: A feature's mean training error is taken as at least this in its weight (weights <= 100).
ERROR_FLOOR = 1e-4
THRESHOLD_RULE = (f"quantile {THRESHOLD_QUANTILE} of the validation scores (normal windows of "
                  "other devices): about 1 false alarm in 1000 normal windows")
SCORE_RULE = ("mean over features of the squared reconstruction error of the scaled features, "
              "each weighted by 1 / sqrt(its mean training error)")


@dataclass(frozen=True)
class Detector:
    """The autoencoder and its scoring head: numpy's reference of the IR graph.py builds."""

    ae: Autoencoder
    #: [F] weight of each feature's squared error in the score.
    feature_weights: np.ndarray
    #: [F, G] group_error = weighted errors @ group_matrix (group means, normalised to 1).
    group_matrix: np.ndarray
    threshold: float
    temperature: float

    def outputs(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """score [N], confidence [N] and group_error [N, G] of raw features X [N, F]."""
        err = self.ae.errors(X) * self.feature_weights
        score = err.mean(axis=1)
        confidence = 1.0 / (1.0 + np.exp(-(score - self.threshold) / self.temperature))
        return {"score": score, "confidence": confidence, "group_error": err @ self.group_matrix}


def calibrate(ae: Autoencoder, X_train: np.ndarray, X_validation: np.ndarray,
              feature_groups: tuple[str, ...], labels: tuple[str, ...]) -> Detector:
    """The scoring head: feature weights from the training errors, then the group
    normalisation, threshold and confidence temperature from the validation windows."""
    weights = 1.0 / np.sqrt(np.maximum(ae.errors(X_train).mean(axis=0), ERROR_FLOOR))
    err = ae.errors(X_validation) * weights
    membership = np.array([[g == label for label in labels] for g in feature_groups], float)
    group_mean = membership / membership.sum(axis=0)
    group_matrix = group_mean / (err @ group_mean).mean(axis=0)
    scores = err.mean(axis=1)
    threshold = float(np.quantile(scores, THRESHOLD_QUANTILE))
    temperature = (threshold - float(np.median(scores))) / np.log(1.0 / MEDIAN_CONFIDENCE - 1.0)
    return Detector(ae, weights, group_matrix, threshold, temperature)
