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
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import apsw
import attrs

from actors.journal.keys import (
    JournalKeyError,
    KeyRing,
    check_keyring,
    load_keyring,
    sealed_counts,
)
from actors.journal.schema import (
    BUSY_TIMEOUT_MS,
    JournalNotFound,
    NotAJournal,
    check_readable,
    give_back_to_owner,
)
from messages.journal import LANES, UNROUTED, Position
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


#: The columns `to_records` turns into Records (key_id: what sealed the payload, NULL: clear).
RECORD_COLUMNS = "pos, device_id, seq, sensor_id, ts, kind, payload, key_id"


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
class LaneStats:
    """Records of one lane (or "unrouted"): how many, their payload bytes, and the age of the
    oldest one not yet synced (seq above its device's watermark for the lane; policy-dropped
    records are never synced and do not count); None when every record is synced."""

    lane: str
    records: int
    bytes: int
    oldest_unsynced_age_s: float | None


@attrs.frozen(slots=True)
class LaneBacklog:
    """What waits in ``lane``: ``records`` with ``bytes`` of payload, the oldest of them with
    reading time ``oldest_ts`` (ns; None when nothing waits). For P1, P2 and P3: not yet
    acknowledged by central (seq above its device's watermark for the lane, not policy-dropped:
    what the uplink sends). For "unrouted": not yet routed (after the router's cursor)."""

    lane: str
    records: int
    bytes: int
    oldest_ts: int | None


@attrs.frozen(slots=True)
class QuarantineStats:
    """Inputs of ``sensor_id`` that its source could not decode: ``quarantined`` in all,
    ``trimmed`` of them since removed to keep the quarantine bounded, the latest reason."""

    sensor_id: str
    quarantined: int
    trimmed: int
    last_reason: str
    last_ns: int


@attrs.frozen(slots=True)
class QuarantinedRow:
    """One quarantined input as stored (``raw`` cut to QUARANTINE_RAW_MAX bytes)."""

    id: int
    sensor_id: str
    source: str
    reason: str
    raw: bytes
    raw_len: int
    received_ns: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sensor_id": self.sensor_id,
            "source": self.source,
            "reason": self.reason,
            "raw_hex": self.raw.hex(),
            "raw_len": self.raw_len,
            "received_ns": self.received_ns,
        }


@attrs.frozen(slots=True)
class DropStats:
    """Records dropped for ``reason`` from ``lane``: policy drops ("duplicate", ...), eviction
    ("expired", "policy_dropped", "synced", "aggregated", "oldest_p2") and refusals for space
    ("refused_budget", counted each time a batch is refused)."""

    reason: str
    lane: str
    records: int
    bytes: int


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
    lanes: tuple[LaneStats, ...] = ()
    drops: tuple[DropStats, ...] = ()
    quarantine: tuple[QuarantineStats, ...] = ()

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
            "lanes": {
                lane.lane: {
                    "records": lane.records,
                    "bytes": lane.bytes,
                    "oldest_unsynced_age_s": lane.oldest_unsynced_age_s,
                }
                for lane in self.lanes
            },
            "drops": _drops_json(self.drops),
            "quarantine": {
                q.sensor_id: {"quarantined": q.quarantined, "trimmed": q.trimmed,
                              "kept": q.quarantined - q.trimmed, "last_reason": q.last_reason,
                              "last_ns": q.last_ns}
                for q in self.quarantine
            },
        }


def _drops_json(drops: tuple[DropStats, ...]) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {}
    for d in drops:
        out.setdefault(d.reason, {})[d.lane] = {"records": d.records, "bytes": d.bytes}
    return out


@attrs.frozen(slots=True)
class VerifyReport:
    """What `verify_journal` found: SQLite's integrity check and invariant I2 per device.
    ``problems`` is empty when both hold."""

    path: str
    integrity: tuple[str, ...]
    devices_checked: int
    records_checked: int
    problems: tuple[str, ...]
    #: Seqs accounted for by eviction's runs (they complete the cover of 1..last_seq).
    evicted_checked: int = 0
    #: (key id, records + quarantined inputs + consumer states sealed with it), for every key
    #: still needed.
    sealed_by_key: tuple[tuple[int, int], ...] = ()
    #: Sealed payloads whose MAC was checked (all of them when a key ring was given).
    payloads_opened: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def wal_bytes(path: str) -> int:
    """Size of the journal's WAL file (0 when there is none)."""
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
    return (pages - free) * page_size, wal_bytes(path)


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


