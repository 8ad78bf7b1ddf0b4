"""The common shell of every supervised actor: init, heartbeat, peers, orderly stop, faults.

Where this sits: the journal, every sensor, and later the router, model runner and uplink
subclass `SupervisedActor`; the Supervisor actor drives it with the messages of
`messages.supervision`. Subclasses implement ``on_init`` (build their plain logic object),
``figures`` (what the inspector shows), ``on_peers_changed`` and ``on_stop``, plus
``receiveMsg_<MessageClass>`` handlers for their own protocol.

Let it crash: an exception in a handler is logged and the process exits with status 70, so the
supervisor restarts the actor from its durable state. (Thespian's own behaviour — retry once,
then return the message as PoisonMessage and keep running with possibly broken state — is not
what a gateway that must never lose data wants.)
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import traceback
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from thespian.actors import (
    ActorExitRequest,
    ActorTypeDispatcher,
    ThespianWatch,
    WakeupMessage,
    WatchMessage,
)

from messages.supervision import (
    ChildInit,
    ChildReady,
    ChildStopped,
    ChildStopping,
    Heartbeat,
    HeartbeatAck,
    InjectFault,
    PeersChanged,
    StopChild,
)

#: Exit status of an actor process that crashed on an unhandled exception.
EXIT_CRASH = 70
#: Messages held while waiting for ChildInit (beyond this they are dropped: their senders
#: resend what matters, e.g. sensors resend unacknowledged batches).
MAX_EARLY_MESSAGES = 1000


def crash_file(data_dir: str, name: str) -> str:
    """Where an actor leaves the reason of its crash for its supervisor."""
    safe = name.replace(":", "_").replace("/", "_")
    return os.path.join(data_dir, "run", f"crash-{safe}.txt")


def write_crash_reason(data_dir: str, name: str, reason: str) -> None:
    try:
        os.makedirs(os.path.join(data_dir, "run"), exist_ok=True)
        with open(crash_file(data_dir, name), "w") as fh:
            fh.write(reason[:500])
    except OSError:
        pass  # the exit code still says "crashed"


def read_crash_reason(data_dir: str, name: str) -> str | None:
    path = crash_file(data_dir, name)
    try:
        with open(path) as fh:
            reason = fh.read()
        os.unlink(path)
        return reason
    except OSError:
        return None


def latency_figures(name: str, samples: Iterable[tuple[float, float]],
                    since: float) -> list[tuple[str, float]]:
    """``<name>_ms_p50`` and ``<name>_ms_p99`` of the ``(monotonic time, seconds)`` samples
    taken at or after ``since`` (none when there are none): an actor's recent latencies."""
    recent = sorted(seconds for at, seconds in samples if at >= since)
    if not recent:
        return []
    return [(f"{name}_ms_p50", round(recent[len(recent) // 2] * 1000, 2)),
            (f"{name}_ms_p99", round(recent[len(recent) * 99 // 100] * 1000, 2))]


def log() -> logging.Logger:
    """The logger, fetched at call time (Thespian swaps the root logger in actor processes)."""
    return logging.getLogger("fleetgw")


class SupervisedActor(ActorTypeDispatcher):
    """Base of every supervised actor. Subclasses override the ``on_*`` hooks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name: str = "?"
        self.settings: Any = None
        self.peers: dict[str, Any] = {}
        self.parent: Any = None
        self.data_dir: str | None = None
        self.fault_injection = False
        self.journal_key_file = ""
        self.started_mono = time.monotonic()
        self._timers: set[str] = set()
        self.initialised = False
        self._early: list[tuple[Any, Any]] = []

    # ----------------------------------------------------------------- dispatch + let it crash
    def receiveMessage(self, message: Any, sender: Any) -> Any:
        # Messages from peers can overtake our ChildInit (they come from other senders): hold
        # them until we are initialised, then handle them in order.
        if not self.initialised and not isinstance(message, (ChildInit, ActorExitRequest)):
            if len(self._early) < MAX_EARLY_MESSAGES:
                self._early.append((message, sender))
            return None
        try:
            super().receiveMessage(message, sender)
            while self._early and self.initialised:
                early, early_sender = self._early.pop(0)
                super().receiveMessage(early, early_sender)
        except Exception:
            self._crash(traceback.format_exc())
        # Thespian replaces the watched descriptors with what every handler returns, so each
        # return names them all again (an empty list stops watching).
        fds = self.watched_fds() if self.initialised else []
        return ThespianWatch(fds) if fds else None

    def _crash(self, trace: str) -> None:
        last = trace.strip().splitlines()[-1] if trace.strip() else "unknown error"
        log().error("actor %s crashed: %s\n%s", self.name, last, trace)
        # A message sent now would be lost with the process; the supervisor reads the reason
        # from this file when it handles the exit.
        if self.data_dir is not None:
            write_crash_reason(self.data_dir, self.name, last)
        os._exit(EXIT_CRASH)

    def stop_normally(self, reason: str) -> None:
        """A transient actor that finished its work: the supervisor records a normal exit and
        then tells us to exit (so the announcement cannot race the exit notice)."""
        self.send(self.parent, ChildStopping(self.name, normal=True, reason=reason))

    # ---------------------------------------------------------------- supervision protocol
    def receiveMsg_ChildInit(self, msg: ChildInit, sender: Any) -> None:
        from supervisors.hardening import restore_fatal_signal_defaults

        restore_fatal_signal_defaults()
        self.name = msg.name
        self.settings = msg.settings
        self.peers = dict(msg.peers)
        self.parent = sender
        self.data_dir = msg.data_dir
        self.fault_injection = msg.fault_injection
        self.journal_key_file = msg.journal_key_file
        self.started_mono = time.monotonic()
        if msg.nice:
            os.nice(msg.nice)
        self.on_init()
        self.initialised = True
        if self.ready_on_init:
            self.announce_ready()

    #: Whether ChildReady goes out right after on_init (supervisors wait for their children).
    ready_on_init = True

    def announce_ready(self) -> None:
        self.send(self.parent, ChildReady(self.name, os.getpid(), os.getpgid(0)))

    def receiveMsg_Heartbeat(self, msg: Heartbeat, sender: Any) -> None:
        self.send(
            sender,
            HeartbeatAck(self.name, msg.seq, os.getpid(), tuple(self.figures()), self.subtree()),
        )

    def subtree(self) -> tuple:
        """Nodes of this actor's children for the inspector (supervisors only)."""
        return ()

    def receiveMsg_PeersChanged(self, msg: PeersChanged, sender: Any) -> None:
        changed = {n for n, a in msg.peers if self.peers.get(n) != a}
        self.peers.update(dict(msg.peers))
        if changed:
            self.on_peers_changed(changed)

    def receiveMsg_StopChild(self, msg: StopChild, sender: Any) -> None:
        self.on_stop(msg, sender)

    def reply_stopped(self, to: Any, msg: StopChild, clean: bool, detail: str = "") -> None:
        """Answer a StopChild (subclasses with asynchronous stops call this when done)."""
        self.send(to, ChildStopped(self.name, msg.request_id, clean, detail))

    def receiveMsg_InjectFault(self, msg: InjectFault, sender: Any) -> None:
        if not self.fault_injection:
            log().warning("actor %s refused InjectFault(%s): fault injection is off",
                          self.name, msg.kind)
            return
        log().warning("actor %s: injected fault %s", self.name, msg.kind)
        if msg.kind == "exception":
            raise RuntimeError(f"injected exception in {self.name}")
        if msg.kind == "exit":
            os._exit(EXIT_CRASH)
        if msg.kind == "segfault":
            ctypes.string_at(0)
        if msg.kind == "hang":
            while True:  # a real busy hang: ignores ActorExitRequest and SIGTERM
                pass
        if msg.kind == "slow":
            time.sleep(msg.seconds)

    # ------------------------------------------------------------------------------ timers
    def receiveMsg_WakeupMessage(self, msg: WakeupMessage, sender: Any) -> None:
        name = msg.payload
        if isinstance(name, str) and name in self._timers:
            self._timers.discard(name)
            getattr(self, f"on_timer_{name}")()
        elif isinstance(name, tuple):
            self.on_wakeup(name)

    def start_timer(self, name: str, seconds: float) -> None:
        """Call ``self.on_timer_<name>()`` after ``seconds``; at most one pending per name."""
        if name not in self._timers:
            self._timers.add(name)
            self.wakeupAfter(timedelta(seconds=max(0.0, seconds)), payload=name)

    def on_wakeup(self, payload: tuple) -> None:
        """Tuple-payload wakeups (subclasses with per-item timers)."""

    def receiveMsg_WatchMessage(self, msg: WatchMessage, sender: Any) -> None:
        self.on_readable(list(msg.ready))

    def receiveMsg_ActorExitRequest(self, msg: ActorExitRequest, sender: Any) -> None:
        self.on_exit()

    def receiveUnrecognizedMessage(self, message: Any, sender: Any) -> None:
        log().warning("actor %s ignored unexpected %s", self.name, type(message).__name__)

    # ------------------------------------------------------------------------------- hooks
    def on_init(self) -> None:
        """Build the logic object from ``self.settings``; raise to fail the start."""

    def figures(self) -> list[tuple[str, Any]]:
        """The actor's own figures for the inspector (name, number or text)."""
        return [("uptime_s", round(time.monotonic() - self.started_mono, 1))]

    def on_peers_changed(self, names: set[str]) -> None:
        """Peers in ``names`` have new addresses (e.g. the journal restarted)."""

    def on_stop(self, msg: StopChild, sender: Any) -> None:
        """Orderly stop; the default stops at once."""
        self.reply_stopped(sender, msg, clean=True)

    def on_exit(self) -> None:
        """The actor is exiting (ActorExitRequest): release resources."""

    def watched_fds(self) -> list[int]:
        """File descriptors Thespian should watch for this actor (multiprocTCPBase): when one
        is readable, ``on_readable`` gets it in the actor's own thread — how a source's
        socket is served without a thread that sends (THESPIAN_NOTES.md)."""
        return []

    def on_readable(self, fds: list[int]) -> None:
        """Some of ``watched_fds()`` are readable."""
