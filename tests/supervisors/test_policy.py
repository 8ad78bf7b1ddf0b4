"""Restart policy as a table: restart type x exit reason, intensity window, backoff."""

import pytest

from supervisors.policy import Backoff, RestartIntensity, should_restart
from supervisors.spec import Restart


@pytest.mark.parametrize(
    ("restart", "normal_exit", "expected"),
    [
        (Restart.PERMANENT, False, True),
        (Restart.PERMANENT, True, True),
        (Restart.TRANSIENT, False, True),
        (Restart.TRANSIENT, True, False),
        (Restart.TEMPORARY, False, False),
        (Restart.TEMPORARY, True, False),
    ],
)
def test_restart_type_by_exit_reason_table(restart, normal_exit, expected):
    assert should_restart(restart, normal_exit) is expected


def test_intensity_allows_r_restarts_within_t_then_escalates():
    window = RestartIntensity(intensity=3, period_s=10.0)
    assert window.add_restart(0.0)
    assert window.add_restart(1.0)
    assert window.add_restart(2.0)
    assert not window.add_restart(3.0)


def test_intensity_forgets_restarts_older_than_the_period():
    window = RestartIntensity(intensity=2, period_s=10.0)
    assert window.add_restart(0.0)
    assert window.add_restart(5.0)
    assert window.add_restart(10.5)  # the restart at 0.0 left the window
    assert not window.add_restart(11.0)


def test_crash_looping_child_backs_off_exponentially_up_to_the_cap():
    backoff = Backoff(initial_s=0.1, max_s=0.5, reset_s=10.0)
    delays = [backoff.delay(started_at=t, exited_at=t + 1.0) for t in range(6)]
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]


def test_child_that_ran_long_enough_restarts_at_once_and_resets_backoff():
    backoff = Backoff(initial_s=0.1, max_s=5.0, reset_s=10.0)
    assert backoff.delay(0.0, 1.0) == 0.1
    assert backoff.delay(1.0, 2.0) == 0.2
    assert backoff.delay(2.0, 30.0) == 0.0
    assert backoff.delay(30.0, 31.0) == 0.1