def to_records(rows: Iterable[tuple], keyring: KeyRing | None) -> list[Record]:
    """Records from rows of ``RECORD_COLUMNS``, each sealed payload opened with ``keyring``
    (JournalKeyError if it cannot be: no ring, a key it lacks, a damaged record)."""
    out = []
    for pos, device_id, seq, sensor_id, ts, kind, payload, key_id in rows:
        if key_id is not None:
            if keyring is None:
                raise JournalKeyError(
                    "", f"record {device_id}/{seq} is sealed with key id {key_id} and no "
                    "journal key file was given (--key-file, or [journal] key_file)")
            payload = keyring.open(key_id, payload, f"record {device_id}/{seq}").decode()
        out.append(Record(Position(pos), device_id, seq, sensor_id, ts, kind, payload))
    return out


def read_records(conn: apsw.Connection, after: Position, limit: int,
                 keyring: KeyRing | None = None) -> list[Record]:
    """Up to ``limit`` records with position > ``after``, in position order."""
    rows = conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM records "
        "WHERE pos > ? ORDER BY pos LIMIT ?",
        (after.value, limit),
    )
    return to_records(rows, keyring)


def read_consumer_state(conn: apsw.Connection, consumer: str,
                        keyring: KeyRing | None = None) -> tuple[Position, str | None]:
    """A consumer's durable cursor and the state it stored with it ((START, None) if it never
    committed); a sealed state is opened with ``keyring``."""
    row = conn.execute(
        "SELECT pos, state, state_key_id FROM cursors WHERE consumer = ?", (consumer,)
    ).fetchone()
    if row is None:
        return Position(0), None
    pos, state, key_id = row
    if key_id is not None:
        what = f"the state of consumer {consumer}"
        if keyring is None:
            raise JournalKeyError(conn.filename, f"{what} is sealed with key id {key_id} and no "
                                  "journal key file was given")
        state = keyring.open(key_id, state, what).decode()
    return Position(pos), state


def read_cursor(conn: apsw.Connection, consumer: str) -> Position:
    """A consumer's durable cursor (START if it never committed); needs no key."""
    row = conn.execute("SELECT pos FROM cursors WHERE consumer = ?", (consumer,)).fetchone()
    return Position(row[0]) if row else Position(0)


def _lane_stats(conn: apsw.Connection, now_ns: int) -> tuple[LaneStats, ...]:
    """Per lane: counts and payload bytes (one scan of records: an operator's question, not a
    per-commit one), and the oldest unsynced record's age (one index probe per device)."""
    totals = {
        lane: (n, b)
        for lane, n, b in conn.execute(
            "SELECT lane, count(*), total(octet_length(payload)) FROM records GROUP BY lane"
        )
    }
    marks = {(d, lane): seq for d, lane, seq in conn.execute(
        "SELECT device_id, lane, seq FROM watermarks")}
    devices = [row[0] for row in conn.execute("SELECT device_id FROM devices")]
    lanes = []
    for lane in (*LANES, UNROUTED):
        key = None if lane == UNROUTED else lane
        n, b = totals.pop(key, (0, 0))
        oldest = None
        # A lane: a probe of its (lane, device_id, seq) index. Unrouted records have no entry
        # there: the (device_id, seq) index, skipping routed ones (a scan, like the totals).
        where = "lane IS NULL AND ?1 IS NULL" if key is None else "lane = ?1"
        for device_id in devices if n else ():
            row = conn.execute(
                f"SELECT ts FROM records WHERE {where} AND device_id = ?2 AND seq > ?3 "
                "AND drop_reason IS NULL ORDER BY seq LIMIT 1",
                (key, device_id, marks.get((device_id, lane), 0)),
            ).fetchone()
            if row is not None and (oldest is None or row[0] < oldest):
                oldest = row[0]
        age = None if oldest is None else max(0.0, (now_ns - oldest) / 1e9)
        lanes.append(LaneStats(lane, n, int(b), age))
    # Lanes outside LANES (a consumer's own output lane): shown, no sync age.
    lanes.extend(LaneStats(str(k), n, int(b), None) for k, (n, b) in sorted(totals.items()))
    return tuple(lanes)


