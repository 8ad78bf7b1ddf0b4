"""The journal's quarantine and source marks (schema v5): what a source could not decode (I8)
and its own delivery bookkeeping, committed in the same transaction as the readings they came
with — and `fleetgw journal quarantine` / the quarantine section of `fleetgw journal stats`.

Everything runs against real SQLite files; the v4 journal is made by the v4 code path itself
(only the first four migrations), then opened by this one.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path

import apsw
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import actors.journal.schema as schema
from actors.journal import Journal, open_readonly
from actors.journal.schema import MIGRATIONS, SCHEMA_VERSION, SchemaTooOld
from actors.sensors.outbox import NEVER_RETRY, SensorOutbox
from messages.journal import (
    QUARANTINE_RAW_MAX,
    START,
    Appended,
    AppendRefused,
    BatchId,
    Position,
    QuarantinedInput,
    SeqRange,
    SourceMark,
)
from messages.readings import Reading
from tests.journal import TS0, make_batch, stored_markers
from tools.cli import main as cli

NOW = TS0 + 10**12
V5_TABLES = ("quarantine", "quarantine_totals", "source_marks")


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "journal.db")


@pytest.fixture
def journal(path: str):
    # NORMAL: these tests check logic, not fsync.
    with Journal(path, synchronous="NORMAL", clock_ns=lambda: NOW) as j:
        yield j


def q(path: str, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` on a read-only connection of its own (what another process sees)."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def snapshot(path: str) -> dict[str, list[tuple]]:
    """Everything an append may write, for before/after comparisons."""
    return {
        "records": q(path, "SELECT pos, device_id, seq, payload FROM records ORDER BY pos"),
        "devices": q(path, "SELECT * FROM devices ORDER BY device_id"),
        "batches": q(path, "SELECT sensor_id, incarnation, batch_no FROM batches ORDER BY 1, 2, 3"),
        "meta": q(path, "SELECT * FROM meta ORDER BY key"),
        "quarantine": q(path, "SELECT * FROM quarantine ORDER BY id"),
        "totals": q(path, "SELECT * FROM quarantine_totals ORDER BY sensor_id"),
        "marks": q(path, "SELECT * FROM source_marks ORDER BY sensor_id, key"),
    }


def bad(label: str, raw: bytes = b"\x00\xffgarbage", reason: str = "not JSON") -> QuarantinedInput:
    return QuarantinedInput.of(f"mqtt:fleet/{label}", f"{label}: {reason}", raw, TS0 + 5)


def totals(path: str) -> dict[str, tuple[int, int, str]]:
    """sensor -> (quarantined, trimmed, last_reason)."""
    return {s: (n, t, r) for s, n, t, r in q(
        path, "SELECT sensor_id, quarantined, trimmed, last_reason FROM quarantine_totals")}


def kept_sources(path: str) -> list[str]:
    return [s for (s,) in q(path, "SELECT source FROM quarantine ORDER BY id")]


# -- the message ----------------------------------------------------------------------------------


def test_quarantined_input_of_bounds_raw_and_reason_and_keeps_the_length() -> None:
    raw = bytes(range(256)) * 20  # 5120 bytes
    item = QuarantinedInput.of("s" * 300, "line one\n\tline  two\r\n" + "x" * 600, raw, 7)
    assert item.raw == raw[:QUARANTINE_RAW_MAX] and item.raw_len == len(raw) == 5120
    assert item.reason.startswith("line one line two xxx") and len(item.reason) == 500
    assert "\n" not in item.reason and "\t" not in item.reason
    assert item.source == "s" * 200 and item.received_ns == 7
    assert QuarantinedInput.of("src", " \n ", bytearray(b"ab"), 1).reason == "rejected"
    assert QuarantinedInput.of("src", "r", bytearray(b"ab"), 1).raw == b"ab"  # bytes, not a view


# -- one transaction ------------------------------------------------------------------------------


def test_readings_quarantine_and_marks_of_one_append_are_committed_together(
    journal: Journal, path: str
) -> None:
    items = (bad("a"), bad("b", raw=b"x" * 5000))
    marks = (SourceMark("17", "fp-a"), SourceMark("18", "fp-b"))
    reply = journal.append(BatchId("mqtt-1", 1, 1), make_batch("mqtt-1", ["veh-1"] * 3, "m1"),
                           0, items, marks)
    assert reply == Appended(BatchId("mqtt-1", 1, 1), (SeqRange("veh-1", 1, 3),), Position(1),
                             Position(3))
    # Another process sees all three at once.
    assert stored_markers(path) == {"m1": 3}
    rows = q(path, "SELECT sensor_id, source, reason, raw, raw_len, received_ns, committed_ns "
                   "FROM quarantine ORDER BY id")
    assert rows == [
        ("mqtt-1", "mqtt:fleet/a", "a: not JSON", b"\x00\xffgarbage", 9, TS0 + 5, NOW),
        ("mqtt-1", "mqtt:fleet/b", "b: not JSON", b"x" * QUARANTINE_RAW_MAX, 5000, TS0 + 5, NOW),
    ]
    assert totals(path) == {"mqtt-1": (2, 0, "b: not JSON")}
    assert journal.source_marks("mqtt-1") == {"17": "fp-a", "18": "fp-b"}
    with open_readonly(path) as reader:
        assert reader.source_marks("mqtt-1") == {"17": "fp-a", "18": "fp-b"}
        assert reader.source_marks("other") == {}


def test_hand_built_input_without_raw_len_stores_the_raw_length(journal: Journal, path: str):
    item = QuarantinedInput("can:0x1a0", "short frame", b"\x01\x02", TS0)  # raw_len -1
    assert isinstance(journal.append(BatchId("can-1", 1, 1), None, 0, (item,)), Appended)
    assert q(path, "SELECT raw_len FROM quarantine") == [(2,)]


def test_append_refused_for_the_disk_budget_stores_none_of_the_three(path: str) -> None:
    batch_id = BatchId("mqtt-1", 1, 1)
    args = (make_batch("mqtt-1", ["veh-1"] * 50, "m1"), 0, (bad("a"),), (SourceMark("1", "f"),))
    with Journal(path, synchronous="NORMAL", disk_budget_bytes=150_000) as small:
        before = snapshot(path)
        reply = small.append(batch_id, *args)
        assert isinstance(reply, AppendRefused) and reply.reason == "disk_budget"
        assert reply.retry_after_s > 0  # back-pressure, not "invalid": the outbox retries
        # Nor with the readings left out: the quarantine costs space too.
        only = small.append(BatchId("mqtt-1", 1, 2), None, 0, (bad("b", raw=b"z" * 4096),))
        assert isinstance(only, AppendRefused) and only.reason == "disk_budget"
        after = snapshot(path)
        assert after == before  # no readings, no quarantine row, no totals, no marks, no id
        assert small.last_position() == START
    # With room the same batch (a resend: same id) goes in whole, once.
    with Journal(path, synchronous="NORMAL") as roomy:
        assert isinstance(roomy.append(batch_id, *args), Appended)
        assert roomy.append(batch_id, *args).duplicate
        assert stored_markers(path) == {"m1": 50}
        assert kept_sources(path) == ["mqtt:fleet/a"] and roomy.source_marks("mqtt-1") == {"1": "f"}


# -- resends --------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_readings", [True, False], ids=["readings", "extras-only"])
def test_resent_batch_stores_its_quarantine_and_marks_once(
    journal: Journal, path: str, with_readings: bool
) -> None:
    batch = make_batch("mqtt-1", ["veh-1"] * 2, "m1") if with_readings else None
    items, marks = (bad("a"), bad("b")), (SourceMark("5", "v1"),)
    first = journal.append(BatchId("mqtt-1", 1, 1), batch, 0, items, marks)
    assert isinstance(first, Appended) and not first.duplicate
    before = snapshot(path)
    again = journal.append(BatchId("mqtt-1", 1, 1), batch, 0, items, marks)
    assert isinstance(again, Appended) and again.duplicate and again.ranges == first.ranges
    assert snapshot(path) == before
    assert totals(path) == {"mqtt-1": (2, 0, "b: not JSON")}


def test_resend_of_an_older_batch_does_not_bring_back_an_overwritten_mark(
    journal: Journal
) -> None:
    one = (BatchId("mqtt-1", 1, 1), make_batch("mqtt-1", ["veh-1"], "m1"), 0, (),
           (SourceMark("5", "old"),))
    journal.append(*one)
    journal.append(BatchId("mqtt-1", 1, 2), make_batch("mqtt-1", ["veh-1"], "m2"), 0, (),
                   (SourceMark("5", "new"),))
    assert journal.append(*one).duplicate
    assert journal.source_marks("mqtt-1") == {"5": "new"}


def test_resent_extras_only_batch_below_the_resend_floor_stores_nothing(
    journal: Journal, path: str
) -> None:
    journal.append(BatchId("mqtt-1", 1, 1), None, 0, (bad("a"),))
    journal.append(BatchId("mqtt-1", 1, 2), None, 2, (bad("b"),))  # floor 2: id 1 forgotten
    before = snapshot(path)
    late = journal.append(BatchId("mqtt-1", 1, 1), None, 0, (bad("a"),))
    assert isinstance(late, Appended) and late.duplicate
    assert snapshot(path) == before


def test_resent_extras_only_batch_repeats_the_first_reply(journal: Journal) -> None:
    journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 3, "a"))
    first = journal.append(BatchId("mqtt-1", 1, 1), None, 0, (bad("a"),))
    again = journal.append(BatchId("mqtt-1", 1, 1), None, 0, (bad("a"),))
    assert (again.first, again.last) == (first.first, first.last)


# -- appends without readings ---------------------------------------------------------------------


def test_quarantine_only_and_marks_only_appends_take_no_positions(
    journal: Journal, path: str
) -> None:
    journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"] * 3, "a"))
    only_bad = journal.append(BatchId("mqtt-1", 1, 1), None, 0, (bad("a"),))
    only_marks = journal.append(BatchId("mqtt-1", 1, 2), None, 0, (), (SourceMark("9", "f"),))
    for reply in (only_bad, only_marks):
        assert isinstance(reply, Appended) and not reply.duplicate
        assert reply.ranges == () and reply.first == reply.last == Position(3)
    assert journal.last_position() == Position(3)
    assert kept_sources(path) == ["mqtt:fleet/a"] and journal.source_marks("mqtt-1") == {"9": "f"}
    # Positions and seqs go on where the readings left them (I2).
    nxt = journal.append(BatchId("mqtt-1", 1, 3), make_batch("mqtt-1", ["veh-1"], "b"))
    assert nxt.ranges == (SeqRange("veh-1", 4, 4),) and nxt.first == Position(4)
    assert journal.verify().ok


def test_append_without_readings_quarantine_or_marks_is_invalid(journal: Journal, path: str):
    before = snapshot(path)
    reply = journal.append(BatchId("mqtt-1", 1, 1), None, 0, (), ())
    assert isinstance(reply, AppendRefused) and reply.reason == "invalid"
    assert snapshot(path) == before


# -- marks ----------------------------------------------------------------------------------------


def test_marks_replace_the_same_key_per_sensor(journal: Journal, path: str) -> None:
    journal.append(BatchId("mqtt-1", 1, 1), None, 0, (),
                   (SourceMark("1", "a"), SourceMark("2", "b")))
    journal.append(BatchId("mqtt-2", 1, 1), None, 0, (), (SourceMark("1", "other"),))
    journal.append(BatchId("mqtt-1", 1, 2), None, 0, (), (SourceMark("1", "c"),))
    assert journal.source_marks("mqtt-1") == {"1": "c", "2": "b"}
    assert journal.source_marks("mqtt-2") == {"1": "other"}
    # A new incarnation of the sensor sees what earlier ones committed.
    journal.append(BatchId("mqtt-1", 2, 1), None, 0, (), (SourceMark("2", "d"),))
    assert journal.source_marks("mqtt-1") == {"1": "c", "2": "d"}
    assert q(path, "SELECT count(*) FROM source_marks") == [(3,)]


# -- the bounded quarantine -----------------------------------------------------------------------


def test_trimming_keeps_the_newest_rows_and_the_totals_count_all(path: str) -> None:
    with Journal(path, synchronous="NORMAL", quarantine_max_rows=4) as j:
        j.append(BatchId("a", 1, 1), None, 0, (bad("a1"), bad("a2"), bad("a3")))
        j.append(BatchId("b", 1, 1), None, 0, (bad("b1"),))
        assert kept_sources(path) == ["mqtt:fleet/" + s for s in ("a1", "a2", "a3", "b1")]
        assert totals(path) == {"a": (3, 0, "a3: not JSON"), "b": (1, 0, "b1: not JSON")}
        j.append(BatchId("c", 1, 1), None, 0, (bad("c1"), bad("c2")))  # a1, a2 go
        j.append(BatchId("b", 1, 2), make_batch("b", ["veh-1"], "r"), 0, (bad("b2"),))  # a3
        assert kept_sources(path) == ["mqtt:fleet/" + s for s in ("b1", "c1", "c2", "b2")]
        assert totals(path) == {"a": (3, 3, "a3: not JSON"), "b": (2, 0, "b2: not JSON"),
                                "c": (2, 0, "c2: not JSON")}
        # One append bigger than the whole quarantine keeps its own newest rows.
        j.append(BatchId("a", 1, 2), None, 0, tuple(bad(f"x{i}") for i in range(6)))
        assert kept_sources(path) == ["mqtt:fleet/" + s for s in ("x2", "x3", "x4", "x5")]
        assert totals(path) == {"a": (9, 5, "x5: not JSON"), "b": (2, 2, "b2: not JSON"),
                                "c": (2, 2, "c2: not JSON")}
        assert stored_markers(path) == {"r": 1}  # trimming never touches records
        stats = {s.sensor_id: s for s in j.stats().quarantine}
        assert (stats["a"].quarantined, stats["a"].trimmed) == (9, 5)
        assert stats["a"].last_ns > 0 and stats["a"].last_reason == "x5: not JSON"
    with pytest.raises(ValueError, match="quarantine_max_rows must be > 0"):
        Journal(path, quarantine_max_rows=0)


@settings(max_examples=40, deadline=None)
@given(
    max_rows=st.integers(1, 6),
    appends=st.lists(st.tuples(st.sampled_from("abc"), st.integers(1, 5)), min_size=1,
                     max_size=10),
)
def test_quarantine_keeps_exactly_the_newest_rows_across_sensors(max_rows, appends) -> None:
    every: list[tuple[str, str]] = []  # (sensor, label) in commit order
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "journal.db")
        with Journal(path, synchronous="NORMAL",
                     quarantine_max_rows=max_rows) as j:
            for no, (sensor, n) in enumerate(appends, 1):
                labels = [f"{sensor}{no}-{i}" for i in range(n)]
                reply = j.append(BatchId(sensor, 1, no), None, 0, tuple(map(bad, labels)))
                assert isinstance(reply, Appended)
                every += [(sensor, label) for label in labels]
            kept = every[-max_rows:]
            assert kept_sources(path) == [f"mqtt:fleet/{label}" for _, label in kept]
            everyone, still = Counter(s for s, _ in every), Counter(s for s, _ in kept)
            assert {s: (n, t) for s, (n, t, _) in totals(path).items()} == {
                s: (n, n - still[s]) for s, n in everyone.items()
            }
            with open_readonly(path) as reader:
                assert [r.source for r in reader.quarantined(limit=100)] == kept_sources(path)


# -- what the journal refuses before writing ------------------------------------------------------


def _typed(**fields) -> QuarantinedInput:
    base = dict(source="s", reason="r", raw=b"x", received_ns=TS0, raw_len=1)
    base.update(fields)
    return QuarantinedInput(**base)


@pytest.mark.parametrize(
    ("quarantined", "marks", "expected"),
    [
        ([bad("a")], (), "must be tuples"),
        ((), [SourceMark("k", "v")], "must be tuples"),
        (("not an input",), (), "expected QuarantinedInput"),
        ((_typed(raw="text, not bytes"),), (), "wrongly typed"),
        ((_typed(source=5),), (), "wrongly typed"),
        ((_typed(reason=None),), (), "wrongly typed"),
        ((_typed(received_ns=1.5),), (), "wrongly typed"),
        ((_typed(received_ns=True),), (), "wrongly typed"),
        ((_typed(raw_len="3"),), (), "wrongly typed"),
        ((), (SourceMark("k", 5),), "SourceMark"),
        ((), (SourceMark(5, "v"),), "SourceMark"),
        ((), (("k", "v"),), "SourceMark"),
    ],
)
def test_wrongly_typed_quarantine_or_marks_are_refused_invalid_and_store_nothing(
    journal: Journal, path: str, quarantined, marks, expected: str
) -> None:
    before = snapshot(path)
    batch_id = BatchId("mqtt-1", 1, 1)
    reply = journal.append(batch_id, make_batch("mqtt-1", ["veh-1"], "m"), 0, quarantined, marks)
    assert isinstance(reply, AppendRefused)
    assert reply.reason == "invalid" and expected in reply.detail and reply.retry_after_s == 0.0
    assert reply.reason in NEVER_RETRY  # the outbox drops it instead of retrying forever
    assert snapshot(path) == before


# -- a failure inside the transaction -------------------------------------------------------------
# The types pass `extras_problem`, but SQLite cannot bind the value: the mark (written last,
# after the records, the batch id and the quarantine rows) or a quarantine row fails mid-way.
MID_TRANSACTION = {
    "mark-with-lone-surrogate": ((bad("a"),), (SourceMark("7", "fp-\udc80"),)),
    "received_ns-beyond-64-bits": ((_typed(received_ns=2**64),), (SourceMark("7", "fp"),)),
}


@pytest.mark.parametrize("extras", MID_TRANSACTION.values(), ids=MID_TRANSACTION.keys())
def test_failure_mid_transaction_leaves_no_readings_without_their_marks(
    journal: Journal, path: str, extras
) -> None:
    journal.append(BatchId("mqtt-1", 1, 1), make_batch("mqtt-1", ["veh-1"] * 2, "m1"), 0,
                   (bad("z"),), (SourceMark("1", "one"),))
    before = snapshot(path)
    try:
        reply = journal.append(BatchId("mqtt-1", 1, 2), make_batch("mqtt-1", ["veh-1"] * 3, "m2"),
                               0, *extras)
    except (UnicodeEncodeError, OverflowError):
        reply = None  # raised after the inserts: the transaction was rolled back
    assert not isinstance(reply, Appended)
    assert snapshot(path) == before  # none of the readings, the quarantine or the marks
    assert journal.last_position() == Position(2)
    # The journal goes on: the next batch gets the next positions and seqs.
    nxt = journal.append(BatchId("mqtt-1", 1, 3), make_batch("mqtt-1", ["veh-1"], "m3"), 0, (),
                         (SourceMark("7", "fp"),))
    assert nxt.ranges == (SeqRange("veh-1", 3, 3),) and nxt.first == Position(3)
    assert journal.source_marks("mqtt-1") == {"1": "one", "7": "fp"}
    assert journal.verify().ok


@pytest.mark.parametrize("extras", MID_TRANSACTION.values(), ids=MID_TRANSACTION.keys())
def test_unstorable_quarantine_or_mark_is_refused_invalid(journal: Journal, extras) -> None:
    reply = journal.append(BatchId("mqtt-1", 1, 1), make_batch("mqtt-1", ["veh-1"], "m"), 0,
                           *extras)
    assert isinstance(reply, AppendRefused) and reply.reason == "invalid"


# -- migration: v4 -> v5 --------------------------------------------------------------------------


def _v4_journal(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal as the v4 release left it: its schema (the first four migrations) and the
    rows its writer committed for two batches of imu-1, a router commit and a watermark
    (written as SQL: today's writer writes columns v4 does not have)."""
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", MIGRATIONS[:4])
        m.setattr(schema, "SCHEMA_VERSION", 4)
        conn, _ = schema.open_for_writing(path, "NORMAL", lambda: NOW)
    seqs = {"veh-1": 0, "veh-2": 0}
    pos = 0
    try:
        with conn:
            for batch_no, marker, devices in ((1, "v4a", ["veh-1"] * 3 + ["veh-2"]),
                                              (2, "v4b", ["veh-1"] * 2)):
                batch = make_batch("imu-1", devices, marker)
                first, spans = pos + 1, {}
                for device, ts, kind, payload in zip(batch.device_ids, batch.ts, batch.kinds,
                                                     batch.payloads, strict=True):
                    pos += 1
                    seqs[device] += 1
                    spans.setdefault(device, [seqs[device], seqs[device]])[1] = seqs[device]
                    conn.execute("INSERT INTO records(pos, device_id, seq, sensor_id, ts, kind, "
                                 "payload, committed_ns) VALUES (?, ?, ?, 'imu-1', ?, ?, ?, ?)",
                                 (pos, device, seqs[device], ts, kind, payload, NOW))
                ranges = json.dumps([[d, lo, hi] for d, (lo, hi) in spans.items()])
                conn.execute("INSERT INTO batches VALUES ('imu-1', 1, ?, ?, ?, ?, ?)",
                             (batch_no, first, pos, ranges, NOW))
            conn.executemany("INSERT INTO devices VALUES (?, ?)", list(seqs.items()))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'last_pos'", (str(pos),))
            conn.execute("INSERT INTO cursors(consumer, pos, updated_ns, last_request_id, "
                         "last_ranges) VALUES ('router', 4, ?, 1, '[]')", (NOW,))
            conn.execute("INSERT INTO watermarks VALUES ('veh-1', 'P1', 2, ?)", (NOW,))
    finally:
        conn.close()


