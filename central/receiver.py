"""The ingest receiver: signed batches in over HTTP(S), verified, stored, acknowledged.

Where this sits on the data path: central, the other end of the uplink (step 6). For
``POST /v1/batches`` (`actors.uplink.envelope.PATH`) `Receiver.accept` checks, in order: the
signed header (`read_header`; its ids must be identifiers), the device is registered (403),
signature, body hash and size (`open_batch`: 401/400/413/415), the body decodes
(`actors.uplink.wire`, 400) into exactly the records the header announced — same device,
``count`` of them, seqs strictly increasing within ``seq_lo..seq_hi`` — then routes each record
to its table by kind and stores the batch (`central.backend`). A refusal stores nothing and
replies ``{"status": "refused", "reason"}``; success replies ``{"status": "ok"|"duplicate",
"device_id", "lane", "acked_seq_hi", "watermark"}``: ``acked_seq_hi`` is the batch's
``seq_hi``, ``watermark`` the highest seq_hi stored for the device's lane in its generation
(as far as this receiver knows).
A batch identity already stored with another body is 409 (never retry); storage failing is
503 and a receiver-side defect 500 (both: retry later). ``GET /v1/health`` answers 200.
Every outcome is counted in the receiver's `central.metrics.ReceiverMetrics` (a refusal under
one of its fixed `REFUSALS` codes, also logged as ``refusal=``); ``GET /metrics`` serves them
in the Prometheus text format.
With a model store (`central.model_store`), ``GET /v1/models`` is its catalog and ``GET
/v1/models/<version>/<file>`` a file, with its sha256 as ETag and one ``Range`` (206/416) for
resumed downloads; without one, both are 404.

`ReceiverServer` is the HTTP shell: a ThreadingHTTPServer on loopback unless configured (I9),
HTTPS with required client certificates when TLS is configured (the handshake runs in the
request's thread, so a slow client holds up no one; a Prometheus scraper of ``/metrics`` then
needs a fleet client certificate too), the Content-Length limit checked before
the body is read (or, with ``Expect: 100-continue``, before it is sent), one logfmt line per
request, never any key material.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs

from actors.uplink.envelope import (
    HEADER,
    PATH,
    SIGNATURE,
    BatchHeader,
    BatchRejected,
    open_batch,
    read_header,
)
from actors.uplink.model_update import MODELS_PATH
from actors.uplink.wire import WireError, WireRecord, decode
from central.backend import DUPLICATE, Backend, BackendError, BatchConflict
from central.config import ReceiverSettings
from central.devices import DeviceKeyError, DeviceRegistry
from central.metrics import CONTENT_TYPE, ReceiverMetrics
from central.model_store import ModelStore, ModelStoreError, StoredFile, byte_range
from central.schema import table_for_kind
from config.fields import is_loopback
from messages.readings import IDENT_RE

HEALTH_PATH = "/v1/health"
METRICS_PATH = "/metrics"
#: Refusal codes (`central.metrics.REFUSALS`) that an HTTP status of `BatchRejected` implies;
#: a 400 is a bad header or a bad body, depending on the step that refused.
REFUSAL_BY_STATUS = {401: "bad_signature", 403: "unknown_device", 413: "too_large",
                     415: "unsupported_encoding"}
#: Seconds a client may take for the TLS handshake, and then per read of its request.
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
LOG = logging.getLogger("fleetgw.central")


@attrs.frozen
class Reply:
    """An HTTP status, its JSON body, and the fields of the request's log line."""

    status: int
    body: dict[str, Any]
    log: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def refused(cls, status: int, reason: str, refusal: str = "", **log: Any) -> Reply:
        """``refusal``: the batch refusal's code (`central.metrics.REFUSALS`), for the log."""
        return cls(status, {"status": "refused", "reason": reason},
                   {"result": "refused", **({"refusal": refusal} if refusal else {}),
                    "reason": reason, **log})


def _check_ids(header: BatchHeader) -> None:
    for name in ("gateway_id", "generation"):
        if not IDENT_RE.match(getattr(header, name)):
            raise BatchRejected(400, f"batch header field {name} must be an identifier "
                                     "([A-Za-z0-9_.:-/], 1-128 characters)")


