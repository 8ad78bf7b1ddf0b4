"""Reconciliation: does central hold exactly what the journal says central acknowledged (I5)?

Where this sits: outside the data path, for operators, the demo and the tests. Per device, the
journal side (`JournalReader.sync_counts`: records in a synced lane and not policy-dropped, and
those at or below their lane's watermark) beside the central side for the journal's
generation: ``count() FINAL`` (rows after ReplacingMergeTree's collapse), ``count()`` (rows
as stored, duplicates included until a merge) and ``uniqExact(seq)`` over the record tables.

I5 holds for a device when central's FINAL count equals its distinct seqs (no duplicate
survives deduplication) and both equal the journal's synced count. While the uplink runs,
central may briefly hold a batch whose watermark the journal has not recorded yet
(acknowledged, then a crash); after the uplink drains, the counts are equal.
`fleetgw reconcile` prints the table, or JSON, and exits 1 when I5 does not hold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import attrs

from actors.journal.reader import JournalReader
from actors.journal.schema import JournalError
from central.backend import Backend
from central.schema import RECORD_TABLES, sql_string


@attrs.frozen
class DeviceReconciliation:
    """One device's row: journal side, central side, and what they say together."""

    device_id: str
    journaled: int
    syncable: int
    synced: int
    central_final: int
    central_raw: int
    central_unique: int
    lag_s: float | None

    @property
    def duplicates(self) -> int:
        """Rows stored more than once (collapsed by FINAL and by merges)."""
        return self.central_raw - self.central_unique

    @property
    def unsynced(self) -> int:
        return self.syncable - self.synced

    @property
    def ok(self) -> bool:
        return self.central_final == self.central_unique == self.synced

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "duplicates": self.duplicates,
                "unsynced": self.unsynced, "ok": self.ok}


def central_counts(backend: Backend, generation: str) -> dict[str, tuple[int, int, int]]:
    """device_id -> (count() FINAL, count(), uniqExact(table, seq)) over the record tables, for
    one journal generation."""
    totals: dict[str, list[int]] = {}
    where = f"WHERE generation = {sql_string(generation)}"
    for table in RECORD_TABLES:
        for i, sql in enumerate((
                f"SELECT device_id, count() AS n FROM {table} FINAL {where} GROUP BY device_id",
                f"SELECT device_id, count() AS n FROM {table} {where} GROUP BY device_id",
                f"SELECT device_id, uniqExact(seq) AS n FROM {table} {where} "
                "GROUP BY device_id")):
            for line in backend.query(sql, "JSONEachRow").splitlines():
                row = json.loads(line)
                totals.setdefault(row["device_id"], [0, 0, 0])[i] += int(row["n"])
    return {device: (t[0], t[1], t[2]) for device, t in totals.items()}


def reconcile(reader: JournalReader,
              central: Mapping[str, tuple[int, int, int]],
              now_ns: int | None = None) -> list[DeviceReconciliation]:
    """The rows for every device either side knows."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    journaled = {d.device_id: d.count for d in reader.stats().devices}
    sync = reader.sync_counts()
    rows = []
    for device in sorted(set(journaled) | set(sync) | set(central)):
        syncable, synced, oldest = sync.get(device, (0, 0, None))
        final, raw, unique = central.get(device, (0, 0, 0))
        lag = None if oldest is None else round(max(0.0, (now_ns - oldest) / 1e9), 1)
        rows.append(DeviceReconciliation(device, journaled.get(device, 0), syncable, synced,
                                         final, raw, unique, lag))
    return rows


COLUMNS = ("device", "journaled", "syncable", "synced", "CH FINAL", "CH raw", "duplicates",
           "unsynced", "lag s", "I5")


def render(rows: list[DeviceReconciliation]) -> str:
    """A fixed-width table (the demo's last screen)."""
    cells = [COLUMNS] + [
        (r.device_id, r.journaled, r.syncable, r.synced, r.central_final, r.central_raw,
         r.duplicates, r.unsynced, "-" if r.lag_s is None else r.lag_s,
         "ok" if r.ok else "MISMATCH") for r in rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                       for i, (v, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def reconcile_command(data_dir: str, central_config: str, as_json: bool) -> int:
    """``fleetgw reconcile``: 0 when I5 holds for every device, 1 when not, 2 when either
    side cannot be read."""
    import os

    from central.config import load_central_config
    from config.loader import ConfigError
    from tools.central_cmd import open_backend

    try:
        config = load_central_config(central_config)
        reader = JournalReader(os.path.join(data_dir, "journal.db"))
    except (ConfigError, JournalError, OSError, ValueError) as exc:
        print(f"fleetgw reconcile: {exc}")
        return 2
    try:
        backend = open_backend(config.backend)
    except Exception as exc:  # BackendLocked, BackendError, a missing password variable
        print(f"fleetgw reconcile: {exc}")
        reader.close()
        return 2
    try:
        rows = reconcile(reader, central_counts(backend, reader.generation))
    finally:
        backend.close()
        reader.close()
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    else:
        print(render(rows))
    return 0 if all(r.ok for r in rows) else 1
