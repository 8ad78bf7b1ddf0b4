"""The link policy: budgets in bytes, P1's reserve, sync windows, backoff, failure verdicts —
driven by an injected clock, no network."""

from __future__ import annotations

import random

import pytest

from actors.uplink.link import (
    LATER,
    RETRY,
    SPLIT,
    Backoff,
    LinkBudget,
    LinkClass,
    SyncWindows,
    TokenBucket,
    classify,
    parse_window,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_holds_the_average_rate_and_lets_a_large_batch_go_in_debt():
    bucket = TokenBucket(rate=1000, burst=2000, now=0.0)
    assert bucket.wait_s(1500, 0.0) == 0
    bucket.take(1500, 0.0)
    assert bucket.wait_s(1500, 0.0) == pytest.approx(1.0)
    # A batch of 5000 (above the burst) waits for a full bucket, then leaves it in debt.
    assert bucket.wait_s(5000, 1.5) == pytest.approx(0.0)
    bucket.take(5000, 1.5)
    assert bucket.wait_s(100, 1.5) == pytest.approx(3.1)
    sent, now = 0, 10.0
    for _ in range(200):  # steady state: 100 s of 500-byte batches as fast as allowed
        now += bucket.wait_s(500, now)
        bucket.take(500, now)
        sent += 500
    assert sent / (now - 10.0) == pytest.approx(1000, rel=0.05)


def test_unlimited_bucket_never_waits():
    assert TokenBucket(rate=0, burst=0, now=0).wait_s(10**9, 0) == 0


def test_p1_has_its_own_budget_and_never_waits_behind_a_metrics_backlog():
    clock = Clock()
    budget = LinkBudget([LinkClass("cellular", 1000, 1000, metered=True),
                         LinkClass("wifi", 10_000, 10_000)],
                        p1_rate_bytes_s=500, p1_burst_bytes=5000, clock=clock)
    budget.spend("wifi", "P3", 50_000)  # deep in debt
    assert budget.wait_s("wifi", "P3", 1000) > 4
    assert budget.wait_s("wifi", "P1", 1000) == 0
    assert budget.allowed("cellular", "P3") == "P3 does not use metered link cellular"
    assert budget.allowed("cellular", "P1") is None
    assert budget.allowed("satellite", "P1") == "unknown link class 'satellite'"


@pytest.mark.parametrize(("windows", "minute", "lane", "open_"), [
    ([], 600, "P3", True),
    (["22:00-06:00"], 23 * 60, "P3", True),
    (["22:00-06:00"], 5 * 60 + 59, "P2", True),
    (["22:00-06:00"], 6 * 60, "P3", False),
    (["22:00-06:00"], 12 * 60, "P1", True),
    (["01:00-02:00", "13:30-14:00"], 13 * 60 + 45, "P3", True),
    (["00:00-24:00"], 0, "P3", True),
])
def test_sync_windows_gate_p2_and_p3_but_never_p1(windows, minute, lane, open_):
    assert SyncWindows(windows).open(lane, 20_000 * 86_400 + minute * 60) is open_


@pytest.mark.parametrize("text", ["25:00-01:00", "10:00", "10:00-10:00", "a-b", "10:60-11:00"])
def test_a_bad_sync_window_says_the_expected_form(text):
    with pytest.raises(ValueError, match="HH:MM-HH:MM|empty"):
        parse_window(text)


def test_backoff_is_decorrelated_jitter_within_bounds_and_resets():
    backoff = Backoff(0.5, 30.0, random.Random(7))
    delays = [backoff.next_s() for _ in range(50)]
    assert all(0.5 <= d <= 30.0 for d in delays)
    assert max(delays) > 10  # it grows
    assert len(set(delays)) > 40  # jittered, not a fixed ladder
    backoff.reset()
    assert backoff.next_s() <= 1.5


@pytest.mark.parametrize(("status", "action"), [
    (None, RETRY), (500, RETRY), (503, RETRY), (429, RETRY),
    (413, SPLIT), (401, LATER), (403, LATER), (400, LATER), (415, LATER), (302, LATER),
])
def test_every_failure_has_a_verdict_and_none_drops_data(status, action):
    verdict = classify(status, "connection refused")
    assert verdict.action == action and verdict.reason
