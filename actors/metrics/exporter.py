"""The Prometheus view of a `GatewaySnapshot`: ``fleetgw_*`` metrics, units in their names.

Where this sits: `SnapshotCollector` is registered in the metrics actor's own
`CollectorRegistry` (never the process-global one) and holds the latest snapshot; each scrape
of ``GET /metrics`` turns it into metric families (`metric_families`, plain logic the tests
drive). Labels are bounded by the config: ``actor`` (the tree's actor names), ``class``,
``lane``, ``reason``, ``consumer``, ``quantile``, ``device_id``. A metric whose figure is
missing (no uplink, the model runner off, an actor restarting) is left out, not reported as 0.

Counters (``*_total``) restart from 0 when the actor that keeps them restarts (Prometheus'
``rate()`` handles that); the journal's records and drops are durable and never go back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from actors.metrics.snapshot import GatewaySnapshot, Quantiles

PREFIX = "fleetgw_"
#: A row of a labelled metric: label values, and the value (None: left out).
Row = tuple[tuple[str, ...], float | None]


def _family(kind: type, name: str, doc: str, labels: tuple[str, ...],
            rows: Iterable[Row]) -> Iterator[Metric]:
    """One metric family (``kind``: gauge or counter) with a sample per row whose value is
    not None; nothing when no row has a value."""
    family = kind(PREFIX + name, doc, labels=list(labels))
    for values, value in rows:
        if value is not None:
            family.add_metric(list(values), value)
    if family.samples:
        yield family


def gauge(name: str, doc: str, value: float | None, labels: tuple[str, ...] = (),
          rows: Iterable[Row] = ()) -> Iterator[Metric]:
    """A gauge: one unlabelled ``value``, or one sample per row of ``labels`` values."""
    yield from _family(GaugeMetricFamily, name, doc, labels, rows if labels else [((), value)])


def counter(name: str, doc: str, value: float | None, labels: tuple[str, ...] = (),
            rows: Iterable[Row] = ()) -> Iterator[Metric]:
    """A counter (``name`` without ``_total``: the exposition adds it)."""
    yield from _family(CounterMetricFamily, name, doc, labels, rows if labels else [((), value)])


def quantiles(name: str, doc: str, rows: Iterable[tuple[tuple[str, ...], Quantiles | None]],
              labels: tuple[str, ...] = ()) -> Iterator[Metric]:
    """A latency's p50 and p99 as a gauge with a ``quantile`` label ("0.5", "0.99")."""
    yield from gauge(name, doc, None, (*labels, "quantile"), (
        row for values, q in rows if q is not None
        for row in (((*values, "0.5"), q.p50), ((*values, "0.99"), q.p99))))


def actor_metrics(s: GatewaySnapshot) -> Iterator[Metric]:
    yield from gauge("gateway_info", "The gateway's device id (always 1).", None,
                     ("device_id",), [((s.device_id,), 1)])
    yield from gauge("snapshot_timestamp_seconds", "When these figures were taken (Unix "
                     "time).", s.taken_ns / 1e9)
    yield from gauge("actor_up", "1 while the actor runs; 0 while it starts, restarts, backs "
                     "off or is dead.", None, ("actor", "class"),
                     (((a.name, a.cls), float(a.up)) for a in s.actors))
    yield from counter("actor_restarts", "Restarts of the actor by its supervisor (since that "
                       "supervisor started).", None, ("actor",),
                       (((a.name,), a.restarts) for a in s.actors))
    yield from gauge("actor_uptime_seconds", "Seconds since the actor's last (re)start.", None,
                     ("actor",), (((a.name,), a.uptime_s) for a in s.actors))


def journal_metrics(s: GatewaySnapshot) -> Iterator[Metric]:
    yield from counter("journal_records", "Records ever journaled (the highest position; "
                       "durable).", s.journal_records_total)
    yield from counter("journal_commits", "Commit transactions of the journal actor (since "
                       "its start).", s.journal_commits_total)
    yield from gauge("journal_commits_per_second", "Commits per second over the last 5 s.",
                     s.journal_commits_per_s)
    yield from quantiles("journal_commit_latency_seconds", "Seconds a commit took "
                         "(transaction and fsync), over the last 60 s.",
                         [((), s.journal_commit_s)])
    yield from counter("journal_refused_appends", "Sensor batches the journal refused "
                       "(disk budget, full disk; the sensor holds and resends them).",
                       s.journal_refused_total)
    yield from gauge("journal_usage_bytes", "What the disk budget counts: live database "
                     "pages plus the WAL.", s.journal_usage_bytes)
    yield from gauge("journal_budget_bytes", "The journal's disk budget ([journal] "
                     "disk_budget_bytes).", s.journal_budget_bytes)
    lanes = [((w.lane,), w) for w in s.backlog]
    yield from gauge("backlog_records", "Records waiting: P1/P2/P3 not yet acknowledged by "
                     "central, unrouted not yet routed.", None, ("lane",),
                     ((k, w.records) for k, w in lanes))
    yield from gauge("backlog_bytes", "Payload bytes of the records waiting.", None, ("lane",),
                     ((k, w.bytes) for k, w in lanes))
    yield from gauge("backlog_oldest_age_seconds", "Age (by reading time) of the oldest "
                     "record waiting; 0 when none waits.", None, ("lane",),
                     ((k, w.oldest_age_s) for k, w in lanes))
    yield from gauge("backlog_query_seconds", "Seconds the last backlog measurement took "
                     "(re-run less often when slow).", s.backlog_query_s)
    yield from gauge("consumer_backlog_records", "Records after a journal consumer's cursor.",
                     None, ("consumer",), (((c,), n) for c, n in s.consumer_backlog))


