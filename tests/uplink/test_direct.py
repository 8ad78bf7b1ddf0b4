"""Direct mode against a real ClickHouse server (Debian's 18.16, `conftest.clickhouse`): real
batches from a real journal, posted by `DirectSink`. Every synced record lands in its table
with the journal's values; a replay is stored once as ReplacingMergeTree sees it (FINAL); an
outage is a retry and a schema problem a refusal with ClickHouse's words; bodies travel
gzip-compressed; the Uplink loop syncs P1, P2 and P3 and moves the watermarks. The full schema
for modern servers is checked on embedded ClickHouse 26.9 (chdb). Nothing sleeps."""

from __future__ import annotations

import datetime as dt
import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

pytest.importorskip("pycurl")

from actors.journal import Journal
from actors.journal.reader import JournalReader
from actors.uplink.direct import (
    DirectError,
    DirectSink,
    ServerProfile,
    batch_inserts,
    insert_settings,
    known_settings_sql,
    legacy_layout,
    parse_version,
)
from actors.uplink.envelope import SignedBatch
from actors.uplink.link import LATER, RETRY, classify
from actors.uplink.planner import BatchPlanner
from actors.uplink.uplink import ACKED
from central.schema import (
    AGGREGATES,
    BATCHES,
    INFERENCES,
    LEGACY_TABLES,
    RECORD_TABLES,
    SAFETY_EVENTS,
    TABLES,
    direct_ddl,
    table_for_kind,
)
from messages.journal import BatchId
from messages.readings import ReadingBatch, encode_values
from tests.clickhouse_server import WRITER, WRITER_PASSWORD, ClickHouseProcess, free_port
from tests.uplink.test_uplink_e2e import (
    GATEWAY,
    KEY,
    Clock,
    expected_watermarks,
    fill,
    make_uplink,
    run,
)

MIXED = 40
REPO = Path(__file__).resolve().parents[2]
_incarnations = itertools.count(1)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.db", synchronous="NORMAL") as j:
        yield j


@pytest.fixture
def sink(clickhouse: ClickHouseProcess, clickhouse_db: str) -> Iterator[DirectSink]:
    """A DirectSink on the session's server, its schema created in the test's database."""
    direct = DirectSink(clickhouse.url, clickhouse_db, connect_timeout_s=2, total_timeout_s=20)
    direct.ensure_schema()
    yield direct
    direct.close()


def mixed_readings(n: int = MIXED) -> ReadingBatch:
    """Records of every table's kinds (inference, safety event, aggregate, plain reading)
    for both of the e2e helpers' devices, dated now."""
    ts0 = time.time_ns()
    kinds, payloads = [], []
    for i in range(n):
        kind = ("inference", "safety-event", "agg:speed_1m", "gps")[i % 4]
        kinds.append(kind)
        payloads.append(encode_values({
            "inference": {"model_version": "anomaly-v3", "model_sha256": "ab" * 32,
                          "score": 0.25 + i, "confidence": 0.5, "label": f"label-{i}",
                          "input_sha256": "cd" * 32, "latency_us": 1200 + i},
            "safety-event": {"type": f"harsh-brake-{i}", "source": "rule", "g": -0.61},
            "agg:speed_1m": {"window_start": ts0 - 60 * 10**9 + i, "window_end": ts0 + i,
                             "count": 600 + i, "mean": 12.25},
            "gps": {"lat": 48.1 + i / 1000, "lon": 11.5},
        }[kind]))
    return ReadingBatch(sensor_id="mixed-1", device_ids=tuple(("veh-1", "veh-2")[i % 2]
                                                             for i in range(n)),
                        ts=tuple(ts0 + i * 1_000_003 for i in range(n)), kinds=tuple(kinds),
                        payloads=tuple(payloads))


def fill_mixed(journal: Journal, readings: int = 500) -> int:
    """The mixed records, then the e2e helper's imu readings; all routed. How many sync."""
    journal.append(BatchId("mixed-1", next(_incarnations), 1), mixed_readings())
    return fill(journal, readings)


