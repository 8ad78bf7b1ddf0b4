"""Batch planning on a real journal: lanes in priority order, never EPHEMERAL, dropped or
unrouted records, batches within their limits, a pending batch is not planned twice, a rebuild
is byte for byte the same, and a batch eviction shrank keeps its identity."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import apsw
import nacl.signing
import pytest

from actors.journal import Journal
from actors.journal.reader import (
    LANE_BACKLOG_SQL,
    READ_LANE_RANGE_SQL,
    READ_LANE_SQL,
    JournalReader,
)
from actors.uplink import envelope, wire
from actors.uplink.planner import (
    RECORD_OVERHEAD_BYTES,
    BatchPlanner,
    PlannedBatch,
    pending_from_state,
    pending_to_state,
)
from messages.journal import BatchId, ConsumerCommit, ConsumerCommitted, RouteDecisions
from tests.journal import TS0, make_batch

KEY = nacl.signing.SigningKey(b"k" * 32)
GATEWAY = "gw-1"
_batch_numbers = itertools.count(1)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "journal.db")


@pytest.fixture
def journal(path: str) -> Iterator[Journal]:
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: TS0 + 10**10) as j:
        yield j


@pytest.fixture
def reader(journal: Journal, path: str) -> Iterator[JournalReader]:
    with JournalReader(path) as r:
        yield r


def append(journal: Journal, devices: list[str], sensor: str = "imu-1") -> None:
    n = next(_batch_numbers)
    journal.append(BatchId(sensor, 1, n), make_batch(sensor, devices, f"m{n}"))


def route(journal: Journal, lanes: list[str], drops: dict[int, str] | None = None) -> None:
    """Route the next ``len(lanes)`` records; ``drops``: index in ``lanes`` -> reason."""
    cursor = journal.cursor("router")
    pos = tuple(range(cursor.value + 1, cursor.value + 1 + len(lanes)))
    drop = tuple((drops or {}).get(i) for i in range(len(lanes)))
    reply = journal.commit_consumer(ConsumerCommit(
        "router", next(_batch_numbers), cursor, type(cursor)(pos[-1]),
        decisions=RouteDecisions(pos, tuple(lanes), ("rule",) * len(lanes), drop,
                                 (None,) * len(lanes))))
    assert isinstance(reply, ConsumerCommitted), reply


def ranges(batches: list[PlannedBatch]) -> list[tuple[str, str, int, int, int]]:
    return [(b.lane, b.device_id, b.seq_lo, b.seq_hi, b.count) for b in batches]


def test_lanes_are_planned_in_priority_order(journal, reader) -> None:
    append(journal, ["veh-1"] * 6 + ["veh-2"] * 2)
    route(journal, ["P3", "P2", "P1", "P3", "P2", "P1", "P3", "P1"])
    assert ranges(BatchPlanner(100, 1 << 20).next_batches(reader)) == [
        ("P1", "veh-1", 3, 6, 2), ("P1", "veh-2", 2, 2, 1),
        ("P2", "veh-1", 2, 5, 2),
        ("P3", "veh-1", 1, 4, 2), ("P3", "veh-2", 1, 1, 1)]


def test_ephemeral_and_dropped_records_are_never_planned(journal, reader) -> None:
    append(journal, ["veh-1"] * 5)
    route(journal, ["EPHEMERAL", "P2", "P2", "P1", "P2"], drops={1: "duplicate", 3: "near"})
    assert ranges(BatchPlanner(100, 1 << 20).next_batches(reader)) == [
        ("P2", "veh-1", 3, 5, 2)]
    with pytest.raises(ValueError, match="never synced"):
        BatchPlanner(100, 1 << 20).next_batches(reader, lanes=("P1", "EPHEMERAL"))


def test_nothing_beyond_the_routers_cursor_is_planned(journal, reader) -> None:
    append(journal, ["veh-1"] * 10)
    route(journal, ["P2"] * 4)
    planner = BatchPlanner(100, 1 << 20)
    assert ranges(planner.next_batches(reader)) == [("P2", "veh-1", 1, 4, 4)]
    assert reader.lane_backlog("P2", reader.consumer_state("router")[0]) == {"veh-1": 4}


def test_batches_respect_max_records_and_max_raw_bytes(journal, reader) -> None:
    append(journal, ["veh-1"] * 25)
    route(journal, ["P2"] * 25)
    first = BatchPlanner(10, 1 << 20).next_batches(reader)
    assert ranges(first) == [("P2", "veh-1", 1, 10, 10)]
    second = BatchPlanner(10, 1 << 20).next_batches(reader, pending=first, depth=2)
    assert ranges(second) == [("P2", "veh-1", 11, 20, 10)]
    per_record = max(len(r.payload) for r in reader.read(type(reader.last_position())(0), 25))
    small = BatchPlanner(100, 3 * (per_record + RECORD_OVERHEAD_BYTES))
    assert ranges(small.next_batches(reader)) == [("P2", "veh-1", 1, 3, 3)]


def test_a_pending_batch_is_not_planned_again(journal, reader) -> None:
    append(journal, ["veh-1"] * 3 + ["veh-2"] * 3)
    route(journal, ["P2"] * 6)
    planner = BatchPlanner(2, 1 << 20)
    first = planner.next_batches(reader)
    assert ranges(first) == [("P2", "veh-1", 1, 2, 2), ("P2", "veh-2", 1, 2, 2)]
    assert ranges(planner.next_batches(reader, pending=first[:1])) == [
        ("P2", "veh-2", 1, 2, 2)]
    # Acknowledged: the next batch starts after the watermark.
    journal.advance_watermark("veh-1", "P2", 2)
    assert ranges(planner.next_batches(reader, pending=first[1:])) == [
        ("P2", "veh-1", 3, 3, 1)]
    assert reader.lane_backlog("P2", reader.consumer_state("router")[0]) == {
        "veh-1": 1, "veh-2": 3}


def test_a_rebuilt_batch_is_byte_identical(journal, reader, path) -> None:
    append(journal, ["veh-1"] * 50)
    route(journal, ["P1", "P2"] * 25)
    _, p2 = BatchPlanner(100, 1 << 20).next_batches(reader)
    built = BatchPlanner.build(reader, p2, KEY, GATEWAY)
    append(journal, ["veh-1"] * 5)  # the journal moves on; the batch's records do not
    route(journal, ["P2"] * 5)
    with JournalReader(path) as fresh:  # as after a restart
        assert BatchPlanner.build(fresh, p2, KEY, GATEWAY) == built
    assert built.header.dedup_token == f"veh-1:{reader.generation}:P2:2-50"
    raw = envelope.open_batch(built.header, envelope.read_header(built.header_b64)[1],
                              built.signature_hex, built.body, KEY.verify_key)
    device, records = wire.decode(raw)
    assert (device, [r.seq for r in records]) == ("veh-1", list(range(2, 51, 2)))


def test_a_partly_evicted_batch_is_rebuilt_with_the_same_identity(journal, reader,
                                                                  path) -> None:
    append(journal, ["veh-1"] * 10)
    route(journal, ["P2"] * 10)
    (batch,) = BatchPlanner(100, 1 << 20).next_batches(reader)
    full = BatchPlanner.build(reader, batch, KEY, GATEWAY)
    # Stands in for eviction's oldest-P2 class (the journal's own test covers choosing them).
    conn = apsw.Connection(path)
    conn.set_busy_timeout(5000)
    conn.execute("DELETE FROM records WHERE seq <= 4")
    shrunk = BatchPlanner.build(reader, batch, KEY, GATEWAY)
    assert shrunk.header.dedup_token == full.header.dedup_token
    assert (shrunk.header.seq_lo, shrunk.header.seq_hi, shrunk.header.count) == (1, 10, 6)
    assert shrunk.body != full.body
    conn.execute("DELETE FROM records")
    conn.close()
    assert BatchPlanner.build(reader, batch, KEY, GATEWAY) is None  # nothing left: done


def test_pending_batches_persist_in_a_state_only_commit(journal, reader) -> None:
    append(journal, ["veh-1"] * 4)
    route(journal, ["P1", "P2", "P3", "P2"])
    pending = BatchPlanner(100, 1 << 20).next_batches(reader)
    cursor = journal.cursor("uplink")
    reply = journal.commit_consumer(ConsumerCommit("uplink", 1, cursor, cursor,
                                                   state=pending_to_state(pending)))
    assert isinstance(reply, ConsumerCommitted)
    position, state = reader.consumer_state("uplink")
    assert (position, pending_from_state(state)) == (cursor, pending)
    assert pending_from_state(None) == []


@pytest.mark.parametrize(("sql", "args"), [
    (READ_LANE_SQL, ("P2", "veh-1", 0, 10, 5)),
    (READ_LANE_RANGE_SQL, ("P2", "veh-1", 1, 10)),
    (LANE_BACKLOG_SQL, ("P2", 10)),
])
def test_lane_queries_probe_the_records_lane_index(reader, sql, args) -> None:
    plan = [row[3] for row in reader._conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
    assert any("records_lane" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step or step.startswith("SCAN r") for step in plan), plan
