"""`fleetgw journal stats|verify`: inspect a journal without changing it.

Where this sits: beside the data path, for operators — it opens DATA_DIR/journal.db read-only
(`actors.journal.open_readonly`, which never creates a file), so it can run while the gateway is
writing. `stats` shows per-device seq ranges, cursors, watermarks, sizes, lanes and drops (by reason
and lane), and quarantine totals when there are any; `verify` runs
SQLite's integrity check and checks invariant I2 (per device, the seqs present plus the runs
eviction removed cover 1..max exactly once).
Exit status: 0 fine, 1 verify found problems, 2 no journal at the path (or not one).
The lead wires these into argparse (tools/cli.py).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import apsw

from actors.journal import JournalError, open_readonly
from actors.journal.reader import JournalStats

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_NO_JOURNAL = 2


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(header: tuple[str, ...], rows: list[tuple[object, ...]]) -> list[str]:
    cells = [header, *[tuple(str(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in cells]


def format_stats(stats: JournalStats) -> str:
    """The human-readable form of `fleetgw journal stats`."""
    budget = "" if stats.budget_bytes is None else f" of {_size(stats.budget_bytes)} budget"
    lines = [
        f"journal     {stats.path}",
        f"generation  {stats.generation}  (schema v{stats.schema_version})",
        f"records     {stats.records}  (last position {stats.last_position.value})",
        f"size        db {_size(stats.db_bytes)} + wal {_size(stats.wal_bytes)}"
        f" = {_size(stats.usage_bytes)}{budget}",
        "",
        f"devices ({len(stats.devices)})",
    ]
    lines += _table(
        ("DEVICE", "SEQ_LO", "SEQ_HI", "COUNT", "LAST_SEQ"),
        [(d.device_id, d.seq_lo, d.seq_hi, d.count, d.last_seq) for d in stats.devices],
    )
    lines += ["", f"cursors ({len(stats.cursors)})"]
    lines += _table(
        ("CONSUMER", "POS", "UPDATED"),
        [(c.consumer, c.pos.value, _when(c.updated_ns)) for c in stats.cursors],
    )
    lines += ["", f"watermarks ({len(stats.watermarks)})"]
    lines += _table(
        ("DEVICE", "LANE", "SEQ"), [(w.device_id, w.lane, w.seq) for w in stats.watermarks]
    )
    lines += ["", "lanes"]
    lines += _table(
        ("LANE", "RECORDS", "BYTES", "OLDEST_UNSYNCED"),
        [
            (
                lane.lane,
                lane.records,
                _size(lane.bytes),
                "-" if lane.oldest_unsynced_age_s is None else f"{lane.oldest_unsynced_age_s:.0f}s",
            )
            for lane in stats.lanes
        ],
    )
    lines += ["", f"drops ({sum(d.records for d in stats.drops)} records)"]
    lines += _table(
        ("REASON", "LANE", "RECORDS", "BYTES"),
        [(d.reason, d.lane, d.records, _size(d.bytes)) for d in stats.drops],
    )
    if any(q.quarantined for q in stats.quarantine):
        lines += ["", f"quarantine ({sum(q.quarantined for q in stats.quarantine)} inputs; "
                      f"`fleetgw journal quarantine --db {stats.path}` lists them)"]
        lines += _table(
            ("SENSOR", "QUARANTINED", "TRIMMED", "KEPT", "LAST"),
            [(q.sensor_id, q.quarantined, q.trimmed, q.quarantined - q.trimmed, _when(q.last_ns))
             for q in stats.quarantine],
        )
    return "\n".join(lines)


def stats_command(db: str, as_json: bool) -> int:
    """Print the journal's stats (a table, or one JSON object); 2 if there is no journal."""
    try:
        with open_readonly(db) as reader:
            stats = reader.stats()
    except JournalError as exc:
        print(f"fleetgw journal stats: {exc}", file=sys.stderr)
        return EXIT_NO_JOURNAL
    except apsw.Error as exc:  # a damaged file: say so instead of a traceback
        print(f"fleetgw journal stats: {db} cannot be read: {exc}; run "
              f"`fleetgw journal verify --db {db}`", file=sys.stderr)
        return EXIT_PROBLEMS
    if as_json:
        print(json.dumps(stats.to_json(), separators=(",", ":")))
    else:
        print(format_stats(stats))
    return EXIT_OK


