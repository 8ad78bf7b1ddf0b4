"""The central schema and the backends that apply it: every statement runs (single node) or
parses (cluster), every record has exactly one table, and a batch is stored once however
often it arrives (I5) — checked against embedded chdb and, through a stand-in ClickHouse HTTP
interface that runs the received SQL in chdb, against the HTTP backend too."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import attrs
import pytest

pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")

from actors.uplink.envelope import WIRE_FORMAT, BatchHeader
from central.backend import (
    DUPLICATE,
    INSERT_FORMAT,
    INSERTED,
    BackendError,
    BackendLocked,
    BatchConflict,
    ChdbBackend,
    ClickHouseBackend,
    HttpClickHouseBackend,
)
from central.schema import (
    AGGREGATES,
    BATCHES,
    INFERENCES,
    READINGS,
    RECORD_TABLES,
    SAFETY_EVENTS,
    TABLES,
    cluster_ddl,
    create_statements,
    table_for_kind,
)

USER, PASSWORD = "fleetgw", "s3cret-pw"
RECEIVED = dt.datetime(2026, 11, 27, 12, 0, 0, 123000, tzinfo=dt.UTC)


@attrs.frozen
class Rec:
    seq: int
    sensor_id: str
    ts: int
    kind: str
    payload: str


def records(seqs, kind="imu") -> list[Rec]:
    now = time.time_ns()  # recent: older than a table's TTL would be dropped at a merge
    return [Rec(s, "imu-1", now + s * 10_000_000, kind, json.dumps({"ax": s / 10, "n": s}))
            for s in seqs]


def header(seq_lo=1, seq_hi=10, count=10, lane="P2", generation="g1", device="veh-1",
           digest="a" * 64) -> BatchHeader:
    return BatchHeader("gw-1", device, generation, lane, seq_lo, seq_hi, count, WIRE_FORMAT,
                       "zstd", digest, 1000)


def scalar(backend, sql: str) -> str:
    return backend.query(sql, "TSV").strip()


def counts(backend, table: str) -> tuple[int, int, int]:
    """(count() FINAL, uniqExact of the key, count() without FINAL)."""
    return (int(scalar(backend, f"SELECT count() FROM {table} FINAL")),
            int(scalar(backend, f"SELECT uniqExact(device_id, generation, seq) FROM {table}")),
            int(scalar(backend, f"SELECT count() FROM {table}")))


# ---- backends -----------------------------------------------------------------------------------
class _ClickHouseStandIn(BaseHTTPRequestHandler):
    """ClickHouse's HTTP interface as the backend uses it, executing in chdb."""

    inner: ChdbBackend

    def do_POST(self) -> None:
        params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        body = self.rfile.read(int(self.headers["Content-Length"]))
        auth = (self.headers.get("X-ClickHouse-User"), self.headers.get("X-ClickHouse-Key"))
        try:
            if auth != (USER, PASSWORD):
                raise BackendError("Code: 516. Authentication failed")
            if "query" in params:
                sql = params["query"]
                assert sql.endswith(f" FORMAT {INSERT_FORMAT}"), sql
                self.inner._insert(sql.removesuffix(f" FORMAT {INSERT_FORMAT}"), body)
                out = b""
            else:
                query_params = {k.removeprefix("param_"): v for k, v in params.items()
                                if k.startswith("param_")}
                out = self.inner._run(body.decode(), query_params,
                                      params["default_format"]).encode()
            status = 200
        except BackendError as exc:
            status, out = 500, str(exc).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=["chdb", "http"])
def backend(request, chdb_backend) -> Iterator[ClickHouseBackend]:
    if request.param == "chdb":
        yield chdb_backend
        return
    handler = type("Handler", (_ClickHouseStandIn,), {"inner": chdb_backend})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield HttpClickHouseBackend(f"http://{host}:{port}/", USER, PASSWORD)
    server.shutdown()
    server.server_close()
    thread.join()


