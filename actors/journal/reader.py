"""Reading the journal: consumers' read-only view, plus the stats and checks operators run.

Where this sits on the data path: step 3 — a consumer (router, model runner, uplink lane) reads
records after its cursor through its own `JournalReader` (a read-only connection: it never
competes with the single writer, I3, and WAL lets it read while the writer commits), then
sends its outputs and new cursor to the journal. `fleetgw journal stats|verify` open the same
read-only way (`open_readonly`), so inspecting a journal never creates or changes one.

`collect_stats` and `verify_journal` take any connection: the writer (`Journal`) uses them on
its own connection, the CLI on a read-only one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import apsw
import attrs

from actors.journal.schema import BUSY_TIMEOUT_MS, JournalNotFound, NotAJournal, check_readable
from messages.journal import Position
from messages.readings import Value, decode_values


@attrs.frozen(slots=True)
class Record:
    """One journal record as a consumer sees it; ``payload`` is the reading's values as JSON."""

    pos: Position
    device_id: str
    seq: int
    sensor_id: str
    ts: int
    kind: str
    payload: str

    @property
    def values(self) -> dict[str, Value]:
        """The reading's values, decoded from ``payload``."""
        return decode_values(self.payload)


@attrs.frozen(slots=True)
class DeviceStats:
    """Records a device has in the journal: ``count`` records with seqs ``seq_lo..seq_hi``;
    ``last_seq`` is the device's counter (== seq_hi while nothing was deleted)."""

    device_id: str
    seq_lo: int
    seq_hi: int
    count: int
    last_seq: int


@attrs.frozen(slots=True)
class CursorStats:
    """A consumer's durable cursor."""

    consumer: str
    pos: Position
    updated_ns: int


@attrs.frozen(slots=True)
class WatermarkStats:
    """Central acknowledged ``device_id``'s records of ``lane`` up to ``seq``."""

    device_id: str
    lane: str
    seq: int


