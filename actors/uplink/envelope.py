"""A signed batch: what the uplink posts and the central receiver verifies before anything else.

Where this sits on the data path: step 6. The uplink turns a fixed range of one device's
records of one lane (``seq_lo..seq_hi``, persisted before the first send) into a body
(`actors.uplink.wire`, then zstd) and a `BatchHeader` — the batch's identity plus the body's
sha256 — signed with the device's Ed25519 key. A retry resends the identical header, body and
signature; the receiver inserts with a dedup token derived from the identity alone, so a
replay is a no-op.

On the wire (HTTP POST to ``/v1/batches``):

    X-Fleetgw-Batch      base64url of the header's canonical JSON (sorted keys, no spaces)
    X-Fleetgw-Signature  hex Ed25519 signature over exactly those JSON bytes
    body                 the compressed wire encoding (``compression``: zstd or gzip)

`open_batch` checks, in order: header shape, size limits, signature (by the device's key),
body hash, then decompresses; each failure is a `BatchRejected` with an HTTP status and a
reason, and nothing is stored.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import zlib
from collections.abc import Mapping
from typing import Any

import attrs
import nacl.exceptions
import nacl.signing
import zstandard

from messages.journal import LANES

WIRE_FORMAT = "fleetgw.cols/1"
COMPRESSIONS = ("zstd", "gzip")
HEADER = "X-Fleetgw-Batch"
SIGNATURE = "X-Fleetgw-Signature"
PATH = "/v1/batches"
#: The largest decompressed body a receiver accepts by default (bytes).
DEFAULT_MAX_RAW_BYTES = 64 << 20
ZSTD_LEVEL = 9


class BatchRejected(ValueError):
    """A batch the receiver refuses: ``status`` (HTTP) and ``reason`` (one line for the
    gateway's log; it never contains key material)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@attrs.frozen(slots=True)
class BatchHeader:
    """A batch's identity and body digest — everything the signature covers.

    ``gateway_id``: the gateway that sent it (audit); ``generation``: the journal's generation
    (I2); ``seq_lo..seq_hi``: the device's seq range the batch covers (inclusive; ``count``
    records of this lane lie in it — other lanes' seqs are in between); ``body_sha256``: of
    the body as sent (compressed); ``raw_bytes``: its decompressed size.
    """

    gateway_id: str
    device_id: str
    generation: str
    lane: str
    seq_lo: int
    seq_hi: int
    count: int
    encoding: str
    compression: str
    body_sha256: str
    raw_bytes: int

    @property
    def dedup_token(self) -> str:
        """The ClickHouse insert_deduplication_token: the identity, never the content."""
        return (f"{self.device_id}:{self.generation}:{self.lane}:"
                f"{self.seq_lo}-{self.seq_hi}")

    def to_bytes(self) -> bytes:
        return json.dumps(attrs.asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchHeader:
        """Raises BatchRejected(400) naming the bad or missing field."""
        fields = attrs.fields_dict(cls)
        missing = [name for name in fields if name not in data]
        if missing:
            raise BatchRejected(400, f"batch header lacks {missing}")
        extra = sorted(set(data) - set(fields))
        if extra:
            raise BatchRejected(400, f"batch header has unknown fields {extra}")
        for name, field in fields.items():
            want = int if field.type in ("int", int) else str
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, want):
                raise BatchRejected(400, f"batch header field {name} must be {want.__name__}")
        header = cls(**data)
        if header.lane not in LANES or header.lane == "EPHEMERAL":
            raise BatchRejected(400, f"lane {header.lane!r} is not synced")
        if not 1 <= header.seq_lo <= header.seq_hi or not 1 <= header.count <= (
                header.seq_hi - header.seq_lo + 1):
            raise BatchRejected(400, f"inconsistent range {header.seq_lo}..{header.seq_hi} "
                                     f"with {header.count} records")
        if header.encoding != WIRE_FORMAT or header.compression not in COMPRESSIONS:
            raise BatchRejected(415, f"encoding {header.encoding!r}/{header.compression!r} "
                                     f"(this receiver takes {WIRE_FORMAT} with "
                                     f"{' or '.join(COMPRESSIONS)})")
        return header


@attrs.frozen(slots=True)
class SignedBatch:
    """What the uplink sends, byte for byte the same on every retry."""

    header: BatchHeader
    header_b64: str
    signature_hex: str
    body: bytes

    def http_headers(self) -> dict[str, str]:
        return {HEADER: self.header_b64, SIGNATURE: self.signature_hex,
                "Content-Type": "application/octet-stream"}


def compress(raw: bytes, compression: str = "zstd") -> bytes:
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=6, mtime=0)
    raise ValueError(f"compression must be one of {COMPRESSIONS} (got {compression!r})")


def seal(raw_body: bytes, signing_key: nacl.signing.SigningKey, *, gateway_id: str,
         device_id: str, generation: str, lane: str, seq_lo: int, seq_hi: int, count: int,
         compression: str = "zstd") -> SignedBatch:
    """Compress ``raw_body`` (a wire encoding) and sign the batch's identity with its hash."""
    body = compress(raw_body, compression)
    header = BatchHeader(gateway_id, device_id, generation, lane, seq_lo, seq_hi, count,
                         WIRE_FORMAT, compression, hashlib.sha256(body).hexdigest(),
                         len(raw_body))
    data = header.to_bytes()
    return SignedBatch(header, base64.urlsafe_b64encode(data).decode(),
                       signing_key.sign(data).signature.hex(), body)


def read_header(header_b64: str | None) -> tuple[BatchHeader, bytes]:
    """The header and its exact signed bytes; BatchRejected(400) if absent or malformed."""
    if not header_b64:
        raise BatchRejected(400, f"no {HEADER} header (unsigned batch)")
    try:
        data = base64.urlsafe_b64decode(header_b64.encode())
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BatchRejected(400, f"{HEADER} is not base64url JSON") from exc
    if not isinstance(parsed, dict):
        raise BatchRejected(400, f"{HEADER} is not a JSON object")
    return BatchHeader.from_json(parsed), data


def open_batch(header: BatchHeader, header_bytes: bytes, signature_hex: str | None,
               body: bytes, verify_key: nacl.signing.VerifyKey,
               max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> bytes:
    """The decompressed wire body of a batch whose signature (by ``verify_key``, the
    device's registered key) and body hash hold; BatchRejected otherwise."""
    if header.raw_bytes > max_raw_bytes:
        raise BatchRejected(413, f"batch of {header.raw_bytes} bytes exceeds the limit of "
                                 f"{max_raw_bytes}")
    try:
        verify_key.verify(header_bytes, bytes.fromhex(signature_hex or ""))
    except (ValueError, nacl.exceptions.BadSignatureError) as exc:
        raise BatchRejected(401, f"bad or missing signature for device {header.device_id} "
                                 "(wrong key, or the header was altered)") from exc
    if hashlib.sha256(body).hexdigest() != header.body_sha256:
        raise BatchRejected(400, "body sha256 does not match the signed header (altered in "
                                 "transit?)")
    return decompress(header, body, max_raw_bytes)


def decompress(header: BatchHeader, body: bytes,
               max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES) -> bytes:
    """The wire body inside ``body`` (``header.compression``), at most ``max_raw_bytes`` and
    exactly ``header.raw_bytes`` long; BatchRejected(400/413) otherwise. Checks no signature:
    `open_batch` does that first; a gateway reading its own batch (direct mode) needs none."""
    try:
        if header.compression == "zstd":
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=max_raw_bytes)
        else:  # bounded: a small gzip body may claim to expand without limit
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            raw = inflater.decompress(body, max_raw_bytes + 1)
            if not inflater.eof:
                raise BatchRejected(413, f"gzip body expands beyond {max_raw_bytes} bytes "
                                         "or is truncated")
    except (zstandard.ZstdError, zlib.error, OSError, EOFError) as exc:
        raise BatchRejected(400, f"body does not decompress as {header.compression}") from exc
    if len(raw) != header.raw_bytes:
        raise BatchRejected(400, f"body decompresses to {len(raw)} bytes, the header says "
                                 f"{header.raw_bytes}")
    return raw
