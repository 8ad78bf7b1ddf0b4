"""The invariant checks, judged on hand-made evidence (no gateway): each passes on good
figures, fails with the figures that break it, and says NOT CHECKED when it could not look."""

from __future__ import annotations

import attrs
import pytest

from tools.drill import checks
from tools.drill.checks import FAIL, NOT_CHECKED, PASS, run_checks
from tools.drill.evidence import (
    Evidence,
    JournalFacts,
    LoadLedger,
    SocketWatch,
    excused_windows,
    sensor_acked,
    shifted,
)
from tools.drill.loader import load_drill
from tools.drill.report import Report, render_text
from tools.drill.runner import Applied
from tools.drill.spec import InvariantsSection
from tools.harness.results import Latency, Recovery, RigResults, recoveries
from tools.harness.rig import Sample

LIMITS = InvariantsSection(check=("I1",), max_commit_pause_s=2.0, commit_pause_settle_s=1.0,
                           max_recover_s=10.0)


def results(**changes) -> RigResults:
    """A clean run: 100 records journaled, synced and in central once each."""
    base = RigResults(
        exit_status=0, drained=True, journaled=100, journal_per_device={"veh-001": 100},
        verify_problems=[], syncable=90, synced=90,
        reconciliation=[{"device_id": "veh-001", "synced": 90, "central_final": 90,
                         "central_unique": 90, "ok": True}],
        central_final=90, central_raw=90, central_unique=90, p1_latency=Latency(),
        restarts={}, events=[], commit_ages=[(1.0, 0.1), (2.0, 0.2)], foreign_writers=[],
        drops={}, quarantined={}, usage_bytes_max=1000, budget_bytes=10_000)
    return attrs.evolve(base, **changes)


def evidence(**changes) -> Evidence:
    base = Evidence(
        results=results(), journal=JournalFacts({"imu0": 80}, 100, 100, 0, 0),
        sensor_acked={"imu0": 75}, recoveries=[], excused=[],
        sockets=SocketWatch(samples=3, loopback=["tcp 127.0.0.1:4000"]), writer_checks=5)
    return attrs.evolve(base, **changes)


def ledger(acked: set[int], journaled: dict[int, int]) -> LoadLedger:
    return LoadLedger("cabin", "drill/cabin", len(acked) + 2, frozenset(acked),
                      frozenset({999}), journaled)


# ---- I1 --------------------------------------------------------------------------------------
def test_i1_passes_when_every_acknowledged_message_and_reading_is_journaled():
    check = checks.check_i1(evidence(load=ledger({1, 2, 3}, {1: 1, 2: 1, 3: 2})), LIMITS)
    assert check.status == PASS
    assert check.figures["load"]["journal_duplicates"] == 1
    assert check.figures["sensors"]["imu0"] == {"acked": 75, "journaled": 80}


def test_i1_fails_with_the_missing_count_when_an_acknowledged_message_is_not_journaled():
    check = checks.check_i1(evidence(load=ledger({1, 2, 3, 4}, {1: 1, 3: 1})), LIMITS)
    assert check.status == FAIL
    assert check.figures["load"]["missing"] == 2
    assert check.figures["load"]["first_missing"] == [2, 4]
    assert "2 of 4 messages the broker acknowledged are not in the journal" in check.explanation


def test_i1_fails_when_a_sensor_had_more_readings_acknowledged_than_the_journal_holds():
    check = checks.check_i1(evidence(sensor_acked={"imu0": 81}), LIMITS)
    assert check.status == FAIL
    assert "sensor imu0: the journal acknowledged 81 readings and holds 80" in check.explanation


def test_i1_counts_evicted_records_before_calling_a_sensor_short():
    ev = evidence(sensor_acked={"imu0": 85}, results=results(drops={"synced/P3": 5}))
    assert checks.check_i1(ev, LIMITS).status == PASS


def test_i1_is_not_checked_without_a_load_or_sensor_figures():
    assert checks.check_i1(evidence(sensor_acked={}), LIMITS).status == NOT_CHECKED


# ---- I2, I3, I4, I5 --------------------------------------------------------------------------
def test_i2_follows_the_journal_verify():
    assert checks.check_i2(evidence(), LIMITS).status == PASS
    bad = checks.check_i2(evidence(results=results(verify_problems=["I2: gap at 7"])), LIMITS)
    assert bad.status == FAIL and "gap at 7" in bad.explanation


