"""The journal's on-disk format: tables, migrations, what a row accepts, and opening a file.

Where this sits on the data path: every reading a sensor sends lands in ``records`` (step 2 of
"The data path"); consumers keep their durable place in ``cursors`` (step 3); the uplink's
acknowledged sync points live in ``watermarks`` (step 6). `Journal` (the single writer, I3)
opens the file with `open_for_writing` (which migrates); read-only connections call
`check_readable`. `batch_problem` is what a batch must satisfy before its rows are written.

The version is ``PRAGMA user_version``; ``PRAGMA application_id`` marks the file as a fleetgw
journal, so a stray SQLite file is never mistaken for one (or silently "migrated").
A journal written by an older fleetgw is migrated in one transaction; a newer one is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable

import apsw

from messages.journal import SeqRange
from messages.readings import IDENT_RE, TS_MAX_NS, TS_MIN_NS, ReadingBatch

#: ``PRAGMA application_id`` of a fleetgw journal ("FLGJ").
APPLICATION_ID = 0x464C474A
SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
BUSY_TIMEOUT_MS = 5_000
#: After a checkpoint the WAL is truncated back to this size. Above the ~4 MiB the default
#: autocheckpoint (1000 pages) lets it reach, so steady state never pays for re-growing it.
JOURNAL_SIZE_LIMIT_BYTES = 8 << 20


class JournalError(Exception):
    """The journal at ``path`` cannot be used as asked; the message says why and what helps."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


class JournalNotFound(JournalError):
    """No journal exists at the path (read-only opens never create one)."""

    def __init__(self, path: str) -> None:
        super().__init__(
            path,
            f"no journal at {path}: the file does not exist (the gateway creates "
            "DATA_DIR/journal.db on its first `fleetgw run`; check --db)",
        )


class NotAJournal(JournalError):
    """The file exists but is not a fleetgw journal (not SQLite, or another application's)."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(path, f"{path} is not a fleetgw journal: {why}")


class SchemaTooNew(JournalError):
    """The journal was written by a newer fleetgw; this one refuses to touch it."""

    def __init__(self, path: str, found: int, known: int) -> None:
        self.found = found
        self.known = known
        super().__init__(
            path,
            f"{path} has journal schema version {found}, newer than this fleetgw knows "
            f"({known}); run the fleetgw that wrote it (downgrading a journal is not supported)",
        )


class SchemaTooOld(JournalError):
    """A read-only open found an older schema; only the writer migrates."""

    def __init__(self, path: str, found: int, known: int) -> None:
        self.found = found
        self.known = known
        super().__init__(
            path,
            f"{path} has journal schema version {found}, older than this fleetgw's ({known}); "
            "`fleetgw run` migrates it on start",
        )


def _v1_data_path(conn: apsw.Connection) -> None:
    """v1: the data path — records with per-device seqs, batch ids, consumer cursors."""
    conn.execute(
        f"""
        PRAGMA application_id = {APPLICATION_ID};
        -- generation: random 128-bit hex made when the database is created (I2); last_pos: the
        -- highest Position ever assigned, so positions are never reused even after deletes.
        CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
        -- last_seq is the per-device counter; it moves in the same transaction as the rows.
        CREATE TABLE devices(
            device_id TEXT PRIMARY KEY,
            last_seq INTEGER NOT NULL CHECK (last_seq >= 0)
        ) WITHOUT ROWID;
        -- pos is the journal Position. It is assigned by the writer from meta.last_pos rather
        -- than AUTOINCREMENT: same never-reused guarantee, without AUTOINCREMENT's per-row
        -- sqlite_sequence update (measured ~8% of an append). STRICT makes SQLite reject a
        -- wrongly typed column instead of storing it.
        CREATE TABLE records(
            pos INTEGER PRIMARY KEY,
            device_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            sensor_id TEXT NOT NULL,
            ts INTEGER NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            committed_ns INTEGER NOT NULL,
            UNIQUE (device_id, seq)
        ) STRICT;
        -- One row per committed sensor batch: a resent batch is answered from here. Rows go
        -- when the sender raises its resend floor past them, or a while after their sensor
        -- restarted as a new incarnation (committed_ns dates them).
        CREATE TABLE batches(
            sensor_id TEXT NOT NULL,
            incarnation INTEGER NOT NULL,
            batch_no INTEGER NOT NULL,
            first_pos INTEGER NOT NULL,
            last_pos INTEGER NOT NULL,
            ranges TEXT NOT NULL,
            committed_ns INTEGER NOT NULL,
            PRIMARY KEY (sensor_id, incarnation, batch_no)
        ) WITHOUT ROWID;
        CREATE TABLE cursors(
            consumer TEXT PRIMARY KEY,
            pos INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL
        ) WITHOUT ROWID;
        """
    )


def _v2_resend_safe_commits_and_watermarks(conn: apsw.Connection) -> None:
    """v2: consumer commits remember their request id (a resent commit is recognised) and the
    uplink's sync watermarks."""
    conn.execute(
        """
        ALTER TABLE cursors ADD COLUMN last_request_id INTEGER;
        ALTER TABLE cursors ADD COLUMN last_ranges TEXT;
        CREATE TABLE watermarks(
            device_id TEXT NOT NULL,
            lane TEXT NOT NULL,
            seq INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL,
            PRIMARY KEY (device_id, lane)
        ) WITHOUT ROWID;
        """
    )


