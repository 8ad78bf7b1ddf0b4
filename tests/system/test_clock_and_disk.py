"""Real gateways under two faults of the machine itself: the wall clock steps (a Raspberry Pi
has no RTC and steps its clock when NTP or a GPS fix arrives) and the disk fills up.

Clock (`ClockControl`: libfaketime, for the gateway's processes only): after steps of +1 day,
-2 hours and +10 minutes, journaling goes on with readings stamped on the new time, seqs stay
gapless, no actor restarts, the uplink keeps syncing through a `LinkProxy` to a real receiver
and I5 holds after the drain. Two defects these tests found are fixed: the simulated sensors
paced themselves on the wall clock (a day of backlog after +1 day, silence after a step back),
and P3 aggregation turned every record into its own late window after a step back.

Disk (`SmallDisk`: a real tmpfs; the journal's budget is larger than the disk, so the disk fills
first): appends are refused as disk_full and the sensors hold their readings; the gateway keeps
answering and restarts nothing; once space is freed every held reading is journaled, once, with
gapless seqs (I2); a gateway restarted on the full disk runs without a crash loop; the run
process no longer dies when its stdout is a file on the full disk. And one journal-level test: a checkpoint failing after a
COMMIT on a full disk is not reported as a refused append (fixed in actors/journal/journal.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import apsw
import nacl.signing
import pytest

from tests.mosquitto import requires_mosquitto
from tests.system.checks import assert_each_reading_once_and_none_missing, seq_is_gapless
from tests.system.harness import free_port, wait_for, walk
from tools.harness.clock import ClockControl
from tools.harness.disk import DiskError, SmallDisk

MINUTE_S, HOUR_S, DAY_S = 60, 3600, 86400
#: The steps a Pi's clock may take: NTP's first fix after a boot on a stale clock, a GPS fix
#: correcting a clock set too far ahead, then a small correction.
STEPS_S = (DAY_S, -2 * HOUR_S, 10 * MINUTE_S)
#: How far a journaled reading's time may be from the faked clock's: libfaketime's re-read
#: (about a second), batching, and a loaded machine.
TS_SLACK_NS = 30 * 10**9
DEVICE = "veh-001"


@pytest.fixture
def clock(tmp_path):
    with ClockControl(tmp_path / "clock") as control:
        yield control


def total_restarts(gw) -> int:
    return sum(node["restarts"] for node in walk(gw.tree()))


def latest_ts(journal_path: str, sensor_id: str) -> int | None:
    """The time of ``sensor_id``'s latest journaled reading (ns), read-only."""
    db = apsw.Connection(journal_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = db.execute("SELECT ts FROM records WHERE sensor_id = ? AND kind NOT LIKE 'agg:%' "
                         "ORDER BY pos DESC LIMIT 1", (sensor_id,)).fetchone()
    finally:
        db.close()
    return None if row is None else row[0]


def stamped_on(gw, sensor_id: str, offset_s: float) -> bool:
    """The gateway journals ``sensor_id``'s readings on a wall clock ``offset_s`` from ours."""
    ts = latest_ts(gw.journal_path, sensor_id)
    return ts is not None and abs(ts - time.time_ns() - int(offset_s * 1e9)) < TS_SLACK_NS


# ---- the clock: an MQTT source paced by a publisher on the real clock -----------------------

MQTT_SENSOR = {
    "id": "mq0", "type": "mqtt", "batch_max_age_s": 0.05,
    "mqtt": {"topics": [
        # engine: P3, aggregated over 10 s windows (the aggregates are synced);
        # cabin: a kind no rule names, so the default (P3, synced raw).
        {"filter": "fleet/+/engine", "device": "{2}", "kind": "engine"},
        {"filter": "fleet/+/cabin", "device": "{2}", "kind": "cabin"},
    ]},
}


class Publisher:
    """Numbered QoS 1 messages, alternately on the engine and the cabin topic, about 100 a
    second on the real clock; ``acked`` holds the numbers the broker acknowledged (which the
    gateway's MQTT sensor does only after the journal committed them)."""

    TOPICS = (f"fleet/{DEVICE}/engine", f"fleet/{DEVICE}/cabin")

    def __init__(self, port: int) -> None:
        self.port = port
        self.acked: set[int] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import paho.mqtt.client as paho

        client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        client.connect("127.0.0.1", self.port, keepalive=10)
        client.loop_start()
        n = 0
        try:
            while not self.stopping.is_set():
                sent = []
                for _ in range(10):
                    n += 1
                    payload = json.dumps({"n": n, "rpm": 800 + n % 3000})
                    sent.append((n, client.publish(self.TOPICS[n % 2], payload, qos=1)))
                for i, info in sent:
                    with contextlib.suppress(RuntimeError, ValueError):
                        info.wait_for_publish(timeout=10)
                    if info.is_published():
                        self.acked.add(i)
                self.stopping.wait(0.1)
        finally:
            client.disconnect()
            client.loop_stop()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)


