"""One picture of the gateway at a moment: what the metrics endpoint serves and what the health
readings carry.

Where this sits: plain logic, no actor system. `build_snapshot` turns the supervision tree (the
`ActorNode`s the root answers a `TopologyRequest` with: each actor's state, restarts and
figures), the journal's own facts (`JournalFacts`, read by `actors.metrics.probes.JournalProbe`)
and the host's (`HostFacts`) into a `GatewaySnapshot`. The exporter and the health sensor only
read snapshots. A figure an actor does not report (no uplink, the model runner off, an actor
restarting) is None, never a guess.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from actors.journal.reader import DropStats, LaneBacklog
from messages.supervision import ActorNode

#: Sensor figures that count inputs a sensor did not journal as readings, and the reason each
#: is reported under (sensor figures count since the sensor's start).
SENSOR_DROP_FIGURES = (
    ("quarantined", "quarantined"),  # undecodable input, kept in the journal's quarantine (I8)
    ("rejected_readings", "rejected"),  # readings the journal refused for good
    ("mqtt_qos0_dropped", "mqtt_qos0_overflow"),  # QoS 0 messages past the session's bound
    ("fragments_dropped", "nmea_fragment"),  # a sentence's tail at a connection's start
    ("unknown_ids", "can_unknown_id"),  # CAN frames the DBC does not define
)
#: The journal consumers whose ``backlog`` figure (records after their cursor) is reported.
CONSUMERS = ("router", "model")
RUNNING = "running"


@attrs.frozen
class ActorState:
    """One actor of the tree: its supervisor's view (``uptime_s`` None while not running)."""

    name: str
    cls: str
    state: str
    restarts: int
    uptime_s: float | None

    @property
    def up(self) -> bool:
        return self.state == RUNNING


@attrs.frozen
class JournalFacts:
    """What the journal file itself says (read-only, whether or not the journal actor runs)."""

    #: The highest position ever assigned: every record ever journaled (deleted ones too).
    records_total: int
    #: What the disk budget counts: live pages plus the WAL.
    usage_bytes: int
    drops: tuple[DropStats, ...]
    #: What waits per lane, as measured ``backlog_query_s`` seconds long at wall clock
    #: ``backlog_at_ns`` (the probe re-measures a slow backlog less often); () before the first.
    backlog: tuple[LaneBacklog, ...] = ()
    backlog_at_ns: int | None = None
    backlog_query_s: float | None = None


@attrs.frozen
class HostFacts:
    """The computer's: the data dir's filesystem, the CPU temperature (None without a sensor)
    and the load averages (1, 5, 15 minutes)."""

    disk_total_bytes: int | None = None
    disk_used_bytes: int | None = None
    disk_free_bytes: int | None = None
    cpu_temp_c: float | None = None
    load: tuple[float, float, float] | None = None


@attrs.frozen
class LaneWaiting:
    """What waits in a lane (see `LaneBacklog`), the oldest record's age in seconds (0 when
    nothing waits)."""

    lane: str
    records: int
    bytes: int
    oldest_age_s: float


@attrs.frozen
class SensorDrop:
    """Inputs sensor actor ``actor`` did not journal as readings, for ``reason``."""

    actor: str
    reason: str
    count: int


@attrs.frozen
class SyncFigures:
    """The uplink's counters since its start (POSTs answered, acknowledged, ...)."""

    batches_sent: int
    batches_acked: int
    bytes_sent: int
    retries: int
    failures: int
    records_synced: int
    pending_batches: int | None


@attrs.frozen
class Quantiles:
    """A latency's median and 99th percentile over the reporting actor's recent window."""

    p50: float
    p99: float


@attrs.frozen
class GatewaySnapshot:
    """The gateway at wall clock ``taken_ns``. Counters (``*_total``) count since the actor
    that keeps them started, except the journal's records and drops (durable)."""

    taken_ns: int
    device_id: str
    actors: tuple[ActorState, ...]
    journal_budget_bytes: int
    host: HostFacts
    journal_records_total: int | None = None
    journal_commits_total: int | None = None
    journal_commits_per_s: float | None = None
    #: Seconds a commit took (the whole transaction, fsync included).
    journal_commit_s: Quantiles | None = None
    journal_refused_total: int | None = None
    journal_usage_bytes: int | None = None
    backlog: tuple[LaneWaiting, ...] = ()
    backlog_query_s: float | None = None
    #: (consumer, records after its cursor) for the router and the model runner.
    consumer_backlog: tuple[tuple[str, int], ...] = ()
    journal_drops: tuple[DropStats, ...] = ()
    sensor_drops: tuple[SensorDrop, ...] = ()
    #: (sensor actor, seconds from a batch's send to its acknowledgement).
    sensor_ack_s: tuple[tuple[str, Quantiles], ...] = ()
    sync: SyncFigures | None = None
    inferences_total: int | None = None
    #: Seconds an inference call took.
    inference_s: Quantiles | None = None

    @property
    def restarts_total(self) -> int:
        return sum(a.restarts for a in self.actors)

    @property
    def actors_down(self) -> int:
        return sum(1 for a in self.actors if not a.up)

    @property
    def drops_total(self) -> int:
        """Records the journal dropped plus inputs sensors did not journal."""
        return (sum(d.records for d in self.journal_drops)
                + sum(d.count for d in self.sensor_drops))

    @property
    def disk_used_fraction(self) -> float | None:
        host = self.host
        if not host.disk_total_bytes or host.disk_used_bytes is None:
            return None
        return host.disk_used_bytes / host.disk_total_bytes