def read_drops(conn: apsw.Connection) -> tuple[DropStats, ...]:
    """The journal's drop counters, per reason and lane (a handful of rows)."""
    return tuple(DropStats(*row) for row in conn.execute(
        "SELECT reason, lane, records, bytes FROM drops ORDER BY reason, lane"))


def read_watermarks(conn: apsw.Connection) -> dict[str, dict[str, int]]:
    """device_id -> lane -> acknowledged seq."""
    marks: dict[str, dict[str, int]] = {}
    for device_id, lane, seq in conn.execute(
        "SELECT device_id, lane, seq FROM watermarks ORDER BY device_id, lane"
    ):
        marks.setdefault(device_id, {})[lane] = seq
    return marks


def collect_stats(
    conn: apsw.Connection, path: str, budget_bytes: int | None, now_ns: int | None = None
) -> JournalStats:
    """Per-device seq ranges and counts, cursors, watermarks, sizes, lanes and drops, via SQL
    aggregates (the (device_id, seq) index covers the per-device scan). ``now_ns`` dates the
    lanes' oldest unsynced records (default: the wall clock)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
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
            lanes=_lane_stats(conn, now_ns),
            drops=read_drops(conn),
            quarantine=tuple(
                QuarantineStats(*row)
                for row in conn.execute(
                    "SELECT sensor_id, quarantined, trimmed, last_reason, last_ns "
                    "FROM quarantine_totals ORDER BY sensor_id"
                )
            ),
        )


def _first_gaps(conn: apsw.Connection, device_id: str, limit: int = 3) -> list[str]:
    """Where a bad device's seqs break: the records present and the evicted runs, merged in
    seq order (only run for devices that failed the aggregate check)."""
    rows = conn.execute(
        """SELECT prev, lo, hi FROM (
               SELECT lo, hi, lag(hi, 1, 0) OVER (ORDER BY lo, hi) AS prev FROM (
                   SELECT seq AS lo, seq AS hi FROM records WHERE device_id = ?1
                   UNION ALL
                   SELECT seq_lo, seq_hi FROM evicted WHERE device_id = ?1))
           WHERE lo != prev + 1 OR hi < lo LIMIT ?2""",
        (device_id, limit),
    )
    found = []
    for prev, lo, hi in rows:
        if hi < lo:
            found.append(f"evicted run {lo}..{hi} is empty")
        elif lo > prev + 1:
            found.append(f"after seq {prev} comes {lo}")
        else:
            found.append(f"seq {lo} is covered twice (records or evicted runs overlap)")
    return found


def _verify_sealed(conn: apsw.Connection, keyring: KeyRing | None,
                   problems: list[str]) -> tuple[tuple[tuple[int, int], ...], int]:
    """Count what each key sealed; with ``keyring``, open (authenticate) every sealed payload,
    quarantined input and consumer state, listing the first few that fail."""
    counts = sealed_counts(conn)
    opened = failed = 0
    if keyring is not None and counts:
        rows = conn.execute(
            "SELECT 'record ' || device_id || '/' || seq, key_id, payload FROM records "
            "WHERE key_id IS NOT NULL UNION ALL SELECT 'quarantined input ' || id, key_id, raw "
            "FROM quarantine WHERE key_id IS NOT NULL UNION ALL SELECT 'the state of ' || "
            "consumer, state_key_id, state FROM cursors WHERE state_key_id IS NOT NULL")
        for what, key_id, sealed in rows:
            try:
                keyring.open(key_id, sealed, what)
                opened += 1
            except JournalKeyError as exc:
                failed += 1
                if failed <= 5:
                    problems.append(f"sealed: {exc}")
        if failed > 5:
            problems.append(f"sealed: ... {failed} payloads in all do not open")
    return tuple(sorted(counts.items())), opened


def verify_journal(conn: apsw.Connection, path: str,
                   keyring: KeyRing | None = None) -> VerifyReport:
    """SQLite's integrity check plus I2: per device, the seqs present plus the runs eviction
    removed cover exactly 1..max (no gap, no overlap) and ``devices.last_seq`` equals that max.

    Aggregates only: with UNIQUE(device_id, seq) (its index is checked by integrity_check)
    records are distinct; no evicted run is empty, overlaps the next run (a window over the
    runs) or holds a record (a range probe of the index per run); so the covered seqs are
    distinct, and ``min == 1`` with ``records + run lengths == max`` proves they are 1..max.

    With ``keyring``, every sealed payload is opened too (its MAC proves it undamaged and
    sealed by that key); without, sealed payloads are counted per key but not checked.
    """
    problems: list[str] = []
    integrity = tuple(row[0] for row in conn.execute("PRAGMA integrity_check"))
    if integrity != ("ok",):
        problems.extend(f"integrity: {line}" for line in integrity)
    records = devices = evicted_seqs = 0
    if not _has_seq_index(conn):
        problems.append("schema: records lacks UNIQUE(device_id, seq); duplicates go unnoticed")
    with read_snapshot(conn):  # the aggregates and the counters they are compared with
        counters = dict(conn.execute("SELECT device_id, last_seq FROM devices"))
        runs = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT device_id, min(seq_lo), max(seq_hi), total(seq_hi - seq_lo + 1), "
                "sum(seq_hi < seq_lo) FROM evicted GROUP BY device_id"
            )
        }
        overlapping = dict(
            conn.execute(
                """SELECT device_id, count(*) FROM (
                       SELECT device_id, seq_lo,
                              lag(seq_hi) OVER (PARTITION BY device_id ORDER BY seq_lo) AS prev
                       FROM evicted)
                   WHERE seq_lo <= prev GROUP BY device_id"""
            )
        )
        for device_id, n in conn.execute(
            "SELECT e.device_id, count(*) FROM evicted e JOIN records r "
            "ON r.device_id = e.device_id AND r.seq BETWEEN e.seq_lo AND e.seq_hi "
            "GROUP BY e.device_id"
        ):
            overlapping[device_id] = overlapping.get(device_id, 0) + n
        present = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT device_id, min(seq), max(seq), count(*) FROM records GROUP BY device_id"
            )
        }
        for device_id in sorted(present.keys() | runs.keys()):
            devices += 1
            r_lo, r_hi, count = present.get(device_id, (None, None, 0))
            e_lo, e_hi, e_count, empty = runs.get(device_id, (None, None, 0, 0))
            e_count = int(e_count)
            records += count
            evicted_seqs += e_count
            lo = min(x for x in (r_lo, e_lo) if x is not None)
            hi = max(x for x in (r_hi, e_hi) if x is not None)
            last_seq = counters.pop(device_id, None)
            if lo != 1 or count + e_count != hi or empty or overlapping.get(device_id):
                where = "; ".join(_first_gaps(conn, device_id)) or "duplicate seqs"
                kept = f"{count} records" + (f" + {e_count} evicted" if e_count else "")
                problems.append(
                    f"I2: device {device_id} has {kept} covering seqs {lo}..{hi}, "
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
        sealed, opened = _verify_sealed(conn, keyring, problems)
    return VerifyReport(path, integrity, devices, records, tuple(problems), evicted_seqs,
                        sealed, opened)


class JournalReader:
    """A consumer's read-only view of the journal (never writes; reads while the writer
    commits). Each call reads one consistent snapshot."""

    def __init__(self, path: str, keyring: KeyRing | None = None) -> None:
        self.path = os.fspath(path)
        #: Opens sealed payloads (None: only records stored in clear can be read; stats,
        #: backlog and verify's I2 checks need no key).
        self.keyring = keyring
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
        return read_records(self._conn, after, limit, self.keyring)

    def last_position(self) -> Position:
        return last_position(self._conn)

    def watermarks(self) -> dict[str, dict[str, int]]:
        return read_watermarks(self._conn)

    def consumer_state(self, consumer: str) -> tuple[Position, str | None]:
        """The consumer's durable cursor and the state it committed with it: where a
        restarted consumer resumes ((START, None) if it never committed)."""
        return read_consumer_state(self._conn, consumer, self.keyring)

    def cursor(self, consumer: str) -> Position:
        """The consumer's durable cursor (START if it never committed); needs no key."""
        return read_cursor(self._conn, consumer)

    def sealed_counts(self) -> dict[int, int]:
        """See `keys.sealed_counts` (what each key id seals here)."""
        return sealed_counts(self._conn)

    def check_keyring(self, ring: KeyRing) -> list[int]:
        """See `keys.check_keyring` (raises if ``ring`` does not fit; the retired ids)."""
        return check_keyring(self._conn, self.path, ring)

    def stats(self) -> JournalStats:
        return collect_stats(self._conn, self.path, None)

    def verify(self) -> VerifyReport:
        return verify_journal(self._conn, self.path, self.keyring)

    def read_lane(self, lane: str, device_id: str, after_seq: int, upto: Position,
                  limit: int) -> list[Record]:
        """See `read_lane` (the uplink's next batch of a device's lane)."""
        return read_lane(self._conn, lane, device_id, after_seq, upto, limit, self.keyring)

    def read_lane_range(self, lane: str, device_id: str, seq_lo: int,
                        seq_hi: int) -> list[Record]:
        """See `read_lane_range` (the records of a planned batch)."""
        return read_lane_range(self._conn, lane, device_id, seq_lo, seq_hi, self.keyring)

    def lane_devices(self, lane: str, upto: Position) -> list[str]:
        """See `lane_devices` (which devices the uplink plans batches for)."""
        return lane_devices(self._conn, lane, upto)

    def lane_sizes(self, lane: str, device_id: str, after_seq: int, upto: Position,
                   limit: int) -> list[tuple[int, int]]:
        """See `lane_sizes` (a batch's boundaries)."""
        return lane_sizes(self._conn, lane, device_id, after_seq, upto, limit)

    def lane_backlog(self, lane: str, upto: Position) -> dict[str, int]:
        """See `lane_backlog` (devices with unsynced records in the lane)."""
        return lane_backlog(self._conn, lane, upto)

    def sync_counts(self) -> dict[str, tuple[int, int, int | None]]:
        """See `sync_counts` (reconciliation with central)."""
        return sync_counts(self._conn)

    def backlog(self, router: str = "router") -> tuple[LaneBacklog, ...]:
        """See `read_backlog` (what waits per lane: the metrics' backlog)."""
        return read_backlog(self._conn, router)

    def drops(self) -> tuple[DropStats, ...]:
        """Records dropped, per reason and lane (the journal's durable counters)."""
        return read_drops(self._conn)

    def usage_bytes(self) -> int:
        """What the disk budget counts: live database pages plus the WAL file."""
        return sum(db_usage(self._conn, self.path))

    def records_per_sensor(self) -> dict[str, int]:
        """Records each sensor has in the journal (the router's aggregates not counted)."""
        return dict(self._conn.execute(
            "SELECT sensor_id, count(*) FROM records WHERE kind NOT LIKE 'agg:%' "
            "GROUP BY sensor_id ORDER BY sensor_id"))

    def source_marks(self, sensor_id: str) -> dict[str, str]:
        """The source marks sensor ``sensor_id`` committed with its batches (key -> value):
        what a restarted source reads back to recognise redeliveries."""
        return dict(self._conn.execute(
            "SELECT key, value FROM source_marks WHERE sensor_id = ?", (sensor_id,)))

    def quarantined(self, limit: int = 100, sensor_id: str | None = None,
                    after_id: int = 0) -> list[QuarantinedRow]:
        """Up to ``limit`` quarantined inputs with id > ``after_id`` (oldest first), of one
        sensor or all."""
        where, args = "id > ?", [after_id]
        if sensor_id is not None:
            where += " AND sensor_id = ?"
            args.append(sensor_id)
        rows = []
        for *fields, key_id in self._conn.execute(
                "SELECT id, sensor_id, source, reason, raw, raw_len, received_ns, key_id "
                f"FROM quarantine WHERE {where} ORDER BY id LIMIT ?", (*args, limit)):
            if key_id is not None:
                what = f"quarantined input {fields[0]}"
                if self.keyring is None:
                    raise JournalKeyError(self.path, f"{what} is sealed with key id {key_id}: "
                                          "give the journal key file (--key-file)")
                fields[4] = self.keyring.open(key_id, fields[4], what)
            rows.append(QuarantinedRow(*fields))
        return rows

    def close(self) -> None:
        self._conn.close()
        give_back_to_owner(self.path)

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_readonly(path: str, key_file: str | None = None) -> JournalReader:
    """Open an existing journal for inspection (stats, verify) without creating or changing it;
    with ``key_file``, its sealed payloads can be read and verify authenticates them.

    Raises JournalNotFound, NotAJournal, SchemaTooNew, SchemaTooOld or JournalKeyError with a
    message that names the path.
    """
    return JournalReader(path, load_keyring(key_file) if key_file else None)


