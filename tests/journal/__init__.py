"""Tests of the journal (actors/journal): its logic without an actor system, and its CLI.

Shared builders live here so the example tests and the property tests make batches the same
way: every reading's payload carries a marker ``{"b": <batch key>, "i": <index>}`` so a test
can count, straight from the database, how many times each batch was stored.
"""

from __future__ import annotations

import apsw

from messages.readings import TS_MIN_NS, ReadingBatch, encode_values

#: A fixed, valid timestamp base (2001-09-09): tests never depend on the wall clock.
TS0 = TS_MIN_NS + 10**17


def make_batch(
    sensor_id: str, devices: list[str] | tuple[str, ...], marker: str, kind: str = "imu"
) -> ReadingBatch:
    """One reading per entry of ``devices``, each payload marked with ``marker``."""
    n = len(devices)
    return ReadingBatch(
        sensor_id=sensor_id,
        device_ids=tuple(devices),
        ts=tuple(TS0 + i for i in range(n)),
        kinds=(kind,) * n,
        payloads=tuple(encode_values({"b": marker, "i": i, "ax": 0.5 * i}) for i in range(n)),
    )


def stored_markers(path: str) -> dict[str, int]:
    """How many records each batch marker has in the journal at ``path`` (read-only)."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return dict(
            conn.execute(
                "SELECT json_extract(payload, '$.b'), count(*) FROM records GROUP BY 1"
            )
        )
    finally:
        conn.close()


def device_seqs(path: str) -> dict[str, list[int]]:
    """Every device's seqs in position order (small journals only)."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        seqs: dict[str, list[int]] = {}
        for device_id, seq in conn.execute("SELECT device_id, seq FROM records ORDER BY pos"):
            seqs.setdefault(device_id, []).append(seq)
        return seqs
    finally:
        conn.close()


def assert_gapless(path: str) -> None:
    """I2 on a small journal: per device, seqs in position order are exactly 1..n."""
    for device_id, seqs in device_seqs(path).items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{device_id}: {seqs}"