def _check_records(header: BatchHeader, device_id: str, records: Sequence[WireRecord]) -> None:
    if device_id != header.device_id:
        raise BatchRejected(400, f"body is for device {device_id!r}, the signed header for "
                                 f"{header.device_id!r}")
    if len(records) != header.count:
        raise BatchRejected(400, f"body holds {len(records)} records, the signed header "
                                 f"announces {header.count}")
    for name in ("sensor_id", "kind"):
        for value in {getattr(r, name) for r in records}:
            if not IDENT_RE.match(value):
                raise BatchRejected(400, f"record {name} {value[:64]!r} is not an identifier "
                                         "([A-Za-z0-9_.:-/], 1-128 characters)")
    previous = header.seq_lo - 1
    for record in records:
        if not previous < record.seq <= header.seq_hi:
            raise BatchRejected(400, f"record seq {record.seq} is out of order or outside the "
                                     f"signed range {header.seq_lo}..{header.seq_hi}")
        previous = record.seq


def route(records: Sequence[WireRecord]) -> dict[str, list[WireRecord]]:
    """Records by the one table each goes to (`central.schema.table_for_kind`)."""
    tables: dict[str, list[WireRecord]] = {}
    for record in records:
        tables.setdefault(table_for_kind(record.kind), []).append(record)
    return tables


class Receiver:
    """The receiver's logic, without HTTP: one batch in, one `Reply` out, its outcome counted
    in ``metrics`` (None: a `ReceiverMetrics` with the default late_after_s)."""

    def __init__(self, backend: Backend, registry: DeviceRegistry, max_raw_bytes: int,
                 metrics: ReceiverMetrics | None = None) -> None:
        self.backend = backend
        self.registry = registry
        self.max_raw_bytes = max_raw_bytes
        self.metrics = ReceiverMetrics() if metrics is None else metrics
        self._marks: dict[tuple[str, str, str], int] = {}
        self._marks_lock = threading.Lock()

    def _watermark(self, header: BatchHeader) -> int:
        """The highest seq_hi stored for the batch's (device, generation, lane): asked of the
        backend once, then kept up to date here (one query less per batch). With several
        receivers on one ClickHouse it may lag another receiver's inserts: it is what this
        receiver knows stored, for the gateway's log; the gateway acts on ``acked_seq_hi``."""
        key = (header.device_id, header.generation, header.lane)
        with self._marks_lock:
            known = self._marks.get(key)
        if known is None:
            known = self.backend.watermark(*key)
        with self._marks_lock:
            self._marks[key] = max(known, header.seq_hi, self._marks.get(key, 0))
            return self._marks[key]

    def refuse(self, status: int, reason: str, refusal: str, **log: Any) -> Reply:
        """A refused batch, counted under ``refusal`` (a `central.metrics.REFUSALS` code)."""
        self.metrics.refused(refusal)
        return Reply.refused(status, reason, refusal, **log)

    def accept(self, header_b64: str | None, signature_hex: str | None, body: bytes) -> Reply:
        try:
            header, header_bytes = read_header(header_b64)
        except BatchRejected as exc:
            return self.refuse(exc.status, exc.reason,
                               REFUSAL_BY_STATUS.get(exc.status, "bad_header"))
        where = {"device": header.device_id, "generation": header.generation,
                 "lane": header.lane, "seq": f"{header.seq_lo}-{header.seq_hi}"}
        bad_request = "bad_header"  # what a 400 refuses, up to the step that is checking
        try:
            _check_ids(header)
            key = self.registry.key(header.device_id)
            if key is None:
                raise BatchRejected(403, f"unknown device {header.device_id!r} (not "
                                         "registered with this receiver)")
            bad_request = "bad_body"
            raw = open_batch(header, header_bytes, signature_hex, body, key, self.max_raw_bytes)
            try:
                device_id, records = decode(raw)
            except WireError as exc:
                raise BatchRejected(400, f"body is not a valid {header.encoding} "
                                         f"encoding: {exc}") from None
            _check_records(header, device_id, records)
            signature = bytes.fromhex(signature_hex or "").hex()  # verified: canonical hex
            tables = route(records)
            received_at = dt.datetime.now(dt.UTC)
            result = self.backend.insert_batch(header, signature, tables, received_at)
            watermark = self._watermark(header)
        except BatchRejected as exc:
            return self.refuse(exc.status, exc.reason,
                               REFUSAL_BY_STATUS.get(exc.status, bad_request), **where)
        except DeviceKeyError as exc:
            LOG.error("%s", logfmt({"event": "device-key-unusable", "error": exc,
                                    "hint": "fix the key file, or register the device again"}))
            return self.refuse(500, f"device {header.device_id!r} has an unusable key on "
                                    "this receiver (its operator is told); retry later",
                               "device_key", **where)
        except BatchConflict as exc:
            return self.refuse(409, str(exc), "conflict", **where)
        except BackendError as exc:
            LOG.error("%s", logfmt({"event": "storage-failed", **where, "error": exc}))
            return self.refuse(503, "storage unavailable; retry later", "storage", **where)
        if result == DUPLICATE:
            self.metrics.duplicate(header.device_id, header.lane, len(records), len(body))
        else:
            self.metrics.stored(header.device_id, header.lane, tables, len(body), received_at)
        return Reply(200, {"status": result, "device_id": header.device_id,
                           "lane": header.lane, "acked_seq_hi": header.seq_hi,
                           "watermark": watermark},
                     {"result": result, **where, "rows": len(records), "bytes": len(body)})


