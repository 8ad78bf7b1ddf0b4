"""The rules of `fleetgw health` (tools/health_checks.py), on hand-built trees: what fails each
check and what does not. The system tests (tests/system/test_health.py) run them on real
gateways."""

from __future__ import annotations

from typing import Any

import pytest

from messages.health import ModelSelfTested
from tools.health_checks import (
    MIB,
    Limits,
    actors_down,
    check_actors,
    check_backlog,
    check_journal,
    check_model,
    check_sync,
    check_version,
)

EXPECTED = ("journal", "sensors", "sensor:imu0", "sensor:gps0", "uplink")


def node(name: str, state: str = "running", restarts: int = 0, pid: int | None = 100,
         silent_s: float | None = 0.2, children: tuple = (), **figures: Any) -> dict:
    return {"name": name, "cls": "X", "pid": pid, "state": state, "restarts": restarts,
            "last_exit": None, "uptime_s": 10.0, "figures": figures,
            "children": list(children), "silent_s": silent_s}


def tree(journal: dict | None = None, imu: dict | None = None, gps: dict | None = None,
         uplink: dict | None = None) -> dict:
    sensors = node("sensors", children=tuple(
        n for n in (imu or node("sensor:imu0", unacked_batches=0),
                    gps or node("sensor:gps0", unacked_batches=0)) if n))
    children = [journal or node("journal", appended=100, refused=0, last_commit_age_s=0.1),
                sensors, uplink or node("uplink", acked=3, pending=0, failures=0)]
    return node("gateway", children=tuple(c for c in children if c))


# ---- actors --------------------------------------------------------------------------------

def test_every_expected_actor_running_and_answering_is_up():
    check = check_actors(tree(), tree(), EXPECTED, 0.5)
    assert check.ok and check.reason == "5/5 running, restarts total 0"


@pytest.mark.parametrize(("gps", "why"), [
    (node("sensor:gps0", state="backing_off", restarts=4), "backing_off"),
    (node("sensor:gps0", pid=None), "without a process id"),
    (node("sensor:gps0", silent_s=9.5), "no heartbeat answer for 9.5s"),
])
def test_an_actor_not_running_or_silent_is_down_and_named(gps, why):
    check = check_actors(tree(gps=gps), tree(), EXPECTED, 0.5)
    assert not check.ok
    (down,) = check.figures["down"]
    assert down["name"] == "sensor:gps0" and why in down["why"]
    assert "sensor:gps0" in check.reason


def test_a_missing_actor_is_down():
    broken = tree()
    broken["children"][1]["children"].pop()  # no sensor:gps0 at all
    assert actors_down(broken, EXPECTED) == [
        {"name": "sensor:gps0", "state": "missing", "restarts": None,
         "why": "not in the live tree"}]


def test_an_actor_restarted_between_the_two_looks_is_down_even_if_running_now():
    check = check_actors(tree(gps=node("sensor:gps0", restarts=3)),
                         tree(gps=node("sensor:gps0", restarts=2)), EXPECTED, 0.5)
    assert not check.ok and "restarted 1 time(s) while checked" in check.reason
    assert "[restarts 3]" in check.reason


def test_silence_below_the_limit_and_old_restarts_are_fine():
    gps = node("sensor:gps0", restarts=2, silent_s=2.9)
    assert check_actors(tree(gps=gps), tree(gps=gps), EXPECTED, 0.5).ok  # limit 3 s


# ---- journal_writable ----------------------------------------------------------------------

def journal(appended: int, refused: int, last_commit: float | None = 0.1, pid: int = 100,
            state: str = "running") -> dict:
    return node("journal", pid=pid, state=state, appended=appended, refused=refused,
                last_commit_age_s=last_commit, usage_bytes=1 << 20)


def check_j(now: dict, before: dict, free: int | None = 1 << 30, **limits) -> Any:
    return check_journal(now, before, 1.7, free, 1 << 30, Limits(**limits))


def test_a_committing_journal_is_writable():
    check = check_j(tree(journal(250, 0)), tree(journal(100, 0)))
    assert check.ok and check.reason.startswith("committing: +150 records in 1.7s")


def test_a_journal_that_refuses_and_commits_nothing_is_not_writable_with_the_reasons():
    imu_before = node("sensor:imu0", unacked_batches=1, refused_disk_full=2)
    imu_now = node("sensor:imu0", unacked_batches=2, refused_disk_full=5)
    check = check_j(tree(journal(100, 9, 4.0), imu=imu_now),
                    tree(journal(100, 6, 2.0), imu=imu_before))
    assert not check.ok
    assert check.reason == "refusing appends: 3 refused, none committed in 1.7s (disk_full 3)"


def test_a_journal_that_neither_commits_nor_refuses_while_sensors_wait_is_stalled():
    imu = node("sensor:imu0", unacked_batches=4)
    check = check_j(tree(journal(100, 0, 45.0), imu=imu), tree(journal(100, 0, 43.0), imu=imu))
    assert not check.ok and "no commit for 45s while sensors hold 4" in check.reason


