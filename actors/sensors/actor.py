"""Sensor actors: one per configured sensor, a thin shell over `SensorOutbox` and a source.

Where this sits: the first step of the data path. A sensor reads its source, batches readings
(`SensorOutbox`), sends each batch to the journal as `Append`, keeps it until `Appended`
(bounded in bytes), resends after a timeout or when the journal's address changes (it
restarted), and holds its source when the buffer is full (back-pressure) — nothing is dropped.
`SensorActor` is the common base; `SimSensor` drives a `SimulatedSource`, `MqttSensor` an
`MqttSession` (PUBACK only after the journal's `Appended`), `CanSensor` a `CanSource`,
`NmeaSensor` an `NmeaSource` and `HealthSensor` (``sensor:health``) a `HealthSource` over the
gateway's own snapshots. Input a source cannot decode goes to the journal's quarantine with the
batch (I8).
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from typing import Any

from actors.base import SupervisedActor, latency_figures, log
from actors.metrics.sampler import SnapshotSampler, gateway_root
from actors.sensors.can import CanSource
from actors.sensors.health import HealthSource
from actors.sensors.mqtt import CONNECTED, SUBSCRIPTIONS_MARK, MqttMessages, MqttSession
from actors.sensors.nmea import NmeaSource
from actors.sensors.outbox import NEVER_RETRY, SensorOutbox
from actors.sensors.sim import SimulatedSource
from config.metrics import HealthSensorSettings
from config.schema import SensorActorSettings, SensorSettings
from messages.journal import (
    Appended,
    AppendRefused,
    ReadSourceMarks,
    SourceMark,
    SourceMarksRead,
)
from messages.supervision import StopChild, TopologyReport

#: A wall clock this far from where the monotonic clock says it should be has stepped (a
#: simulated sensor then starts a new grid at the new time), ns. NTP's slewing stays below.
CLOCK_STEP_NS = 1_000_000_000
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

    @property
    def sensor(self) -> SensorSettings:
        """This sensor's ``[[sensors]]`` entry."""
        settings = self.settings
        return settings.sensor if isinstance(settings, SensorActorSettings) else settings

    def on_init(self) -> None:
        s = self.sensor
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
        figures += latency_figures("ack", self.latencies, time.monotonic() - LATENCY_WINDOW_S)
        return figures


class SimSensor(SensorActor):
    """A simulated vehicle sensor (imu, gps or engine) at a configured rate."""

    #: Readings pulled from the source per tick at most: keeps a tick short, so acks and
    #: heartbeats are handled promptly even when the source is far ahead (a backlog after
    #: back-pressure, or a rate above what the journal takes).
    MAX_PER_TICK = 5000

    def open_source(self) -> None:
        self.start_grid(time.time_ns())

    def start_grid(self, start_ns: int) -> None:
        """A source whose readings are due on a grid from ``start_ns`` (wall clock), paced by
        the monotonic clock from now on."""
        s = self.sensor
        self.source = SimulatedSource(s.kind, s.rate_hz, s.device_id, s.id, s.seed, start_ns)
        self.grid_origin = (start_ns, time.monotonic_ns())

    def produce(self) -> None:
        assert self.outbox is not None
        # Paced by the monotonic clock, stamped on the wall clock: when the wall clock steps
        # (a Pi without an RTC gets NTP or a GPS fix), a real sensor neither produces the
        # skipped time as a backlog nor falls silent until the clock catches up; its stamps
        # jump with the clock. So once everything due on the old grid was pulled (nothing
        # held back is lost), the source starts a new grid at the new wall time.
        start_ns, mono0 = self.grid_origin
        now = start_ns + time.monotonic_ns() - mono0
        wall = time.time_ns()
        if abs(wall - now) > CLOCK_STEP_NS and self.source.backlog(now) == 0:
            log().info("sensor %s: the wall clock stepped by %+.3f s; readings follow it",
                       self.name, (wall - now) / 1e9)
            self.start_grid(wall)
            now = wall
        produced = 0
        while self.outbox.has_room() and produced < self.MAX_PER_TICK:
            readings = self.source.due(now, self.sensor.batch_max_readings)
            if not readings:
                break
            self.outbox.add(readings)
            produced += len(readings)


