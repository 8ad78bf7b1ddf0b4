"""The metrics end to end: a real gateway serves GET /metrics on loopback only, its figures
follow what happens (commits, an actor SIGKILLed and restarted), its health readings are
journaled like any reading, and a metrics port already taken never stops a gateway."""

from __future__ import annotations

import os
import signal
import urllib.request

import apsw
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.journal.reader import JournalReader
from messages.journal import START
from tests.system.harness import free_port, wait_for

pytestmark = pytest.mark.system

SENSORS = [{"id": "imu0", "kind": "imu", "rate_hz": 50, "seed": 1, "batch_max_age_s": 0.05},
           {"id": "gps0", "kind": "gps", "rate_hz": 5, "seed": 2, "batch_max_age_s": 0.05}]
QUIET = {"model": {"enabled": False}}


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(port: int, name: str, **labels: str) -> float | None:
    return scrape(port).get((name, frozenset(labels.items())))


def health_readings(gw) -> list:
    with JournalReader(gw.journal_path) as reader:
        return [r for r in reader.read(START, 1_000_000) if r.kind == "gateway_health"]


def lanes_of_health_records(gw) -> set[str | None]:
    db = apsw.Connection(gw.journal_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {lane for (lane,) in db.execute(
            "SELECT lane FROM records WHERE kind = 'gateway_health'")}
    finally:
        db.close()


def test_metrics_follow_commits_and_restarts_and_health_is_journaled(make_gateway) -> None:
    port = free_port()
    gw = make_gateway(sensors=SENSORS, metrics={"port": port, "refresh_s": 0.5,
                                                "health_interval_s": 1}, **QUIET).start()
    first = wait_for(lambda: metric(port, "fleetgw_journal_records_total"), 60,
                     "GET /metrics to show the journal")
    wait_for(lambda: metric(port, "fleetgw_journal_records_total") > first, 60,
             "the journal's figures to move")
    assert metric(port, "fleetgw_journal_commit_latency_seconds", quantile="0.99") > 0
    assert metric(port, "fleetgw_backlog_records", lane="P3") is not None
    assert metric(port, "fleetgw_actor_up", actor="sensor:imu0", **{"class": "SimSensor"}) == 1
    assert metric(port, "fleetgw_actor_restarts_total", actor="sensor:imu0") == 0

    # A SIGKILLed sensor is restarted by its supervisor, and the endpoint counts it.
    os.kill(gw.node("sensor:imu0")["pid"], signal.SIGKILL)
    wait_for(lambda: metric(port, "fleetgw_actor_restarts_total", actor="sensor:imu0") == 1,
             60, "the restart to show in /metrics")
    wait_for(lambda: metric(port, "fleetgw_actor_up", actor="sensor:imu0",
                            **{"class": "SimSensor"}) == 1, 60, "the sensor to run again")

    # I9: the endpoint listens on loopback only.
    pid = gw.node("metrics")["pid"]
    listening = [c.laddr for c in psutil.Process(pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [a.ip for a in listening] == ["127.0.0.1"]

    # The health readings take the sensors' path: journaled, routed to a synced lane.
    wait_for(lambda: any(r.values.get("restarts_total", 0) >= 1 for r in health_readings(gw)),
             60, "a health reading that counts the restart")
    readings = health_readings(gw)
    assert {(r.device_id, r.sensor_id) for r in readings} == {("veh-001", "health")}
    assert all({"journal_records", "commits_per_s", "backlog_p3_records", "drops_total",
                "load1"} <= r.values.keys() for r in readings[1:])
    wait_for(lambda: "P3" in lanes_of_health_records(gw), 60, "the router to route them")
    assert gw.terminate() == 0


def test_a_second_gateway_on_a_taken_metrics_port_keeps_running_and_says_why(
        make_gateway) -> None:
    port = free_port()
    first = make_gateway(sensors=SENSORS[:1], subdir="one", metrics={"port": port},
                         **QUIET).start()
    second = make_gateway(sensors=SENSORS[:1], subdir="two", metrics={"port": port},
                          **QUIET).start()
    figures = wait_for(lambda: (f := second.node("metrics")["figures"]).get("problem", "none")
                       != "none" and f, 60, "the second gateway to report the taken port")
    assert figures["listening"] is False
    assert figures["problem"] == (f"metrics: cannot listen on 127.0.0.1:{port}: address in use; "
                                  "set [metrics] port")
    assert "address in use; set [metrics] port" in second.gateway_log()
    floor = second.records()
    wait_for(lambda: second.records() > floor, 60, "the second gateway to go on journaling")
    assert second.node("metrics")["restarts"] == 0 and second.all_running()
    assert first.node("metrics")["figures"]["listening"] is True
    assert metric(port, "fleetgw_journal_records_total") > 0  # the first one serves
    assert second.terminate() == 0
    assert first.terminate() == 0