def test_i3_fails_on_a_foreign_writer_and_is_not_checked_without_looks():
    assert checks.check_i3(evidence(), LIMITS).status == PASS
    seen = evidence(results=results(foreign_writers=[{"at_s": 3, "pids": [42]}]))
    assert checks.check_i3(seen, LIMITS).status == FAIL
    assert checks.check_i3(evidence(writer_checks=0), LIMITS).status == NOT_CHECKED


def test_i4_fails_when_records_below_the_routers_cursor_have_no_lane():
    assert checks.check_i4(evidence(), LIMITS).status == PASS
    bad = checks.check_i4(evidence(journal=JournalFacts({}, 100, 100, 3, 0)), LIMITS)
    assert bad.status == FAIL and bad.figures["unrouted_below_cursor"] == 3
    never = checks.check_i4(evidence(journal=JournalFacts({}, None, 0, 0, 0)), LIMITS)
    assert never.status == NOT_CHECKED


@pytest.mark.parametrize(("changes", "expected"), [
    ({"drained": False}, "the drain run synced 90 of 90"),
    ({"reconciliation": [{"device_id": "veh-001", "synced": 90, "central_final": 91,
                          "central_unique": 90, "ok": False}]}, "device veh-001"),
    ({"reconciliation": []}, "no device to reconcile"),
])
def test_i5_fails_on_an_undrained_or_unreconciled_device(changes, expected):
    assert checks.check_i5(evidence(), LIMITS).status == PASS
    bad = checks.check_i5(evidence(results=results(**changes)), LIMITS)
    assert bad.status == FAIL and expected in bad.explanation


# ---- I6 --------------------------------------------------------------------------------------
def test_i6_fails_on_a_commit_pause_longer_than_allowed():
    ev = evidence(results=results(commit_ages=[(1.0, 0.1), (5.0, 2.5), (6.0, 0.1)]))
    check = checks.check_i6(ev, LIMITS)
    assert check.status == FAIL
    assert check.figures["longest_commit_pause_s"] == 2.5 and check.figures["at_s"] == 5.0


def test_i6_excuses_a_pause_that_overlaps_a_fault_of_the_journal():
    ages = [(1.0, 0.1), (5.0, 2.5), (9.0, 0.3)]
    # the pause seen at 5.0 covers 2.5..5.0: it overlaps the journal's window 4.0..4.5
    ev = evidence(results=results(commit_ages=ages), excused=[(4.0, 4.5, "SIGKILL of journal")])
    check = checks.check_i6(ev, LIMITS)
    assert check.status == PASS
    assert check.figures["longest_commit_pause_s"] == 0.3
    assert check.figures["longest_including_excused_s"] == 2.5
    assert check.figures["samples_excused"] == 1


def test_i6_is_not_checked_without_a_sample_outside_excused_windows():
    ev = evidence(results=results(commit_ages=[(5.0, 1.0)]), excused=[(0.0, 10.0, "power")])
    assert checks.check_i6(ev, LIMITS).status == NOT_CHECKED


# ---- I7 --------------------------------------------------------------------------------------
def test_i7_fails_over_budget_or_when_unsynced_p1_was_evicted():
    assert checks.check_i7(evidence(), LIMITS).status == PASS
    over = checks.check_i7(evidence(results=results(usage_bytes_max=10_001)), LIMITS)
    assert over.status == FAIL and "over its budget of 10000" in over.explanation
    p1 = checks.check_i7(evidence(journal=JournalFacts({}, 1, 1, 0, 4)), LIMITS)
    assert p1.status == FAIL and "unsynced P1 evicted: 4 seqs" in p1.explanation
    drops = checks.check_i7(evidence(results=results(drops={"oldest_p2/P1": 1})), LIMITS)
    assert drops.status == FAIL
    synced = checks.check_i7(evidence(results=results(drops={"synced/P1": 9})), LIMITS)
    assert synced.status == PASS and synced.figures["evicted"] == 9


# ---- I8 --------------------------------------------------------------------------------------
def flooded(quarantined: dict[str, int], restarts: dict[str, int] | None = None,
            **changes) -> Evidence:
    return evidence(results=results(quarantined=quarantined, restarts=restarts or {}),
                    floods={"cabin": ("mqtt", 2000), "gnss0": ("nmea", 2000)}, **changes)


def test_i8_passes_when_floods_are_quarantined_and_no_sensor_restarted():
    check = checks.check_i8(flooded({"cabin": 2000, "gnss0": 1500}), LIMITS)
    assert check.status == PASS
    assert check.figures["gnss0"]["quarantined"] == 1500


