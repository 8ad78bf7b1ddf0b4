"""Routing commits (I4): decisions, aggregate outputs, aggregated marks, consumer state and the
cursor land together or not at all, a resend changes nothing, and a restarted consumer resumes
from its cursor and state (read back through its own `JournalReader`)."""

from __future__ import annotations

import json
from pathlib import Path

import apsw
import pytest

from actors.journal import Journal, open_readonly
from messages.journal import (
    START,
    Aggregated,
    BatchId,
    ConsumerCommit,
    ConsumerCommitRefused,
    ConsumerCommitted,
    Position,
    RouteDecisions,
    SeqRange,
)
from tests.journal import TS0, make_batch
from tests.journal.test_journal import _v1_journal


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "journal.db")


@pytest.fixture
def journal(path: str):
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: TS0 + 10**10) as j:
        yield j


def rows(path: str, sql: str = "SELECT pos, lane, rule, drop_reason, expires_ns, aggregated "
         "FROM records ORDER BY pos") -> list[tuple]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _eight(journal: Journal) -> None:
    """pos 1-4: veh-1 from imu-1; pos 5-8: veh-1 from gps-1."""
    journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 4, "imu"))
    journal.append(BatchId("gps-1", 1, 1), make_batch("gps-1", ["veh-1"] * 4, "gps"))


def _routing(request_id: int = 1, state: str | None = '{"windows": 1}') -> ConsumerCommit:
    return ConsumerCommit(
        "router",
        request_id,
        START,
        Position(8),
        outputs=(
            make_batch("imu-1", ["veh-1"], "agg-imu", kind="agg"),
            make_batch("gps-1", ["veh-1", "veh-1"], "agg-gps", kind="agg"),
        ),
        output_lane="P3",
        decisions=RouteDecisions(
            pos=(1, 2, 3, 4, 5, 6, 7),
            lane=("P3", "P3", "P3", "P1", "EPHEMERAL", "P2", "P2"),
            rule=("imu-agg", "imu-agg", "imu-agg", "imu-alarm", "gps-live", "gps", "gps"),
            drop=(None, None, "sampled-out", None, None, None, "duplicate"),
            expires_ns=(None, None, None, None, TS0 + 10**12, None, None),
        ),
        aggregated=(Aggregated("veh-1", "imu-1", 1, 9),),  # 9 onwards: this commit's outputs
        state=state,
    )


def test_a_routing_commit_applies_everything_at_once(journal: Journal, path: str) -> None:
    _eight(journal)
    reply = journal.commit_consumer(_routing())
    assert isinstance(reply, ConsumerCommitted) and not reply.duplicate
    assert reply.ranges == (SeqRange("veh-1", 9, 9), SeqRange("veh-1", 10, 11))
    assert rows(path) == [
        (1, "P3", "imu-agg", None, None, 1),
        (2, "P3", "imu-agg", None, None, 1),
        (3, "P3", "imu-agg", "sampled-out", None, 1),
        (4, "P1", "imu-alarm", None, None, None),  # P1: not a P3 raw record
        (5, "EPHEMERAL", "gps-live", None, TS0 + 10**12, None),
        (6, "P2", "gps", None, None, None),
        (7, "P2", "gps", "duplicate", None, None),
        (8, None, None, None, None, None),  # not decided: still unrouted
        (9, "P3", None, None, None, None),  # outputs: their lane, never marked as raw
        (10, "P3", None, None, None, None),
        (11, "P3", None, None, None, None),
    ]
    assert journal.consumer_state("router") == (Position(8), '{"windows": 1}')
    stats = journal.stats()
    drops = {(d.reason, d.lane): (d.records, d.bytes) for d in stats.drops}
    assert set(drops) == {("sampled-out", "P3"), ("duplicate", "P2")}
    assert drops[("duplicate", "P2")][0] == 1 and drops[("duplicate", "P2")][1] > 0
    lanes = {lane.lane: lane for lane in stats.lanes}
    assert {k: v.records for k, v in lanes.items()} == {
        "P1": 1, "P2": 2, "P3": 6, "EPHEMERAL": 1, "unrouted": 1
    }
    # Ages: the journal's clock minus the oldest unsynced record's ts (policy drops excluded).
    assert lanes["P1"].oldest_unsynced_age_s == pytest.approx((10**10 - 3) / 1e9)
    journal.advance_watermark("veh-1", "P1", 4)
    assert {la.lane: la for la in journal.stats().lanes}["P1"].oldest_unsynced_age_s is None


