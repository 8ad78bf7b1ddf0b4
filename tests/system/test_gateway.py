"""The gateway spine end to end: real `fleetgw run` processes, real faults.

Each test names the promise it checks. Gateways run with fault injection enabled and are
always torn down with nothing left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from supervisors import system
from tests.system.checks import assert_each_reading_once_and_none_missing, seq_is_gapless
from tests.system.harness import ROOT, wait_for, walk

pytestmark = pytest.mark.system

RATES = {"imu0": 100, "gps0": 5, "engine0": 20}
LOAD = [
    {"id": "imu0", "kind": "imu", "rate_hz": 1000, "seed": 1},
    {"id": "imu1", "kind": "imu", "rate_hz": 1000, "seed": 2},
    {"id": "gps0", "kind": "gps", "rate_hz": 5, "seed": 3, "batch_max_age_s": 0.05},
    {"id": "engine0", "kind": "engine", "rate_hz": 100, "seed": 4},
]


def test_journal_sigkilled_under_load_loses_and_doubles_nothing(make_gateway):
    gw = make_gateway(sensors=LOAD).start()
    for _ in range(4):
        wait_for(lambda: gw.records() > 50, 30, "the journal to commit under load")
        before = gw.node("journal")
        os.kill(before["pid"], signal.SIGKILL)
        # Journaling resumes: the new incarnation commits (its own record count grows).
        wait_for(lambda b=before: (n := gw.node("journal"))["pid"] not in (None, b["pid"])
                 and n["state"] == "running" and n["figures"]["appended"] > 0, 30,
                 "the journal to be restarted and to commit again")
    journal = gw.node("journal")
    assert journal["restarts"] >= 4
    assert "SIGKILL" in (journal["last_exit"] or "")
    assert gw.terminate() == 0
    assert seq_is_gapless(gw.journal_path)
    assert_each_reading_once_and_none_missing(
        gw.journal_path, {s["id"]: s["rate_hz"] for s in LOAD})
    verify = gw.cli("journal", "verify", "--db", gw.journal_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_five_sensor_actors_sigkilled_at_once_are_all_restarted(make_gateway):
    sensors = [{"id": f"s{i}", "kind": "engine", "rate_hz": 10, "seed": i} for i in range(5)]
    gw = make_gateway(sensors=sensors).start()
    nodes = gw.nodes()
    old = {f"sensor:s{i}": nodes[f"sensor:s{i}"]["pid"] for i in range(5)}
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)

    def all_replaced():
        now = gw.nodes()
        return all(now[n]["pid"] not in (None, pid) and now[n]["state"] == "running"
                   and now[n]["restarts"] == 1 for n, pid in old.items())

    wait_for(all_replaced, 30, "all five sensors to be restarted once")
    for pid in old.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_segfault_inside_an_actor_is_detected_and_restarted(make_gateway):
    gw = make_gateway().start()
    before = gw.node("sensor:gps0")
    gw.inject("sensor:gps0", "segfault")
    wait_for(lambda: (n := gw.node("sensor:gps0"))["restarts"] == 1 and n["state"] == "running",
             30, "the segfaulted sensor to be restarted")
    after = gw.node("sensor:gps0")
    assert after["pid"] != before["pid"]
    assert "SIGSEGV" in after["last_exit"]


def test_faults_inside_actors_are_refused_unless_the_config_enables_them(make_gateway):
    gw = make_gateway(gateway={"fault_injection": False}).start()
    before = gw.node("sensor:gps0")
    code = ("import sys\nfrom tools.faults import FaultError, inject\n"
            f"try:\n    inject({gw.port}, 'sensor:gps0', 'segfault')\n"
            "except FaultError as exc:\n    sys.exit(f'refused: {exc}')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "fault injection is off" in done.stderr, done.stderr
    journaled = gw.records()
    wait_for(lambda: gw.records() > journaled + 50, 30, "journaling to go on")
    after = gw.node("sensor:gps0")
    assert (after["pid"], after["restarts"]) == (before["pid"], 0)


def test_hung_actor_is_killed_by_the_watchdog_and_restarted(make_gateway):
    gw = make_gateway(supervision={"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.5}).start()
    before = gw.node("sensor:engine0")
    gw.inject("sensor:engine0", "hang")
    wait_for(lambda: (n := gw.node("sensor:engine0"))["restarts"] == 1
             and n["state"] == "running", 30, "the hung sensor to be killed and restarted")
    after = gw.node("sensor:engine0")
    assert after["pid"] != before["pid"]
    assert "hung" in after["last_exit"]
    assert not psutil.pid_exists(before["pid"]) or \
        psutil.Process(before["pid"]).status() == "zombie"


def test_crash_loop_backs_off_then_escalates_when_intensity_is_exceeded(make_gateway):
    gw = make_gateway(supervision={"intensity": 3, "period_s": 60, "backoff_initial_s": 0.2,
                                   "backoff_max_s": 1.0, "backoff_reset_s": 30}).start()
    for expected in range(1, 4):
        gw.inject("sensor:imu0", "exit")
        wait_for(lambda e=expected: (n := gw.node("sensor:imu0"))["restarts"] == e
                 and n["state"] == "running", 30, f"restart {expected} of the crashing sensor")
    # The fourth crash within the period exceeds the intensity of 3: `sensors` gives up and
    # the root restarts it (a fresh supervisor with fresh children).
    sensors_before = gw.node("sensors")
    gw.inject("sensor:imu0", "exit")
    wait_for(lambda: (n := gw.node("sensors"))["restarts"] == 1 and n["state"] == "running"
             and gw.all_running(), 30, "the sensors supervisor to escalate and be restarted")
    sensors_after = gw.node("sensors")
    assert sensors_after["pid"] != sensors_before["pid"]
    assert "gave up" in sensors_after["last_exit"]
    log = gw.gateway_log()
    delays = [float(line.split(" in ")[1].rstrip('s"'))
              for line in log.splitlines()
              if "restarting sensor:imu0 in" in line]
    assert delays[:3] == [0.2, 0.4, 0.8], delays


def test_logger_process_killed_the_system_keeps_working(make_gateway):
    gw = make_gateway().start()
    admin_pid = system.read_state(gw.data_dir)["admin_pid"]
    actor_pids = {n["pid"] for n in walk(gw.tree())}
    loggers = [p for p in psutil.Process(admin_pid).children() if p.pid not in actor_pids]
    assert loggers, "expected the logger process among the admin's children"
    for proc in loggers:
        proc.kill()
    floor = gw.records()
    wait_for(lambda: gw.records() > floor + 100, 30, "journaling to go on without the logger")
    assert gw.all_running()
    assert gw.terminate() == 0


def test_sigterm_stops_in_order_exits_0_and_leaves_no_process(make_gateway):
    gw = make_gateway().start()
    wait_for(lambda: gw.records() > 100, 30, "some records")
    pgid = gw.pgid()
    assert gw.terminate() == 0
    assert system.group_members(pgid) == []
    assert not system.admin_listening(gw.port)
    out = gw.output()
    assert "summary" in out
    # Orderly stop: sensors drained into the journal, so every reading is there once.
    assert_each_reading_once_and_none_missing(gw.journal_path, RATES)


def test_sigkilled_run_is_followed_by_a_clean_start_on_the_same_dir_and_port(make_gateway):
    gw = make_gateway().start()
    wait_for(lambda: gw.records() > 100, 30, "some records")
    gw.proc.kill()
    gw.proc.wait()
    old_pgid = gw.pgid()
    assert system.group_members(old_pgid), "the actors outlive a SIGKILLed run process"
    before = gw.records()
    gw.start()
    assert system.group_members(old_pgid) == []
    wait_for(lambda: gw.records() > before, 30, "journaling on the same journal")
    assert gw.terminate() == 0
    assert seq_is_gapless(gw.journal_path)
    verify = gw.cli("journal", "verify", "--db", gw.journal_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_bad_config_exits_2_naming_file_key_and_problem(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[sensors]]\nid = "imu0"\nrate_hz = 0\n')
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "run", "--config", str(path),
         "--data-dir", str(tmp_path / "d")], cwd=ROOT, capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 2
    assert f"{path}: sensors[0].rate_hz: must be > 0" in result.stderr


def test_disk_budget_reached_sensors_hold_their_data_and_nothing_is_dropped(make_gateway,
                                                                           tmp_path):
    budget = 1 << 20
    # One batch in flight at a time: with several, a later (smaller) batch can be committed
    # while an earlier one waits refused, and the orderly stop then ends the sensor with that
    # one unacknowledged — a gap in the committed run, though nothing acknowledged is lost.
    sensors = [{"id": "imu0", "kind": "imu", "rate_hz": 2000, "seed": 1,
                "buffer_max_bytes": 200_000, "max_in_flight": 1}]
    # Everything raw P3, unsynced and not aggregated: nothing here may be evicted (I7), so at
    # the budget the only way is back-pressure. (Under the example policy raw IMU records are
    # aggregated and then rightly evicted, which would leave counted gaps.)
    policy = tmp_path / "keep-all.toml"
    policy.write_text('[default]\nlane = "P3"\n')
    gw = make_gateway(sensors=sensors, router={"policy": str(policy)},
                      journal={"disk_budget_bytes": budget, "refused_retry_s": 0.2}).start()
    wait_for(lambda: gw.node("journal")["figures"]["refused"] > 0, 60,
             "the journal to refuse appends at its budget")
    wait_for(lambda: gw.node("sensor:imu0")["figures"]["held"] > 0, 30,
             "the sensor to hold its source (back-pressure)")
    assert gw.node("journal")["figures"]["usage_bytes"] <= budget
    assert gw.terminate() == 0
    db = os.path.getsize(gw.journal_path)
    wal = os.path.getsize(gw.journal_path + "-wal") if os.path.exists(
        gw.journal_path + "-wal") else 0
    assert db + wal <= budget
    # Everything journaled is there once and in an unbroken run: the sensor paused, it did
    # not skip.
    assert_each_reading_once_and_none_missing(gw.journal_path, {"imu0": 2000})


def test_topology_prints_the_tree_as_text_json_dot_and_watch(make_gateway):
    gw = make_gateway().start()
    port = str(gw.port)
    text = gw.cli("topology", "--admin-port", port)
    assert text.returncode == 0, text.stderr
    for name in ("gateway", "journal", "sensors", "sensor:imu0", "sensor:gps0", "sensor:engine0"):
        assert name in text.stdout
    tree = gw.tree()
    assert tree["name"] == "gateway" and tree["cls"] == "Gateway"
    for node in walk(tree):
        assert {"name", "cls", "pid", "state", "restarts", "children"} <= node.keys()
    journal = gw.node("journal")
    assert {"records", "commits_per_s", "last_commit_age_s"} <= journal["figures"].keys()
    sensor = gw.node("sensor:imu0")
    assert {"readings_added", "unacked_batches"} <= sensor["figures"].keys()
    dot = gw.cli("topology", "--dot", "--admin-port", port)
    assert dot.stdout.startswith("digraph fleetgw {") and '"sensors" -> "sensor:imu0"' in dot.stdout
    watch = gw.cli("topology", "--watch", "--count", "2", "--interval", "0.2",
                   "--admin-port", port)
    assert watch.returncode == 0 and watch.stdout.count("sensor:gps0") == 2
    # The inspector never stops what it inspects.
    assert gw.all_running()


def test_topology_without_a_gateway_says_so_and_starts_nothing(tmp_path):
    from tests.system.harness import free_port

    port = free_port()
    result = subprocess.run([sys.executable, "-m", "tools.cli", "topology", "--admin-port",
                             str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"no gateway is running on admin port {port}" in result.stderr
    assert not system.admin_listening(port)


def test_root_giving_up_exits_the_run_process_non_zero_and_leaves_nothing(make_gateway):
    gw = make_gateway(supervision={"intensity": 2, "period_s": 60, "backoff_initial_s": 0.05,
                                   "backoff_max_s": 0.1}).start()
    pgid = gw.pgid()
    for expected in (1, 2):
        gw.inject("journal", "exit")
        wait_for(lambda e=expected: (n := gw.node("journal"))["restarts"] == e
                 and n["state"] == "running", 30, f"journal restart {expected}")
    gw.inject("journal", "exit")
    assert gw.proc.wait(60) == 1
    assert "gateway gave up" in gw.output()
    assert system.group_members(pgid) == []


def test_actor_system_death_exits_the_run_process_non_zero(make_gateway):
    gw = make_gateway().start()
    pgid = gw.pgid()
    admin_pid = system.read_state(gw.data_dir)["admin_pid"]
    os.kill(admin_pid, signal.SIGKILL)
    assert gw.proc.wait(60) == 1
    assert "actor system is not answering" in gw.output()
    assert system.group_members(pgid) == []


def test_sigkilled_sensors_supervisor_is_restarted_and_its_orphans_reaped(make_gateway):
    gw = make_gateway().start()
    nodes = gw.nodes()
    old_sensor_pids = [nodes[f"sensor:{s}"]["pid"] for s in ("imu0", "gps0", "engine0")]
    os.kill(nodes["sensors"]["pid"], signal.SIGKILL)
    wait_for(lambda: gw.node("sensors")["restarts"] == 1 and gw.all_running(), 30,
             "the sensors supervisor and its children to run again")
    wait_for(lambda: all(not psutil.pid_exists(p) or psutil.Process(p).status() == "zombie"
                         for p in old_sensor_pids), 30, "the orphaned sensors to be reaped")
    # Exactly one live instance of each sensor: nothing journals twice.
    sensor_pids = [n["pid"] for n in walk(gw.tree()) if n["name"].startswith("sensor:")]
    assert len(sensor_pids) == 3 and set(sensor_pids).isdisjoint(old_sensor_pids)
    assert gw.terminate() == 0
    assert seq_is_gapless(gw.journal_path)


def test_sigkilled_root_exits_the_run_process_non_zero_and_leaves_nothing(make_gateway):
    gw = make_gateway().start()
    pgid = gw.pgid()
    os.kill(gw.tree()["pid"], signal.SIGKILL)
    assert gw.proc.wait(90) == 1
    assert system.group_members(pgid) == []


def test_second_gateway_on_the_same_data_dir_or_port_is_refused_and_the_first_unharmed(
        make_gateway, tmp_path):
    first = make_gateway().start()
    same_dir = subprocess.run(
        [sys.executable, "-m", "tools.cli", "run", "--config", first.config_path,
         "--data-dir", first.data_dir, "--admin-port", str(first.port + 50)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert same_dir.returncode == 2
    assert f"another gateway is running on data dir {first.data_dir}" in same_dir.stderr
    same_port = subprocess.run(
        [sys.executable, "-m", "tools.cli", "run", "--config", first.config_path,
         "--data-dir", str(tmp_path / "other"), "--admin-port", str(first.port)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert same_port.returncode == 2
    assert f"admin port {first.port} is used by a running gateway" in same_port.stderr
    floor = first.records()
    wait_for(lambda: first.records() > floor, 30, "the first gateway to go on journaling")
    assert first.all_running() and first.proc.poll() is None


def test_inconsistent_supervision_settings_exit_2_before_anything_starts(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[supervision]\nheartbeat_interval_s = 6\nheartbeat_timeout_s = 5\n")
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "run", "--config", str(path),
         "--data-dir", str(tmp_path / "d"), "--admin-port", "22999"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "heartbeat_timeout_s" in result.stderr and str(path) in result.stderr
    assert not system.admin_listening(22999)


def test_topology_against_a_port_held_by_something_else_fails_with_a_message(tmp_path):
    import socket

    from tests.system.harness import free_port

    port = free_port()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(5)
        result = subprocess.run([sys.executable, "-m", "tools.cli", "topology",
                                 "--admin-port", str(port)], cwd=ROOT, capture_output=True,
                                text=True, timeout=90)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"admin port {port}" in result.stderr
