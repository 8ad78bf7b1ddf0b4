"""The receiver's own metrics, over real HTTP(S), real signatures and embedded chdb: a stored
batch counts its batch, rows by table and bytes; a replay counts as a duplicate and leaves the
rows alone; every refusal the receiver can be made to give is counted under its fixed code;
old event times show as late rows and in the ingest delay histogram; ``GET /metrics`` serves
it all as parseable Prometheus text (with TLS, only to a fleet client certificate). Also:
``receiver.late_after_s`` in the config, and that receivers in one process count apart."""

from __future__ import annotations

import base64
import http.client
import io
import os
import time

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.uplink.envelope import SignedBatch, seal
from actors.uplink.wire import WireRecord, encode
from central.config import load_central_config
from central.metrics import CONTENT_TYPE, DELAY_BUCKETS_S, REFUSALS, ReceiverMetrics
from central.receiver import METRICS_PATH, Receiver
from config.loader import ConfigError
from tests.central import test_receiver
from tests.central.test_receiver import (
    DEVICE,
    GATEWAY,
    GENERATION,
    KEY,
    OTHER_KEY,
    make_batch,
    post,
    pycurl,
)

# test_receiver's fixtures, shared: a chdb backend, a registry with DEVICE, a server factory,
# and a fleet CA with certificates
backend, registry, serve, pki = (test_receiver.backend, test_receiver.registry,
                                 test_receiver.serve, test_receiver.pki)
REFUSAL_CASES = test_receiver.REFUSALS

P = "fleetgw_receiver_"
HOUR_NS, DAY_NS = 3600 * 10**9, 86400 * 10**9
#: The code each refusal case of test_receiver is counted under.
CASE_CODES = {
    "unsigned": "bad_header", "no signature": "bad_signature", "wrong key": "bad_signature",
    "tampered body": "bad_body", "unknown device": "unknown_device", "garbage body": "bad_body",
    "count differs": "bad_body", "other device in body": "bad_body",
    "seq beyond range": "bad_body", "generation not an id": "bad_header",
    "EPHEMERAL lane": "bad_header",
}


def scrape(url: str, tls: dict | None = None) -> dict[tuple[str, tuple], float]:
    """GET /metrics; every sample as {(name, sorted labels): value}."""
    out = io.BytesIO()
    curl = pycurl.Curl()
    try:
        curl.setopt(pycurl.URL, url + METRICS_PATH)
        curl.setopt(pycurl.WRITEDATA, out)
        curl.setopt(pycurl.TIMEOUT, 60)
        for option, value in (tls or {}).items():
            curl.setopt(getattr(pycurl, option), value)
        curl.perform()
        assert curl.getinfo(pycurl.RESPONSE_CODE) == 200
        assert curl.getinfo(pycurl.CONTENT_TYPE) == CONTENT_TYPE
    finally:
        curl.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(out.getvalue().decode())
            for s in family.samples}


