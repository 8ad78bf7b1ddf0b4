"""The journal: the single writer of journal.db (I3), as a plain class the actor wraps.

Where this sits on the data path: step 2 — a sensor's `Append` becomes `Journal.append`, which
commits the batch in one SQLite transaction, assigns each reading the next per-device seq (I2),
and returns `Appended` only after COMMIT returned (I1). Step 3 — a consumer's outputs and its
cursor advance commit together in `commit_consumer` (I4). Step 6 — the uplink's acknowledged
sync points go through `advance_watermark`. Refusals (disk budget, full disk, invalid input)
are returned as values, never raised, and never touch what is already committed (I7, I8).
"""

from __future__ import annotations

import heapq
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from itertools import groupby, repeat

import apsw

from actors.journal.keys import (
    SEAL_OVERHEAD_BYTES,
    KeyRing,
    check_keyring,
    register_active_key,
)
from actors.journal.reader import (
    JournalStats,
    Record,
    VerifyReport,
    collect_stats,
    db_usage,
    read_consumer_state,
    read_cursor,
    read_meta,
    read_records,
    read_watermarks,
    verify_journal,
    wal_bytes,
)
from actors.journal.schema import (
    BUSY_TIMEOUT_MS,
    JOURNAL_SIZE_LIMIT_BYTES,
    JournalError,
    batch_problem,
    extras_problem,
    open_for_writing,
    ranges_from_json,
    ranges_to_json,
)
from messages.journal import (
    LANES,
    START,
    UNROUTED,
    Aggregated,
    Appended,
    AppendRefused,
    BatchId,
    ConsumerCommit,
    ConsumerCommitRefused,
    ConsumerCommitted,
    Position,
    QuarantinedInput,
    RouteDecisions,
    SeqRange,
    SourceMark,
)
from messages.readings import ReadingBatch

DEFAULT_DISK_BUDGET_BYTES = 1 << 30
DEFAULT_REFUSED_RETRY_S = 1.0
#: What the budget check assumes an append adds: each reading's bytes plus its (device_id, seq)
#: index entry, twice (the pages, and their copies in the WAL until a checkpoint), plus the
#: few pages every commit touches (index and table interiors, devices, meta, batches).
INDEX_ENTRY_BYTES = 48  # (device_id, seq) and (lane, device_id, seq)
COMMIT_OVERHEAD_BYTES = 64 << 10
#: What routing adds to a record (lane, rule, drop, expiry columns and the moved index entry),
#: besides the rule's name, twice (pages and WAL copies).
DECISION_BYTES = 48
DEFAULT_P1_RESERVE_FRACTION = 0.1
#: Quarantined inputs kept (the oldest go beyond it; the totals still count them).
DEFAULT_QUARANTINE_MAX_ROWS = 10_000
#: Eviction deletes at most this many records between two looks at the usage.
EVICT_CHUNK_RECORDS = 256
#: WAL bytes one evicted record may cost when it sits among kept records (its table page and
#: index pages rewritten); bounds the records one transaction evicts to the WAL reserve.
EVICT_WAL_BYTES_PER_RECORD = 512
#: The WAL is checkpointed when it holds this fraction of the budget (at most SQLite's default
#: 1000 pages), so on a small budget it stays small; the budget check reserves twice that.
WAL_BUDGET_DIVISOR = 32  # checkpoint at 1/32 of the budget; reserve 1/8 (see _size_wal)
WAL_FRAME_HEADER_BYTES = 24
#: Seconds between two attempts to truncate an oversized WAL.
TRUNCATE_RETRY_S = 2.0
#: Eviction classes, in the order I7 takes them.
EVICTION_ORDER = ("expired", "policy_dropped", "synced", "aggregated", "oldest_p2")
#: How long a sensor incarnation's batch ids are kept after their commit once a newer
#: incarnation appends: longer than a message stays in flight, so a dead incarnation's late
#: resend is still recognised. Measured on the journal's steady clock (`Journal._steady_ns`).
DEAD_INCARNATION_GRACE_NS = 10 * 60 * 10**9

