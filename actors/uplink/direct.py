"""Direct mode: the uplink's batches straight into a ClickHouse server, without a receiver.

Where this sits on the data path: step 6, in place of `actors.uplink.client.UplinkClient` for
users who run no fleetgw receiver. `DirectSink` is a `BatchSink`: for each `SignedBatch` (the
gateway's own, so no signature check) it decompresses the body (`envelope.decompress`),
decodes it (`wire.decode`), routes the records to their tables as the receiver does
(`central.receiver.route`) and POSTs, over one keep-alive pycurl handle, one gzip-compressed
``INSERT INTO <db>.<table> (columns) FORMAT Native`` per table, then the batch's audit row in
``batches`` — last, as the receiver writes it. All inserts answered 200 is the receiver's
``{"status": "ok", ..., "acked_seq_hi"}``, which `actors.uplink.uplink.Uplink` acknowledges.

The server is asked once (`ServerProfile`): ``SELECT version()`` and, for direct mode's
database, whether its tables have the legacy layout. Schema and dedup follow from that:

- ClickHouse >= 22.2 (`central.schema.FULL_SCHEMA_SINCE`): the receiver's tables
  (`central.schema.create_statements`, ``non_replicated_deduplication_window``), each insert
  carrying ``insert_deduplication_token = <batch dedup token>:<table>``: a replay, a retry after
  an unknown outcome, or a batch eviction shrank under the same identity is not inserted again.
- Older servers (Debian's 18.16), or tables created by one: `central.schema.LEGACY_TABLES`,
  and no token (18.16 rejects the setting). Exactly-once then rests on ReplacingMergeTree and
  the row key (device_id, generation, seq) — batches on (device_id, generation, lane, seq_lo):
  a replayed batch inserts the same rows again (only ``ingested_at`` differs), the raw
  ``count()`` shows both copies until a background merge (or ``OPTIMIZE TABLE ... FINAL``)
  keeps one, and queries that must not double count read ``FROM <table> FINAL`` (or
  ``uniqExact``/``argMax`` by key) — I5 holds for them, not for a bare ``count()``.

Answers map onto what `actors.uplink.link.classify` expects: no HTTP answer (refused, reset,
timeout, TLS) is status None; a ClickHouse 5xx keeps its status (both: retry the link); a 4xx
(unknown table or database 404, bad query 400, wrong password 401) keeps its status with
ClickHouse's message, first line, as ``error`` and the body's ``reason`` (a refusal: later).
A retry re-inserts every table (the ones stored already collapse or are deduplicated). The
password goes in a header only: never in a result, a log line or the repr.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import pycurl

from actors.uplink import envelope
from actors.uplink.client import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_TOTAL_TIMEOUT_S,
    NO_EXPECT,
    VERIFY_HOST_NAME,
    PostResult,
)
from actors.uplink.envelope import BatchRejected, SignedBatch
from actors.uplink.wire import WireError, decode
from central.backend import INSERT_SETTINGS, VERSIONED_SETTINGS
from central.receiver import logfmt, route
from central.schema import (
    BATCHES,
    DATABASE_NAME_RE,
    LEGACY_TABLE_BY_NAME,
    READINGS,
    TABLE_BY_NAME,
    batch_block,
    direct_ddl,
    full_schema,
    record_block,
    sql_string,
)

INSERT_FORMAT = "Native"
#: ClickHouse's message is cut to this many characters in results and log lines.
MAX_REASON_CHARS = 300
#: A column only the legacy layout has: tables created on an old server keep that layout.
LEGACY_MARKER_COLUMN = "ts_ns"
HTTP_OK, HTTP_BAD_REQUEST = 200, 400
LOG = logging.getLogger("fleetgw.uplink.direct")


class DirectError(RuntimeError):
    """ClickHouse did not do what was asked: ``status`` (None: no HTTP answer) and
    ``reason`` (one line; never the password)."""

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(f"{status or 'no answer'}: {reason}")
        self.status = status
        self.reason = reason


def parse_version(text: str) -> tuple[int, ...]:
    """``"18.16.1"`` (``SELECT version()``) as (18, 16, 1); ValueError when not numbers."""
    parts = tuple(int(p) for p in text.strip().split(".") if p.isdigit())
    if len(parts) < 2:
        raise ValueError(f"server version {text.strip()[:40]!r} is not like 18.16.1")
    return parts


#: Wrapping in ClickHouse's error text that says nothing (18.x: ``Code: 60, e.displayText() =
#: DB::Exception: Table x doesn't exist., e.what() = DB::Exception``).
_ERROR_NOISE = ("e.displayText() = ", ", e.what() = DB::Exception", "DB::Exception: ")


def first_line(text: str) -> str:
    """ClickHouse's error message as one trimmed line (``Code: 60, Table x doesn't exist.``)."""
    line = text.strip().splitlines()[0].strip() if text.strip() else "(no message)"
    for noise in _ERROR_NOISE:
        line = line.replace(noise, "")
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS - 1] + "…"


def legacy_layout(version: Sequence[int], readings_columns: Sequence[str]) -> bool:
    """Whether direct mode uses `central.schema.LEGACY_TABLES` on a server of ``version``
    whose ``readings`` table (in direct mode's database) has ``readings_columns`` (empty: no
    such table yet): before FULL_SCHEMA_SINCE, or tables an older server created."""
    return not full_schema(version) or LEGACY_MARKER_COLUMN in readings_columns


@attrs.frozen
class ServerProfile:
    """What the server takes, asked once: its ``version``; ``legacy``: the tables have (or
    will get) `central.schema.LEGACY_TABLES`'s layout, inserted without a dedup token;
    ``settings``: the insert settings (SQL literals) stated with every insert otherwise."""

    version: tuple[int, ...]
    legacy: bool
    settings: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def dedup_token(self) -> bool:
        """Whether inserts carry ``insert_deduplication_token`` (see the module docstring)."""
        return not self.legacy

    @property
    def dedup(self) -> str:
        return "insert_deduplication_token" if self.dedup_token else "ReplacingMergeTree"


@attrs.frozen
class Insert:
    """One INSERT of a batch: ``sql`` without FORMAT, ``data`` a Native block of ``rows``."""

    table: str
    sql: str
    data: bytes
    rows: int


def batch_inserts(batch: SignedBatch, profile: ServerProfile, database: str,
                  received_at: dt.datetime) -> list[Insert]:
    """The inserts that store ``batch`` on a server of ``profile``: one per record table it
    has rows for, then its ``batches`` row. Raises BatchRejected (400/413) when the body does
    not open or decode (a defect: the gateway built it)."""
    header = batch.header
    raw = envelope.decompress(header, batch.body)
    try:
        device_id, records = decode(raw)
    except WireError as exc:
        raise BatchRejected(400, f"body is not a valid {header.encoding} encoding: "
                                 f"{exc}") from None
    if device_id != header.device_id or len(records) != header.count:
        raise BatchRejected(400, f"body holds {len(records)} records of {device_id!r}, the "
                                 f"header says {header.count} of {header.device_id!r}")
    inserts = []
    for table, rows in route(records).items():
        inserts.append(Insert(table, _insert_sql(table, database, header.dedup_token, profile),
                              record_block(table, header, rows, received_at,
                                           legacy=profile.legacy), len(rows)))
    inserts.append(Insert(BATCHES, _insert_sql(BATCHES, database, header.dedup_token, profile),
                          batch_block(header, batch.signature_hex, len(records), received_at,
                                      legacy=profile.legacy), 1))
    return inserts


def _insert_sql(table: str, database: str, token: str, profile: ServerProfile) -> str:
    """``INSERT INTO db.table (columns) [SETTINGS ...]``, the token ``<batch token>:<table>``
    as the receiver's backend sends it."""
    columns = (LEGACY_TABLE_BY_NAME if profile.legacy else TABLE_BY_NAME)[table].inserted
    sql = f"INSERT INTO {database}.{table} ({', '.join(f'`{c.name}`' for c in columns)})"
    settings = dict(profile.settings)
    if profile.dedup_token:
        settings["insert_deduplication_token"] = sql_string(f"{token}:{table}")
    if settings:
        sql += " SETTINGS " + ", ".join(f"{k} = {v}" for k, v in settings.items())
    return sql


