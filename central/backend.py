"""Where verified batches are stored: a narrow contract and its two ClickHouse backends.

Where this sits on the data path: central, the receiver's last step. `Backend` is all the
receiver knows of storage (five methods); `ChdbBackend` is embedded ClickHouse in this process
(the default: one process per data path), `HttpClickHouseBackend` a ClickHouse server or
cluster over its HTTP interface. Both run the same SQL and insert the same Native blocks
(`central.schema`).

A batch is stored as one insert per record table, then its `batches` row; each insert carries
the dedup token ``<batch token>:<table>``, so re-running a batch that failed half way, or one
that two receivers got at once, leaves one copy (I5).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from actors.uplink.envelope import BatchHeader
from central.schema import (
    BATCHES,
    STORED_DIGEST_SQL,
    WATERMARK_SQL,
    Record,
    batch_block,
    create_statements,
    insert_sql,
    record_block,
    sql_string,
)

INSERTED, DUPLICATE = "ok", "duplicate"
#: The lane whose batches the embedded backend stores first when statements queue.
URGENT_LANE = "P1"
#: Output format of `Backend.query` unless the SQL names its own.
DEFAULT_QUERY_FORMAT = "PrettyCompactMonoBlock"
INSERT_FORMAT = "Native"
#: Settings every insert relies on, stated rather than left to a version's defaults:
#: synchronous (the reply means stored), deduplicated by token, LowCardinality columns
#: filled from plain String columns.
INSERT_SETTINGS = {"async_insert": "0", "insert_deduplicate": "1",
                   "input_format_native_allow_types_conversion": "1"}
#: Settings whose name depends on the server's version: (name, value, older name). Since 26.x
#: ``deduplicate_insert`` supersedes ``insert_deduplicate`` (which it then ignores); through
#: a Distributed table, inserting in the foreground makes the reply mean stored on the shards
#: and lets the dedup token travel with the rows.
VERSIONED_SETTINGS = (("deduplicate_insert", "'enable'", ""),
                      ("distributed_foreground_insert", "1", "insert_distributed_sync"))
KNOWN_SETTINGS_SQL = ("SELECT name FROM system.settings WHERE name IN ("
                      + ", ".join(sql_string(n) for row in VERSIONED_SETTINGS for n in row[::2]
                                  if n) + ")")


class BackendError(RuntimeError):
    """Storage failed or is unreachable; the batch may be retried (nothing acknowledged)."""


class BackendLocked(BackendError):
    """The chdb data path is held by another process."""


class BatchConflict(BackendError):
    """A batch with this identity is stored with a different body: never retry it."""


class Backend(Protocol):
    """A place that stores verified batches. Every method raises BackendError when storage
    fails or cannot be reached."""

    def ensure_schema(self) -> None:
        """Create the tables that do not exist yet (`central.schema`); idempotent."""

    def insert_batch(self, header: BatchHeader, signature_hex: str,
                     rows_by_table: Mapping[str, Sequence[Record]],
                     received_at: dt.datetime) -> str:
        """Store a verified batch, its records already routed to tables; return INSERTED, or
        DUPLICATE when a batch with ``header.dedup_token`` is stored already (nothing is
        written). Raises BatchConflict when that stored batch has another body sha256."""

    def watermark(self, device_id: str, generation: str, lane: str) -> int:
        """The highest ``seq_hi`` stored for the device's lane in that generation; 0: none."""

    def query(self, sql: str, fmt: str = DEFAULT_QUERY_FORMAT) -> str:
        """Run ``sql`` and return its output as text (``fmt`` unless the SQL says FORMAT)."""

    def close(self) -> None:
        """Release the storage (the chdb path lock); idempotent."""