__all__ = [
    "CursorStats",
    "DeviceStats",
    "DropStats",
    "JournalReader",
    "JournalStats",
    "LaneBacklog",
    "LaneStats",
    "Record",
    "VerifyReport",
    "WatermarkStats",
    "collect_stats",
    "open_readonly",
    "read_consumer_state",
    "verify_journal",
]


# ---- the uplink's view of a lane -----------------------------------------------------------------
# All three probe the partial index records_lane(lane, device_id, seq): ``lane = ?`` implies
# its ``lane IS NOT NULL``; pos and drop_reason are then checked on the rows the range yields.
READ_LANE_SQL = (
    f"SELECT {RECORD_COLUMNS} FROM records WHERE lane = ? AND device_id = ? AND seq > ? "
    "AND pos <= ? AND drop_reason IS NULL ORDER BY seq LIMIT ?"
)
READ_LANE_RANGE_SQL = (
    f"SELECT {RECORD_COLUMNS} FROM records WHERE lane = ? AND device_id = ? "
    "AND seq BETWEEN ? AND ? AND drop_reason IS NULL ORDER BY seq"
)
# Devices first (CROSS JOIN keeps that order), then one index range per device.
LANE_BACKLOG_SQL = """SELECT d.device_id, count(*) FROM devices d
    LEFT JOIN watermarks w ON w.device_id = d.device_id AND w.lane = ?1
    CROSS JOIN records r
WHERE r.lane = ?1 AND r.device_id = d.device_id AND r.seq > coalesce(w.seq, 0)
    AND r.pos <= ?2 AND r.drop_reason IS NULL
GROUP BY d.device_id ORDER BY d.device_id"""