def verify_command(db: str, key_file: str | None = None) -> int:
    """Check integrity and I2 (and, with ``key_file``, that every sealed payload opens); 0 only
    if all hold, 1 with the problems listed, 2 if there is no journal at ``db`` or the key file
    cannot be used."""
    try:
        with open_readonly(db, key_file) as reader:
            report = reader.verify()
    except JournalError as exc:
        print(f"fleetgw journal verify: {exc}", file=sys.stderr)
        return EXIT_NO_JOURNAL
    except apsw.Error as exc:  # damaged beyond what the checks can read
        print(f"FAILED: {db}: the journal cannot be read: {exc}")
        return EXIT_PROBLEMS
    sealed = sum(n for _, n in report.sealed_by_key)
    if sealed:
        per_key = ", ".join(f"key id {k}: {n}" for k, n in report.sealed_by_key)
        opened = (f"all {report.payloads_opened} opened and authentic" if key_file else
                  "not opened: give --key-file to check them")
        seal_line = f"sealed payloads ({per_key}): {opened}"
    else:
        seal_line = "no sealed payloads"
    if report.ok:
        print(
            f"ok: {db}: integrity ok; I2 holds for {report.devices_checked} devices "
            f"({report.records_checked} records + {report.evicted_checked} evicted: "
            f"seqs 1..max, no gap, counters match); {seal_line}"
        )
        return EXIT_OK
    print(f"FAILED: {db}: {len(report.problems)} problems ({seal_line})")
    for problem in report.problems:
        print(f"  {problem}")
    return EXIT_PROBLEMS


def key_command(action: str, key_file: str, db: str | None) -> int:
    """`fleetgw journal key new|rotate|show`: make, extend or describe a journal key file (key
    material is never printed: ids and fingerprints only). ``db`` (show): how many records
    each key seals there, and whether the file fits that journal. 0 done, 2 refused."""
    from actors.journal.keys import (
        create_key_file,
        load_keyring,
        rotate_key_file,
    )

    try:
        if action == "new":
            ring = create_key_file(key_file)
            print(f"created {key_file} (mode 0600) with key id 1, fingerprint "
                  f"{ring.fingerprint(1)[:16]}; set [journal] key_file to it and keep a copy "
                  "somewhere safe: without it the journal cannot be read")
            return EXIT_OK
        if action == "rotate":
            ring = rotate_key_file(key_file)
            print(f"added key id {ring.active_id} (fingerprint "
                  f"{ring.fingerprint(ring.active_id)[:16]}) to {key_file}: it seals new "
                  "records from the gateway's next start; keep the older ids until "
                  "`fleetgw journal verify` shows no record needs them")
            return EXIT_OK
        ring = load_keyring(key_file)
        counts: dict[int, int] = {}
        if db is not None:
            with open_readonly(db) as reader:
                counts = reader.sealed_counts()
                retired = reader.check_keyring(ring)
    except JournalError as exc:  # a JournalKeyError too: missing, wrong, too open
        print(f"fleetgw journal key {action}: {exc}", file=sys.stderr)
        return EXIT_NO_JOURNAL
    print(f"{key_file}: {len(ring.ids)} key(s); new records are sealed with key id "
          f"{ring.active_id}")
    rows = [(i, ring.fingerprint(i)[:16], "yes" if i == ring.active_id else "",
             counts.get(i, 0) if db is not None else "-") for i in ring.ids]
    print("\n".join(_table(("ID", "FINGERPRINT", "ACTIVE", "SEALED IN DB"), rows)))
    if db is not None:
        print(f"fits {db}" + (f" (key ids {retired} of the journal are retired: no record "
                              "needs them)" if retired else ""))
    return EXIT_OK


def downgrade_command(db: str, to_version: int, key_file: str | None) -> int:
    """`fleetgw journal downgrade`: the journal back to schema ``to_version`` for a rollback.
    0 done (or nothing to do), 1 failed and left unchanged, 2 refused (a gateway holds the
    journal, a key is needed, bad --to, no journal)."""
    from actors.journal.actor import WriterLocked
    from actors.journal.downgrade import downgrade
    from actors.journal.keys import JournalKeyError, load_keyring
    from actors.journal.schema import NotAJournal, SchemaTooNew

    try:
        ring = load_keyring(key_file) if key_file else None
        found = downgrade(db, to_version, ring)
    except ValueError as exc:
        print(f"fleetgw journal downgrade: {exc}", file=sys.stderr)
        return EXIT_NO_JOURNAL
    except (JournalKeyError, NotAJournal, SchemaTooNew, WriterLocked) as exc:
        print(f"fleetgw journal downgrade: refused: {exc}", file=sys.stderr)
        return EXIT_NO_JOURNAL
    except JournalError as exc:
        print(f"fleetgw journal downgrade: FAILED: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    if found <= to_version:
        print(f"{db}: schema v{found}, already at or below v{to_version}: nothing to do")
        return EXIT_OK
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        records, cursors, watermarks = conn.execute(
            "SELECT (SELECT count(*) FROM records), (SELECT count(*) FROM cursors), "
            "(SELECT count(*) FROM watermarks)").fetchone()
    finally:
        conn.close()
    clear = (f" (payloads in clear: v{to_version} has no encryption at rest)"
             if found >= 6 > to_version else "")
    print(f"{db}: taken from schema v{found} back to v{to_version}; kept {records} records, "
          f"{cursors} cursors and {watermarks} watermarks{clear}")
    return EXIT_OK