# ---- DDL ----------------------------------------------------------------------------------------
def test_every_single_node_statement_executes_and_again_changes_nothing(chdb_backend):
    chdb_backend.ensure_schema()
    tables = set(scalar(chdb_backend, "SHOW TABLES").split())
    assert tables == {t.name for t in TABLES}
    engines = scalar(chdb_backend, "SELECT DISTINCT engine FROM system.tables "
                                   "WHERE database = currentDatabase()")
    assert engines == "ReplacingMergeTree"
    assert len(create_statements()) == len(TABLES)


def test_every_cluster_statement_parses(chdb_backend):
    statements = cluster_ddl("fleet")
    assert len(statements) == 2 * len(TABLES)
    for statement in statements:
        ast = chdb_backend.query(f"EXPLAIN AST {statement}", "TSV")
        assert "CreateQuery" in ast, statement
    local, distributed = statements[:2]
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/fleetgw/readings', " \
           "'{replica}')" in local
    assert "Distributed(fleet, currentDatabase(), readings_local, cityHash64(device_id))" \
           in distributed


def test_a_cluster_name_must_be_an_identifier():
    with pytest.raises(ValueError, match="identifier"):
        cluster_ddl("fleet; DROP TABLE readings")


@pytest.mark.parametrize(("kind", "table"), [
    ("imu", READINGS), ("gps", READINGS), ("inference-error", READINGS),
    ("inference", INFERENCES), ("safety-event", SAFETY_EVENTS), ("agg:imu_1s", AGGREGATES),
])
def test_each_kind_goes_to_exactly_one_table(kind, table):
    assert table_for_kind(kind) == table


def test_record_tables_share_the_inserted_columns_and_the_key():
    record_tables = [t for t in TABLES if t.name in RECORD_TABLES]
    assert {t.inserted for t in record_tables} == {record_tables[0].inserted}
    assert {t.order_by for t in record_tables} == {("device_id", "generation", "seq")}


def test_no_column_defaults_to_the_time_of_insert():
    """A DEFAULT now64() would make every retried insert differ (FIELD_NOTES)."""
    assert not [c for t in TABLES for c in t.columns if "now" in c.default.lower()]


# ---- the backend contract, on both backends -----------------------------------------------------
def test_a_stored_batch_lands_in_its_tables_and_moves_the_watermark(backend):
    batch = records([1, 3, 5]) + records([6], "inference") + records([8], "safety-event")
    routed = {READINGS: batch[:3], INFERENCES: batch[3:4], SAFETY_EVENTS: batch[4:]}
    assert backend.watermark("veh-1", "g1", "P2") == 0
    assert backend.insert_batch(header(1, 9, 5), "ab" * 64, routed, RECEIVED) == INSERTED
    assert counts(backend, READINGS) == (3, 3, 3)
    assert counts(backend, INFERENCES) == (1, 1, 1)
    assert counts(backend, SAFETY_EVENTS) == (1, 1, 1)
    assert counts(backend, AGGREGATES) == (0, 0, 0)
    assert scalar(backend, "SELECT count, rows, seq_lo, seq_hi, received_at FROM batches") == \
        "5\t5\t1\t9\t2026-11-27 12:00:00.123"
    assert backend.watermark("veh-1", "g1", "P2") == 9


def test_resent_batch_is_stored_once(backend):
    batch = {READINGS: records(range(1, 11))}
    assert backend.insert_batch(header(), "ab" * 64, batch, RECEIVED) == INSERTED
    later = RECEIVED + dt.timedelta(minutes=5)
    assert backend.insert_batch(header(), "ab" * 64, batch, later) == DUPLICATE
    assert counts(backend, READINGS) == (10, 10, 10)
    assert scalar(backend, f"SELECT count() FROM {BATCHES}") == "1"


def test_a_batch_that_failed_half_way_is_stored_once_when_retried(backend, monkeypatch):
    batch = {READINGS: records(range(1, 11)), INFERENCES: records([11, 12], "inference")}
    insert = backend._insert

    def fail_at_the_audit_row(sql: str, data: bytes) -> None:
        if sql.startswith(f"INSERT INTO {BATCHES} "):
            raise BackendError("connection reset")
        insert(sql, data)

    monkeypatch.setattr(backend, "_insert", fail_at_the_audit_row)
    with pytest.raises(BackendError):
        backend.insert_batch(header(1, 12, 12), "ab" * 64, batch, RECEIVED)
    monkeypatch.undo()
    later = RECEIVED + dt.timedelta(seconds=30)  # a retry gets a new receive time ...
    assert backend.insert_batch(header(1, 12, 12), "ab" * 64, batch, later) == INSERTED
    # ... yet the dedup token keeps the first copy, even before any merge.
    assert counts(backend, READINGS) == (10, 10, 10)
    assert counts(backend, INFERENCES) == (2, 2, 2)
    assert scalar(backend, f"SELECT count() FROM {BATCHES}") == "1"