def read_lane(conn: apsw.Connection, lane: str, device_id: str, after_seq: int,
              upto: Position, limit: int, keyring: KeyRing | None = None) -> list[Record]:
    """Up to ``limit`` records of ``device_id`` in ``lane`` with seq > ``after_seq``, in seq
    order, not policy-dropped, at positions <= ``upto`` (the router's cursor: beyond it a
    record may still be unrouted, and a lower seq could later land in this lane)."""
    rows = conn.execute(READ_LANE_SQL, (lane, device_id, after_seq, upto.value, limit))
    return to_records(rows, keyring)


def read_lane_range(conn: apsw.Connection, lane: str, device_id: str, seq_lo: int,
                    seq_hi: int, keyring: KeyRing | None = None) -> list[Record]:
    """The records of ``device_id`` in ``lane`` with seqs ``seq_lo..seq_hi``, not dropped, in
    seq order: a planned batch, read again to rebuild it. No position bound: a device's seqs
    grow with positions, so every record up to a planned ``seq_hi`` was routed at planning."""
    rows = conn.execute(READ_LANE_RANGE_SQL, (lane, device_id, seq_lo, seq_hi))
    return to_records(rows, keyring)


SYNC_COUNTS_SQL = """SELECT r.device_id, count(*), count(*) FILTER (WHERE r.seq <= w.seq),
    min(r.ts) FILTER (WHERE w.seq IS NULL OR r.seq > w.seq)
FROM records r LEFT JOIN watermarks w ON w.device_id = r.device_id AND w.lane = r.lane
WHERE r.lane IN ('P1', 'P2', 'P3') AND r.drop_reason IS NULL
GROUP BY r.device_id ORDER BY r.device_id"""


