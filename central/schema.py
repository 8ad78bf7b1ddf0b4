"""The central ClickHouse schema as data: tables, their DDL (single node and cluster), routing
of records by kind, the two lookups the receiver makes, and the Native blocks that fill the
tables.

Where this sits on the data path: central, after the receiver has verified a batch. Every
record goes to exactly one table by its kind (`table_for_kind`): ``inference`` to
``inferences``, ``safety-event`` to ``safety_events``, ``agg:<rule>`` to ``aggregates``, all
others to ``readings``. The four record tables share the inserted columns (`RECORD_COLUMNS`)
and are keyed by ``(device_id, generation, seq)`` (I2: a new journal generation never
overwrites history); the typed columns of the other three are DEFAULT expressions over
``values``, computed by ClickHouse on insert, so every backend inserts the same columns.
``batches`` audits each stored batch; a batch's row is written last, so its presence means the
whole batch is stored (the receiver's duplicate check) and ``max(seq_hi)`` is the watermark.

Exactly-once effect (I5): every insert carries ``insert_deduplication_token`` =
``<batch dedup token>:<table>``, honoured because each table sets a deduplication window; and
ReplacingMergeTree collapses any copy that got past it (``FINAL`` shows one row per key).
There is no PARTITION BY: one batch is one part per table, atomic. Retention (TTL) is by
record time, so a record older than its table's TTL is dropped at the next merge even when it
arrives late.

Inserts are Native blocks (`record_block`, `batch_block`): columns, the fastest input format
in chdb (measured on 100k-row batches: ~2x RowBinary); LowCardinality columns go as String.

Direct mode (`actors.uplink.direct`: a gateway inserting into a ClickHouse server itself, no
receiver) creates its tables with `direct_ddl`: this schema on servers since `FULL_SCHEMA_SINCE`
(22.2, the first with ``insert_deduplication_token``), else `LEGACY_TABLES` — the same tables
in what ClickHouse 18.16 (Debian's package) accepts: String for LowCardinality(String),
``visitParamExtract*`` for ``JSONExtract*``, a DateTime64 as its exact integer ``<name>_ns``
(or ``_ms``, Int64, inserted) plus ``<name>`` DateTime (whole seconds, computed), no TTL, no
table comment, no deduplication window. Their blocks: ``record_block(..., legacy=True)``.
"""

from __future__ import annotations

import datetime as dt
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from actors.uplink.envelope import BatchHeader

#: Insert blocks remembered per table for deduplication (each batch inserts one per table).
DEDUP_WINDOW = 10_000
#: Replicated tables also forget a block's hash after this long (ClickHouse's default is an
#: hour): a gateway may retry a batch days later, after a long time offline.
DEDUP_WINDOW_SECONDS = 7 * 24 * 3600
#: Retention by record time, days: raw readings and inferences ~13 months (a year-on-year
#: comparison); safety events, aggregates and the batch audit five years.
READINGS_TTL_DAYS = 400
INFERENCES_TTL_DAYS = 400
SAFETY_EVENTS_TTL_DAYS = 1830
AGGREGATES_TTL_DAYS = 1830
BATCHES_TTL_DAYS = 1830
#: Where replicated tables keep their state in ClickHouse Keeper; {shard}/{replica} are macros.
KEEPER_PATH = "/clickhouse/tables/{{shard}}/fleetgw/{table}"
CLUSTER_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: A database name direct mode accepts (it is spliced into SQL unquoted).
DATABASE_NAME_RE = CLUSTER_NAME_RE
#: The first ClickHouse version that honours ``insert_deduplication_token`` in a MergeTree
#: table (22.2: ClickHouse PR #32304; ``non_replicated_deduplication_window``, 21.x, is older):
#: direct mode uses this schema from here on, `LEGACY_TABLES` before.
FULL_SCHEMA_SINCE = (22, 2)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

READINGS, INFERENCES, SAFETY_EVENTS, AGGREGATES, BATCHES = (
    "readings", "inferences", "safety_events", "aggregates", "batches")
INFERENCE_KIND, SAFETY_EVENT_KIND, AGGREGATE_PREFIX = "inference", "safety-event", "agg:"


@attrs.frozen
class Column:
    """One column. ``default``: a ClickHouse expression over inserted columns (the column is
    then never inserted); empty: the receiver inserts it."""

    name: str
    type: str
    comment: str
    default: str = ""


