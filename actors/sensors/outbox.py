"""The sensor outbox: a sensor's readings from its source until the journal has them.

Where this sits on the data path: steps 1-2. Every sensor actor (sim, mqtt, can, nmea) holds
one `SensorOutbox`. Readings go in with `add`; they are grouped into numbered batches and leave
as `Append` commands (`due_sends`); a batch is forgotten only when the journal answers
`Appended` (I1: acked means durable). Until then the outbox keeps it, resends it unchanged (same
`BatchId`, same content: the journal stores it once) after ``resend_after_s`` or a journal
restart, and retries it after a refusal. What it holds is bounded in bytes: when full,
`has_room` turns false and the sensor holds its source (back-pressure); the outbox itself never
drops a reading.

Plain logic with an injectable clock: the actor only turns ticks and replies into calls.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from messages.journal import (
    Append,
    Appended,
    AppendRefused,
    BatchId,
    QuarantinedInput,
    SourceMark,
)
from messages.readings import Reading, ReadingBatch

#: States of a closed batch: waiting for its first send, sent and awaiting a reply, or refused
#: by the journal and waiting for the retry time it asked for.
QUEUED, IN_FLIGHT, REFUSED = "queued", "in_flight", "refused"


class _Held:
    """A closed batch the outbox holds until it is acknowledged."""

    __slots__ = ("batch", "batch_id", "due_at", "first_sent", "marks", "nbytes", "quarantined",
                 "readings", "state")

    def __init__(self, batch_id: BatchId, batch: ReadingBatch | None,
                 quarantined: tuple[QuarantinedInput, ...] = (),
                 marks: tuple[SourceMark, ...] = ()) -> None:
        self.batch_id = batch_id
        self.batch = batch
        self.quarantined = quarantined
        self.marks = marks
        self.readings = 0 if batch is None else len(batch)
        self.nbytes = (0 if batch is None else batch.nbytes) + _extra_bytes(quarantined, marks)
        self.state = QUEUED
        #: When it was first sent (ack latency counts from here); None while queued.
        self.first_sent: float | None = None
        #: IN_FLIGHT: when to resend; REFUSED: when to retry.
        self.due_at = 0.0


def _extra_bytes(quarantined: Sequence[QuarantinedInput], marks: Sequence[SourceMark]) -> int:
    """What quarantined inputs and marks add to a batch's size."""
    return sum(q.nbytes for q in quarantined) + sum(len(m.key) + len(m.value) + 16 for m in marks)


#: Refusal reasons that no retry can cure: the batch is dropped and counted, not resent.
NEVER_RETRY = frozenset({"invalid"})