def synced_rows(journal: Journal) -> dict[str, set[tuple]]:
    """Per central table: (device_id, seq, sensor_id, kind, ts, lane, payload) of every
    record that should sync (the journal's own columns)."""
    conn = apsw.Connection(journal.path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows: dict[str, set[tuple]] = {}
        for row in conn.execute("SELECT device_id, seq, sensor_id, kind, ts, lane, payload "
                                "FROM records WHERE lane IN ('P1', 'P2', 'P3') "
                                "AND drop_reason IS NULL"):
            rows.setdefault(table_for_kind(row[3]), set()).add(tuple(row))
        return rows
    finally:
        conn.close()


def whole_batches(journal: Journal) -> list[SignedBatch]:
    """One signed batch per (device, lane) holding all its routed records."""
    with JournalReader(journal.path) as reader:
        planner = BatchPlanner(5000, 1 << 20)
        return [planner.build(reader, b, KEY, GATEWAY) for b in planner.next_batches(reader)]


def tsv(server: ClickHouseProcess, sql: str) -> list[list[str]]:
    return [line.split("\t") for line in server.query(sql).splitlines()]


def count(server: ClickHouseProcess, sql: str) -> int:
    return int(server.query(sql).strip())


# ---- what lands where ---------------------------------------------------------------------------
def test_every_record_lands_in_its_table_with_the_journals_values(
        journal, sink, clickhouse, clickhouse_db) -> None:
    synced = fill_mixed(journal)
    batches = whole_batches(journal)
    assert sum(b.header.count for b in batches) == synced  # every synced record is in one
    for batch in batches:
        result = sink.post(batch)
        assert (result.status, result.error) == (200, None), result
        assert result.body["status"] == "ok"
        assert result.body["acked_seq_hi"] == batch.header.seq_hi
        assert result.body["dedup"] == "ReplacingMergeTree"  # 18.16: no token
    expected = synced_rows(journal)
    assert set(expected) == set(RECORD_TABLES)  # the journal has rows for every table
    for table, rows in expected.items():
        stored = tsv(clickhouse, f"SELECT device_id, seq, sensor_id, kind, ts_ns, lane, values "
                                 f"FROM {clickhouse_db}.{table} FORMAT TSVRaw")
        assert {(d, int(s), sen, k, int(ts), lane, v) for d, s, sen, k, ts, lane, v in stored} \
            == rows, table
    # The typed columns computed by 18.16 from values, and DateTime from the exact integer.
    journal_ts = {(d, s): ts for rows in expected.values() for d, s, _, _, ts, _, _ in rows}
    for device, seq, score, label, latency, ts, ts_ns in tsv(clickhouse, (
            "SELECT device_id, seq, score, label, latency_us, toUnixTimestamp(ts), ts_ns "
            f"FROM {clickhouse_db}.{INFERENCES}")):
        i = int(label.removeprefix("label-"))
        assert (float(score), int(latency)) == (0.25 + i, 1200 + i)
        assert int(ts_ns) == journal_ts[device, int(seq)]
        assert int(ts) == int(ts_ns) // 10**9
    assert {r[0].startswith("harsh-brake-") and r[1] == "rule" for r in tsv(
        clickhouse, f"SELECT type, source FROM {clickhouse_db}.{SAFETY_EVENTS}")} == {True}
    for rule, start_ns, end_ns, records, start in tsv(clickhouse, (
            "SELECT rule, window_start_ns, window_end_ns, records, toUnixTimestamp(window_start)"
            f" FROM {clickhouse_db}.{AGGREGATES}")):
        assert rule == "speed_1m"
        assert int(end_ns) - int(start_ns) == 60 * 10**9
        assert 600 <= int(records) < 600 + MIXED
        assert int(start) == int(start_ns) // 10**9
    # The audit row, one per batch, as the receiver writes it.
    audit = {(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), r[5], r[6]) for r in tsv(
        clickhouse, "SELECT device_id, lane, seq_hi, count, rows, dedup_token, signature "
                    f"FROM {clickhouse_db}.{BATCHES}")}
    assert audit == {(b.header.device_id, b.header.lane, b.header.seq_hi, b.header.count,
                      b.header.count, b.header.dedup_token, b.signature_hex) for b in batches}


