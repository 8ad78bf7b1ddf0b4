"""MetricsActor: the gateway's Prometheus endpoint (``GET /metrics``, loopback by default, I9).

Where this sits: a child of the gateway root, started last and stopped first, niced like the
journal consumers (it only watches). Every ``[metrics] refresh_s`` it asks the root for the
live tree, builds a `GatewaySnapshot` in its sampler's worker thread (journal read-only, host
facts) and hands it to the collector the HTTP thread serves from. The actor's own thread never
waits on HTTP or on the journal.

Metrics must never take the gateway down: a port already in use is logged once, shown in the
figures (``listening``, ``problem``) and retried every `LISTEN_RETRY_S`; a snapshot that fails
keeps the previous one. (A crash loop here would escalate to the root and stop everything.)
"""

from __future__ import annotations

from typing import Any

from actors.base import SupervisedActor, log
from actors.metrics.endpoint import LISTEN_RETRY_S, MetricsEndpoint
from actors.metrics.exporter import SnapshotCollector, make_registry
from actors.metrics.sampler import SnapshotSampler, gateway_root
from config.metrics import SamplingSettings
from messages.supervision import StopChild, TopologyReport

#: Seconds between looks at a snapshot being built.
BUILD_POLL_S = 0.05


class MetricsActor(SupervisedActor):
    """Samples the gateway and serves the latest sample to Prometheus."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampler: SnapshotSampler | None = None
        self.endpoint: MetricsEndpoint | None = None
        self.collector = SnapshotCollector()

    def on_init(self) -> None:
        settings: SamplingSettings = self.settings
        self.config = settings.metrics
        # Before any thread starts: the lookup goes through Thespian's admin.
        self.root = gateway_root(self)
        self.sampler = SnapshotSampler(settings, self.data_dir or ".")
        self.endpoint = MetricsEndpoint(self.config.listen_address, self.config.port,
                                        make_registry(self.collector))
        self.on_timer_listen()
        self.on_timer_sample()

    def on_timer_listen(self) -> None:
        assert self.endpoint is not None
        before = self.endpoint.problem
        if self.endpoint.open():
            where = self.endpoint.where
            if self.config.loopback:
                log().info("metrics: serving http://%s/metrics", where)
            else:
                log().warning("metrics: serving http://%s/metrics beyond loopback, without "
                              "authentication ([metrics] listen_address)", where)
            return
        if self.endpoint.problem != before:  # once per problem, not every retry
            log().warning("%s (retrying every %g s)", self.endpoint.problem, LISTEN_RETRY_S)
        self.start_timer("listen", LISTEN_RETRY_S)

    def on_timer_sample(self) -> None:
        assert self.sampler is not None
        request = self.sampler.request()
        if request is not None:
            self.send(self.root, request)
        self.start_timer("sample", self.config.refresh_s)

    def receiveMsg_TopologyReport(self, msg: TopologyReport, sender: Any) -> None:
        if self.sampler is not None and self.sampler.on_report(msg):
            self.start_timer("built", BUILD_POLL_S)

    def on_timer_built(self) -> None:
        assert self.sampler is not None
        if self.sampler.busy and not self.sampler.ready:
            self.start_timer("built", BUILD_POLL_S)
            return
        snapshot = self.sampler.take()
        if snapshot is not None:
            self.collector.snapshot = snapshot

    def figures(self) -> list[tuple[str, Any]]:
        figures = super().figures()
        if self.endpoint is not None:
            figures += [("listening", self.endpoint.listening),
                        ("address", self.endpoint.where),
                        ("problem", self.endpoint.problem or "none")]
        if self.sampler is not None:
            figures += self.sampler.figures()
        snapshot = self.collector.snapshot
        if snapshot is not None and snapshot.backlog_query_s is not None:
            figures.append(("backlog_query_s", round(snapshot.backlog_query_s, 4)))
        return figures

    def on_stop(self, msg: StopChild, sender: Any) -> None:
        self.close()
        self.reply_stopped(sender, msg, clean=True)

    def on_exit(self) -> None:
        self.close()

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        if self.sampler is not None:
            self.sampler.close()