def test_the_same_identity_with_another_body_is_a_conflict(backend):
    backend.insert_batch(header(), "ab" * 64, {READINGS: records(range(1, 11))}, RECEIVED)
    with pytest.raises(BatchConflict, match="veh-1:g1:P2:1-10"):
        backend.insert_batch(header(digest="b" * 64), "cd" * 64,
                             {READINGS: records(range(1, 11))}, RECEIVED)
    assert counts(backend, READINGS) == (10, 10, 10)


def test_the_watermark_is_per_device_generation_and_lane(backend):
    for lane, generation, lo, hi in (("P1", "g1", 1, 4), ("P2", "g1", 5, 9), ("P2", "g1", 10, 20),
                                     ("P2", "g2", 1, 3)):
        backend.insert_batch(header(lo, hi, 1, lane, generation), "ab" * 64,
                             {READINGS: records([hi])}, RECEIVED)
    assert backend.watermark("veh-1", "g1", "P1") == 4
    assert backend.watermark("veh-1", "g1", "P2") == 20
    assert backend.watermark("veh-1", "g2", "P2") == 3
    assert backend.watermark("veh-1", "g2", "P1") == 0
    assert backend.watermark("veh-2", "g1", "P2") == 0


def test_typed_columns_are_extracted_from_the_values(backend):
    now = time.time_ns()
    batch = {
        INFERENCES: [Rec(1, "model", now, "inference", json.dumps({
            "model_version": "2026.11.1", "model_sha256": "c" * 64, "score": 0.25,
            "confidence": 0.9, "label": "normal", "input_sha256": "d" * 64,
            "latency_us": 812}))],
        SAFETY_EVENTS: [Rec(2, "model", now, "safety-event",
                            json.dumps({"type": "harsh_brake", "source": "rule"}))],
        AGGREGATES: [Rec(3, "imu-1", now, "agg:imu_1s", json.dumps(
            {"window_start": now, "window_end": now + 10**9, "count": 100}))],
    }
    backend.insert_batch(header(1, 3, 3), "ab" * 64, batch, RECEIVED)
    assert scalar(backend, "SELECT model_version, score, confidence, label, latency_us, "
                           "model_sha256 = repeat('c', 64) FROM inferences") == \
        "2026.11.1\t0.25\t0.9\tnormal\t812\t1"
    assert scalar(backend, "SELECT type, source FROM safety_events") == "harsh_brake\trule"
    assert scalar(backend, "SELECT rule, records, toUnixTimestamp64Nano(window_end) - "
                           "toUnixTimestamp64Nano(window_start) FROM aggregates") == \
        f"imu_1s\t100\t{10**9}"


def test_a_failing_query_is_a_backend_error(backend):
    with pytest.raises(BackendError, match="no_such_table"):
        backend.query("SELECT * FROM no_such_table")


# ---- errors an operator meets -------------------------------------------------------------------
def test_a_chdb_path_held_by_another_process_is_reported_as_locked(tmp_path):
    path = tmp_path / "held.chdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from chdb import session; "
         f"s = session.Session({str(path)!r}); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(BackendLocked, match="in use by another process"):
            ChdbBackend(path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_an_unreachable_clickhouse_is_a_backend_error_without_the_password():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    backend = HttpClickHouseBackend(f"http://127.0.0.1:{port}/", USER, PASSWORD, timeout_s=5)
    with pytest.raises(BackendError, match=f"cannot reach ClickHouse at http://127.0.0.1:{port}/"
                       ) as caught:
        backend.watermark("veh-1", "g1", "P1")
    assert PASSWORD not in str(caught.value) and PASSWORD not in repr(backend)
