"""`MosquittoLauncher`: the gateway's local MQTT broker as a child process it configures,
watches and restarts.

Where this sits: in front of the data path (see the package docstring). `BrokerActor` calls
`start` once, `check` on a timer and `stop` when told to; tests and benchmarks drive it
directly (tests/mosquitto.py). Nothing here blocks for long except `stop`, which waits for the
broker to save its state.

Files, all in the broker's data dir (DATA_DIR/broker by default)::

    mosquitto.conf   generated from [broker] at every start (edit the gateway config, not this)
    mosquitto.db     mosquitto's persistence: sessions and queued QoS 1 messages
    mosquitto.log    its stdout and stderr (log_dest stderr), rotated at LOG_MAX_BYTES
    mosquitto.pid    the running broker's pid, for operators

The child stays in the actor's process group (the gateway's group kill takes it down too) and
gets PR_SET_PDEATHSIG = SIGTERM, so it exits, saving its state, when the process that started
it dies, even by SIGKILL. (The kernel sends it when the *thread* that forked the broker ends:
start and restart it from a thread that lives as long as the process, such as an actor's only
thread.) A broker left over anyway (its parent died between fork and prctl, or it is still
saving) is found by its command line naming our mosquitto.conf, told to stop, and waited for
before a new one starts on the same port and files.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import psutil

from config.broker import BrokerSettings
from supervisors.reaper import describe_exit_status

CONF_NAME = "mosquitto.conf"
DB_NAME = "mosquitto.db"
LOG_NAME = "mosquitto.log"
PID_NAME = "mosquitto.pid"
#: argv[0] of the broker: ``ps`` shows whose broker it is, and `supervisors.system.kill_group`
#: (which spares processes without "fleetgw" in their command line) counts it as the gateway's.
ARGV0 = "fleetgw-mosquitto"
#: Where Debian installs mosquitto, looked in after PATH (not on every user's PATH).
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
INSTALL_HINT = "apt-get install mosquitto"
#: Seconds a leftover broker gets to save its state and exit after SIGTERM before SIGKILL.
LEFTOVER_TERM_S = 5.0
#: A broker still not listening this many seconds after its start is reported as a problem
#: (it keeps starting: loading a large persistence file takes a while).
SLOW_START_S = 10.0
#: The log is rotated (one old copy, mosquitto.log.1) when it grows past this many bytes;
#: looked at every LOG_CHECK_S seconds.
LOG_MAX_BYTES = 1 << 20
LOG_CHECK_S = 10.0
#: How much of the log's end is read for error messages.
TAIL_BYTES = 8192
#: The readiness probe's connect timeout, seconds (loopback: answers at once or never).
PROBE_TIMEOUT_S = 0.2
STATES = ("stopped", "waiting", "starting", "running", "backing_off")

PR_SET_PDEATHSIG = 1
_TIMESTAMP = re.compile(r"^\d[\dT:-]*: ")
#: Log texts of mosquitto's fatal errors, and what the operator can do about them.
HINTS = (
    ("Address already in use",
     "another process listens on {where}: stop it or set [broker] port"),
    ("Cannot assign requested address",
     "{address} is not an address of this computer: check [broker] listen_address"),
    ("pwfile", "check [broker] password_file (create it with mosquitto_passwd -c FILE USER)"),
    ("password file", "check [broker] password_file (create it with mosquitto_passwd -c FILE "
                      "USER)"),
    ("Error found at", "check [broker] extra_config"),
    ("Permission denied", "check the owner and permissions of {data_dir}"),
)


class BrokerError(Exception):
    """The broker cannot be started as configured (e.g. mosquitto is not installed); the
    message says what helps."""


def find_binary(name: str) -> str:
    """The mosquitto executable for the ``[broker] binary`` setting ``name``: a path, or a name
    looked up on PATH and then in /usr/sbin and /usr/local/sbin. Raises BrokerError."""
    if os.sep in name:
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return name
        raise BrokerError(f"mosquitto not found: [broker] binary = {name!r} is not an "
                          f"executable file (Debian: {INSTALL_HINT}, or fix [broker] binary)")
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        raise BrokerError(f"mosquitto not found: no {name!r} on PATH or in "
                          f"{', '.join(SBIN_DIRS)} (Debian: {INSTALL_HINT}; or set [broker] "
                          f"binary to its path)")
    return found


@functools.cache
def _prctl() -> Callable[..., int]:
    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int, prctl: Callable[..., int]) -> None:
    """preexec_fn of the broker: SIGTERM when the process that started it dies. ``prctl`` is
    looked up before the fork (no loading libraries between fork and exec)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


