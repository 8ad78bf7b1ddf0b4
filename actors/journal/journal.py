"""The journal: the single writer of journal.db (I3), as a plain class the actor wraps.

Where this sits on the data path: step 2 — a sensor's `Append` becomes `Journal.append`, which
commits the batch in one SQLite transaction, assigns each reading the next per-device seq (I2),
and returns `Appended` only after COMMIT returned (I1). Step 3 — a consumer's outputs and its
cursor advance commit together in `commit_consumer` (I4). Step 6 — the uplink's acknowledged
sync points go through `advance_watermark`. Refusals (disk budget, full disk, invalid input)
are returned as values, never raised, and never touch what is already committed (I7, I8).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from itertools import repeat

import apsw

from actors.journal.reader import (
    JournalStats,
    Record,
    VerifyReport,
    collect_stats,
    db_usage,
    read_meta,
    read_records,
    read_watermarks,
    verify_journal,
)
from actors.journal.schema import (
    JournalError,
    batch_problem,
    open_for_writing,
    ranges_from_json,
    ranges_to_json,
)
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

DEFAULT_DISK_BUDGET_BYTES = 1 << 30
DEFAULT_REFUSED_RETRY_S = 1.0
#: What the budget check assumes an append adds: each reading's bytes plus its (device_id, seq)
#: index entry, twice (the pages, and their copies in the WAL until a checkpoint), plus the
#: few pages every commit touches (index and table interiors, devices, meta, batches).
INDEX_ENTRY_BYTES = 24
COMMIT_OVERHEAD_BYTES = 64 << 10
#: How long a sensor incarnation's batch ids are kept after their commit once a newer
#: incarnation appends: longer than a message stays in flight, so a dead incarnation's late
#: resend is still recognised.
DEAD_INCARNATION_GRACE_NS = 10 * 60 * 10**9

_INSERT_RECORD = (
    "INSERT INTO records(device_id, seq, sensor_id, ts, kind, payload, committed_ns) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_RECORD_AT = (
    "INSERT INTO records(pos, device_id, seq, sensor_id, ts, kind, payload, committed_ns) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SET_CURSOR = (
    "INSERT INTO cursors(consumer, pos, updated_ns, last_request_id, last_ranges) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(consumer) DO UPDATE SET pos = excluded.pos, "
    "updated_ns = excluded.updated_ns, last_request_id = excluded.last_request_id, "
    "last_ranges = excluded.last_ranges"
)
_SET_DEVICE_SEQ = (
    "INSERT INTO devices(device_id, last_seq) VALUES (?, ?) "
    "ON CONFLICT(device_id) DO UPDATE SET last_seq = excluded.last_seq"
)


class Journal:
    """The only writer of journal.db: appends, consumer commits, watermarks, stats, verify.

    Synchronous and single-threaded; the journal actor turns messages into these calls.
    ``synchronous`` is SQLite's (FULL: every returned commit survives power loss);
    ``disk_budget_bytes`` bounds database + WAL (appends beyond it are refused, I7);
    ``refused_retry_s`` is the back-off a refused sender is told to wait.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        disk_budget_bytes: int = DEFAULT_DISK_BUDGET_BYTES,
        clock_ns: Callable[[], int] = time.time_ns,
        refused_retry_s: float = DEFAULT_REFUSED_RETRY_S,
    ) -> None:
        if disk_budget_bytes <= 0:
            raise ValueError(f"disk_budget_bytes must be > 0 (got {disk_budget_bytes!r})")
        self.path = os.fspath(path)
        self.disk_budget_bytes = disk_budget_bytes
        self.refused_retry_s = refused_retry_s
        self._clock_ns = clock_ns
        self._closed = False
        # Refuses a foreign or newer file before changing anything; migrates an older one.
        self._conn, self.migrated_from = open_for_writing(self.path, synchronous, clock_ns)
        try:
            self._generation = read_meta(self._conn, "generation")
            # The highest Position committed; advanced only after a COMMIT returned.
            self._last_pos = int(read_meta(self._conn, "last_pos"))
        except BaseException:
            self._conn.close()
            raise

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; on any error (including a failed COMMIT, which SQLite may
        or may not have rolled back already) roll back so nothing half-done remains."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _insert(self, batch: ReadingBatch, now: int) -> tuple[tuple[SeqRange, ...], int]:
        """Insert ``batch`` after the last position with the next per-device seqs; return the
        seq ranges and the new last position. Runs inside a transaction."""
        n = len(batch)
        pos0 = self._last_pos
        devices = batch.device_ids
        first_device = devices[0]
        if devices.count(first_device) == n:
            # One device (the common case): seqs are a range, rows a zip — no Python loop.
            lo = self._device_seq(first_device) + 1
            spans = {first_device: [lo, lo + n - 1]}
            device_col: object = repeat(first_device)
            seq_col: object = range(lo, lo + n)
        else:
            spans = {}
            seqs = []
            for device in devices:
                span = spans.get(device)
                if span is None:
                    seq = self._device_seq(device) + 1
                    spans[device] = [seq, seq]
                else:
                    span[1] += 1
                    seq = span[1]
                seqs.append(seq)
            device_col, seq_col = devices, seqs
        columns = (
            device_col,
            seq_col,
            repeat(batch.sensor_id),
            batch.ts,
            batch.kinds,
            batch.payloads,
            repeat(now),
        )
        # SQLite numbers new rows max(pos) + 1: exactly the next positions while the highest
        # record is still there, and binding no pos is ~5% faster (measured). If the tail was
        # deleted, that would reuse positions, so they are then given explicitly.
        # (A list of tuples binds ~3% faster in apsw than the bare zip iterator; strict=False
        # because the repeat() columns are endless — batch_problem checked the lengths.)
        (max_pos,) = self._conn.execute("SELECT max(pos) FROM records").fetchone()
        if (max_pos or 0) == pos0:
            self._conn.executemany(_INSERT_RECORD, list(zip(*columns, strict=False)))
        else:
            positions = range(pos0 + 1, pos0 + n + 1)
            rows = list(zip(positions, *columns, strict=False))
            self._conn.executemany(_INSERT_RECORD_AT, rows)
        if self._conn.last_insert_rowid() != pos0 + n:  # cannot happen with a single writer (I3)
            raise JournalError(self.path, f"positions out of step: expected pos:{pos0 + n}")
        # The counters and the position high-water mark move in the same transaction (I2).
        self._conn.executemany(_SET_DEVICE_SEQ, [(d, hi) for d, (_, hi) in spans.items()])
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'last_pos'", (str(pos0 + n),))
        ranges = tuple(SeqRange(d, lo, hi) for d, (lo, hi) in spans.items())
        return ranges, pos0 + n

    def _device_seq(self, device_id: str) -> int:
        row = self._conn.execute(
            "SELECT last_seq FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        return row[0] if row else 0

    def _budget_problem(self, batch: ReadingBatch) -> str | None:
        usage = self.usage_bytes()
        need = 2 * (batch.nbytes + INDEX_ENTRY_BYTES * len(batch)) + COMMIT_OVERHEAD_BYTES
        if usage + need <= self.disk_budget_bytes:
            return None
        return (
            f"journal {self.path} uses {usage} of its {self.disk_budget_bytes}-byte disk budget "
            f"and this batch needs ~{need} more; data is kept until space is freed "
            f"(see `fleetgw journal stats --db {self.path}`)"
        )

    # -- sensors: appends ---------------------------------------------------------------------

    def append(
        self, batch_id: BatchId, batch: ReadingBatch, resend_floor: int = 0
    ) -> Appended | AppendRefused:
        """Commit ``batch`` once; return `Appended` only after COMMIT returned (I1).

        A batch id already committed returns the original ranges with ``duplicate=True`` and
        stores nothing. ``resend_floor``: ids of this incarnation numbered below it are
        forgotten (the sender will not resend them); a new incarnation's first append forgets
        the earlier incarnations' ids once they are `DEAD_INCARNATION_GRACE_NS` old.
        Refusals: ``invalid`` (do not retry), ``disk_budget`` and ``disk_full`` (retry after
        ``retry_after_s``); nothing is written and nothing committed is lost.
        """
        problem = batch_problem(batch)
        if problem is None and batch.sensor_id != batch_id.sensor_id:
            problem = f"batch of sensor {batch.sensor_id!r} sent as {batch_id.sensor_id!r}"
        if problem is not None:
            return AppendRefused(batch_id, "invalid", problem, 0.0)
        key = (batch_id.sensor_id, batch_id.incarnation, batch_id.batch_no)
        try:
            with self._transaction():
                # 1. A resent batch: answer with the original commit.
                row = self._conn.execute(
                    "SELECT first_pos, last_pos, ranges FROM batches "
                    "WHERE sensor_id = ? AND incarnation = ? AND batch_no = ?",
                    key,
                ).fetchone()
                if row is not None:
                    ranges, first, last = ranges_from_json(row[2]), *map(Position, row[:2])
                    return Appended(batch_id, ranges, first, last, duplicate=True)
                if batch_id.batch_no < self._resend_floor(batch_id):
                    # Below the floor: committed and acknowledged earlier, id since forgotten.
                    return Appended(batch_id, (), START, START, duplicate=True)
                # 2. Refusals before any write.
                problem = self._budget_problem(batch)
                if problem is not None:
                    return AppendRefused(batch_id, "disk_budget", problem, self.refused_retry_s)
                now = self._clock_ns()
                self._forget_dead_incarnations(batch_id, now)
                # 3. The rows, then the batch id that makes a resend a no-op.
                first = self._last_pos + 1
                ranges, last = self._insert(batch, now)
                self._conn.execute(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*key, first, last, ranges_to_json(ranges), now),
                )
                if resend_floor > 0:
                    self._conn.execute(
                        "DELETE FROM batches WHERE sensor_id = ? AND incarnation = ? "
                        "AND batch_no < ?",
                        (batch_id.sensor_id, batch_id.incarnation, resend_floor),
                    )
                    self._conn.execute(
                        "INSERT INTO resend_floors VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (sensor_id, incarnation) DO UPDATE SET "
                        "floor = max(floor, excluded.floor), updated_ns = excluded.updated_ns",
                        (batch_id.sensor_id, batch_id.incarnation, resend_floor, now),
                    )
        except apsw.FullError as exc:
            return AppendRefused(
                batch_id,
                "disk_full",
                f"disk holding {self.path} is full ({exc}); nothing of this batch was written",
                self.refused_retry_s,
            )
        except apsw.ConstraintError as exc:
            if exc.extendedresult != apsw.SQLITE_CONSTRAINT_DATATYPE:
                raise  # a UNIQUE violation means a second writer or a bug: crash loudly (I3)
            return AppendRefused(batch_id, "invalid", f"wrongly typed column: {exc}", 0.0)
        self._last_pos = last
        return Appended(batch_id, ranges, Position(first), Position(last))

    def _resend_floor(self, batch_id: BatchId) -> int:
        row = self._conn.execute(
            "SELECT floor FROM resend_floors WHERE sensor_id = ? AND incarnation = ?",
            (batch_id.sensor_id, batch_id.incarnation),
        ).fetchone()
        return 0 if row is None else row[0]

    def _forget_dead_incarnations(self, batch_id: BatchId, now: int) -> None:
        """On an incarnation's first append, drop the ids its sensor's earlier incarnations
        committed more than `DEAD_INCARNATION_GRACE_NS` ago.

        Not at once: incarnation ids are random, so the journal cannot tell a new incarnation
        from a dead one whose message arrives late; keeping the dead one's ids a while means
        such a late resend is still recognised instead of stored twice.
        """
        seen = self._conn.execute(
            "SELECT 1 FROM batches WHERE sensor_id = ? AND incarnation = ? LIMIT 1",
            (batch_id.sensor_id, batch_id.incarnation),
        ).fetchone()
        if seen is None:
            old = (batch_id.sensor_id, batch_id.incarnation, now - DEAD_INCARNATION_GRACE_NS)
            self._conn.execute(
                "DELETE FROM batches WHERE sensor_id = ? AND incarnation != ? "
                "AND committed_ns < ?",
                old,
            )
            self._conn.execute(
                "DELETE FROM resend_floors WHERE sensor_id = ? AND incarnation != ? "
                "AND updated_ns < ?",
                old,
            )

    def usage_bytes(self) -> int:
        """Bytes the disk budget counts: live database pages plus the WAL file."""
        db_bytes, wal_bytes = db_usage(self._conn, self.path)
        return db_bytes + wal_bytes

    # -- consumers: reads and commits (I4) ----------------------------------------------------

    def read(self, after: Position, limit: int) -> list[Record]:
        """Up to ``limit`` records after ``after``, in position order (consumers normally
        read through their own `JournalReader`)."""
        return read_records(self._conn, after, limit)

    def commit_consumer(self, commit: ConsumerCommit) -> ConsumerCommitted | ConsumerCommitRefused:
        """Commit ``commit.outputs`` and move the consumer's cursor in one transaction (I4).

        Refused, with nothing written, when the stored cursor is not ``commit.expected`` — unless
        it already equals ``commit.new`` by this same ``request_id`` (a resend: answered
        ``duplicate=True``; so a consumer must not reuse a request id, even after a restart).
        ``reason`` reads ``code: detail``; codes: cursor_mismatch, cursor_backwards,
        cursor_beyond_end, invalid, disk_budget, disk_full.
        """
        request = (commit.consumer, commit.request_id)
        stored = START

        def refuse(code: str, detail: str) -> ConsumerCommitRefused:
            return ConsumerCommitRefused(*request, stored, f"{code}: {detail}")

        outputs = commit.outputs
        if outputs is not None and (problem := batch_problem(outputs)) is not None:
            return refuse("invalid", problem)
        last = self._last_pos
        ranges: tuple[SeqRange, ...] = ()
        try:
            with self._transaction():
                row = self._conn.execute(
                    "SELECT pos, last_request_id, last_ranges FROM cursors WHERE consumer = ?",
                    (commit.consumer,),
                ).fetchone()
                if row is not None:
                    stored = Position(row[0])
                    if stored == commit.new and row[1] == commit.request_id:
                        ranges = ranges_from_json(row[2])
                        return ConsumerCommitted(*request, stored, ranges, duplicate=True)
                if stored != commit.expected:
                    return refuse("cursor_mismatch", f"cursor is {stored}, not {commit.expected}")
                if commit.new < commit.expected:
                    return refuse("cursor_backwards", f"{commit.new} is before {commit.expected}")
                if commit.new.value > self._last_pos:
                    return refuse(
                        "cursor_beyond_end", f"{commit.new} is after pos:{self._last_pos}"
                    )
                now = self._clock_ns()
                if outputs is not None:
                    problem = self._budget_problem(outputs)
                    if problem is not None:
                        return refuse("disk_budget", problem)
                    ranges, last = self._insert(outputs, now)
                self._conn.execute(
                    _SET_CURSOR,
                    (commit.consumer, commit.new.value, now, commit.request_id, ranges_to_json(ranges)),
                )
        except apsw.FullError as exc:
            return refuse("disk_full", f"disk holding {self.path} is full ({exc})")
        except apsw.ConstraintError as exc:
            if exc.extendedresult != apsw.SQLITE_CONSTRAINT_DATATYPE:
                raise
            return refuse("invalid", f"wrongly typed column: {exc}")
        self._last_pos = last
        return ConsumerCommitted(*request, commit.new, ranges)

    def cursor(self, consumer: str) -> Position:
        """The consumer's durable cursor; START if it never committed."""
        row = self._conn.execute(
            "SELECT pos FROM cursors WHERE consumer = ?", (consumer,)
        ).fetchone()
        return Position(row[0]) if row else START

    def last_position(self) -> Position:
        """The highest committed Position (positions are never reused)."""
        return Position(self._last_pos)

    # -- uplink: watermarks -------------------------------------------------------------------

    def advance_watermark(self, device_id: str, lane: str, seq: int) -> int:
        """Record that central acknowledged ``device_id``'s ``lane`` up to ``seq``; return the
        durable watermark (the max of the stored and the requested: it never goes back).

        Raises ValueError for a seq the device never had (an uplink bug, not a fact), and
        apsw.FullError when the disk is full (nothing changed; retry later).
        """
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"watermark seq must be an int >= 0 (got {seq!r})")
        with self._transaction():
            last_seq = self._device_seq(device_id)
            if seq > last_seq:
                raise ValueError(
                    f"watermark {device_id}/{lane} seq {seq} is beyond the device's last seq "
                    f"{last_seq} in generation {self._generation}"
                )
            (stored,) = self._conn.execute(
                "INSERT INTO watermarks VALUES (?, ?, ?, ?) ON CONFLICT(device_id, lane) "
                "DO UPDATE SET seq = max(seq, excluded.seq), updated_ns = excluded.updated_ns "
                "RETURNING seq",
                (device_id, lane, seq, self._clock_ns()),
            ).fetchone()
        return stored

    def watermarks(self) -> dict[str, dict[str, int]]:
        """device_id -> lane -> acknowledged seq."""
        return read_watermarks(self._conn)

    # -- operators ----------------------------------------------------------------------------

    @property
    def generation(self) -> str:
        """The random id made when this journal was created; central keys include it (I2)."""
        return self._generation

    def stats(self) -> JournalStats:
        return collect_stats(self._conn, self.path, self.disk_budget_bytes)

    def verify(self) -> VerifyReport:
        return verify_journal(self._conn, self.path)

    def close(self) -> None:
        """Close the connection (PRAGMA optimize first: keeps the query planner's stats fresh)."""
        if self._closed:
            return
        self._closed = True
        with suppress(apsw.Error):  # best effort; closing must not fail on a full disk
            self._conn.pragma("optimize")
        self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
