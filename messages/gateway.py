"""The gateway conversation: the `fleetgw run` process and the root supervisor."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(slots=True)
class StartGateway:
    """Command from the run process: build the supervision tree for ``config``."""

    request_id: int
    config: Any
    data_dir: str


@attrs.frozen(slots=True)
class GatewayStarted:
    """Fact: every child answered `ChildReady`. ``pgid`` is the actor system's process group."""

    request_id: int
    pgid: int
    admin_pid: int


@attrs.frozen(slots=True)
class GatewayNotConfigured:
    """Answer of a root that never got `StartGateway` (e.g. created by an inspector probe)."""

    request_id: int


@attrs.frozen(slots=True)
class StopGateway:
    """Command: stop in order (sensors stop and drain, then the journal flushes)."""

    request_id: int
    timeout_s: float


@attrs.frozen(slots=True)
class GatewayStopped:
    """Fact: orderly stop finished; ``clean`` false if a stage timed out."""

    request_id: int
    clean: bool
    detail: str = ""


@attrs.frozen(slots=True)
class GatewayFailed:
    """Event to the run process: the root exceeded its restart intensity (escalation to the OS:
    the run process exits non-zero and systemd restarts it)."""

    reason: str
