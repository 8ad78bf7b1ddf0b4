"""The journal's invariants, each test named after the one it checks (I1-I4, I7, I8).

Everything runs against real SQLite files: a real full disk (a 2 MiB tmpfs, when mount works),
a real SIGKILL of a writer process, and schema fixtures built by hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from actors.journal import (
    Journal,
    JournalNotFound,
    NotAJournal,
    SchemaTooNew,
    open_readonly,
)
from actors.journal.journal import DEAD_INCARNATION_GRACE_NS
from actors.journal.schema import APPLICATION_ID, SCHEMA_VERSION, JournalError
from messages.journal import (
    START,
    Appended,
    AppendRefused,
    BatchId,
    ConsumerCommit,
    ConsumerCommitRefused,
    ConsumerCommitted,
    Position,
    SeqRange,
)
from messages.readings import ReadingBatch
from tests.journal import TS0, assert_gapless, make_batch, stored_markers

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "journal.db")


@pytest.fixture
def journal(path: str):
    # NORMAL: these tests check logic, not fsync; the crash and disk-full tests use FULL.
    with Journal(path, synchronous="NORMAL") as j:
        yield j


def raw(path: str) -> apsw.Connection:
    """A second connection: the test playing a fault (tampering, eviction, a stray writer)."""
    conn = apsw.Connection(path)
    conn.set_busy_timeout(5000)
    return conn


# -- appends: I1, I2 and resends ------------------------------------------------------------


def test_append_assigns_next_seqs_and_positions(journal: Journal) -> None:
    first = journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 3, "a"))
    second = journal.append(BatchId("imu-1", 1, 2), make_batch("imu-1", ["veh-1"] * 2, "b"))
    assert first == Appended(
        BatchId("imu-1", 1, 1), (SeqRange("veh-1", 1, 3),), Position(1), Position(3)
    )
    assert second.ranges == (SeqRange("veh-1", 4, 5),)
    assert (second.first, second.last) == (Position(4), Position(5))
    assert journal.last_position() == Position(5)


def test_mixed_device_batch_gets_a_range_per_device(journal: Journal, path: str) -> None:
    journal.append(BatchId("gps-1", 1, 1), make_batch("gps-1", ["veh-2"], "a"))
    reply = journal.append(
        BatchId("gps-1", 1, 2), make_batch("gps-1", ["veh-1", "veh-2", "veh-1", "veh-2"], "b")
    )
    assert reply.ranges == (SeqRange("veh-1", 1, 2), SeqRange("veh-2", 2, 3))
    assert_gapless(path)


def test_resent_batch_is_stored_once(journal: Journal, path: str) -> None:
    batch_id = BatchId("imu-1", 1, 1)
    batch = make_batch("imu-1", ["veh-1"] * 4, "a")
    original = journal.append(batch_id, batch)
    resent = journal.append(batch_id, batch)
    assert resent.duplicate and not original.duplicate
    assert (resent.ranges, resent.first, resent.last) == (
        original.ranges,
        original.first,
        original.last,
    )
    assert stored_markers(path) == {"a": 4}


def test_resent_batch_is_stored_once_after_reopen(path: str) -> None:
    batch = make_batch("imu-1", ["veh-1"] * 4, "a")
    with Journal(path) as j:
        original = j.append(BatchId("imu-1", 1, 1), batch)
    with Journal(path) as j:
        resent = j.append(BatchId("imu-1", 1, 1), batch)
    assert resent.duplicate and resent.ranges == original.ranges
    assert stored_markers(path) == {"a": 4}


def test_seq_has_no_gap_across_reopen(path: str) -> None:
    for round_no in range(3):
        with Journal(path) as j:
            reply = j.append(
                BatchId("imu-1", round_no, 1), make_batch("imu-1", ["veh-1"] * 5, f"r{round_no}")
            )
            assert reply.ranges == (SeqRange("veh-1", 5 * round_no + 1, 5 * round_no + 5),)
    assert_gapless(path)


def test_resend_floor_forgets_older_batch_ids(journal: Journal, path: str) -> None:
    for no in range(1, 6):
        journal.append(BatchId("imu-1", 1, no), make_batch("imu-1", ["veh-1"], f"b{no}"))
    journal.append(BatchId("imu-1", 1, 6), make_batch("imu-1", ["veh-1"], "b6"), resend_floor=4)
    kept = [row[0] for row in raw(path).execute("SELECT batch_no FROM batches ORDER BY 1")]
    assert kept == [4, 5, 6]
    # Ids at or above the floor still deduplicate.
    assert journal.append(BatchId("imu-1", 1, 4), make_batch("imu-1", ["veh-1"], "b4")).duplicate


def test_late_resend_below_the_resend_floor_is_not_stored_again(
    journal: Journal, path: str
) -> None:
    # Batch 2 is committed, then acked; the sensor's next append raises the floor past it and
    # the journal forgets batch 2's id. A copy of batch 2 resent before the ack and delivered
    # late must still be recognised.
    b2 = make_batch("imu-1", ["veh-1"], "b2")
    journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"], "b1"))
    journal.append(BatchId("imu-1", 1, 2), b2)
    journal.append(BatchId("imu-1", 1, 3), make_batch("imu-1", ["veh-1"], "b3"), resend_floor=3)
    late = journal.append(BatchId("imu-1", 1, 2), b2)
    assert isinstance(late, Appended) and late.duplicate
    assert stored_markers(path) == {"b1": 1, "b2": 1, "b3": 1}


def test_late_resend_from_a_dead_incarnation_is_still_stored_once(
    journal: Journal, path: str
) -> None:
    old = make_batch("imu-1", ["veh-1"] * 2, "old")
    journal.append(BatchId("imu-1", 1, 1), old)
    # The sensor restarted (incarnation ids are random: 2 is not "after" 1) ...
    new = make_batch("imu-1", ["veh-1"] * 2, "new")
    assert not journal.append(BatchId("imu-1", 2, 1), new).duplicate
    # ... and a resend from the dead incarnation arrives late: recognised, not stored again.
    assert journal.append(BatchId("imu-1", 1, 1), old).duplicate
    # A batch the dead incarnation never got committed is new data: stored.
    assert not journal.append(BatchId("imu-1", 1, 2), make_batch("imu-1", ["veh-1"], "lost")).duplicate
    # None of this makes the live incarnation's ids forgettable.
    assert journal.append(BatchId("imu-1", 2, 1), new).duplicate
    assert stored_markers(path) == {"old": 2, "new": 2, "lost": 1}


def test_dead_incarnation_ids_are_forgotten_after_the_grace(path: str) -> None:
    now = [TS0]
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: now[0],
                 monotonic_ns=lambda: now[0]) as j:
        for no in (1, 2):
            j.append(BatchId("imu-1", 1, no), make_batch("imu-1", ["veh-1"], f"b{no}"))
        j.append(BatchId("gps-1", 1, 1), make_batch("gps-1", ["veh-1"], "gps"))
        now[0] += DEAD_INCARNATION_GRACE_NS + 1
        j.append(BatchId("imu-1", 2, 1), make_batch("imu-1", ["veh-1"], "c1"))
    ids = list(raw(path).execute("SELECT sensor_id, incarnation, batch_no FROM batches"))
    assert sorted(ids) == [("gps-1", 1, 1), ("imu-1", 2, 1)]  # other sensors are untouched


def test_a_wall_clock_step_forward_does_not_age_dead_incarnation_ids(path: str) -> None:
    """A Pi fixing its clock (+1 day) between a dead incarnation's commit and its successor's
    first append: the dead one's late resend is still recognised, not stored twice."""
    wall, mono = [TS0], [0]
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: wall[0],
                 monotonic_ns=lambda: mono[0]) as j:
        old = make_batch("imu-1", ["veh-1"], "old")
        j.append(BatchId("imu-1", 1, 1), old)
        wall[0] += 86_400 * 10**9  # the wall clock steps a day; one real second passes
        mono[0] += 10**9
        j.append(BatchId("imu-1", 2, 1), make_batch("imu-1", ["veh-1"], "new"))
        assert j.append(BatchId("imu-1", 1, 1), old).duplicate
        mono[0] += DEAD_INCARNATION_GRACE_NS + 1  # real time passes: now the ids go
        j.append(BatchId("imu-1", 3, 1), make_batch("imu-1", ["veh-1"], "newer"))
    assert stored_markers(path) == {"old": 1, "new": 1, "newer": 1}
    ids = sorted(raw(path).execute("SELECT incarnation FROM batches WHERE sensor_id = 'imu-1'"))
    assert ids == [(3,)]


