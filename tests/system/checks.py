"""Checks of the journal a gateway wrote: what the invariants mean for simulated sensors."""

from __future__ import annotations

from collections import defaultdict

import apsw

from actors.model_runner.runner import SENSOR_ID as MODEL_SENSOR


def sensor_timelines(journal_path: str) -> dict[str, list[int]]:
    """Timestamps of every journaled reading, per sensor, in journal order."""
    db = apsw.Connection(journal_path, flags=apsw.SQLITE_OPEN_READONLY)
    out: dict[str, list[int]] = defaultdict(list)
    # Raw readings only: the router's aggregate records carry their source sensor's id, and
    # the model runner's records are its own sensor's.
    for sensor, ts in db.execute("SELECT sensor_id, ts FROM records WHERE kind NOT LIKE "
                                 "'agg:%' AND sensor_id != ? ORDER BY pos", (MODEL_SENSOR,)):
        out[sensor].append(ts)
    db.close()
    return dict(out)


def assert_each_reading_once_and_none_missing(journal_path: str, rates: dict[str, float]) -> None:
    """A simulated sensor emits readings on an exact grid (start + k / rate). In the journal,
    every sensor's timestamps must be distinct (nothing stored twice) and, once sorted, step by
    exactly one period (nothing lost between the first and the last). A sensor restart starts a
    new grid, so a step may also be a fresh start later in time: those are allowed only where
    the test killed that sensor."""
    for sensor, stamps in sensor_timelines(journal_path).items():
        assert len(stamps) == len(set(stamps)), f"{sensor}: a reading was journaled twice"
        period = round(1e9 / rates[sensor])
        ordered = sorted(stamps)
        bad = [(a, b) for a, b in zip(ordered, ordered[1:], strict=False)
               if abs((b - a) - period) > 1]
        assert not bad, f"{sensor}: {len(bad)} gap(s) in its readings, first at {bad[0]}"


def seq_is_gapless(journal_path: str) -> bool:
    db = apsw.Connection(journal_path, flags=apsw.SQLITE_OPEN_READONLY)
    rows = db.execute(
        "SELECT device_id, count(*), min(seq), max(seq), count(DISTINCT seq) FROM records "
        "GROUP BY device_id").fetchall()
    db.close()
    return all(n == hi and lo == 1 and d == n for _dev, n, lo, hi, d in rows)