def test_a_resent_routing_commit_is_answered_not_applied_again(journal: Journal, path: str) -> None:
    _eight(journal)
    first = journal.commit_consumer(_routing())
    before = (rows(path), journal.stats().drops)
    again = journal.commit_consumer(_routing())
    assert again.duplicate and again.ranges == first.ranges
    assert (rows(path), journal.stats().drops) == before
    # Decisions for records already routed (a router that restarted before it heard back,
    # deciding again under a new request id) are ignored: no lane change, no second count.
    redo = ConsumerCommit(
        "router", 2, Position(8), Position(8),
        decisions=RouteDecisions((6, 7, 99), ("P1", "P2", "P2"), ("x", "x", "x"),
                                 ("near", "duplicate", "duplicate"), (None, None, None)),
    )
    assert isinstance(journal.commit_consumer(redo), ConsumerCommitted)
    assert rows(path) == before[0]
    assert journal.stats().drops == before[1]
    assert journal.consumer_state("router") == (Position(8), '{"windows": 1}')  # state kept


def test_a_failed_routing_commit_leaves_nothing(journal: Journal, path: str) -> None:
    _eight(journal)
    before = rows(path)
    tamper = apsw.Connection(path)
    tamper.execute(
        "CREATE TRIGGER boom BEFORE UPDATE ON cursors BEGIN SELECT RAISE(ABORT, 'injected'); END;"
        "INSERT INTO cursors(consumer, pos, updated_ns) VALUES ('router', 0, 0)"
    )
    with pytest.raises(apsw.ConstraintError, match="injected"):
        journal.commit_consumer(_routing())
    assert rows(path) == before  # no decision, no mark, no output
    assert journal.stats().drops == () and journal.last_position() == Position(8)
    assert journal.consumer_state("router") == (START, None)
    tamper.execute("DROP TRIGGER boom")
    tamper.close()
    reply = journal.commit_consumer(_routing())
    assert reply.ranges == (SeqRange("veh-1", 9, 9), SeqRange("veh-1", 10, 11))  # no seq lost


def test_consumer_state_round_trips_through_the_reader(journal: Journal, path: str) -> None:
    _eight(journal)
    with open_readonly(path) as reader:
        assert reader.consumer_state("router") == (START, None)
        journal.commit_consumer(_routing(state=json.dumps({"dedup": {"veh-1": 7}})))
        cursor, state = reader.consumer_state("router")
        assert cursor == Position(8) and json.loads(state) == {"dedup": {"veh-1": 7}}
        # state=None leaves the stored state; a new state replaces it.
        journal.commit_consumer(ConsumerCommit("router", 2, Position(8), Position(11)))
        assert reader.consumer_state("router") == (Position(11), state)
        journal.commit_consumer(ConsumerCommit("router", 3, Position(11), Position(11), state="{}"))
        assert reader.consumer_state("router") == (Position(11), "{}")
    journal.close()
    with Journal(path) as reopened, open_readonly(path) as reader:
        assert reopened.consumer_state("router") == reader.consumer_state("router")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"output_lane": "P9"}, "output_lane"),
        ({"decisions": RouteDecisions((1, 2), ("P1",), ("r", "r"), (None, None), (None, None))},
         "differ in length"),
        ({"decisions": RouteDecisions((1,), ("LOUD",), ("r",), (None,), (None,))}, "not lanes"),
        ({"state": "{not json"}, "not JSON"),
        ({"outputs": ("nope",)}, "ReadingBatch"),
    ],
)
def test_an_invalid_routing_commit_is_refused_whole(
    journal: Journal, path: str, change: dict, expected: str
) -> None:
    import attrs

    _eight(journal)
    before = rows(path)
    reply = journal.commit_consumer(attrs.evolve(_routing(), **change))
    assert isinstance(reply, ConsumerCommitRefused) and reply.reason.startswith("invalid")
    assert expected in reply.reason
    assert rows(path) == before and journal.cursor("router") == START


def test_stats_json_and_text_show_lanes_and_drops(journal: Journal, path: str, capsys) -> None:
    from tools.journal_cmd import stats_command

    _eight(journal)
    journal.commit_consumer(_routing())
    assert stats_command(path, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["lanes"]) == {"P1", "P2", "P3", "EPHEMERAL", "unrouted"}
    assert out["lanes"]["P3"]["records"] == 6 and out["lanes"]["unrouted"]["records"] == 1
    assert set(out["lanes"]["P1"]) == {"records", "bytes", "oldest_unsynced_age_s"}
    assert out["drops"]["duplicate"]["P2"]["records"] == 1
    assert set(out["drops"]["sampled-out"]["P3"]) == {"records", "bytes"}
    assert stats_command(path, as_json=False) == 0
    text = capsys.readouterr().out
    assert "lanes" in text and "EPHEMERAL" in text and "sampled-out" in text


def test_a_v1_journal_migrates_to_unrouted_records_and_no_state(path: str) -> None:
    _v1_journal(path)
    with Journal(path) as j:
        assert j.consumer_state("router") == (Position(2), None)
        assert rows(path, "SELECT lane FROM records") == [(None,)] * 3
        lanes = {la.lane: la.records for la in j.stats().lanes}
        assert lanes["unrouted"] == 3
        assert j.verify().ok
