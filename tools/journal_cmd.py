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


def verify_command(db: str) -> int:
    """Check integrity and I2; 0 only if both hold, 1 with the problems listed, 2 if there is no
    journal at ``db``."""
    try:
        with open_readonly(db) as reader:
            report = reader.verify()
    except JournalError as exc:
        print(f"fleetgw journal verify: {exc}", file=sys.stderr)
        return EXIT_NO_JOURNAL
    except apsw.Error as exc:  # damaged beyond what the checks can read
        print(f"FAILED: {db}: the journal cannot be read: {exc}")
        return EXIT_PROBLEMS
    if report.ok:
        print(
            f"ok: {db}: integrity ok; I2 holds for {report.devices_checked} devices "
            f"({report.records_checked} records + {report.evicted_checked} evicted: "
            "seqs 1..max, no gap, counters match)"
        )
        return EXIT_OK
    print(f"FAILED: {db}: {len(report.problems)} problems")
    for problem in report.problems:
        print(f"  {problem}")
    return EXIT_PROBLEMS