@attrs.frozen(slots=True)
class JournalStats:
    """A snapshot of the journal for operators and metrics.

    ``usage_bytes`` is what the disk budget counts (live pages + WAL); ``budget_bytes`` is None
    when read without the writer's configuration (the CLI).
    """

    path: str
    generation: str
    schema_version: int
    devices: tuple[DeviceStats, ...]
    records: int
    last_position: Position
    cursors: tuple[CursorStats, ...]
    watermarks: tuple[WatermarkStats, ...]
    db_bytes: int
    wal_bytes: int
    usage_bytes: int
    budget_bytes: int | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the shape `fleetgw journal stats --json` prints)."""
        return {
            "path": self.path,
            "generation": self.generation,
            "schema_version": self.schema_version,
            "devices": {
                d.device_id: {
                    "seq_lo": d.seq_lo,
                    "seq_hi": d.seq_hi,
                    "count": d.count,
                    "last_seq": d.last_seq,
                }
                for d in self.devices
            },
            "records": self.records,
            "last_position": self.last_position.value,
            "cursors": {
                c.consumer: {"pos": c.pos.value, "updated_ns": c.updated_ns} for c in self.cursors
            },
            "watermarks": [
                {"device_id": w.device_id, "lane": w.lane, "seq": w.seq} for w in self.watermarks
            ],
            "db_bytes": self.db_bytes,
            "wal_bytes": self.wal_bytes,
            "usage_bytes": self.usage_bytes,
            "budget_bytes": self.budget_bytes,
        }


@attrs.frozen(slots=True)
class VerifyReport:
    """What `verify_journal` found: SQLite's integrity check and invariant I2 per device.
    ``problems`` is empty when both hold."""

    path: str
    integrity: tuple[str, ...]
    devices_checked: int
    records_checked: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _wal_bytes(path: str) -> int:
    try:
        return os.stat(path + "-wal").st_size
    except FileNotFoundError:
        return 0


def db_usage(conn: apsw.Connection, path: str) -> tuple[int, int]:
    """(bytes of live database pages, bytes of the WAL file) — what the disk budget counts."""
    # Table-valued pragmas in one cacheable statement: this runs before every append.
    pages, free, page_size = conn.execute(
        "SELECT page_count, freelist_count, page_size "
        "FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
    ).fetchone()
    return (pages - free) * page_size, _wal_bytes(path)


def read_meta(conn: apsw.Connection, key: str) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise NotAJournal(conn.filename, f"meta.{key} is missing")
    return row[0]


def last_position(conn: apsw.Connection) -> Position:
    """The highest Position ever assigned (records may since have been deleted)."""
    return Position(int(read_meta(conn, "last_pos")))


@contextmanager
def read_snapshot(conn: apsw.Connection) -> Iterator[None]:
    """One read transaction (BEGIN DEFERRED takes no write lock, even on the writer's
    connection), so several queries see the same state."""
    conn.execute("BEGIN DEFERRED")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")


def _has_seq_index(conn: apsw.Connection) -> bool:
    """Whether records carries UNIQUE(device_id, seq): the aggregate I2 check relies on it."""
    for _, name, unique, *_ in conn.execute("PRAGMA index_list(records)"):
        columns = [row[2] for row in conn.execute("SELECT * FROM pragma_index_info(?)", (name,))]
        if unique and columns == ["device_id", "seq"]:
            return True
    return False


def read_records(conn: apsw.Connection, after: Position, limit: int) -> list[Record]:
    """Up to ``limit`` records with position > ``after``, in position order."""
    rows = conn.execute(
        "SELECT pos, device_id, seq, sensor_id, ts, kind, payload FROM records "
        "WHERE pos > ? ORDER BY pos LIMIT ?",
        (after.value, limit),
    )
    return [Record(Position(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]


def read_watermarks(conn: apsw.Connection) -> dict[str, dict[str, int]]:
    """device_id -> lane -> acknowledged seq."""
    marks: dict[str, dict[str, int]] = {}
    for device_id, lane, seq in conn.execute(
        "SELECT device_id, lane, seq FROM watermarks ORDER BY device_id, lane"
    ):
        marks.setdefault(device_id, {})[lane] = seq
    return marks


def collect_stats(conn: apsw.Connection, path: str, budget_bytes: int | None) -> JournalStats:
    """Per-device seq ranges and counts, cursors, watermarks and sizes, via SQL aggregates
    (the (device_id, seq) index covers the per-device scan)."""
    with read_snapshot(conn):  # the numbers agree with each other
        per_device = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT device_id, min(seq), max(seq), count(*) FROM records GROUP BY device_id"
            )
        }
        devices = []
        for device_id, last_seq in conn.execute(
            "SELECT device_id, last_seq FROM devices ORDER BY device_id"
        ):
            lo, hi, count = per_device.pop(device_id, (0, 0, 0))
            devices.append(DeviceStats(device_id, lo, hi, count, last_seq))
        # Records of a device missing from `devices` would break I2: show them, verify flags it.
        devices.extend(DeviceStats(d, lo, hi, n, 0) for d, (lo, hi, n) in per_device.items())
        cursors = tuple(
            CursorStats(c, Position(p), u)
            for c, p, u in conn.execute(
                "SELECT consumer, pos, updated_ns FROM cursors ORDER BY consumer"
            )
        )
        watermarks = tuple(
            WatermarkStats(*row)
            for row in conn.execute(
                "SELECT device_id, lane, seq FROM watermarks ORDER BY device_id, lane"
            )
        )
        db_bytes, wal_bytes = db_usage(conn, path)
        return JournalStats(
            path=path,
            generation=read_meta(conn, "generation"),
            schema_version=conn.pragma("user_version"),
            devices=tuple(devices),
            records=sum(d.count for d in devices),
            last_position=last_position(conn),
            cursors=cursors,
            watermarks=watermarks,
            db_bytes=db_bytes,
            wal_bytes=wal_bytes,
            usage_bytes=db_bytes + wal_bytes,
            budget_bytes=budget_bytes,
        )


def _first_gaps(conn: apsw.Connection, device_id: str, limit: int = 3) -> list[str]:
    """Where a bad device's seqs break (only run for devices that failed the aggregate check)."""
    rows = conn.execute(
        """SELECT prev, seq FROM (
               SELECT seq, lag(seq, 1, 0) OVER (ORDER BY seq) AS prev
               FROM records WHERE device_id = ?)
           WHERE seq != prev + 1 LIMIT ?""",
        (device_id, limit),
    )
    return [f"after seq {prev} comes {seq}" for prev, seq in rows]