def test_failed_append_leaves_no_rows_and_no_gap(journal: Journal, path: str) -> None:
    tamper = raw(path)
    tamper.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON batches BEGIN SELECT RAISE(ABORT, 'injected'); END"
    )
    with pytest.raises(apsw.ConstraintError, match="injected"):
        journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 3, "a"))
    assert journal.last_position() == START
    assert stored_markers(path) == {}
    tamper.execute("DROP TRIGGER boom")
    reply = journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 3, "a"))
    assert reply.ranges == (SeqRange("veh-1", 1, 3),) and reply.first == Position(1)


def test_positions_are_never_reused_after_the_tail_is_deleted(journal: Journal, path: str) -> None:
    journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 5, "a"))
    journal.append(BatchId("imu-1", 1, 2), make_batch("imu-1", ["veh-1"] * 5, "b"))
    raw(path).execute("DELETE FROM records WHERE pos > 3")  # e.g. eviction took the newest
    reply = journal.append(BatchId("imu-1", 1, 3), make_batch("imu-1", ["veh-1"] * 2, "c"))
    assert (reply.first, reply.last) == (Position(11), Position(12))
    assert reply.ranges == (SeqRange("veh-1", 11, 12),)


_GOOD = make_batch("imu-1", ["veh-1"] * 2, "x")


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (ReadingBatch("imu-1", ("veh-1",), (TS0, TS0), ("imu",), ('{"a":1}',)), "length"),
        (ReadingBatch("imu-1", (), (), (), ()), "no readings"),
        (ReadingBatch("imu-1", ("bad id",), (TS0,), ("imu",), ('{"a":1}',)), "device_ids"),
        (ReadingBatch("imu-1", ("veh-1",), (1.5,), ("imu",), ('{"a":1}',)), "ts must"),
        (ReadingBatch("imu-1", ("veh-1",), (5,), ("imu",), ('{"a":1}',)), "out of range"),
        (ReadingBatch("imu-1", ("veh-1",), (TS0,), ("imu",), (b"{}",)), "payloads"),
        (ReadingBatch("gps-9", _GOOD.device_ids, _GOOD.ts, _GOOD.kinds, _GOOD.payloads), "sent as"),
    ],
)
def test_invalid_batch_is_refused_and_nothing_is_written(
    journal: Journal, path: str, batch: ReadingBatch, expected: str
) -> None:
    reply = journal.append(BatchId("imu-1", 1, 1), batch)
    assert isinstance(reply, AppendRefused) and reply.reason == "invalid"
    assert expected in reply.detail
    assert journal.last_position() == START and stored_markers(path) == {}
    # The same id with a good batch is not mistaken for a resend.
    assert not journal.append(BatchId("imu-1", 1, 1), _GOOD).duplicate


