"""What happened in a rig: read back from the journal, from ClickHouse and from the live tree.

Where this sits: the harness's read-back (`Rig.finish` returns `RigResults`), the figures the
drills' invariant checks and reports are made of. Everything here is read after the fact from
the real stores — the journal (`JournalReader`: stats, I2 verify, sync counts) and the
receiver's chdb (counts FINAL and raw, distinct seqs, P1 latency) — plus what the rig saw
while it ran (samples of the tree: restarts, commit pauses, journal writers; fault events).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from tools.harness.rig import Sample, walk

if TYPE_CHECKING:
    from tools.harness.rig import Rig

#: Fault event kinds after which the target should run again as a new process.
RESTARTING_KINDS = frozenset({"SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT", "SIGABRT", "SIGSEGV",
                              "exception", "exit", "segfault", "hang", "corrupt_model"})


@attrs.define
class Latency:
    """Percentiles of a latency in seconds (None when there was nothing to measure)."""

    count: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    max_s: float | None = None


@attrs.define
class Recovery:
    """How long until an actor a fault hit ran again as a new process."""

    target: str
    kind: str
    #: when the fault hit (rig seconds)
    at_s: float
    #: seconds from the fault until it ran again (None: not seen)
    recovered_s: float | None
    #: "recovered", "kept running" (the same process ran on), "not running" (the last sample
    #: after the fault shows it down) or "unknown" (no sample after the fault)
    outcome: str
    #: the last sample of the tree after the fault (rig seconds; None: none)
    last_seen_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class RigResults:
    """Figures of one rig run (see the module docstring for where each comes from)."""

    #: exit status of the orderly stop at the end (None: the gateway was not running)
    exit_status: int | None
    #: the drain run synced every syncable record in time
    drained: bool
    journaled: int
    journal_per_device: dict[str, int]
    #: I2 and SQLite's integrity check: the problems found (empty: both hold)
    verify_problems: list[str]
    syncable: int
    synced: int
    #: per device: reconciliation rows (`tools.reconcile.DeviceReconciliation.to_json`)
    reconciliation: list[dict[str, Any]]
    central_final: int
    central_raw: int
    central_unique: int
    p1_latency: Latency
    restarts: dict[str, int]
    events: list[dict[str, Any]]
    #: (seconds since start, journal's last_commit_age_s) as sampled while it ran
    commit_ages: list[tuple[float, float]]
    #: samples where a process other than the journal had journal.db open for writing
    foreign_writers: list[dict[str, Any]]
    drops: dict[str, int]
    quarantined: dict[str, int]
    usage_bytes_max: int
    budget_bytes: int | None

    @property
    def duplicates(self) -> int:
        return self.central_raw - self.central_unique

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "duplicates": self.duplicates}


def percentiles(values: list[float]) -> Latency:
    if not values:
        return Latency()
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return Latency(len(ordered), at(0.5), at(0.99), round(ordered[-1], 3))


def collect(rig: Rig, exit_status: int | None, drained: bool) -> RigResults:
    from actors.journal.reader import JournalReader

    with JournalReader(rig.journal_path) as reader:
        stats = reader.stats()
        report = reader.verify()
        sync = reader.sync_counts()
        generation = reader.generation
        central, rows, p1 = central_side(rig, reader, generation)
    samples = rig.all_samples()
    ages: list[tuple[float, float]] = []
    usage_max = stats.usage_bytes
    for sample in samples:
        for node in walk(sample.tree):
            if node["name"] == "journal":
                figures = dict(node.get("figures") or {})
                age = figures.get("last_commit_age_s")
                if age is not None:
                    ages.append((sample.at_s, float(age)))
                usage_max = max(usage_max, int(figures.get("usage_bytes") or 0))
    final = sum(r["central_final"] for r in rows)
    raw = sum(r["central_raw"] for r in rows)
    unique = sum(r["central_unique"] for r in rows)
    drops: dict[str, int] = {}
    for d in stats.drops:
        drops[f"{d.reason}/{d.lane}"] = drops.get(f"{d.reason}/{d.lane}", 0) + d.records
    return RigResults(
        exit_status=exit_status, drained=drained, journaled=stats.records,
        journal_per_device={d.device_id: d.count for d in stats.devices},
        verify_problems=list(report.problems),
        syncable=sum(v[0] for v in sync.values()), synced=sum(v[1] for v in sync.values()),
        reconciliation=rows, central_final=final if central else 0,
        central_raw=raw if central else 0, central_unique=unique if central else 0,
        p1_latency=p1, restarts={k: v for k, v in rig.restarts().items() if v},
        events=[e.to_json() for e in rig.events], commit_ages=ages,
        foreign_writers=list(rig.foreign_writers),
        drops=drops, quarantined={q.sensor_id: q.quarantined for q in stats.quarantine},
        usage_bytes_max=usage_max, budget_bytes=rig.disk_budget_bytes())


def central_side(rig: Rig, reader: Any, generation: str) -> tuple[bool, list[dict], Latency]:
    """Reconciliation rows and P1 latency from the (stopped) receiver's chdb."""
    from tools.reconcile import central_counts, reconcile

    if rig.central is None:
        rows = [r.to_json() for r in reconcile(reader, {})]
        return False, rows, Latency()
    from central.backend import ChdbBackend
    from central.schema import RECORD_TABLES, sql_string

    backend = ChdbBackend(rig.central.directory / "central.chdb")
    try:
        rows = [r.to_json() for r in reconcile(reader, central_counts(backend, generation))]
        # P1 latency: record time to the receiver's ingest (one clock on a rig's machine).
        union = " UNION ALL ".join(
            "SELECT toFloat64(dateDiff('millisecond', ts, ingested_at)) / 1000 AS d "
            f"FROM {table} FINAL WHERE lane = 'P1' AND generation = {sql_string(generation)}"
            for table in RECORD_TABLES)
        latencies = [float(json.loads(line)["d"])
                     for line in backend.query(union, "JSONEachRow").splitlines()]
    finally:
        backend.close()
    return True, rows, percentiles(latencies)


def _node(tree: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((n for n in walk(tree) if n["name"] == name), None)


def recoveries(events: Sequence[dict[str, Any]], samples: Sequence[Sample]) -> list[Recovery]:
    """For each fault that should restart its target (`RESTARTING_KINDS`) and the power cuts:
    how long until the target ran again as a new process (another pid, or a higher restart
    count), judged from the samples of the tree after the fault."""
    ordered = sorted(samples, key=lambda s: s.at_s)
    found = []
    for event in events:
        kind, target, at = event["kind"], event["target"], event["at_s"]
        if kind == "power_cut":
            took = event.get("recovered_s")
            found.append(Recovery(target, kind, at, took,
                                  "recovered" if took is not None else "not running",
                                  event.get("ended_s")))
            continue
        if kind not in RESTARTING_KINDS:
            continue
        if kind == "corrupt_model":
            target = "model"
        before = [s for s in ordered if s.at_s <= at]
        node = _node(before[-1].tree, target) if before else None
        restarts_before = node.get("restarts", 0) if node else 0
        pid = event.get("pid") or (node.get("pid") if node else None)
        outcome, recovered, last_seen = "unknown", None, None
        for sample in (s for s in ordered if s.at_s > at):
            now = _node(sample.tree, target)
            if now is None:
                continue
            last_seen = sample.at_s
            running = now["state"] == "running" and now.get("pid")
            if running and (now["pid"] != pid or now.get("restarts", 0) > restarts_before):
                outcome, recovered = "recovered", round(sample.at_s - at, 3)
                break
            outcome = "kept running" if running else "not running"
        found.append(Recovery(target, kind, at, recovered, outcome, last_seen))
    return found