def drop_metrics(s: GatewaySnapshot) -> Iterator[Metric]:
    drops = [((d.reason, d.lane), d) for d in s.journal_drops]
    yield from counter("journal_dropped_records", "Records the journal dropped: policy drops "
                       "and eviction (durable; I7).", None, ("reason", "lane"),
                       ((k, d.records) for k, d in drops))
    yield from counter("journal_dropped_bytes", "Payload bytes of those records.", None,
                       ("reason", "lane"), ((k, d.bytes) for k, d in drops))
    yield from counter("sensor_dropped", "Inputs a sensor did not journal as readings "
                       "(quarantined, rejected, MQTT QoS 0 overflow, NMEA fragments, unknown "
                       "CAN ids; since the sensor's start).", None, ("actor", "reason"),
                       (((d.actor, d.reason), d.count) for d in s.sensor_drops))
    yield from quantiles("sensor_ack_latency_seconds", "Seconds from a sensor's batch to the "
                         "journal's acknowledgement, over the last 5 s.",
                         (((actor,), q) for actor, q in s.sensor_ack_s), ("actor",))


def sync_metrics(s: GatewaySnapshot) -> Iterator[Metric]:
    sync = s.sync
    if sync is None:
        return
    yield from counter("sync_batches_sent", "Batches posted to central and answered.",
                       sync.batches_sent)
    yield from counter("sync_batches_acked", "Batches central acknowledged.",
                       sync.batches_acked)
    yield from counter("sync_sent_bytes", "Bytes posted to central.", sync.bytes_sent)
    yield from counter("sync_retries", "Posts of a batch posted before.", sync.retries)
    yield from counter("sync_failures", "Answers that were neither an acknowledgement nor a "
                       "split (the batch is retried later).", sync.failures)
    yield from counter("sync_records", "Records central acknowledged.", sync.records_synced)
    yield from gauge("sync_pending_batches", "Batches planned and not yet acknowledged.",
                     sync.pending_batches)


def host_metrics(s: GatewaySnapshot) -> Iterator[Metric]:
    yield from counter("inferences", "Windows the model runner inferred (since its start).",
                       s.inferences_total)
    yield from quantiles("inference_latency_seconds", "Seconds an inference call took (recent "
                         "windows).", [((), s.inference_s)])
    host = s.host
    yield from gauge("disk_total_bytes", "Size of the data dir's filesystem.",
                     host.disk_total_bytes)
    yield from gauge("disk_used_bytes", "Bytes used on the data dir's filesystem.",
                     host.disk_used_bytes)
    yield from gauge("disk_free_bytes", "Bytes free on the data dir's filesystem (for "
                     "unprivileged users).", host.disk_free_bytes)
    yield from gauge("cpu_temperature_celsius", "The CPU's temperature (where the board has a "
                     "sensor).", host.cpu_temp_c)
    for minutes, value in zip((1, 5, 15), host.load or (None, None, None), strict=True):
        yield from gauge(f"load{minutes}", f"The system's {minutes}-minute load average.",
                         value)


def metric_families(s: GatewaySnapshot) -> list[Metric]:
    """Every metric of ``s``."""
    return [*actor_metrics(s), *journal_metrics(s), *drop_metrics(s), *sync_metrics(s),
            *host_metrics(s)]


class SnapshotCollector(Collector):
    """Serves the latest snapshot (set by the actor's thread, read by the HTTP thread: one
    reference, swapped whole)."""

    def __init__(self) -> None:
        self.snapshot: GatewaySnapshot | None = None

    def collect(self) -> Iterable[Metric]:
        snapshot = self.snapshot
        return metric_families(snapshot) if snapshot is not None else []

    def describe(self) -> Iterable[Metric]:
        return []  # the metrics depend on the snapshot: nothing to check at registration


def make_registry(collector: SnapshotCollector) -> CollectorRegistry:
    """A registry of its own holding only ``collector`` (no process or platform metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