_INSERT_RECORD = (
    "INSERT INTO records(device_id, seq, sensor_id, ts, kind, payload, committed_ns, key_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_RECORD_AT = (
    "INSERT INTO records(pos, device_id, seq, sensor_id, ts, kind, payload, committed_ns, "
    "key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ROUTED_AT = (
    "INSERT INTO records(pos, device_id, seq, sensor_id, ts, kind, payload, committed_ns, "
    "key_id, lane) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# A commit without state (?6 NULL) keeps the state (and the key that sealed it) it had.
_SET_CURSOR = (
    "INSERT INTO cursors(consumer, pos, updated_ns, last_request_id, last_ranges, state, "
    "state_key_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(consumer) DO UPDATE SET "
    "pos = excluded.pos, updated_ns = excluded.updated_ns, "
    "last_request_id = excluded.last_request_id, last_ranges = excluded.last_ranges, "
    "state = coalesce(?6, state), "
    "state_key_id = CASE WHEN ?6 IS NULL THEN state_key_id ELSE ?7 END"
)
_ROUTE = (
    "UPDATE records SET lane = ?2, rule = ?3, drop_reason = ?4, expires_ns = ?5 "
    "WHERE pos = ?1 AND lane IS NULL"
)
# Only records routed by a decision (rule set): a consumer's own outputs are never "raw".
_MARK_AGGREGATED = (
    "UPDATE records SET aggregated = 1 WHERE device_id = ? AND sensor_id = ? "
    "AND pos BETWEEN ? AND ? AND lane = 'P3' AND rule IS NOT NULL"
)
_COUNT_DROPS = (
    "INSERT INTO drops(reason, lane, records, bytes) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(reason, lane) DO UPDATE SET records = records + excluded.records, "
    "bytes = bytes + excluded.bytes"
)
_EVICT_COLUMNS = "pos, device_id, seq, lane, octet_length(payload)"
_EVICT_QUERIES = {
    # P1 records leave only once synced (class "synced"), whatever their expiry says.
    "expired": f"SELECT {_EVICT_COLUMNS} FROM records WHERE expires_ns IS NOT NULL "
    "AND expires_ns <= ? AND lane IS NOT NULL AND lane != 'P1' ORDER BY pos LIMIT ?",
    "policy_dropped": f"SELECT {_EVICT_COLUMNS} FROM records WHERE drop_reason IS NOT NULL "
    "ORDER BY pos LIMIT ?",
    "synced": f"SELECT {_EVICT_COLUMNS} FROM records WHERE lane = ? AND device_id = ? "
    "AND seq <= ? ORDER BY seq LIMIT ?",
    "aggregated": f"SELECT {_EVICT_COLUMNS} FROM records WHERE aggregated = 1 "
    "ORDER BY pos LIMIT ?",
    "oldest_p2": f"SELECT {_EVICT_COLUMNS} FROM records WHERE lane = 'P2' AND device_id = ? "
    "ORDER BY seq LIMIT ?",
}
_SET_DEVICE_SEQ = (
    "INSERT INTO devices(device_id, last_seq) VALUES (?, ?) "
    "ON CONFLICT(device_id) DO UPDATE SET last_seq = excluded.last_seq"
)


class Journal:
    """The only writer of journal.db: appends, consumer commits, watermarks, stats, verify.

    Synchronous and single-threaded; the journal actor turns messages into these calls.
    ``synchronous`` is SQLite's (FULL: every returned commit survives power loss);
    ``disk_budget_bytes`` bounds database + WAL (I7): when an insert would go beyond it, the
    journal first evicts (expired, policy-dropped, synced, aggregated raw P3, oldest P2 — in
    that order, never unrouted or unsynced P1), and only then refuses;
    ``p1_reserve_fraction`` of the budget is kept for P1 outputs (safety events) and for
    routing: sensor appends may use only the rest;
    ``refused_retry_s`` is the back-off a refused sender is told to wait.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        disk_budget_bytes: int = DEFAULT_DISK_BUDGET_BYTES,
        clock_ns: Callable[[], int] = time.time_ns,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        refused_retry_s: float = DEFAULT_REFUSED_RETRY_S,
        p1_reserve_fraction: float = DEFAULT_P1_RESERVE_FRACTION,
        quarantine_max_rows: int = DEFAULT_QUARANTINE_MAX_ROWS,
        keyring: KeyRing | None = None,
    ) -> None:
        if quarantine_max_rows <= 0:
            raise ValueError(f"quarantine_max_rows must be > 0 (got {quarantine_max_rows!r})")
        self.quarantine_max_rows = quarantine_max_rows
        if disk_budget_bytes <= 0:
            raise ValueError(f"disk_budget_bytes must be > 0 (got {disk_budget_bytes!r})")
        if not 0.0 <= p1_reserve_fraction < 1.0:
            raise ValueError(f"p1_reserve_fraction must be in [0, 1) (got {p1_reserve_fraction!r})")
        self.path = os.fspath(path)
        self.disk_budget_bytes = disk_budget_bytes
        self.p1_reserve_fraction = p1_reserve_fraction
        #: What sensor appends (and outputs outside P1) may fill; the rest is the P1 reserve.
        self.sensor_budget_bytes = int(disk_budget_bytes * (1.0 - p1_reserve_fraction))
        #: Eviction figures since this Journal opened: chunks, records, seconds spent.
        self.eviction_chunks = 0
        self.evicted_records = 0
        self.eviction_s = 0.0
        self.refused_retry_s = refused_retry_s
        self._clock_ns = clock_ns
        self._monotonic_ns = monotonic_ns
        #: Batch ids are stamped on a steady clock: the wall time at open plus the monotonic
        #: time since. A wall clock stepping forward (a Pi without an RTC fixing its time)
        #: must not age a dead incarnation's ids past their grace at once, or its late
        #: resend would be stored twice.
        self._steady_origin = (clock_ns(), monotonic_ns())
        self._closed = False
        # Refuses a foreign or newer file before changing anything; migrates an older one.
        self._conn, self.migrated_from = open_for_writing(self.path, synchronous, clock_ns)
        try:
            self._generation = read_meta(self._conn, "generation")
            # The highest Position committed; advanced only after a COMMIT returned.
            self._last_pos = int(read_meta(self._conn, "last_pos"))
            self._size_wal(disk_budget_bytes)
            #: Seals new payloads (None: stored in clear). A wrong or missing key is refused
            #: here, before anything is written (keys.check_keyring).
            self.keyring = keyring
            self.retired_key_ids = check_keyring(self._conn, self.path, keyring)
            if keyring is not None:
                register_active_key(self._conn, keyring, clock_ns())
        except BaseException:
            self._conn.close()
            raise

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; on any error (including a failed COMMIT, which SQLite may
        or may not have rolled back already) roll back so nothing half-done remains."""
        self._conn.execute("BEGIN IMMEDIATE")
        self._wal_bytes_at_begin = wal_bytes(self.path)
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        if (max(self._wal_bytes_at_begin, wal_bytes(self.path)) > self._wal_reserve
                and time.monotonic() >= self._next_truncate_at):
            # A big transaction (an eviction, a large routing commit) grew the WAL past its
            # reserve: checkpoint and truncate it now rather than carry it. This runs on the
            # acknowledgement path, so it never waits for readers; and when a consumer's read
            # keeps the WAL in use the attempt fails after copying frames, so after a failure
            # the next attempt waits TRUNCATE_RETRY_S (retrying on every commit put ~0.3 s on
            # the ack p99). The COMMIT has returned: a checkpoint that fails because the disk
            # is full (copying new pages grows the database file) must not turn it into a
            # refusal — the caller would report a committed batch as not written, keep a stale
            # last position, and crash on the next insert.
            self._conn.set_busy_timeout(0)
            try:
                busy = 1
                with suppress(apsw.BusyError, apsw.LockedError, apsw.FullError):
                    busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                self._conn.set_busy_timeout(BUSY_TIMEOUT_MS)
            if busy:
                self._next_truncate_at = time.monotonic() + TRUNCATE_RETRY_S

    def _insert(
        self, batch: ReadingBatch, now: int, lane: str | None = None, after: int | None = None
    ) -> tuple[tuple[SeqRange, ...], int]:
        """Insert ``batch`` after position ``after`` (default: the last committed) with the
        next per-device seqs, each record in ``lane`` (None = unrouted); return the seq ranges
        and the new last position. Runs inside a transaction (a second batch in the same
        transaction passes the first's last position as ``after``)."""
        n = len(batch)
        pos0 = self._last_pos if after is None else after
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
            batch.payloads if self.keyring is None else self.keyring.seal_texts(batch.payloads),
            repeat(now),
            repeat(None if self.keyring is None else self.keyring.active_id),
        )
        # SQLite numbers new rows max(pos) + 1: exactly the next positions while the highest
        # record is still there, and binding no pos is ~5% faster (measured). If the tail was
        # deleted, that would reuse positions, so they are then given explicitly.
        (max_pos,) = self._conn.execute("SELECT max(pos) FROM records").fetchone()
        # (A list of tuples binds ~3% faster in apsw than the bare zip iterator; strict=False
        # because the repeat() columns are endless — batch_problem checked the lengths.)
        if lane is not None:
            positions = range(pos0 + 1, pos0 + n + 1)
            rows = list(zip(positions, *columns, repeat(lane), strict=False))
            self._conn.executemany(_INSERT_ROUTED_AT, rows)
        elif (max_pos or 0) == pos0:
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

    def _size_wal(self, budget: int) -> None:
        """Checkpoint the WAL once it holds 1/`WAL_BUDGET_DIVISOR` of the budget (SQLite's
        default 1000 pages at most), truncate it back to 4x that after a checkpoint, and
        let the budget check reserve that much for it: then database file + WAL stay within
        the budget even though the file never shrinks (evicted pages are reused)."""
        page_size = self._conn.pragma("page_size")
        pages = max(8, min(1000, budget // WAL_BUDGET_DIVISOR // page_size))
        self._conn.pragma("wal_autocheckpoint", pages)
        # The WAL holds up to a checkpoint's worth plus the largest transaction (a router
        # commit touching many pages, an eviction): reserve four checkpoints' worth.
        self._wal_reserve = 4 * pages * (page_size + WAL_FRAME_HEADER_BYTES)
        self._next_truncate_at = 0.0
        self._conn.pragma(
            "journal_size_limit", min(JOURNAL_SIZE_LIMIT_BYTES, self._wal_reserve)
        )

    def _deficit(self, need: int, limit: int, wal_bytes: int | None = None) -> int:
        """Bytes missing for an insert of ~``need`` bytes to stay within ``limit`` (<= 0: it
        fits). Counts live pages (free pages are reused before the file grows) and the WAL
        (``wal_bytes``, default its file's size), at least its reserve. Cheap: three pragmas
        and a stat."""
        db_bytes, wal_now = db_usage(self._conn, self.path)
        wal = wal_now if wal_bytes is None else wal_bytes
        return db_bytes + max(wal, self._wal_reserve) + need - limit

    def _need(self, batches: tuple[ReadingBatch, ...]) -> int:
        """What the budget check assumes inserting ``batches`` adds (pages and WAL copies)."""
        per_record = INDEX_ENTRY_BYTES + (0 if self.keyring is None else SEAL_OVERHEAD_BYTES)
        return (
            sum(2 * (b.nbytes + per_record * len(b)) for b in batches)
            + COMMIT_OVERHEAD_BYTES
        )

    def _budget_detail(self, need: int, limit: int) -> str:
        usage = self.usage_bytes()
        return (
            f"journal {self.path} uses {usage} of the {limit} bytes of its "
            f"{self.disk_budget_bytes}-byte disk budget this data may use, this needs ~{need} "
            f"more and nothing more may be evicted (unrouted and unsynced P1 records are "
            f"kept); data is kept until space is freed "
            f"(see `fleetgw journal stats --db {self.path}`)"
        )

    def _make_room(self, need: int, limit: int, now: int) -> bool:
        """Evict (I7) until an insert of ~``need`` bytes fits within ``limit``; return whether
        it does. Runs inside the caller's transaction, so evictions commit with it."""
        if self._deficit(need, limit) <= 0:
            return True
        # Against the WAL as it was when the transaction began: evicting writes WAL frames
        # too, and chasing them would evict far more than the insert needs (the reserve is
        # there for a transaction's frames).
        wal_before = self._wal_bytes_at_begin
        # Deleting rows scattered among kept ones rewrites their pages into the WAL: bound
        # what one transaction evicts so its WAL frames stay within the reserve. Not done:
        # the caller refuses (a commit without outputs proceeds); the next try goes on.
        cap = max(EVICT_CHUNK_RECORDS, self._wal_reserve // EVICT_WAL_BYTES_PER_RECORD)
        evicted = 0
        for reason in EVICTION_ORDER:
            while evicted < cap:
                started = time.perf_counter()
                rows = self._eviction_candidates(reason, now)
                if not rows:
                    break
                self._evict(rows, reason)
                evicted += len(rows)
                self.eviction_chunks += 1
                self.evicted_records += len(rows)
                self.eviction_s += time.perf_counter() - started
                if self._deficit(need, limit, wal_before) <= 0:
                    return True
        return False

    def _eviction_candidates(self, reason: str, now: int) -> list[tuple]:
        """The next chunk of ``reason``'s records, oldest position first:
        rows of (pos, device_id, seq, lane, payload bytes)."""
        query = _EVICT_QUERIES[reason]
        n = EVICT_CHUNK_RECORDS
        if reason == "expired":
            return self._conn.execute(query, (now, n)).fetchall()
        if reason in ("policy_dropped", "aggregated"):
            return self._conn.execute(query, (n,)).fetchall()
        # Per (device, lane): seq order is position order within a device, so each probe is
        # an exact index range; merged across devices by position.
        if reason == "synced":
            probes = [
                (lane, device_id, seq, n)
                for device_id, lane, seq in self._conn.execute(
                    "SELECT device_id, lane, seq FROM watermarks"
                )
                if lane in LANES
            ]
        else:  # oldest_p2
            probes = [(d, n) for (d,) in self._conn.execute("SELECT device_id FROM devices")]
        runs = [self._conn.execute(query, args).fetchall() for args in probes]
        return list(heapq.merge(*runs))[:n]

    def _evict(self, rows: list[tuple], reason: str) -> None:
        """Delete ``rows`` (from `_eviction_candidates`), count them in drops by lane and
        record their exact seq runs per device in ``evicted`` (so verify still proves I2)."""
        self._conn.executemany("DELETE FROM records WHERE pos = ?", [(r[0],) for r in rows])
        counts: dict[str, list[int]] = {}
        for _, _, _, lane, nbytes in rows:
            c = counts.setdefault(lane, [0, 0])
            c[0] += 1
            c[1] += nbytes
        self._conn.executemany(
            _COUNT_DROPS, [(reason, lane, n, b) for lane, (n, b) in counts.items()]
        )
        by_device = sorted((r[1], r[3], r[2]) for r in rows)  # device, lane, seq
        for (device_id, lane), group in groupby(by_device, key=lambda r: (r[0], r[1])):
            seqs = [r[2] for r in group]
            lo = prev = seqs[0]
            for seq in (*seqs[1:], None):
                if seq is not None and seq == prev + 1:
                    prev = seq
                    continue
                self._add_evicted_run(device_id, lo, prev, reason, lane)
                if seq is not None:
                    lo = prev = seq

    def _add_evicted_run(self, device_id: str, lo: int, hi: int, reason: str, lane: str) -> None:
        """Record that ``device_id``'s seqs ``lo..hi`` were evicted, merged with the runs just
        below and just above it, so the table holds at most one run per gap between kept
        records (it stays small however scattered eviction is). A merged run of several
        reasons or lanes says "mixed" (drops keeps the exact counts by reason and lane)."""
        conn = self._conn
        below = conn.execute(
            "SELECT rowid, seq_lo, seq_hi, reason, lane FROM evicted "
            "WHERE device_id = ? AND seq_lo < ? ORDER BY seq_lo DESC LIMIT 1",
            (device_id, lo),
        ).fetchone()
        above = conn.execute(
            "SELECT rowid, seq_lo, seq_hi, reason, lane FROM evicted "
            "WHERE device_id = ? AND seq_lo = ?",
            (device_id, hi + 1),
        ).fetchone()
        reasons, lanes, gone = {reason}, {lane}, []
        if below is not None and below[2] == lo - 1:
            lo = below[1]
            reasons.add(below[3])
            lanes.add(below[4])
            gone.append(below[0])
        if above is not None:
            hi = above[2]
            reasons.add(above[3])
            lanes.add(above[4])
            gone.append(above[0])
        if gone:
            conn.executemany("DELETE FROM evicted WHERE rowid = ?", [(r,) for r in gone])
        conn.execute(
            "INSERT INTO evicted VALUES (?, ?, ?, ?, ?)",
            (
                device_id,
                lo,
                hi,
                reason if len(reasons) == 1 else "mixed",
                lane if len(lanes) == 1 else "mixed",
            ),
        )

    def _count_drops(self, reason: str, lane: str, records: int, nbytes: int) -> None:
        self._conn.execute(_COUNT_DROPS, (reason, lane, records, nbytes))

    # -- sensors: appends ---------------------------------------------------------------------

    def append(
        self,
        batch_id: BatchId,
        batch: ReadingBatch | None,
        resend_floor: int = 0,
        quarantined: tuple[QuarantinedInput, ...] = (),
        marks: tuple[SourceMark, ...] = (),
    ) -> Appended | AppendRefused:
        """Commit ``batch`` once; return `Appended` only after COMMIT returned (I1).

        A batch id already committed returns the original ranges with ``duplicate=True`` and
        stores nothing. ``resend_floor``: ids of this incarnation numbered below it are
        forgotten (the sender will not resend them); a new incarnation's first append forgets
        the earlier incarnations' ids once they are `DEAD_INCARNATION_GRACE_NS` old.
        In the same transaction: ``quarantined`` inputs join the bounded quarantine (I8) and
        ``marks`` replace the sensor's source marks of the same keys. ``batch`` may be None
        when there are only those (the reply then has no ranges).
        Refusals: ``invalid`` (do not retry), ``disk_budget`` and ``disk_full`` (retry after
        ``retry_after_s``); nothing is written and nothing committed is lost.
        """
        problem = None if batch is None and (quarantined or marks) else batch_problem(batch)
        if problem is None and batch is not None and batch.sensor_id != batch_id.sensor_id:
            problem = f"batch of sensor {batch.sensor_id!r} sent as {batch_id.sensor_id!r}"
        if problem is None:
            problem = extras_problem(quarantined, marks)
        if problem is not None:
            return AppendRefused(batch_id, "invalid", problem, 0.0)
        key = (batch_id.sensor_id, batch_id.incarnation, batch_id.batch_no)
        batches = () if batch is None else (batch,)
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
                # 2. Room within the sensors' share of the budget: evict, else refuse (the
                #    evictions and the refusal's count commit; nothing of the batch does).
                now = self._clock_ns()
                need = self._need(batches) + sum(q.nbytes for q in quarantined) * 2
                if not self._make_room(need, self.sensor_budget_bytes, now):
                    n = 0 if batch is None else len(batch)
                    nbytes = 0 if batch is None else batch.nbytes
                    self._count_drops("refused_budget", UNROUTED, n, nbytes)
                    detail = self._budget_detail(need, self.sensor_budget_bytes)
                    return AppendRefused(batch_id, "disk_budget", detail, self.refused_retry_s)
                steady = self._steady_ns()
                self._forget_dead_incarnations(batch_id, steady)
                # 3. The rows, then the batch id that makes a resend a no-op.
                if batch is None:  # positions stay where they are: first == last
                    first, ranges, last = self._last_pos, (), self._last_pos
                else:
                    first = self._last_pos + 1
                    ranges, last = self._insert(batch, now)
                self._conn.execute(
                    "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*key, first, last, ranges_to_json(ranges), steady),
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
                if quarantined:
                    self._quarantine(batch_id.sensor_id, quarantined, now)
                if marks:
                    self._conn.executemany(
                        "INSERT INTO source_marks VALUES (?, ?, ?, ?) ON CONFLICT "
                        "(sensor_id, key) DO UPDATE SET value = excluded.value, "
                        "updated_ns = excluded.updated_ns",
                        [(batch_id.sensor_id, m.key, m.value, now) for m in marks],
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
        except (UnicodeEncodeError, OverflowError) as exc:
            # Text SQLite cannot store (a lone surrogate) or an int beyond 64 bits: retrying
            # cannot help, and crashing would have the same batch resent forever (I8).
            return AppendRefused(batch_id, "invalid", f"unstorable value: {exc}", 0.0)
        self._last_pos = last
        return Appended(batch_id, ranges, Position(first), Position(last))

    def _steady_ns(self) -> int:
        """Wall time at open + monotonic time since: steps of the wall clock while the
        journal runs do not move it. (Across a restart it starts again from the wall clock;
        messages in flight to the old journal died with it, so no late resend spans that.)"""
        wall0, mono0 = self._steady_origin
        return wall0 + self._monotonic_ns() - mono0

    def _quarantine(self, sensor_id: str, items: tuple[QuarantinedInput, ...], now: int) -> None:
        """Add ``items`` to the quarantine, trim it to ``quarantine_max_rows`` (oldest first)
        and move the sensor's totals. Inside the caller's transaction."""
        ring = self.keyring
        raws = [q.raw for q in items] if ring is None else ring.seal([q.raw for q in items])
        key_id = None if ring is None else ring.active_id
        self._conn.executemany(
            "INSERT INTO quarantine(sensor_id, source, reason, raw, raw_len, received_ns, "
            "committed_ns, key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(sensor_id, q.source, q.reason, raw, q.raw_len if q.raw_len >= 0 else len(q.raw),
              q.received_ns, now, key_id) for q, raw in zip(items, raws, strict=True)],
        )
        (rows, max_id) = self._conn.execute(
            "SELECT count(*), max(id) FROM quarantine").fetchone()
        trimmed: dict[str, int] = {}
        if rows > self.quarantine_max_rows:
            cut = max_id - self.quarantine_max_rows  # ids grow: keep the newest max_rows
            for sid, n in self._conn.execute(
                "SELECT sensor_id, count(*) FROM quarantine WHERE id <= ? GROUP BY sensor_id",
                (cut,),
            ):
                trimmed[sid] = n
            self._conn.execute("DELETE FROM quarantine WHERE id <= ?", (cut,))
        self._conn.execute(
            "INSERT INTO quarantine_totals VALUES (?, ?, 0, ?, ?) ON CONFLICT (sensor_id) DO "
            "UPDATE SET quarantined = quarantined + excluded.quarantined, "
            "last_reason = excluded.last_reason, last_ns = excluded.last_ns",
            (sensor_id, len(items), items[-1].reason, now),
        )
        self._conn.executemany(
            "UPDATE quarantine_totals SET trimmed = trimmed + ? WHERE sensor_id = ?",
            [(n, sid) for sid, n in trimmed.items()],
        )

    def source_marks(self, sensor_id: str) -> dict[str, str]:
        """Sensor ``sensor_id``'s committed source marks (key -> value)."""
        return dict(self._conn.execute(
            "SELECT key, value FROM source_marks WHERE sensor_id = ?", (sensor_id,)))

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
        return read_records(self._conn, after, limit, self.keyring)

    def commit_consumer(self, commit: ConsumerCommit) -> ConsumerCommitted | ConsumerCommitRefused:
        """Commit everything ``commit`` carries and move the consumer's cursor, in one
        transaction (I4): its routing decisions (a decision for a position that does not exist
        or is already routed is ignored), its aggregated marks, its outputs (each record given
        lane ``output_lane``), the policy drops counted by reason and lane, and its state.

        Refused, with nothing written, when the stored cursor is not ``commit.expected`` — unless
        it already equals ``commit.new`` by this same ``request_id`` (a resend: answered
        ``duplicate=True``; so a consumer must not reuse a request id, even after a restart).
        Space: outputs in lane P1 may use the whole budget, other outputs the sensors' share;
        eviction makes room first. A commit without outputs is never refused for space.
        ``reason`` reads ``code: detail``; codes: cursor_mismatch, cursor_backwards,
        cursor_beyond_end, invalid, disk_budget, disk_full.
        """
        request = (commit.consumer, commit.request_id)
        stored = START

        def refuse(code: str, detail: str) -> ConsumerCommitRefused:
            return ConsumerCommitRefused(*request, stored, f"{code}: {detail}")

        try:
            batches = commit.output_batches
        except TypeError:
            return refuse("invalid", f"outputs must be ReadingBatches (got {commit.outputs!r})")
        problem = _commit_problem(commit, batches)
        if problem is not None:
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
                # 1. Room first (evictions commit even if the outputs are then refused).
                decisions = commit.decisions
                need = self._need(batches) if batches else COMMIT_OVERHEAD_BYTES
                if decisions is not None:
                    need += 2 * sum(DECISION_BYTES + len(r) for r in decisions.rule)
                full = not batches or commit.output_lane == "P1"
                limit = self.disk_budget_bytes if full else self.sensor_budget_bytes
                if not self._make_room(need, limit, now) and batches:
                    self._count_drops(
                        "refused_budget",
                        commit.output_lane or UNROUTED,
                        sum(len(b) for b in batches),
                        sum(b.nbytes for b in batches),
                    )
                    return refuse("disk_budget", self._budget_detail(need, limit))
                # 2. Decisions, then marks (which need the lanes), then the outputs.
                if decisions is not None:
                    self._route(decisions)
                if commit.aggregated:
                    self._conn.executemany(
                        _MARK_AGGREGATED,
                        [(a.device_id, a.sensor_id, a.first, a.last) for a in commit.aggregated],
                    )
                for batch in batches:
                    batch_ranges, last = self._insert(batch, now, commit.output_lane, last)
                    ranges += batch_ranges
                self._conn.execute(
                    _SET_CURSOR,
                    (
                        commit.consumer,
                        commit.new.value,
                        now,
                        commit.request_id,
                        ranges_to_json(ranges),
                        *self._sealed_state(commit.state),
                    ),
                )
        except apsw.FullError as exc:
            return refuse("disk_full", f"disk holding {self.path} is full ({exc})")
        except apsw.ConstraintError as exc:
            if exc.extendedresult != apsw.SQLITE_CONSTRAINT_DATATYPE:
                raise
            return refuse("invalid", f"wrongly typed column: {exc}")
        self._last_pos = last
        return ConsumerCommitted(*request, commit.new, ranges)

    def _route(self, decisions: RouteDecisions) -> None:
        """Apply routing decisions to unrouted records; count the policy drops among those
        applied (a resent decision matches no unrouted record and counts nothing)."""
        columns = (decisions.pos, decisions.lane, decisions.rule, decisions.drop,
                   decisions.expires_ns)
        kept = [row for row in zip(*columns, strict=True) if row[3] is None]
        dropped = [row for row in zip(*columns, strict=True) if row[3] is not None]
        if kept:
            self._conn.executemany(_ROUTE, kept)
        counts: dict[tuple[str, str], list[int]] = {}
        for row in dropped:
            for (nbytes,) in self._conn.execute(_ROUTE + " RETURNING octet_length(payload)", row):
                c = counts.setdefault((row[3], row[1]), [0, 0])
                c[0] += 1
                c[1] += nbytes
        if counts:
            self._conn.executemany(
                _COUNT_DROPS, [(r, lane, n, b) for (r, lane), (n, b) in counts.items()]
            )

    def _sealed_state(self, state: str | None) -> tuple[str | bytes | None, int | None]:
        """A consumer's state as stored, and the key id that sealed it."""
        if state is None or self.keyring is None:
            return state, None
        return self.keyring.seal_texts([state])[0], self.keyring.active_id

    def consumer_state(self, consumer: str) -> tuple[Position, str | None]:
        """The consumer's durable cursor and the state it committed with it: where a
        restarted consumer resumes ((START, None) if it never committed)."""
        return read_consumer_state(self._conn, consumer, self.keyring)

    def cursor(self, consumer: str) -> Position:
        """The consumer's durable cursor; START if it never committed."""
        return read_cursor(self._conn, consumer)

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
        return collect_stats(self._conn, self.path, self.disk_budget_bytes, self._clock_ns())

    def verify(self) -> VerifyReport:
        return verify_journal(self._conn, self.path, self.keyring)

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


def _commit_problem(commit: ConsumerCommit, batches: tuple[ReadingBatch, ...]) -> str | None:
    """Why ``commit`` cannot be applied, or None (checked before any write)."""
    for batch in batches:
        if (problem := batch_problem(batch)) is not None:
            return problem
    if commit.output_lane is not None and commit.output_lane not in LANES:
        return f"output_lane {commit.output_lane!r} is not one of {', '.join(LANES)}"
    d = commit.decisions
    if d is not None:
        if not isinstance(d, RouteDecisions):
            return f"decisions must be RouteDecisions (got {type(d).__name__})"
        n = len(d.pos)
        lengths = {len(d.lane), len(d.rule), len(d.drop), len(d.expires_ns)}
        if lengths != {n}:
            return (
                f"decision columns differ in length: pos={n} lane={len(d.lane)} "
                f"rule={len(d.rule)} drop={len(d.drop)} expires_ns={len(d.expires_ns)}"
            )
        if not set(d.lane) <= set(LANES):
            return f"decision lanes {sorted(set(d.lane) - set(LANES))} are not lanes ({LANES})"
        if any(type(p) is not int for p in d.pos):
            return "decision positions must be ints"
        if any(type(r) is not str for r in d.rule):
            return "decision rules must be str"
        if any(r is not None and type(r) is not str for r in d.drop):
            return "decision drop reasons must be str or None"
        if any(e is not None and type(e) is not int for e in d.expires_ns):
            return "decision expiries must be int nanoseconds or None"
    for a in commit.aggregated:
        if not isinstance(a, Aggregated) or type(a.first) is not int or type(a.last) is not int:
            return f"aggregated must hold Aggregated(device_id, sensor_id, first, last), got {a!r}"
    if commit.state is not None:
        if not isinstance(commit.state, str):
            return f"state must be JSON text (got {type(commit.state).__name__})"
        try:
            json.loads(commit.state)
        except ValueError as exc:
            return f"state is not JSON: {exc}"
    return None
