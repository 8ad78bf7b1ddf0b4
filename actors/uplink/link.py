"""The link policy: when, how fast and after which failure the uplink may send.

Where this sits on the data path: step 6, between a batch that is ready and the POST. Pure
functions and small classes with an injectable clock, so tests drive them without a network:

- `TokenBucket`: bytes/s with a burst; a batch larger than the burst goes when the bucket is
  full and leaves it in debt, so every batch eventually goes and the average rate holds.
- `LinkBudget`: one bucket per link class for P2/P3 and a separate, reserved one for P1, so a
  safety event never waits behind a metrics backlog.
- `SyncWindows`: daily UTC windows (``"22:00-06:00"``) outside which only P1 is sent.
- `Backoff`: decorrelated jitter (sleep = min(cap, uniform(base, 3 * previous))), reset by a
  success.
- `classify`: an HTTP status or transport error -> retry soon, retry later (the receiver
  refused us: maybe this device is not registered yet), or split (too large); nothing is ever
  dropped: the journal keeps what is not acknowledged.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable

import attrs

P1 = "P1"
#: Seconds in a day (windows are minutes of the UTC day).
DAY_S = 86_400
WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


class TokenBucket:
    """``rate`` bytes/s, at most ``burst`` bytes saved up. ``rate`` 0 means unlimited."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def wait_s(self, nbytes: int, now: float) -> float:
        """Seconds until ``nbytes`` may go (0: now). A batch above the burst waits for a full
        bucket."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        need = min(nbytes, self.burst)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, nbytes: int, now: float) -> None:
        """Spend ``nbytes`` (call when `wait_s` is 0); may leave the bucket in debt."""
        if self.rate > 0:
            self._refill(now)
            self.tokens -= nbytes


@attrs.frozen
class LinkClass:
    """A kind of link (e.g. wifi, cellular): its byte rate for P2/P3, and whether it is
    metered (metered links carry only P1 unless ``metered_lanes`` allows more)."""

    name: str
    rate_bytes_s: float
    burst_bytes: float
    metered: bool = False


class LinkBudget:
    """Byte budgets per link class plus P1's reserved budget."""

    def __init__(self, classes: Iterable[LinkClass], p1_rate_bytes_s: float,
                 p1_burst_bytes: float, metered_lanes: Iterable[str] = (P1,),
                 clock: Callable[[], float] | None = None) -> None:
        self.clock = clock or time.monotonic
        now = self.clock()
        self.classes = {c.name: c for c in classes}
        self.buckets = {c.name: TokenBucket(c.rate_bytes_s, c.burst_bytes, now)
                        for c in self.classes.values()}
        self.p1 = TokenBucket(p1_rate_bytes_s, p1_burst_bytes, now)
        self.metered_lanes = frozenset(metered_lanes) | {P1}

    def allowed(self, link: str, lane: str) -> str | None:
        """Why ``lane`` may not use ``link`` now (None: it may)."""
        cls = self.classes.get(link)
        if cls is None:
            return f"unknown link class {link!r}"
        if cls.metered and lane not in self.metered_lanes:
            return f"{lane} does not use metered link {link}"
        return None

    def wait_s(self, link: str, lane: str, nbytes: int) -> float:
        bucket = self.p1 if lane == P1 else self.buckets[link]
        return bucket.wait_s(nbytes, self.clock())

    def spend(self, link: str, lane: str, nbytes: int) -> None:
        bucket = self.p1 if lane == P1 else self.buckets[link]
        bucket.take(nbytes, self.clock())


def parse_window(text: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` (UTC) as minutes of the day [start, end); may wrap past midnight.
    Raises ValueError saying the expected form."""
    m = WINDOW_RE.match(text.strip())
    if not m:
        raise ValueError(f"sync window {text!r} is not HH:MM-HH:MM (UTC, e.g. 22:00-06:00)")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if end > 24 * 60 or start == end:
        raise ValueError(f"sync window {text!r} is empty or ends after 24:00")
    return start, end


class SyncWindows:
    """When P2/P3 may sync (P1 always may). No windows: always."""

    def __init__(self, windows: Iterable[str] = ()) -> None:
        self.windows = [parse_window(w) for w in windows]

    def open(self, lane: str, wall_s: float) -> bool:
        if lane == P1 or not self.windows:
            return True
        minute = int(wall_s % DAY_S) // 60
        return any(s <= minute < e if s < e else minute >= s or minute < e
                   for s, e in self.windows)


class Backoff:
    """Decorrelated jitter between ``base_s`` and ``cap_s`` (seeded for tests)."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self.rng = rng or random.Random()
        self.previous = 0.0
        self.failures = 0

    def next_s(self) -> float:
        """The delay after one more failure."""
        self.failures += 1
        upper = max(self.base_s, self.previous * 3)
        self.previous = min(self.cap_s, self.rng.uniform(self.base_s, upper))
        return self.previous

    def reset(self) -> None:
        self.previous = 0.0
        self.failures = 0


@attrs.frozen(slots=True)
class Verdict:
    """What to do after a failed send: ``action`` is "retry" (transient: backoff), "later"
    (refused by the receiver: long backoff, operator attention), or "split" (too large:
    send it in halves); ``reason`` is for the log and the metrics."""

    action: str
    reason: str


RETRY, LATER, SPLIT = "retry", "later", "split"


def classify(status: int | None, error: str | None = None) -> Verdict:
    """The verdict for an HTTP ``status`` (None: no HTTP answer, ``error`` says why)."""
    if status is None:
        return Verdict(RETRY, f"link: {error or 'no answer'}")
    if status == 413:
        return Verdict(SPLIT, "receiver: batch too large")
    if status in (401, 403):
        return Verdict(LATER, f"receiver refused the device ({status}): check its key "
                              "registration (fleetgw provision device)")
    if status in (400, 415, 422):
        return Verdict(LATER, f"receiver refused the batch ({status})")
    if status == 429 or status >= 500:
        return Verdict(RETRY, f"receiver unavailable ({status})")
    return Verdict(LATER, f"unexpected status {status}")