def walk(node: ActorNode) -> Iterator[ActorNode]:
    yield node
    for child in node.children:
        yield from walk(child)


def number(figures: dict[str, Any], name: str) -> float | int | None:
    """Figure ``name`` when it is a number (figures may be None, text, or missing)."""
    value = figures.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _count(figures: dict[str, Any], name: str) -> int | None:
    value = number(figures, name)
    return None if value is None else int(value)


def _quantiles(figures: dict[str, Any], p50: str, p99: str, scale: float) -> Quantiles | None:
    lo, hi = number(figures, p50), number(figures, p99)
    if lo is None or hi is None:
        return None
    return Quantiles(lo * scale, hi * scale)


def _waiting(backlog: tuple[LaneBacklog, ...], now_ns: int) -> tuple[LaneWaiting, ...]:
    return tuple(LaneWaiting(b.lane, b.records, b.bytes,
                             0.0 if b.oldest_ts is None else max(0.0, (now_ns - b.oldest_ts) / 1e9))
                 for b in backlog)


def _sync(figures: dict[str, Any]) -> SyncFigures:
    def count(name: str) -> int:
        return _count(figures, name) or 0

    return SyncFigures(count("sent"), count("acked"), count("bytes_sent"), count("retries"),
                       count("failures"), count("synced_records"), _count(figures, "pending"))


def build_snapshot(tree: ActorNode, journal: JournalFacts | None, host: HostFacts, *,
                   device_id: str, budget_bytes: int, now_ns: int) -> GatewaySnapshot:
    """The snapshot of ``tree`` (the root's `TopologyReport`) with the journal's facts (None:
    the journal could not be read) and the host's, at wall clock ``now_ns``."""
    nodes = list(walk(tree))
    figures = {n.name: dict(n.figures) for n in nodes}
    journal_fig = figures.get("journal", {})
    sensor_drops, sensor_ack = [], []
    for node in nodes:
        if not node.name.startswith("sensor:"):
            continue
        fig = figures[node.name]
        sensor_drops += [SensorDrop(node.name, reason, count) for name, reason in
                         SENSOR_DROP_FIGURES if (count := _count(fig, name))]
        ack = _quantiles(fig, "ack_ms_p50", "ack_ms_p99", 1e-3)
        if ack is not None:
            sensor_ack.append((node.name, ack))
    model = figures.get("model")
    uplink = figures.get("uplink")
    return GatewaySnapshot(
        taken_ns=now_ns,
        device_id=device_id,
        actors=tuple(ActorState(n.name, n.cls, n.state, n.restarts, n.uptime_s) for n in nodes),
        journal_budget_bytes=budget_bytes,
        host=host,
        journal_records_total=journal.records_total if journal else _count(journal_fig,
                                                                           "records"),
        journal_commits_total=_count(journal_fig, "commits"),
        journal_commits_per_s=number(journal_fig, "commits_per_s"),
        journal_commit_s=_quantiles(journal_fig, "commit_ms_p50", "commit_ms_p99", 1e-3),
        journal_refused_total=_count(journal_fig, "refused"),
        journal_usage_bytes=journal.usage_bytes if journal else _count(journal_fig,
                                                                       "usage_bytes"),
        backlog=_waiting(journal.backlog, now_ns) if journal else (),
        backlog_query_s=journal.backlog_query_s if journal else None,
        consumer_backlog=tuple((c, n) for c in CONSUMERS
                               if (n := _count(figures.get(c, {}), "backlog")) is not None),
        journal_drops=journal.drops if journal else (),
        sensor_drops=tuple(sensor_drops),
        sensor_ack_s=tuple(sensor_ack),
        sync=_sync(uplink) if uplink is not None else None,
        inferences_total=_count(model, "inferences") if model is not None else None,
        inference_s=(_quantiles(model, "latency_p50_us", "latency_p99_us", 1e-6)
                     if model is not None else None),
    )