class MqttSensor(SensorActor):
    """Subscriptions on an MQTT broker in a persistent QoS 1 session. A delivery's PUBACK goes
    out only after the journal committed it (with its redelivery mark). paho's thread reads
    and decodes; this actor watches the session's wake-up socket, batches what was decoded and
    talks to the journal (no thread ever sends an actor message)."""

    #: Seconds of reading per turn at most: the journal's `Appended` (and with it the
    #: PUBACKs that let the broker send more) waits for the turn to end.
    TURN_S = 0.01
    #: After a turn that left deliveries waiting, the next turn comes after this pause rather
    #: than through the watch: a watch that is always ready keeps Thespian's select loop
    #: spinning, and each spin backs off the actor's own transmits (measured: 0.5-4 s until
    #: the journal had a batch). The pause lets the loop wait for acks and replies.
    BACKLOG_PAUSE_S = 0.003
    #: Group commit: the open batch closes at once while fewer batches than this wait for the
    #: journal; otherwise it grows until one is acknowledged (fewer, larger commits under
    #: load, at once when quiet).
    COMMITS_AHEAD = 1
    #: Deliveries taken from the session at once.
    READ_AT_ONCE = 200
    #: Seconds between asks for the source marks while the journal has not answered.
    MARKS_RETRY_S = 1.0

    def open_source(self) -> None:
        #: Built once the journal answered with the marks (they say what the broker's
        #: session is subscribed to).
        self.session: MqttSession | None = None
        #: Built once the journal answered with the marks: no connection before that, so a
        #: redelivery is always checked against every mark committed.
        self.messages: MqttMessages | None = None
        self.marks_asked_at = float("-inf")
        #: The last turn stopped with messages still waiting (see BACKLOG_PAUSE_S).
        self.backlogged = False
        self.ask_marks()

    def ask_marks(self) -> None:
        journal = self.peers.get("journal")
        if journal is not None:
            self.send(journal, ReadSourceMarks(self.sensor.id))
            self.marks_asked_at = time.monotonic()

    def receiveMsg_SourceMarksRead(self, msg: SourceMarksRead, sender: Any) -> None:
        if self.messages is None and msg.sensor_id == self.sensor.id:
            s = self.sensor
            marks = dict(msg.marks)
            subscribed = marks.get(SUBSCRIPTIONS_MARK)
            self.session = MqttSession(
                self.settings.mqtt,
                held_filters=None if subscribed is None else tuple(json.loads(subscribed)))
            self.messages = MqttMessages(self.settings.mqtt.source, s.id, s.device_id, marks)
            # Decoding runs in paho's thread (it sends nothing): the actor's own thread stays
            # free for Thespian's loop, whose transmits to the journal back off when it is busy.
            self.session.handler = self.messages.handle
            self.session.step()

    def produce(self) -> None:
        if self.messages is None:
            if time.monotonic() - self.marks_asked_at > self.MARKS_RETRY_S:
                self.ask_marks()
            return
        self.session.step()
        self.pump()

    def pump(self) -> None:
        """Move waiting deliveries into the outbox (while it has room), send what is due and
        acknowledge what is committed."""
        assert self.outbox is not None and self.messages is not None and self.session
        change = self.session.take_subscription_change()
        if change is not None:  # commit what the broker's session now holds
            self.outbox.add_delivery(marks=[SourceMark(SUBSCRIPTIONS_MARK, json.dumps(change))])
        deadline = time.monotonic() + self.TURN_S
        self.backlogged = False
        while self.outbox.has_room():
            if time.monotonic() >= deadline:
                self.backlogged = True  # more may wait: continue after a pause
                self.start_timer("backlog", self.BACKLOG_PAUSE_S)
                break
            handled = self.session.read(self.READ_AT_ONCE)
            if not handled:
                break
            for readings, quarantined, marks, receipt in handled:
                self.outbox.add_delivery(readings, quarantined=quarantined, marks=marks,
                                         receipt=receipt)
        # Group commit (see COMMITS_AHEAD).
        if self.outbox.has_open() and self.outbox.unacknowledged_batches() < self.COMMITS_AHEAD:
            self.outbox.flush()
        self.send_due()
        self.ack_committed()

    def on_timer_backlog(self) -> None:
        if self.messages is not None and not self.stopped and self.stopping is None:
            self.pump()

    def ack_committed(self) -> None:
        assert self.outbox is not None
        receipts = self.outbox.take_receipts()
        if receipts and self.session is not None:
            self.session.ack(receipts)

    def receiveMsg_Appended(self, msg: Appended, sender: Any) -> None:
        super().receiveMsg_Appended(msg, sender)
        assert self.outbox is not None
        self.ack_committed()
        if self.outbox.has_open() and self.outbox.unacknowledged_batches() < self.COMMITS_AHEAD:
            self.outbox.flush()
            self.send_due()

    def on_peers_changed(self, names: set[str]) -> None:
        super().on_peers_changed(names)
        if "journal" in names and self.messages is None:
            self.ask_marks()

    def watched_fds(self) -> list[int]:
        if self.messages is None or self.outbox is None or not self.outbox.has_room() \
                or self.backlogged:
            return []  # a full outbox holds the source: no PUBACKs, so the broker holds back
        fd = self.session.fileno()
        return [fd] if fd is not None else []

    def on_readable(self, fds: list[int]) -> None:
        if self.messages is not None and not self.stopped and self.stopping is None:
            self.pump()

    def on_timer_tick(self) -> None:
        super().on_timer_tick()
        if self.stopped and self.session is not None:
            self.session.close()  # everything acknowledged: leave the session to the broker

    def on_exit(self) -> None:
        if self.session is not None:
            self.session.close()

    def figures(self) -> list[tuple[str, Any]]:
        figures = super().figures()
        if self.session is None:
            return [*figures, ("mqtt_state", "waiting for the journal's marks")]
        figures.extend(self.session.figures().items())
        if self.messages is not None:
            figures.extend((f"mqtt_{k}", v) for k, v in self.messages.counts.items())
        figures.append(("mqtt_connected", self.session.state == CONNECTED))
        return figures


