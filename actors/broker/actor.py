"""`BrokerActor`: the supervised shell around `MosquittoLauncher` (the gateway's MQTT broker).

Where this sits: a child of the gateway root, started before the sensors so MQTT sensors find
it listening (they reconnect with backoff anyway). It starts mosquitto in `on_init`, calls
`check` on a timer (readiness, restarts after an exit, log rotation) and stops it in an
orderly stop, so mosquitto saves its sessions and queued messages. If this actor process dies,
even by SIGKILL, the broker gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and exits, saving
its state; the next incarnation waits for it before starting a new one.

Broker trouble (not installed, port in use, bad extra_config) never crashes the actor: a crash
loop here would escalate and stop the journal too (I6). It is logged, shown in the figures
(``broker_problem``) and retried with backoff.
"""

from __future__ import annotations

import os
import time
from typing import Any

from actors.base import SupervisedActor, log
from actors.broker.launcher import MosquittoLauncher
from config.broker import BrokerSettings
from messages.supervision import StopChild

#: Seconds between calls of `MosquittoLauncher.check`.
CHECK_S = 0.2
#: How long `on_init` waits for the broker to listen (the supervisor's heartbeat deadline is
#: a few seconds; a slower start is noticed by the timer instead).
READY_WAIT_S = 1.0
#: Seconds of an orderly stop kept back for answering the supervisor.
STOP_MARGIN_S = 0.5


class BrokerActor(SupervisedActor):
    """Runs the local mosquitto for the `BrokerSettings` it gets as settings."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.launcher: MosquittoLauncher | None = None
        self.reported = ""

    def on_init(self) -> None:
        settings: BrokerSettings = self.settings
        assert self.data_dir is not None
        data_dir = settings.data_dir or os.path.join(self.data_dir, "broker")
        self.launcher = MosquittoLauncher(settings, data_dir)
        self.launcher.start()
        # Give a normal start (tens of ms) the chance to finish before ChildReady, so sensors
        # started next find the broker listening.
        deadline = time.monotonic() + READY_WAIT_S
        while (self.launcher.state == "starting" and not self.launcher.ready()
               and time.monotonic() < deadline):
            time.sleep(0.01)
        self.report()
        self.start_timer("check", CHECK_S)

    def on_timer_check(self) -> None:
        if self.launcher is None or self.launcher.state == "stopped":
            return
        self.launcher.check()
        self.report()
        self.start_timer("check", CHECK_S)

    def report(self) -> None:
        """Log each new problem once, and the recovery."""
        assert self.launcher is not None
        problem = self.launcher.problem
        if problem and problem != self.reported:
            log().error("broker: %s", problem)
        elif not problem and self.reported:
            log().warning("broker: mosquitto listens again on port %d (pid %d, %d restarts)",
                          self.launcher.settings.port, self.launcher.pid,
                          self.launcher.restarts)
        self.reported = problem

    def on_stop(self, msg: StopChild, sender: Any) -> None:
        clean = True
        if self.launcher is not None:
            clean = self.launcher.stop(max(0.5, msg.timeout_s - STOP_MARGIN_S))
        self.reply_stopped(sender, msg, clean=clean,
                           detail="" if clean else "mosquitto did not stop in time (SIGKILL)")

    def on_exit(self) -> None:
        if self.launcher is not None:
            self.launcher.stop(2.0)

    def figures(self) -> list[tuple[str, Any]]:
        figures = super().figures()
        if self.launcher is not None:
            figures.extend((f"broker_{k}", v) for k, v in self.launcher.figures().items())
        return figures
