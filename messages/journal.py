"""The journal conversation: appends from sensors, commits from consumers, sync watermarks.

Where this sits on the data path: sensors send `Append` and hold the batch until `Appended`
(I1: acked means durable); consumers (router, model runner, uplink lanes) read the journal with
their own read-only connection and send `ConsumerCommit` with their outputs and new cursor,
which the journal commits in one transaction (I4); the uplink reports central acknowledgements
with `AdvanceWatermark`.
"""

from __future__ import annotations

import attrs

from messages.readings import ReadingBatch


@attrs.frozen(slots=True, order=True)
class Position:
    """A place in the journal: the id of a journal record (records are numbered 1, 2, ...).

    ``Position(0)`` is the start (nothing consumed yet). Positions only grow; compare them with
    ``<``/``==``.
    """

    value: int

    def __str__(self) -> str:
        return f"pos:{self.value}"


START = Position(0)


@attrs.frozen(slots=True)
class SeqRange:
    """The per-device sequence numbers one commit assigned: ``seq_lo..seq_hi`` inclusive."""

    device_id: str
    seq_lo: int
    seq_hi: int

    @property
    def count(self) -> int:
        return self.seq_hi - self.seq_lo + 1


@attrs.frozen(slots=True)
class BatchId:
    """Identity of a sensor batch: resent batches carry the same id and are stored once.

    ``incarnation`` is chosen by each start of the sensor actor (so batch numbers restarting
    at 1 after a sensor restart never collide with an earlier incarnation's).
    """

    sensor_id: str
    incarnation: int
    batch_no: int


@attrs.frozen(slots=True)
class Append:
    """Command to the journal: commit this batch, then reply `Appended`.

    ``resend_floor``: the sender will never resend batches of this incarnation numbered below
    it, so the journal may forget their ids.
    """

    batch_id: BatchId
    batch: ReadingBatch
    resend_floor: int = 0


@attrs.frozen(slots=True)
class Appended:
    """Fact: the batch is durable (committed). ``duplicate`` is true when the batch had already
    been committed earlier and this reply repeats that commit's ranges."""

    batch_id: BatchId
    ranges: tuple[SeqRange, ...]
    first: Position
    last: Position
    duplicate: bool = False


@attrs.frozen(slots=True)
class AppendRefused:
    """Fact: the batch was not committed; the sender keeps it and retries after
    ``retry_after_s`` (back-pressure). ``reason`` is ``disk_budget``, ``disk_full``,
    ``invalid`` or ``error``; ``detail`` says more for operators."""

    batch_id: BatchId
    reason: str
    detail: str
    retry_after_s: float


@attrs.frozen(slots=True)
class NewRecords:
    """Event to consumers: the journal holds records up to ``upto``. May be lost; consumers poll
    as well."""

    upto: Position


@attrs.frozen(slots=True)
class ConsumerCommit:
    """Command from a consumer: commit ``outputs`` and move my cursor from ``expected`` to
    ``new`` in one transaction (I4). Refused when my cursor is not at ``expected``."""

    consumer: str
    request_id: int
    expected: Position
    new: Position
    outputs: ReadingBatch | None = None


@attrs.frozen(slots=True)
class ConsumerCommitted:
    """Fact: the consumer's outputs and cursor are durable. ``duplicate`` is true when the same
    advance had already been committed (a resent request)."""

    consumer: str
    request_id: int
    cursor: Position
    ranges: tuple[SeqRange, ...]
    duplicate: bool = False


@attrs.frozen(slots=True)
class ConsumerCommitRefused:
    """Fact: nothing was committed. ``cursor`` is where the journal has this consumer."""

    consumer: str
    request_id: int
    cursor: Position
    reason: str


@attrs.frozen(slots=True)
class AdvanceWatermark:
    """Command from the uplink: central acknowledged ``device_id``'s records of ``lane`` up to
    ``seq``. Watermarks never move backwards."""

    device_id: str
    lane: str
    seq: int
    request_id: int = 0


@attrs.frozen(slots=True)
class WatermarkAdvanced:
    """Fact: the watermark is durable at ``seq`` (the max of the old and the requested)."""

    device_id: str
    lane: str
    seq: int
    request_id: int = 0


@attrs.frozen(slots=True)
class WatermarkRefused:
    """Fact: the watermark was not moved (``reason`` says why: e.g. a seq beyond what the
    journal holds for the device, or a full disk)."""

    device_id: str
    lane: str
    seq: int
    reason: str
    request_id: int = 0