def test_a_replayed_batch_is_stored_once_under_final_and_collapses_on_merge(
        journal, sink, clickhouse, clickhouse_db) -> None:
    synced = fill_mixed(journal)
    batches = whole_batches(journal)
    tables = (*RECORD_TABLES, BATCHES)
    for table in tables:  # hold merges: the duplicates stay visible until we merge
        clickhouse.query(f"SYSTEM STOP MERGES {clickhouse_db}.{table}")
    for _ in range(2):
        assert {sink.post(b).status for b in batches} == {200}

    def counts() -> tuple[int, int, int]:
        """(count() FINAL, uniqExact(key), count()) over the record tables."""
        return tuple(sum(count(clickhouse, sql.format(db=clickhouse_db, t=t))
                         for t in RECORD_TABLES)
                     for sql in ("SELECT count() FROM {db}.{t} FINAL",
                                 "SELECT uniqExact(device_id, generation, seq) FROM {db}.{t}",
                                 "SELECT count() FROM {db}.{t}"))

    assert counts() == (synced, synced, 2 * synced)  # 18.16: both copies until a merge
    assert count(clickhouse, f"SELECT count() FROM {clickhouse_db}.{BATCHES} FINAL") \
        == len(batches)
    for table in tables:
        clickhouse.query(f"SYSTEM START MERGES {clickhouse_db}.{table}")
    deadline = time.monotonic() + 30
    while counts()[2] != synced:  # a background merge may hold the parts: ask again
        assert time.monotonic() < deadline, f"not collapsed: {counts()}"
        for table in RECORD_TABLES:
            clickhouse.query(f"OPTIMIZE TABLE {clickhouse_db}.{table} FINAL")
    assert counts() == (synced, synced, synced)


# ---- failures ---------------------------------------------------------------------------------
def test_a_server_that_is_down_is_a_retry_and_the_batch_lands_after_it_is_back(
        journal, start_clickhouse) -> None:
    fill_mixed(journal, readings=0)
    first, second = whole_batches(journal)[:2]
    server = start_clickhouse()
    sink = DirectSink(server.url, "fleet", connect_timeout_s=2, total_timeout_s=10)
    sink.ensure_schema()
    assert sink.post(first).status == 200
    server.crash()
    down = sink.post(second)
    assert (down.status, down.body) == (None, None)
    assert "curl error" in down.error, down
    assert classify(down.status, down.error).action == RETRY
    server.start()  # same ports, same data
    assert sink.post(second).status == 200
    assert count(server, "SELECT count() FROM fleet.batches") == 2
    stored = count(server, "SELECT sum(c) FROM (" + " UNION ALL ".join(
        f"SELECT count() AS c FROM fleet.{t}" for t in RECORD_TABLES) + ")")
    assert stored == first.header.count + second.header.count
    sink.close()


def test_nothing_listening_is_a_retry(journal) -> None:
    fill_mixed(journal, readings=0)
    sink = DirectSink(f"http://127.0.0.1:{free_port()}", "fleet", connect_timeout_s=1)
    with pytest.raises(DirectError, match="curl error 7") as raised:
        sink.ensure_schema()
    assert raised.value.status is None
    result = sink.post(whole_batches(journal)[0])
    assert (result.status, result.body, result.sent_bytes) == (None, None, 0)
    assert result.error.startswith(f"ClickHouse at {sink.url}: curl error 7")
    assert classify(result.status, result.error).action == RETRY


def test_a_dropped_table_is_a_refusal_with_clickhouses_message(
        journal, sink, clickhouse, clickhouse_db) -> None:
    fill_mixed(journal, readings=0)
    batch = whole_batches(journal)[0]
    clickhouse.query(f"DROP TABLE {clickhouse_db}.{BATCHES}")  # every batch writes its row
    result = sink.post(batch)
    assert result.status == 404
    assert f"Table {clickhouse_db}.{BATCHES} doesn't exist" in result.error
    assert result.body["status"] == "refused"
    assert result.body["table"] == BATCHES
    assert result.body["reason"] in result.error and "\n" not in result.error
    assert classify(result.status, result.error).action == LATER


