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


#: Bytes of a quarantined input kept in the journal; longer input is cut (``raw_len`` keeps
#: the original length).
QUARANTINE_RAW_MAX = 4096


@attrs.frozen(slots=True)
class QuarantinedInput:
    """Input a source could not turn into readings (I8): kept for operators, never synced.

    ``source`` says where it came from (e.g. ``mqtt:fleet/veh-1/imu``, ``udp://127.0.0.1:10110``,
    ``can:0x1a0``), ``reason`` why it was refused (one line, for operators), ``raw`` the bytes
    as received (cut to `QUARANTINE_RAW_MAX`; ``raw_len`` is the original length) and
    ``received_ns`` when (ns since the epoch).
    """

    source: str
    reason: str
    raw: bytes
    received_ns: int
    raw_len: int = -1

    @classmethod
    def of(cls, source: str, reason: str, raw: bytes, received_ns: int) -> QuarantinedInput:
        """Build one, cutting ``raw`` and one-line-ing ``reason`` (both bounded)."""
        raw = bytes(raw)
        reason = " ".join(str(reason).split())[:500] or "rejected"
        return cls(source[:200], reason, raw[:QUARANTINE_RAW_MAX], received_ns, len(raw))

    @property
    def nbytes(self) -> int:
        return len(self.raw) + len(self.reason) + len(self.source) + 40


@attrs.frozen(slots=True)
class SourceMark:
    """A source's own delivery bookkeeping, committed with the batch that carries it: ``key``
    of sensor ``sensor_id`` now holds ``value`` (e.g. an MQTT packet id and the fingerprint of
    the message journaled under it, so a redelivery after a crash is recognised)."""

    key: str
    value: str


@attrs.frozen(slots=True)
class ReadSourceMarks:
    """Query from a starting sensor: the source marks its earlier incarnations committed. The
    journal answers after everything it received before (a dead incarnation's last appends
    included), so the marks are complete."""

    sensor_id: str


@attrs.frozen(slots=True)
class SourceMarksRead:
    """Fact: sensor ``sensor_id``'s committed source marks, as (key, value) pairs."""

    sensor_id: str
    marks: tuple[tuple[str, str], ...]


@attrs.frozen(slots=True)
class Append:
    """Command to the journal: commit this batch, then reply `Appended`.

    ``resend_floor``: the sender will never resend batches of this incarnation numbered below
    it, so the journal may forget their ids. In the same transaction: ``quarantined`` inputs
    go to the journal's bounded quarantine, and ``marks`` replace the sensor's source marks of
    the same keys. ``batch`` is None when a batch carries only those.
    """

    batch_id: BatchId
    batch: ReadingBatch | None
    resend_floor: int = 0
    quarantined: tuple[QuarantinedInput, ...] = ()
    marks: tuple[SourceMark, ...] = ()


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


#: The lanes a record can be routed into (DESIGN.md, data path step 4). A record with no lane
#: yet is "unrouted" (stats and drops use that name for it).
LANES = ("P1", "P2", "P3", "EPHEMERAL")
UNROUTED = "unrouted"


@attrs.frozen(slots=True)
class RouteDecisions:
    """The router's decisions for the records it read, in column form: entry i routes the
    record at position ``pos[i]`` into ``lane[i]`` (one of `LANES`) by rule ``rule[i]``.

    ``drop[i]``: None = kept for its lane; otherwise the policy's reason (e.g. "duplicate",
    "near", "sampled-out") — the record stays local, is never synced, is evicted first after
    expired ones, and counts in the journal's drops under that reason and lane.
    ``expires_ns[i]``: the record's local expiry (set for EPHEMERAL), None = none.
    A decision for a position that does not exist or is already routed is ignored (a resend).
    """

    pos: tuple[int, ...]
    lane: tuple[str, ...]
    rule: tuple[str, ...]
    drop: tuple[str | None, ...]
    expires_ns: tuple[int | None, ...]


@attrs.frozen(slots=True)
class Aggregated:
    """Fact from the router: the raw P3 records of ``device_id``/``sensor_id`` with positions in
    ``first..last`` (inclusive) now have an aggregate, so eviction may take them (I7)."""

    device_id: str
    sensor_id: str
    first: int
    last: int


@attrs.frozen(slots=True)
class ConsumerCommit:
    """Command from a consumer: commit ``outputs`` and move my cursor from ``expected`` to
    ``new`` in one transaction (I4). Refused when my cursor is not at ``expected``.

    With the cursor, in the same transaction: ``outputs`` (one batch or several: a batch holds
    one sensor id) become new records, each given lane ``output_lane`` (e.g. "P3" for
    aggregates, "P1" for safety events; None = unrouted); ``decisions`` route existing records;
    ``aggregated`` marks raw P3 records as aggregated; ``state`` (JSON text, the consumer's own
    state) is stored with the cursor — None leaves the stored state as it is.
    Outputs in lane P1 may use the journal's P1 reserve; a commit without outputs is never
    refused for space.
    """

    consumer: str
    request_id: int
    expected: Position
    new: Position
    outputs: ReadingBatch | tuple[ReadingBatch, ...] | None = None
    output_lane: str | None = None
    decisions: RouteDecisions | None = None
    aggregated: tuple[Aggregated, ...] = ()
    state: str | None = None

    @property
    def output_batches(self) -> tuple[ReadingBatch, ...]:
        """``outputs`` as a tuple of batches (empty when there are none)."""
        if self.outputs is None:
            return ()
        if isinstance(self.outputs, ReadingBatch):
            return (self.outputs,)
        return tuple(self.outputs)


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
