"""Every fault the harness makes, on a real gateway and a real receiver, invariants checked after.

Each test is one `Rig` (a real `fleetgw run`, a real receiver on chdb over mTLS through a real
TCP link proxy) hit by a series of faults; after an orderly stop and a drain, the journal and
ClickHouse are read back (`RigResults`) and the invariants that apply are checked:
I2 (journal verify), I3 (no other writer of journal.db seen), I5 (ClickHouse FINAL == distinct
seqs == the journal's synced count, after draining), plus what each fault promises (the actor
ran again, nothing acknowledged lost, bad input quarantined).
"""

from __future__ import annotations

import signal

import pytest

from tests.mosquitto import require_mosquitto
from tests.system.checks import sensor_timelines
from tools.harness.load import MqttLoad, journaled_numbers
from tools.harness.rig import Rig

pytestmark = pytest.mark.system


def assert_core_invariants(results) -> None:
    assert results.exit_status == 0, "the orderly stop at the end failed"
    assert results.drained, f"the uplink did not sync everything: {results.synced} of " \
                            f"{results.syncable}"
    assert results.verify_problems == [], results.verify_problems  # I2
    assert results.foreign_writers == []  # I3
    assert results.synced > 0
    for row in results.reconciliation:  # I5, per device
        assert row["ok"], row
    assert results.central_final == results.central_unique == results.synced


def assert_every_reading_once_on_its_grid(rig: Rig, sensors: tuple[str, ...]) -> None:
    """A simulated sensor that ran without a restart reads on an exact grid (one period
    apart): each reading journaled once, none missing between the first and the last (I1)."""
    timelines = sensor_timelines(rig.journal_path)
    for sensor in sensors:
        rate = rig.sensor_config(sensor)["rate_hz"]
        stamps = sorted(timelines[sensor])
        assert len(stamps) == len(set(stamps)), f"{sensor}: a reading was journaled twice"
        steps = {round((b - a) * rate / 1e9, 3) for a, b in zip(stamps, stamps[1:], strict=False)}
        assert steps == {1.0}, f"{sensor}: gaps in its readings: {sorted(steps)[-3:]}"