def test_an_idle_journal_with_nothing_waiting_is_writable():
    check = check_j(tree(journal(100, 0, 600.0)), tree(journal(100, 0, 598.0)))
    assert check.ok and check.reason.startswith("idle: nothing to append (last commit 600s")


def test_too_little_free_space_fails_even_while_committing():
    check = check_j(tree(journal(250, 0)), tree(journal(100, 0)), free=4 * MIB)
    assert not check.ok and check.reason == ("4.0 MiB free on the data dir's filesystem "
                                             "(needs 16 MiB)")
    assert check_j(tree(journal(250, 0)), tree(journal(100, 0)), free=4 * MIB,
                   min_free_bytes=MIB).ok


@pytest.mark.parametrize(("now", "reason"), [
    (journal(100, 0, state="restarting"), "the journal actor is restarting"),
    (journal(5, 0, pid=200), "the journal actor restarted while checked"),
])
def test_a_journal_actor_down_or_restarted_is_not_writable(now, reason):
    check = check_j(tree(now), tree(journal(100, 0)))
    assert not check.ok and check.reason == reason


# ---- backlog -------------------------------------------------------------------------------

LANES = [{"lane": "unrouted", "records": 3, "bytes": 90, "oldest_age_s": 0.4},
         {"lane": "P1", "records": 0, "bytes": 0, "oldest_age_s": None},
         {"lane": "P3", "records": 900, "bytes": 9e4, "oldest_age_s": 7200.0}]


def test_the_backlog_has_no_age_limit_unless_given():
    check = check_backlog(LANES, "", Limits())
    assert check.ok and check.reason == "unrouted 3 (oldest 0s), P1 0, P3 900 (oldest 7200s)"
    assert check.figures["lanes"]["P3"] == {"records": 900, "bytes": 9e4, "oldest_age_s": 7200.0}


def test_a_lane_older_than_the_limit_fails():
    check = check_backlog(LANES, "", Limits(max_backlog_age_s=3600))
    assert not check.ok and check.reason == "older than 3600s: P3 oldest 7200s"


def test_an_unreadable_journal_fails_the_backlog():
    check = check_backlog(None, "no journal at /x/journal.db", Limits())
    assert not check.ok and "no journal at /x/journal.db" in check.reason


# ---- last_sync -----------------------------------------------------------------------------

def uplink(**figures: Any) -> dict:
    return node("uplink", **{"acked": 0, "pending": 1, "failures": 0, "last_ack_age_s": None,
                             "last_refusal_age_s": None, "waiting": "link: timeout",
                             "last_problem": "none", **figures})


def test_a_link_that_is_down_is_not_a_failure():
    check = check_sync(tree(uplink=uplink(failures=40, acked=5, last_ack_age_s=900.0)), True,
                       Limits())
    assert check.ok and check.reason.startswith("last ack 900s ago, 5 acked")


def test_require_sync_fails_until_one_batch_was_acknowledged():
    never = tree(uplink=uplink(failures=3))
    assert check_sync(never, True, Limits()).ok
    check = check_sync(never, True, Limits(require_sync=True))
    assert not check.ok and "no batch acknowledged since the uplink started" in check.reason
    assert check_sync(tree(uplink=uplink(acked=1, last_ack_age_s=2.0)), True,
                      Limits(require_sync=True)).ok


def test_central_refusing_since_the_last_ack_fails_and_an_ack_after_it_clears_it():
    refused = uplink(acked=4, last_ack_age_s=60.0, last_refusal_age_s=3.0,
                     last_problem="receiver refused the device (401)")
    check = check_sync(tree(uplink=refused), True, Limits())
    assert not check.ok and "central refuses" in check.reason and "(401)" in check.reason
    fixed = uplink(acked=5, last_ack_age_s=1.0, last_refusal_age_s=3.0)
    assert check_sync(tree(uplink=fixed), True, Limits()).ok


def test_no_uplink_is_not_configured_and_fails_only_with_require_sync():
    assert check_sync(tree(), False, Limits()).reason == "not configured"
    assert not check_sync(tree(), False, Limits(require_sync=True)).ok


# ---- model and version ---------------------------------------------------------------------

def test_model_self_test_outcomes():
    assert check_model(False, None, 15).reason == "not configured"
    assert check_model(False, None, 15).ok
    silent = check_model(True, None, 15)
    assert not silent.ok and silent.reason == "the model runner did not answer in 15s"
    failed = check_model(True, ModelSelfTested(1, ok=False, version="m1", latency_ms=3.0,
                                               vectors=8, detail="vector 'x': score is 9"), 15)
    assert not failed.ok and failed.reason == "self-test failed: vector 'x': score is 9"
    ok = check_model(True, ModelSelfTested(1, ok=True, version="m1", latency_ms=3.5,
                                           vectors=8), 15)
    assert ok.ok and ok.reason == "m1: 8 self-test vectors passed in 3.5 ms"
    assert ok.figures == {"configured": True, "version": "m1", "latency_ms": 3.5, "vectors": 8}


def test_version_check():
    assert check_version("0.2.0", "0.2.0").ok
    check = check_version("0.1.0", "0.2.0")
    assert not check.ok and "runs 0.1.0, not 0.2.0" in check.reason
