"""`make demo` (`fleetgw demo`) works end to end and ends with I5 holding: short phases, the
real provisioning, HTTPS receiver, gateway, link cut and reconciliation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.system.harness import ROOT

pytestmark = pytest.mark.system
pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")


def test_the_demo_cuts_the_link_and_reconciles(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "demo", "--data-dir", str(tmp_path),
         "--up-s", "4", "--cut-s", "4", "--after-s", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "LINK CUT" in out and "link restored" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("veh-001"))
    journaled, syncable, synced, final, raw, duplicates, unsynced = map(int, row[1:8])
    assert syncable > 100 and synced == syncable == final and unsynced == 0, out[-3000:]
    assert raw - duplicates == final and row[-1] == "ok"
    assert "I5 holds" in out
    if "real sources too" in out:  # mosquitto is installed: MQTT, CAN and NMEA ran too
        per_sensor = next(line for line in out.splitlines() if "journaled per sensor:" in line)
        counts = dict(item.rsplit(" ", 1) for item in
                      per_sensor.split("journaled per sensor: ", 1)[1].split(", "))
        for sensor in ("cabin-mqtt", "can0", "gnss0"):
            assert int(counts.get(sensor, 0)) > 0, per_sensor


def test_the_demo_runs_real_sources_when_mosquitto_is_installed(tmp_path):
    from actors.broker.launcher import BrokerError, find_binary

    try:
        find_binary("mosquitto")
    except BrokerError:
        pytest.skip("mosquitto is not installed: the demo runs on the simulator alone")
    from tools.demo import sources_config

    text, ports = sources_config()
    assert str(ports["broker"]) in text and 'type = "mqtt"' in text and 'type = "can"' in text