def snapshot_v4(path: str) -> dict[str, list[tuple]]:
    """The tables `snapshot` reads that a v4 journal has too."""
    return {
        "records": q(path, "SELECT pos, device_id, seq, payload FROM records ORDER BY pos"),
        "devices": q(path, "SELECT * FROM devices ORDER BY device_id"),
        "batches": q(path, "SELECT sensor_id, incarnation, batch_no FROM batches ORDER BY 1, 2, 3"),
        "meta": q(path, "SELECT * FROM meta ORDER BY key"),
    }


def test_v4_journal_gains_the_v5_tables_with_its_records_intact(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SCHEMA_VERSION >= 5 and MIGRATIONS[4].__name__ == "_v5_quarantine_and_source_marks"
    _v4_journal(path, monkeypatch)
    assert q(path, "PRAGMA user_version") == [(4,)]
    tables = {n for (n,) in q(path, "SELECT name FROM sqlite_schema WHERE type = 'table'")}
    assert not tables & set(V5_TABLES)
    with pytest.raises(SchemaTooOld):  # readers wait for the writer to migrate
        open_readonly(path)
    keep = ("records", "devices", "batches", "meta")
    before = snapshot_v4(path)

    with Journal(path, synchronous="NORMAL", clock_ns=lambda: NOW) as j:
        assert j.migrated_from == 4
        assert q(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert {k: v for k, v in snapshot(path).items() if k in keep} == before
        assert j.cursor("router") == Position(4) and j.watermarks() == {"veh-1": {"P1": 2}}
        # The v4 batch ids are still known; new appends use the new tables.
        assert j.append(BatchId("imu-1", 1, 2), make_batch("imu-1", ["veh-1"] * 2, "v4b")).duplicate
        new = j.append(BatchId("imu-1", 1, 3), make_batch("imu-1", ["veh-1"], "v5"), 0,
                       (bad("a"),), (SourceMark("k", "v"),))
        assert new.ranges == (SeqRange("veh-1", 6, 6),) and new.first == Position(7)
        assert kept_sources(path) == ["mqtt:fleet/a"] and j.source_marks("imu-1") == {"k": "v"}
        assert j.verify().ok
    assert stored_markers(path) == {"v4a": 4, "v4b": 2, "v5": 1}
    with open_readonly(path) as reader:
        assert reader.schema_version == SCHEMA_VERSION and len(reader.quarantined()) == 1


# -- reading it back ------------------------------------------------------------------------------


def test_reader_lists_quarantined_oldest_first_by_sensor_and_after_an_id(
    journal: Journal, path: str
) -> None:
    journal.append(BatchId("a", 1, 1), None, 0, (bad("a1"), bad("a2")))
    journal.append(BatchId("b", 1, 1), None, 0, (bad("b1"),))
    journal.append(BatchId("a", 1, 2), None, 0, (bad("a3"),))
    with open_readonly(path) as reader:
        rows = reader.quarantined()
        assert [r.source for r in rows] == [f"mqtt:fleet/{s}" for s in ("a1", "a2", "b1", "a3")]
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        assert [r.source[-2:] for r in reader.quarantined(sensor_id="a")] == ["a1", "a2", "a3"]
        assert [r.source[-2:] for r in reader.quarantined(limit=2)] == ["a1", "a2"]
        assert [r.source[-2:] for r in reader.quarantined(after_id=rows[1].id)] == ["b1", "a3"]
        assert [r.source[-2:] for r in reader.quarantined(sensor_id="a", after_id=rows[1].id)] == [
            "a3"]
        assert rows[0].to_json() == {
            "id": rows[0].id, "sensor_id": "a", "source": "mqtt:fleet/a1",
            "reason": "a1: not JSON", "raw_hex": "00ff67617262616765", "raw_len": 9,
            "received_ns": TS0 + 5,
        }
        stats = reader.stats().to_json()
    assert stats["quarantine"] == {
        "a": {"quarantined": 3, "trimmed": 0, "kept": 3, "last_reason": "a3: not JSON",
              "last_ns": NOW},
        "b": {"quarantined": 1, "trimmed": 0, "kept": 1, "last_reason": "b1: not JSON",
              "last_ns": NOW},
    }


# -- sensor outbox -> journal ---------------------------------------------------------------------


def test_deliveries_through_the_outbox_commit_whole_and_receipts_follow_the_commits(
    journal: Journal, path: str
) -> None:
    box = SensorOutbox("mqtt-1", 9, batch_max_readings=4, batch_max_age_s=1.0,
                       buffer_max_bytes=1 << 20, max_in_flight=2, resend_after_s=5.0,
                       clock=lambda: 100.0)

    def readings(tag: str, n: int) -> list[Reading]:
        return [Reading("veh-1", "mqtt-1", TS0 + i, "imu", {"d": tag, "i": i}) for i in range(n)]

    box.add_delivery(readings("d1", 3), marks=[SourceMark("1", "f1")], receipt="ack-1")
    box.add_delivery(quarantined=[bad("d2")], marks=[SourceMark("2", "f2")], receipt="ack-2")
    box.add_delivery(readings("d3", 2), marks=[SourceMark("3", "f3")], receipt="ack-3")  # closes 1
    box.add_delivery(receipt="ack-4")  # a redelivery of something already held
    box.flush()
    sends = box.due_sends()
    assert [len(a.batch) for a in sends] == [3, 2]
    assert box.take_receipts() == []
    # The second batch commits first: nothing may be acknowledged to the broker yet.
    second = journal.append(sends[1].batch_id, sends[1].batch, sends[1].resend_floor,
                            sends[1].quarantined, sends[1].marks)
    box.on_appended(second)
    assert box.take_receipts() == []
    assert journal.source_marks("mqtt-1") == {"3": "f3"}
    first = journal.append(sends[0].batch_id, sends[0].batch, sends[0].resend_floor,
                           sends[0].quarantined, sends[0].marks)
    box.on_appended(first)
    assert box.take_receipts() == ["ack-1", "ack-2", "ack-3", "ack-4"]
    assert journal.source_marks("mqtt-1") == {"1": "f1", "2": "f2", "3": "f3"}
    assert kept_sources(path) == ["mqtt:fleet/d2"]
    assert box.idle() and box.take_receipts() == []


# -- `fleetgw journal quarantine` and `fleetgw journal stats` -------------------------------------


@pytest.fixture
def quarantined_journal(journal: Journal, path: str) -> str:
    journal.append(BatchId("mqtt-1", 1, 1), make_batch("mqtt-1", ["veh-1"], "m"), 0, (
        QuarantinedInput.of("mqtt:fleet/veh-1/imu", "payload is not valid JSON: line 1",
                            b'{"ax": 1.5,\n', TS0),
        QuarantinedInput.of("mqtt:fleet/veh-1/imu", "payload is not UTF-8 text",
                            b"\xff\xfe\x00" + b"A" * 100, TS0 + 10**9),
    ))
    journal.append(BatchId("nmea-1", 1, 1), None, 0, (
        QuarantinedInput.of("udp://127.0.0.1:10110\x1b[31m", "checksum 0x47, expected 0x48",
                            b"$GPGGA," + b"9" * 200 + b"*47\r\n", TS0 + 2 * 10**9),
    ))
    return path


def test_quarantine_command_lists_inputs_oldest_first_shown_safely(
    quarantined_journal: str, capsys
) -> None:
    assert cli(["journal", "quarantine", "--db", quarantined_journal]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "RAW_LEN" in line)
    rows = lines[header + 1:header + 4]
    assert [r.split()[2] for r in rows] == ["mqtt-1", "mqtt-1", "nmea-1"]  # oldest first
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    assert "2003-03-03T09:46:40Z" in rows[0]  # received, in UTC
    assert '{"ax": 1.5,\\n' in rows[0] and "payload is not valid JSON" in rows[0]
    assert "hex:fffe0041414141" in rows[1] and " 103 " in rows[1]  # raw length
    assert "$GPGGA,999" in rows[2] and "*47" not in rows[2] and "..." in rows[2]  # cut
    assert "\x1b" not in out and "udp://127.0.0.1:10110\\x1b[31m" in rows[2]
    cut = [re.search(pattern, row).group(0) for pattern, row in (
        (r"hex:[0-9a-f]+\.\.\.", rows[1]), (r"\$GPGGA,9+\.\.\.", rows[2]))]
    assert [len(c) for c in cut] == [60, 60]  # cut to 60 characters in the table
    totals_at = lines.index("totals")
    assert lines[totals_at + 2].split()[:4] == ["mqtt-1", "2", "0", "2"]
    assert lines[totals_at + 3].split()[:4] == ["nmea-1", "1", "0", "1"]


def test_quarantine_command_json_has_the_raw_bytes_in_full(
    quarantined_journal: str, capsys
) -> None:
    assert cli(["journal", "quarantine", "--db", quarantined_journal, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    raws = [bytes.fromhex(i["raw_hex"]) for i in out["inputs"]]
    assert raws == [b'{"ax": 1.5,\n', b"\xff\xfe\x00" + b"A" * 100,
                    b"$GPGGA," + b"9" * 200 + b"*47\r\n"]
    assert [i["sensor_id"] for i in out["inputs"]] == ["mqtt-1", "mqtt-1", "nmea-1"]
    assert out["more"] is False
    assert out["totals"]["mqtt-1"] == {"quarantined": 2, "trimmed": 0, "kept": 2,
                                       "last_reason": "payload is not UTF-8 text",
                                       "last_ns": NOW}


def test_quarantine_command_filters_by_sensor_and_pages(quarantined_journal: str, capsys):
    assert cli(["journal", "quarantine", "--db", quarantined_journal, "--sensor", "nmea-1",
                "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [i["sensor_id"] for i in out["inputs"]] == ["nmea-1"] and list(out["totals"]) == [
        "nmea-1"]
    assert cli(["journal", "quarantine", "--db", quarantined_journal, "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "more: --after 2" in text and "nmea-1  " not in text.split("totals")[0]
    assert cli(["journal", "quarantine", "--db", quarantined_journal, "--limit", "2",
                "--after", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [i["id"] for i in out["inputs"]] == [3] and out["more"] is False
    assert cli(["journal", "quarantine", "--db", quarantined_journal, "--sensor", "gps-9"]) == 0
    assert "no quarantined inputs of sensor gps-9 kept" in capsys.readouterr().out


def test_quarantine_command_on_a_missing_or_old_journal_or_bad_limit_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    missing = str(tmp_path / "none.db")
    assert cli(["journal", "quarantine", "--db", missing]) == 2
    assert missing in capsys.readouterr().err and not Path(missing).exists()
    old = str(tmp_path / "v4.db")
    _v4_journal(old, monkeypatch)
    assert cli(["journal", "quarantine", "--db", old]) == 2
    assert "older than this fleetgw" in capsys.readouterr().err
    assert cli(["journal", "quarantine", "--db", old, "--limit", "0"]) == 2
    assert "--limit must be > 0" in capsys.readouterr().err


def test_stats_text_shows_a_quarantine_section_only_when_there_is_one(
    journal: Journal, path: str, capsys
) -> None:
    journal.append(BatchId("imu-1", 1, 1), make_batch("imu-1", ["veh-1"], "a"))
    assert cli(["journal", "stats", "--db", path]) == 0
    assert "quarantine" not in capsys.readouterr().out
    journal.append(BatchId("mqtt-1", 1, 1), None, 0, (bad("a"), bad("b")))
    assert cli(["journal", "stats", "--db", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("quarantine (2 inputs"))
    assert f"fleetgw journal quarantine --db {path}" in lines[at]
    assert lines[at + 1].split() == ["SENSOR", "QUARANTINED", "TRIMMED", "KEPT", "LAST"]
    assert lines[at + 2].split()[:4] == ["mqtt-1", "2", "0", "2"]
    assert cli(["journal", "stats", "--db", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quarantine"]["mqtt-1"]["kept"] == 2