def _v3_resend_floors(conn: apsw.Connection) -> None:
    """v3: remember each sensor incarnation's resend floor, so a late resend of a batch whose
    id was already forgotten (below the floor) is still recognised as a duplicate."""
    conn.execute(
        """
        CREATE TABLE resend_floors(
            sensor_id TEXT NOT NULL,
            incarnation INTEGER NOT NULL,
            floor INTEGER NOT NULL,
            updated_ns INTEGER NOT NULL,
            PRIMARY KEY (sensor_id, incarnation)
        ) WITHOUT ROWID;
        """
    )


def _v4_lanes_and_eviction(conn: apsw.Connection) -> None:
    """v4: the router's lanes on each record, consumer state beside the cursor, and what
    eviction (I7) needs: its indexes, drop counters and the exact seq runs it removed."""
    conn.execute(
        """
        -- lane NULL = not routed yet (never evicted). drop_reason: a policy drop (kept local,
        -- never synced). expires_ns: local expiry. aggregated = 1: a raw P3 record that has
        -- an aggregate.
        ALTER TABLE records ADD COLUMN lane TEXT;
        ALTER TABLE records ADD COLUMN rule TEXT;
        ALTER TABLE records ADD COLUMN drop_reason TEXT;
        ALTER TABLE records ADD COLUMN expires_ns INTEGER;
        ALTER TABLE records ADD COLUMN aggregated INTEGER;
        -- Per lane and device in seq (= position) order: synced records (seq <= watermark)
        -- are an exact range, the oldest P2 a prefix. Partial: a sensor append (unrouted)
        -- pays nothing for it; routing adds the entry.
        CREATE INDEX records_lane ON records(lane, device_id, seq) WHERE lane IS NOT NULL;
        -- The other eviction classes, in position order; empty until routing fills them.
        CREATE INDEX records_expiring ON records(pos) WHERE expires_ns IS NOT NULL;
        CREATE INDEX records_dropped ON records(pos) WHERE drop_reason IS NOT NULL;
        CREATE INDEX records_aggregated ON records(pos) WHERE aggregated = 1;
        ALTER TABLE cursors ADD COLUMN state TEXT;
        CREATE TABLE drops(
            reason TEXT NOT NULL,
            lane TEXT NOT NULL,
            records INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            PRIMARY KEY (reason, lane)
        ) WITHOUT ROWID;
        -- The exact seq runs eviction removed: with the records present they cover every
        -- device's 1..last_seq exactly once (I2, checked by verify).
        CREATE TABLE evicted(
            device_id TEXT NOT NULL,
            seq_lo INTEGER NOT NULL,
            seq_hi INTEGER NOT NULL,
            reason TEXT NOT NULL,
            lane TEXT NOT NULL
        );
        CREATE INDEX evicted_runs ON evicted(device_id, seq_lo);
        """
    )