# -- disk budget and a full disk (I7) ---------------------------------------------------------


def _fill(journal: Journal, limit: int) -> tuple[list[int], AppendRefused]:
    acked = []
    for no in range(1, limit):
        reply = journal.append(BatchId("imu-1", 1, no), make_batch("imu-1", ["veh-1"] * 100, f"b{no}"))
        if isinstance(reply, AppendRefused):
            return acked, reply
        acked.append(no)
    pytest.fail(f"no refusal after {limit} appends")


def test_append_refused_when_budget_reached_keeps_committed_data(path: str) -> None:
    budget = 600_000
    with Journal(path, synchronous="NORMAL", disk_budget_bytes=budget, refused_retry_s=2.5) as j:
        acked, refused = _fill(j, 200)
        assert acked and refused.reason == "disk_budget" and refused.retry_after_s == 2.5
        assert path in refused.detail
        assert j.usage_bytes() <= budget  # the estimate is conservative: I7 held throughout
        # A refusal stores nothing of the batch; it only counts itself in drops (I7). (It may
        # commit that count and a WAL truncation, so usage need not stay byte-identical.)
        assert j.last_position() == Position(100 * len(acked)) and j.usage_bytes() <= budget
        assert {(d.reason, d.lane, d.records) for d in j.stats().drops} == {
            ("refused_budget", "unrouted", 100)
        }
        # A resend of a committed batch is still acknowledged: the sender may drop it.
        assert j.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 100, "b1")).duplicate
    with Journal(path, disk_budget_bytes=1 << 30) as j:  # space was made: it takes the batch
        retry = j.append(refused.batch_id, make_batch("imu-1", ["veh-1"] * 100, "retry"))
        assert retry.ranges == (SeqRange("veh-1", 100 * len(acked) + 1, 100 * len(acked) + 100),)
    assert stored_markers(path) == {**{f"b{n}": 100 for n in acked}, "retry": 100}
    assert_gapless(path)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A real 2 MiB filesystem to fill (root only; skipped with the reason otherwise)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"a real full disk needs a 2 MiB tmpfs mount (root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def test_disk_full_is_refused_not_raised(small_tmpfs: Path) -> None:
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\1" * (768 << 10))  # room to make once the disk has filled
    path = str(small_tmpfs / "journal.db")
    with Journal(path, synchronous="FULL", disk_budget_bytes=1 << 30) as j:
        acked, refused = _fill(j, 1000)
        assert acked and refused.reason == "disk_full", refused
        assert refused.retry_after_s > 0
        assert j.last_position() == Position(100 * len(acked))
        filler.unlink()
        retry = j.append(refused.batch_id, make_batch("imu-1", ["veh-1"] * 100, f"b{len(acked) + 1}"))
        assert isinstance(retry, Appended) and not retry.duplicate
        assert retry.first == Position(100 * len(acked) + 1)
        assert j.verify().ok
    assert stored_markers(path) == {f"b{n}": 100 for n in range(1, len(acked) + 2)}