# ---- HTTP ---------------------------------------------------------------------------------------
def _quote(value: Any) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-_.:/@" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def logfmt(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


class _Handler(BaseHTTPRequestHandler):
    server: ReceiverServer
    protocol_version = "HTTP/1.1"
    server_version = "fleetgw-central"
    timeout = REQUEST_TIMEOUT_S
    #: Headers and body go out in separate writes; with Nagle each answer on a kept-alive
    #: connection would wait ~40 ms for the client's delayed ACK (a chunked model download
    #: is many answers).
    disable_nagle_algorithm = True

    def _log(self, status: int, log: dict[str, Any], started: float) -> None:
        fields = {"event": "request", "method": self.command, "path": self.path,
                  "status": status, **log, "peer": self.client_address[0],
                  **self._client_cert(), "ms": f"{(time.perf_counter() - started) * 1000:.1f}"}
        LOG.log(logging.INFO if status < 500 else logging.ERROR, "%s", logfmt(fields))

    def _reply(self, reply: Reply, started: float, close: bool = False,
               headers: dict[str, str] | None = None) -> None:
        """Log the request's line, then answer (so the line exists once the client knows)."""
        self._log(reply.status, reply.log, started)
        data = json.dumps(reply.body, separators=(",", ":")).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _client_cert(self) -> dict[str, str]:
        """``cert``: the common name of the client's (verified) certificate, under TLS."""
        if not isinstance(self.connection, ssl.SSLSocket):
            return {}
        subject = (self.connection.getpeercert() or {}).get("subject", ())
        names = [value for rdn in subject for key, value in rdn if key == "commonName"]
        return {"cert": names[0] if names else "?"}

    def _length_refusal(self) -> Reply | None:
        """A refusal when the body's announced length is missing, malformed or too large."""
        receiver = self.server.receiver
        if self.headers.get("Transfer-Encoding"):
            return receiver.refuse(411, "send the batch with a Content-Length, not chunked",
                                   "length_required")
        text = self.headers.get("Content-Length")
        if text is None or not text.isdigit():
            return receiver.refuse(411, f"Content-Length missing or malformed ({text!r})",
                                   "length_required")
        limit = self.server.settings.max_body_bytes
        if int(text) > limit:
            return receiver.refuse(413, f"body of {text} bytes exceeds the limit of {limit}",
                                   "too_large")
        return None

    def handle_expect_100(self) -> bool:
        refusal = self._length_refusal() if self.path == PATH else None
        if refusal is not None:
            self._reply(refusal, time.perf_counter(), close=True)
            return False
        return super().handle_expect_100()

    def do_POST(self) -> None:
        started = time.perf_counter()
        if self.path != PATH:
            self._reply(Reply.refused(404, f"no such endpoint; POST batches to {PATH}"),
                        started, close=True)
            return
        refusal = self._length_refusal()
        if refusal is not None:
            self._reply(refusal, started, close=True)
            return
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        if len(body) < length:  # the client went away mid-body
            self.close_connection = True
            return
        try:
            reply = self.server.receiver.accept(self.headers.get(HEADER),
                                                self.headers.get(SIGNATURE), body)
        except Exception as exc:  # a defect: answer (retryable) and say where, keep serving
            LOG.exception("%s", logfmt({"event": "internal-error", "error": repr(exc)}))
            reply = self.server.receiver.refuse(500, "internal error in the receiver; retry "
                                                     "later", "internal")
        self._reply(reply, started)

    def do_GET(self) -> None:
        started = time.perf_counter()
        if self.path == HEALTH_PATH:
            self._reply(Reply(200, {"status": "ok"}), started)
        elif self.path == METRICS_PATH:
            self._send_metrics(started)
        elif self.path == MODELS_PATH or self.path.startswith(MODELS_PATH + "/"):
            self._get_model(started)
        else:
            self._reply(Reply.refused(404, f"no such endpoint (health: {HEALTH_PATH}, "
                                           f"metrics: {METRICS_PATH})"), started)

    def _send_metrics(self, started: float) -> None:
        """The receiver's metrics, Prometheus text format."""
        data = self.server.receiver.metrics.exposition()
        self._log(200, {"result": "ok", "bytes": len(data)}, started)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _get_model(self, started: float) -> None:
        """The catalog, or one file of a version (a single Range honoured)."""
        store = self.server.models
        if store is None:
            self._reply(Reply.refused(404, "this receiver serves no models (no [models] "
                                           "directory in its config)"), started)
            return
        try:
            if self.path == MODELS_PATH:
                catalog = store.catalog()
                self._reply(Reply(200, catalog, {"result": "ok",
                                                 "versions": len(catalog["versions"])}), started)
                return
            parts = self.path[len(MODELS_PATH) + 1:].split("/")
            if len(parts) != 2:
                raise ModelStoreError(404, f"no such endpoint; GET {MODELS_PATH} or "
                                           f"{MODELS_PATH}/<version>/<file>")
            with store.open_file(*parts) as served:
                try:
                    span = byte_range(self.headers.get("Range"), served.size)
                except ModelStoreError as exc:
                    self._reply(Reply.refused(exc.status, exc.reason), started,
                                headers={"Content-Range": f"bytes */{served.size}"})
                    return
                self._send_file(served, span, started)
        except ModelStoreError as exc:
            self._reply(Reply.refused(exc.status, exc.reason), started)

    def _send_file(self, served: StoredFile, span: tuple[int, int] | None,
                   started: float) -> None:
        """The file whole (200) or ``span`` of it (206), its sha256 as ETag."""
        start, end = span or (0, served.size - 1)
        status = 206 if span else 200
        self._log(status, {"result": "ok", "bytes": end - start + 1,
                           **({"range": f"{start}-{end}"} if span else {})}, started)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", f'"{served.sha256}"')
        self.send_header("Accept-Ranges", "bytes")
        if span:
            self.send_header("Content-Range", f"bytes {start}-{end}/{served.size}")
        self.end_headers()
        try:
            for block in served.blocks(start, end):
                self.wfile.write(block)
        except OSError:  # the client went away, or the file shrank: the length is a lie now
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: `_reply` writes one logfmt line per request."""




def server_ssl_context(settings: ReceiverSettings) -> ssl.SSLContext:
    """TLS 1.2+ with the server's certificate; clients MUST present a certificate that chains
    to ``tls_client_ca``. Raises ValueError naming the file that cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"receiver.tls_cert/tls_key ({settings.tls_cert}, {settings.tls_key})"
                         f": cannot load the certificate and key: {exc}") from None
    try:
        context.load_verify_locations(cafile=settings.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"receiver.tls_client_ca ({settings.tls_client_ca}): cannot load the "
                         f"CA bundle: {exc}") from None
    return context


