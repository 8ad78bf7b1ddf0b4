"""The ingest receiver over real HTTP(S) on loopback, real signatures and embedded chdb: a
signed batch is stored in the tables of its kinds and acknowledged; a replay is acknowledged
as a duplicate and stored once (I5); every refusal stores nothing; HTTPS refuses a client
without a certificate of the fleet CA at the handshake; `fleetgw central serve` starts, serves
and stops in its own process while `fleetgw central query` waits for its path. Also: the
device registry (keys by file, atomic re-keying) and strict loading of the receiver's config."""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nacl.signing
import pytest

pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")
pycurl = pytest.importorskip("pycurl")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from actors.uplink.envelope import HEADER, PATH, SignedBatch, seal  # noqa: E402
from actors.uplink.wire import WireRecord, encode  # noqa: E402
from central.config import ReceiverSettings, load_central_config  # noqa: E402
from central.devices import DeviceKeyError, DeviceRegistry  # noqa: E402
from central.receiver import HEALTH_PATH, Receiver, ReceiverServer, is_loopback  # noqa: E402
from central.schema import RECORD_TABLES  # noqa: E402
from config.loader import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEVICE, GENERATION, GATEWAY = "veh-001", "5f0c2a9e1b7d4c3a", "gw-17"
KEY = nacl.signing.SigningKey(b"d" * 32)
OTHER_KEY = nacl.signing.SigningKey(b"o" * 32)


def make_records(seqs) -> list[WireRecord]:
    """A mix of kinds: imu readings, an inference, a safety event and an aggregate."""
    now = time.time_ns()
    out = []
    for i, seq in enumerate(seqs):
        kind = ("imu", "imu", "inference", "safety-event", "agg:imu_1s")[i % 5]
        values = {"imu": {"ax": round(0.01 * i, 3), "az": 9.81},
                  "inference": {"model_version": "2026.11.1", "score": 0.5, "label": "normal",
                                "latency_us": 640},
                  "safety-event": {"type": "harsh_brake", "source": "rule"},
                  "agg:imu_1s": {"window_start": now, "window_end": now + 10**9, "count": 10},
                  }[kind]
        sensor = "model" if kind in ("inference", "safety-event") else "imu-1"
        out.append(WireRecord(seq, sensor, now + i * 10_000_000, kind,
                              json.dumps(values, separators=(",", ":"))))
    return out


def make_batch(seqs=range(10, 30, 2), *, key=KEY, device=DEVICE, body_device=None,
               seq_lo=None, seq_hi=None, count=None, raw=None, lane="P2",
               generation=GENERATION) -> SignedBatch:
    seqs = list(seqs)
    records = make_records(seqs)
    raw = encode(body_device or device, records) if raw is None else raw
    return seal(raw, key, gateway_id=GATEWAY, device_id=device, generation=generation,
                lane=lane, seq_lo=seq_lo or seqs[0], seq_hi=seq_hi or seqs[-1],
                count=count or len(records))


def post(url: str, batch: SignedBatch | None = None, *, headers=None, body=None,
         tls: dict | None = None) -> tuple[int, dict]:
    """POST with pycurl (the uplink's client); (status, JSON reply)."""
    headers = batch.http_headers() if headers is None else headers
    body = batch.body if body is None else body
    out = io.BytesIO()
    curl = pycurl.Curl()
    try:
        curl.setopt(pycurl.URL, url + PATH)
        curl.setopt(pycurl.POSTFIELDS, body)
        curl.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in headers.items()])
        curl.setopt(pycurl.WRITEDATA, out)
        curl.setopt(pycurl.TIMEOUT, 60)
        for option, value in (tls or {}).items():
            curl.setopt(getattr(pycurl, option), value)
        curl.perform()
        return curl.getinfo(pycurl.RESPONSE_CODE), json.loads(out.getvalue())
    finally:
        curl.close()


def get(url: str, path: str) -> int:
    curl = pycurl.Curl()
    try:
        curl.setopt(pycurl.URL, url + path)
        curl.setopt(pycurl.WRITEDATA, io.BytesIO())
        curl.perform()
        return curl.getinfo(pycurl.RESPONSE_CODE)
    finally:
        curl.close()


