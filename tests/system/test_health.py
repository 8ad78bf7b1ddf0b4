"""`fleetgw health` against real gateways: the rollout gate (deploy/ROLLOUT.md).

One gateway with sensors, the model runner and an uplink to a real receiver (chdb) serves the
module: it is healthy (every check, the model's self-test included); an actor that stops
answering (SIGSTOP; the watchdog is set too slow to kill it) makes it unhealthy and is named,
and healthy again once resumed; a receiver that is down is not unhealthy, one that refuses the
gateway's batches is. A second gateway, without uplink or model, has its data dir on a real
small disk: filled until the journal refuses appends, journal_writable fails; freed, `--wait`
sees it healthy again. With no gateway on the port the command exits 2 and says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import nacl.signing
import pytest

from tests.system.conftest import DEMO_SENSORS
from tests.system.harness import ROOT, GatewayUnderTest, free_port, wait_for
from tools.harness.disk import DiskError, SmallDisk
from tools.health_checks import CHECKS

pytestmark = pytest.mark.system

DEVICE = "veh-001"
#: The watchdog would SIGKILL a stopped actor after this long: far beyond what a test waits,
#: so "stopped and not answering" stays that until the test resumes it.
SLOW_WATCHDOG_S = 120.0
#: The shipped model's version (what the runner installs and serves at first start).
SHIPPED_MODEL = Path(ROOT, "models", "DEFAULT").read_text().strip()


def health(port: int, *args: str, timeout: float = 180) -> tuple[int, dict | None, str]:
    """Run `fleetgw health --json`: exit status, the parsed object, stderr."""
    done = subprocess.run([sys.executable, "-m", "tools.cli", "health", "--admin-port",
                           str(port), "--json", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = None
    return done.returncode, report, done.stderr


def failing(port: int, check: str, because: str = ""):
    """A predicate for wait_for: the report once ``check`` fails (exit 1) with ``because`` in
    its reason, else None."""
    def probe() -> dict | None:
        code, report, _ = health(port)
        if code == 1 and report and not report["checks"][check]["ok"] \
                and because in report["checks"][check]["reason"]:
            return report
        return None
    return probe


@pytest.fixture(scope="module")
def central(tmp_path_factory):
    pytest.importorskip("chdb", reason="chdb is the central extra: pip install "
                                       "'fleetgw[central]'")
    from tools.central_process import CentralProcess

    receiver = CentralProcess(tmp_path_factory.mktemp("central"), free_port())
    yield receiver
    receiver.kill()


@pytest.fixture(scope="module")
def device_key(central) -> nacl.signing.SigningKey:
    key = nacl.signing.SigningKey.generate()
    central.register(DEVICE, key)
    central.start()
    return key


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, central, device_key):
    from tools.central_process import write_device_key

    path = tmp_path_factory.mktemp("gw")
    write_device_key(path / "data" / "keys", DEVICE, device_key)
    gw = GatewayUnderTest(
        path, DEMO_SENSORS, supervision={"heartbeat_timeout_s": SLOW_WATCHDOG_S},
        uplink={"url": central.url, "p2_linger_s": 0.2, "p3_linger_s": 0.5, "poll_s": 0.2,
                "backoff_base_s": 0.2, "backoff_cap_s": 1.0, "total_timeout_s": 10.0})
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def test_a_running_gateway_is_healthy_with_every_check_ok(gateway):
    # Right after the start the runner may still be installing the bundled model: --wait.
    code, report, err = health(gateway.port, "--wait", "90", "--require-sync")
    assert code == 0, (report, err)
    assert set(report) >= {"healthy", "checks", "version", "checked_at"}
    assert report["healthy"] is True and report["version"] == metadata.version("fleetgw")
    assert report["checked_at"].endswith("Z")
    assert tuple(report["checks"]) == CHECKS
    for name, check in report["checks"].items():
        assert check["ok"] is True and check["reason"], (name, check)
    checks = report["checks"]
    assert checks["actors"]["figures"]["down"] == []
    assert checks["journal_writable"]["figures"]["appended_in_window"] > 0
    assert set(checks["backlog"]["figures"]["lanes"]) == {"unrouted", "P1", "P2", "P3"}
    assert checks["last_sync"]["figures"]["acked"] > 0  # --require-sync: it synced
    model = checks["model"]["figures"]
    assert model["version"] == SHIPPED_MODEL and model["vectors"] > 0
    assert 0 < model["latency_ms"] < 5000

    table = subprocess.run([sys.executable, "-m", "tools.cli", "health", "--admin-port",
                            str(gateway.port)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert table.returncode == 0, table.stderr
    assert "HEALTHY" in table.stdout.splitlines()[0]
    for name in CHECKS:
        assert any(line.split()[:2] == [name, "ok"] for line in table.stdout.splitlines())


def test_an_actor_that_stops_answering_makes_the_gateway_unhealthy_and_is_named(gateway):
    pid = gateway.node("sensor:gps0")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        report = wait_for(failing(gateway.port, "actors"), 60, "health to fail on actors")
        down = report["checks"]["actors"]["figures"]["down"]
        assert [d["name"] for d in down] == ["sensor:gps0"], down
        assert "no heartbeat answer" in down[0]["why"]
        assert "sensor:gps0" in report["checks"]["actors"]["reason"]
        assert report["healthy"] is False
    finally:
        os.kill(pid, signal.SIGCONT)
    code, report, err = health(gateway.port, "--wait", "60")
    assert code == 0, (report, err)
    assert gateway.node("sensor:gps0")["pid"] == pid  # resumed, never restarted


def test_a_receiver_that_is_down_is_not_unhealthy_but_one_that_refuses_is(gateway, central,
                                                                         device_key):
    def uplink() -> dict:
        return gateway.node("uplink")["figures"]

    wait_for(lambda: uplink()["acked"] > 0, 60, "a first acknowledged batch")
    central.kill()
    try:
        failures = uplink()["failures"]
        wait_for(lambda: uplink()["failures"] > failures + 1, 60, "sends to fail")
        code, report, err = health(gateway.port, "--require-sync")
        assert code == 0, (report, err)  # synced since start, link down: fine
        assert report["checks"]["last_sync"]["ok"]

        central.register(DEVICE, nacl.signing.SigningKey.generate(), replace=True)
        central.start()
        report = wait_for(failing(gateway.port, "last_sync"), 90,
                          "health to fail on the refused batches")
        assert "central refuses" in report["checks"]["last_sync"]["reason"]
        assert "401" in report["checks"]["last_sync"]["reason"]
    finally:
        central.register(DEVICE, device_key, replace=True)
        if not central.running():
            central.start()
    code, report, err = health(gateway.port, "--wait", "90")
    assert code == 0, (report, err)


def test_the_mender_commit_gate_commits_a_healthy_gateway_and_refuses_another_release(
        gateway, tmp_path):
    script = os.path.join(ROOT, "deploy", "mender", "ArtifactCommit_Enter_00_health")
    env = {**os.environ, "FLEETGW": os.path.join(os.path.dirname(sys.executable), "fleetgw"),
           "FLEETGW_ADMIN_PORT": str(gateway.port), "FLEETGW_HEALTH_WAIT_S": "60",
           "FLEETGW_SOAK_S": "1", "FLEETGW_EVIDENCE_DIR": str(tmp_path / "evidence"),
           "FLEETGW_EXPECT_VERSION": metadata.version("fleetgw")}
    done = subprocess.run([script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "healthy through the soak: committing" in done.stderr
    kept = sorted(p.name for p in (tmp_path / "evidence").glob("*.json"))
    assert [name.rsplit("-", 1)[1] for name in kept] == ["soak.json", "start.json"]

    env.update(FLEETGW_EXPECT_VERSION="999.0", FLEETGW_HEALTH_WAIT_S="3")
    done = subprocess.run([script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "rolling back" in done.stderr
    assert "version: the gateway runs" in done.stderr and "not 999.0" in done.stderr


def test_no_gateway_on_the_port_exits_2_with_a_clear_message():
    port = free_port()
    code, report, err = health(port)
    assert code == 2
    assert f"no gateway is running on admin port {port}" in err
    assert report is not None and report["healthy"] is False and report["checks"] == {}


# ---- a gateway on a small real disk --------------------------------------------------------

DISK_MB = 48
DISK_SENSORS = [
    {"id": "imu0", "kind": "imu", "rate_hz": 200, "seed": 1, "batch_max_age_s": 0.05},
    {"id": "gps0", "kind": "gps", "rate_hz": 5, "seed": 2, "batch_max_age_s": 0.05},
]


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    try:
        disk = SmallDisk(path / "data", DISK_MB)
    except DiskError as exc:
        pytest.skip(str(exc))
    gw = GatewayUnderTest(path, DISK_SENSORS, model={"enabled": False},
                          journal={"disk_budget_bytes": 1 << 30})  # the disk fills first
    try:
        gw.start()
        yield gw, disk
    finally:
        gw.stop()
        disk.unmount()


def test_require_sync_fails_without_an_uplink_and_no_model_is_not_a_failure(small_gateway):
    gw, _ = small_gateway
    code, report, err = health(gw.port, "--wait", "60")
    assert code == 0, (report, err)
    assert report["checks"]["model"] == {"ok": True, "reason": "not configured",
                                         "figures": {"configured": False}}
    assert report["checks"]["last_sync"]["reason"] == "not configured"
    code, report, _ = health(gw.port, "--require-sync")
    assert code == 1 and report["healthy"] is False
    assert [n for n, c in report["checks"].items() if not c["ok"]] == ["last_sync"]


def test_a_journal_refusing_appends_on_a_full_disk_fails_until_freed(small_gateway):
    gw, disk = small_gateway
    wait_for(lambda: gw.records() > 500, 60, "readings journaled")
    disk.fill()
    try:
        # The free space falls below --min-free-mb first; then the appends are refused.
        report = wait_for(failing(gw.port, "journal_writable", "refusing appends"), 90,
                          "health to fail on journal_writable: appends refused")
        journal = report["checks"]["journal_writable"]
        assert "disk_full" in journal["reason"] and "MiB free" in journal["reason"], journal
        assert journal["figures"]["appended_in_window"] == 0
        assert journal["figures"]["refused_in_window"] > 0
        assert report["checks"]["actors"]["ok"]  # nothing crashed: it only cannot write
    finally:
        disk.free()
    code, report, err = health(gw.port, "--wait", "90")
    assert code == 0, (report, err)
    assert report["checks"]["journal_writable"]["figures"]["appended_in_window"] > 0
