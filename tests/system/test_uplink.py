"""The uplink in a running gateway, against a real receiver process storing in chdb: every
record the journal marks synced is in central exactly once (I5) — through a receiver outage
under load, repeated SIGKILLs of the uplink (often in the middle of a POST) and of the receiver
(in the middle of a request), and link cuts (a real TCP proxy plays the link); a refused device keeps its data until it is registered."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import nacl.signing
import pytest

from tests.system.harness import ROOT, free_port, wait_for
from tools.central_process import CentralProcess, write_device_key
from tools.link_proxy import LinkProxy

pytestmark = pytest.mark.system
pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")

DEVICE = "veh-001"


def uplink_section(central: CentralProcess, **overrides) -> dict:
    return {"url": central.url, "p2_linger_s": 0.2, "p3_linger_s": 0.5, "max_records": 400,
            "backoff_base_s": 0.2, "backoff_cap_s": 2.0, "poll_s": 0.2,
            "total_timeout_s": 15.0, **overrides}


def start_gateway(make_gateway, central: CentralProcess, sensors=None, **uplink):
    return make_gateway(sensors=sensors, model={"enabled": False},
                        uplink=uplink_section(central, **uplink)).start()


def uplink_figures(gw) -> dict:
    return gw.node("uplink")["figures"]


def sync_counts(gw) -> tuple[int, int]:
    """(syncable, synced) over the journal, read directly."""
    from actors.journal.reader import JournalReader

    with JournalReader(gw.journal_path) as reader:
        counts = reader.sync_counts().get(DEVICE, (0, 0, None))
    return counts[0], counts[1]


def drain(make_gateway, central: CentralProcess, gw) -> None:
    """Stop ``gw`` and run its data dir again without sensors until everything is synced."""
    assert gw.terminate() == 0, gw.output()[-3000:]
    drainer = start_gateway(make_gateway, central, sensors=[])
    wait_for(lambda: (lambda c: c[0] == c[1])(sync_counts(drainer)), 120,
             "the uplink to sync the whole journal")
    assert drainer.terminate() == 0, drainer.output()[-3000:]


def reconcile(gw, central: CentralProcess) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "reconcile", "--data-dir", gw.data_dir,
         "--central-config", str(central.config_path), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def central(tmp_path):
    receiver = CentralProcess(tmp_path / "central", free_port())
    yield receiver
    receiver.kill()


@pytest.fixture
def device_key(tmp_path) -> nacl.signing.SigningKey:
    key = nacl.signing.SigningKey.generate()
    write_device_key(tmp_path / "gw" / "data" / "keys", DEVICE, key)
    return key


def test_outage_and_sigkills_of_uplink_and_receiver_keep_i5(make_gateway, central, device_key):
    central.register(DEVICE, device_key)
    link = LinkProxy(("127.0.0.1", central.port))
    try:
        gw = start_gateway(make_gateway, central, url=link.url)
        # The receiver is down: data piles up in the journal, the uplink keeps trying.
        wait_for(lambda: uplink_figures(gw)["failures"] >= 2 and gw.records() > 1500, 90,
                 "failed sends while the receiver is down")
        assert sync_counts(gw)[1] == 0
        central.start()
        wait_for(lambda: uplink_figures(gw)["synced_records"] > 0, 60,
                 "the first acknowledged batch")

        uplink_kills = 0
        for round_no in range(7):
            before = sync_counts(gw)[1]
            if round_no % 3 == 0:
                # Central stores a batch, its answer is held on the link, and the uplink is
                # SIGKILLed: the restarted uplink must resend that very batch (a duplicate).
                link.hold_answers()
                wait_for(link.answer_held.is_set, 60, "an answer held on the link")
                pid = gw.node("uplink")["pid"]
                os.kill(pid, signal.SIGKILL)
                link.restore()
                uplink_kills += 1
                wait_for(lambda p=pid: gw.node("uplink")["pid"] not in (None, p)
                         and gw.node("uplink")["state"] == "running", 60, "the uplink's restart")
            elif round_no % 3 == 1:
                # The receiver is SIGKILLed while a request is in it (often mid-insert).
                link.request_forwarded.clear()
                wait_for(link.request_forwarded.is_set, 60, "a request reaching the receiver")
                central.kill()
                central.start()
            else:  # the link is cut for a while
                failures = uplink_figures(gw)["failures"]
                link.cut()
                wait_for(lambda f=failures: uplink_figures(gw)["failures"] > f, 60,
                         "a failed send on the cut link")
                link.restore()
            wait_for(lambda b=before: sync_counts(gw)[1] > b, 60, "sync to go on")

        drain(make_gateway, central, gw)
    finally:
        link.close()
    central.stop()
    # Every held answer's batch was stored and then resent by the restarted uplink.
    assert central.output().count("result=duplicate") >= uplink_kills
    (row,) = reconcile(gw, central)
    assert row["syncable"] > 1500 and row["unsynced"] == 0, row
    assert row["central_final"] == row["central_unique"] == row["synced"], row
    assert row["ok"], row


def test_refused_device_keeps_its_data_until_registered(make_gateway, central, device_key):
    wrong = nacl.signing.SigningKey.generate()
    central.register(DEVICE, wrong)  # registered with another key: every batch is 401
    central.start()
    gw = start_gateway(make_gateway, central)
    wait_for(lambda: uplink_figures(gw)["failures"] >= 2 and gw.records() > 500, 60,
             "refused sends")
    figures = uplink_figures(gw)
    assert figures["acked"] == 0 and "401" in figures["last_problem"], figures
    assert sync_counts(gw)[1] == 0  # nothing acknowledged: the journal keeps everything
    assert "result=refused" in central.output()

    central.register(DEVICE, device_key, replace=True)  # the operator fixes the registration
    wait_for(lambda: sync_counts(gw)[1] > 500, 60, "sync once the device is registered")
    drain(make_gateway, central, gw)
    central.stop()
    (row,) = reconcile(gw, central)
    assert row["ok"] and row["unsynced"] == 0, row


def test_gateway_without_a_device_key_says_how_to_make_one(make_gateway, central):
    central.start()
    gw = start_gateway(make_gateway, central)
    waiting = wait_for(lambda: (w := uplink_figures(gw)["waiting"]) != "starting"
                       and "signing key" in w and w, 60, "the missing key to be reported")
    assert "fleetgw provision device --id veh-001" in waiting
    assert sync_counts(gw)[1] == 0


def test_a_newer_model_comes_over_the_air_and_is_served(make_gateway, tmp_path, device_key):
    from actors.model_runner.actor import shipped_model_dir
    from actors.model_runner.manifest import DEFAULT_TRUSTED_KEYS, generate_key
    from tests.system.test_model_runner import resigned_copy

    keys = tmp_path / "trusted"
    keys.mkdir()
    shutil.copy(DEFAULT_TRUSTED_KEYS / "fleetgw-release.pub", keys)
    generate_key(tmp_path / "release.key")
    shutil.copy(tmp_path / "release.key.pub", keys / "test.pub")
    central = CentralProcess(tmp_path / "central", free_port(),
                             '[models]\ndirectory = "models"\n')
    resigned_copy(shipped_model_dir(), str(central.directory / "models" / "2099.1.1"),
                  "2099.1.1", str(tmp_path / "release.key"))
    central.register(DEVICE, device_key)
    central.start()
    try:
        gw = make_gateway(model={"trusted_keys": str(keys), "check_s": 0.5},
                          uplink=uplink_section(central, model_check_s=1.0)).start()
        wait_for(lambda: gw.node("model")["figures"]["model"] == "2099.1.1", 120,
                 "the model runner to serve the model fetched over the air")
        assert uplink_figures(gw)["models_installed"] == 1
        assert "GET /v1/models/2099.1.1/model.bin" in central.output().replace(
            "method=GET path=", "GET ")
    finally:
        central.kill()


def test_direct_mode_syncs_into_clickhouse_server(make_gateway, clickhouse, clickhouse_db):
    """No receiver: the gateway inserts straight into a ClickHouse server (Debian's 18.16 in
    CI), which holds every synced record once under FINAL."""
    gw = make_gateway(model={"enabled": False}, uplink={
        "mode": "direct", "url": clickhouse.url, "database": clickhouse_db,
        "p2_linger_s": 0.2, "p3_linger_s": 0.5, "poll_s": 0.2}).start()
    wait_for(lambda: sync_counts(gw)[1] > 500, 90, "records synced into ClickHouse")
    assert gw.terminate() == 0, gw.output()[-3000:]
    synced = sync_counts(gw)[1]
    tables = ("readings", "inferences", "safety_events", "aggregates")
    final = sum(int(clickhouse.query(f"SELECT count() FROM {clickhouse_db}.{t} FINAL "
                                     f"WHERE device_id = '{DEVICE}'")) for t in tables)
    unique = sum(int(clickhouse.query(
        f"SELECT uniqExact(generation, seq) FROM {clickhouse_db}.{t} "
        f"WHERE device_id = '{DEVICE}'")) for t in tables)
    # Central may hold a batch whose acknowledgement the stop cut off; never less.
    assert final == unique >= synced > 500


def test_an_orderly_stop_finishes_the_post_in_flight(make_gateway, central, device_key):
    """SIGTERM while a POST is in flight: the uplink waits for the answer and records the
    watermark, so right after the stop central holds exactly what the journal marks synced."""
    central.register(DEVICE, device_key)
    central.start()
    link = LinkProxy(("127.0.0.1", central.port))
    try:
        gw = start_gateway(make_gateway, central, url=link.url)
        wait_for(lambda: sync_counts(gw)[1] > 200, 60, "records synced")
        link.answer_delay_s = 1.0  # every answer comes a second late
        link.request_forwarded.clear()
        wait_for(link.request_forwarded.is_set, 30, "a POST on its way")
        assert gw.terminate() == 0, gw.output()[-3000:]
    finally:
        link.close()
    central.stop()
    (row,) = reconcile(gw, central)
    assert row["central_final"] == row["central_unique"] == row["synced"] > 200, row