# -- a writer killed mid-transaction (I1, I2) ------------------------------------------------

_WRITER = r"""
import json, sys
from actors.journal import Journal
from messages.journal import Appended, BatchId
from tests.journal import make_batch
path, batch_no = sys.argv[1], int(sys.argv[2])
journal = Journal(path, synchronous="FULL")
while True:
    batch = make_batch("imu-1", ["veh-a", "veh-b"] * 100, f"b{batch_no}")
    reply = journal.append(BatchId("imu-1", 7, batch_no), batch)
    assert isinstance(reply, Appended), reply
    print(json.dumps([batch_no, reply.duplicate]), flush=True)  # the ack, after the commit
    batch_no += 1
"""


def test_killed_writer_reopens_with_every_acked_batch_exactly_once(path: str) -> None:
    acked: set[int] = set()
    next_no = 1
    for acks_before_kill in (3, 11, 25):
        # The sensor resends its first unacknowledged batch: it may have been committed.
        committed_unacked = f"b{next_no}" in stored_markers(path) if acked else False
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, path, str(next_no)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            for i in range(acks_before_kill):
                line = writer.stdout.readline()
                assert line.endswith("\n"), f"writer died early (exit {writer.poll()})"
                batch_no, duplicate = json.loads(line)
                if i == 0:
                    assert duplicate == committed_unacked  # a resend is recognised after a crash
                acked.add(batch_no)
            os.kill(writer.pid, signal.SIGKILL)  # wherever it is: most likely mid-transaction
            writer.wait()
            acked.update(json.loads(line)[0] for line in writer.stdout if line.endswith("\n"))
        finally:
            writer.kill()
            writer.wait()
            writer.stdout.close()
        next_no = max(acked) + 1
    stored = stored_markers(path)
    assert {f"b{n}" for n in acked} <= set(stored)
    assert set(stored) <= {f"b{n}" for n in range(1, next_no + 1)}
    assert set(stored.values()) == {200}  # every batch whole, none twice
    with Journal(path) as j:
        assert j.verify().ok, j.verify().problems
    assert_gapless(path)


# -- consumers: I4 ---------------------------------------------------------------------------


def _with_records(journal: Journal, n: int = 10) -> None:
    journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * n, "in"))


