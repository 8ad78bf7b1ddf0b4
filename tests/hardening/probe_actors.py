"""Small actors the hardening scenarios drive: a `Probe` that reports its process ids or
crashes on request, and a `Parent` that starts probes and records every ChildActorExited.

Messages are plain tuples ``(op, tag, *args)``; every reply is a dict carrying the same ``tag``
so the driver can match replies to requests (``ask()`` returns whatever arrives next).
"""

from __future__ import annotations

import ctypes
import logging
import os

from thespian.actors import Actor, ActorExitRequest, ChildActorExited

from supervisors import hardening


def process_ids() -> dict[str, int]:
    return {"pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0)}


class Probe(Actor):
    """("ids", tag) -> {"tag", "pid", "ppid", "pgid"}; ("log", tag) -> the same, after logging a
    warning; ("segv", tag, restore) -> reads address 0
    (after `hardening.restore_fatal_signal_defaults()` if ``restore``)."""

    def receiveMessage(self, msg, sender):
        if not isinstance(msg, tuple):
            return
        op, tag = msg[0], msg[1]
        if op == "ids":
            self.send(sender, {"tag": tag, **process_ids()})
        elif op == "log":  # log through Thespian's logger process, then answer
            logging.getLogger("tests.hardening.probe").warning("probe %s logs", os.getpid())
            self.send(sender, {"tag": tag, **process_ids()})
        elif op == "segv":
            if msg[2:3] == (True,):
                hardening.restore_fatal_signal_defaults()
            ctypes.string_at(0)  # reads address 0: SIGSEGV


class Parent(Actor):
    """Starts probes and records each ChildActorExited with `hardening.pop_exit_code`.

    ("ids", tag) -> own ids; ("spawn", tag, n) -> {"tag", "children": [[addr, pid], ...]};
    ("exits", tag) -> {"tag", "exits": [[addr, exit code or None], ...], "unexpected": [addr]};
    ("segv-all", tag, restore) -> every live child is told to crash;
    ("stop-all", tag) -> every live child gets ActorExitRequest.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.live = {}  # str(real child address) -> address
        self.exits = []  # [str(address), exit code or None]: first notice per live child
        self.unexpected = []  # str(address) of notices for children not (or no longer) live
        self.spawning = None  # (requester, tag, expected count, [[addr, pid], ...])

    def receiveMessage(self, msg, sender):
        if isinstance(msg, ChildActorExited):
            key = str(msg.childAddress)
            if self.live.pop(key, None) is None:
                self.unexpected.append(key)  # a second notice for a child, or not our child
            else:
                self.exits.append([key, hardening.pop_exit_code(msg.childAddress)])
            return
        if isinstance(msg, dict) and self.spawning and msg.get("tag") == self.spawning[1]:
            requester, tag, expected, got = self.spawning
            self.live[str(sender)] = sender
            got.append([str(sender), msg["pid"]])
            if len(got) == expected:
                self.spawning = None
                self.send(requester, {"tag": tag, "children": got})
            return
        if not isinstance(msg, tuple):
            return
        op, tag = msg[0], msg[1]
        if op == "ids":
            self.send(sender, {"tag": tag, **process_ids()})
        elif op == "spawn":
            self.spawning = (sender, tag, msg[2], [])
            for _ in range(msg[2]):
                self.send(self.createActor(Probe), ("ids", tag))
        elif op == "exits":
            self.send(
                sender, {"tag": tag, "exits": list(self.exits), "unexpected": list(self.unexpected)}
            )
        elif op == "stop-all":
            for child in self.live.values():
                self.send(child, ActorExitRequest())
        elif op == "segv-all":
            for child in self.live.values():
                self.send(child, ("segv", tag, msg[2]))