@attrs.frozen
class Table:
    """One ReplacingMergeTree table: rows with equal ``order_by`` collapse into one."""

    name: str
    comment: str
    columns: tuple[Column, ...]
    order_by: tuple[str, ...]
    ttl_column: str
    ttl_days: int

    @property
    def inserted(self) -> tuple[Column, ...]:
        """The columns an INSERT names, in order (DEFAULT columns are computed)."""
        return tuple(c for c in self.columns if not c.default)


def _json(name: str, ch_type: str, extract: str, comment: str) -> Column:
    return Column(name, ch_type, comment, f"{extract}(values, '{name}')")


RECORD_COLUMNS = (
    Column("device_id", "LowCardinality(String)", "the device; the batch header's, checked "
                                                  "against the body"),
    Column("generation", "String", "the device journal's generation (I2)"),
    Column("seq", "UInt64", "per device and generation, strictly increasing, gapless"),
    Column("sensor_id", "LowCardinality(String)", "the sensor (model: the model runner)"),
    Column("kind", "LowCardinality(String)", "what the record is; it chose the table"),
    Column("ts", "DateTime64(9, 'UTC')", "record time"),
    Column("lane", "LowCardinality(String)", "the uplink lane that carried it (P1, P2, P3)"),
    Column("values", "String", "the values as canonical JSON"),
    Column("gateway_id", "LowCardinality(String)", "the gateway that sent the batch"),
    Column("ingested_at", "DateTime64(3, 'UTC')", "when the receiver got the batch (set once "
                                                  "per batch, so a replay is identical)"),
    Column("batch_token", "String", "the batch's dedup token (device:generation:lane:lo-hi)"),
)
RECORD_KEY = ("device_id", "generation", "seq")


def _record_table(name: str, comment: str, extra: tuple[Column, ...], ttl_days: int) -> Table:
    return Table(name, comment, RECORD_COLUMNS + extra, RECORD_KEY, "ts", ttl_days)


TABLES = (
    _record_table(READINGS, "raw telemetry: every record whose kind has no table of its own",
                  (), READINGS_TTL_DAYS),
    _record_table(INFERENCES, "model runner inference records (kind inference)", (
        _json("model_version", "LowCardinality(String)", "JSONExtractString", "model version"),
        _json("model_sha256", "String", "JSONExtractString", "sha256 of the model files"),
        _json("score", "Float64", "JSONExtractFloat", "anomaly score"),
        _json("confidence", "Float64", "JSONExtractFloat", "confidence in 0..1"),
        _json("label", "LowCardinality(String)", "JSONExtractString", "normal or anomaly type"),
        _json("input_sha256", "String", "JSONExtractString", "sha256 of the model input"),
        _json("latency_us", "UInt64", "JSONExtractUInt", "inference wall time, microseconds"),
    ), INFERENCES_TTL_DAYS),
    _record_table(SAFETY_EVENTS, "safety events from rules and the model (kind safety-event)", (
        _json("type", "LowCardinality(String)", "JSONExtractString", "rule or anomaly type"),
        _json("source", "LowCardinality(String)", "JSONExtractString", "rule or model"),
    ), SAFETY_EVENTS_TTL_DAYS),
    _record_table(AGGREGATES, "router aggregates of P3 metrics (kind agg:<rule>)", (
        Column("rule", "LowCardinality(String)", "the policy rule",
               f"substring(kind, {len(AGGREGATE_PREFIX) + 1})"),
        Column("window_start", "DateTime64(9, 'UTC')", "window start (inclusive)",
               "fromUnixTimestamp64Nano(JSONExtractInt(values, 'window_start'), 'UTC')"),
        Column("window_end", "DateTime64(9, 'UTC')", "window end (exclusive)",
               "fromUnixTimestamp64Nano(JSONExtractInt(values, 'window_end'), 'UTC')"),
        Column("records", "UInt64", "raw records in the window",
               "JSONExtractUInt(values, 'count')"),
    ), AGGREGATES_TTL_DAYS),
    Table(BATCHES, "one row per stored batch; written after its records", (
        Column("device_id", "LowCardinality(String)", "the device"),
        Column("generation", "String", "the device journal's generation"),
        Column("lane", "LowCardinality(String)", "the uplink lane"),
        Column("seq_lo", "UInt64", "first seq of the range the batch covers"),
        Column("seq_hi", "UInt64", "last seq of the range: what the reply acknowledges"),
        Column("count", "UInt32", "records the signed header announced"),
        Column("body_sha256", "String", "sha256 of the body as sent (compressed)"),
        Column("signature", "String", "hex Ed25519 signature of the header, by the device"),
        Column("gateway_id", "LowCardinality(String)", "the gateway that sent it"),
        Column("received_at", "DateTime64(3, 'UTC')", "when the receiver got it"),
        Column("rows", "UInt32", "records stored from it, over all tables"),
        Column("dedup_token", "String", "device:generation:lane:lo-hi"),
    ), ("device_id", "generation", "lane", "seq_lo"), "received_at", BATCHES_TTL_DAYS),
)
TABLE_BY_NAME = {t.name: t for t in TABLES}
RECORD_TABLES = (READINGS, INFERENCES, SAFETY_EVENTS, AGGREGATES)

