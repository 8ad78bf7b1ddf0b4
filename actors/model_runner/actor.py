"""ModelRunnerActor: the journal consumer that infers device windows (data path step 5).

A thin shell over `ModelRunner` (runner.py) on the shared consumer shell
(`actors.journal.consumer.ConsumerActor`): each commit holds the inference, inference-error
and safety-event records of the records read, the runner's state (open windows, rule
debounce) and the new cursor, committed together (I4).

The model it serves is the registry's active one (`actors.model_runner.registry`). At start
it loads the active model after re-verifying its signature and hashes (when none is active,
the bundled model is installed and activated first, in a worker thread, while reading waits).
Every ``check_s`` it looks at the registry's pointer; a newly activated version is verified
and self-tested in a child process (a worker thread waits for it, so heartbeats still get
answered), then loaded and self-tested in-process, and only then served. A model that fails
is refused — logged and counted — and the old one keeps serving; that version is checked again
only once it is reinstalled (its installed copy replaced).

The runner is niced like the router: inference may lag, journaling must not (I6).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from actors.base import log
from actors.journal.consumer import ConsumerActor
from actors.journal.reader import Record
from actors.model_runner.inference import InferenceSession, ModelLoadError
from actors.model_runner.manifest import REPO_MODELS, ManifestError
from actors.model_runner.registry import ActiveModel, ModelRegistry, RegistryError
from actors.model_runner.runner import NO_MODEL, ModelRunner, ServingModel
from actors.model_runner.selftest import (
    check_contract,
    check_session,
    run_selftest_child,
    selftest_in_process,
)
from messages.health import ModelSelfTested, SelfTestModel
from messages.journal import ConsumerCommit, ConsumerCommitted
from messages.readings import ReadingBatch

CONSUMER = "model"
#: `pending_version` while the bundled model is being installed at first start.
BUNDLED = "(bundled)"
#: The file in models/ naming the shipped model's directory.
DEFAULT_POINTER = REPO_MODELS / "DEFAULT"


def shipped_model_dir() -> str:
    """The repository's shipped model (models/DEFAULT names its directory)."""
    return str(REPO_MODELS / DEFAULT_POINTER.read_text().strip())


def load_serving(active: ActiveModel) -> ServingModel:
    """Compile a verified model and self-test it in this process; raises ModelLoadError."""
    session = InferenceSession(str(active.xml_path), active.manifest["compile"])
    problems = selftest_in_process(session, active.manifest)
    if problems:
        raise ModelLoadError(f"model {active.version} failed its self-test: {problems[0]}")
    return ServingModel.from_manifest(session, active.manifest, active.sha256)


