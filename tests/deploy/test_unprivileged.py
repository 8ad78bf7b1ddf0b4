"""`fleetgw run` as an unprivileged user, the way deploy/fleetgw.service (User=fleetgw) and
deploy/Dockerfile (USER fleetgw) run it: nothing in the gateway needs root.

A real gateway (journal, router, model runner with its first-start model install and
self-test child, the gateway's own mosquitto when installed) runs as uid/gid 65534 (nobody)
in a data dir that user owns, and only there may it write, even when a root run left its
admin-port lock in /tmp. (As root, the run warns: tests/deploy/test_sd_notify.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import psutil
import pytest

from actors.broker.launcher import BrokerError, find_binary
from tests.deploy.test_sd_notify import NotifyListener, abstract_name
from tests.system.harness import GatewayUnderTest, free_port, wait_for
from tools.gateway_process import ROOT

pytestmark = pytest.mark.system

NOBODY = 65534


def as_nobody() -> dict:
    return {"user": NOBODY, "group": NOBODY, "extra_groups": []}


def interpreter_for_nobody() -> tuple[str, dict[str, str]]:
    """A Python that uid 65534 can run with this project's packages: the test's own, or (when
    it lives under a private home, e.g. pyenv in /root) the system's of the same version with
    the venv's site-packages on PYTHONPATH. Skips when there is none."""
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root (the CI runs as root)")
    paths = sysconfig.get_paths()
    site = os.pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"], ROOT]))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    tried = []
    for exe, env in ((sys.executable, {}), (f"/usr/bin/{version}", {"PYTHONPATH": site})):
        probe = [exe, "-c", "import apsw, openvino, thespian, tools.cli"]
        try:
            result = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=120,
                                    env={"PATH": os.environ.get("PATH", ""), **env},
                                    **as_nobody())
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append(f"{exe}: {exc}")
            continue
        if result.returncode == 0:
            return exe, env
        tried.append(f"{exe}: {result.stderr.strip().splitlines()[-1:]}")
    pytest.skip("no Python interpreter with the project's packages is readable by uid 65534 "
                f"(tried {'; '.join(tried)}); install the venv outside a private home")


class UnprivilegedGateway(GatewayUnderTest):
    """A GatewayUnderTest whose run process (and so every actor) runs as uid/gid 65534."""

    def __init__(self, path: Path, exe: str, exe_env: dict[str, str], **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.exe, self.exe_env = exe, exe_env

    def start(self, wait: bool = True, env: dict[str, str] | None = None):
        os.makedirs(self.data_dir, exist_ok=True)
        os.chown(self.data_dir, NOBODY, NOBODY)
        os.chmod(self.data_dir, 0o700)
        with open(self.output_path, "a") as out:
            self.proc = subprocess.Popen(
                [self.exe, "-m", "tools.cli", "run", "--config", self.config_path,
                 "--data-dir", self.data_dir, "--admin-port", str(self.port)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "HOME": "/nonexistent", **self.exe_env, **self.env},
                **as_nobody())
        if wait:
            wait_for(lambda: self.pgid() or self.proc.poll() is not None, 60,
                     "the run to start its actor system")
            assert self.proc.poll() is None, f"the run exited early:\n{self.output()}"
            wait_for(self.tree_or_none, 90, f"the gateway to answer (output: {self.output()})")
            wait_for(self.all_running, 90, "every actor to run")
        return self


def test_gateway_runs_journals_and_stops_as_an_unprivileged_user():
    exe, exe_env = interpreter_for_nobody()
    # Not under pytest's tmp_path: /tmp/pytest-of-root is private to root.
    base = Path(tempfile.mkdtemp(prefix="fleetgw-nobody-", dir="/tmp"))
    os.chmod(base, 0o755)
    listener = NotifyListener(abstract_name())
    sections = {}
    try:
        find_binary("mosquitto")
        sections["broker"] = {"enabled": True, "port": free_port()}
    except BrokerError:
        pass
    gw = UnprivilegedGateway(base, exe, exe_env,
                             sensors=[{"id": "imu0", "kind": "imu", "rate_hz": 20, "seed": 1}],
                             env={"NOTIFY_SOCKET": listener.address},
                             journal={"key_file": "journal.key"}, **sections)
    # A root run on this admin port left its lock file in /tmp (root's, mode 0644): the
    # unprivileged run must still take the lock (supervisors.system.RunLocks).
    stale_lock = Path(tempfile.gettempdir()) / f"fleetgw-admin-{gw.port}.lock"
    stale_lock.touch(mode=0o644)
    os.chown(stale_lock, 0, 0)
    try:
        gw.start()
        wait_for(lambda: listener.received("READY=1"), 60, "READY=1 from the unprivileged run")
        wait_for(lambda: gw.records() > 20, 60, "the journal to commit as uid 65534")
        pids = gw.pids()
        assert gw.proc.pid in pids and len(pids) > 3
        for pid in pids + [c.pid for p in pids for c in psutil.Process(p).children()]:
            proc = psutil.Process(pid)
            assert proc.uids().effective == NOBODY and proc.gids().effective == NOBODY, \
                f"{proc.name()} (pid {pid}) runs as uid {proc.uids().effective}"
        assert gw.node("model")["state"] == "running"
        assert gw.terminate() == 0
        # Everything it created is its own, inside its data dir.
        for path in Path(gw.data_dir).rglob("*"):
            assert path.lstat().st_uid == NOBODY, f"{path} is not owned by uid 65534"
        output = gw.output()
        assert "running as root" not in output
        assert "Traceback" not in output, output
    finally:
        gw.stop()
        listener.close()
        shutil.rmtree(base, ignore_errors=True)
