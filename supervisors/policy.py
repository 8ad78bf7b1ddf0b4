"""Restart policy as pure functions and small values with an injectable clock.

The supervisor actor only feeds these exit notices and timestamps (OTP ``add_restart``):
- `should_restart`: the restart-type x exit-reason table;
- `RestartIntensity`: at most R restarts within T seconds, else escalate;
- `Backoff`: the delay before restarting a child that keeps crashing.
"""

from __future__ import annotations

from collections import deque

from supervisors.spec import Restart


def should_restart(restart: Restart, normal_exit: bool) -> bool:
    """Whether a child that exited is restarted (OTP table)."""
    if restart is Restart.PERMANENT:
        return True
    if restart is Restart.TRANSIENT:
        return not normal_exit
    return False


class RestartIntensity:
    """Counts restarts in a sliding window of ``period_s`` seconds (monotonic timestamps)."""

    def __init__(self, intensity: int, period_s: float) -> None:
        self.intensity = intensity
        self.period_s = period_s
        self._times: deque[float] = deque()

    def add_restart(self, now: float) -> bool:
        """Record a restart at ``now``; False when it exceeds the intensity (escalate)."""
        self._times.append(now)
        while self._times and self._times[0] <= now - self.period_s:
            self._times.popleft()
        return len(self._times) <= self.intensity

    def __len__(self) -> int:
        return len(self._times)


class Backoff:
    """Exponential restart delay for one child.

    A child that exits within ``reset_s`` of its (re)start is crash-looping: the delay doubles
    from ``initial_s`` up to ``max_s``. A child that ran at least ``reset_s`` restarts at once.
    """

    def __init__(self, initial_s: float, max_s: float, reset_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.reset_s = reset_s
        self._next = initial_s

    def delay(self, started_at: float, exited_at: float) -> float:
        """Delay before restarting a child started at ``started_at`` that exited at
        ``exited_at``."""
        if exited_at - started_at >= self.reset_s:
            self._next = self.initial_s
            return 0.0
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay
