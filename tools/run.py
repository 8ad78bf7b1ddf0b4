"""`fleetgw run`: the long-running gateway process in the foreground.

Where this sits: the top of everything. It cleans up a stale actor system of an earlier run,
starts the hardened actor system and the gateway root, prints a one-line status every few
seconds, stops in order on SIGTERM/SIGINT (or after --duration) and exits 0; it exits 1 when the
actor system dies or the root gives up (escalation to the OS: systemd restarts it), and 2 on a
bad config. Under systemd (deploy/fleetgw.service, tools/sd_notify.py) it sends READY=1 once the
tree runs, STATUS= lines, WATCHDOG=1 while the root answers, and STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import logging
import os
import signal
import sys
import time
from typing import Any

import psutil

from config import ConfigError, GatewayConfig, load_config
from messages.gateway import (
    GatewayFailed,
    GatewayStarted,
    GatewayStopped,
    StartGateway,
    StopGateway,
)
from messages.supervision import ActorNode, TopologyReport, TopologyRequest
from supervisors import reaper, system
from tools.logs import setup_process_logging, thespian_log_config
from tools.sd_notify import Notifier, Watchdog

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Seconds the whole tree may take to answer ChildReady at start-up.
START_TIMEOUT_S = 60.0
#: Consecutive unanswered status queries before the actor system counts as dead.
MAX_MISSED_STATUS = 3

_ids = itertools.count(1)


def log() -> logging.Logger:
    return logging.getLogger("fleetgw.run")


def ask(asys: Any, address: Any, message: Any, reply_types: tuple, timeout_s: float,
        abort: Any = None) -> Any:
    """Send and wait for a reply of ``reply_types`` with the same request_id (Thespian's ask
    returns whatever arrives next; after a timeout replies would shift by one). ``abort()``
    true ends the wait early (a stop requested meanwhile)."""
    deadline = time.monotonic() + timeout_s
    asys.tell(address, message)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (abort is not None and abort()):
            return None
        reply = asys.listen(min(remaining, 0.5))
        if reply is None:
            continue
        if isinstance(reply, GatewayFailed):
            return reply
        if isinstance(reply, reply_types) and getattr(reply, "request_id", None) == getattr(
            message, "request_id", None
        ):
            return reply


def find(node: ActorNode, name: str) -> ActorNode | None:
    if node.name == name:
        return node
    for child in node.children:
        found = find(child, name)
        if found is not None:
            return found
    return None


def walk(node: ActorNode):
    yield node
    for child in node.children:
        yield from walk(child)


def say(line: str) -> None:
    """Print a line for the operator. stdout may be a file on a full disk (or a closed pipe):
    the status is also in the tree and the log, so a line that cannot be written is dropped
    rather than stopping the gateway."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def status_line(root: ActorNode) -> str:
    figures = dict(find(root, "journal").figures) if find(root, "journal") else {}
    sensors = [n for n in walk(root) if n.name.startswith("sensor:")]
    up = sum(1 for n in sensors if n.state == "running")
    unacked = sum(dict(n.figures).get("unacked_batches", 0) for n in sensors)
    restarts = sum(n.restarts for n in walk(root))
    router = find(root, "router")
    backlog = dict(router.figures).get("backlog", "?") if router else "-"
    model = find(root, "model")
    served = ""
    if model is not None:
        m = dict(model.figures)
        events = sum(v for k, v in m.items() if k.startswith("event_"))
        served = (f" model={m.get('model', '?')} inferences={m.get('inferences', 0)} "
                  f"safety_events={events} model_backlog={m.get('backlog', '?')}")
    uplink = find(root, "uplink")
    synced = ""
    if uplink is not None:
        u = dict(uplink.figures)
        synced = (f" uplink_synced={u.get('synced_records', 0)} "
                  f"uplink_pending={u.get('pending', '?')} "
                  f"uplink_waiting=\"{u.get('waiting', '?')}\"")
    return (
        f"status: journal records={figures.get('records', '?')} "
        f"commits/s={figures.get('commits_per_s', '?')} "
        f"last_commit_age_s={figures.get('last_commit_age_s', '?')} "
        f"sensors={up}/{len(sensors)} unacked_batches={unacked} router_backlog={backlog}"
        f"{served}{synced} restarts={restarts}"
    )


