"""Sensor actors: one per configured sensor, a thin shell over `SensorOutbox` and a source.

Where this sits: the first step of the data path. A sensor reads its source, batches readings
(`SensorOutbox`), sends each batch to the journal as `Append`, keeps it until `Appended`
(bounded in bytes), resends after a timeout or when the journal's address changes (it
restarted), and holds its source when the buffer is full (back-pressure) — nothing is dropped.
`SensorActor` is the common base; `SimSensor` drives a `SimulatedSource`. Later sources (MQTT,
CAN, NMEA) subclass `SensorActor` the same way.
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Any

from actors.base import SupervisedActor, log
from actors.sensors.outbox import NEVER_RETRY, SensorOutbox
from actors.sensors.sim import SimulatedSource
from messages.journal import Appended, AppendRefused
from messages.supervision import StopChild

#: How often a sensor wakes up to produce, batch and resend, seconds.
TICK_S = 0.02
#: Ack latencies kept for the figures (and the benchmark): the last LATENCY_WINDOW_S seconds.
LATENCY_SAMPLES = 20000
LATENCY_WINDOW_S = 5.0


class SensorActor(SupervisedActor):
    """Common sensor shell: outbox, ticks, acks, back-pressure, orderly drain."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outbox: SensorOutbox | None = None
        self.stopping: tuple[Any, StopChild, float] | None = None
        self.stopped = False
        self.latencies: deque[tuple[float, float]] = deque(maxlen=LATENCY_SAMPLES)

    def on_init(self) -> None:
        s = self.settings
        # A fresh incarnation id per start: batch numbers restart at 1 without colliding
        # with the ids a previous incarnation left in the journal.
        incarnation = random.SystemRandom().getrandbits(62)
        self.outbox = SensorOutbox(
            s.id,
            incarnation,
            batch_max_readings=s.batch_max_readings,
            batch_max_age_s=s.batch_max_age_s,
            buffer_max_bytes=s.buffer_max_bytes,
            max_in_flight=s.max_in_flight,
            resend_after_s=s.resend_after_s,
        )
        self.open_source()
        self.start_timer("tick", TICK_S)

    # ---- source hooks -------------------------------------------------------------------
    def open_source(self) -> None:
        """Open the sensor's source."""

    def produce(self) -> None:
        """Move what the source has into the outbox (only while ``outbox.has_room()``)."""

    # ---- the loop -----------------------------------------------------------------------
    def on_timer_tick(self) -> None:
        assert self.outbox is not None
        if self.stopped:
            return  # answered StopChild: produce and send nothing more
        if self.stopping is None:
            self.produce()
        else:
            self.outbox.flush()
        self.send_due()
        if self.stopping is not None:
            requester, msg, deadline = self.stopping
            if self.outbox.idle() or time.monotonic() > deadline:
                self.reply_stopped(requester, msg, clean=self.outbox.idle(),
                                   detail="" if self.outbox.idle() else "unacknowledged batches")
                self.stopping = None
                self.stopped = True
                return
        self.start_timer("tick", TICK_S)

    def send_due(self) -> None:
        assert self.outbox is not None
        journal = self.peers.get("journal")
        if journal is None:
            return
        for append in self.outbox.due_sends():
            self.send(journal, append)

    def receiveMsg_Appended(self, msg: Appended, sender: Any) -> None:
        assert self.outbox is not None
        latency = self.outbox.on_appended(msg)
        if latency is not None:
            self.latencies.append((time.monotonic(), latency))

    def receiveMsg_AppendRefused(self, msg: AppendRefused, sender: Any) -> None:
        assert self.outbox is not None
        if msg.reason in NEVER_RETRY:
            log().error("sensor %s: journal rejected batch %d for good (%s: %s); dropped",
                        self.name, msg.batch_id.batch_no, msg.reason, msg.detail)
        elif self.outbox.figures()["refused"] % 100 == 0:
            log().warning("sensor %s: journal refused a batch (%s: %s); holding data",
                          self.name, msg.reason, msg.detail)
        self.outbox.on_refused(msg)

    def on_peers_changed(self, names: set[str]) -> None:
        if "journal" in names and self.outbox is not None:
            # The journal restarted: whatever was in flight may be lost; resend it all.
            self.outbox.on_journal_restarted()
            self.send_due()

    def on_stop(self, msg: StopChild, sender: Any) -> None:
        # Stop producing, flush the open batch, and answer once everything is acknowledged.
        self.stopping = (sender, msg, time.monotonic() + max(0.5, msg.timeout_s - 0.5))
        self.on_timer_tick()

    def figures(self) -> list[tuple[str, Any]]:
        figures = super().figures()
        if self.outbox is not None:
            figures.extend(self.outbox.figures().items())
        since = time.monotonic() - LATENCY_WINDOW_S
        recent = [latency for at, latency in self.latencies if at >= since]
        if recent:
            ordered = sorted(recent)
            figures.append(("ack_ms_p50", round(ordered[len(ordered) // 2] * 1000, 2)))
            figures.append(("ack_ms_p99", round(ordered[int(len(ordered) * 0.99)] * 1000, 2)))
        return figures


class SimSensor(SensorActor):
    """A simulated vehicle sensor (imu, gps or engine) at a configured rate."""

    #: Readings pulled from the source per tick at most: keeps a tick short, so acks and
    #: heartbeats are handled promptly even when the source is far ahead (a backlog after
    #: back-pressure, or a rate above what the journal takes).
    MAX_PER_TICK = 5000

    def open_source(self) -> None:
        s = self.settings
        self.source = SimulatedSource(
            s.kind, s.rate_hz, s.device_id, s.id, s.seed, time.time_ns()
        )

    def produce(self) -> None:
        assert self.outbox is not None
        now = time.time_ns()
        produced = 0
        while self.outbox.has_room() and produced < self.MAX_PER_TICK:
            readings = self.source.due(now, self.settings.batch_max_readings)
            if not readings:
                break
            self.outbox.add(readings)
            produced += len(readings)
