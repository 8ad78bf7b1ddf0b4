"""The signed batch envelope: identical on every retry, and every alteration refused with a
status and a reason before anything is decompressed or stored."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json

import nacl.signing
import pytest

from actors.uplink.envelope import (
    BatchHeader,
    BatchRejected,
    open_batch,
    read_header,
    seal,
)

RAW = b"wire body " * 500
IDENTITY = {"gateway_id": "gw-1", "device_id": "veh-001", "generation": "aacc58e8",
            "lane": "P1", "seq_lo": 10, "seq_hi": 20, "count": 5}


@pytest.fixture(scope="module")
def key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(b"k" * 32)


def opened(batch, verify_key, **kw) -> bytes:
    header, data = read_header(batch.header_b64)
    return open_batch(header, data, batch.signature_hex, batch.body, verify_key, **kw)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_a_sealed_batch_opens_to_its_body_and_is_identical_when_resealed(key, compression):
    first = seal(RAW, key, compression=compression, **IDENTITY)
    again = seal(RAW, key, compression=compression, **IDENTITY)
    assert first == again  # a retry after a crash resends the very same bytes
    assert len(first.body) < len(RAW)
    assert opened(first, key.verify_key) == RAW
    assert first.header.dedup_token == "veh-001:aacc58e8:P1:10-20"


def test_the_dedup_token_names_the_identity_not_the_content(key):
    a = seal(RAW, key, **IDENTITY)
    b = seal(RAW + b"x", key, **IDENTITY)
    assert a.header.dedup_token == b.header.dedup_token
    assert a.header.body_sha256 != b.header.body_sha256


def test_a_tampered_body_is_refused(key):
    batch = seal(RAW, key, **IDENTITY)
    body = bytearray(batch.body)
    body[len(body) // 2] ^= 1
    with pytest.raises(BatchRejected, match="body sha256") as exc:
        opened(type(batch)(batch.header, batch.header_b64, batch.signature_hex, bytes(body)),
               key.verify_key)
    assert exc.value.status == 400


def test_an_altered_header_or_another_key_fails_the_signature(key):
    batch = seal(RAW, key, **IDENTITY)
    data = json.loads(base64.urlsafe_b64decode(batch.header_b64))
    data["seq_hi"] = 21
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).decode()
    header, raw = read_header(forged)
    with pytest.raises(BatchRejected, match="bad or missing signature") as exc:
        open_batch(header, raw, batch.signature_hex, batch.body, key.verify_key)
    assert exc.value.status == 401
    other = nacl.signing.SigningKey(b"o" * 32)
    with pytest.raises(BatchRejected, match="bad or missing signature"):
        opened(batch, other.verify_key)
    with pytest.raises(BatchRejected, match="bad or missing signature"):
        open_batch(*read_header(batch.header_b64), None, batch.body, key.verify_key)


@pytest.mark.parametrize(("header_b64", "reason"), [
    (None, "unsigned"),
    ("!!!", "not base64url JSON"),
    (base64.urlsafe_b64encode(b"[1]").decode(), "not a JSON object"),
    (base64.urlsafe_b64encode(b'{"device_id": "x"}').decode(), "lacks"),
])
def test_a_missing_or_malformed_header_is_refused(header_b64, reason):
    with pytest.raises(BatchRejected, match=reason) as exc:
        read_header(header_b64)
    assert exc.value.status == 400


@pytest.mark.parametrize(("change", "reason", "status"), [
    ({"lane": "EPHEMERAL"}, "is not synced", 400),
    ({"seq_lo": 30}, "inconsistent range", 400),
    ({"count": 12}, "inconsistent range", 400),
    ({"seq_lo": True}, "must be int", 400),
    ({"encoding": "json"}, "this receiver takes", 415),
    ({"extra": 1}, "unknown fields", 400),
])
def test_header_fields_are_checked(key, change, reason, status):
    data = json.loads(seal(RAW, key, **IDENTITY).header.to_bytes())
    data.update(change)
    with pytest.raises(BatchRejected, match=reason) as exc:
        BatchHeader.from_json(data)
    assert exc.value.status == status


def test_an_oversized_batch_is_refused_before_decompression(key):
    batch = seal(RAW, key, **IDENTITY)
    with pytest.raises(BatchRejected, match="exceeds the limit") as exc:
        opened(batch, key.verify_key, max_raw_bytes=len(RAW) - 1)
    assert exc.value.status == 413


def test_a_gzip_bomb_is_refused_without_expanding_it(key):
    bomb = gzip.compress(b"\0" * (8 << 20))
    batch = seal(RAW, key, compression="gzip", **IDENTITY)
    # Same identity and the bomb as body, honestly hashed and signed but claiming a small size.
    header = BatchHeader(**{**json.loads(batch.header.to_bytes()),
                            "body_sha256": hashlib.sha256(bomb).hexdigest()})
    data = header.to_bytes()
    with pytest.raises(BatchRejected) as exc:
        open_batch(header, data, key.sign(data).signature.hex(), bomb, key.verify_key,
                   max_raw_bytes=1 << 20)
    assert exc.value.status == 413


def test_a_body_that_does_not_decompress_is_refused(key):
    batch = seal(RAW, key, **IDENTITY)
    junk = b"not zstd at all"
    header = BatchHeader(**{**json.loads(batch.header.to_bytes()),
                            "body_sha256": hashlib.sha256(junk).hexdigest()})
    data = header.to_bytes()
    with pytest.raises(BatchRejected, match="does not decompress") as exc:
        open_batch(header, data, key.sign(data).signature.hex(), junk, key.verify_key)
    assert exc.value.status == 400
