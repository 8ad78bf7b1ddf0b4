"""What a supervisor knows about each of its children: a plain record per child.

Where this sits: `supervisors.supervisor.Supervisor` keeps one `ChildRecord` per child spec and
updates it from ChildReady, HeartbeatAck and ChildActorExited; the inspector's tree is built
from these records.
"""

from __future__ import annotations

import time
from typing import Any

import attrs

from messages.supervision import ActorNode
from supervisors.policy import Backoff
from supervisors.spec import ChildSpec, SupervisorFlags


@attrs.define(eq=False)
class ChildRecord:
    """Live state of one child. ``incarnation`` counts starts, so a late exit notice of an
    earlier incarnation is recognised and ignored."""

    spec: ChildSpec
    backoff: Backoff
    address: Any = None
    pid: int | None = None
    pid_create_time: float | None = None
    state: str = "starting"
    incarnation: int = 0
    restarts: int = 0
    last_exit: str | None = None
    started_at: float | None = None
    ready: bool = False
    last_ack: float | None = None
    hb_seq: int = 0
    figures: tuple[tuple[str, Any], ...] = ()
    subtree: tuple[ActorNode, ...] = ()
    stopping_reason: str | None = None
    normal_exit_announced: bool = False
    killed_at: float | None = None
    kill_reason: str | None = None

    @classmethod
    def for_spec(cls, spec: ChildSpec, flags: SupervisorFlags) -> ChildRecord:
        return cls(
            spec=spec,
            backoff=Backoff(flags.backoff_initial_s, flags.backoff_max_s, flags.backoff_reset_s),
        )

    def started(self, address: Any, now: float) -> None:
        """A new incarnation was created at ``address``."""
        self.address = address
        self.pid = None
        self.pid_create_time = None
        self.state = "starting"
        self.incarnation += 1
        self.started_at = now
        self.ready = False
        self.last_ack = now
        self.figures = ()
        self.subtree = ()
        self.normal_exit_announced = False
        self.killed_at = None
        self.kill_reason = None

    def exited(self, reason: str) -> None:
        self.address = None
        self.pid = None
        self.ready = False
        self.last_exit = reason
        self.state = "dead"

    def node(self, now_mono: float) -> ActorNode:
        uptime = silent = None
        if self.started_at is not None and self.state in ("running", "starting", "stopping"):
            uptime = now_mono - self.started_at
            if self.last_ack is not None and self.killed_at is None:
                silent = max(0.0, now_mono - self.last_ack)
        return ActorNode(
            name=self.spec.name,
            cls=self.spec.actor_class.rpartition(".")[2],
            pid=self.pid,
            state=self.state,
            restarts=self.restarts,
            last_exit=self.last_exit,
            uptime_s=uptime,
            figures=self.figures,
            children=self.subtree,
            silent_s=silent,
        )


def monotonic() -> float:
    return time.monotonic()