# ---- the contract over two primitives -----------------------------------------------------------
class ClickHouseBackend:
    """`Backend` over two primitives a subclass provides: `_run` (a query with parameters)
    and `_insert` (an INSERT statement and its Native data)."""

    _insert_settings: dict[str, str] | None = None

    def _settings(self) -> Mapping[str, str]:
        """INSERT_SETTINGS and the VERSIONED_SETTINGS this server knows (asked once)."""
        if self._insert_settings is None:
            known = set(self._run(KNOWN_SETTINGS_SQL, {}, "TSV").split())
            settings = dict(INSERT_SETTINGS)
            for name, value, older in VERSIONED_SETTINGS:
                if name in known or older in known:
                    settings[name if name in known else older] = value
            self._insert_settings = settings
        return self._insert_settings

    def _run(self, sql: str, params: Mapping[str, str | int], fmt: str) -> str:
        raise NotImplementedError

    def _insert(self, sql: str, data: bytes) -> None:
        raise NotImplementedError

    def ensure_schema(self) -> None:
        for statement in create_statements():
            self._run(statement, {}, "TSV")

    def insert_batch(self, header: BatchHeader, signature_hex: str,
                     rows_by_table: Mapping[str, Sequence[Record]],
                     received_at: dt.datetime) -> str:
        token = header.dedup_token
        stored = self._run(STORED_DIGEST_SQL, {"device_id": header.device_id,
                                               "dedup_token": token}, "TSV").strip()
        if stored:
            if stored != header.body_sha256:
                raise BatchConflict(
                    f"batch {token} is stored with body sha256 {stored[:16]}…, this one has "
                    f"{header.body_sha256[:16]}… (the gateway rebuilt a batch it had sent?)")
            return DUPLICATE
        rows = 0
        for table, records in rows_by_table.items():
            if records:
                self._insert(insert_sql(table, f"{token}:{table}", self._settings()),
                             record_block(table, header, records, received_at))
                rows += len(records)
        # Last: its row says the whole batch is stored.
        self._insert(insert_sql(BATCHES, f"{token}:{BATCHES}", self._settings()),
                     batch_block(header, signature_hex, rows, received_at))
        return INSERTED

    def watermark(self, device_id: str, generation: str, lane: str) -> int:
        text = self._run(WATERMARK_SQL, {"device_id": device_id, "generation": generation,
                                         "lane": lane}, "TSV")
        return int(text.strip() or 0)

    def query(self, sql: str, fmt: str = DEFAULT_QUERY_FORMAT) -> str:
        return self._run(sql, {}, fmt)