#: The highest seq_hi stored for a device's lane in one generation; 0 when none.
WATERMARK_SQL = ("SELECT max(seq_hi) FROM batches WHERE device_id = {device_id:String} "
                 "AND generation = {generation:String} AND lane = {lane:String}")
#: The body digest of a stored batch with this dedup token (no row: not stored).
STORED_DIGEST_SQL = ("SELECT body_sha256 FROM batches WHERE device_id = {device_id:String} "
                     "AND dedup_token = {dedup_token:String} LIMIT 1")


class Record(Protocol):
    """One decoded record (`actors.uplink.wire.WireRecord` is one)."""

    seq: int
    sensor_id: str
    ts: int
    kind: str
    payload: str


def table_for_kind(kind: str) -> str:
    """The one table a record of ``kind`` goes to."""
    if kind == INFERENCE_KIND:
        return INFERENCES
    if kind == SAFETY_EVENT_KIND:
        return SAFETY_EVENTS
    if kind.startswith(AGGREGATE_PREFIX):
        return AGGREGATES
    return READINGS


def sql_string(text: str) -> str:
    """``text`` as a ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _columns_sql(table: Table) -> str:
    lines = []
    for c in table.columns:
        default = f" DEFAULT {c.default}" if c.default else ""
        lines.append(f"    `{c.name}` {c.type}{default} COMMENT {sql_string(c.comment)}")
    return "(\n" + ",\n".join(lines) + "\n)"


def _table_sql(table: Table, name: str, on_cluster: str, engine: str, settings: str) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {name}{on_cluster}\n{_columns_sql(table)}\n"
            f"ENGINE = {engine}\nORDER BY ({', '.join(table.order_by)})\n"
            f"TTL {table.ttl_column} + INTERVAL {table.ttl_days} DAY\n"
            f"SETTINGS {settings}\nCOMMENT {sql_string(table.comment)}")


def create_statements(database: str = "") -> tuple[str, ...]:
    """Single node (chdb or one server): one ReplacingMergeTree per table (in ``database``;
    empty: the connection's current one)."""
    prefix = f"{database}." if database else ""
    return tuple(_table_sql(t, f"{prefix}{t.name}", "", "ReplacingMergeTree",
                            f"non_replicated_deduplication_window = {DEDUP_WINDOW}")
                 for t in TABLES)


# ---- direct mode on servers before FULL_SCHEMA_SINCE (measured on 18.16.1) --------------------
_DATETIME64_RE = re.compile(r"^DateTime64\(([369]), 'UTC'\)$")
_FROM_NANOS_RE = re.compile(r"^fromUnixTimestamp64Nano\((.+), 'UTC'\)$")
_JSON_EXTRACT_RE = re.compile(r"\bJSONExtract(String|Float|UInt|Int)\(")
_UNITS = {9: "ns", 6: "us", 3: "ms"}


def _legacy_columns(column: Column) -> tuple[Column, ...]:
    """``column`` as 18.16 takes it; a DateTime64 becomes two columns (see the docstring)."""
    default = _JSON_EXTRACT_RE.sub(r"visitParamExtract\1(", column.default)
    match = _DATETIME64_RE.match(column.type)
    if match is None:
        ch_type = "String" if column.type == "LowCardinality(String)" else column.type
        return (Column(column.name, ch_type, column.comment, default),)
    digits = int(match.group(1))
    exact = f"{column.name}_{_UNITS[digits]}"
    if default:
        nanos = _FROM_NANOS_RE.match(default)
        if nanos is None or digits != 9:
            raise ValueError(f"{column.name}: no legacy form for DEFAULT {column.default}")
        default = nanos.group(1)
    return (Column(exact, "Int64", f"{column.comment} ({_UNITS[digits]} since the epoch, "
                                   "exact)", default),
            Column(column.name, "DateTime('UTC')", f"{column.comment} (whole seconds; exact: "
                                                   f"{exact})",
                   f"toDateTime(intDiv({exact}, {10 ** digits}), 'UTC')"))


def legacy_table(table: Table) -> Table:
    """``table`` for servers before FULL_SCHEMA_SINCE: the same names where the types allow,
    its inserted columns in the same order (a DateTime64 ``x`` is inserted as ``x_ns``), no
    TTL (``ttl_days`` 0: 18.16 has none; delete old rows with ALTER TABLE ... DELETE)."""
    columns = tuple(c for column in table.columns for c in _legacy_columns(column))
    legacy = Table(table.name, table.comment, columns, table.order_by, "", 0)
    assert len(legacy.inserted) == len(table.inserted), table.name
    return legacy


LEGACY_TABLES = tuple(legacy_table(t) for t in TABLES)
LEGACY_TABLE_BY_NAME = {t.name: t for t in LEGACY_TABLES}


def full_schema(server_version: Sequence[int]) -> bool:
    """Whether a server of ``server_version`` (e.g. (18, 16, 1)) takes `TABLES` as they are."""
    return tuple(server_version[:2]) >= FULL_SCHEMA_SINCE


def direct_ddl(database: str, server_version: Sequence[int], *,
               legacy: bool = False) -> tuple[str, ...]:
    """Direct mode's ``CREATE ... IF NOT EXISTS`` statements: ``database``, then `TABLES`
    (`full_schema` servers) or `LEGACY_TABLES` in it (also when ``legacy``: the database has
    tables an older server created). Raises ValueError for a database name that is not an
    identifier."""
    if not DATABASE_NAME_RE.match(database):
        raise ValueError(f"database name must be an identifier [A-Za-z_][A-Za-z0-9_]* "
                         f"(got {database!r})")
    if full_schema(server_version) and not legacy:
        tables = create_statements(database)
    else:
        tables = tuple(f"CREATE TABLE IF NOT EXISTS {database}.{t.name}\n{_columns_sql(t)}\n"
                       f"ENGINE = ReplacingMergeTree\nORDER BY ({', '.join(t.order_by)})"
                       for t in LEGACY_TABLES)
    return (f"CREATE DATABASE IF NOT EXISTS {database}", *tables)


def cluster_ddl(cluster_name: str) -> tuple[str, ...]:
    """A sharded, replicated cluster: per table a ``<table>_local`` ReplicatedReplacingMergeTree
    on every node and a Distributed ``<table>`` over them, sharded by
    ``cityHash64(device_id)`` — deterministic, so a retried INSERT through the Distributed
    table lands on the same shard and is deduplicated there. Insert with
    ``distributed_foreground_insert = 1`` (the backends do). Raises ValueError for a
    cluster name that is not an identifier."""
    if not CLUSTER_NAME_RE.match(cluster_name):
        raise ValueError(f"cluster name must be an identifier [A-Za-z_][A-Za-z0-9_]* "
                         f"(got {cluster_name!r})")
    statements = []
    for t in TABLES:
        local, on = f"{t.name}_local", f" ON CLUSTER {cluster_name}"
        engine = (f"ReplicatedReplacingMergeTree({sql_string(KEEPER_PATH.format(table=t.name))},"
                  f" '{{replica}}')")
        statements.append(_table_sql(t, local, on, engine,
                                     f"replicated_deduplication_window = {DEDUP_WINDOW}, "
                                     "replicated_deduplication_window_seconds = "
                                     f"{DEDUP_WINDOW_SECONDS}"))
        statements.append(f"CREATE TABLE IF NOT EXISTS {t.name}{on} AS {local}\n"
                          f"ENGINE = Distributed({cluster_name}, currentDatabase(), {local}, "
                          f"cityHash64(device_id))")
    return tuple(statements)


# ---- inserts: Native blocks ----------------------------------------------------------------------
def _varuint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_LENGTHS = [_varuint(n) for n in range(1 << 14)]  # the 1- and 2-byte length prefixes


def _strings(values: Iterable[str]) -> bytes:
    """A String column; each distinct value is encoded once (most columns repeat a few)."""
    encoded: dict[str, bytes] = {}
    out = []
    for v in values:
        e = encoded.get(v)
        if e is None:
            b = v.encode()
            e = encoded[v] = (_LENGTHS[len(b)] if len(b) < len(_LENGTHS)
                              else _varuint(len(b))) + b
        out.append(e)
    return b"".join(out)


_PACKERS = {"UInt64": "Q", "UInt32": "I", "Int64": "q", "DateTime64(9, 'UTC')": "q",
            "DateTime64(3, 'UTC')": "q"}


def _column(ch_type: str, values: Sequence[Any]) -> tuple[str, bytes]:
    """(Native type name, column data); LowCardinality(String) goes as String."""
    if ch_type in ("String", "LowCardinality(String)"):
        return "String", _strings(values)
    return ch_type, struct.pack(f"<{len(values)}{_PACKERS[ch_type]}", *values)


def native_block(table: str, columns: Mapping[str, Sequence[str | int]], rows: int, *,
                 legacy: bool = False) -> bytes:
    """One Native block of ``rows`` rows with the table's inserted columns, in order
    (``columns`` by `TABLES` names; ``legacy``: as the `LEGACY_TABLES` columns they fill)."""
    inserted = TABLE_BY_NAME[table].inserted
    target = LEGACY_TABLE_BY_NAME[table].inserted if legacy else inserted
    parts = [_varuint(len(target)), _varuint(rows)]
    for col, out in zip(inserted, target, strict=True):
        values = columns[col.name]
        assert len(values) == rows, f"{table}.{col.name}: {len(values)} values for {rows} rows"
        ch_type, data = _column(out.type, values)
        parts += [_strings((out.name, ch_type)), data]
    return b"".join(parts)


def _millis(moment: dt.datetime) -> int:
    return (moment - _EPOCH) // dt.timedelta(milliseconds=1)


def record_block(table: str, header: BatchHeader, records: Sequence[Record],
                 received_at: dt.datetime, *, legacy: bool = False) -> bytes:
    """The rows of ``records`` for a record table; the batch's identity in every row."""
    n = len(records)
    return native_block(table, {
        "device_id": [header.device_id] * n, "generation": [header.generation] * n,
        "seq": [r.seq for r in records], "sensor_id": [r.sensor_id for r in records],
        "kind": [r.kind for r in records], "ts": [r.ts for r in records],
        "lane": [header.lane] * n, "values": [r.payload for r in records],
        "gateway_id": [header.gateway_id] * n, "ingested_at": [_millis(received_at)] * n,
        "batch_token": [header.dedup_token] * n,
    }, n, legacy=legacy)


def batch_block(header: BatchHeader, signature_hex: str, rows: int,
                received_at: dt.datetime, *, legacy: bool = False) -> bytes:
    """The batch's one row in `batches`."""
    h = header
    return native_block(BATCHES, {
        "device_id": [h.device_id], "generation": [h.generation], "lane": [h.lane],
        "seq_lo": [h.seq_lo], "seq_hi": [h.seq_hi], "count": [h.count],
        "body_sha256": [h.body_sha256], "signature": [signature_hex],
        "gateway_id": [h.gateway_id], "received_at": [_millis(received_at)], "rows": [rows],
        "dedup_token": [h.dedup_token],
    }, 1, legacy=legacy)


def insert_sql(table: str, token: str, settings: Mapping[str, str]) -> str:
    """``INSERT INTO table (columns) SETTINGS ...`` without FORMAT or data."""
    names = ", ".join(f"`{c.name}`" for c in TABLE_BY_NAME[table].inserted)
    pairs = [f"{k} = {v}" for k, v in settings.items()]
    pairs.append(f"insert_deduplication_token = {sql_string(token)}")
    return f"INSERT INTO {table} ({names}) SETTINGS {', '.join(pairs)}"