class MosquittoLauncher:
    """One mosquitto child process for ``settings``, with its files in ``data_dir``.

    Life: `start` (non-blocking) → `check` every ~0.2 s (notices readiness and exits, restarts
    after a backoff, rotates the log) → `stop` (SIGTERM: mosquitto saves its state; SIGKILL
    after the timeout). Trouble never raises: it is in ``problem`` and `figures`.
    """

    def __init__(self, settings: BrokerSettings, data_dir: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.data_dir = os.path.abspath(data_dir)
        self.conf_path = os.path.join(self.data_dir, CONF_NAME)
        self.log_path = os.path.join(self.data_dir, LOG_NAME)
        self.pid_path = os.path.join(self.data_dir, PID_NAME)
        self.clock = clock
        #: One of STATES.
        self.state = "stopped"
        self.process: subprocess.Popen | None = None
        #: Launches after an exit or a failed start.
        self.restarts = 0
        #: How the last broker ended (`describe_exit_status`); empty before the first exit.
        self.last_exit = ""
        #: What is wrong now (empty: nothing); cleared when a broker listens again.
        self.problem = ""
        self._delay = settings.restart_min_s
        self._next_start = 0.0
        self._spawned_at = 0.0
        self._ready_at: float | None = None
        self._log_offset = 0
        self._log_checked_at = 0.0
        self._leftovers: list[psutil.Process] = []
        self._leftover_kill_at = 0.0
        self._binary = ""

    # ------------------------------------------------------------------------------ config
    def config_text(self) -> str:
        """mosquitto.conf for the settings: one listener, persistence in the data dir, bounded
        queues, log to stderr (the log file), extra_config last."""
        s = self.settings
        lines = [
            "# Generated by fleetgw from the [broker] settings at every start: edit the gateway",
            "# config, not this file.",
            f"listener {s.port} {s.listen_address}",
            f"allow_anonymous {'true' if s.allow_anonymous else 'false'}",
        ]
        if s.password_file:
            lines.append(f"password_file {os.path.abspath(s.password_file)}")
        lines += [
            "persistence true",
            f"persistence_location {self.data_dir}/",
            f"persistence_file {DB_NAME}",
            f"autosave_interval {s.autosave_interval_s}",
            f"max_queued_messages {s.max_queued_messages}",
            f"max_queued_bytes {s.max_queued_bytes}",
            f"max_inflight_messages {s.max_inflight_messages}",
            "set_tcp_nodelay true",
            "log_dest stderr",
            *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # Run as root, mosquitto would switch to the "mosquitto" user, which can neither
            # write the data dir nor keep PR_SET_PDEATHSIG (the kernel clears it on a change
            # of credentials). Run the gateway as an unprivileged user instead.
            lines.append("user root")
        if s.extra_config:
            lines += ["# [broker] extra_config", *s.extra_config]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------------------- life
    def start(self) -> None:
        """Start the broker: write the config, stop a leftover broker of ours, launch. Returns
        at once; `ready` tells when it listens. Trouble is recorded and retried by `check`.
        A no-op while our broker runs."""
        if self.process is not None and self.process.poll() is None:
            return
        self.state = "starting"
        self._delay = self.settings.restart_min_s
        self._launch(self.clock())

    def ready(self) -> bool:
        """True while our broker runs and accepts connections on its port."""
        if self.process is None or self.process.poll() is not None:
            return False
        if self.state == "running":
            return True
        if self.state != "starting" or not self._listening():
            return False
        self.state = "running"
        self._ready_at = self.clock()
        self.problem = ""
        return True

    def check(self, now: float | None = None) -> None:
        """Advance the broker's life: notice readiness, an exit (then restart after the
        backoff), a leftover that finished exiting; rotate the log. Call every ~0.2 s."""
        now = self.clock() if now is None else now
        if self.state == "waiting":
            self._wait_for_leftovers(now)
        elif self.state == "backing_off":
            if now >= self._next_start:
                self.restarts += 1
                self._launch(now)
        elif self.state in ("starting", "running"):
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                self._exited(code, now)
                return
            if self.state == "starting" and not self.ready() and (
                    now - self._spawned_at > SLOW_START_S):
                self.problem = (f"mosquitto (pid {self.process.pid}) is not listening on "
                                f"{self._where()} {now - self._spawned_at:.0f} s after its "
                                f"start; see {self.log_path}")
            if now - self._log_checked_at >= LOG_CHECK_S:
                self._log_checked_at = now
                self._rotate_running_log()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the broker and do not restart it: SIGTERM (mosquitto saves its state and
        exits), SIGKILL after ``timeout_s``. Blocks until it is gone; True if it exited
        cleanly (or was not running)."""
        self.state = "stopped"
        self._ready_at = None
        for proc in self._leftovers:  # told to stop by _launch already
            with contextlib.suppress(psutil.Error):
                try:
                    proc.wait(timeout=timeout_s)
                except psutil.TimeoutExpired:
                    proc.kill()
        self._leftovers = []
        if self.process is None:
            return True
        process, self.process = self.process, None
        clean = True
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                clean = False
                process.kill()
                process.wait()
        code = process.returncode
        self.last_exit = describe_exit_status(code)
        self._remove_pid_file()
        return clean and code == 0

    def kill(self) -> None:
        """SIGKILL the broker (tests and drills: a crash, unsaved state lost). `check` notices
        the exit and restarts it like any other."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    # ----------------------------------------------------------------------------- figures
    @property
    def pid(self) -> int:
        """The running broker's pid; 0 when none runs."""
        if self.process is None or self.process.returncode is not None:
            return 0
        return self.process.pid

    def figures(self) -> dict[str, int | float | str]:
        """state, pid (0: none), port, restarts, last_exit, problem, uptime_s (0 unless it
        listens)."""
        uptime = 0.0
        if self.state == "running" and self._ready_at is not None:
            uptime = round(self.clock() - self._ready_at, 1)
        return {
            "state": self.state,
            "pid": self.pid,
            "port": self.settings.port,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "problem": self.problem,
            "uptime_s": uptime,
        }

    def log_tail(self, max_lines: int = 20) -> list[str]:
        """The last lines the current (or last) broker wrote to its log."""
        try:
            with open(self.log_path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = max(self._log_offset, size - TAIL_BYTES)
                if start >= size:
                    return []
                fh.seek(start)
                text = fh.read(size - start).decode("utf-8", "replace")
        except OSError:
            return []
        lines = text.splitlines()
        if start > self._log_offset and lines:
            lines = lines[1:]  # the first may be cut
        return lines[-max_lines:]

    # ---------------------------------------------------------------------------- helpers
    def _launch(self, now: float) -> None:
        # 1. the binary and the config; 2. a leftover broker of ours; 3. the child.
        try:
            self._binary = find_binary(self.settings.binary)
            os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
            temporary = self.conf_path + ".tmp"
            with open(temporary, "w") as fh:
                fh.write(self.config_text())
            os.replace(temporary, self.conf_path)
        except (BrokerError, OSError) as exc:
            self._back_off(now, str(exc) if isinstance(exc, BrokerError)
                           else f"cannot write {self.conf_path}: {exc}")
            return
        self._leftovers = self._find_leftovers()
        if self._leftovers:
            for proc in self._leftovers:
                with contextlib.suppress(psutil.Error):
                    proc.terminate()
            self.state = "waiting"
            self._leftover_kill_at = now + LEFTOVER_TERM_S
            return
        self._spawn(now)

    def _spawn(self, now: float) -> None:
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.path.getsize(self.log_path) > LOG_MAX_BYTES:
                    os.replace(self.log_path, self.log_path + ".1")
            with open(self.log_path, "ab") as log:
                self._log_offset = log.tell()
                self.process = subprocess.Popen(
                    [ARGV0, "-c", self.conf_path], executable=self._binary,
                    cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, close_fds=True,
                    preexec_fn=functools.partial(_die_with_parent, os.getpid(), _prctl()))
        except OSError as exc:
            self._back_off(now, f"cannot start {self._binary}: {exc}")
            return
        self.state = "starting"
        self._spawned_at = now
        self._log_checked_at = now
        self._ready_at = None
        with contextlib.suppress(OSError), open(self.pid_path, "w") as fh:
            fh.write(f"{self.process.pid}\n")

    def _exited(self, code: int, now: float) -> None:
        self.last_exit = describe_exit_status(code)
        self.process = None
        self._ready_at = None
        self._remove_pid_file()
        if now - self._spawned_at >= self.settings.restart_max_s:
            self._delay = self.settings.restart_min_s  # it ran a while: not a crash loop
        self._back_off(now, self._exit_problem(code))

    def _back_off(self, now: float, problem: str) -> None:
        self.problem = problem
        self.state = "backing_off"
        self._next_start = now + self._delay
        self._delay = min(self._delay * 2, self.settings.restart_max_s)

    def _exit_problem(self, code: int) -> str:
        lines = [_TIMESTAMP.sub("", line) for line in self.log_tail()]
        errors = [line for line in lines if "Error" in line]
        if not errors and code > 0:
            errors = lines[-2:]
        text = f"mosquitto stopped ({self.last_exit})"
        if errors:
            text += ": " + "; ".join(dict.fromkeys(errors))
        for needle, hint in HINTS:
            if any(needle in line for line in errors):
                text += " — " + hint.format(where=self._where(), data_dir=self.data_dir,
                                            address=self.settings.listen_address)
                break
        return text

    def _where(self) -> str:
        address = self.settings.listen_address
        return f"[{address}]:{self.settings.port}" if ":" in address else (
            f"{address}:{self.settings.port}")

    def _listening(self) -> bool:
        """Our broker's pid holds the listening socket (not some other process on the port)
        and the port accepts a connection."""
        assert self.process is not None
        try:
            connections = psutil.Process(self.process.pid).net_connections("tcp")
        except psutil.Error:
            return False
        if not any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port ==
                   self.settings.port for c in connections):
            return False
        try:
            with socket.create_connection((self.settings.listen_address, self.settings.port),
                                          timeout=PROBE_TIMEOUT_S):
                return True
        except OSError:
            return False

    def _find_leftovers(self) -> list[psutil.Process]:
        """Running mosquittos started with our config file (by an earlier incarnation)."""
        own = self.process.pid if self.process is not None else None
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            command = proc.info.get("cmdline") or []
            if (proc.pid != own and len(command) >= 3 and "mosquitto" in
                    os.path.basename(command[0]) and self.conf_path in command[1:]):
                found.append(proc)
        return found

    def _wait_for_leftovers(self, now: float) -> None:
        alive = []
        for proc in self._leftovers:
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        self._leftovers = alive
        if not alive:
            self._spawn(now)
        elif now >= self._leftover_kill_at:
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            self.problem = (f"a leftover mosquitto (pid {', '.join(str(p.pid) for p in alive)})"
                            f" did not exit {LEFTOVER_TERM_S:.0f} s after SIGTERM: killed")

    def _rotate_running_log(self) -> None:
        # The broker writes with O_APPEND: after a copy and a truncate it writes at the start.
        try:
            if os.path.getsize(self.log_path) <= LOG_MAX_BYTES:
                return
            shutil.copyfile(self.log_path, self.log_path + ".1")
            os.truncate(self.log_path, 0)
            self._log_offset = 0
        except OSError:
            pass  # a log we cannot rotate is not worth stopping the broker for

    def _remove_pid_file(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.pid_path)