@pytest.fixture
def make_rig(tmp_path):
    rigs: list[Rig] = []

    def make(*args, **kwargs) -> Rig:
        rig = Rig(tmp_path / f"rig{len(rigs)}", *args, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def grows(rig: Rig, figure: str = "records", actor: str = "journal", by: int = 50):
    """A predicate: the actor's figure grew by ``by`` since now."""
    def value() -> int:
        return int(rig.figures(actor).get(figure) or 0)

    start = rig.wait_until(lambda: value() or None, 60, f"{actor} to show {figure}")
    return lambda: value() >= start + by


def test_signals_and_faults_inside_actors_each_actor_runs_again_and_nothing_is_lost(make_rig):
    rig = make_rig().start()
    cases = [
        (lambda: rig.kill("journal"), "journal"),                        # SIGKILL
        (lambda: rig.pause("uplink"), "uplink"),                         # SIGSTOP: watchdog
        (lambda: rig.inject("model", "exception"), "model"),
        (lambda: rig.inject("router", "hang"), "router"),                # watchdog kills it
        (lambda: rig.inject("sensor:engine0", "segfault"), "sensor:engine0"),
        (lambda: rig.inject("processing", "exit"), "processing"),        # a supervisor
    ]
    for fault, target in cases:
        rig.wait_until(grows(rig), 60, "the journal to commit")
        event = fault()
        assert rig.wait_recovered(event, 90) > 0, target
    slow = rig.inject("journal", "slow", seconds=2.0)  # a stall shorter than its watchdog
    rig.wait_until(grows(rig), 60, "the journal to commit after its stall")
    assert rig.node("journal")["pid"] == slow.pid, "a 2 s stall must not restart the journal"
    corrupt = rig.corrupt_model()
    rig.wait_recovered(corrupt, 90)
    rig.wait_until(lambda: rig.figures("model").get("refused"), 60,
                   "the model runner to refuse the corrupt model")
    rig.wait_until(grows(rig), 60, "journaling to go on without a model")
    results = rig.finish()
    assert_core_invariants(results)
    for target in ("journal", "uplink", "model", "router", "sensor:engine0", "processing"):
        assert results.restarts.get(target, 0) >= 1, (target, results.restarts)
    assert all(e["recovered_s"] for e in results.events
               if e["kind"] not in ("slow", "corrupt_model")), results.events
    assert_every_reading_once_on_its_grid(rig, ("imu0", "gps0"))  # the sensors not killed


def test_power_cuts_then_restarts_lose_and_duplicate_nothing_acknowledged(make_rig):
    rig = make_rig().start()
    for _ in range(3):
        rig.wait_until(grows(rig, by=100), 60, "the journal to commit")
        rig.power_cut()
        assert rig.restart() > 0
    rig.wait_until(grows(rig), 60, "the journal to commit after the last restart")
    results = rig.finish()
    assert_core_invariants(results)
    assert [e["kind"] for e in results.events] == ["power_cut"] * 3
    assert all(e["recovered_s"] for e in results.events)
    assert results.duplicates == 0


@require_mosquitto
def test_floods_of_malformed_input_are_quarantined_while_acked_good_data_is_kept(make_rig):
    nmea_port = 0
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        nmea_port = probe.getsockname()[1]
    config = {
        "gateway": {"device_id": "veh-001"},
        "broker": {"enabled": True},
        "model": {"enabled": False},
        "sensors": [
            {"id": "mq0", "type": "mqtt", "batch_max_age_s": 0.05,
             "mqtt": {"topics": [{"filter": "fleet/+/engine", "device": "{2}",
                                  "kind": "engine"}]}},
            {"id": "gnss0", "type": "nmea", "batch_max_age_s": 0.05,
             "nmea": {"source": f"udp://127.0.0.1:{nmea_port}"}},
        ],
    }
    rig = make_rig(config, devices=("veh-002",)).start()
    host, port = rig.mqtt_address()
    load = MqttLoad(host, port, "fleet/veh-002/engine", rate_hz=100).start()
    try:
        rig.wait_until(lambda: int(rig.figures("journal")["records"] or 0) > 100, 60,
                       "the good load to be journaled")
        rig.flood("mq0", 2000)
        rig.flood("gnss0", 2000)
        rig.wait_until(lambda: rig.figures("sensor:mq0").get("quarantined", 0) >= 2000, 90,
                       "the MQTT flood to be quarantined")
    finally:
        load.stop()
    results = rig.finish()
    assert_core_invariants(results)
    assert results.quarantined["mq0"] == 2000
    assert results.quarantined["gnss0"] > 0  # UDP: datagrams may be lost before the socket
    assert "sensor:mq0" not in results.restarts and "sensor:gnss0" not in results.restarts
    journaled = journaled_numbers(rig.data_dir, "mq0", key_file=rig.key_file)
    assert load.acked, "the broker acknowledged nothing"
    missing = load.acked - set(journaled)
    assert not missing, f"{len(missing)} acknowledged messages not journaled (I1)"
    assert max(journaled.values()) == 1, "a message was journaled twice"


def test_a_sigstopped_actor_resumed_before_its_watchdog_goes_on_without_a_restart(make_rig):
    rig = make_rig({"gateway": {}, "model": {"enabled": False},
                    "supervision": {"heartbeat_timeout_s": 30.0},
                    "sensors": [{"id": "imu0", "kind": "imu", "rate_hz": 50}]},
                   receiver=False).start()
    event = rig.pause("sensor:imu0")
    rig.resume("sensor:imu0")
    rig.wait_until(grows(rig, by=20), 60, "the sensor to go on")
    assert rig.node("sensor:imu0")["pid"] == event.pid
    assert rig.kill("sensor:imu0", signal.SIGKILL).pid == event.pid


def test_link_faults_delay_the_sync_and_lose_and_duplicate_nothing(make_rig):
    rig = make_rig().start()

    def synced() -> int:
        return rig.sync_totals()[1]

    def syncs_on(what: str, timeout_s: float = 90) -> None:
        start = synced()
        rig.wait_until(lambda: synced() > start, timeout_s, f"the uplink to sync {what}")

    syncs_on("with the link up")
    for kind, params in (("cut", {}), ("blackhole", {}),
                         ("reset_mid_body", {"after_bytes": 300, "times": 3})):
        rig.link_fault(kind, **params)
        rig.wait_until(grows(rig, by=100), 60, f"journaling to go on through {kind}")
        if kind == "reset_mid_body":
            rig.wait_until(lambda: rig.link.resets == 3, 90, "three POSTs reset mid-body")
        rig.link_restore()
        syncs_on(f"after {kind}")
    rig.link_fault("latency", seconds=0.3)
    rig.link_fault("bandwidth", bytes_per_s=20_000)
    syncs_on("over a slow, thin link")
    rig.link_restore()
    results = rig.finish()
    assert_core_invariants(results)
    kinds = [e["kind"] for e in results.events]
    assert kinds == ["link_cut", "link_blackhole", "link_reset_mid_body", "link_latency",
                     "link_bandwidth"]
    assert all(e["ended_s"] for e in results.events)
    assert results.restarts.get("uplink", 0) == 0, "link faults must not crash the uplink"


def test_a_full_disk_holds_readings_until_freed_then_everything_syncs(make_rig):
    config = {"gateway": {}, "model": {"enabled": False},
              "journal": {"disk_budget_bytes": 256 << 20},  # more than the disk: it fills first
              "sensors": [{"id": "imu0", "kind": "imu", "rate_hz": 100, "seed": 1},
                          {"id": "engine0", "kind": "engine", "rate_hz": 20, "seed": 3}]}
    rig = make_rig(config, disk_mb=48).start()
    rig.wait_until(grows(rig, by=200), 60, "the journal to commit")
    rig.fill_disk()
    rig.wait_until(lambda: int(rig.figures("journal").get("refused") or 0) > 0, 90,
                   "the journal to refuse appends on the full disk")
    rig.free_disk()
    rig.wait_until(grows(rig, by=200), 90, "journaling to resume after the disk was freed")
    results = rig.finish()
    assert_core_invariants(results)
    assert results.restarts.get("journal", 0) == 0, results.restarts
    # nobody killed a sensor: every reading held through the full disk arrived, once
    assert_every_reading_once_on_its_grid(rig, ("imu0", "engine0"))


def test_wall_clock_steps_forward_and_back_neither_stop_journaling_nor_sync(make_rig):
    rig = make_rig(clock=True).start()
    for step in (86_400, -7_200, 600):
        rig.wait_until(grows(rig, by=100), 60, "the journal to commit")
        rig.clock_jump(step)
    rig.wait_until(grows(rig, by=200), 60, "journaling after the last step")
    results = rig.finish()
    assert_core_invariants(results)
    assert [e["detail"] for e in results.events] == ["+86400s", "-7200s", "+600s"]
    assert not results.restarts, f"clock steps crashed actors: {results.restarts}"