def known_settings_sql() -> str:
    """Which of the insert settings the receiver's backend states this server knows."""
    names = [*INSERT_SETTINGS, *(n for row in VERSIONED_SETTINGS for n in row[::2] if n)]
    return ("SELECT name FROM system.settings WHERE name IN ("
            + ", ".join(sql_string(n) for n in names) + ")")


def insert_settings(known: set[str]) -> dict[str, str]:
    """The backend's INSERT_SETTINGS and VERSIONED_SETTINGS, those the server knows."""
    settings = {k: v for k, v in INSERT_SETTINGS.items() if k in known}
    for name, value, older in VERSIONED_SETTINGS:
        if name in known or older in known:
            settings[name if name in known else older] = value
    return settings


class DirectSink:
    """`BatchSink` into a ClickHouse server's HTTP interface (``url``, e.g.
    ``http://clickhouse:8123`` or ``https://...:8443``), tables in ``database``.

    ``user``/``password``: ClickHouse credentials (empty password: none sent); ``tls_ca``: a
    CA bundle to verify an https server with (None: the system's); ``connect_timeout_s`` and
    ``total_timeout_s`` bound each request. Raises ValueError for a database name that is not
    an identifier. Call `ensure_schema` once before the first batch (idempotent).
    """

    def __init__(self, url: str, database: str, user: str = "default", password: str = "",
                 tls_ca: str | None = None,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 total_timeout_s: float = DEFAULT_TOTAL_TIMEOUT_S) -> None:
        if not DATABASE_NAME_RE.match(database):
            raise ValueError(f"uplink.database must be an identifier [A-Za-z_][A-Za-z0-9_]* "
                             f"(got {database!r})")
        self.url = url.rstrip("/") + "/"
        self.database = database
        self.user = user
        self.tls_ca = tls_ca
        self._auth = [f"X-ClickHouse-User: {user}"] + (
            [f"X-ClickHouse-Key: {password}"] if password else [])
        self._connect_timeout_ms = int(connect_timeout_s * 1000)
        self._total_timeout_ms = int(total_timeout_s * 1000)
        self._curl: pycurl.Curl | None = None
        self._profile: ServerProfile | None = None
        self._sent = 0
        self._last_error = ""

    def __repr__(self) -> str:  # never the password
        return (f"DirectSink({self.url!r}, database={self.database!r}, user={self.user!r}, "
                f"tls_ca={self.tls_ca!r})")

    # ---- the BatchSink contract ------------------------------------------------------------
    def post(self, batch: SignedBatch) -> PostResult:
        """Insert ``batch`` into every table it has rows for, then its audit row; never
        raises for the network or ClickHouse (see the module docstring for the statuses)."""
        started = time.perf_counter()
        self._sent = 0
        header = batch.header
        where = {"device_id": header.device_id, "lane": header.lane}
        table = ""
        try:
            profile = self.profile()
            inserts = batch_inserts(batch, profile, self.database, dt.datetime.now(dt.UTC))
            for insert in inserts:
                table = insert.table
                self._request(f"{insert.sql} FORMAT {INSERT_FORMAT}", insert.data,
                              compress=True)
        except BatchRejected as exc:
            return self._result(exc.status, exc.reason, where, started)
        except DirectError as exc:
            if table:
                where["table"] = table
            return self._result(exc.status, exc.reason, where, started)
        self._last_error = ""
        body = {"status": "ok", **where, "acked_seq_hi": header.seq_hi,
                "rows": {i.table: i.rows for i in inserts if i.table != BATCHES},
                "dedup": profile.dedup}
        return PostResult(HTTP_OK, body, None, self._sent, time.perf_counter() - started)

    def close(self) -> None:
        """Drop the connection and what was learned of the server (asked again next time)."""
        if self._curl is not None:
            self._curl.close()
            self._curl = None
        self._profile = None

    # ---- schema and server -----------------------------------------------------------------
    def ensure_schema(self) -> ServerProfile:
        """Create the database and the tables the server takes (`central.schema.direct_ddl`)
        where missing; the server's profile. Raises DirectError (status None: unreachable)."""
        profile = self.profile()
        for statement in direct_ddl(self.database, profile.version, legacy=profile.legacy):
            self._request(statement, b"")
        return profile

    def profile(self) -> ServerProfile:
        """What the server takes (asked at the first call; again after `close`). Raises
        DirectError."""
        if self._profile is None:
            text = self._request("SELECT version()", b"")
            try:
                version = parse_version(text)
            except ValueError as exc:
                raise DirectError(HTTP_BAD_REQUEST, f"{self.url} is not ClickHouse? "
                                                    f"{exc}") from None
            columns = self._request(
                "SELECT name FROM system.columns WHERE database = "
                f"{sql_string(self.database)} AND table = {sql_string(READINGS)}", b"").split()
            legacy = legacy_layout(version, columns)
            settings = {} if legacy else insert_settings(
                set(self._request(known_settings_sql(), b"").split()))
            self._profile = ServerProfile(version, legacy, settings)
            LOG.info("%s", logfmt({"event": "direct-mode-server", "url": self.url,
                                   "database": self.database,
                                   "version": ".".join(map(str, version)),
                                   "layout": "legacy" if legacy else "full",
                                   "dedup": self._profile.dedup}))
        return self._profile

    # ---- HTTP ------------------------------------------------------------------------------
    def _handle(self) -> pycurl.Curl:
        """The reused handle (keep-alive), with the options every request shares."""
        if self._curl is None:
            curl = pycurl.Curl()
            curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
            curl.setopt(pycurl.NOSIGNAL, 1)
            curl.setopt(pycurl.TCP_KEEPALIVE, 1)
            curl.setopt(pycurl.CONNECTTIMEOUT_MS, self._connect_timeout_ms)
            curl.setopt(pycurl.TIMEOUT_MS, self._total_timeout_ms)
            if self.tls_ca:
                curl.setopt(pycurl.CAINFO, self.tls_ca)
                curl.setopt(pycurl.SSL_VERIFYPEER, 1)
                curl.setopt(pycurl.SSL_VERIFYHOST, VERIFY_HOST_NAME)
            self._curl = curl
        return self._curl

    def _request(self, sql: str, data: bytes, compress: bool = False) -> str:
        """POST ``sql`` (in the body when there is no ``data``, else in the URL with ``data``
        as the body, gzip-compressed when ``compress``); the reply's text. Raises
        DirectError: status None without an HTTP answer, else ClickHouse's status and first
        line. Bytes sent add up in ``_sent``."""
        curl = self._handle()
        headers = [*self._auth, NO_EXPECT, "Content-Type: application/octet-stream"]
        params: dict[str, str] = {}
        if data:
            params = {"query": sql, "wait_end_of_query": "1"}
            body = envelope.compress(data, "gzip") if compress else data
            if compress:
                headers.append("Content-Encoding: gzip")
        else:
            body = sql.encode()
        curl.setopt(pycurl.URL, self.url + ("?" + urllib.parse.urlencode(params)
                                            if params else ""))
        curl.setopt(pycurl.HTTPHEADER, headers)
        curl.setopt(pycurl.POSTFIELDSIZE, len(body))
        curl.setopt(pycurl.POSTFIELDS, body)
        out = io.BytesIO()
        curl.setopt(pycurl.WRITEDATA, out)
        try:
            curl.perform()
        except pycurl.error as exc:
            code, message = exc.args[0], exc.args[1] if len(exc.args) > 1 else ""
            raise DirectError(None, f"curl error {code}: {message}") from None
        finally:
            self._sent += int(curl.getinfo(pycurl.SIZE_UPLOAD_T))
        status = int(curl.getinfo(pycurl.RESPONSE_CODE))
        text = out.getvalue().decode(errors="replace")
        if status != HTTP_OK:
            raise DirectError(status, first_line(text))
        return text

    def _result(self, status: int | None, reason: str, where: dict[str, Any],
                started: float) -> PostResult:
        """A failed post: ``error`` says what and where; the body, when ClickHouse
        answered, is the receiver's refusal shape."""
        place = f" ({where['table']})" if "table" in where else ""
        error = f"ClickHouse at {self.url}{place}: {reason}"
        body = None if status is None else {"status": "refused", "reason": reason, **where}
        if reason != self._last_error:  # once per problem, not once per retry
            LOG.warning("%s", logfmt({"event": "direct-insert-failed", "url": self.url,
                                      "status": status, **where, "error": reason}))
        self._last_error = reason
        return PostResult(status, body, error, self._sent, time.perf_counter() - started)

