"""Snapshots: a hand-built tree plus a real journal file and real host files give one
`GatewaySnapshot`; figures a gateway does not have are None, never a guess; reading the journal
or the host never raises, and a slow backlog is measured less often."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors.journal import Journal
from actors.journal.reader import DropStats
from actors.metrics.probes import (
    BACKLOG_DUTY,
    JournalProbe,
    find_cpu_temp_path,
    read_cpu_temp_c,
    read_host,
    resolve_cpu_temp_path,
)
from actors.metrics.sampler import SnapshotSampler
from actors.metrics.snapshot import (
    HostFacts,
    JournalFacts,
    LaneWaiting,
    Quantiles,
    SensorDrop,
    SyncFigures,
    build_snapshot,
)
from config.metrics import MetricsSettings, SamplingSettings
from messages.supervision import TopologyReport
from tests.journal import TS0
from tests.journal.test_lane_backlog import _fill
from tests.metrics import tree

NOW_NS = TS0 + 30 * 10**9
HOST = HostFacts(1000, 250, 700, 48.5, (0.5, 0.25, 0.125))


@pytest.fixture
def journal_file(tmp_path: Path) -> str:
    """A real journal: 9 records, one policy drop, a backlog in every synced lane."""
    path = str(tmp_path / "journal.db")
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: TS0 + 10**10) as journal:
        _fill(journal)
    return path


def snapshot_of(journal: JournalFacts | None, **kwargs):
    return build_snapshot(tree(**kwargs), journal, HOST, device_id="veh-001",
                          budget_bytes=1 << 20, now_ns=NOW_NS)


def test_every_actor_is_reported_with_its_state_restarts_and_uptime() -> None:
    s = snapshot_of(None)
    actors = {a.name: a for a in s.actors}
    assert list(actors) == ["gateway", "journal", "sensors", "sensor:imu0", "sensor:mq0",
                            "sensor:gps0", "processing", "router", "model", "uplink", "metrics"]
    gps = actors["sensor:gps0"]
    assert (gps.cls, gps.state, gps.up, gps.restarts, gps.uptime_s) == (
        "SimSensor", "backing_off", False, 2, None)
    assert actors["journal"].up and actors["journal"].uptime_s == 12.0
    assert (s.restarts_total, s.actors_down) == (3, 1)


def test_the_actors_figures_become_journal_sync_inference_and_drop_figures() -> None:
    s = snapshot_of(None)
    assert (s.journal_commits_total, s.journal_commits_per_s, s.journal_refused_total) == (
        50, 12.5, 2)
    assert s.journal_commit_s == Quantiles(0.0015, 0.02)
    assert s.sync == SyncFigures(batches_sent=9, batches_acked=7, bytes_sent=12345, retries=2,
                                 failures=2, records_synced=700, pending_batches=1)
    assert s.inferences_total == 30 and s.inference_s == Quantiles(600e-6, 2100e-6)
    assert s.consumer_backlog == (("router", 40), ("model", 12))
    # The MQTT session's own quarantine count is the outbox's again: counted once.
    assert s.sensor_drops == (SensorDrop("sensor:mq0", "quarantined", 3),
                              SensorDrop("sensor:mq0", "rejected", 1),
                              SensorDrop("sensor:mq0", "mqtt_qos0_overflow", 7))
    assert s.sensor_ack_s == (("sensor:imu0", Quantiles(0.002, 0.0095)),)
    assert s.disk_used_fraction == 0.25


def test_figures_a_gateway_does_not_have_are_none_not_zero() -> None:
    s = snapshot_of(None, uplink=False, model=False)
    assert s.sync is None
    assert s.inferences_total is None and s.inference_s is None
    assert s.consumer_backlog == (("router", 40),)
    # Without the journal file, its actor's own figures stand in; the backlog is unknown.
    assert (s.journal_records_total, s.journal_usage_bytes) == (999, 4096)
    assert s.backlog == () and s.backlog_query_s is None
    assert s.journal_drops == () and s.drops_total == 11


def test_the_journal_facts_come_from_the_file(journal_file: str) -> None:
    probe = JournalProbe(journal_file, min_interval_s=2.0)
    facts = probe.read()
    assert facts is not None and probe.problem == ""
    s = snapshot_of(facts)
    assert s.journal_records_total == 9  # the file's, not the actor's figure (999)
    assert s.journal_usage_bytes == facts.usage_bytes > 0
    assert s.journal_drops == (DropStats("duplicate", "P2", 1, facts.drops[0].bytes),)
    assert s.drops_total == 1 + 11
    waiting = {w.lane: w for w in s.backlog}
    assert [(w.lane, w.records) for w in s.backlog] == [("unrouted", 2), ("P1", 1), ("P2", 1),
                                                         ("P3", 2)]
    # Ages by reading time (make_batch: ts = TS0 + index): P1 is the batch's first reading.
    assert waiting["P1"] == LaneWaiting("P1", 1, facts.backlog[1].bytes, 30.0)
    assert waiting["unrouted"].oldest_age_s == pytest.approx(30.0, abs=1e-8)
    probe.close()


def test_an_empty_lane_waits_zero_seconds(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.db")
    Journal(path, synchronous="NORMAL").close()
    facts = JournalProbe(path, 2.0).read()
    assert facts is not None
    assert {(w.records, w.oldest_age_s) for w in snapshot_of(facts).backlog} == {(0, 0.0)}


def test_a_missing_journal_is_a_problem_until_it_appears(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.db")
    probe = JournalProbe(path, min_interval_s=2.0)
    assert probe.read() is None
    assert "no journal at" in probe.problem
    Journal(path, synchronous="NORMAL").close()
    assert probe.read() is not None and probe.problem == ""
    probe.close()


def test_a_slow_backlog_is_measured_at_most_its_duty_cycle(journal_file: str) -> None:
    # Clock readings: the first measurement takes 1 s (so the next is due 1 / duty later),
    # a read 5 s on reuses it, a read after the due time measures again.
    ticks = iter([100.0, 101.0, 105.0, 100.0 + 1 / BACKLOG_DUTY + 1, 130.0, 130.2])
    walls = iter([1, 2])
    probe = JournalProbe(journal_file, min_interval_s=2.0, clock=lambda: next(ticks),
                         wall_ns=lambda: next(walls))
    first = probe.read()
    assert first is not None and (first.backlog_at_ns, first.backlog_query_s) == (1, 1.0)
    again = probe.read()
    assert again is not None and (again.backlog_at_ns, again.backlog) == (1, first.backlog)
    later = probe.read()
    assert later is not None and later.backlog_at_ns == 2
    assert later.backlog_query_s == pytest.approx(0.2)
    probe.close()


def _zone(root: Path, n: int, kind: str, millidegrees: str = "45000") -> None:
    zone = root / f"thermal_zone{n}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(kind + "\n")
    (zone / "temp").write_text(millidegrees + "\n")


def test_the_cpu_temperature_comes_from_the_cpu_zone_else_the_first(tmp_path: Path) -> None:
    thermal = tmp_path / "thermal"
    _zone(thermal, 10, "acpitz")
    _zone(thermal, 2, "x86_pkg_temp")
    _zone(thermal, 3, "cpu-thermal", "51234")
    assert find_cpu_temp_path(str(thermal)) == str(thermal / "thermal_zone3" / "temp")
    assert read_cpu_temp_c(find_cpu_temp_path(str(thermal))) == 51.234
    other = tmp_path / "other"
    _zone(other, 10, "acpitz")
    _zone(other, 2, "gpu")
    assert find_cpu_temp_path(str(other)) == str(other / "thermal_zone2" / "temp")
    assert find_cpu_temp_path(str(tmp_path / "none")) == ""


def test_the_cpu_temperature_setting_auto_detects_names_a_file_or_is_off(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "cpu-thermal")
    auto = resolve_cpu_temp_path("", str(tmp_path))
    assert auto == str(tmp_path / "thermal_zone0" / "temp")
    assert resolve_cpu_temp_path("/some/file", str(tmp_path)) == "/some/file"
    assert resolve_cpu_temp_path("none", str(tmp_path)) == ""
    assert read_cpu_temp_c("") is None
    assert read_cpu_temp_c(str(tmp_path / "missing")) is None
    (tmp_path / "garbage").write_text("hot\n")
    assert read_cpu_temp_c(str(tmp_path / "garbage")) is None


def test_the_host_facts_are_the_data_dirs_filesystem_and_the_load(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "cpu-thermal", "39500")
    host = read_host(str(tmp_path), str(tmp_path / "thermal_zone0" / "temp"))
    stat = os.statvfs(tmp_path)
    assert host.disk_total_bytes == stat.f_blocks * stat.f_frsize
    assert 0 <= host.disk_used_bytes <= host.disk_total_bytes
    assert host.cpu_temp_c == 39.5
    assert host.load is not None and len(host.load) == 3
    missing = read_host(str(tmp_path / "gone"), "")
    assert (missing.disk_total_bytes, missing.cpu_temp_c) == (None, None)


def _sampler(tmp_path: Path) -> SnapshotSampler:
    settings = SamplingSettings(MetricsSettings(cpu_temp_path="none"), "veh-001", 1 << 20)
    return SnapshotSampler(settings, str(tmp_path))


def test_the_sampler_builds_from_the_answer_to_its_latest_request(tmp_path: Path,
                                                                 journal_file: str) -> None:
    sampler = _sampler(tmp_path)
    try:
        old = sampler.request()
        new = sampler.request()
        assert old is not None and new is not None and new.request_id != old.request_id
        assert not sampler.on_report(TopologyReport(old.request_id, tree()))  # stale
        assert sampler.on_report(TopologyReport(new.request_id, tree()))
        assert sampler.request() is None  # one at a time
        sampler.building.result(timeout=60)  # the worker thread finishes
        snapshot = sampler.take()
        assert snapshot is not None and snapshot.journal_records_total == 9
        assert snapshot.device_id == "veh-001" and snapshot.host.cpu_temp_c is None
        assert sampler.take() is None and not sampler.busy
    finally:
        sampler.close()


def test_a_failed_build_is_counted_not_raised(tmp_path: Path) -> None:
    sampler = _sampler(tmp_path)
    try:
        request = sampler.request()
        assert request is not None
        assert sampler.on_report(TopologyReport(request.request_id, None))  # type: ignore[arg-type]
        with pytest.raises(AttributeError):
            sampler.building.result(timeout=60)
        assert sampler.take() is None
        assert sampler.failures == 1 and "AttributeError" in sampler.last_failure
        assert sampler.request() is not None  # and sampling goes on
    finally:
        sampler.close()