def test_consumer_outputs_and_cursor_commit_together(journal: Journal, path: str) -> None:
    _with_records(journal)
    outputs = make_batch("router", ["veh-1"] * 2, "agg", kind="agg")
    reply = journal.commit_consumer(ConsumerCommit("router", 1, START, Position(10), outputs))
    assert reply == ConsumerCommitted("router", 1, Position(10), (SeqRange("veh-1", 11, 12),))
    assert journal.cursor("router") == Position(10)
    assert stored_markers(path) == {"in": 10, "agg": 2}
    # A failure between outputs and cursor leaves neither.
    tamper = raw(path)
    tamper.execute(
        "CREATE TRIGGER boom BEFORE UPDATE ON cursors BEGIN SELECT RAISE(ABORT, 'injected'); END"
    )
    more = make_batch("router", ["veh-1"], "agg2", kind="agg")
    with pytest.raises(apsw.ConstraintError, match="injected"):
        journal.commit_consumer(ConsumerCommit("router", 2, Position(10), Position(12), more))
    assert journal.cursor("router") == Position(10)
    assert "agg2" not in stored_markers(path) and journal.last_position() == Position(12)
    tamper.execute("DROP TRIGGER boom")
    again = journal.commit_consumer(ConsumerCommit("router", 2, Position(10), Position(12), more))
    assert again.ranges == (SeqRange("veh-1", 13, 13),)  # no seq was lost to the failure


def test_stale_consumer_commit_is_refused(journal: Journal, path: str) -> None:
    _with_records(journal)
    journal.commit_consumer(ConsumerCommit("router", 1, START, Position(4)))
    stale = journal.commit_consumer(
        ConsumerCommit("router", 2, START, Position(8), make_batch("router", ["veh-1"], "agg"))
    )
    assert isinstance(stale, ConsumerCommitRefused)
    assert stale.cursor == Position(4) and stale.reason.startswith("cursor_mismatch")
    assert journal.cursor("router") == Position(4) and "agg" not in stored_markers(path)


def test_resent_consumer_commit_is_answered_not_applied_twice(journal: Journal, path: str) -> None:
    _with_records(journal)
    commit = ConsumerCommit("router", 7, START, Position(5), make_batch("router", ["veh-1"], "agg"))
    first = journal.commit_consumer(commit)
    resent = journal.commit_consumer(commit)
    assert resent.duplicate and resent.ranges == first.ranges and resent.cursor == Position(5)
    assert stored_markers(path)["agg"] == 1


@pytest.mark.parametrize(
    ("new", "code"), [(Position(2), "cursor_backwards"), (Position(11), "cursor_beyond_end")]
)
def test_consumer_cursor_moves_only_forward_within_the_journal(
    journal: Journal, new: Position, code: str
) -> None:
    _with_records(journal)
    journal.commit_consumer(ConsumerCommit("router", 1, START, Position(5)))
    reply = journal.commit_consumer(ConsumerCommit("router", 2, Position(5), new))
    assert isinstance(reply, ConsumerCommitRefused) and reply.reason.startswith(code)
    assert journal.cursor("router") == Position(5)


def test_reader_sees_only_committed_records_while_the_writer_writes(
    journal: Journal, path: str
) -> None:
    _with_records(journal, 5)
    with open_readonly(path) as reader:
        records = reader.read(START, 3)
        assert [r.pos for r in records] == [Position(1), Position(2), Position(3)]
        assert records[0].values == {"b": "in", "i": 0, "ax": 0.0}
        assert (records[0].device_id, records[0].seq, records[0].sensor_id) == ("veh-1", 1, "imu-1")
        writer = raw(path)
        writer.execute("BEGIN IMMEDIATE")  # a writer mid-transaction does not block the reader
        writer.execute("DELETE FROM records")
        assert [r.seq for r in reader.read(Position(3), 10)] == [4, 5]
        writer.execute("ROLLBACK")
        _with_records(journal, 1)  # (a resend: nothing new) then something new
        journal.append(BatchId("imu-1", 1, 2), make_batch("imu-1", ["veh-1"], "late"))
        assert [r.seq for r in reader.read(Position(5), 10)] == [6]
        assert reader.last_position() == Position(6)


# -- watermarks ------------------------------------------------------------------------------


def test_watermark_never_goes_backwards(journal: Journal, path: str) -> None:
    _with_records(journal)
    assert journal.advance_watermark("veh-1", "p1", 7) == 7
    assert journal.advance_watermark("veh-1", "p1", 3) == 7
    assert journal.advance_watermark("veh-1", "p2", 2) == 2
    with pytest.raises(ValueError, match="beyond"):
        journal.advance_watermark("veh-1", "p1", 11)
    journal.close()
    with Journal(path) as reopened:
        assert reopened.watermarks() == {"veh-1": {"p1": 7, "p2": 2}}


# -- schema: generations, versions, foreign files -------------------------------------------