def test_a_missing_database_is_a_refusal(journal, clickhouse) -> None:
    fill_mixed(journal, readings=0)
    sink = DirectSink(clickhouse.url, "no_such_database")  # ensure_schema never ran
    result = sink.post(whole_batches(journal)[0])
    assert result.status == 404
    assert "Database no_such_database doesn't exist" in result.error
    assert classify(result.status, result.error).action == LATER
    sink.close()


def test_credentials_are_used_and_the_password_never_shows(
        journal, clickhouse, clickhouse_db) -> None:
    fill_mixed(journal, readings=0)
    batch = whole_batches(journal)[0]
    wrong = DirectSink(clickhouse.url, clickhouse_db, user=WRITER, password="not-it")
    refused = wrong.post(batch)
    assert refused.status == 401 and "Wrong password for user writer" in refused.error
    assert classify(refused.status, refused.error).action == LATER
    writer = DirectSink(clickhouse.url, clickhouse_db, user=WRITER, password=WRITER_PASSWORD)
    writer.ensure_schema()
    assert writer.post(batch).status == 200
    for text in (repr(writer), repr(wrong), refused.error, repr(refused.body)):
        assert WRITER_PASSWORD not in text and "not-it" not in text
    wrong.close()
    writer.close()


def test_https_is_verified_against_the_configured_ca(journal, clickhouse, clickhouse_db) -> None:
    fill_mixed(journal, readings=0)
    batch = whole_batches(journal)[0]
    trusting = DirectSink(clickhouse.https_url, clickhouse_db, tls_ca=str(clickhouse.ca_file))
    trusting.ensure_schema()
    assert trusting.post(batch).status == 200
    system_cas = DirectSink(clickhouse.https_url, clickhouse_db)  # our CA is not among them
    result = system_cas.post(batch)
    assert result.status is None and "curl error 60" in result.error, result
    assert classify(result.status, result.error).action == RETRY
    trusting.close()
    system_cas.close()


def test_bodies_travel_gzip_compressed(journal, sink, clickhouse_db) -> None:
    fill_mixed(journal, readings=2000)
    batch = max(whole_batches(journal), key=lambda b: b.header.count)
    raw = sum(len(i.data) for i in batch_inserts(batch, sink.profile(), clickhouse_db,
                                                  dt.datetime.now(dt.UTC)))
    result = sink.post(batch)
    assert result.status == 200
    # The server decoded every row from fewer bytes than the uncompressed Native blocks.
    assert sum(result.body["rows"].values()) == batch.header.count
    assert 0 < result.sent_bytes < raw / 4, (result.sent_bytes, raw)


# ---- the uplink loop ----------------------------------------------------------------------------
def test_the_uplink_loop_syncs_p1_p2_p3_and_advances_watermarks(
        journal, sink, clickhouse, clickhouse_db) -> None:
    synced = fill_mixed(journal, readings=3000)
    clock = Clock()
    uplink = make_uplink(journal, "http://127.0.0.1:1", clock)  # the client is replaced
    uplink.client = sink
    outcomes = run(uplink, journal, clock)
    assert {o.action for o in outcomes} == {ACKED}
    assert {o.batch.lane for o in outcomes} == {"P1", "P2", "P3"}
    assert outcomes[0].batch.lane == "P1"  # priority: P1 first
    assert journal.watermarks() == expected_watermarks(journal)
    final = sum(count(clickhouse, f"SELECT count() FROM {clickhouse_db}.{t} FINAL")
                for t in RECORD_TABLES)
    assert final == synced
    assert count(clickhouse, f"SELECT count() FROM {clickhouse_db}.{BATCHES} FINAL") \
        == len(outcomes)


