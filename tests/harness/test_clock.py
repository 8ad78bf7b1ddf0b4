"""ClockControl: a child process started with its environment sees the wall clock jump, forwards
and backwards, within a second or so; its monotonic clock does not jump; this process's clock
does not move at all."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from tests.system.harness import wait_for
from tools.harness import clock
from tools.harness.clock import ClockControl, ClockControlError

DAY_S = 86400
HOUR_S = 3600
#: Seconds a child's clock reading may differ from this process's beside the jumps: the line
#: is read a little after it was printed, more so on a loaded machine.
SLACK_S = 30

_CHILD = r"""
import threading, time
while True:
    print(time.time(), time.monotonic(), flush=True)
    time.sleep(0.025)
    threading.Event().wait(0.025)
"""


class ChildClock:
    """A child Python process printing its wall and monotonic clocks every 50 ms (sleeping
    with time.sleep and with a threading wait); each line is kept with this process's clocks
    when it was read."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD], env={**os.environ, **env},
                                     stdout=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, float, float, float]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            wall, mono = map(float, line.split())
            self.lines.append((wall, mono, time.time(), time.monotonic()))

    def wall_offset_s(self) -> float | None:
        """The child's wall clock minus ours, from its latest line."""
        if not self.lines:
            return None
        wall, _, our_wall, _ = self.lines[-1]
        return wall - our_wall

    def monotonic_steps(self) -> list[float]:
        """How far the child's monotonic clock was from ours, on every line so far."""
        return [abs(mono - our_mono) for _, mono, _, our_mono in self.lines]

    def stop(self) -> None:
        """Stop it; a child that died on its own (a sleep that raised) fails the test."""
        alive = self.proc.poll() is None
        self.proc.kill()
        self.proc.wait()
        assert alive, f"the child exited with {self.proc.returncode}"


@pytest.fixture
def control(tmp_path):
    with ClockControl(tmp_path / "clock") as control:
        yield control


def offset_near(child: ChildClock, expected_s: float) -> bool:
    offset = child.wall_offset_s()
    return offset is not None and abs(offset - expected_s) < SLACK_S


def test_child_sees_the_wall_clock_jump_forwards_and_back_but_not_its_monotonic_clock(control):
    child = ChildClock(control.env())
    try:
        wait_for(lambda: offset_near(child, 0), 30, "the child's first clock reading")
        before = time.time()
        control.jump(DAY_S)
        wait_for(lambda: offset_near(child, DAY_S), 10, "the child to see the jump of +1 day")
        control.jump(-HOUR_S)
        wait_for(lambda: offset_near(child, DAY_S - HOUR_S), 10,
                 "the child to see the jump of -1 hour")
        assert control.offset_s == DAY_S - HOUR_S
        # Ours never moved (the jump is the child's alone); its monotonic clock never jumped.
        assert abs(time.time() - before) < SLACK_S
        steps = child.monotonic_steps()
        assert len(steps) > 10 and max(steps) < SLACK_S, max(steps)
    finally:
        child.stop()


def test_a_jump_is_seen_within_a_second_or_so(control):
    child = ChildClock(control.env())
    try:
        wait_for(lambda: offset_near(child, 0), 30, "the child's first clock reading")
        jumped = time.monotonic()
        control.jump(-DAY_S)
        wait_for(lambda: offset_near(child, -DAY_S), 10, "the child to see the jump of -1 day")
        # libfaketime re-reads the offset once the real second changes: the goal is
        # JUMP_SEEN_WITHIN_S; the assertion leaves room for a loaded machine.
        assert time.monotonic() - jumped < 10 * clock.JUMP_SEEN_WITHIN_S
    finally:
        child.stop()


def test_the_offset_file_holds_the_cumulative_offset(control):
    assert control.offset_s == 0
    control.jump(DAY_S)
    control.jump(-2 * HOUR_S)
    control.jump(600.5)
    assert control.offset_s == DAY_S - 2 * HOUR_S + 600.5
    with open(control.timestamp_file) as fh:
        assert fh.read() == "+79800.500000\n"
    control.jump(-DAY_S)
    with open(control.timestamp_file) as fh:
        assert fh.read() == "-6599.500000\n"


def test_env_preloads_the_multithreaded_library_and_fakes_only_the_wall_clock(control):
    env = control.env()
    assert env["LD_PRELOAD"].split()[0].endswith("/faketime/libfaketimeMT.so.1")
    assert os.path.exists(env["LD_PRELOAD"].split()[0])
    assert env["FAKETIME_DONT_FAKE_MONOTONIC"] == "1"
    assert env["FAKETIME_TIMESTAMP_FILE"] == control.timestamp_file
    assert "FAKETIME" not in env  # it would take priority over the file
    # time.sleep replaced in its processes (libfaketime 0.9.10 fails monotonic sleeps)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == control.site_dir
    assert os.path.exists(os.path.join(control.site_dir, "sitecustomize.py"))


def test_close_leaves_no_shared_objects_behind(tmp_path):
    before = set(os.listdir("/dev/shm"))
    control = ClockControl(tmp_path / "clock")
    child = ChildClock(control.env())
    try:
        wait_for(lambda: child.lines, 30, "the child's first clock reading")
    finally:
        child.stop()
    made = set(os.listdir("/dev/shm")) - before
    # Only the pair ClockControl made: the child did not create its own per-pid pair.
    assert len(made) == 2 and all("fleetgw-faketime-" in name for name in made), made
    control.close()
    control.close()  # idempotent
    assert not set(os.listdir("/dev/shm")) - before


def test_a_missing_library_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(clock, "LIBRARY_NAME", "libfaketime-absent.so.1")
    monkeypatch.setattr(clock, "LIBRARY_GLOB", "/nonexistent/*/libfaketime-absent.so.1")
    with pytest.raises(ClockControlError, match="install the Debian package libfaketime"):
        ClockControl(tmp_path / "clock")