def verify_journal(conn: apsw.Connection, path: str) -> VerifyReport:
    """SQLite's integrity check plus I2: per device, the seqs present are exactly 1..max (no
    gap, no duplicate) and ``devices.last_seq`` equals that max.

    Aggregates only: with UNIQUE(device_id, seq) (its index is checked by integrity_check),
    ``min == 1`` and ``count == max`` prove the seqs are exactly 1..max.
    """
    problems: list[str] = []
    integrity = tuple(row[0] for row in conn.execute("PRAGMA integrity_check"))
    if integrity != ("ok",):
        problems.extend(f"integrity: {line}" for line in integrity)
    records = devices = 0
    if not _has_seq_index(conn):
        problems.append("schema: records lacks UNIQUE(device_id, seq); duplicates go unnoticed")
    with read_snapshot(conn):  # the aggregates and the counters they are compared with
        counters = dict(conn.execute("SELECT device_id, last_seq FROM devices"))
        for device_id, lo, hi, count in conn.execute(
            "SELECT device_id, min(seq), max(seq), count(*) FROM records GROUP BY device_id"
        ):
            devices += 1
            records += count
            last_seq = counters.pop(device_id, None)
            if lo != 1 or count != hi:
                where = "; ".join(_first_gaps(conn, device_id)) or "duplicate seqs"
                problems.append(
                    f"I2: device {device_id} has {count} records with seqs {lo}..{hi}, "
                    f"expected exactly 1..{hi}: {where}"
                )
            if last_seq is None:
                problems.append(f"I2: device {device_id} has records but no seq counter")
            elif last_seq != hi:
                problems.append(
                    f"I2: device {device_id} counter last_seq={last_seq} but its highest seq is {hi}"
                )
        for device_id, last_seq in counters.items():
            devices += 1
            if last_seq != 0:
                problems.append(
                    f"I2: device {device_id} counter last_seq={last_seq} but it has no records"
                )
    return VerifyReport(path, integrity, devices, records, tuple(problems))


class JournalReader:
    """A consumer's read-only view of the journal (never writes; reads while the writer
    commits). Each call reads one consistent snapshot."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        # Never create: a missing file is an error, not an empty journal.
        if not os.path.isfile(self.path):
            raise JournalNotFound(self.path)
        try:
            self._conn = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
        except apsw.CantOpenError as exc:
            raise JournalNotFound(self.path) from exc
        try:
            self._conn.set_busy_timeout(BUSY_TIMEOUT_MS)
            self.schema_version = check_readable(self._conn, self.path)
            self.generation = read_meta(self._conn, "generation")
        except BaseException:
            self._conn.close()
            raise

    def read(self, after: Position, limit: int) -> list[Record]:
        """Up to ``limit`` records with position > ``after``, in position order."""
        return read_records(self._conn, after, limit)

    def last_position(self) -> Position:
        return last_position(self._conn)

    def watermarks(self) -> dict[str, dict[str, int]]:
        return read_watermarks(self._conn)

    def stats(self) -> JournalStats:
        return collect_stats(self._conn, self.path, None)

    def verify(self) -> VerifyReport:
        return verify_journal(self._conn, self.path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_readonly(path: str) -> JournalReader:
    """Open an existing journal for inspection (stats, verify) without creating or changing it.

    Raises JournalNotFound, NotAJournal, SchemaTooNew or SchemaTooOld with a message that
    names the path.
    """
    return JournalReader(path)


__all__ = [
    "CursorStats",
    "DeviceStats",
    "JournalReader",
    "JournalStats",
    "Record",
    "VerifyReport",
    "WatermarkStats",
    "collect_stats",
    "open_readonly",
    "verify_journal",
]
