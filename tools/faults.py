"""Fault injection from outside a running gateway (tests and drills).

Where this sits: outside the gateway, beside the inspector. SIGKILL/SIGSTOP need only a pid
(from `fetch_tree`); faults inside an actor (exception, exit, segfault, hang, slow) go through
the gateway root as `FaultRequest`, honoured only when the config sets
``[gateway] fault_injection = true``.
"""

from __future__ import annotations

import itertools
import os
import signal
import time

from messages.supervision import FaultForwarded, FaultRequest, InjectFault
from supervisors import system

_ids = itertools.count(1)


class FaultError(RuntimeError):
    """The fault could not be injected (injection off, unknown actor, no gateway)."""


def inject(admin_port: int, target: str, kind: str, seconds: float = 0.0,
           timeout_s: float = 5.0) -> None:
    """Make actor ``target`` fail in a real way inside its own process."""
    from supervisors.gateway import GLOBAL_NAME, Gateway

    asys = system.attach(admin_port)
    root = asys.createActor(Gateway, globalName=GLOBAL_NAME)
    request = FaultRequest(next(_ids), target, InjectFault(kind, seconds))
    asys.tell(root, request)
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        reply = asys.listen(remaining)
        if isinstance(reply, FaultForwarded) and reply.request_id == request.request_id:
            if not reply.ok:
                raise FaultError(reply.detail)
            return
        if reply is None:
            break
    raise FaultError(f"the gateway on admin port {admin_port} did not answer")


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send a real signal to one actor process."""
    os.kill(pid, sig)
