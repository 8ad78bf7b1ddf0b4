"""How an actor takes `GatewaySnapshot`s: ask the root for the tree, build in a worker thread.

Where this sits: the metrics actor and ``sensor:health`` each own a `SnapshotSampler`. The
actor sends `request()` to the gateway root (`gateway_root`: the root's global name, as the
inspector finds it), hands the root's `TopologyReport` to `on_report`, and picks the finished
snapshot up with `take()` from a timer or tick. The journal queries and host reads run in the
sampler's worker thread, so a large backlog or a slow SD card never holds up the actor's
heartbeats; the worker never sends actor messages (THESPIAN_NOTES.md).

A build that fails is logged and counted, not raised: a crash loop of the metrics actor would
escalate to the root and stop the gateway, and metrics must never do that.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from actors.base import log
from actors.journal.actor import journal_path
from actors.metrics.probes import JournalProbe, read_host, resolve_cpu_temp_path
from actors.metrics.snapshot import GatewaySnapshot, build_snapshot
from config.metrics import SamplingSettings
from messages.supervision import ActorNode, TopologyReport, TopologyRequest

#: The root's class, by name (importing supervisors.gateway here would import the tree).
GATEWAY_CLASS = "supervisors.gateway.Gateway"


def gateway_root(actor: Any) -> Any:
    """The address of the gateway root, found by its global name from inside ``actor`` (how
    `fleetgw topology` finds it too); the root answers `TopologyRequest` with the tree."""
    from supervisors.gateway import GLOBAL_NAME

    return actor.createActor(GATEWAY_CLASS, globalName=GLOBAL_NAME)


class SnapshotSampler:
    """Snapshots for one actor, one at a time."""

    def __init__(self, settings: SamplingSettings, data_dir: str) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.probe = JournalProbe(journal_path(data_dir), settings.metrics.refresh_s)
        self.cpu_temp_path = resolve_cpu_temp_path(settings.metrics.cpu_temp_path)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")
        self.ids = itertools.count(1)
        self.asked: int | None = None
        self.building: Future | None = None
        self.taken = 0
        self.failures = 0
        self.last_failure = ""
        self.closed = False

    def request(self) -> TopologyRequest | None:
        """The next request for the root; None while a snapshot is being built (a reply to an
        earlier request is ignored from now on)."""
        if self.building is not None:
            return None
        self.asked = next(self.ids)
        return TopologyRequest(self.asked)

    def on_report(self, report: TopologyReport) -> bool:
        """Start building from the root's answer to the latest request; False for any other."""
        if report.request_id != self.asked or self.building is not None or self.closed:
            return False
        self.asked = None
        self.building = self.pool.submit(self.build, report.root)
        return True

    def build(self, tree: ActorNode) -> GatewaySnapshot:
        """Worker thread: the snapshot of ``tree`` with the journal's and the host's facts."""
        journal = self.probe.read()
        host = read_host(self.data_dir, self.cpu_temp_path)
        return build_snapshot(tree, journal, host, device_id=self.settings.device_id,
                              budget_bytes=self.settings.disk_budget_bytes,
                              now_ns=time.time_ns())

    @property
    def busy(self) -> bool:
        """A snapshot is being built, or built and not yet taken."""
        return self.building is not None

    @property
    def ready(self) -> bool:
        """A snapshot is built (or failed): `take` has it."""
        return self.building is not None and self.building.done()

    def take(self) -> GatewaySnapshot | None:
        """The snapshot built since the last call, once it is done; None otherwise (also when
        the build failed: logged once per distinct error, counted in ``failures``)."""
        if not self.ready:
            return None
        assert self.building is not None
        future, self.building = self.building, None
        try:
            snapshot = future.result()
        except Exception as exc:
            self.failures += 1
            text = f"{type(exc).__name__}: {exc}"
            if text != self.last_failure:
                log().error("metrics: a snapshot failed (%s); keeping the previous one",
                            text, exc_info=exc)
            self.last_failure = text
            return None
        self.taken += 1
        return snapshot

    def figures(self) -> list[tuple[str, Any]]:
        return [("snapshots", self.taken), ("snapshot_failures", self.failures),
                ("journal_problem", self.probe.problem or "none"),
                ("cpu_temp_path", self.cpu_temp_path or "none")]

    def close(self) -> None:
        """Stop the worker; the journal connection closes in it, after any build in flight."""
        if not self.closed:
            self.closed = True
            self.pool.submit(self.probe.close)
            self.pool.shutdown(wait=False)
