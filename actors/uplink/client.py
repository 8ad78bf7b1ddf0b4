"""The uplink's HTTP client: one signed batch out, one `PostResult` back.

Where this sits on the data path: step 6, the last hop of the gateway — the uplink hands it a
`SignedBatch` (built and persisted before), it POSTs header, signature and body to the central
receiver (`central.receiver`, ``/v1/batches``) with pycurl over HTTP/1.1, keeping the
connection alive between batches, over mTLS when a client certificate, key and CA are given.

The contract the uplink relies on is `BatchSink`: ``post`` never raises for the network; a
transport failure (refused, reset, timeout, TLS) is a result with ``status`` None and an
``error`` that `actors.uplink.link.classify` turns into a verdict. Key material never appears
in a result or a log line: only file paths are held. `tls_files`, `new_handle` (the options
every request shares) and `get` (a bounded GET) serve the model updater too
(`actors.uplink.model_update`).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import pycurl

from actors.uplink.envelope import PATH, SignedBatch

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_TOTAL_TIMEOUT_S = 30.0
#: SSL_VERIFYHOST 2: the certificate must name the host we connect to.
VERIFY_HOST_NAME = 2
#: An empty ``Expect:`` stops libcurl's ``100-continue`` round trip: the body goes at once.
NO_EXPECT = "Expect:"
#: The most body bytes `get` reads of an answer other than 200/206 (a refusal's reason).
MAX_ERROR_BYTES = 64 << 10


@attrs.frozen(slots=True)
class PostResult:
    """One POST: ``status`` (None: no HTTP answer), the reply's JSON object (None: none or not
    JSON), ``error`` (why there is no answer, or why it is unreadable), bytes sent, seconds."""

    status: int | None
    body: dict[str, Any] | None
    error: str | None
    sent_bytes: int
    seconds: float


def tls_files(tls_cert: str | None, tls_key: str | None,
              tls_ca: str | None) -> dict[str, str] | None:
    """The mTLS file paths (None: plain HTTP); ValueError when only some are given."""
    tls = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca}
    if any(tls.values()) and not all(tls.values()):
        missing = ", ".join(name for name, value in tls.items() if not value)
        raise ValueError(f"mTLS needs tls_cert, tls_key and tls_ca; missing {missing}")
    return {k: str(v) for k, v in tls.items()} if tls_cert else None


def new_handle(tls: dict[str, str] | None, connect_timeout_ms: int,
               total_timeout_ms: int) -> pycurl.Curl:
    """A pycurl handle with the options every request to the receiver shares: HTTP/1.1, no
    signals (worker threads), TCP keep-alive, timeouts, and mTLS when ``tls`` (`tls_files`)
    is given: our certificate and key, the peer verified against the CA and by host name."""
    curl = pycurl.Curl()
    curl.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
    curl.setopt(pycurl.NOSIGNAL, 1)
    curl.setopt(pycurl.TCP_KEEPALIVE, 1)
    curl.setopt(pycurl.CONNECTTIMEOUT_MS, connect_timeout_ms)
    curl.setopt(pycurl.TIMEOUT_MS, total_timeout_ms)
    if tls is not None:
        curl.setopt(pycurl.SSLCERT, tls["tls_cert"])
        curl.setopt(pycurl.SSLKEY, tls["tls_key"])
        curl.setopt(pycurl.CAINFO, tls["tls_ca"])
        curl.setopt(pycurl.SSL_VERIFYPEER, 1)
        curl.setopt(pycurl.SSL_VERIFYHOST, VERIFY_HOST_NAME)
    return curl


@attrs.frozen(slots=True)
class GetResult:
    """One GET: ``status`` (None: no HTTP answer, ``error`` says why), the body bytes that
    arrived, and the reply's headers (names in lower case)."""

    status: int | None
    body: bytes
    headers: Mapping[str, str]
    error: str | None


