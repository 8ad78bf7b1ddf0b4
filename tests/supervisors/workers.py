"""A small supervised actor for the supervisor tests: answers pings with its pid, asks a peer
for its pid (through the address its supervisor gave it), and stops normally on request.

Messages are tuples ``(op, tag, *args)``; replies are dicts with the same ``tag``.
"""

from __future__ import annotations

import os
from typing import Any

from actors.base import SupervisedActor


class Worker(SupervisedActor):
    def receiveMsg_tuple(self, msg: tuple, sender: Any) -> None:
        op, tag = msg[0], msg[1]
        if op == "ping":
            self.send(sender, {"tag": tag, "name": self.name, "pid": os.getpid()})
        elif op == "peer_pid":  # ("peer_pid", tag, peer name): the peer answers the asker
            self.send(self.peers[msg[2]], ("ping_for", tag, sender))
        elif op == "ping_for":
            self.send(msg[2], {"tag": tag, "name": self.name, "pid": os.getpid()})
        elif op == "stop_normally":
            self.stop_normally("work done")