class ReceiverServer(ThreadingHTTPServer):
    """The receiver on ``settings.host:port``; `serve_forever` until `shutdown`. ``models``:
    the model store served at ``GET /v1/models`` (None: none, 404). ``GET /metrics``: the
    receiver's metrics (under TLS, like every request, only for a client certificate of the
    fleet CA)."""

    daemon_threads = True

    def __init__(self, settings: ReceiverSettings, receiver: Receiver,
                 models: ModelStore | None = None) -> None:
        self.settings = settings
        self.receiver = receiver
        self.models = models
        self.ssl_context = server_ssl_context(settings) if settings.tls else None
        super().__init__((settings.host, settings.port), _Handler)
        if self.ssl_context is not None:
            self.socket = self.ssl_context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False)
        if not is_loopback(settings.host):
            LOG.warning("%s", logfmt({
                "event": "listening-beyond-loopback", "url": self.url,
                "warning": "reachable from the network (I9)" + ("" if settings.tls else
                           "; WITHOUT TLS: batches travel in clear, any host may post "
                           "(signatures are still checked)")}))

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection the client (or its link) dropped is normal on flaky links: one line.
        Anything else is a defect: the traceback, in the log."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError)):
            LOG.info("%s", logfmt({"event": "connection-dropped", "peer": client_address[0],
                                   "error": type(exc).__name__}))
            return
        LOG.exception("%s", logfmt({"event": "connection-error", "peer": client_address[0]}))

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                LOG.warning("%s", logfmt({"event": "tls-refused", "peer": client_address[0],
                                          "reason": getattr(exc, "reason", None) or exc}))
                return
        super().finish_request(request, client_address)