class ModelRunnerActor(ConsumerActor):
    """Infers device windows with the registry's active model, and applies the safety rules."""

    CONSUMER = CONSUMER

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner: ModelRunner | None = None
        self.model: ServingModel | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.pending: Future | None = None
        self.pending_version: str | None = None
        #: version -> the identity of its installed copy when it was refused
        self.refused: dict[str, tuple[int, int] | None] = {}
        self.switches = 0
        self.outputs = 0
        self.no_model_reason = NO_MODEL
        self.next_check = 0.0

    # ---- model lifecycle -----------------------------------------------------------------
    def on_init(self) -> None:
        s = self.settings
        root = s.registry or os.path.join(self.data_dir, "models")
        self.trusted = s.trusted_keys or None
        self.registry = ModelRegistry(root, self.trusted)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-check")
        if self.registry.active_version() is not None:
            self.serve_active()
        elif s.bundled != "none":
            bundled = s.bundled or shipped_model_dir()
            self.pending_version = BUNDLED
            self.pending = self.pool.submit(self.registry.ensure_default, bundled)
        super().on_init()

    def serve_active(self) -> None:
        """Load the registry's active model now (it was self-tested in a child when it was
        activated; signature and hashes are checked again here)."""
        try:
            active = self.registry.active()
            if active is not None:
                self.switch_to(load_serving(active))
        except (RegistryError, ManifestError, ModelLoadError) as exc:
            version = self.registry.active_version() or "?"
            self.refuse(version, str(exc))

    def switch_to(self, model: ServingModel) -> None:
        old = self.model.version if self.model is not None else None
        self.model = model
        if self.runner is not None:
            self.runner.model = model
        self.switches += 1
        log().info("model runner serves model %s (sha256 %s…)%s", model.version,
                   model.sha256[:12], f", replacing {old}" if old else "")

    def installed_identity(self, version: str) -> tuple[int, int] | None:
        """What changes when ``version`` is reinstalled (its directory is replaced)."""
        try:
            st = os.stat(self.registry.versions / version)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def refuse(self, version: str, reason: str) -> None:
        self.refused[version] = self.installed_identity(version)
        self.no_model_reason = f"model {version} was refused: {reason}"
        if self.runner is not None and self.model is None:
            self.runner.no_model_reason = self.no_model_reason
        log().error("model %s refused, %s: %s", version,
                    f"still serving {self.model.version}" if self.model else "no model serving",
                    reason)

    def on_poll(self) -> None:
        self.collect_pending()
        now = time.monotonic()
        if self.pending is not None or self.pool is None or now < self.next_check:
            return
        self.next_check = now + self.settings.check_s
        version = self.registry.active_version()
        serving = self.model.version if self.model is not None else None
        if version is None or version == serving:
            return
        if version in self.refused and self.refused[version] == self.installed_identity(version):
            return  # refused as installed; a reinstall of it is checked again
        self.pending_version = version
        self.pending = self.pool.submit(self.check_candidate, version)

    def check_candidate(self, version: str) -> ActiveModel:
        """Worker thread: verify the newly active model and self-test it in a child."""
        active = self.registry.active()
        if active is None or active.version != version:
            raise RegistryError(f"the active model changed while checking {version}")
        result = run_selftest_child(active.path, self.trusted)
        if not result.ok:
            raise ModelLoadError("; ".join(result.problems) or "self-test failed")
        return active

    def collect_pending(self) -> None:
        """Take the worker's result: serve the checked model, or refuse it."""
        if self.pending is None or not self.pending.done():
            return
        future, version = self.pending, self.pending_version or "?"
        self.pending = self.pending_version = None
        try:
            result = future.result()
        except Exception as exc:  # the worker's failure is the model's refusal reason
            self.refuse(version, str(exc))
            return
        if version == BUNDLED:
            self.serve_active()
            return
        try:
            self.switch_to(load_serving(result))
        except (ModelLoadError, ManifestError) as exc:
            self.refuse(version, str(exc))

    # ---- health -------------------------------------------------------------------------
    def receiveMsg_SelfTestModel(self, msg: SelfTestModel, sender: Any) -> None:
        """`fleetgw health`: the serving model's self-test vectors, now, in this process (a
        handler runs between two batches of records, so a busy runner still answers)."""
        reply_to = msg.reply_to or sender
        model = self.model
        if model is None:
            detail = (f"no model serving yet: {self.pending_version} is being checked"
                      if self.pending_version else self.no_model_reason)
            self.send(reply_to, ModelSelfTested(msg.request_id, ok=False, detail=detail))
            return
        t0 = time.perf_counter()
        try:
            problems = check_contract(model.manifest) + check_session(model.session,
                                                                      model.manifest)[0]
        except Exception as exc:  # a broken model fails its self-test, not the runner
            problems = [f"self-test raised {type(exc).__name__}: {exc}"]
        latency_ms = round((time.perf_counter() - t0) * 1e3, 2)
        vectors = model.manifest.get("self_test")
        self.send(reply_to, ModelSelfTested(
            msg.request_id, ok=not problems, version=model.version, latency_ms=latency_ms,
            vectors=len(vectors) if isinstance(vectors, list) else 0,
            detail="; ".join(problems)[:500]))

    # ---- consuming ------------------------------------------------------------------------
    def restore_state(self, state: str | None) -> None:
        s = self.settings
        debounce = round(s.event_debounce_s * 1e9)
        if state:
            self.runner = ModelRunner.from_state(json.loads(state), self.model, debounce)
            self.runner.windows.grace_ns = round(s.grace_s * 1e9)
        else:
            self.runner = ModelRunner(self.model, round(s.grace_s * 1e9), debounce)
        self.runner.no_model_reason = self.no_model_reason

    def work(self) -> None:
        if self.pending_version == BUNDLED:
            self.collect_pending()
            if self.pending is not None:
                return  # the first model is being installed: its windows wait for it
        super().work()

    def build_commit(self, records: list[Record]) -> ConsumerCommit:
        assert self.runner is not None
        readings = self.runner.process(records)
        return self.new_commit(
            records[-1].pos,
            outputs=ReadingBatch.from_readings(readings) if readings else None,
            state=json.dumps(self.runner.to_state(), separators=(",", ":")),
        )

    def on_committed(self, commit: ConsumerCommit, msg: ConsumerCommitted) -> None:
        self.outputs += sum(len(b) for b in commit.output_batches)

    def on_exit(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        super().on_exit()

    def figures(self) -> list[tuple[str, Any]]:
        figures = super().figures()
        model = self.model
        figures += [("model", model.version if model else "none"), ("switches", self.switches),
                    ("refused", len(self.refused)), ("outputs", self.outputs)]
        if self.runner is not None:
            figures += [("open_windows", self.runner.windows.open_windows()),
                        ("late", self.runner.windows.late)]
            figures += sorted(self.runner.counts.items())
            lat = sorted(self.runner.latencies_us)
            if lat:
                figures += [("latency_p50_us", lat[len(lat) // 2]),
                            ("latency_p99_us", lat[min(len(lat) - 1, len(lat) * 99 // 100)])]
        return figures