@pytest.mark.parametrize(("quarantined", "restarts", "expected"), [
    ({"cabin": 1999, "gnss0": 5}, {}, "2000 malformed messages acknowledged by the broker, "
                                      "1999 quarantined"),
    ({"cabin": 2000}, {}, "none of 2000 malformed datagrams quarantined"),
    ({"cabin": 2000, "gnss0": 9}, {"sensor:gnss0": 1}, "sensor gnss0 restarted 1 times"),
])
def test_i8_fails_on_unquarantined_input_or_a_restart(quarantined, restarts, expected):
    check = checks.check_i8(flooded(quarantined, restarts), LIMITS)
    assert check.status == FAIL and expected in check.explanation


def test_i8_does_not_blame_the_flood_for_restarts_the_drill_caused():
    ev = flooded({"cabin": 2000, "gnss0": 9}, {"sensor:gnss0": 1}, hits={"sensor:gnss0": 1})
    assert checks.check_i8(ev, LIMITS).status == PASS


def test_i8_fails_when_the_good_load_lost_acknowledged_messages():
    ev = flooded({"cabin": 2000, "gnss0": 9}, load=ledger({1, 2}, {1: 1}))
    check = checks.check_i8(ev, LIMITS)
    assert check.status == FAIL and "good data lost" in check.explanation


def test_i8_is_not_checked_without_a_flood():
    assert checks.check_i8(evidence(), LIMITS).status == NOT_CHECKED


# ---- I9 --------------------------------------------------------------------------------------
def test_i9_fails_on_a_socket_beyond_loopback_or_a_connection_out():
    assert checks.check_i9(evidence(), LIMITS).status == PASS
    exposed = SocketWatch(samples=2, exposed=[{"pid": 1, "process": "router",
                                               "address": "tcp 0.0.0.0:5000"}])
    assert checks.check_i9(evidence(sockets=exposed), LIMITS).status == FAIL
    out = SocketWatch(samples=2, outbound=[{"pid": 1, "process": "uplink",
                                            "remote": "tcp 8.8.8.8:443"}])
    check = checks.check_i9(evidence(sockets=out), LIMITS)
    assert check.status == FAIL and "8.8.8.8" in check.explanation
    configured = SocketWatch(samples=2, configured=["udp 0.0.0.0:43119"])
    assert checks.check_i9(evidence(sockets=configured), LIMITS).status == PASS
    assert checks.check_i9(evidence(sockets=SocketWatch()), LIMITS).status == NOT_CHECKED


# ---- recovery --------------------------------------------------------------------------------
def test_recovery_fails_when_an_actor_ran_again_too_late_or_stayed_down():
    fine = [Recovery("router", "SIGKILL", 1.0, 0.8, "recovered", 2.0),
            Recovery("model", "exception", 3.0, None, "kept running", 9.0)]
    assert checks.check_recovery(evidence(recoveries=fine), LIMITS).status == PASS
    late = [Recovery("router", "SIGKILL", 1.0, 12.0, "recovered", 13.0)]
    assert checks.check_recovery(evidence(recoveries=late), LIMITS).status == FAIL
    down = [Recovery("journal", "SIGKILL", 1.0, None, "not running", 15.0)]
    check = checks.check_recovery(evidence(recoveries=down), LIMITS)
    assert check.status == FAIL and "journal still not running 14s after SIGKILL" in \
        check.explanation
    # down at the last look, but that look came before the deadline: not judged
    early = [Recovery("journal", "SIGKILL", 1.0, None, "not running", 4.0)]
    assert checks.check_recovery(evidence(recoveries=early), LIMITS).status == PASS


def test_run_checks_follows_the_drills_list_and_adds_recovery_when_asked():
    limits = attrs.evolve(LIMITS, check=("I5", "I2"))
    assert [c.invariant for c in run_checks(evidence(), limits)] == ["I5", "I2", "recovery"]
    limits = attrs.evolve(limits, max_recover_s=None)
    assert [c.invariant for c in run_checks(evidence(), limits)] == ["I5", "I2"]


# ---- evidence from samples and events --------------------------------------------------------
def tree(**actors: tuple[int | None, str, int, int]) -> dict:
    """A tree: actor name -> (pid, state, restarts, acked_readings)."""
    children = [{"name": name, "pid": pid, "state": state, "restarts": restarts,
                 "figures": {"acked_readings": acked}, "children": []}
                for name, (pid, state, restarts, acked) in actors.items()]
    return {"name": "gateway", "pid": 1, "state": "running", "restarts": 0, "figures": {},
            "children": children}