def test_each_new_journal_gets_its_own_generation(tmp_path: Path) -> None:
    first = Journal(tmp_path / "a.db")
    second = Journal(tmp_path / "b.db")
    assert first.generation != second.generation
    assert len(first.generation) == 32 and int(first.generation, 16) >= 0
    first.close()
    second.close()
    with Journal(tmp_path / "a.db") as reopened:
        assert reopened.generation == first.generation


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"synchronous": "OFF"}, "synchronous must be one of"), ({"disk_budget_bytes": 0}, "> 0")],
)
def test_unsafe_or_impossible_settings_are_rejected(path: str, kwargs: dict, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        Journal(path, **kwargs)
    assert not os.path.exists(path)


def test_newer_schema_journal_is_refused_untouched(path: str) -> None:
    Journal(path).close()
    conn = raw(path)
    conn.pragma("user_version", SCHEMA_VERSION + 1)
    conn.close()
    before = Path(path).read_bytes()
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}"):
        Journal(path)
    with pytest.raises(SchemaTooNew):
        open_readonly(path)
    assert Path(path).read_bytes() == before


_V1_JOURNAL = f"""
PRAGMA application_id = {APPLICATION_ID};
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE devices(device_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE records(pos INTEGER PRIMARY KEY, device_id TEXT NOT NULL, seq INTEGER NOT NULL,
    sensor_id TEXT NOT NULL, ts INTEGER NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL,
    committed_ns INTEGER NOT NULL, UNIQUE (device_id, seq)) STRICT;
CREATE TABLE batches(sensor_id TEXT NOT NULL, incarnation INTEGER NOT NULL,
    batch_no INTEGER NOT NULL, first_pos INTEGER NOT NULL, last_pos INTEGER NOT NULL,
    ranges TEXT NOT NULL, committed_ns INTEGER NOT NULL,
    PRIMARY KEY (sensor_id, incarnation, batch_no)) WITHOUT ROWID;
CREATE TABLE cursors(consumer TEXT PRIMARY KEY, pos INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('generation', '{"ab" * 16}'), ('created_ns', '1'), ('last_pos', '3');
INSERT INTO devices VALUES ('veh-1', 3);
INSERT INTO records VALUES (1, 'veh-1', 1, 'imu-1', {TS0}, 'imu', '{{"b":"v1","i":0}}', 1),
    (2, 'veh-1', 2, 'imu-1', {TS0}, 'imu', '{{"b":"v1","i":1}}', 1),
    (3, 'veh-1', 3, 'imu-1', {TS0}, 'imu', '{{"b":"v1","i":2}}', 1);
INSERT INTO batches VALUES ('imu-1', 1, 1, 1, 3, '[["veh-1",1,3]]', 1);
INSERT INTO cursors VALUES ('router', 2, 1);
PRAGMA user_version = 1;
"""


def _v1_journal(path: str, extra_sql: str = "") -> None:
    conn = apsw.Connection(path)
    conn.execute(_V1_JOURNAL + extra_sql)
    conn.close()


def test_older_journal_is_migrated_keeping_data_and_generation(path: str) -> None:
    _v1_journal(path)
    with Journal(path) as j:
        assert j.migrated_from == 1 and j.generation == "ab" * 16
        assert j.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 3, "v1")).duplicate
        new = j.append(BatchId("imu-1", 1, 2), make_batch("imu-1", ["veh-1"], "v2"))
        assert new.ranges == (SeqRange("veh-1", 4, 4),) and new.first == Position(4)
        assert j.cursor("router") == Position(2)
        commit = ConsumerCommit("router", 1, Position(2), Position(4))
        assert not j.commit_consumer(commit).duplicate and j.commit_consumer(commit).duplicate
        assert j.advance_watermark("veh-1", "p1", 4) == 4  # v2's table
        assert j.verify().ok
    with open_readonly(path) as reader:
        assert reader.schema_version == SCHEMA_VERSION


def test_failed_migration_leaves_the_journal_at_its_old_version(path: str) -> None:
    _v1_journal(path, "CREATE TABLE watermarks(x);")  # makes the v2 step fail midway
    with pytest.raises(JournalError, match="left unchanged at v1"):
        Journal(path)
    conn = raw(path)
    assert conn.pragma("user_version") == 1
    columns = [row[1] for row in conn.execute("PRAGMA table_info(cursors)")]
    assert columns == ["consumer", "pos", "updated_ns"]  # v2's ALTERs were rolled back too