def sample(metrics: ReceiverMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(P + name, labels)
    assert value is not None, (name, labels)
    return value


def refusals(metrics: ReceiverMetrics) -> dict[str, float]:
    return {code: sample(metrics, "refused_total", reason=code) for code in REFUSALS}


def old_batch(ages_ns: list[int], seq_lo: int = 1) -> SignedBatch:
    """imu readings whose event times are ``ages_ns`` before now (negative: in the future)."""
    now = time.time_ns()
    records = [WireRecord(seq_lo + i, "imu-1", now - age, "imu", '{"ax":0.1}')
               for i, age in enumerate(ages_ns)]
    return seal(encode(DEVICE, records), KEY, gateway_id=GATEWAY, device_id=DEVICE,
                generation=GENERATION, lane="P3", seq_lo=seq_lo,
                seq_hi=seq_lo + len(records) - 1, count=len(records))


# ---- stored and duplicate -------------------------------------------------------------------------
def test_a_stored_batch_counts_batch_rows_and_bytes_and_a_replay_counts_as_duplicate(serve):
    server = serve()
    before = time.time()
    batch = make_batch(range(10, 30, 2))  # 10 records: 4 readings, 2 of each other table
    assert post(server.url, batch)[1]["status"] == "ok"
    after = time.time()
    got = scrape(server.url)
    rows = {"readings": 4, "inferences": 2, "safety_events": 2, "aggregates": 2}
    assert {t: got[P + "rows_total", (("table", t),)] for t in rows} == rows
    assert got[P + "batches_total", (("lane", "P2"), ("outcome", "stored"))] == 1
    assert got[P + "batches_total", (("lane", "P2"), ("outcome", "duplicate"))] == 0
    assert got[P + "bytes_total", ()] == len(batch.body)
    assert got[P + "devices_seen", ()] == 1
    assert before <= got[P + "last_batch_timestamp_seconds", ()] <= after
    assert got[P + "late_rows_total", ()] == 0
    assert got[P + "ingest_delay_seconds_count", ()] == 10

    assert post(server.url, batch)[1]["status"] == "duplicate"
    again = scrape(server.url)
    assert again[P + "batches_total", (("lane", "P2"), ("outcome", "duplicate"))] == 1
    assert again[P + "batches_total", (("lane", "P2"), ("outcome", "stored"))] == 1
    assert again[P + "duplicate_rows_total", ()] == 10
    assert {t: again[P + "rows_total", (("table", t),)] for t in rows} == rows
    assert again[P + "ingest_delay_seconds_count", ()] == 10  # a duplicate stores no rows
    assert again[P + "bytes_total", ()] == 2 * len(batch.body)
    assert again[P + "devices_seen", ()] == 1
    assert sum(v for (name, _), v in again.items() if name == P + "refused_total") == 0


def test_devices_seen_counts_distinct_devices_and_not_refused_ones(serve, registry):
    server = serve()
    registry.register("veh-002", OTHER_KEY.verify_key.encode().hex())
    post(server.url, make_batch(range(1, 11)))
    post(server.url, make_batch(range(1, 11), device="veh-002", key=OTHER_KEY))
    post(server.url, make_batch(range(11, 21)))
    post(server.url, make_batch(device="veh-999", key=OTHER_KEY))  # unknown: refused
    metrics = server.receiver.metrics
    assert sample(metrics, "devices_seen") == 2
    assert sample(metrics, "batches_total", lane="P2", outcome="stored") == 3


# ---- late data -----------------------------------------------------------------------------------
def test_old_event_times_are_late_rows_and_fill_the_delay_histogram(serve):
    server = serve()  # late_after_s: the default, 300 s
    ages = [-60 * 10**9, 0, 400 * 10**9, 5000 * 10**9, 3 * DAY_NS, 30 * DAY_NS]
    assert post(server.url, old_batch(ages))[1]["status"] == "ok"
    got = scrape(server.url)
    assert got[P + "late_rows_total", ()] == 4
    assert got[P + "rows_total", (("table", "readings"),)] == 6
    buckets = {le: got[P + "ingest_delay_seconds_bucket", (("le", le),)]
               for le in ("1.0", "300.0", "600.0", "7200.0", "604800.0", "+Inf")}
    # cumulative; the future row counts as 0 s, the fresh one took well under 300 s
    assert buckets.pop("1.0") in (1, 2)
    assert buckets == {"300.0": 2, "600.0": 3, "7200.0": 4, "604800.0": 5, "+Inf": 6}
    assert got[P + "ingest_delay_seconds_count", ()] == 6
    expected_s = 400 + 5000 + 33 * 86400
    assert expected_s <= got[P + "ingest_delay_seconds_sum", ()] <= expected_s + 300
    assert len([k for k in got if k[0] == P + "ingest_delay_seconds_bucket"]) == \
        len(DELAY_BUCKETS_S) + 1


def test_late_after_s_of_the_metrics_decides_what_is_late(backend, registry):
    receiver = Receiver(backend, registry, 1 << 20, ReceiverMetrics(late_after_s=30))
    batch = old_batch([10 * 10**9, 120 * 10**9, 2 * HOUR_NS])
    reply = receiver.accept(batch.header_b64, batch.signature_hex, batch.body)
    assert reply.body["status"] == "ok"
    assert sample(receiver.metrics, "late_rows_total") == 2


def test_receivers_in_one_process_count_apart():
    first, second = ReceiverMetrics(), ReceiverMetrics()  # no clash in a shared registry
    first.refused("storage")
    assert refusals(first)["storage"] == 1 and refusals(second)["storage"] == 0
    with pytest.raises(KeyError):
        first.refused("anything else")  # the label set is fixed


# ---- refusals ------------------------------------------------------------------------------------
def test_every_batch_refusal_is_counted_under_its_code(serve):
    assert set(CASE_CODES) == set(REFUSAL_CASES), "classify the new refusal case here"
    server = serve()
    metrics = server.receiver.metrics
    for case, code in CASE_CODES.items():
        before = refusals(metrics)
        batch, headers, body = REFUSAL_CASES[case][0]()
        assert post(server.url, batch, headers=headers, body=body)[1]["status"] == "refused"
        after = refusals(metrics)
        assert {c: after[c] - before[c] for c in REFUSALS if after[c] != before[c]} == \
            {code: 1}, case
    got = scrape(server.url)
    for code in set(CASE_CODES.values()):
        assert got[P + "refused_total", (("reason", code),)] == \
            list(CASE_CODES.values()).count(code)
    assert got[P + "batches_total", (("lane", "P2"), ("outcome", "stored"))] == 0


def test_refusals_of_size_length_encoding_and_conflict_are_counted(serve):
    server = serve(max_body_bytes=4096, max_raw_bytes=100_000)
    assert post(server.url, make_batch(raw=os.urandom(50_000)))[0] == 413  # refused unread
    expands = make_batch(raw=bytes(200_000))  # a small body, announced to expand too far
    assert len(expands.body) < 4096 and post(server.url, expands)[0] == 413
    header = attrs.evolve(make_batch().header, compression="lz4")
    b64 = base64.urlsafe_b64encode(header.to_bytes()).decode()
    unsupported = SignedBatch(header, b64, "00" * 64, b"x")
    assert post(server.url, unsupported)[0] == 415
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:  # no Content-Length
        connection.putrequest("POST", "/v1/batches")
        connection.endheaders()
        assert connection.getresponse().status == 411
    finally:
        connection.close()
    assert post(server.url, old_batch([0] * 10))[0] == 200
    assert post(server.url, old_batch([10**9] * 10))[0] == 409  # same identity, other body
    counts = refusals(server.receiver.metrics)
    assert {code: n for code, n in counts.items() if n} == {
        "too_large": 2, "unsupported_encoding": 1, "length_required": 1, "conflict": 1}


def test_a_broken_key_file_and_storage_failing_are_counted(serve, backend, registry):
    server = serve()
    (registry.directory / f"{DEVICE}.pub").write_text("not a key\n")
    assert post(server.url, make_batch())[0] == 500
    registry.register(DEVICE, KEY.verify_key.encode().hex(), replace=True)
    backend.close()
    assert post(server.url, make_batch())[0] == 503
    got = scrape(server.url)
    assert got[P + "refused_total", (("reason", "device_key"),)] == 1
    assert got[P + "refused_total", (("reason", "storage"),)] == 1


def test_a_refusal_log_line_names_its_code(serve, caplog):
    server = serve()
    with caplog.at_level("INFO", logger="fleetgw.central"):
        post(server.url, make_batch(key=OTHER_KEY))
    assert "status=401 result=refused refusal=bad_signature reason=" in caplog.text


# ---- the endpoint --------------------------------------------------------------------------------
def test_the_metrics_endpoint_serves_every_metric_before_any_batch(serve):
    got = scrape(serve().url)
    names = {name for name, _ in got}
    for name in ("batches_total", "rows_total", "duplicate_rows_total", "refused_total",
                 "bytes_total", "late_rows_total", "last_batch_timestamp_seconds",
                 "devices_seen", "ingest_delay_seconds_count"):
        assert P + name in names, name
    assert {dict(labels)["reason"] for name, labels in got
            if name == P + "refused_total"} == set(REFUSALS)
    assert all(value == 0 for (name, _), value in got.items()
               if name.startswith(P) and not name.endswith("_created"))
    assert not any("device" in key for _, labels in got for key, _ in labels)


def test_over_https_the_metrics_need_a_fleet_client_certificate(serve, pki):
    server = serve(tls_cert=pki["receiver"][0], tls_key=pki["receiver"][1],
                   tls_client_ca=pki["fleet-ca"][0])
    trust = {"CAINFO": pki["fleet-ca"][0]}
    with pytest.raises(pycurl.error):
        scrape(server.url, trust)
    gateway = {"SSLCERT": pki["gateway"][0], "SSLKEY": pki["gateway"][1]}
    assert post(server.url, make_batch(), tls={**trust, **gateway})[0] == 200
    got = scrape(server.url, {**trust, **gateway})
    assert got[P + "batches_total", (("lane", "P2"), ("outcome", "stored"))] == 1


# ---- the config ----------------------------------------------------------------------------------
def test_late_after_s_is_read_from_the_config(tmp_path):
    path = tmp_path / "central.toml"
    path.write_text("[receiver]\nlate_after_s = 60\n")
    assert load_central_config(path).receiver.late_after_s == 60.0


@pytest.mark.parametrize("value", ["0", "-5.0", "nan", "inf"])
def test_a_bad_late_after_s_names_the_key_and_the_rule(tmp_path, value):
    path = tmp_path / "central.toml"
    path.write_text(f"[receiver]\nlate_after_s = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_central_config(path)
    assert (f"{path}: receiver.late_after_s: must be a finite number of seconds > 0"
            in str(caught.value))


def test_a_late_after_s_that_is_not_a_number_is_refused(tmp_path):
    path = tmp_path / "central.toml"
    path.write_text('[receiver]\nlate_after_s = "5m"\n')
    with pytest.raises(ConfigError, match="receiver.late_after_s: expected a number"):
        load_central_config(path)