# ---- the server's profile and the full schema -------------------------------------------------
@pytest.mark.parametrize(("version", "readings_columns", "legacy"), [
    ((18, 16, 1), [], True),
    ((22, 1, 3), [], True),
    ((22, 2, 2), [], False),
    ((24, 8, 4), ["device_id", "ts"], False),
    ((24, 8, 4), ["device_id", "ts_ns", "ts"], True),  # made by an older server: keep it
])
def test_the_layout_follows_the_version_and_the_tables_already_there(
        version, readings_columns, legacy) -> None:
    assert legacy_layout(version, readings_columns) is legacy


def test_server_versions_parse_or_say_what_they_expected() -> None:
    assert parse_version("18.16.1\n") == (18, 16, 1)
    assert parse_version("26.9.2.1") == (26, 9, 2, 1)
    with pytest.raises(ValueError, match="not like"):
        parse_version("<html>")


def test_the_repr_hides_the_password_and_the_database_must_be_an_identifier() -> None:
    sink = DirectSink("http://ch:8123/", "fleet", user="u", password="hunter2")
    assert "hunter2" not in repr(sink)
    with pytest.raises(ValueError, match="identifier"):
        DirectSink("http://ch:8123", "fleet; DROP TABLE x")


def test_direct_mode_imports_without_chdb() -> None:
    """The gateway does not install the central extra: nothing direct mode imports from
    central.* may pull chdb in."""
    code = ("import sys; sys.modules['chdb'] = None; import actors.uplink.direct; "
            "assert not any(m.startswith('chdb') for m in sys.modules if sys.modules[m])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_legacy_tables_keep_every_column_name_of_the_full_schema() -> None:
    for full, legacy in zip(TABLES, LEGACY_TABLES, strict=True):
        assert {c.name for c in full.columns} <= {c.name for c in legacy.columns}
        assert not any("LowCardinality" in c.type or "DateTime64" in c.type
                       or "JSONExtract" in c.default for c in legacy.columns)


@pytest.fixture
def modern_clickhouse(request: pytest.FixtureRequest):
    """Embedded ClickHouse 26.9 (chdb, the central extra) standing in for a modern server."""
    pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")
    return request.getfixturevalue("chdb_backend")


def test_the_full_schema_path_is_accepted_and_deduplicated_by_modern_clickhouse(
        journal, modern_clickhouse) -> None:
    """What DirectSink sends a >= 22.2 server (DDL, insert SQL with its token, Native
    blocks), run by embedded ClickHouse 26.9: a replay inserts nothing, even before FINAL."""
    chdb_backend = modern_clickhouse
    db = "direct"
    version = parse_version(chdb_backend.query("SELECT version()", "TSV"))
    for statement in direct_ddl(db, version):
        chdb_backend.query(statement, "TSV")
    known = set(chdb_backend.query(known_settings_sql(), "TSV").split())
    profile = ServerProfile(version, legacy_layout(version, []), insert_settings(known))
    assert (profile.legacy, profile.dedup) == (False, "insert_deduplication_token")
    synced = fill_mixed(journal)
    batches = whole_batches(journal)
    first = dt.datetime.now(dt.UTC)
    for received_at in (first, first + dt.timedelta(hours=1)):  # the replay's rows differ in
        for batch in batches:                                    # ingested_at: only the token
            for insert in batch_inserts(batch, profile, db, received_at):  # makes a duplicate
                assert "insert_deduplication_token" in insert.sql
                chdb_backend._insert(insert.sql, insert.data)
    raw = sum(int(chdb_backend.query(f"SELECT count() FROM {db}.{t}", "TSV"))
              for t in RECORD_TABLES)
    assert raw == synced
    expected = synced_rows(journal)
    stored = chdb_backend.query(f"SELECT device_id, seq, toUnixTimestamp64Nano(ts), values "
                                f"FROM {db}.{INFERENCES} FORMAT TSVRaw", "TSV")
    assert {(d, int(s), int(ts), v) for d, s, ts, v in
            (line.split("\t") for line in stored.splitlines())} \
        == {(d, s, ts, p) for d, s, _, _, ts, _, p in expected[INFERENCES]}
