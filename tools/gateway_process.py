"""A `fleetgw run` child process: started, watched and torn down from outside.

Where this sits: outside the gateway, for the benchmark and the tests (later the drills): it
starts the real run command on a config, data dir and admin port, and its teardown leaves no
process behind, whatever state the gateway is in (run process, actor process group, and any
stale system still holding the admin port).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import psutil

from supervisors import system

#: The repository root (the run command is started as ``python -m tools.cli`` from there).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GatewayProcess:
    """One gateway run in a child process; output goes to ``output_path`` (or nowhere);
    ``env`` is added to this process's environment for it (e.g. a faked clock)."""

    def __init__(self, config_path: str, data_dir: str, admin_port: int,
                 output_path: str | None = None, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.data_dir = data_dir
        self.port = admin_port
        self.output_path = output_path
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    @property
    def journal_path(self) -> str:
        return os.path.join(self.data_dir, "journal.db")

    def start(self, env: dict[str, str] | None = None) -> GatewayProcess:
        """Start the run; ``env``, when given, replaces the extra environment from now on."""
        if env is not None:
            self.env = dict(env)
        out = open(self.output_path, "a") if self.output_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "run", "--config", self.config_path,
                 "--data-dir", self.data_dir, "--admin-port", str(self.port)],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child has its own copy
        return self

    def pgid(self) -> int | None:
        """The actor system's process group, as the run process recorded it."""
        return system.read_state(self.data_dir).get("pgid")

    def pids(self) -> list[int]:
        """The run process and every actor process."""
        pids = [self.proc.pid] if self.proc and self.proc.poll() is None else []
        pgid = self.pgid()
        if pgid:
            pids += [p.pid for p in system.group_members(pgid)]
        return pids

    def terminate(self, timeout_s: float = 90) -> int:
        """SIGTERM the run process (an orderly stop) and return its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        """Teardown: whatever state the gateway is in, leave no process behind."""
        pgid = self.pgid()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for group in {pgid, self.pgid()} - {None}:
            system.kill_group(group)
        for pid in system.listener_pids(self.port):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(pid) != os.getpgid(0):
                    system.kill_group(os.getpgid(pid))
