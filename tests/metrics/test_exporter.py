"""The Prometheus text of a snapshot, parsed back with prometheus_client's own parser: fleetgw_
names with units, counters ending in _total, bounded labels, missing figures left out, the
collector's own registry; and the HTTP endpoint, whose port being taken is a problem it
reports, never an exception."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from actors.journal.reader import DropStats, LaneBacklog
from actors.metrics.endpoint import MetricsEndpoint
from actors.metrics.exporter import SnapshotCollector, make_registry
from actors.metrics.snapshot import HostFacts, JournalFacts, build_snapshot
from tests.journal import TS0
from tests.metrics import tree

NOW_NS = TS0 + 60 * 10**9
FACTS = JournalFacts(records_total=5000, usage_bytes=8 << 20,
                     drops=(DropStats("duplicate", "P2", 4, 400),
                            DropStats("synced", "P3", 1000, 90000)),
                     backlog=(LaneBacklog("unrouted", 3, 300, TS0 + 59 * 10**9),
                              LaneBacklog("P1", 0, 0, None),
                              LaneBacklog("P2", 10, 1000, TS0 + 50 * 10**9),
                              LaneBacklog("P3", 400, 40000, TS0)),
                     backlog_at_ns=NOW_NS, backlog_query_s=0.004)
HOST = HostFacts(64 << 30, 16 << 30, 40 << 30, 55.0, (1.5, 1.0, 0.5))
ALLOWED_LABELS = {"actor", "class", "lane", "reason", "consumer", "quantile", "device_id"}


def exposition(journal=FACTS, host=HOST, **kwargs) -> str:
    collector = SnapshotCollector()
    collector.snapshot = build_snapshot(tree(**kwargs), journal, host, device_id="veh-001",
                                        budget_bytes=256 << 20, now_ns=NOW_NS)
    return generate_latest(make_registry(collector)).decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_every_metric_is_prefixed_and_every_counter_ends_in_total() -> None:
    families = list(text_string_to_metric_families(exposition()))
    assert families and all(f.name.startswith("fleetgw_") for f in families)
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        assert family.type in ("counter", "gauge"), family.name
        if "seconds" in family.name or "bytes" in family.name:
            assert family.name.endswith(("_seconds", "_bytes", "_bytes_total")), family.name


def test_the_snapshot_figures_are_exported_with_their_units() -> None:
    text = exposition()
    assert value(text, "fleetgw_actor_restarts_total", actor="sensor:gps0") == 2
    assert value(text, "fleetgw_actor_up", actor="sensor:gps0", **{"class": "SimSensor"}) == 0
    assert value(text, "fleetgw_actor_up", actor="journal", **{"class": "JournalWriter"}) == 1
    assert value(text, "fleetgw_journal_records_total") == 5000
    assert value(text, "fleetgw_journal_commits_total") == 50
    assert value(text, "fleetgw_journal_commits_per_second") == 12.5
    assert value(text, "fleetgw_journal_commit_latency_seconds", quantile="0.99") == 0.02
    assert value(text, "fleetgw_journal_usage_bytes") == 8 << 20
    assert value(text, "fleetgw_journal_budget_bytes") == 256 << 20
    assert value(text, "fleetgw_backlog_records", lane="P3") == 400
    assert value(text, "fleetgw_backlog_bytes", lane="P2") == 1000
    assert value(text, "fleetgw_backlog_oldest_age_seconds", lane="P3") == 60.0
    assert value(text, "fleetgw_backlog_oldest_age_seconds", lane="P1") == 0.0
    assert value(text, "fleetgw_journal_dropped_records_total", reason="synced",
                 lane="P3") == 1000
    assert value(text, "fleetgw_sensor_dropped_total", actor="sensor:mq0",
                 reason="mqtt_qos0_overflow") == 7
    assert value(text, "fleetgw_sync_retries_total") == 2
    assert value(text, "fleetgw_sync_failures_total") == 2
    assert value(text, "fleetgw_sync_sent_bytes_total") == 12345
    assert value(text, "fleetgw_inference_latency_seconds", quantile="0.5") == 600e-6
    assert value(text, "fleetgw_disk_used_bytes") == 16 << 30
    assert value(text, "fleetgw_cpu_temperature_celsius") == 55.0
    assert value(text, "fleetgw_load1") == 1.5


def test_labels_are_bounded_to_names_the_config_gives() -> None:
    labels = {k for name, pairs in samples(exposition()) for k, _ in pairs}
    assert labels <= ALLOWED_LABELS, labels - ALLOWED_LABELS


def test_figures_a_gateway_does_not_have_are_left_out() -> None:
    text = exposition(journal=None, host=HostFacts(), uplink=False, model=False)
    names = {name for name, _ in samples(text)}
    assert not {n for n in names if n.startswith(("fleetgw_sync_", "fleetgw_inference"))}
    assert not names & {"fleetgw_cpu_temperature_celsius", "fleetgw_disk_used_bytes",
                        "fleetgw_load1", "fleetgw_backlog_records",
                        "fleetgw_journal_dropped_records_total"}
    # ... while what the tree says is still there.
    assert value(text, "fleetgw_journal_records_total") == 999


def test_the_collector_has_a_registry_of_its_own() -> None:
    collector = SnapshotCollector()
    registry = make_registry(collector)
    assert generate_latest(registry) == b""  # nothing before the first snapshot
    text = exposition()
    assert "process_" not in text and "python_" not in text
    assert b"fleetgw_" not in generate_latest(REGISTRY)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        return reply.read().decode()


def test_the_endpoint_serves_the_latest_snapshot_over_http() -> None:
    collector = SnapshotCollector()
    endpoint = MetricsEndpoint("127.0.0.1", free_port(), make_registry(collector))
    assert endpoint.open() and endpoint.listening and endpoint.problem == ""
    try:
        assert get(endpoint.port) == ""
        collector.snapshot = build_snapshot(tree(), FACTS, HOST, device_id="veh-001",
                                            budget_bytes=1, now_ns=NOW_NS)
        assert value(get(endpoint.port), "fleetgw_backlog_records", lane="P2") == 10
    finally:
        endpoint.close()
    assert not endpoint.listening
    with pytest.raises(OSError):
        get(endpoint.port)


def test_a_port_in_use_is_a_problem_that_says_what_helps_and_is_retried() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    endpoint = MetricsEndpoint("127.0.0.1", port, make_registry(SnapshotCollector()))
    try:
        assert not endpoint.open()
        assert endpoint.problem == (f"metrics: cannot listen on 127.0.0.1:{port}: address in "
                                    "use; set [metrics] port")
        assert not endpoint.listening
        holder.close()
        assert endpoint.open() and endpoint.problem == ""  # the retry takes the freed port
        get(port)
    finally:
        holder.close()
        endpoint.close()


def test_an_address_this_computer_does_not_have_is_a_problem() -> None:
    endpoint = MetricsEndpoint("192.0.2.1", free_port(), make_registry(SnapshotCollector()))
    assert not endpoint.open()
    assert "set [metrics] listen_address" in endpoint.problem
    assert endpoint.where.startswith("192.0.2.1:")
    assert MetricsEndpoint("::1", 9477, make_registry(SnapshotCollector())).where == "[::1]:9477"