def test_sensor_acked_sums_the_last_figure_of_each_incarnation():
    samples = [Sample(1.0, tree(**{"sensor:imu0": (10, "running", 0, 40)})),
               Sample(2.0, tree(**{"sensor:imu0": (10, "running", 0, 55)})),
               Sample(3.0, tree(**{"sensor:imu0": (11, "running", 1, 7)}))]
    assert sensor_acked(samples) == {"imu0": 62}


def test_recoveries_time_each_hit_actor_until_it_runs_as_a_new_process():
    samples = [Sample(0.5, tree(router=(10, "running", 0, 0), model=(20, "running", 0, 0))),
               Sample(1.5, tree(router=(None, "restarting", 0, 0),
                                model=(20, "running", 0, 0))),
               Sample(2.5, tree(router=(12, "running", 1, 0), model=(20, "running", 0, 0)))]
    events = [{"kind": "SIGKILL", "target": "router", "at_s": 1.0, "pid": 10},
              {"kind": "exception", "target": "model", "at_s": 1.0, "pid": 20},
              {"kind": "link_cut", "target": "link", "at_s": 1.0, "pid": None},
              {"kind": "power_cut", "target": "gateway", "at_s": 2.0, "recovered_s": 3.5,
               "ended_s": 6.0}]
    found = {r.target: r for r in recoveries(events, samples)}
    assert (found["router"].outcome, found["router"].recovered_s) == ("recovered", 1.5)
    assert (found["model"].outcome, found["model"].recovered_s) == ("kept running", None)
    assert found["gateway"].recovered_s == 3.5
    assert "link" not in found


def test_excused_windows_cover_faults_that_stop_commits_until_they_ended_plus_settle():
    events = [{"kind": "SIGKILL", "target": "journal", "at_s": 2.0, "ended_s": 2.0},
              {"kind": "disk_full", "target": "disk", "at_s": 5.0, "ended_s": 9.0},
              {"kind": "disk_full", "target": "disk", "at_s": 12.0, "ended_s": None},
              {"kind": "SIGKILL", "target": "router", "at_s": 3.0, "ended_s": 3.0}]
    found = [Recovery("journal", "SIGKILL", 2.0, 1.5, "recovered", 4.0)]
    assert excused_windows(events, found, settle_s=1.0) == [
        (2.0, 4.5, "SIGKILL of journal"), (5.0, 10.0, "disk_full of disk"),
        (12.0, float("inf"), "disk_full of disk")]


def test_shifted_results_count_time_from_the_drills_start():
    res = results(events=[{"kind": "SIGKILL", "target": "router", "at_s": 12.5,
                           "ended_s": 12.5, "recovered_s": 1.0}],
                  commit_ages=[(11.0, 0.2)], foreign_writers=[{"at_s": 15.0, "pids": [3]}])
    moved = shifted(res, 10.0)
    assert moved.events[0]["at_s"] == 2.5 and moved.events[0]["recovered_s"] == 1.0
    assert moved.commit_ages == [(1.0, 0.2)] and moved.foreign_writers[0]["at_s"] == 5.0


# ---- the report ------------------------------------------------------------------------------
def test_the_report_exits_1_on_a_violation_or_a_problem_and_0_otherwise():
    drill = load_drill("drills/kill_storm.toml")
    ev = evidence(load=ledger({1, 2}, {1: 1}))
    failing = run_checks(ev, attrs.evolve(LIMITS, check=("I1", "I2")))
    applied = [Applied(2.0, 2.1, "kill", "journal", True, "SIGKILL pid 5"),
               Applied(4.0, 4.0, "kill", "sensors", False, "not applied: restarting")]
    report = Report(drill, True, 22.0, failing, applied, [], ev.results, ev, 40.0)
    assert report.exit_status == 1 and report.violations == ["I1"]
    text = render_text(report)
    assert "I1       FAIL" in text and "not applied: restarting" in text
    assert text.endswith("RESULT FAIL: I1")
    data = report.to_json()
    assert data["violations"] == ["I1"] and data["figures"]["acknowledged"]["load_messages"] == 2
    passing = Report(drill, True, 22.0, run_checks(evidence(), LIMITS), applied, [],
                     ev.results, evidence(), 40.0)
    assert passing.exit_status == 0
    assert render_text(passing).endswith("RESULT PASS: every checked invariant holds")
    stuck = attrs.evolve(passing, problems=["the gateway was not running at the end"])
    assert stuck.exit_status == 1 and "PROBLEMS" in render_text(stuck)
    assert attrs.evolve(passing, checks=[]).exit_status == 1