def table_counts(backend) -> dict[str, tuple[int, ...]]:
    """Per table: (count() FINAL, uniqExact key, count()); batches: (count(),)."""
    out = {}
    for table in RECORD_TABLES:
        out[table] = tuple(int(backend.query(sql, "TSV")) for sql in (
            f"SELECT count() FROM {table} FINAL",
            f"SELECT uniqExact(device_id, generation, seq) FROM {table}",
            f"SELECT count() FROM {table}"))
    out["batches"] = (int(backend.query("SELECT count() FROM batches", "TSV")),)
    return out


def nothing_stored(backend) -> bool:
    return all(sum(v) == 0 for v in table_counts(backend).values())


# ---- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def backend(chdb_backend):
    return chdb_backend


@pytest.fixture
def registry(tmp_path) -> DeviceRegistry:
    registry = DeviceRegistry(tmp_path / "devices")
    registry.register(DEVICE, KEY.verify_key.encode().hex())
    return registry


@pytest.fixture
def serve(backend, registry, tmp_path):
    """Start a receiver on a free loopback port in this process; stopped after the test."""
    running = []

    def start(**settings) -> ReceiverServer:
        settings = ReceiverSettings(port=0, devices_dir=str(registry.directory), **settings)
        server = ReceiverServer(settings, Receiver(backend, registry, settings.max_raw_bytes))
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        running.append((server, thread))
        return server

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join()


# ---- storing ------------------------------------------------------------------------------------
def test_a_signed_batch_is_stored_in_the_tables_of_its_kinds_and_acknowledged(serve, backend):
    server = serve()
    batch = make_batch(range(10, 30, 2))  # 10 records of P2; other lanes' seqs in between
    status, reply = post(server.url, batch)
    assert (status, reply) == (200, {"status": "ok", "device_id": DEVICE, "lane": "P2",
                                     "acked_seq_hi": 28, "watermark": 28})
    counts = table_counts(backend)
    assert counts == {"readings": (4, 4, 4), "inferences": (2, 2, 2),
                      "safety_events": (2, 2, 2), "aggregates": (2, 2, 2), "batches": (1,)}
    assert backend.query("SELECT DISTINCT device_id, generation, lane, gateway_id, batch_token "
                         "FROM readings", "TSV").split() == [
        DEVICE, GENERATION, "P2", GATEWAY, f"{DEVICE}:{GENERATION}:P2:10-28"]
    assert backend.query("SELECT signature, body_sha256 FROM batches", "TSV").split() == [
        batch.signature_hex, batch.header.body_sha256]


def test_a_replayed_batch_is_acknowledged_as_duplicate_and_stored_once(serve, backend):
    server = serve()
    batch = make_batch(range(1, 41))
    assert post(server.url, batch)[1]["status"] == "ok"
    status, reply = post(server.url, batch)
    assert (status, reply["status"], reply["acked_seq_hi"], reply["watermark"]) == \
        (200, "duplicate", 40, 40)
    # I5: count() FINAL == uniqExact(device_id, generation, seq) == records sent; and no
    # second copy even before a merge.
    counts = table_counts(backend)
    assert sum(counts[t][0] for t in RECORD_TABLES) == 40
    assert all(len(set(counts[t])) == 1 for t in RECORD_TABLES)
    assert counts["batches"] == (1,)


def test_the_watermark_is_the_highest_batch_of_the_lane(serve):
    server = serve()
    post(server.url, make_batch(range(50, 60)))
    status, reply = post(server.url, make_batch(range(10, 20)))  # an older batch, resent late
    assert (status, reply["acked_seq_hi"], reply["watermark"]) == (200, 19, 59)
    _, reply = post(server.url, make_batch(range(20, 25), lane="P1"))
    assert (reply["acked_seq_hi"], reply["watermark"]) == (24, 24)


def test_concurrent_batches_are_all_stored(serve, backend):
    server = serve()
    batches = [make_batch(range(lo, lo + 10)) for lo in range(1, 161, 20)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: post(server.url, b), batches + batches))
    assert all(status == 200 for status, _ in replies)
    assert sorted(r["status"] for _, r in replies).count("ok") >= len(batches)
    counts = table_counts(backend)
    assert sum(counts[t][2] for t in RECORD_TABLES) == 10 * len(batches)
    assert counts["batches"] == (len(batches),)


