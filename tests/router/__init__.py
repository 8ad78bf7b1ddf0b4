"""Router tests: policy files, predicates, the engine, sampling, dedup and aggregation.

`record` builds a journal `Record` the way the router reads one (values as canonical JSON).
"""

from __future__ import annotations

from typing import Any

from actors.journal.reader import Record
from messages.journal import Position
from messages.readings import encode_values

TS0 = 1_700_000_000_000_000_000
S = 1_000_000_000


def record(pos: int, ts: int, values: dict[str, Any], *, device: str = "veh-1",
           sensor: str = "s0", kind: str = "imu", seq: int | None = None) -> Record:
    """A journal record at position ``pos`` (seq defaults to pos)."""
    return Record(Position(pos), device, pos if seq is None else seq, sensor, ts, kind,
                  encode_values(values))
