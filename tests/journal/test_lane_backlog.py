"""What waits per lane (`JournalReader.backlog`, the metrics' backlog): unsynced records of the
synced lanes, unrouted records after the router's cursor — counted, sized and dated from a real
journal, through index ranges rather than scans of the journal's history."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.journal import Journal, open_readonly
from actors.journal.reader import LANE_WAITING_SQL, UNROUTED_WAITING_SQL, LaneBacklog
from messages.journal import START, BatchId, ConsumerCommit, Position, RouteDecisions
from tests.journal import TS0, make_batch


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "journal.db")


def _fill(journal: Journal) -> None:
    """pos 1-6: veh-1 seqs 1-6; pos 7-8: veh-2 seqs 1-2 (ts TS0 + index in the batch). The
    router routes 1-6 (pos 1 P1, 2-3 P2 with 3 a duplicate, 4-5 P3, 6 EPHEMERAL) and writes one
    P3 aggregate (pos 9, veh-1 seq 7); central acknowledged veh-1's P3 up to seq 4."""
    journal.append(BatchId("imu-1", 1, 1),
                   make_batch("imu-1", ["veh-1"] * 6 + ["veh-2"] * 2, "a"))
    reply = journal.commit_consumer(ConsumerCommit(
        "router", 1, START, Position(6),
        outputs=(make_batch("router", ["veh-1"], "agg", kind="agg"),), output_lane="P3",
        decisions=RouteDecisions(
            pos=(1, 2, 3, 4, 5, 6), lane=("P1", "P2", "P2", "P3", "P3", "EPHEMERAL"),
            rule=("r",) * 6, drop=(None, None, "duplicate", None, None, None),
            expires_ns=(None,) * 5 + (TS0 + 10**12,))))
    assert not getattr(reply, "reason", None), reply
    journal.advance_watermark("veh-1", "P3", 4)


def test_backlog_counts_what_waits_per_lane_with_its_bytes_and_oldest_reading(path: str) -> None:
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: TS0 + 10**10) as journal:
        _fill(journal)
    with open_readonly(path) as reader:
        size = {r.pos.value: len(r.payload.encode()) for r in reader.read(START, 100)}
        ts = {r.pos.value: r.ts for r in reader.read(START, 100)}
        backlog = {b.lane: b for b in reader.backlog()}
    assert list(backlog) == ["unrouted", "P1", "P2", "P3"]  # EPHEMERAL never waits
    # Unrouted: after the router's cursor and without a lane (its own output at 9 has one).
    assert backlog["unrouted"] == LaneBacklog("unrouted", 2, size[7] + size[8], ts[7])
    assert backlog["P1"] == LaneBacklog("P1", 1, size[1], ts[1])
    # The duplicate (policy-dropped) is never synced: it does not wait.
    assert backlog["P2"] == LaneBacklog("P2", 1, size[2], ts[2])
    # Seq 4 is acknowledged; seq 5 and the aggregate (seq 7) wait.
    assert backlog["P3"] == LaneBacklog("P3", 2, size[5] + size[9], min(ts[5], ts[9]))


def test_an_acknowledged_lane_and_a_routed_journal_have_nothing_waiting(path: str) -> None:
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: TS0 + 10**10) as journal:
        _fill(journal)
        journal.commit_consumer(ConsumerCommit(
            "router", 2, Position(6), Position(9),
            decisions=RouteDecisions(pos=(7, 8), lane=("P1", "P1"), rule=("r", "r"),
                                     drop=(None, None), expires_ns=(None, None))))
        for device, lane, seq in (("veh-1", "P1", 1), ("veh-1", "P2", 2), ("veh-1", "P3", 7),
                                  ("veh-2", "P1", 2)):
            journal.advance_watermark(device, lane, seq)
    with open_readonly(path) as reader:
        assert reader.backlog() == tuple(LaneBacklog(lane, 0, 0, None)
                                         for lane in ("unrouted", "P1", "P2", "P3"))


def test_an_empty_journal_has_an_empty_backlog(path: str) -> None:
    Journal(path, synchronous="NORMAL").close()
    with open_readonly(path) as reader:
        assert [(b.records, b.bytes, b.oldest_ts) for b in reader.backlog()] == [(0, 0, None)] * 4


def test_the_backlog_queries_use_index_ranges_not_scans(path: str) -> None:
    """The cost is the records waiting, not the journal's history (1M records, 880k waiting:
    0.35 s on an idle x86: actors/metrics/probes.py, BACKLOG_DUTY)."""
    Journal(path, synchronous="NORMAL").close()
    with open_readonly(path) as reader:
        conn = reader._conn
        lane_plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + LANE_WAITING_SQL,
                                                    ("P3",))]
        unrouted_plan = [row[3] for row in conn.execute(
            "EXPLAIN QUERY PLAN " + UNROUTED_WAITING_SQL, (0,))]
    assert any("USING INDEX records_lane (lane=? AND device_id=? AND seq>?)" in step
               for step in lane_plan), lane_plan
    assert not any(step.startswith("SCAN r") for step in lane_plan), lane_plan
    assert unrouted_plan == ["SEARCH records USING INTEGER PRIMARY KEY (rowid>?)"], unrouted_plan


def test_drops_and_usage_read_the_journals_own_counters(path: str) -> None:
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: TS0 + 10**10) as journal, \
            open_readonly(path) as reader:
        _fill(journal)
        drops = reader.drops()
        assert [(d.reason, d.lane, d.records) for d in drops] == [("duplicate", "P2", 1)]
        assert drops == reader.stats().drops
        # The budget's measure, as the writer takes it (pages + WAL) while it writes.
        assert reader.usage_bytes() == journal.usage_bytes()
