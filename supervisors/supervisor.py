"""The Supervisor actor: starts its children from a `SupervisorSpec` and keeps them alive.

Where this sits: the gateway root (supervisors.gateway) and the inner supervisors (``sensors``,
later ``processing`` and ``uplink``) are Supervisors. They apply OTP semantics declared as data
(supervisors.spec), the restart policy of supervisors.policy, and work around Thespian's gaps:

- dead children: Thespian's ChildActorExited (made reliable by supervisors.hardening), plus a
  liveness check of each child's pid in case a notice is still lost;
- hung children: a heartbeat every ``heartbeat_interval_s``; no answer within the child's
  ``heartbeat_timeout_s`` and the child's pid is SIGKILLed (Thespian has no kill API and a busy
  actor ignores ActorExitRequest);
- orphans: each supervisor records its children's pids in DATA_DIR/run/; a new incarnation
  SIGKILLs whatever its predecessor left running before starting anything (two journal
  writers must never exist);
- addresses: every (re)start of a worker is announced with PeersChanged to the parent and the
  siblings, which pass on what changed, so the whole tree learns the new address.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from thespian.actors import ActorExitRequest, ChildActorExited

from actors.base import EXIT_CRASH, SupervisedActor, log, read_crash_reason
from messages.supervision import (
    ChildInit,
    ChildReady,
    ChildStopped,
    ChildStopping,
    Heartbeat,
    HeartbeatAck,
    PeersChanged,
    StopChild,
)
from supervisors import hardening, reaper
from supervisors.children import ChildRecord
from supervisors.policy import RestartIntensity, should_restart
from supervisors.spec import Strategy, SupervisorSpec, resolve_class

#: Exit status of a supervisor that gave up (restart intensity exceeded).
EXIT_ESCALATE = 71
#: Seconds to wait for ChildActorExited after a child's pid is gone before acting without it.
EXIT_NOTICE_GRACE_S = 1.0


def describe_exit(code: int | None) -> str:
    """Readable exit reason from a multiprocessing exit code."""
    if code is None:
        return "exited"
    if code == EXIT_CRASH:
        return "crashed (exception)"
    if code == EXIT_ESCALATE:
        return "gave up (restart intensity exceeded)"
    return reaper.describe_exit_status(code)


class Supervisor(SupervisedActor):
    """Supervises the children of the `SupervisorSpec` it gets as settings."""

    ready_on_init = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec: SupervisorSpec | None = None
        self.records: list[ChildRecord] = []
        self.intensity: RestartIntensity | None = None
        self.announced_ready = False
        self.stop_queue: list[ChildRecord] | None = None
        self.stop_request: tuple[Any, StopChild] | None = None
        self.stop_deadline: float | None = None
        self.group_pending: list[ChildRecord] = []
        self.group_delay = 0.0

    # ------------------------------------------------------------------------- start-up
    def on_init(self) -> None:
        self.start_tree(self.settings)

    def start_tree(self, spec: SupervisorSpec) -> None:
        self.spec = spec
        self.intensity = RestartIntensity(spec.flags.intensity, spec.flags.period_s)
        self.records = [ChildRecord.for_spec(c, spec.flags) for c in spec.children]
        reaped = reaper.reap_predecessor(self.data_dir, self.name)
        if reaped:
            log().warning("supervisor %s reaped %d orphaned process(es) of its predecessor: %s",
                          self.name, len(reaped), reaped)
        for rec in self.records:
            self.start_child(rec)
        self.start_timer("heartbeat", spec.flags.heartbeat_interval_s)
        if not self.records:
            self.all_ready()

    def start_child(self, rec: ChildRecord) -> None:
        cls = resolve_class(rec.spec.actor_class)
        address = self.createActor(cls)
        rec.started(address, time.monotonic())
        # Know the pid from the start, so a child that hangs before ChildReady can be killed.
        rec.pid = reaper.pid_of_new_child(self, address)
        rec.pid_create_time = reaper.create_time(rec.pid)
        reaper.record_children(self.data_dir, self.name, self.records)
        self.send(
            address,
            ChildInit(
                name=rec.spec.name,
                settings=rec.spec.settings,
                peers=tuple(self.peers.items()),
                data_dir=self.data_dir,
                fault_injection=self.fault_injection,
                journal_key_file=self.journal_key_file,
                nice=rec.spec.nice,
            ),
        )
        if not rec.spec.is_supervisor:
            self.peers[rec.spec.name] = address
            self.announce_peers({rec.spec.name: address}, source=None)

    def receiveMsg_ChildReady(self, msg: ChildReady, sender: Any) -> None:
        rec = self.record_of(sender)
        if rec is None:
            return
        rec.pid = msg.pid
        rec.pid_create_time = reaper.create_time(msg.pid)
        rec.ready = True
        rec.last_ack = time.monotonic()
        if rec.state == "starting":
            rec.state = "running"
        reaper.record_children(self.data_dir, self.name, self.records)
        if all(r.ready or r.state == "dead" for r in self.records):
            self.all_ready()

    def all_ready(self) -> None:
        if not self.announced_ready:
            self.announced_ready = True
            self.on_all_ready()

    def on_all_ready(self) -> None:
        """Every child answered ChildReady once: tell our parent we are ready."""
        self.announce_ready()

    # ---------------------------------------------------------------------------- peers
    def announce_peers(self, changed: dict[str, Any], source: Any) -> None:
        """Send changed addresses to every child and to the parent, except where they came
        from. Receivers pass on only what changed for them, so this terminates."""
        msg = PeersChanged(tuple(changed.items()))
        for rec in self.records:
            if rec.address is not None and rec.address != source:
                self.send(rec.address, msg)
        if self.parent is not None and self.parent != source:
            self.send(self.parent, msg)

    def receiveMsg_PeersChanged(self, msg: PeersChanged, sender: Any) -> None:
        changed = {n: a for n, a in msg.peers if self.peers.get(n) != a}
        if changed:
            self.peers.update(changed)
            self.announce_peers(changed, source=sender)

    # ------------------------------------------------------------------------ heartbeat
    def on_timer_heartbeat(self) -> None:
        assert self.spec is not None
        now = time.monotonic()
        for rec in self.records:
            if rec.address is not None:
                self.check_child(rec, now)
        self.check_stop_deadline(now)
        self.start_timer("heartbeat", self.spec.flags.heartbeat_interval_s)

    def check_child(self, rec: ChildRecord, now: float) -> None:
        if rec.killed_at is not None:
            # We killed it; if Thespian's notice does not come, act on the dead pid ourselves
            # (without a pid we cannot tell it is gone: wait for the notice).
            if (rec.pid is not None and now - rec.killed_at > EXIT_NOTICE_GRACE_S
                    and not reaper.alive(rec.pid)):
                log().warning("supervisor %s: no exit notice for %s; handling exit from its pid",
                              self.name, rec.spec.name)
                self.child_exited(rec)
            return
        if rec.state not in ("starting", "running", "stopping"):
            return
        if rec.pid is not None and not reaper.alive(rec.pid, rec.pid_create_time):
            rec.killed_at = now  # dead without a notice yet: give the notice a grace period
            rec.kill_reason = None
            return
        silent = now - (rec.last_ack or now)
        if silent > rec.spec.heartbeat_timeout_s:
            reason = f"hung: no heartbeat answer for {silent:.1f}s (watchdog SIGKILL)"
            log().error("supervisor %s: %s %s", self.name, rec.spec.name, reason)
            self.kill_child(rec, reason)
            return
        rec.hb_seq += 1
        self.send(rec.address, Heartbeat(rec.hb_seq))

    def kill_child(self, rec: ChildRecord, reason: str) -> None:
        """SIGKILL a child (and, for a supervisor, everything under it) by pid."""
        rec.kill_reason = rec.kill_reason or reason
        rec.killed_at = time.monotonic()
        pids = [n.pid for n in reaper.walk(rec.subtree) if n.pid]
        if rec.pid is not None:
            reaper.kill(rec.pid, rec.pid_create_time)
        else:
            self.send(rec.address, ActorExitRequest())
        for pid in pids:
            reaper.kill(pid)

    def receiveMsg_HeartbeatAck(self, msg: HeartbeatAck, sender: Any) -> None:
        rec = self.record_of(sender)
        if rec is None:
            return
        rec.last_ack = time.monotonic()
        rec.figures = msg.figures
        rec.subtree = msg.children
        if rec.pid != msg.pid:
            rec.pid = msg.pid
            rec.pid_create_time = reaper.create_time(msg.pid)

    # ---------------------------------------------------------------------- exits
    def receiveMsg_ChildStopping(self, msg: ChildStopping, sender: Any) -> None:
        rec = self.record_of(sender)
        if rec is None:
            return
        rec.stopping_reason = msg.reason
        if msg.normal:
            rec.normal_exit_announced = True
            self.send(sender, ActorExitRequest())

    def receiveMsg_ChildActorExited(self, msg: ChildActorExited, sender: Any) -> None:
        rec = self.record_of(msg.childAddress)
        if rec is None:
            return  # an earlier incarnation we already handled
        self.child_exited(rec)

    def child_exited(self, rec: ChildRecord) -> None:
        code = hardening.pop_exit_code(rec.address) if rec.address is not None else None
        reason = rec.kill_reason or describe_exit(code)
        if code in (EXIT_CRASH, EXIT_ESCALATE):
            left = read_crash_reason(self.data_dir, rec.spec.name)
            if left:
                reason = left if code == EXIT_ESCALATE else f"crashed: {left}"
        if rec.normal_exit_announced:
            reason = f"normal: {rec.stopping_reason}"
        was_running = rec.state
        started_at = rec.started_at or time.monotonic()
        name = rec.spec.name
        if not rec.spec.is_supervisor:
            self.peers.pop(name, None)
        rec.exited(reason)
        level = logging.INFO if rec.normal_exit_announced else logging.WARNING
        log().log(level, "supervisor %s: child %s exited (%s)", self.name, name, reason)
        if self.stop_queue is not None and (was_running == "stopping"
                                            or rec not in self.stop_queue):
            self.continue_stop()
            return
        # (During an orderly stop, a child not yet asked to stop — e.g. the journal while the
        # sensors drain into it — is restarted as usual.)
        if rec in self.group_pending:
            self.group_member_down(rec)
            return
        if was_running == "stopping":
            return
        if not should_restart(rec.spec.restart, rec.normal_exit_announced):
            rec.state = "dead"
            if all(r.ready or r.state == "dead" for r in self.records):
                self.all_ready()  # a child that will not come back no longer holds us up
            return
        now = time.monotonic()
        assert self.intensity is not None
        if not self.intensity.add_restart(now):
            self.escalate(f"{name} exited ({reason}); more than {self.intensity.intensity} "
                          f"restarts in {self.intensity.period_s:g}s")
            return
        rec.restarts += 1
        delay = rec.backoff.delay(started_at, now)
        group = self.restart_group(rec)
        if len(group) == 1 and not self.group_pending:
            self.schedule_restart([rec], delay)
        else:
            self.stop_group(group, delay)

    def restart_group(self, failed: ChildRecord) -> list[ChildRecord]:
        assert self.spec is not None
        strategy = self.spec.flags.strategy
        if strategy is Strategy.ONE_FOR_ONE:
            return [failed]
        index = self.records.index(failed)
        members = self.records if strategy is Strategy.ONE_FOR_ALL else self.records[index:]
        return [r for r in members if r is failed or r.address is not None]

    def stop_group(self, group: list[ChildRecord], delay: float) -> None:
        """rest_for_one / one_for_all: stop the failed child's group, then restart it. A
        failure while an earlier group is still going down joins that group."""
        members = set(map(id, group)) | set(map(id, self.group_pending))
        self.group_pending = [r for r in self.records if id(r) in members]
        self.group_delay = max(delay, self.group_delay)
        for rec in reversed(group):
            if rec.address is not None:
                rec.state = "restarting"
                self.kill_child(rec, "stopped by its supervisor to restart with a sibling")
        self.group_member_down(None)

    def group_member_down(self, rec: ChildRecord | None) -> None:
        if any(r.address is not None for r in self.group_pending):
            return
        group, self.group_pending = self.group_pending, []
        delay, self.group_delay = self.group_delay, 0.0
        self.schedule_restart(group, delay)

    def schedule_restart(self, group: list[ChildRecord], delay: float) -> None:
        for rec in group:
            rec.state = "backing_off" if delay > 0 else "restarting"
        names = tuple(r.spec.name for r in group)
        incarnations = tuple(r.incarnation for r in group)
        log().warning("supervisor %s: restarting %s in %.3fs", self.name, ", ".join(names), delay)
        if delay > 0:
            self.wakeupAfter(timedelta(seconds=delay), payload=("restart", names, incarnations))
        else:
            self.restart(names, incarnations)

    def on_wakeup(self, payload: tuple) -> None:
        if payload[0] == "restart":
            self.restart(payload[1], payload[2])

    def restart(self, names: tuple[str, ...], incarnations: tuple[int, ...]) -> None:
        for name, incarnation in zip(names, incarnations, strict=True):
            rec = self.record_named(name)
            stopped = self.stop_queue is not None and rec not in self.stop_queue
            if rec.incarnation == incarnation and rec.address is None and not stopped:
                self.start_child(rec)

    def escalate(self, reason: str) -> None:
        """Give up: kill every child, then exit abnormally so our parent decides."""
        log().error("supervisor %s gives up: %s", self.name, reason)
        for rec in self.records:
            if rec.address is not None:
                self.kill_child(rec, "supervisor gave up")
        self.on_escalate(reason)

    def on_escalate(self, reason: str) -> None:
        from actors.base import write_crash_reason

        write_crash_reason(self.data_dir, self.name, f"gave up: {reason}")
        import os

        os._exit(EXIT_ESCALATE)

    def _crash(self, trace: str) -> None:
        # A supervisor that crashes takes its children with it (OTP: they are linked), so its
        # successor never finds two of anything.
        for rec in self.records:
            if rec.address is not None:
                self.kill_child(rec, "supervisor crashed")
        super()._crash(trace)

    # ------------------------------------------------------------------- orderly stop
    def on_stop(self, msg: StopChild, sender: Any) -> None:
        self.begin_stop(sender, msg)

    def begin_stop(self, requester: Any, msg: StopChild) -> None:
        """Stop children one by one in reverse start order (sensors before the journal)."""
        self.stop_request = (requester, msg)
        self.stop_queue = [r for r in reversed(self.records)]
        self.continue_stop()

    def continue_stop(self) -> None:
        assert self.stop_queue is not None
        while self.stop_queue:
            rec = self.stop_queue[0]
            if rec.address is None:
                self.stop_queue.pop(0)
                continue
            if rec.state != "stopping":
                rec.state = "stopping"
                self.stop_deadline = time.monotonic() + rec.spec.shutdown_timeout_s
                self.send(rec.address, StopChild(rec.incarnation, rec.spec.shutdown_timeout_s))
            return
        self.stop_deadline = None
        self.finish_stop(clean=all(not r.kill_reason for r in self.records))

    def receiveMsg_ChildStopped(self, msg: ChildStopped, sender: Any) -> None:
        rec = self.record_of(sender)
        if rec is None or rec.state != "stopping":
            return
        rec.stopping_reason = f"stopped ({'clean' if msg.clean else msg.detail})"
        rec.normal_exit_announced = True
        self.stop_deadline = time.monotonic() + rec.spec.shutdown_timeout_s
        self.send(sender, ActorExitRequest())

    def check_stop_deadline(self, now: float) -> None:
        if self.stop_queue and self.stop_deadline is not None and now > self.stop_deadline:
            rec = self.stop_queue[0]
            log().error("supervisor %s: %s did not stop within %.1fs; killing it",
                        self.name, rec.spec.name, rec.spec.shutdown_timeout_s)
            self.kill_child(rec, "killed: did not stop in time")
            self.stop_deadline = now + EXIT_NOTICE_GRACE_S + 1.0

    def finish_stop(self, clean: bool) -> None:
        assert self.stop_request is not None
        requester, msg = self.stop_request
        self.reply_stopped(requester, msg, clean=clean)

    # ------------------------------------------------------------------------- helpers
    def record_of(self, address: Any) -> ChildRecord | None:
        for rec in self.records:
            if rec.address is not None and rec.address == address:
                return rec
        return None

    def record_named(self, name: str) -> ChildRecord:
        for rec in self.records:
            if rec.spec.name == name:
                return rec
        raise KeyError(name)

    def subtree(self) -> tuple:
        now = time.monotonic()
        return tuple(rec.node(now) for rec in self.records)

    def figures(self) -> list[tuple[str, Any]]:
        strategy = self.spec.flags.strategy.value if self.spec else "?"
        return [
            ("strategy", strategy),
            ("children", len(self.records)),
            ("restarts", sum(r.restarts for r in self.records)),
        ]