class PolledSensor(SensorActor):
    """A sensor over a source with the poll contract (`CanSource`, `NmeaSource`): read on
    every tick and whenever its descriptor is readable, while the outbox has room."""

    #: Items taken from the source per turn at most (keeps a turn short).
    MAX_PER_TURN = 5000

    def make_source(self) -> Any:
        raise NotImplementedError

    def open_source(self) -> None:
        self.source = self.make_source()
        self.source.open()  # raises only for what no retry cures (e.g. a missing DBC)

    def produce(self) -> None:
        assert self.outbox is not None
        taken = 0
        while self.outbox.has_room() and taken < self.MAX_PER_TURN:
            readings, quarantined = self.source.poll(min(1000, self.MAX_PER_TURN - taken))
            if not readings and not quarantined:
                break
            if readings:
                self.outbox.add(readings)
            if quarantined:
                self.outbox.add_delivery(quarantined=quarantined)
            taken += len(readings) + len(quarantined)

    def watched_fds(self) -> list[int]:
        if self.outbox is None or not self.outbox.has_room() or self.stopping is not None:
            return []
        fd = self.source.fileno()
        return [fd] if fd is not None else []

    def on_readable(self, fds: list[int]) -> None:
        if not self.stopped and self.stopping is None:
            self.produce()
            self.send_due()

    def on_exit(self) -> None:
        self.source.close()

    def figures(self) -> list[tuple[str, Any]]:
        figures = super().figures()
        figures.extend(self.source.figures().items())
        return figures


class CanSensor(PolledSensor):
    """A CAN bus decoded with a DBC: one reading per known message, with its signals."""

    def make_source(self) -> CanSource:
        s = self.sensor
        return CanSource(s.can, s.id, s.device_id)


class NmeaSensor(PolledSensor):
    """GPS over NMEA 0183 from a serial port, TCP or UDP (checksums verified)."""

    def make_source(self) -> NmeaSource:
        s = self.sensor
        return NmeaSource(s.nmea, s.id, s.device_id)


class HealthSensor(SensorActor):
    """The gateway's own health (``gateway_health`` readings) every ``[metrics]
    health_interval_s``, the first one interval after the start: it asks the gateway root for
    the tree, as the metrics actor does, and builds the snapshot in its sampler's worker thread;
    the reading then takes the outbox's path to the journal like any other."""

    @property
    def sensor(self) -> SensorSettings:
        settings: HealthSensorSettings = self.settings
        return settings.sensor

    def open_source(self) -> None:
        settings: HealthSensorSettings = self.settings
        self.interval_s = settings.sampling.metrics.health_interval_s
        self.root = gateway_root(self)  # before the sampler's thread starts
        self.sampler = SnapshotSampler(settings.sampling, self.data_dir or ".")
        self.source = HealthSource(self.sensor.id, self.sensor.device_id)
        self.next_at = time.monotonic() + self.interval_s

    def produce(self) -> None:
        assert self.outbox is not None
        snapshot = self.sampler.take()
        if snapshot is not None:
            self.outbox.add([self.source.reading(snapshot)])
        now = time.monotonic()
        if now >= self.next_at and self.outbox.has_room():
            request = self.sampler.request()
            if request is not None:
                self.send(self.root, request)
                self.next_at = now + self.interval_s

    def receiveMsg_TopologyReport(self, msg: TopologyReport, sender: Any) -> None:
        self.sampler.on_report(msg)

    def on_exit(self) -> None:
        self.sampler.close()

    def figures(self) -> list[tuple[str, Any]]:
        return super().figures() + self.sampler.figures()