def get(curl: pycurl.Curl, url: str, headers: list[str], limit: int) -> GetResult:
    """GET ``url`` with ``curl`` (a `new_handle`); never raises for the network. A 200/206
    body beyond ``limit`` bytes (any other answer's beyond MAX_ERROR_BYTES) is cut off: an
    error, so a server that ignores a Range never sends more than was asked for."""
    body, replied = bytearray(), {}
    answer = [0, False]  # the status line's code as it arrives; cut off?

    def write(data: bytes) -> int | None:
        if len(body) + len(data) > (limit if answer[0] in (200, 206) else MAX_ERROR_BYTES):
            answer[1] = True
            return 0  # aborts the transfer
        body.extend(data)
        return None

    def header(line: bytes) -> None:
        text = line.decode("latin-1").strip()
        if text.startswith("HTTP/"):  # a new response (a 100 Continue may come first)
            replied.clear()
            code = text.split(" ")[1] if " " in text else ""
            answer[0] = int(code) if code.isdigit() else 0
        elif ":" in text:
            name, _, value = text.partition(":")
            replied[name.strip().lower()] = value.strip()

    curl.setopt(pycurl.URL, url)
    curl.setopt(pycurl.HTTPGET, 1)
    curl.setopt(pycurl.HTTPHEADER, headers)
    curl.setopt(pycurl.WRITEFUNCTION, write)
    curl.setopt(pycurl.HEADERFUNCTION, header)
    try:
        curl.perform()
    except pycurl.error as exc:
        code, message = exc.args[0], exc.args[1] if len(exc.args) > 1 else ""
        error = (f"more than the {limit} bytes asked for (Range ignored?)" if answer[1]
                 else f"curl error {code}: {message}")
        return GetResult(None, bytes(body), replied, error)
    return GetResult(int(curl.getinfo(pycurl.RESPONSE_CODE)), bytes(body), replied, None)


class BatchSink(Protocol):
    """A place that accepts signed batches (the embedded receiver, a remote one)."""

    def post(self, batch: SignedBatch) -> PostResult:
        """Send ``batch``; never raises for transport failures (they are ``status`` None)."""

    def close(self) -> None:
        """Drop the connection (the next `post` opens a new one)."""


class UplinkClient:
    """`BatchSink` over pycurl: one reused handle (keep-alive), HTTP/1.1, mTLS if configured."""

    def __init__(self, url: str, *, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_ca: str | None = None,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 total_timeout_s: float = DEFAULT_TOTAL_TIMEOUT_S) -> None:
        self.url = url.rstrip("/") + PATH
        self._tls = tls_files(tls_cert, tls_key, tls_ca)
        self._connect_timeout_ms = int(connect_timeout_s * 1000)
        self._total_timeout_ms = int(total_timeout_s * 1000)
        self._curl: pycurl.Curl | None = None

    def __repr__(self) -> str:  # paths only, never key material
        return f"UplinkClient({self.url!r}, mtls={self._tls is not None})"

    def _handle(self) -> pycurl.Curl:
        """The reused handle, with the options every POST shares."""
        if self._curl is None:
            self._curl = new_handle(self._tls, self._connect_timeout_ms,
                                    self._total_timeout_ms)
            self._curl.setopt(pycurl.URL, self.url)
        return self._curl

    def post(self, batch: SignedBatch) -> PostResult:
        curl = self._handle()
        out = io.BytesIO()
        headers = [f"{k}: {v}" for k, v in batch.http_headers().items()] + [NO_EXPECT]
        curl.setopt(pycurl.HTTPHEADER, headers)
        curl.setopt(pycurl.POSTFIELDSIZE, len(batch.body))
        curl.setopt(pycurl.POSTFIELDS, batch.body)
        curl.setopt(pycurl.WRITEDATA, out)
        started = time.perf_counter()
        try:
            curl.perform()
        except pycurl.error as exc:
            code, message = exc.args[0], exc.args[1] if len(exc.args) > 1 else ""
            return PostResult(None, None, f"curl error {code}: {message}",
                              int(curl.getinfo(pycurl.SIZE_UPLOAD_T)),
                              time.perf_counter() - started)
        seconds = time.perf_counter() - started
        sent = int(curl.getinfo(pycurl.SIZE_UPLOAD_T))
        status = int(curl.getinfo(pycurl.RESPONSE_CODE))
        try:
            body = json.loads(out.getvalue())
        except ValueError:
            return PostResult(status, None, "reply is not JSON", sent, seconds)
        if not isinstance(body, dict):
            return PostResult(status, None, "reply is not a JSON object", sent, seconds)
        return PostResult(status, body, None, sent, seconds)

    def close(self) -> None:
        if self._curl is not None:
            self._curl.close()
            self._curl = None
