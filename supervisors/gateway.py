"""The gateway root: the Supervisor at the top of the tree, and the run process's counterpart.

Where this sits: `fleetgw run` creates it (global name ``fleetgw-gateway``) and sends
`StartGateway`; it builds the tree of supervisors.tree and answers `GatewayStarted` when every
child is ready. It answers the inspector's `TopologyRequest` from what heartbeats told it, stops
the tree in order on `StopGateway`, and escalates to the OS (`GatewayFailed` to the run process,
which exits non-zero so systemd restarts it) when its own restart intensity is exceeded.
"""

from __future__ import annotations

import os
import time
from typing import Any

from thespian.actors import ActorExitRequest

from actors.base import log
from messages.gateway import (
    GatewayFailed,
    GatewayNotConfigured,
    GatewayStarted,
    GatewayStopped,
    StartGateway,
    StopGateway,
)
from messages.health import HealthReport, HealthRequest, ModelSelfTested, SelfTestModel
from messages.supervision import (
    ActorNode,
    FaultForwarded,
    FaultRequest,
    StopChild,
    TopologyReport,
    TopologyRequest,
)
from supervisors.supervisor import Supervisor
from supervisors.tree import actor_names, gateway_tree

#: The global name under which the run process and the inspector find the root.
GLOBAL_NAME = "fleetgw-gateway"
#: A root created by an inspector's lookup while no gateway runs exits after this long unless
#: a run process claims it with StartGateway. (The inspector never stops a root itself: its
#: lookup can race the run process's own creation of the same global actor.)
UNCLAIMED_EXIT_S = 30.0
#: The model runner's name in the tree (supervisors.tree).
MODEL = "model"


def installed_version() -> str:
    """The fleetgw release installed now (read when the gateway starts: an upgrade may replace
    the package under a running gateway, which still runs the old code)."""
    from importlib import metadata

    try:
        return metadata.version("fleetgw")
    except metadata.PackageNotFoundError:
        return "unknown"


class Gateway(Supervisor):
    """Root supervisor of one gateway."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The root is configured by StartGateway, not ChildInit, and must answer the inspector
        # before that (GatewayNotConfigured): it never holds messages back.
        self.initialised = True
        self.run_process: Any = None
        self.start_request: int | None = None
        self.failed: str | None = None
        self.unclaimed_timer = False
        self.version = "unknown"

    def receiveMessage(self, message: Any, sender: Any) -> Any:
        if self.spec is None and not self.unclaimed_timer:
            self.unclaimed_timer = True
            self.start_timer("unclaimed", UNCLAIMED_EXIT_S)
        return super().receiveMessage(message, sender)

    def on_timer_unclaimed(self) -> None:
        if self.spec is None:
            self.send(self.myAddress, ActorExitRequest())

    def receiveMsg_StartGateway(self, msg: StartGateway, sender: Any) -> None:
        if self.spec is not None:
            log().warning("gateway already started; ignoring a second StartGateway")
            return
        from supervisors.hardening import restore_fatal_signal_defaults

        restore_fatal_signal_defaults()
        self.name = "gateway"
        self.run_process = sender
        self.start_request = msg.request_id
        self.data_dir = msg.data_dir
        self.settings = msg.config
        self.fault_injection = msg.config.gateway.fault_injection
        self.journal_key_file = msg.config.journal.key_path(msg.data_dir)
        self.started_mono = time.monotonic()
        self.version = installed_version()
        self.start_tree(gateway_tree(msg.config))

    def on_all_ready(self) -> None:
        self.send(
            self.run_process,
            GatewayStarted(self.start_request or 0, os.getpgid(0), os.getppid()),
        )

    def receiveMsg_TopologyRequest(self, msg: TopologyRequest, sender: Any) -> None:
        if self.spec is None:
            self.send(sender, GatewayNotConfigured(msg.request_id))
            return
        self.send(sender, TopologyReport(msg.request_id, self.node()))

    def receiveMsg_HealthRequest(self, msg: HealthRequest, sender: Any) -> None:
        if self.spec is None:
            self.send(sender, GatewayNotConfigured(msg.request_id))
            return
        config = self.settings
        self.send(sender, HealthReport(
            request_id=msg.request_id, root=self.node(), expected=actor_names(config),
            version=self.version, data_dir=os.path.abspath(self.data_dir),
            journal_budget_bytes=config.journal.disk_budget_bytes,
            heartbeat_interval_s=config.supervision.heartbeat_interval_s,
            uplink_configured=config.uplink.enabled, model_configured=config.model.enabled))

    def receiveMsg_SelfTestModel(self, msg: SelfTestModel, sender: Any) -> None:
        # Forwarded with the asker's address: the runner answers it directly.
        address = self.peers.get(MODEL)
        if self.spec is None or address is None:
            configured = self.spec is not None and self.settings.model.enabled
            self.send(sender, ModelSelfTested(
                msg.request_id, ok=False,
                detail="the model runner is not running" if configured
                else "no model runner is configured"))
            return
        self.send(address, SelfTestModel(msg.request_id, reply_to=sender))

    def node(self) -> ActorNode:
        state = "dead" if self.failed else ("stopping" if self.stop_queue is not None
                                            else "running")
        return ActorNode(
            name="gateway",
            cls="Gateway",
            pid=os.getpid(),
            state=state,
            restarts=0,
            last_exit=self.failed,
            uptime_s=time.monotonic() - self.started_mono,
            figures=tuple(self.figures()),
            children=self.subtree(),
        )

    def receiveMsg_FaultRequest(self, msg: FaultRequest, sender: Any) -> None:
        if not self.fault_injection:
            self.send(sender, FaultForwarded(msg.request_id, False,
                                             "fault injection is off in this gateway's config"))
            return
        address = self.peers.get(msg.target)
        if address is None:
            rec = next((r for r in self.records if r.spec.name == msg.target), None)
            address = rec.address if rec is not None else None
        if address is None:
            self.send(sender, FaultForwarded(msg.request_id, False,
                                             f"no running actor named {msg.target!r}"))
            return
        self.send(address, msg.fault)
        self.send(sender, FaultForwarded(msg.request_id, True))

    def receiveMsg_StopGateway(self, msg: StopGateway, sender: Any) -> None:
        if self.spec is None:
            self.send(sender, GatewayStopped(msg.request_id, clean=True, detail="not started"))
            return
        self.begin_stop(sender, StopChild(msg.request_id, msg.timeout_s))

    def finish_stop(self, clean: bool) -> None:
        assert self.stop_request is not None
        requester, msg = self.stop_request
        self.send(requester, GatewayStopped(msg.request_id, clean))

    def child_exited(self, rec: Any) -> None:
        if self.failed:  # gave up already: the run process is tearing everything down
            rec.exited(rec.kill_reason or "stopped: the gateway gave up")
            return
        super().child_exited(rec)

    def on_escalate(self, reason: str) -> None:
        # The top escalates to the OS: the run process exits non-zero (systemd restarts it).
        self.failed = reason
        if self.run_process is not None:
            self.send(self.run_process, GatewayFailed(reason))