def sync_counts(conn: apsw.Connection) -> dict[str, tuple[int, int, int | None]]:
    """device_id -> (syncable, synced, ts of the oldest unsynced or None) over the records
    present: syncable = in a synced lane and not policy-dropped; synced = also at or below its
    lane's watermark (acknowledged by central). Records eviction removed are not counted (the
    journal's ``drops`` table counts them per lane). One scan: an operator's question."""
    with read_snapshot(conn):
        return {d: (n, synced or 0, oldest) for d, n, synced, oldest in conn.execute(
            SYNC_COUNTS_SQL)}


LANE_DEVICES_SQL = """SELECT d.device_id FROM devices d
    LEFT JOIN watermarks w ON w.device_id = d.device_id AND w.lane = ?1
WHERE EXISTS (SELECT 1 FROM records r WHERE r.lane = ?1 AND r.device_id = d.device_id
    AND r.seq > coalesce(w.seq, 0) AND r.pos <= ?2 AND r.drop_reason IS NULL)
ORDER BY d.device_id"""
LANE_SIZES_SQL = (
    "SELECT seq, octet_length(payload) FROM records WHERE lane = ? AND device_id = ? "
    "AND seq > ? AND pos <= ? AND drop_reason IS NULL ORDER BY seq LIMIT ?"
)