def _v5_quarantine_and_source_marks(conn: apsw.Connection) -> None:
    """v5: the bounded quarantine of input sources could not decode (I8), with totals that
    outlive its trimming, and the sources' own delivery marks (e.g. MQTT packet ids already
    journaled), committed with the batches that carry them."""
    conn.execute(
        """
        -- Bounded: the oldest rows go once it holds more than the configured maximum (the
        -- totals below still count them). raw is cut to QUARANTINE_RAW_MAX; raw_len is the
        -- length received.
        CREATE TABLE quarantine(
            id INTEGER PRIMARY KEY,
            sensor_id TEXT NOT NULL,
            source TEXT NOT NULL,
            reason TEXT NOT NULL,
            raw BLOB NOT NULL,
            raw_len INTEGER NOT NULL,
            received_ns INTEGER NOT NULL,
            committed_ns INTEGER NOT NULL
        ) STRICT;
        CREATE TABLE quarantine_totals(
            sensor_id TEXT PRIMARY KEY,
            quarantined INTEGER NOT NULL,
            trimmed INTEGER NOT NULL,
            last_reason TEXT NOT NULL,
            last_ns INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE source_marks(
            sensor_id TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            updated_ns INTEGER NOT NULL,
            PRIMARY KEY (sensor_id, key)
        ) WITHOUT ROWID;
        """
    )


def _v6_sealed_payloads(conn: apsw.Connection) -> None:
    """v6: encryption at rest. Each record (and quarantined input) names the key that sealed
    it (``key_id``; NULL: stored in clear by an earlier release or without a key file), and
    the journal remembers every key id it sealed with by fingerprint (actors/journal/keys.py).

    A sealed payload is a BLOB, so ``records.payload`` changes from TEXT to ANY. Rows on disk
    are untouched by that (existing payloads stay valid TEXT; STRICT only checks types on
    write), so the declared type is changed in place with SQLite's documented
    ``writable_schema`` procedure rather than by copying the table: a copy would need the
    journal's size again in free space, which a gateway near its disk budget does not have,
    and would take minutes on an SD card. integrity_check passes afterwards (tested)."""
    conn.execute(
        """
        ALTER TABLE records ADD COLUMN key_id INTEGER;
        ALTER TABLE quarantine ADD COLUMN key_id INTEGER;
        -- A consumer's state holds telemetry too (the router's open aggregation windows).
        ALTER TABLE cursors ADD COLUMN state_key_id INTEGER;
        CREATE TABLE keys(
            key_id INTEGER PRIMARY KEY,
            fingerprint TEXT NOT NULL,
            added_ns INTEGER NOT NULL
        ) STRICT;
        """
    )
    retype_payload(conn, "TEXT", "ANY")


def retype_payload(conn: apsw.Connection, old: str, new: str) -> None:
    """Change the declared type of ``records.payload`` from ``old`` to ``new`` in place
    (writable_schema; the rows are not touched). Used by v6 and by its downgrade."""
    (sql,) = conn.execute(
        "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'records'").fetchone()
    if sql.count(f"payload {old} NOT NULL") != 1:
        raise apsw.SchemaChangeError(f"unexpected records schema: {sql}")
    version = conn.pragma("schema_version")
    conn.pragma("writable_schema", True)
    try:
        conn.execute("UPDATE sqlite_schema SET sql = ? WHERE type = 'table' AND name = 'records'",
                     (sql.replace(f"payload {old} NOT NULL", f"payload {new} NOT NULL"),))
        conn.pragma("schema_version", version + 1)  # every connection reloads the schema
    finally:
        conn.pragma("writable_schema", False)


