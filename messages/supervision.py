"""The supervision conversation: starting, watching, restarting and inspecting actors.

Where this sits: every supervised actor (journal, sensors, later router, model, uplink) gets a
`ChildInit` from its supervisor, answers `Heartbeat` with `HeartbeatAck` (its pid and figures),
and learns peers' current addresses from `PeersChanged`. The gateway root answers
`TopologyRequest` from the inspector with the whole tree.
"""

from __future__ import annotations

from typing import Any

import attrs

#: Actor states shown by the inspector.
STATES = ("starting", "running", "restarting", "backing_off", "stopping", "dead")


@attrs.frozen(slots=True)
class ChildInit:
    """Command from a supervisor to a child it just created: your name, your settings, your
    peers' addresses, and how often you will be heartbeated."""

    name: str
    settings: Any
    peers: tuple[tuple[str, Any], ...]
    data_dir: str
    fault_injection: bool = False
    #: The journal's key file ("" = payloads in clear): the journal seals with it, consumers
    #: open what they read with it (actors/journal/keys.py).
    journal_key_file: str = ""
    #: Scheduling niceness to add (0: as the parent). Consumers run nicer than the journal
    #: path, so a busy router never delays acknowledgements (I6).
    nice: int = 0


@attrs.frozen(slots=True)
class ChildReady:
    """Fact from a child: initialised and working. ``pgid`` lets the run process clean up."""

    name: str
    pid: int
    pgid: int


@attrs.frozen(slots=True)
class ChildStopping:
    """Fact from a child: I am about to exit on my own; ``normal`` tells a transient child's
    supervisor not to restart it."""

    name: str
    normal: bool
    reason: str


@attrs.frozen(slots=True)
class Heartbeat:
    """Liveness probe from a supervisor; the child must answer within its deadline."""

    seq: int


@attrs.frozen(slots=True)
class HeartbeatAck:
    """Answer to `Heartbeat`: the child's pid and its own figures (name -> number or text);
    a child supervisor adds its subtree, so the root can answer the inspector at once."""

    name: str
    seq: int
    pid: int
    figures: tuple[tuple[str, Any], ...] = ()
    children: tuple[ActorNode, ...] = ()


@attrs.frozen(slots=True)
class PeersChanged:
    """Event down the tree: these peers (name -> address) have new addresses."""

    peers: tuple[tuple[str, Any], ...]


@attrs.frozen(slots=True)
class StopChild:
    """Command: stop in order (flush, finish in-flight work) and answer `ChildStopped`."""

    request_id: int
    timeout_s: float


@attrs.frozen(slots=True)
class ChildStopped:
    """Fact: the child finished its orderly stop (``clean`` false if it gave up waiting)."""

    name: str
    request_id: int
    clean: bool
    detail: str = ""


@attrs.frozen(slots=True)
class InjectFault:
    """Test/drill command: make this actor fail in a real way. Honoured only when the gateway
    config enables fault injection. ``kind``: ``exception`` | ``exit`` | ``segfault`` |
    ``hang`` | ``slow``; ``seconds`` for ``slow``."""

    kind: str
    seconds: float = 0.0


FAULT_KINDS = ("exception", "exit", "segfault", "hang", "slow")


@attrs.frozen(slots=True)
class ActorNode:
    """One node of the supervision tree as the inspector shows it."""

    name: str
    cls: str
    pid: int | None
    state: str
    restarts: int
    last_exit: str | None
    uptime_s: float | None
    figures: tuple[tuple[str, Any], ...] = ()
    children: tuple[ActorNode, ...] = ()
    #: Seconds since its supervisor last heard from it (ChildReady or a heartbeat answer) while
    #: it should be answering; None when unknown or not running (the root, a dead child). A
    #: child silent for much longer than the heartbeat interval is hung or stopped.
    silent_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cls": self.cls,
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "uptime_s": None if self.uptime_s is None else round(self.uptime_s, 3),
            "figures": dict(self.figures),
            "children": [c.to_json() for c in self.children],
            "silent_s": None if self.silent_s is None else round(self.silent_s, 3),
        }


@attrs.frozen(slots=True)
class TopologyRequest:
    """Query from the inspector (or the run process) for the live tree."""

    request_id: int


@attrs.frozen(slots=True)
class TopologyReport:
    """Answer to `TopologyRequest`: the tree rooted at the answering supervisor."""

    request_id: int
    root: ActorNode


@attrs.frozen(slots=True)
class FaultRequest:
    """Test/drill command to the gateway root: forward `InjectFault` to the actor named
    ``target``. Refused unless the config enables fault injection."""

    request_id: int
    target: str
    fault: InjectFault


@attrs.frozen(slots=True)
class FaultForwarded:
    """Answer to `FaultRequest`: whether the fault was forwarded, and why not."""

    request_id: int
    ok: bool
    detail: str = ""