class Runner:
    """One run of the gateway: start, watch, stop."""

    def __init__(self, config: GatewayConfig, config_path: str, data_dir: str,
                 admin_port: int, duration_s: float | None) -> None:
        self.config = config
        self.config_path = config_path
        self.data_dir = os.path.abspath(data_dir)
        self.admin_port = admin_port
        self.duration_s = duration_s
        self.stop_reason: str | None = None
        self.asys: Any = None
        self.gateway: Any = None
        self.pgid: int | None = None
        self.admin_pid: int | None = None
        self.last_tree: ActorNode | None = None
        # systemd (deploy/fleetgw.service): READY=1, STATUS=, WATCHDOG=1, STOPPING=1; read
        # (and removed from the environment) before any actor process is forked.
        self.notifier = Notifier.from_environment()
        self.watchdog = Watchdog(self.notifier)

    def request_stop(self, signum: int, _frame: Any) -> None:
        self.stop_reason = signal.Signals(signum).name
        self.notifier.stopping(f"stopping ({self.stop_reason})")

    def run(self) -> int:
        for action in system.cleanup_stale(self.data_dir, self.admin_port):
            log().warning("cleanup: %s", action)
        log_file = os.path.join(self.data_dir, "gateway.log")
        system.become_subreaper()
        try:
            self.asys = system.start_actor_system(
                self.admin_port, thespian_log_config(log_file, self.config.gateway.log_level)
            )
            # Installed after the Admin was forked, so it keeps the default handlers and a
            # service manager's SIGTERM still ends it.
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
            code = self.supervise()
            if code != EXIT_OK:
                self.notifier.status(f"failed (exit {code}): see the log and "
                                     f"{os.path.join(self.data_dir, 'gateway.log')}")
            return code
        except KeyboardInterrupt:  # Ctrl-C while the actor system was still starting
            self.stop_reason = "SIGINT"
            return EXIT_OK
        finally:
            self.teardown()
            system.RunLocks.release()

    def supervise(self) -> int:
        from supervisors.gateway import GLOBAL_NAME, Gateway

        self.gateway = self.asys.createActor(Gateway, globalName=GLOBAL_NAME)
        started = ask(self.asys, self.gateway,
                      StartGateway(next(_ids), self.config, self.data_dir),
                      (GatewayStarted,), START_TIMEOUT_S, abort=lambda: self.stop_reason)
        if self.stop_reason is not None and not isinstance(started, GatewayStarted):
            log().info("stopped while starting: %s", self.stop_reason)
            return EXIT_OK
        if isinstance(started, GatewayFailed):
            log().error("gateway gave up while starting: %s", started.reason)
            return EXIT_FAILED
        if not isinstance(started, GatewayStarted):
            log().error("gateway did not start within %.0fs (see %s)", START_TIMEOUT_S,
                        os.path.join(self.data_dir, "gateway.log"))
            return EXIT_FAILED
        self.pgid = started.pgid
        try:
            system.write_state(self.data_dir, run_pid=os.getpid(), boot_id=system.boot_id(),
                               pgid=started.pgid, admin_pid=started.admin_pid,
                               admin_port=self.admin_port)
        except OSError as exc:  # e.g. a full disk: run anyway, the next run cleans up less
            log().warning("could not record the actor system in %s: %s",
                          system.state_file(self.data_dir), exc)
        self.admin_pid = started.admin_pid
        log().info("gateway started: config=%s data_dir=%s admin_port=%d pgid=%d",
                   self.config_path, self.data_dir, self.admin_port, started.pgid)
        print(f"fleetgw: gateway running (config {self.config_path}, data dir {self.data_dir}, "
              f"admin port {self.admin_port}); Ctrl-C stops it", flush=True)
        self.notifier.ready(f"running: data dir {self.data_dir}, admin port {self.admin_port}")
        began = time.monotonic()
        interval = self.config.gateway.status_interval_s
        # The tree is checked every `check_s`; a status line is printed every `interval`. With
        # systemd's watchdog the check comes at least twice per ping period, so one slow answer
        # does not cost a ping.
        check_s = min(interval or 1.0, self.watchdog.period_s / 2 if self.watchdog.enabled
                      else float("inf"))
        next_status = began + check_s
        next_print = began + interval
        missed = 0
        self.watchdog.alive(began)  # the root has just answered StartGateway
        while self.stop_reason is None:
            if self.duration_s is not None and time.monotonic() - began >= self.duration_s:
                self.stop_reason = f"duration {self.duration_s:g}s reached"
                break
            message = self.asys.listen(0.25)
            if isinstance(message, GatewayFailed):
                log().error("gateway gave up: %s", message.reason)
                return EXIT_FAILED
            self.watchdog.tick(time.monotonic())
            if time.monotonic() >= next_status:
                checked_at = time.monotonic()
                next_status = checked_at + check_s
                if not reaper.alive(started.admin_pid):
                    log().error("the actor system's admin (pid %d) died: actor system is not "
                                "answering; exiting so the service manager restarts the "
                                "gateway", started.admin_pid)
                    return EXIT_FAILED
                report = ask(self.asys, self.gateway, TopologyRequest(next(_ids)),
                             (TopologyReport,), 2.0)
                if isinstance(report, GatewayFailed):
                    log().error("gateway gave up: %s", report.reason)
                    return EXIT_FAILED
                if report is None:
                    missed += 1
                    if missed >= MAX_MISSED_STATUS or not system.group_members(self.pgid):
                        log().error("actor system is not answering; exiting so the service "
                                    "manager restarts the gateway")
                        return EXIT_FAILED
                    continue
                missed = 0
                self.last_tree = report.root
                self.watchdog.alive(time.monotonic())
                line = status_line(report.root)
                self.notifier.status(line.removeprefix("status: "))
                if interval and checked_at >= next_print:
                    next_print = checked_at + interval
                    say(line)
        return self.stop()

    def stop(self) -> int:
        log().info("stopping: %s", self.stop_reason)
        say(f"fleetgw: stopping ({self.stop_reason})")
        report = ask(self.asys, self.gateway, TopologyRequest(next(_ids)), (TopologyReport,), 2.0)
        if isinstance(report, TopologyReport):
            self.last_tree = report.root
        timeout = self.stop_timeout_s()
        stopped = ask(self.asys, self.gateway, StopGateway(next(_ids), timeout),
                      (GatewayStopped,), timeout)
        if not isinstance(stopped, GatewayStopped):
            log().error("orderly stop did not finish in time; tearing down")
            return EXIT_FAILED
        if not stopped.clean:
            log().warning("orderly stop was not clean: %s", stopped.detail)
        return EXIT_OK

    def stop_timeout_s(self) -> float:
        """How long the orderly stop may take: what the tree's shutdown timeouts add up to
        (children stop one after another), at least [gateway] stop_timeout_s."""
        from supervisors.tree import gateway_tree

        tree = gateway_tree(self.config)
        return max(self.config.gateway.stop_timeout_s,
                   sum(c.shutdown_timeout_s for c in tree.children) + 5.0)

    def teardown(self) -> None:
        if self.pgid is None:
            # The gateway never reported its process group: find it from the admin port.
            for pid in system.listener_pids(self.admin_port):
                with contextlib.suppress(psutil.Error, OSError):
                    if os.getpgid(pid) != os.getpgid(0):
                        self.pgid = os.getpgid(pid)
        if self.asys is not None and (self.admin_pid is None or reaper.alive(self.admin_pid)):
            try:
                self.asys.shutdown()
            except Exception as exc:  # the system may already be dead
                log().warning("actor system shutdown: %s", exc)
        if self.pgid is not None:
            n = system.kill_group(self.pgid)
            if n:
                log().warning("killed %d actor process(es) left after shutdown", n)
        system.reap_children()  # the Admin and orphaned actors were reparented to us
        system.clear_state(self.data_dir)