def lane_devices(conn: apsw.Connection, lane: str, upto: Position) -> list[str]:
    """The devices with at least one unsynced record in ``lane`` (as `lane_backlog` counts
    them), in id order: one index probe per device, whatever the backlog's size."""
    return [row[0] for row in conn.execute(LANE_DEVICES_SQL, (lane, upto.value))]


def lane_sizes(conn: apsw.Connection, lane: str, device_id: str, after_seq: int,
               upto: Position, limit: int) -> list[tuple[int, int]]:
    """(seq, payload bytes) of the records `read_lane` would return: what planning a batch
    needs, without reading the payloads."""
    return [(seq, n) for seq, n in conn.execute(
        LANE_SIZES_SQL, (lane, device_id, after_seq, upto.value, limit))]


def lane_backlog(conn: apsw.Connection, lane: str, upto: Position) -> dict[str, int]:
    """device_id -> how many of its records in ``lane`` are unsynced (seq above its watermark
    for the lane), not dropped and at positions <= ``upto``; devices with none are left out.
    One index range per device, so the cost is the unsynced records, not the lane's history."""
    return dict(conn.execute(LANE_BACKLOG_SQL, (lane, upto.value)))


# ---- what waits per lane (the metrics' backlog) --------------------------------------------------
# Per lane: devices first, then one range of records_lane(lane, device_id, seq) above the device's
# watermark; payload and drop_reason come from each row found. The cost is the backlog (records
# not yet synced), not the lane's history.
LANE_WAITING_SQL = """SELECT count(*), total(octet_length(r.payload)), min(r.ts) FROM devices d
    LEFT JOIN watermarks w ON w.device_id = d.device_id AND w.lane = ?1
    CROSS JOIN records r
WHERE r.lane = ?1 AND r.device_id = d.device_id AND r.seq > coalesce(w.seq, 0)
    AND r.drop_reason IS NULL"""
# A rowid range after the router's cursor (routed records there are the consumers' outputs).
UNROUTED_WAITING_SQL = """SELECT count(*), total(octet_length(payload)), min(ts) FROM records
WHERE pos > ?1 AND lane IS NULL"""


def read_backlog(conn: apsw.Connection, router: str = "router") -> tuple[LaneBacklog, ...]:
    """What waits, lane by lane: "unrouted" (after consumer ``router``'s cursor), then P1, P2
    and P3 (not yet acknowledged by central; see `LaneBacklog`). EPHEMERAL is never synced:
    nothing of it waits. One read transaction; the cost grows with the backlog (an index range
    per device and lane), not with the journal (tests/journal/test_lane_backlog.py)."""
    with read_snapshot(conn):
        cursor = read_cursor(conn, router)
        rows = [(UNROUTED, conn.execute(UNROUTED_WAITING_SQL, (cursor.value,)).fetchone())]
        rows += [(lane, conn.execute(LANE_WAITING_SQL, (lane,)).fetchone())
                 for lane in LANES if lane != "EPHEMERAL"]
    return tuple(LaneBacklog(lane, n, int(b), oldest) for lane, (n, b, oldest) in rows)