@pytest.mark.parametrize(
    "content", [b"just some text, not SQLite at all\n" * 200, "sqlite:CREATE TABLE t(x)"]
)
def test_foreign_file_is_not_a_journal_and_is_left_alone(path: str, content: object) -> None:
    if isinstance(content, bytes):
        Path(path).write_bytes(content)
    else:
        conn = apsw.Connection(path)
        conn.execute(content.removeprefix("sqlite:"))
        conn.close()
    before = Path(path).read_bytes()
    with pytest.raises(NotAJournal, match="not a fleetgw journal"):
        Journal(path)
    with pytest.raises(NotAJournal):
        open_readonly(path)
    assert Path(path).read_bytes() == before


def test_readonly_open_of_a_missing_journal_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "journal.db"
    with pytest.raises(JournalNotFound, match=str(missing)):
        open_readonly(str(missing))
    assert not missing.parent.exists()


# -- operators: stats, verify and `fleetgw journal stats|verify` -----------------------------


def _two_devices(journal: Journal) -> None:
    journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 3 + ["veh-2"] * 2, "a"))
    journal.commit_consumer(ConsumerCommit("router", 1, START, Position(4)))
    journal.advance_watermark("veh-1", "p1", 2)


def test_stats_show_each_device_cursor_and_watermark(journal: Journal) -> None:
    _two_devices(journal)
    stats = journal.stats()
    assert [(d.device_id, d.seq_lo, d.seq_hi, d.count, d.last_seq) for d in stats.devices] == [
        ("veh-1", 1, 3, 3, 3),
        ("veh-2", 1, 2, 2, 2),
    ]
    assert stats.records == 5 and stats.last_position == Position(5)
    assert [(c.consumer, c.pos) for c in stats.cursors] == [("router", Position(4))]
    assert stats.generation == journal.generation and stats.schema_version == SCHEMA_VERSION
    assert stats.usage_bytes == stats.db_bytes + stats.wal_bytes == journal.usage_bytes()
    assert stats.budget_bytes == journal.disk_budget_bytes


def test_verify_finds_a_seq_gap_and_a_counter_out_of_step(journal: Journal, path: str) -> None:
    _two_devices(journal)
    assert journal.verify().ok
    tamper = raw(path)
    tamper.execute("DELETE FROM records WHERE device_id = 'veh-1' AND seq = 2")
    tamper.execute("UPDATE devices SET last_seq = 9 WHERE device_id = 'veh-2'")
    report = journal.verify()
    assert not report.ok and report.integrity == ("ok",)
    assert any("veh-1" in p and "after seq 1 comes 3" in p for p in report.problems)
    assert any("veh-2" in p and "last_seq=9" in p for p in report.problems)
    assert len(report.problems) == 2


def test_stats_command_prints_one_json_object(journal: Journal, path: str, capsys) -> None:
    from tools.journal_cmd import stats_command

    _two_devices(journal)
    assert stats_command(path, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    required = {"devices", "records", "cursors", "watermarks", "db_bytes", "wal_bytes"}
    assert required | {"generation", "schema_version"} <= set(out)
    assert out["devices"]["veh-2"] == {"seq_lo": 1, "seq_hi": 2, "count": 2, "last_seq": 2}
    assert out["records"] == 5 and out["generation"] == journal.generation
    assert stats_command(path, as_json=False) == 0
    table = capsys.readouterr().out
    assert "veh-1" in table and "router" in table and journal.generation in table


def test_verify_command_exit_status_says_whether_i2_holds(
    journal: Journal, path: str, capsys
) -> None:
    from tools.journal_cmd import verify_command

    _two_devices(journal)
    assert verify_command(path) == 0
    raw(path).execute("DELETE FROM records WHERE pos = 1")
    assert verify_command(path) == 1
    assert "veh-1" in capsys.readouterr().out


def test_journal_commands_on_a_missing_file_exit_2_naming_it(tmp_path: Path, capsys) -> None:
    from tools.journal_cmd import stats_command, verify_command

    missing = str(tmp_path / "journal.db")
    assert stats_command(missing, as_json=True) == 2
    assert verify_command(missing) == 2
    assert capsys.readouterr().err.count(missing) == 2
    assert not os.path.exists(missing)