# ---- embedded: chdb ---------------------------------------------------------------------------
def _held_by_another_process(path: str) -> bool:
    """Whether ClickHouse's lock on ``path/status`` is taken (flock, as the server takes it)."""
    try:
        fd = os.open(os.path.join(path, "status"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


def _brief(exc: BaseException) -> str:
    """chdb's message without the stack trace it may carry."""
    return str(exc).split(" Stack trace", 1)[0].split("\n", 1)[0].rstrip(" ,(")


class _Turns:
    """One statement at a time (a chdb session is not thread-safe); statements of urgent (P1)
    batches that wait go before the others, so a safety event waits for at most the one
    statement running, not for every statement of a large P3 batch queued before it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._urgent_waiting = 0

    @contextlib.contextmanager
    def hold(self, urgent: bool) -> Iterator[None]:
        with self._cond:
            self._urgent_waiting += urgent
            while self._busy or (not urgent and self._urgent_waiting):
                self._cond.wait()
            self._urgent_waiting -= urgent
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class ChdbBackend(ClickHouseBackend):
    """Embedded ClickHouse (chdb) storing in the directory ``path``.

    One process per path (ClickHouse locks ``path/status``), and one path per process: a
    running ``fleetgw central serve`` owns its path, so ``fleetgw central query`` cannot open
    it meanwhile (BackendLocked says so). A chdb session is not thread-safe: the receiver's
    request threads take turns, one statement at a time, P1 batches' statements first.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(path)
        self._turns = _Turns()
        self._thread = threading.local()  # .urgent: this thread stores a P1 batch
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise BackendError(f"chdb path {self.path} is not a directory ([backend] path)")
        try:
            from chdb import session  # ~0.1 s and ~220 MB: only when chdb is the backend
        except ImportError:
            raise BackendError("chdb is not installed: pip install 'fleetgw[central]' (or set "
                               "[backend] kind = \"http\" for a ClickHouse server)") from None
        try:
            self._session = session.Session(self.path)
        except RuntimeError as exc:
            if _held_by_another_process(self.path):
                raise BackendLocked(
                    f"chdb path {self.path} is in use by another process (a running `fleetgw "
                    "central serve`?): one process per path. Stop it first, or query a "
                    "ClickHouse server with [backend] kind = \"http\"") from None
            raise BackendError(f"cannot open chdb at {self.path}: {_brief(exc)}") from None
        self._closed = False

    def __repr__(self) -> str:
        return f"ChdbBackend({self.path!r})"

    def insert_batch(self, header: BatchHeader, signature_hex: str,
                     rows_by_table: Mapping[str, Sequence[Record]],
                     received_at: dt.datetime) -> str:
        self._thread.urgent = header.lane == URGENT_LANE
        try:
            return super().insert_batch(header, signature_hex, rows_by_table, received_at)
        finally:
            self._thread.urgent = False

    def _hold(self) -> contextlib.AbstractContextManager[None]:
        return self._turns.hold(getattr(self._thread, "urgent", False))

    def _run(self, sql: str, params: Mapping[str, str | int], fmt: str) -> str:
        with self._hold():
            self._check_open()
            try:
                return str(self._session.query(sql, fmt, params=dict(params) or None))
            except RuntimeError as exc:
                raise BackendError(f"chdb at {self.path}: {_brief(exc)}") from None

    def _insert(self, sql: str, data: bytes) -> None:
        with self._hold():
            self._check_open()
            try:
                with self._session.send_insert(sql, INSERT_FORMAT) as inserter:
                    inserter.append(data)
                    inserter.finish()
            except RuntimeError as exc:
                raise BackendError(f"chdb insert at {self.path}: {_brief(exc)}") from None

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"chdb at {self.path} is closed")

    def close(self) -> None:
        with self._hold():
            if not self._closed:
                self._closed = True
                self._session.close()


# ---- remote: ClickHouse over HTTP ---------------------------------------------------------------
DEFAULT_HTTP_TIMEOUT_S = 30.0
_ERROR_DETAIL_BYTES = 2000


class HttpClickHouseBackend(ClickHouseBackend):
    """A ClickHouse server (or a cluster's Distributed tables) over its HTTP interface.

    ``url``: e.g. ``https://clickhouse.internal:8443/``; ``database``: empty is the user's
    default. For a cluster, create the tables with `central.schema.cluster_ddl` first;
    `ensure_schema` then finds them. The password goes in a header and is never logged.
    """

    def __init__(self, url: str, user: str = "default", password: str = "", database: str = "",
                 timeout_s: float = DEFAULT_HTTP_TIMEOUT_S) -> None:
        self.url = url
        self.database = database
        self.timeout_s = timeout_s
        self._headers = {"X-ClickHouse-User": user, "X-ClickHouse-Key": password}

    def __repr__(self) -> str:
        return f"HttpClickHouseBackend({self.url!r}, database={self.database!r})"

    def _request(self, params: dict[str, str], body: bytes) -> str:
        if self.database:
            params["database"] = self.database
        request = urllib.request.Request(
            f"{self.url}?{urllib.parse.urlencode(params)}", data=body, method="POST",
            headers={**self._headers, "Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read(_ERROR_DETAIL_BYTES).decode(errors="replace").strip()
            raise BackendError(f"ClickHouse at {self.url} answered HTTP {exc.code}: "
                               f"{detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BackendError(f"cannot reach ClickHouse at {self.url}: {reason} (is it up? "
                               "check [backend] url)") from None

    def _run(self, sql: str, params: Mapping[str, str | int], fmt: str) -> str:
        query = {"default_format": fmt}
        query.update((f"param_{k}", str(v)) for k, v in params.items())
        return self._request(query, sql.encode())

    def _insert(self, sql: str, data: bytes) -> None:
        self._request({"query": f"{sql} FORMAT {INSERT_FORMAT}", "wait_end_of_query": "1"},
                      data)

    def close(self) -> None:
        """Nothing to release: every request is its own connection."""