def test_a_device_registered_while_the_receiver_runs_is_accepted_at_once(serve, registry):
    server = serve()
    batch = make_batch(device="veh-002", key=OTHER_KEY)
    assert post(server.url, batch)[0] == 403
    registry.register("veh-002", OTHER_KEY.verify_key.encode().hex())
    assert post(server.url, batch)[0] == 200


# ---- refusals -----------------------------------------------------------------------------------
def _tampered(batch: SignedBatch) -> SignedBatch:
    body = bytearray(batch.body)
    body[len(body) // 2] ^= 0x01
    return SignedBatch(batch.header, batch.header_b64, batch.signature_hex, bytes(body))


def _unsigned_headers():
    return {"Content-Type": "application/octet-stream"}


REFUSALS = {
    "unsigned": (lambda: (None, _unsigned_headers(), make_batch().body), 400, "unsigned"),
    "no signature": (lambda: (None, {HEADER: make_batch().header_b64}, make_batch().body),
                     401, "bad or missing signature"),
    "wrong key": (lambda: (make_batch(key=OTHER_KEY), None, None), 401, "wrong key"),
    "tampered body": (lambda: (_tampered(make_batch()), None, None), 400, "sha256"),
    "unknown device": (lambda: (make_batch(device="veh-999", key=OTHER_KEY), None, None),
                       403, "unknown device"),
    "garbage body": (lambda: (make_batch(raw=os.urandom(300)), None, None), 400,
                     "not a valid fleetgw.cols/1"),
    "count differs": (lambda: (make_batch(count=9), None, None), 400, "announces 9"),
    "other device in body": (lambda: (make_batch(body_device="veh-002"), None, None), 400,
                             "body is for device 'veh-002'"),
    "seq beyond range": (lambda: (make_batch(seq_hi=20), None, None), 400, "outside"),
    "generation not an id": (lambda: (make_batch(generation="g 1"), None, None), 400,
                             "generation must be an identifier"),
    "EPHEMERAL lane": (lambda: (make_batch(lane="EPHEMERAL"), None, None), 400, "not synced"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_a_refused_batch_gets_its_status_and_reason_and_stores_nothing(case, serve, backend):
    build, want_status, want_reason = REFUSALS[case]
    batch, headers, body = build()
    status, reply = post(serve().url, batch, headers=headers, body=body)
    assert status == want_status, reply
    assert reply["status"] == "refused" and want_reason in reply["reason"], reply
    assert nothing_stored(backend)


def test_a_body_beyond_the_limit_is_refused_before_it_is_read(serve, backend):
    server = serve(max_body_bytes=4096)
    batch = make_batch(raw=os.urandom(50_000))  # incompressible: the body stays large
    status, reply = post(server.url, batch)
    assert (status, reply["status"]) == (413, "refused")
    assert "exceeds the limit of 4096" in reply["reason"]
    big = make_batch(raw=os.urandom(2 << 20))  # curl sends Expect: 100-continue beyond 1 MiB
    assert post(server.url, big)[0] == 413
    assert nothing_stored(backend)


def test_a_large_batch_is_stored_after_expect_100_continue(serve, backend):
    server = serve()
    now = time.time_ns()
    records = [WireRecord(seq, "cam-1", now + seq, "frame-meta",
                          json.dumps({"digest": os.urandom(64).hex()}))
               for seq in range(1, 20_001)]
    batch = seal(encode(DEVICE, records), KEY, gateway_id=GATEWAY, device_id=DEVICE,
                 generation=GENERATION, lane="P3", seq_lo=1, seq_hi=20_000, count=20_000)
    assert len(batch.body) > 1 << 20  # curl asks before sending a body beyond 1 MiB
    assert post(server.url, batch)[1]["status"] == "ok"
    assert table_counts(backend)["readings"] == (20_000, 20_000, 20_000)


def test_a_body_that_expands_beyond_the_limit_is_refused(serve, backend):
    server = serve(max_raw_bytes=1000)
    status, reply = post(server.url, make_batch(range(1, 200)))
    assert status == 413 and "exceeds the limit of 1000" in reply["reason"]
    assert nothing_stored(backend)


def test_a_broken_key_file_or_storage_is_a_retryable_error_not_a_refusal(serve, backend,
                                                                          registry):
    server = serve()
    (registry.directory / f"{DEVICE}.pub").write_text("not a key\n")
    status, reply = post(server.url, make_batch())
    assert status == 500 and "unusable key" in reply["reason"]
    assert nothing_stored(backend)
    registry.register(DEVICE, KEY.verify_key.encode().hex(), replace=True)
    backend.close()
    status, reply = post(server.url, make_batch())
    assert (status, reply["reason"]) == (503, "storage unavailable; retry later")


def test_health_answers_and_unknown_paths_do_not(serve):
    server = serve()
    assert get(server.url, HEALTH_PATH) == 200
    assert get(server.url, "/v1/other") == 404


def test_the_request_log_line_carries_the_outcome_but_no_key_material(serve, caplog):
    server = serve()
    batch = make_batch()
    with caplog.at_level("INFO", logger="fleetgw.central"):
        post(server.url, batch)
        post(server.url, make_batch(key=OTHER_KEY))
    lines = [r.getMessage() for r in caplog.records]
    assert any("status=200 result=ok" in line and f"device={DEVICE}" in line for line in lines)
    assert any("status=401 result=refused" in line for line in lines)
    key_hex = KEY.verify_key.encode().hex()
    assert not [line for line in lines if batch.signature_hex in line or key_hex in line]


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False),
                                                ("192.168.1.20", False)])