class SensorOutbox:
    """Batches, sends, resends and acknowledgement bookkeeping of one sensor incarnation.

    Invariants: batch numbers are 1, 2, 3... in the order readings were added, and a number
    always names the same content; a batch leaves the outbox only through `on_appended`;
    at most ``max_in_flight`` batches are out (sent or refused) at once; a batch is sent for
    the first time in number order, so every sent batch has a lower number than every queued
    one. ``buffer_max_bytes`` bounds the closed batches held (`ReadingBatch.nbytes`): once it
    is reached `has_room` is false; an `add` already in progress is never refused, so the bound
    can be passed by what one `add` brings, plus the open batch (< ``batch_max_readings``).
    """

    def __init__(
        self,
        sensor_id: str,
        incarnation: int,
        *,
        batch_max_readings: int,
        batch_max_age_s: float,
        buffer_max_bytes: int,
        max_in_flight: int,
        resend_after_s: float,
        refused_retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("batch_max_readings", batch_max_readings),
            ("batch_max_age_s", batch_max_age_s),
            ("buffer_max_bytes", buffer_max_bytes),
            ("max_in_flight", max_in_flight),
            ("resend_after_s", resend_after_s),
            ("refused_retry_s", refused_retry_s),
        ):
            if not value > 0:
                raise ValueError(f"SensorOutbox {name} must be > 0 (got {value!r})")
        self.sensor_id = sensor_id
        self.incarnation = incarnation
        self.batch_max_readings = batch_max_readings
        self.batch_max_age_s = batch_max_age_s
        self.buffer_max_bytes = buffer_max_bytes
        self.max_in_flight = max_in_flight
        self.resend_after_s = resend_after_s
        self.refused_retry_s = refused_retry_s
        self._clock = clock
        self._open: list[Reading] = []
        self._open_quarantined: list[QuarantinedInput] = []
        self._open_marks: list[SourceMark] = []
        self._open_extra_bytes = 0  # bytes of the open batch's quarantined inputs and marks
        self._open_since = 0.0  # when the oldest item of the open batch was added
        #: (batch number it waits for, receipt) in the order added: see `take_receipts`.
        self._receipts: deque[tuple[int, Any]] = deque()
        self._next_no = 1
        self._queued: deque[_Held] = deque()  # closed, never sent, in number order
        self._out: dict[int, _Held] = {}  # batch_no -> sent (IN_FLIGHT or REFUSED) batch
        self._refused_waiting = 0  # how many of _out are REFUSED
        self._unacked_bytes = 0
        self._full = False
        self._counts: Counter[str] = Counter()
        self._refused_by_reason: Counter[str] = Counter()

    # ---- producing ------------------------------------------------------------------------
    def add(self, readings: Sequence[Reading], now: float | None = None) -> None:
        """Append readings (of this sensor) to the open batch; close full batches."""
        if not readings:
            return
        self._check_sensor(readings)
        if not self._open_items():
            self._open_since = self._now(now)
        self._open.extend(readings)
        self._counts["readings_added"] += len(readings)
        m = self.batch_max_readings
        if len(self._open) >= m:
            # the oldest readings close first; what is left over arrived just now. Quarantined
            # inputs and marks of an earlier `add_delivery` go with the first batch, which
            # holds that delivery's readings (they are at the front).
            while len(self._open) >= m:
                self._close(self._open[:m], *self._take_open_extras())
                del self._open[:m]
            self._open_since = self._now(now)

    def add_delivery(
        self,
        readings: Sequence[Reading] = (),
        *,
        quarantined: Sequence[QuarantinedInput] = (),
        marks: Sequence[SourceMark] = (),
        receipt: Any = None,
        now: float | None = None,
    ) -> None:
        """Add what one delivery of the source became — its readings, what was quarantined,
        the source's marks — as a unit: all of it lands in one batch, so the journal commits
        it in one transaction (a delivery bigger than a batch gets a batch of its own).

        ``receipt`` (any value; None = none) comes back from `take_receipts` once everything
        added so far, this delivery included, is committed: e.g. the MQTT packet id to
        acknowledge to the broker. A delivery with nothing but a receipt (a redelivery of
        something already held or committed) still waits for everything added before it.
        """
        if readings:
            self._check_sensor(readings)
        if readings or quarantined or marks:
            if self._open and len(self._open) + len(readings) > self.batch_max_readings:
                self.flush()
            if not self._open_items():
                self._open_since = self._now(now)
            self._open.extend(readings)
            self._open_quarantined.extend(quarantined)
            self._open_marks.extend(marks)
            self._open_extra_bytes += _extra_bytes(quarantined, marks)
            self._counts["readings_added"] += len(readings)
            self._counts["quarantined"] += len(quarantined)
            # Quarantined inputs count like readings: a flood of bad input closes batches
            # (and fills the buffer: back-pressure) like good input does.
            if len(self._open) + len(self._open_quarantined) >= self.batch_max_readings:
                self.flush()
        if receipt is not None:
            # The batch this receipt waits for: the open one (when it holds anything), else
            # the last closed one (0: none yet).
            waits_for = self._next_no if self._open_items() else self._next_no - 1
            self._receipts.append((waits_for, receipt))

    def take_receipts(self) -> list[Any]:
        """Receipts whose deliveries — and every delivery added before them — are committed
        (or were refused for good), oldest first; each is returned once."""
        if not self._receipts:
            return []
        if self._out:
            floor = min(self._out)
        elif self._queued:
            floor = self._queued[0].batch_id.batch_no
        elif self._open_items():
            floor = self._next_no
        else:
            floor = self._next_no + 1
        released = []
        while self._receipts and self._receipts[0][0] < floor:
            released.append(self._receipts.popleft()[1])
        return released

    def drop_receipts(self) -> int:
        """Forget every receipt not yet taken (e.g. the MQTT connection they belong to is
        gone: the broker redelivers those messages). Returns how many."""
        n = len(self._receipts)
        self._receipts.clear()
        return n

    def _check_sensor(self, readings: Sequence[Reading]) -> None:
        for r in readings:
            if r.sensor_id != self.sensor_id:
                raise ValueError(
                    f"SensorOutbox of sensor {self.sensor_id!r} got a reading of sensor "
                    f"{r.sensor_id!r}: each sensor actor needs its own outbox"
                )

    def _open_items(self) -> bool:
        return bool(self._open or self._open_quarantined or self._open_marks)

    def has_room(self) -> bool:
        """Whether the caller may produce more; false means hold the source (back-pressure)."""
        return self._unacked_bytes + self._open_extra_bytes < self.buffer_max_bytes

    def room(self) -> int:
        """How many readings the caller may add now: enough to fill the open batch, or 0."""
        return self.batch_max_readings - len(self._open) if self.has_room() else 0

    def flush(self) -> None:
        """Close the open batch now (orderly stop: it is sent at the next `due_sends`)."""
        if self._open_items():
            self._close(self._open, *self._take_open_extras())
            self._open = []

    def _take_open_extras(self) -> tuple[tuple[QuarantinedInput, ...], tuple[SourceMark, ...]]:
        extras = tuple(self._open_quarantined), tuple(self._open_marks)
        self._open_quarantined, self._open_marks = [], []
        self._open_extra_bytes = 0
        return extras

    def _close(self, readings: list[Reading], quarantined: tuple[QuarantinedInput, ...] = (),
               marks: tuple[SourceMark, ...] = ()) -> None:
        batch = ReadingBatch.from_readings(readings) if readings else None
        held = _Held(BatchId(self.sensor_id, self.incarnation, self._next_no), batch,
                     quarantined, marks)
        self._next_no += 1
        self._queued.append(held)
        self._unacked_bytes += held.nbytes
        self._update_pressure()

    def _update_pressure(self) -> None:
        full = not self.has_room()
        if full and not self._full:
            self._counts["held"] += 1  # back-pressure turned on
        self._full = full

    # ---- sending --------------------------------------------------------------------------
    def due_sends(self, now: float | None = None) -> list[Append]:
        """The `Append`s to send now, lowest batch number first.

        Resends in-flight batches unanswered for ``resend_after_s`` and refused batches whose
        retry time has come, then sends queued batches while fewer than ``max_in_flight`` are
        out — but none while a refused batch waits for its retry (the journal asked us to back
        off). Closes the open batch first when its oldest reading is ``batch_max_age_s`` old.
        """
        now = self._now(now)
        if self._open_items() and now - self._open_since >= self.batch_max_age_s:
            self.flush()
        sends: list[_Held] = []
        for held in self._out.values():
            if held.due_at <= now:
                if held.state == REFUSED:
                    self._refused_waiting -= 1
                    held.state = IN_FLIGHT
                held.due_at = now + self.resend_after_s
                self._counts["resends"] += 1
                sends.append(held)
        while (
            self._queued and len(self._out) < self.max_in_flight and not self._refused_waiting
        ):
            held = self._queued.popleft()
            held.state, held.first_sent = IN_FLIGHT, now
            held.due_at = now + self.resend_after_s
            self._out[held.batch_id.batch_no] = held
            self._counts["batches_sent"] += 1
            sends.append(held)
        if not sends:
            return []
        # The journal may forget ids below the lowest number still held: every sent batch
        # is below every queued one, so that is the lowest number out, else the queue's head.
        floor = min(self._out) if self._out else self._queued[0].batch_id.batch_no
        sends.sort(key=lambda h: h.batch_id.batch_no)
        return [Append(h.batch_id, h.batch, floor, h.quarantined, h.marks) for h in sends]

    # ---- replies --------------------------------------------------------------------------
    def _find(self, batch_id: BatchId) -> _Held | None:
        if batch_id.sensor_id != self.sensor_id or batch_id.incarnation != self.incarnation:
            return None  # another sensor's, or an earlier incarnation's: not ours to settle
        return self._out.get(batch_id.batch_no)

    def on_appended(self, msg: Appended, now: float | None = None) -> float | None:
        """The journal committed a batch: forget it. Returns the ack latency (seconds since
        its first send), or None when the batch is not held (a duplicate ack: ignored)."""
        held = self._find(msg.batch_id)
        if held is None:
            self._counts["ignored_acks"] += 1
            return None
        del self._out[msg.batch_id.batch_no]
        if held.state == REFUSED:  # a reply to an earlier send that overtook the refusal
            self._refused_waiting -= 1
        self._unacked_bytes -= held.nbytes
        self._counts["acked_batches"] += 1
        self._counts["acked_readings"] += held.readings
        self._update_pressure()
        assert held.first_sent is not None
        return self._now(now) - held.first_sent

    def on_refused(self, msg: AppendRefused, now: float | None = None) -> None:
        """The journal did not commit a batch: keep it, retry after ``msg.retry_after_s``
        (``refused_retry_s`` when the journal gave no positive time)."""
        held = self._find(msg.batch_id)
        if held is None:
            return  # already acknowledged (an earlier send got through): nothing to retry
        if msg.reason in NEVER_RETRY:
            # The journal will never take this batch: retrying would block the sensor's good
            # data forever (I8). It was never acknowledged to the source, so dropping it loses
            # nothing acknowledged; it is counted (and the actor logs it).
            del self._out[msg.batch_id.batch_no]
            if held.state == REFUSED:
                self._refused_waiting -= 1
            self._unacked_bytes -= held.nbytes
            self._counts["refused"] += 1
            self._counts["rejected_readings"] += held.readings
            self._refused_by_reason[msg.reason] += 1
            self._update_pressure()
            return
        if held.state != REFUSED:
            self._refused_waiting += 1
            held.state = REFUSED
        wait = msg.retry_after_s if msg.retry_after_s > 0 else self.refused_retry_s
        held.due_at = self._now(now) + wait
        self._counts["refused"] += 1
        self._refused_by_reason[msg.reason] += 1

    def on_journal_restarted(self) -> None:
        """The journal restarted: whatever was in flight may be lost, so every batch out
        (refused ones too: their retry time came from the old journal) is resent at the next
        `due_sends`."""
        for held in self._out.values():
            held.state = IN_FLIGHT
            held.due_at = float("-inf")
        self._refused_waiting = 0
        self._counts["journal_restarts"] += 1

    # ---- timing and state -----------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest clock time at which `due_sends` has something to do (possibly already
        past: call it now), or None when nothing is pending."""
        deadlines = [held.due_at for held in self._out.values()]
        if self._open_items():
            deadlines.append(self._open_since + self.batch_max_age_s)
        if self._queued and len(self._out) < self.max_in_flight and not self._refused_waiting:
            deadlines.append(float("-inf"))
        return min(deadlines) if deadlines else None

    def unacknowledged_batches(self) -> int:
        """Closed batches not yet acknowledged (queued, in flight or refused)."""
        return len(self._queued) + len(self._out)

    def has_open(self) -> bool:
        """Whether the open batch holds anything."""
        return self._open_items()

    def idle(self) -> bool:
        """Nothing open, nothing unacknowledged: an orderly stop may finish."""
        return not self._open_items() and not self._queued and not self._out

    def figures(self) -> dict[str, int]:
        """Counters and gauges for the inspector (names are stable: dashboards use them)."""
        c = self._counts
        figures = {
            "readings_added": c["readings_added"],
            "batches_sent": c["batches_sent"],
            "resends": c["resends"],
            "acked_batches": c["acked_batches"],
            "acked_readings": c["acked_readings"],
            "refused": c["refused"],
            "ignored_acks": c["ignored_acks"],
            "journal_restarts": c["journal_restarts"],
            "held": c["held"],
            "rejected_readings": c["rejected_readings"],
            "unacked_batches": len(self._queued) + len(self._out),
            "unacked_bytes": self._unacked_bytes,
            "in_flight": len(self._out),
            "open_readings": len(self._open),
            "quarantined": c["quarantined"],
            "receipts_waiting": len(self._receipts),
        }
        for reason, n in sorted(self._refused_by_reason.items()):
            figures[f"refused_{reason}"] = n
        return figures

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now
