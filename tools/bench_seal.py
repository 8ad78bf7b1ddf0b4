"""`fleetgw bench seal`: what encryption at rest costs the journal — appends/s with every payload
sealed beside the same appends in clear, measured in the same run, plus raw apsw inserts of the
same rows as the floor reference, and the bytes a record takes on disk either way.

Where this sits: outside the gateway. It drives the plain `Journal` class (no actors: the actor
path adds the same overhead to both sides, see `fleetgw bench journal`) with batches shaped like
the demo vehicle's IMU readings, synchronous=FULL as in the field, alternating clear and sealed
rounds so a noisy machine hurts both alike.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time

import apsw

from actors.journal import Journal, load_keyring
from actors.journal.keys import create_key_file
from messages.journal import BatchId
from messages.readings import TS_MIN_NS, ReadingBatch, encode_values
from tools.bench import print_result

BATCH = 200
ROUNDS = 6


def _batches(n_batches: int, seed: int = 7) -> list[ReadingBatch]:
    rnd = random.Random(seed)
    ts0 = TS_MIN_NS + 10**18
    out = []
    for b in range(n_batches):
        payloads = tuple(encode_values({
            "ax": round(rnd.gauss(0, 0.2), 3), "ay": round(rnd.gauss(0, 0.2), 3),
            "az": round(rnd.gauss(9.81, 0.2), 3), "gx": round(rnd.gauss(0, 1), 2),
            "gy": round(rnd.gauss(0, 1), 2), "gz": round(rnd.gauss(0, 1), 2)})
            for _ in range(BATCH))
        ts = tuple(ts0 + (b * BATCH + i) * 20_000_000 for i in range(BATCH))
        out.append(ReadingBatch("imu0", ("bench-001",) * BATCH, ts, ("imu",) * BATCH, payloads))
    return out


def _append_rate(path: str, batches: list[ReadingBatch], key_file: str | None) -> float:
    ring = load_keyring(key_file) if key_file else None
    with Journal(path, synchronous="FULL", disk_budget_bytes=1 << 34, keyring=ring) as j:
        start = time.perf_counter()
        for n, batch in enumerate(batches, 1):
            j.append(BatchId("imu0", 1, n), batch)
        return len(batches) * BATCH / (time.perf_counter() - start)


def _bytes_per_record(path: str) -> float:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        (n,) = conn.execute("SELECT count(*) FROM records").fetchone()
        (page,) = conn.execute("PRAGMA page_size").fetchone()
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        (free,) = conn.execute("PRAGMA freelist_count").fetchone()
        return (pages - free) * page / max(n, 1)
    finally:
        conn.close()


def _raw_rate(path: str, batches: list[ReadingBatch]) -> float:
    db = apsw.Connection(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (pos INTEGER PRIMARY KEY, device_id TEXT, seq INTEGER, "
               "sensor_id TEXT, ts INTEGER, kind TEXT, payload TEXT, UNIQUE(device_id, seq))")
    seq = 0
    start = time.perf_counter()
    for batch in batches:
        rows = []
        for d, ts, kind, payload in zip(batch.device_ids, batch.ts, batch.kinds,
                                        batch.payloads, strict=True):
            seq += 1
            rows.append((d, seq, batch.sensor_id, ts, kind, payload))
        with db:
            db.executemany("INSERT INTO t (device_id, seq, sensor_id, ts, kind, payload) "
                           "VALUES (?, ?, ?, ?, ?, ?)", rows)
    rate = seq / (time.perf_counter() - start)
    db.close()
    return rate


def run_bench(records: int) -> dict:
    workdir = tempfile.mkdtemp(prefix="fleetgw-bench-seal-")
    try:
        key = os.path.join(workdir, "journal.key")
        create_key_file(key)
        per_round = max(1, records // BATCH // ROUNDS)
        batches = _batches(per_round * ROUNDS)
        clear: list[float] = []
        sealed: list[float] = []
        raw: list[float] = []
        for r in range(ROUNDS):  # alternate, so machine noise falls on every side alike
            chunk = batches[r * per_round:(r + 1) * per_round]
            clear.append(_append_rate(os.path.join(workdir, f"clear{r}.db"), chunk, None))
            sealed.append(_append_rate(os.path.join(workdir, f"sealed{r}.db"), chunk, key))
            raw.append(_raw_rate(os.path.join(workdir, f"raw{r}.db"), chunk))
        med = sorted  # medians of the rounds
        clear_rate, sealed_rate = med(clear)[ROUNDS // 2], med(sealed)[ROUNDS // 2]
        raw_rate = med(raw)[ROUNDS // 2]
        clear_bytes = _bytes_per_record(os.path.join(workdir, "clear0.db"))
        sealed_bytes = _bytes_per_record(os.path.join(workdir, "sealed0.db"))
        return {
            "sealed_appends_per_s": round(sealed_rate),
            "clear_appends_per_s": round(clear_rate),
            "ratio_sealed_to_clear": round(sealed_rate / clear_rate, 3),
            "raw_apsw_rows_per_s": round(raw_rate),
            "ratio_sealed_to_raw_apsw": round(sealed_rate / raw_rate, 3),
            "disk_bytes_per_record_sealed": round(sealed_bytes, 1),
            "disk_bytes_per_record_clear": round(clear_bytes, 1),
            "ratio_bytes_sealed_to_clear": round(sealed_bytes / clear_bytes, 3),
            "records_per_round": per_round * BATCH,
            "rounds": ROUNDS,
            "batch": BATCH,
            "synchronous": "FULL",
            "cpus": os.cpu_count(),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def bench_seal_command(records: int, as_json: bool) -> int:
    if records < BATCH * ROUNDS:
        print(f"fleetgw bench seal: --records must be >= {BATCH * ROUNDS} (got {records})")
        return 2
    print_result(run_bench(records), as_json)
    return 0