def test_only_loopback_counts_as_loopback(host, loopback):
    assert is_loopback(host) is loopback
    assert is_loopback(ReceiverSettings().host)  # I9: the default


# ---- the device registry and the config --------------------------------------------------------
def test_a_device_keeps_its_key_unless_re_keyed(registry):
    other = OTHER_KEY.verify_key.encode().hex()
    registry.register(DEVICE, KEY.verify_key.encode().hex())  # the same key: a no-op
    with pytest.raises(DeviceKeyError, match="registered with another key"):
        registry.register(DEVICE, other)
    assert registry.key(DEVICE) == KEY.verify_key
    registry.register(DEVICE, other, replace=True)
    assert registry.key(DEVICE) == OTHER_KEY.verify_key
    assert sorted(p.name for p in registry.directory.iterdir()) == [f"{DEVICE}.pub"]


@pytest.mark.parametrize("device_id", ["../veh-001", "a/b", ".hidden", "", "x" * 129])
def test_a_device_id_that_cannot_name_a_key_file_is_unknown(registry, device_id):
    assert registry.key(device_id) is None
    with pytest.raises(DeviceKeyError, match="device id"):
        registry.register(device_id, KEY.verify_key.encode().hex())


def test_the_example_config_loads_with_paths_from_its_directory():
    config = load_central_config(REPO / "central" / "example.toml")
    assert config.receiver.host == "127.0.0.1" and not config.receiver.tls
    assert config.receiver.devices_dir == str(REPO / "central" / "devices")
    assert config.backend.kind == "chdb"
    assert config.backend.path == str(REPO / "central" / "central.chdb")


@pytest.mark.parametrize(("text", "problem"), [
    ('[receiver]\ntls_cert = "a.crt"\n', "receiver.tls_key, tls_client_ca: must be set too"),
    ("[receiver]\nport = 80\n", "receiver.port: must be a TCP port in 1024..65535"),
    ('[receiver]\nport = "8443"\n', "receiver.port: expected an integer"),
    ("[backend]\nbogus = 1\n", "backend: unknown key(s) bogus"),
    ('[backend]\nkind = "http"\n', "backend.url: must be an http:// or https:// URL"),
    ('[backend]\nkind = "sqlite"\n', "backend.kind: must be one of chdb, http"),
    ('[backend]\npassword = "p"\npassword_env = "P"\n', "backend.password: and "
                                                         "password_env are exclusive"),
])
def test_a_bad_config_names_the_file_the_key_and_the_rule(tmp_path, text, problem):
    path = tmp_path / "central.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_central_config(path)
    assert f"{path}: {problem}" in str(caught.value)


