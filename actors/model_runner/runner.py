"""The model runner's logic: journal records in; inference, inference-error and safety-event
records out.

Where this sits on the data path: step 5. The actor (actors/model_runner/actor.py) reads
records after its durable cursor and hands them to `ModelRunner.process` in journal order; it
commits the returned readings with its new cursor and `ModelRunner.to_state()` in one journal
transaction (I4), so a restarted runner continues exactly there: no window skipped, none
inferred twice.

Per record (imu and engine kinds; others pass by):
- the safety rules (`rules`) — a hit is a ``safety-event`` record at once (source "rule");
- the record joins its device window (`windows.WindowBuilder`); each window it closes gets
  exactly one record: ``inference`` (the model's score, confidence, label, input hash,
  latency) or ``inference-error`` (why the window could not be inferred: too few readings, a
  missing channel, non-finite features, no model). An inference labelled anomalous adds a
  ``safety-event`` (source "model"). The example policy routes safety events to P1.

Safety events are debounced: at most one per device and type (a rule, or a model label) every
``event_debounce_ns`` of record time, so one harsh stop (dozens of readings beyond 0.45 g) is
one event and a lasting fault one event per interval, not a P1 flood; the rest are counted
(``events_debounced``) and every window's inference record still carries its label.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import numpy as np

from actors.model_runner.features import KINDS, WINDOW_NS, WindowProblem
from actors.model_runner.inference import Inference, InferenceSession, as_input
from actors.model_runner.rules import RuleHit, check
from actors.model_runner.windows import DEFAULT_GRACE_NS, ClosedWindow, WindowBuilder
from messages.readings import Reading, decode_values

#: The sensor id of every record the model runner writes.
SENSOR_ID = "model"
INFERENCE, INFERENCE_ERROR, SAFETY_EVENT = "inference", "inference-error", "safety-event"
OUTPUT_KINDS = (INFERENCE, INFERENCE_ERROR, SAFETY_EVENT)
NORMAL = "normal"
NO_MODEL = "no model is active (see `fleetgw model list`)"
DEFAULT_EVENT_DEBOUNCE_NS = 10_000_000_000
STATE_VERSION = 1
LATENCY_SAMPLES = 1000


@attrs.frozen
class ServingModel:
    """A verified, self-tested model and what its records say about it."""

    session: InferenceSession
    version: str
    sha256: str
    threshold: float
    labels: tuple[str, ...]
    #: The verified manifest it was loaded from (its self-test vectors: `fleetgw health`).
    manifest: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @classmethod
    def from_manifest(cls, session: InferenceSession, manifest: Mapping[str, Any],
                      sha256: str) -> ServingModel:
        return cls(session, str(manifest["version"]), sha256, float(manifest["threshold"]),
                   tuple(manifest["labels"]), manifest)

    def label(self, inference: Inference) -> str:
        """"normal" below the threshold, else the anomaly type of the largest group error."""
        if inference.score < self.threshold:
            return NORMAL
        groups = inference.group_error
        return self.labels[max(range(len(groups)), key=groups.__getitem__)]


def input_sha256(row: np.ndarray) -> str:
    """The identity of a model input: sha256 of its float32 little-endian bytes."""
    return hashlib.sha256(row.astype("<f4").tobytes()).hexdigest()


class ModelRunner:
    """Windows, rules and inference over journal records; its whole state is `to_state()`."""

    def __init__(self, model: ServingModel | None = None, grace_ns: int = DEFAULT_GRACE_NS,
                 event_debounce_ns: int = DEFAULT_EVENT_DEBOUNCE_NS,
                 windows: WindowBuilder | None = None,
                 last_event: dict[tuple[str, str], int] | None = None) -> None:
        self.model = model
        self.event_debounce_ns = event_debounce_ns
        self.windows = WindowBuilder(grace_ns) if windows is None else windows
        #: (device, rule) -> record time of its last rule event
        self.last_event = {} if last_event is None else last_event
        self.counts: Counter[str] = Counter()
        #: The reason inference-error records give while no model serves.
        self.no_model_reason = NO_MODEL
        #: The latest inference latencies (for the inspector's p50/p99).
        self.latencies_us: deque[int] = deque(maxlen=LATENCY_SAMPLES)

    # ---- the data path ------------------------------------------------------------------
    def process(self, records: Iterable[Any]) -> list[Reading]:
        """The output records for ``records`` (journal `Record`s, in journal order)."""
        out: list[Reading] = []
        for record in records:
            if record.kind not in KINDS:
                continue
            values = decode_values(record.payload)
            for hit in check(record.kind, values):
                event = self.rule_event(record, hit)
                if event is not None:
                    out.append(event)
            for window in self.windows.add(record.pos.value, record.device_id,
                                           record.sensor_id, record.ts, record.kind, values):
                out.extend(self.infer(window))
        return out

    def debounced(self, device_id: str, event_type: str, ts: int) -> bool:
        """Whether an event of ``event_type`` for the device at ``ts`` repeats a recent one
        (if not, it is recorded as the latest)."""
        key = (device_id, event_type)
        last = self.last_event.get(key)
        if last is not None and 0 <= ts - last < self.event_debounce_ns:
            self.counts["events_debounced"] += 1
            return True
        self.last_event[key] = ts
        self.counts[f"event_{event_type}"] += 1
        return False

    def rule_event(self, record: Any, hit: RuleHit) -> Reading | None:
        if self.debounced(record.device_id, hit.rule, record.ts):
            return None
        return Reading(record.device_id, SENSOR_ID, record.ts, SAFETY_EVENT, {
            "type": hit.rule, "source": "rule", "value": hit.value, "threshold": hit.threshold,
            "sensor_id": record.sensor_id, "pos": record.pos.value, "seq": record.seq,
        })

    def infer(self, window: ClosedWindow) -> list[Reading]:
        """Exactly one inference or inference-error record for ``window`` (and an event when
        the model calls it an anomaly)."""
        base: dict[str, Any] = {
            "window_s": WINDOW_NS / 1e9, "first_pos": window.first_pos,
            "last_pos": window.last_pos, "readings": window.acc.n,
        }
        model = self.model
        try:
            if model is None:
                raise WindowProblem(self.no_model_reason)
            row = as_input(window.acc.features())
            result = model.session.infer(row)
        except WindowProblem as exc:
            self.counts["inference_errors"] += 1
            base["reason"] = str(exc)
            base["model_version"] = model.version if model is not None else ""
            return [Reading(window.device_id, SENSOR_ID, window.start_ns, INFERENCE_ERROR, base)]
        label = model.label(result)
        self.counts["inferences"] += 1
        self.latencies_us.append(result.latency_us)
        counts, sensors = window.acc.counts(), window.acc.sensors()
        values = {
            "model_version": model.version, "model_sha256": model.sha256,
            "score": result.score, "confidence": result.confidence, "label": label,
            "input_sha256": input_sha256(row), "latency_us": result.latency_us, **base,
            "imu_n": counts["imu"], "engine_n": counts["engine"],
            "imu_sensor": sensors["imu"], "engine_sensor": sensors["engine"],
        }
        out = [Reading(window.device_id, SENSOR_ID, window.start_ns, INFERENCE, values)]
        if label != NORMAL and not self.debounced(window.device_id, label, window.start_ns):
            out.append(Reading(window.device_id, SENSOR_ID, window.start_ns, SAFETY_EVENT, {
                "type": label, "source": "model", "score": result.score,
                "confidence": result.confidence, "model_version": model.version,
                "window_s": WINDOW_NS / 1e9, "first_pos": window.first_pos,
                "last_pos": window.last_pos,
            }))
        return out

    # ---- persistence --------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Everything to commit with the cursor (JSON-able)."""
        return {
            "version": STATE_VERSION,
            "windows": self.windows.to_state(),
            "last_event": [[d, r, ts] for (d, r), ts in sorted(self.last_event.items())],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], model: ServingModel | None,
                   event_debounce_ns: int = DEFAULT_EVENT_DEBOUNCE_NS) -> ModelRunner:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"model runner state version {state.get('version')!r} "
                             f"(this runner reads {STATE_VERSION})")
        return cls(model, event_debounce_ns=event_debounce_ns,
                   windows=WindowBuilder.from_state(state["windows"]),
                   last_event={(d, r): ts for d, r, ts in state["last_event"]})
