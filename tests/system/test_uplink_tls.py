"""The uplink over mTLS in a running gateway, set up the way an operator sets it up: the real
`fleetgw provision ca|server|device` commands make the fleet CA, the receiver's certificate and
the device's key and client certificate, a real receiver process serves HTTPS with required
client certificates (storing in chdb), and the gateway syncs everything to it (I5). A gateway
whose certificate another CA issued is refused by the handshake alone (its signing key is
registered) and keeps its data, until it is issued a certificate by the fleet CA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from tests.system.harness import ROOT, free_port, wait_for
from tests.system.test_uplink import (
    DEVICE,
    drain,
    reconcile,
    start_gateway,
    sync_counts,
    uplink_figures,
)
from tools.central_process import CentralProcess

pytestmark = pytest.mark.system
pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")

#: The health check's own client identity, so the receiver's log tells it from the gateway.
PROBE = "probe"


def provision(*args: str | Path) -> str:
    """Run `fleetgw provision ...`; its output (it must succeed)."""
    result = subprocess.run([sys.executable, "-m", "tools.cli", "provision", *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@attrs.frozen
class Fleet:
    """A provisioned fleet in ``tmp_path``: its CA, and a TLS receiver (not yet started)
    whose devices directory `provision device --devices-dir` registers into."""

    ca_dir: Path
    central: CentralProcess
    #: The gateway's default keys dir (DATA_DIR/keys of make_gateway's "gw").
    keys_dir: Path

    def provision_device(self, ca_dir: Path, *extra: str) -> None:
        provision("device", "--id", DEVICE, "--ca", ca_dir, "--out", self.keys_dir,
                  "--devices-dir", self.central.devices.directory, *extra)


@pytest.fixture
def fleet(tmp_path):
    ca_dir, server_dir, probe_dir = tmp_path / "ca", tmp_path / "receiver", tmp_path / "probe"
    provision("ca", "--dir", ca_dir)
    provision("server", "--ca", ca_dir, "--out", server_dir, "--host", "127.0.0.1")
    provision("device", "--id", PROBE, "--ca", ca_dir, "--out", probe_dir)  # not registered
    central = CentralProcess(
        tmp_path / "central", free_port(),
        tls=(server_dir / "receiver.crt", server_dir / "receiver.key", server_dir / "ca.crt"),
        probe=(probe_dir / f"{PROBE}.crt", probe_dir / f"{PROBE}.key", probe_dir / "ca.crt"))
    yield Fleet(ca_dir, central, tmp_path / "gw" / "data" / "keys")
    central.kill()


def with_mtls(make_gateway, cert: Path, key: Path, ca: Path):
    """``make_gateway`` whose [uplink] also names the client certificate, its key and the CA
    that signed the receiver's certificate (for test_uplink's start_gateway and drain)."""
    tls = {"tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ca)}

    def make(**sections):
        return make_gateway(**{**sections, "uplink": {**sections["uplink"], **tls}})

    return make


def batch_lines(central: CentralProcess) -> list[str]:
    return [line for line in central.output().splitlines() if "path=/v1/batches" in line]


def test_a_provisioned_gateway_syncs_everything_over_mtls(make_gateway, fleet):
    fleet.provision_device(fleet.ca_dir)
    central = fleet.central.start()
    assert central.url.startswith("https://127.0.0.1:")
    keys = fleet.keys_dir
    mtls = with_mtls(make_gateway, keys / f"{DEVICE}.crt", keys / f"{DEVICE}.key",
                     keys / "ca.crt")
    gw = start_gateway(mtls, central)
    wait_for(lambda: sync_counts(gw)[1] > 500, 60, "records synced over mTLS")
    drain(mtls, central, gw)
    central.stop()

    # Every batch came over a handshake that verified the device's certificate.
    lines = batch_lines(central)
    assert lines and all(f"cert={DEVICE}" in line for line in lines), lines[:3]
    assert "event=tls-refused" not in central.output()
    (row,) = reconcile(gw, central)
    assert row["synced"] > 500 and row["unsynced"] == 0, row
    assert row["central_final"] == row["central_unique"] == row["synced"], row
    assert row["ok"], row


def test_a_certificate_from_another_ca_is_refused_and_the_data_waits_for_a_good_one(
        make_gateway, fleet, tmp_path):
    rogue_ca = tmp_path / "rogue-ca"
    provision("ca", "--dir", rogue_ca)
    # Its signing key is registered: only the handshake can refuse this gateway.
    fleet.provision_device(rogue_ca)
    central = fleet.central.start()
    keys = fleet.keys_dir
    # The gateway trusts the fleet CA (the receiver is genuine); its own certificate is not
    # the fleet's. The same paths serve both runs below.
    mtls = with_mtls(make_gateway, keys / f"{DEVICE}.crt", keys / f"{DEVICE}.key",
                     fleet.ca_dir / "ca.crt")
    gw = start_gateway(mtls, central)
    wait_for(lambda: uplink_figures(gw)["failures"] >= 2 and sync_counts(gw)[0] > 500, 60,
             "refused handshakes")
    figures = uplink_figures(gw)
    assert figures["acked"] == 0 and "curl error" in figures["last_problem"], figures
    syncable, synced = sync_counts(gw)
    assert synced == 0
    # It keeps trying, and the journal keeps everything meanwhile.
    wait_for(lambda: uplink_figures(gw)["failures"] > figures["failures"]
             and sync_counts(gw)[0] > syncable, 30, "more refused tries while records grow")
    assert sync_counts(gw)[1] == 0
    assert "event=tls-refused" in central.output()
    assert batch_lines(central) == []  # no request got past the handshake

    # The operator issues the device a certificate from the fleet CA (a new key: re-keyed,
    # registered again), and restarts the gateway on the same config.
    assert gw.terminate() == 0, gw.output()[-3000:]
    fleet.provision_device(fleet.ca_dir, "--replace")
    gw = start_gateway(mtls, central)
    wait_for(lambda: sync_counts(gw)[1] > syncable, 60, "sync with the fleet's certificate")
    drain(mtls, central, gw)
    central.stop()

    assert all(f"cert={DEVICE}" in line for line in batch_lines(central))
    (row,) = reconcile(gw, central)
    assert row["synced"] > syncable and row["unsynced"] == 0, row
    assert row["central_final"] == row["central_unique"] == row["synced"], row
    assert row["ok"], row