# ---- HTTPS with client certificates -------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, key, issuer, issuer_key, extensions) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1)))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert, key) -> tuple[str, str]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture
def pki(tmp_path) -> dict[str, tuple[str, str]]:
    """A fleet CA, the receiver's certificate, a gateway's, and one from a rogue CA."""
    out = {}
    cas = {}
    for ca in ("fleet-ca", "rogue-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(ca, key, ca, key, [x509.BasicConstraints(ca=True, path_length=0)])
        cas[ca] = (cert, key)
        out[ca] = _write(tmp_path, ca, cert, key)
    for name, ca, extensions in (
            ("receiver", "fleet-ca", [x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])]),
            ("gateway", "fleet-ca", [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])]),
            ("intruder", "rogue-ca", [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])])):
        key = ec.generate_private_key(ec.SECP256R1())
        ca_cert, ca_key = cas[ca]
        out[name] = _write(tmp_path, name, _cert(name, key, ca, ca_key, extensions), key)
    return out


def test_https_stores_a_batch_only_from_a_client_with_a_fleet_certificate(serve, backend, pki,
                                                                          caplog):
    server = serve(tls_cert=pki["receiver"][0], tls_key=pki["receiver"][1],
                   tls_client_ca=pki["fleet-ca"][0])
    assert server.url.startswith("https://127.0.0.1:")
    trust = {"CAINFO": pki["fleet-ca"][0]}
    batch = make_batch()
    for client in ({}, {"SSLCERT": pki["intruder"][0], "SSLKEY": pki["intruder"][1]}):
        with pytest.raises(pycurl.error):  # the handshake fails: no request is ever read
            post(server.url, batch, tls={**trust, **client})
    assert nothing_stored(backend)
    gateway = {"SSLCERT": pki["gateway"][0], "SSLKEY": pki["gateway"][1]}
    with caplog.at_level("INFO", logger="fleetgw.central"):
        status, reply = post(server.url, batch, tls={**trust, **gateway})
    assert (status, reply["status"]) == (200, "ok")
    assert "cert=gateway" in caplog.records[-1].getMessage()


# ---- the command, in its own process ------------------------------------------------------------
def _fleetgw(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", "central", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_serve_runs_until_sigterm_and_query_waits_for_its_path(tmp_path):
    DeviceRegistry(tmp_path / "devices").register(DEVICE, KEY.verify_key.encode().hex())
    config = tmp_path / "central.toml"
    config.write_text('[receiver]\nport = 0\ndevices_dir = "devices"\n'
                      '[backend]\nkind = "chdb"\npath = "store.chdb"\n')
    stderr = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "central", "serve",
                             "--config", str(config)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    try:
        first = proc.stdout.readline()
        match = re.search(r"receiving on (http://127\.0\.0\.1:\d+)/v1/batches", first)
        assert match, first + (tmp_path / "serve.log").read_text()
        url = match.group(1)
        assert get(url, HEALTH_PATH) == 200
        assert post(url, make_batch(range(1, 11)))[1]["status"] == "ok"
        busy = _fleetgw("query", "SELECT 1", "--config", str(config))
        assert busy.returncode == 1 and "in use by another process" in busy.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        stderr.close()
    assert proc.returncode == 0 and "stopped" in out
    log = (tmp_path / "serve.log").read_text()
    assert "event=request" in log and "status=200 result=ok" in log
    done = _fleetgw("query", "SELECT count() FROM readings FINAL", "--config", str(config),
                    "--format", "TSV")
    assert (done.returncode, done.stdout) == (0, "4\n")


def test_a_client_resetting_its_connection_is_one_log_line_not_a_traceback(serve, caplog,
                                                                           capsys):
    server = serve()
    host, port = server.server_address[:2]
    with caplog.at_level(logging.INFO, logger="fleetgw.central"):
        sock = socket.create_connection((host, port))
        sock.sendall(b"POST /v1/batches HTTP/1.1\r\nContent-Len")  # cut mid-request
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST: the link dropped
        deadline = time.monotonic() + 30
        while "connection-dropped" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "event=connection-dropped" in caplog.text
    assert "Traceback" not in capsys.readouterr().err + caplog.text
    assert get(server.url, "/v1/health") == 200  # and it keeps serving