#: Migration steps in order: step i brings a journal from version i to version i + 1.
#: Append new steps; never edit a released one.
MIGRATIONS: tuple[Callable[[apsw.Connection], None], ...] = (
    _v1_data_path,
    _v2_resend_safe_commits_and_watermarks,
    _v3_resend_floors,
    _v4_lanes_and_eviction,
    _v5_quarantine_and_source_marks,
    _v6_sealed_payloads,
)
SCHEMA_VERSION = len(MIGRATIONS)


def extras_problem(quarantined: object, marks: object) -> str | None:
    """Why an Append's quarantined inputs or source marks cannot be stored, or None."""
    from messages.journal import QuarantinedInput, SourceMark

    if not isinstance(quarantined, tuple) or not isinstance(marks, tuple):
        return "quarantined and marks must be tuples"
    for q in quarantined:
        if not isinstance(q, QuarantinedInput):
            return f"quarantined holds a {type(q).__name__}, expected QuarantinedInput"
        if not (isinstance(q.source, str) and isinstance(q.reason, str)
                and isinstance(q.raw, bytes) and type(q.received_ns) is int
                and type(q.raw_len) is int):
            return "a quarantined input has wrongly typed fields"
    for m in marks:
        if not (isinstance(m, SourceMark) and isinstance(m.key, str)
                and isinstance(m.value, str)):
            return "marks must be SourceMark(key: str, value: str)"
    return None


def batch_problem(batch: object) -> str | None:
    """Why ``batch`` cannot be stored, or None. Cheap (C-speed passes over the columns): the
    readings were validated when built; this guards the journal against a malformed batch."""
    if not isinstance(batch, ReadingBatch):
        return f"expected a ReadingBatch, got {type(batch).__name__}"
    n = len(batch.ts)
    if n == 0:
        return "batch has no readings"
    lengths = {len(batch.device_ids), len(batch.kinds), len(batch.payloads)}
    if lengths != {n}:
        return (
            f"columns differ in length: ts={n} device_ids={len(batch.device_ids)} "
            f"kinds={len(batch.kinds)} payloads={len(batch.payloads)}"
        )
    for field, values in (
        ("sensor_id", (batch.sensor_id,)),
        ("device_ids", set(batch.device_ids)),
        ("kinds", set(batch.kinds)),
    ):
        for value in values:
            if not isinstance(value, str) or not IDENT_RE.match(value):
                return f"{field} holds {value!r}, expected identifiers ([A-Za-z0-9_.:-/])"
    if set(map(type, batch.ts)) != {int}:
        return "ts must all be int nanoseconds since the epoch"
    if min(batch.ts) < TS_MIN_NS or max(batch.ts) >= TS_MAX_NS:
        return f"ts out of range: {min(batch.ts)}..{max(batch.ts)} (expected 2000..2200 in ns)"
    if set(map(type, batch.payloads)) != {str}:
        return "payloads must all be str (JSON from encode_values)"
    return None


def ranges_to_json(ranges: tuple[SeqRange, ...]) -> str:
    """How batches.ranges and cursors.last_ranges store SeqRanges: [[device, lo, hi], ...]."""
    return json.dumps([[r.device_id, r.seq_lo, r.seq_hi] for r in ranges], separators=(",", ":"))


def ranges_from_json(text: str | None) -> tuple[SeqRange, ...]:
    """Inverse of `ranges_to_json` (None, as in a cursor that never committed outputs: ())."""
    return tuple(SeqRange(d, lo, hi) for d, lo, hi in json.loads(text or "[]"))


def _has_user_tables(conn: apsw.Connection) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'"
    ).fetchone()
    return bool(row and row[0])


def _identify(conn: apsw.Connection, path: str) -> int:
    """The schema version of the journal on ``conn``; 0 for an empty database.

    Raises NotAJournal for a non-SQLite file or another application's database, and
    SchemaTooNew for a journal newer than this code.
    """
    try:
        app_id = conn.pragma("application_id")
        version = conn.pragma("user_version")
        has_tables = _has_user_tables(conn)
    except (apsw.NotADBError, apsw.CorruptError) as exc:
        raise NotAJournal(path, f"not a SQLite database ({exc})") from exc
    if app_id == 0 and version == 0 and not has_tables:
        return 0
    if app_id != APPLICATION_ID:
        raise NotAJournal(
            path, f"SQLite database of another application (application_id {app_id:#x})"
        )
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(path, version, SCHEMA_VERSION)
    return version