def journaled_messages(journal_path: str) -> dict[int, int]:
    """Message number -> how many times the journal holds it (aggregates not counted)."""
    db = apsw.Connection(journal_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return dict(db.execute(
            "SELECT json_extract(payload, '$.n'), count(*) FROM records "
            "WHERE sensor_id = 'mq0' AND kind IN ('engine', 'cabin') GROUP BY 1"))
    finally:
        db.close()


@pytest.mark.system
@requires_mosquitto
def test_journaling_and_sync_go_on_through_wall_clock_steps(make_gateway, start_mosquitto,
                                                            clock, tmp_path):
    pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")
    from tests.system.test_uplink import drain, reconcile, sync_counts, uplink_section
    from tools.central_process import CentralProcess, write_device_key
    from tools.link_proxy import LinkProxy

    broker = start_mosquitto()
    key = nacl.signing.SigningKey.generate()
    write_device_key(tmp_path / "gw" / "data" / "keys", DEVICE, key)
    central = CentralProcess(tmp_path / "central", free_port())
    central.register(DEVICE, key)
    central.start()
    link = LinkProxy(("127.0.0.1", central.port))
    publisher = None
    try:
        gw = make_gateway(sensors=[MQTT_SENSOR], mqtt={"port": broker.port},
                          model={"enabled": False}, env=clock.env(),
                          uplink=uplink_section(central, url=link.url)).start()
        publisher = Publisher(broker.port)
        wait_for(lambda: sync_counts(gw)[1] > 100, 60, "the first records synced")
        for step in STEPS_S:
            records, synced = gw.records(), sync_counts(gw)[1]
            clock.jump(step)
            # The gateway's clock moved: what it journals now carries the new time...
            wait_for(lambda: stamped_on(gw, "mq0", clock.offset_s), 30,
                     f"readings stamped on the clock stepped by {step:+d} s")
            # ... and journaling and sync go on.
            wait_for(lambda r=records, s=synced: gw.records() > r + 300
                     and sync_counts(gw)[1] > s + 100, 60,
                     f"journaling and sync to go on after the step of {step:+d} s")
        publisher.stop()
        acked = publisher.acked
        wait_for(lambda: acked <= journaled_messages(gw.journal_path).keys(), 60,
                 "every acknowledged message to be journaled")
        assert total_restarts(gw) == 0, gw.gateway_log()[-3000:]
        drain(make_gateway, central, gw)
    finally:
        if publisher is not None:
            publisher.stop()
        link.close()
        central.kill()
    counts = journaled_messages(gw.journal_path)
    assert len(acked) > 1000
    assert not {n for n, c in counts.items() if c > 1}, "a message was journaled twice"
    assert seq_is_gapless(gw.journal_path)
    (row,) = reconcile(gw, central)
    assert row["unsynced"] == 0 and row["synced"] > 500, row
    assert row["central_final"] == row["central_unique"] == row["synced"], row  # I5


@pytest.mark.system
@requires_mosquitto
def test_a_step_back_of_the_clock_does_not_make_an_aggregate_of_every_record(
        make_gateway, start_mosquitto, clock):
    broker = start_mosquitto()
    gw = make_gateway(sensors=[MQTT_SENSOR], mqtt={"port": broker.port},
                      model={"enabled": False}, env=clock.env()).start()
    publisher = Publisher(broker.port)
    try:
        wait_for(lambda: gw.records() > 300, 60, "readings journaled")
        clock.jump(-2 * HOUR_S)
        wait_for(lambda: stamped_on(gw, "mq0", clock.offset_s), 30,
                 "readings stamped on the clock stepped back")
        after = gw.records()
        wait_for(lambda: gw.records() > after + 600, 60, "readings after the step")
    finally:
        publisher.stop()
    db = apsw.Connection(gw.journal_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        raw, aggregates = db.execute(
            "SELECT count(*) FILTER (WHERE kind = 'engine'), "
            "count(*) FILTER (WHERE kind = 'agg:engine-metrics') FROM records WHERE pos > ?",
            (after,)).fetchone()
    finally:
        db.close()
    # 10 s windows of ~50 engine records a second: a handful of aggregates, not one per record.
    assert raw > 200 and aggregates < raw / 10, (raw, aggregates)


# ---- the clock: simulated sensors ------------------------------------------------------------

SIM_SENSORS = [
    {"id": "imu0", "kind": "imu", "rate_hz": 20, "seed": 1, "batch_max_age_s": 0.05},
    {"id": "gps0", "kind": "gps", "rate_hz": 5, "seed": 2, "batch_max_age_s": 0.05},
]
SIM_RATE_HZ = 25


@pytest.mark.system
def test_simulated_sensors_follow_clock_steps_without_a_backlog_or_a_silence(make_gateway,
                                                                             clock):
    gw = make_gateway(sensors=SIM_SENSORS, model={"enabled": False}, env=clock.env()).start()
    wait_for(lambda: gw.records() > 100, 60, "readings journaled")
    for step in STEPS_S:
        clock.jump(step)
        wait_for(lambda: stamped_on(gw, "imu0", clock.offset_s), 30,
                 f"readings stamped on the clock stepped by {step:+d} s")
        records, since = gw.records(), time.monotonic()
        wait_for(lambda r=records: gw.records() > r + 3 * SIM_RATE_HZ, 30,
                 f"journaling to go on after the step of {step:+d} s")
        grown, elapsed = gw.records() - records, time.monotonic() - since
        # At their rate, not a backlog of the time the clock skipped.
        assert grown < 3 * SIM_RATE_HZ * (elapsed + 5), (step, grown, elapsed)
    assert total_restarts(gw) == 0, gw.gateway_log()[-3000:]


# ---- the disk ---------------------------------------------------------------------------------

DISK_MB = 48
DISK_SENSORS = [
    {"id": "imu0", "kind": "imu", "rate_hz": 500, "seed": 1, "batch_max_age_s": 0.05},
    {"id": "gps0", "kind": "gps", "rate_hz": 5, "seed": 2, "batch_max_age_s": 0.05},
]
#: Larger than the disk: the disk fills before the journal's budget refuses anything.
BUDGET_BYTES = 1 << 30


def small_data_disk(tmp_path) -> SmallDisk:
    """A real tmpfs as the data dir of ``make_gateway``'s gateway (subdir "gw")."""
    try:
        return SmallDisk(tmp_path / "gw" / "data", DISK_MB)
    except DiskError as exc:
        pytest.skip(str(exc))


def figures(gw, name: str) -> dict:
    return gw.node(name)["figures"]


def sensor_figures(gw) -> dict[str, dict]:
    return {n: node["figures"] for n, node in gw.nodes().items()
            if n in {f"sensor:{s['id']}" for s in DISK_SENSORS}}


@pytest.mark.system
def test_a_full_disk_holds_readings_until_freed_and_loses_none(make_gateway, tmp_path):
    with small_data_disk(tmp_path) as disk:
        gw = make_gateway(sensors=DISK_SENSORS, model={"enabled": False},
                          journal={"disk_budget_bytes": BUDGET_BYTES})
        try:
            gw.start()
            wait_for(lambda: gw.records() > 500, 60, "readings journaled")
            disk.fill(leave_bytes=2 << 20)  # the sensors take the last 2 MiB
            wait_for(lambda: all(f["refused_disk_full"] > 3 for f in sensor_figures(gw).values()),
                     60, "every sensor's appends refused as disk_full")
            # Full: the sensors hold their readings, the gateway answers, nothing restarts.
            full_at = gw.records()
            wait_for(lambda: figures(gw, "journal")["refused"] > 50, 60, "refusals to go on")
            assert gw.records() == full_at
            assert all(f["unacked_batches"] > 0 for f in sensor_figures(gw).values())
            assert total_restarts(gw) == 0 and gw.all_running()
            assert disk.usage().free < 64 << 10

            disk.free()
            wait_for(lambda: gw.records() > full_at + 3000, 60, "journaling to resume")
            wait_for(lambda: all(f["unacked_batches"] <= 2 for f in sensor_figures(gw).values()),
                     60, "the held readings to be journaled")
            assert total_restarts(gw) == 0
            assert gw.terminate() == 0, gw.output()[-3000:]
            log = gw.gateway_log()
            # Checked while the disk is still mounted.
            assert "journal refused a batch (disk_full" in log
            assert seq_is_gapless(gw.journal_path)  # I2
            assert_each_reading_once_and_none_missing(
                gw.journal_path, {s["id"]: s["rate_hz"] for s in DISK_SENSORS})
            verify = gw.cli("journal", "verify", "--db", gw.journal_path)
            assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stdout
        finally:
            gw.stop()


@pytest.mark.system
def test_a_gateway_restarted_on_a_full_disk_runs_without_a_crash_loop(make_gateway, tmp_path):
    """The service manager restarts a gateway whose disk is full: it starts, refuses appends
    as disk_full, restarts nothing (no crash loop escalating to the top) and resumes once
    space is freed, its seqs gapless across both runs (I2)."""
    with small_data_disk(tmp_path) as disk:
        gw = make_gateway(sensors=DISK_SENSORS[:1], model={"enabled": False},
                          journal={"disk_budget_bytes": BUDGET_BYTES})
        try:
            gw.start()
            disk.fill()
            wait_for(lambda: figures(gw, "journal")["refused"] > 3, 60, "disk_full refusals")
            assert gw.terminate() == 0, gw.output()[-3000:]  # an orderly stop, disk full
            # ... in which a journal consumer whose commit is refused for the full disk
            # stops at once (its work is redone from its durable cursor), not killed late.
            assert "did not stop within" not in gw.gateway_log()

            gw.start()
            full_at = gw.records()
            wait_for(lambda: figures(gw, "journal")["refused"] > 20, 60,
                     "disk_full refusals after the restart")
            assert gw.records() == full_at
            assert total_restarts(gw) == 0 and gw.all_running()
            disk.free()
            wait_for(lambda: gw.records() > full_at + 2000, 60, "journaling to resume")
            assert total_restarts(gw) == 0
            assert gw.terminate() == 0, gw.output()[-3000:]
            assert seq_is_gapless(gw.journal_path)
        finally:
            gw.stop()


@pytest.mark.system
def test_a_full_disk_under_the_run_output_does_not_stop_the_gateway(make_gateway, tmp_path):
    with small_data_disk(tmp_path) as disk:
        gw = make_gateway(sensors=DISK_SENSORS[1:], model={"enabled": False},
                          journal={"disk_budget_bytes": BUDGET_BYTES})
        gw.output_path = os.path.join(disk.directory, "run.out")  # e.g. `fleetgw run >> ...`
        try:
            gw.start()
            disk.fill()
            sizes: list[int] = []

            def output_stopped_growing() -> bool:
                sizes.append(os.path.getsize(gw.output_path))
                return len(sizes) > 30 and sizes[-1] == sizes[-30]  # 3 s without a line

            wait_for(output_stopped_growing, 90, "the status lines to stop fitting on the disk",
                     interval_s=0.1)
            assert gw.proc.poll() is None, "the run process exited"
            assert gw.all_running()
            disk.free()
            wait_for(lambda: os.path.getsize(gw.output_path) > sizes[-1], 30,
                     "status lines once there is room again")
        finally:
            gw.stop()


# ---- the journal itself on a full disk (no gateway) ----------------------------------------

def test_a_checkpoint_failing_after_commit_on_a_full_disk_is_not_a_refusal(tmp_path):
    """After COMMIT returned, the journal may truncate an oversized WAL: a checkpoint that
    copies new pages into the database file, which a full disk refuses. That failure must not
    turn the committed append into a `disk_full` refusal ("nothing of this batch was
    written"), nor leave the journal's last position behind (the next append then crashed on
    a UNIQUE position)."""
    from actors.journal import Journal
    from messages.journal import Appended, BatchId, Position
    from tests.journal import make_batch, stored_markers

    try:
        disk = SmallDisk(tmp_path / "disk", 4)
    except DiskError as exc:
        pytest.skip(str(exc))
    with disk:
        path = os.path.join(disk.directory, "journal.db")
        with Journal(path, synchronous="NORMAL", disk_budget_bytes=BUDGET_BYTES) as journal:

            def append(no: int):
                batch = make_batch("imu-1", ["veh-1"] * 100, f"b{no}")
                return journal.append(BatchId("imu-1", 1, no), batch)

            # A large WAL (no automatic checkpoints), checkpointed but not truncated: the
            # next commit's frames reuse its space, while copying them into the database file
            # needs new space.
            journal._conn.pragma("wal_autocheckpoint", 0)
            assert all(isinstance(append(no), Appended) for no in range(1, 41))
            journal._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            disk.fill()
            journal._wal_reserve = 0  # every commit tries to truncate the WAL
            reply = append(41)
            assert isinstance(reply, Appended) and not reply.duplicate, reply
            assert journal.last_position() == Position(4100)
            # The next append (full disk or not) is answered, not a crash.
            reply = append(42)
            assert isinstance(reply, Appended) or reply.reason == "disk_full", reply
            acked = set(range(1, 42)) | ({42} if isinstance(reply, Appended) else set())
            disk.free()
            assert isinstance(append(43), Appended)
            acked.add(43)
            assert journal.verify().ok
        assert stored_markers(path) == {f"b{no}": 100 for no in sorted(acked)}
