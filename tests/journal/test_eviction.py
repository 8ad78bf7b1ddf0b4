"""Eviction within the disk budget (I7): what goes first, what never goes, the P1 reserve, and
a long run far past the budget with a simulated router and uplink.

The stress test measures the files themselves (os.path.getsize of journal.db and its WAL), not
the journal's own estimate.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import apsw
import pytest

from actors.journal import Journal
from actors.journal.journal import EVICTION_ORDER
from messages.journal import (
    START,
    Aggregated,
    Appended,
    AppendRefused,
    BatchId,
    ConsumerCommit,
    ConsumerCommitRefused,
    ConsumerCommitted,
    RouteDecisions,
)
from tests.journal import TS0, make_batch

NOW = TS0 + 10**12
PER_CLASS = 2500
LATER = TS0 + 10**15


class SimRouter:
    """What the router does, reduced to a rule table: ``decide(record) -> (lane, drop,
    expires_ns)``; P3 records are aggregated per device at each commit (one P3 output each)."""

    def __init__(self, journal: Journal, decide, aggregate: bool = True) -> None:
        self.journal = journal
        self.decide = decide
        self.aggregate = aggregate
        self.cursor = START
        self.request = 0
        self.serial = 0

    def step(self, limit: int = 10_000) -> ConsumerCommitted | ConsumerCommitRefused | None:
        records = [r for r in self.journal.read(self.cursor, limit)]
        if not records:
            return None
        pos, lane, rule, drop, expires = [], [], [], [], []
        p3: dict[tuple[str, str], list[int]] = {}
        for r in records:
            if r.kind == "agg":
                continue  # our own output: routed when written
            ln, dr, ex = self.decide(r)
            pos.append(r.pos.value)
            lane.append(ln)
            rule.append(f"rule-{ln.lower()}")
            drop.append(dr)
            expires.append(ex)
            if ln == "P3" and dr is None:
                p3.setdefault((r.device_id, r.sensor_id), []).append(r.pos.value)
        outputs, aggregated = [], []
        if self.aggregate and p3:
            self.serial += 1
            devices = sorted({d for d, _ in p3})
            outputs.append(make_batch("router", devices, f"agg{self.serial}", kind="agg"))
            aggregated = [Aggregated(d, s, min(p), max(p)) for (d, s), p in p3.items()]
        self.request += 1
        commit = ConsumerCommit(
            "router",
            self.request,
            self.cursor,
            records[-1].pos,
            outputs=tuple(outputs) or None,
            output_lane="P3",
            decisions=RouteDecisions(
                tuple(pos), tuple(lane), tuple(rule), tuple(drop), tuple(expires)
            )
            if pos
            else None,
            aggregated=tuple(aggregated),
            state=f'{{"serial": {self.serial}}}',
        )
        reply = self.journal.commit_consumer(commit)
        if isinstance(reply, ConsumerCommitted):
            self.cursor = commit.new
        return reply


def q(path: str, sql: str, *args: object) -> list[tuple]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def per_device(path: str) -> dict[str, int]:
    return dict(q(path, "SELECT device_id, count(*) FROM records GROUP BY 1"))


def evicted_seqs(path: str) -> dict[str, int]:
    return {
        d: int(n)
        for d, n in q(path, "SELECT device_id, total(seq_hi - seq_lo + 1) FROM evicted GROUP BY 1")
    }


# One device per class, so what is left of each class is a count by device.
CLASSES = {
    "veh-exp": ("EPHEMERAL", None, TS0),  # expired
    "veh-drop": ("P2", "duplicate", None),  # policy-dropped
    "veh-p1s": ("P1", None, None),  # synced (watermark set below)
    "veh-p3": ("P3", None, None),  # raw P3, aggregated
    "veh-p2": ("P2", None, None),  # oldest P2
    # never evicted:
    "veh-p1u": ("P1", None, None),  # unsynced P1
    "veh-eph": ("EPHEMERAL", None, LATER),  # ephemeral before expiry
}
EVICTABLE = {"expired": "veh-exp", "policy_dropped": "veh-drop", "synced": "veh-p1s",
             "aggregated": "veh-p3", "oldest_p2": "veh-p2"}
KEPT = ("veh-p1u", "veh-eph", "veh-new")


def _classes_journal(path: str, interleaved: bool, per_class: int = PER_CLASS) -> None:
    """A journal holding ``per_class`` records of every class, all routed, plus P3 aggregate
    outputs (device "veh-agg"). Interleaved (as a real stream is) or in blocks, newest block
    first in eviction order (so position order alone would take them the other way round)."""
    if interleaved:
        devices = list(CLASSES) * per_class
    else:
        devices = [d for d in reversed(CLASSES) for _ in range(per_class)]
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: NOW) as j:
        for no, start in enumerate(range(0, len(devices), 350), 1):
            reply = j.append(BatchId("imu-1", 1, no), make_batch("imu-1", devices[start:start + 350], f"c{no}"))
            assert isinstance(reply, Appended)
        router = SimRouter(j, lambda r: CLASSES[r.device_id], aggregate=False)
        while (reply := router.step()) is not None:
            assert isinstance(reply, ConsumerCommitted)
        # P3 aggregated: mark them; one aggregate output per window, kept (unsynced).
        commit = ConsumerCommit(
            "router", 99, router.cursor, router.cursor,
            outputs=make_batch("router", ["veh-agg"] * 50, "agg", kind="agg"), output_lane="P3",
            aggregated=(Aggregated("veh-p3", "imu-1", 1, j.last_position().value),),
        )
        assert isinstance(j.commit_consumer(commit), ConsumerCommitted)
        j.advance_watermark("veh-p1s", "P1", per_class)
        j.advance_watermark("veh-p1u", "P2", per_class)  # another lane's watermark: not P1's
        assert j.verify().ok


@pytest.mark.parametrize("interleaved", [False, True], ids=["blocks", "interleaved"])
def test_eviction_takes_each_class_before_the_next_and_never_the_kept_ones(
    tmp_path: Path, interleaved: bool
) -> None:
    path = str(tmp_path / "journal.db")
    _classes_journal(path, interleaved)
    before = per_device(path)
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: NOW) as j:
        usage = j.usage_bytes()
    # Reopen with a budget the journal already fills: each sensor append must evict.
    budget = int(usage / 0.9) + 1
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: NOW, disk_budget_bytes=budget) as j:
        no, seen, reply = 1000, [], None
        while True:
            if not isinstance(reply, AppendRefused):
                no += 1  # else: the sensor resends the refused batch
            reply = j.append(BatchId("imu-1", 1, no), make_batch("imu-1", ["veh-new"] * 200, f"n{no}"))
            left = per_device(path)
            taken = [reason for reason in EVICTION_ORDER if left.get(EVICTABLE[reason], 0) < before[EVICTABLE[reason]]]
            # Each class is taken before the next: a class is touched only once every earlier
            # one is empty.
            for i, reason in enumerate(taken):
                assert all(left.get(EVICTABLE[r], 0) == 0 for r in EVICTION_ORDER[:EVICTION_ORDER.index(reason)]), (reason, left)
                del i
            seen.append(tuple(taken))
            # Oldest first within a class: what a device lost is its lowest seqs.
            for device, lo in q(path, "SELECT device_id, min(seq) FROM records GROUP BY 1"):
                gone = evicted_seqs(path).get(device, 0)
                assert lo == gone + 1, (device, lo, gone)
            for device in ("veh-p1u", "veh-eph", "veh-agg"):
                assert left[device] == before[device], device  # never evicted
            # One transaction evicts a bounded amount (its WAL frames stay in the reserve): a
            # refusal while evictable records remain is back-pressure; the resend goes on.
            if isinstance(reply, AppendRefused) and not any(
                left.get(d, 0) for d in EVICTABLE.values()
            ):
                break
            assert len(seen) < 300, "never refused"
        assert reply.reason == "disk_budget"
        # Refused only once every evictable class was empty.
        assert all(left.get(d, 0) == 0 for d in EVICTABLE.values()), left
        if not interleaved:
            # In blocks, each class frees whole pages: they went one after another, over
            # several appends. (Interleaved, taking a class frees rows inside pages that stay
            # in use, so the space shows only once later classes empty them too: one append
            # may take them all — still strictly in order.)
            assert len(set(seen)) > 3, seen
        stats = j.stats()
        drops = {(d.reason, d.lane): d.records for d in stats.drops}
        assert drops[("expired", "EPHEMERAL")] == PER_CLASS
        assert drops[("duplicate", "P2")] == PER_CLASS  # the policy drop, counted when routed
        assert drops[("policy_dropped", "P2")] == PER_CLASS  # ... and its eviction
        assert drops[("synced", "P1")] == PER_CLASS
        assert drops[("aggregated", "P3")] == PER_CLASS
        assert drops[("oldest_p2", "P2")] == PER_CLASS
        refused = sum(1 for t in seen if t) and drops[("refused_budget", "unrouted")]
        assert refused and refused % 200 == 0  # each refusal counted (resends included)
        assert j.verify().ok, j.verify().problems
        # Unrouted records are never evicted: every acked sensor reading is still there.
        assert left["veh-new"] == 200 * (no - 1001)  # the refused batch `no` is not stored


def test_p1_outputs_use_the_reserve_when_sensor_appends_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.db")
    with Journal(path, synchronous="NORMAL", disk_budget_bytes=900_000) as j:
        no = 0
        while True:
            no += 1
            reply = j.append(BatchId("imu-1", 1, no), make_batch("imu-1", ["veh-1"] * 100, f"b{no}"))
            if isinstance(reply, AppendRefused):
                break
        assert reply.reason == "disk_budget"
        assert j.usage_bytes() <= j.sensor_budget_bytes
        last = j.last_position()
        # A safety event still goes in: P1 outputs may use the whole budget.
        event = make_batch("model", ["veh-1"] * 100, "safety", kind="event")
        ok = j.commit_consumer(ConsumerCommit("model", 1, START, last, event, output_lane="P1"))
        assert isinstance(ok, ConsumerCommitted) and ok.ranges
        # The same outputs in another lane are refused (the reserve is P1's) and counted.
        agg = make_batch("router", ["veh-1"] * 100, "agg", kind="agg")
        no_room = j.commit_consumer(ConsumerCommit("router", 1, START, last, agg, output_lane="P3"))
        assert isinstance(no_room, ConsumerCommitRefused) and no_room.reason.startswith("disk_budget")
        assert j.cursor("router") == START
        # Decisions and state without outputs are never refused for space.
        route = ConsumerCommit(
            "router", 2, START, last,
            decisions=RouteDecisions((1, 2), ("P1", "P1"), ("r", "r"), (None, None), (None, None)),
            state="{}",
        )
        assert isinstance(j.commit_consumer(route), ConsumerCommitted)
        drops = {(d.reason, d.lane): d.records for d in j.stats().drops}
        assert drops[("refused_budget", "P3")] == 100
        assert drops[("refused_budget", "unrouted")] == 100
        assert j.usage_bytes() <= j.disk_budget_bytes
        assert j.verify().ok


def _files_size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def test_budget_stress_files_stay_within_the_budget(tmp_path: Path) -> None:
    """Append and route far past the budget; the files never exceed it, drops are counted by
    reason and lane, and I2 holds (kept + evicted == journaled, per device)."""
    path = str(tmp_path / "journal.db")
    budget = 4 << 20
    now = [NOW]

    def decide(r):
        i = r.seq % 20
        if i == 0:
            return "P1", None, None
        if i < 6:
            return "P2", ("duplicate" if i == 5 else None), None
        if i < 15:
            return "P3", ("sampled-out" if i == 14 else None), None
        return "EPHEMERAL", None, now[0] + 5 * 10**9

    appended = 0
    biggest = 0
    with Journal(path, synchronous="NORMAL", disk_budget_bytes=budget,
                 clock_ns=lambda: now[0]) as j:
        router = SimRouter(j, decide)
        no = 0
        refusals = 0
        while appended * 60 < 8 * budget:  # ~8x the budget in payload alone
            no += 1
            batch = make_batch("imu-1", ["veh-1", "veh-2"] * 100, f"b{no}")
            while not isinstance(reply := j.append(BatchId("imu-1", 1, no), batch), Appended):
                # Back-pressure while eviction works through pages it must empty; the sensor
                # resends (routing and eviction go on meanwhile).
                assert reply.reason == "disk_budget", reply
                refusals += 1
                assert refusals < 50, ("eviction never made room", j.usage_bytes(),
                                          j.stats().to_json()["lanes"])
                router.step()  # (at most its own outputs to pass over)
            appended += len(batch)
            now[0] += 10**9
            assert isinstance(router.step(), ConsumerCommitted)
            if no % 10 == 0:  # the uplink: P1 always, P2 and P3 now and then
                last = {d.device_id: d.last_seq for d in j.stats().devices}
                for device, seq in last.items():
                    j.advance_watermark(device, "P1", seq)
                    if no % 30 == 0:
                        j.advance_watermark(device, "P2", seq // 2)
            biggest = max(biggest, _files_size(path))
            assert _files_size(path) <= budget, (no, _files_size(path))
        report = j.verify()
        assert report.ok, report.problems
        assert report.records_checked + report.evicted_checked == appended + router.serial * 2
        stats = j.stats()
        drops = {(d.reason, d.lane) for d in stats.drops}
        assert {("duplicate", "P2"), ("sampled-out", "P3"), ("expired", "EPHEMERAL")} <= drops
        assert {("policy_dropped", "P2"), ("synced", "P1")} <= drops
        assert all(d.records > 0 and d.bytes > 0 for d in stats.drops)
        lanes = {lane.lane: lane for lane in stats.lanes}
        assert lanes["P1"].records > 0 and lanes["P1"].oldest_unsynced_age_s is not None
        print(f"\nstress: {appended} appended, {j.evicted_records} evicted in "
              f"{j.eviction_chunks} chunks, {1000 * j.eviction_s / max(1, j.eviction_chunks):.2f}"
              f" ms/chunk, {j.evicted_records / max(j.eviction_s, 1e-9):.0f} rows/s; "
              f"files peaked at {biggest} of {budget} bytes; {refusals} refusals")
    # Unsynced P1 was never evicted: the P1 records above the watermark are all there.
    assert not q(path, "SELECT 1 FROM evicted WHERE lane = 'P1' AND reason != 'synced'")


def test_eviction_throughput_is_measured(tmp_path: Path) -> None:
    """Not a benchmark gate: evicting a chunk stays well under a commit's time."""
    path = str(tmp_path / "journal.db")
    with Journal(path, synchronous="NORMAL") as j:
        for no in range(1, 41):
            j.append(BatchId("imu-1", 1, no), make_batch("imu-1", ["veh-1"] * 500, f"b{no}"))
        router = SimRouter(j, lambda r: ("P2", None, None), aggregate=False)
        router.step(limit=100_000)
    size = os.path.getsize(path)  # closed: checkpointed, no WAL
    with Journal(path, synchronous="NORMAL", disk_budget_bytes=int(size * 0.8)) as j:
        no, started, reply = 100, time.perf_counter(), None
        while not j.evicted_records or isinstance(reply, AppendRefused):
            no += 1
            reply = j.append(BatchId("imu-1", 1, no), make_batch("imu-1", ["veh-1"] * 500, "x"))
        elapsed = time.perf_counter() - started
        assert isinstance(reply, Appended) and elapsed < 5.0
        print(f"\neviction: {j.evicted_records} P2 records in {j.eviction_chunks} chunks, "
              f"{1000 * j.eviction_s / j.eviction_chunks:.2f} ms/chunk, "
              f"{j.evicted_records / j.eviction_s:.0f} rows/s")
        assert j.verify().ok