def migrate(conn: apsw.Connection, path: str, clock_ns: Callable[[], int]) -> int:
    """Bring the journal on ``conn`` to `SCHEMA_VERSION` in one transaction; return the version
    it had (0: created now, with a new generation)."""
    # Refuse a newer or foreign file before taking the write lock or changing anything.
    found = _identify(conn, path)
    try:
        with conn:  # transaction_mode IMMEDIATE: nobody migrates between check and write
            found = _identify(conn, path)
            _migrate_steps(conn, found, clock_ns)
    except JournalError:
        raise
    except apsw.Error as exc:  # a step or the COMMIT (a full disk): all of it rolled back
        if found == SCHEMA_VERSION:  # nothing to migrate: not a migration's failure
            raise
        raise JournalError(
            path,
            f"migrating {path} from schema v{found} to v{SCHEMA_VERSION} failed ({exc}); "
            f"the journal was left unchanged at v{found}",
        ) from exc
    return found


def _migrate_steps(conn: apsw.Connection, found: int, clock_ns: Callable[[], int]) -> None:
    """The steps from version ``found`` on, inside `migrate`'s transaction."""
    for step in MIGRATIONS[found:]:
        step(conn)
    if found == 0:
        conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [
                ("generation", secrets.token_hex(16)),
                ("created_ns", str(clock_ns())),
                ("last_pos", "0"),
            ],
        )
    if found != SCHEMA_VERSION:
        conn.pragma("user_version", SCHEMA_VERSION)


def give_back_to_owner(path: str) -> None:
    """Files SQLite (or the writer lock) made beside the journal while root inspected it (a
    CLI run with sudo) go back to the journal's owner; otherwise the gateway's unprivileged
    user could no longer open its own journal. Nothing to do for anyone but root."""
    if os.geteuid() != 0:
        return
    try:
        owner = os.stat(path)
    except OSError:
        return
    for extra in (path + "-wal", path + "-shm", path + ".writer-lock"):
        with contextlib.suppress(OSError):
            st = os.stat(extra)
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.chown(extra, owner.st_uid, owner.st_gid)


def check_readable(conn: apsw.Connection, path: str) -> int:
    """Check, without writing, that ``conn`` holds a journal of this code's version."""
    found = _identify(conn, path)
    if found == 0:
        raise NotAJournal(path, "empty database (no journal tables)")
    if found < SCHEMA_VERSION:
        raise SchemaTooOld(path, found, SCHEMA_VERSION)
    return found


def open_for_writing(
    path: str, synchronous: str, clock_ns: Callable[[], int]
) -> tuple[apsw.Connection, int]:
    """The writer's connection to the journal at ``path`` (created if missing): migrated to
    `SCHEMA_VERSION`, in WAL mode with the given ``synchronous``. Returns it and the version
    the file had (0: created now)."""
    if synchronous.upper() not in SYNCHRONOUS_MODES:
        raise ValueError(
            f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)} (got {synchronous!r})"
        )
    try:
        conn = apsw.Connection(path)
    except apsw.CantOpenError as exc:
        raise JournalError(
            path, f"cannot open or create {path}: {exc} (does its directory exist?)"
        ) from exc
    try:
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
        # `with conn:` (used by migrate) takes the write lock up front.
        conn.transaction_mode = "IMMEDIATE"
        found = migrate(conn, path, clock_ns)
        mode = conn.pragma("journal_mode", "wal")
        if mode != "wal":
            raise JournalError(path, f"cannot switch {path} to WAL (journal_mode is {mode!r})")
        conn.pragma("synchronous", synchronous.upper())
        conn.pragma("journal_size_limit", JOURNAL_SIZE_LIMIT_BYTES)
    except BaseException:
        conn.close()
        raise
    return conn, found