def print_summary(data_dir: str, tree: ActorNode | None) -> None:
    """What was journaled and what restarted."""
    from actors.journal import JournalError, open_readonly
    from actors.journal.actor import journal_path

    print("fleetgw: summary")
    try:
        with open_readonly(journal_path(data_dir)) as reader:
            stats = reader.stats()
        print(f"  journal: {stats.records} records in {stats.path} "
              f"({stats.usage_bytes / 2**20:.1f} MiB, generation {stats.generation[:8]})")
        for d in stats.devices:
            print(f"  device {d.device_id}: {d.count} records, seq {d.seq_lo}..{d.seq_hi}")
    except JournalError as exc:
        print(f"  journal: {exc}")
    if tree is not None:
        restarted = [(n.name, n.restarts, n.last_exit) for n in walk(tree) if n.restarts]
        if restarted:
            for name, count, last in restarted:
                print(f"  restarts: {name} x{count} (last: {last})")
        else:
            print("  restarts: none")


def run_command(config_path: str, data_dir: str | None, admin_port: int | None,
                duration_s: float | None) -> int:
    setup_process_logging()
    # A fatal signal to the run process (systemd's watchdog sends SIGABRT) prints its Python
    # stack to stderr, the service's journal; actor processes keep their own fatal-signal
    # handling (supervisors/hardening.py).
    with contextlib.suppress(RuntimeError, ValueError, OSError):  # no usable stderr: skip
        faulthandler.enable()
        os.register_at_fork(after_in_child=faulthandler.disable)
    if os.geteuid() == 0:
        log().warning("running as root (uid 0): run the gateway as an unprivileged user "
                      "(deploy/fleetgw.service: User=fleetgw; deploy/Dockerfile: USER fleetgw; "
                      "see deploy/PACKAGING.md)")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"fleetgw run: bad config\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    from config.policy import PolicyError, load_policy
    from supervisors.spec import validate
    from supervisors.tree import gateway_tree

    try:
        load_policy(config.router.policy_path)
    except PolicyError as exc:
        print(f"fleetgw run: bad routing policy ([router] policy in {config_path})\n{exc}",
              file=sys.stderr)
        return EXIT_USAGE
    problems = validate(gateway_tree(config))
    if problems:
        print("fleetgw run: bad config\n" + "\n".join(f"{config_path}: {p}" for p in problems),
              file=sys.stderr)
        return EXIT_USAGE
    data_dir = data_dir or "data"
    try:
        os.makedirs(os.path.join(data_dir, "run"), exist_ok=True)
        probe = os.path.join(data_dir, "run", ".writable")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as exc:
        print(f"fleetgw run: data dir {data_dir} is not usable: {exc.strerror} "
              f"({exc.filename}); check --data-dir", file=sys.stderr)
        return EXIT_USAGE
    from actors.journal import JournalError
    from actors.journal.actor import journal_path
    from actors.journal.keys import prepare_keyring

    try:  # refuse to start on a wrong or missing key, before any actor writes anything
        ring, key_line = prepare_keyring(config.journal.key_path(data_dir),
                                         journal_path(data_dir))
    except (JournalError, ValueError) as exc:
        print(f"fleetgw run: refusing to start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    (log().info if ring is not None else log().warning)("%s", key_line)
    port = admin_port or config.gateway.admin_port
    runner = Runner(config, config_path, data_dir, port, duration_s)
    try:
        code = runner.run()
    except system.StaleSystemError as exc:
        print(f"fleetgw run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print_summary(runner.data_dir, runner.last_tree)
    return code
