"""SensorOutbox deliveries: what one delivery of a source became (readings, quarantined inputs,
the source's marks) lands whole in one batch, and its receipt (e.g. the MQTT PUBACK) is
released only once it and every delivery before it is committed (I1) — under any order of
acknowledgements, refusals, losses and journal restarts."""

from __future__ import annotations

from collections import Counter
from itertools import permutations

import pytest
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st

from actors.sensors.outbox import SensorOutbox
from messages.journal import (
    START,
    Append,
    Appended,
    AppendRefused,
    BatchId,
    QuarantinedInput,
    SourceMark,
)
from messages.readings import Reading
from tests.sensors.test_outbox import FakeClock

SENSOR = "mqtt0"
INCARNATION = 5
T0_NS = 1_700_000_000 * 10**9


class Deliveries:
    """What a source hands the outbox: delivery j's readings carry {"d": j, "k": k}, its
    quarantined inputs the source ``q:<j>:<k>`` and its mark the key ``d<j>``."""

    def __init__(self) -> None:
        self.j = 0

    def next(self, readings: int = 0, quarantined: int = 0, mark: bool = True) -> dict:
        j, self.j = self.j, self.j + 1
        return dict(
            readings=[Reading("veh-001", SENSOR, T0_NS + k, "imu", {"d": j, "k": k})
                      for k in range(readings)],
            quarantined=[bad(f"q:{j}:{k}") for k in range(quarantined)],
            marks=[SourceMark(f"d{j}", f"fp{j}")] if mark else [],
        )


def bad(source: str, size: int = 16) -> QuarantinedInput:
    return QuarantinedInput.of(source, "payload is not valid JSON", b"\xff" * size, T0_NS)


def make(clock: FakeClock, **overrides) -> SensorOutbox:
    settings = dict(
        batch_max_readings=10,
        batch_max_age_s=0.2,
        buffer_max_bytes=100_000,
        max_in_flight=4,
        resend_after_s=3.0,
        refused_retry_s=1.0,
        clock=clock,
    )
    settings.update(overrides)
    return SensorOutbox(SENSOR, INCARNATION, **settings)


def ack(append: Append, duplicate: bool = False) -> Appended:
    return Appended(append.batch_id, (), START, START, duplicate)


def refusal(append: Append, reason: str = "disk_budget", retry_after_s: float = 2.0):
    return AppendRefused(append.batch_id, reason, f"refused: {reason}", retry_after_s)


def sizes(appends: list[Append]) -> list[int]:
    return [0 if a.batch is None else len(a.batch) for a in appends]


def delivered(append: Append) -> set[int]:
    """The deliveries (j) whose readings this batch holds."""
    return set() if append.batch is None else {r.values["d"] for r in append.batch.readings()}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- a delivery lands whole in one batch -------------------------------------------------------
def test_delivery_never_spans_two_batches(clock):
    box, src = make(clock), Deliveries()
    box.add_delivery(**src.next(readings=8))
    d1 = src.next(readings=3, quarantined=1)
    box.add_delivery(**d1)  # 8 + 3 > 10: the open batch closes first
    assert box.unacknowledged_batches() == 1 and box.has_open()
    box.add_delivery(**src.next(readings=4))  # 3 + 4 fits
    box.add_delivery(**src.next(readings=3))  # exactly full: closes with it
    assert not box.has_open() and box.unacknowledged_batches() == 2
    one, two = box.due_sends()
    assert sizes([one, two]) == [8, 10]
    assert delivered(one) == {0} and delivered(two) == {1, 2, 3}
    assert [m.key for m in one.marks] == ["d0"] and [m.key for m in two.marks] == ["d1", "d2", "d3"]
    assert two.quarantined == tuple(d1["quarantined"]) and one.quarantined == ()


def test_delivery_bigger_than_a_batch_gets_a_batch_of_its_own(clock):
    box, src = make(clock), Deliveries()
    box.add_delivery(**src.next(readings=2))
    box.add_delivery(**src.next(readings=25, quarantined=2))
    assert not box.has_open()
    one, two = box.due_sends()
    assert sizes([one, two]) == [2, 25]  # not split at batch_max_readings
    assert delivered(two) == {1} and [m.key for m in two.marks] == ["d1"]
    assert [q.source for q in two.quarantined] == ["q:1:0", "q:1:1"]


def test_marks_and_quarantined_travel_in_the_append_with_their_readings(clock):
    box, src = make(clock), Deliveries()
    deliveries = [src.next(readings=2, quarantined=1), src.next(quarantined=2),
                  src.next(readings=1), src.next(mark=True)]
    for d in deliveries:
        box.add_delivery(**d)
    clock.advance(0.2)  # the open batch is old enough
    [send] = box.due_sends()
    assert send.batch_id == BatchId(SENSOR, INCARNATION, 1)
    assert [r.values["d"] for r in send.batch.readings()] == [0, 0, 2]
    assert [q.source for q in send.quarantined] == ["q:0:0", "q:1:0", "q:1:1"]
    assert [m.key for m in send.marks] == ["d0", "d1", "d2", "d3"]
    clock.advance(3.0)
    assert box.due_sends() == [send]  # resent unchanged, extras included


def test_delivery_without_readings_makes_a_batch_without_readings(clock):
    box, src = make(clock), Deliveries()
    box.add_delivery(**src.next(quarantined=2))
    assert box.has_open()
    box.flush()
    [send] = box.due_sends()
    assert send.batch is None and len(send.quarantined) == 2 and len(send.marks) == 1
    box.on_appended(ack(send))
    f = box.figures()
    assert (f["quarantined"], f["acked_batches"], f["acked_readings"], f["readings_added"]) == (
        2, 1, 0, 0)
    assert box.idle() and f["unacked_bytes"] == 0


def test_delivery_with_a_reading_of_another_sensor_is_rejected_before_anything_changes(clock):
    box, src = make(clock), Deliveries()
    stranger = Reading("veh-001", "gps0", T0_NS, "gps", {"lat": 1.0})
    d = src.next(readings=2, quarantined=1)
    with pytest.raises(ValueError, match="got a reading of sensor 'gps0'"):
        box.add_delivery(d["readings"] + [stranger], quarantined=d["quarantined"],
                         marks=d["marks"], receipt="r")
    assert box.idle() and not box.has_open() and box.take_receipts() == []
    assert box.figures()["receipts_waiting"] == 0


# ---- receipts ----------------------------------------------------------------------------------
def test_receipt_waits_while_its_delivery_is_still_in_the_open_batch(clock):
    box, src = make(clock), Deliveries()
    box.add_delivery(**src.next(readings=2), receipt="r0")
    assert box.take_receipts() == [] and box.figures()["receipts_waiting"] == 1
    clock.advance(0.2)
    [send] = box.due_sends()
    assert box.take_receipts() == []  # sent is not committed
    box.on_refused(refusal(send))  # nor is refused for now
    assert box.take_receipts() == []
    clock.advance(2.0)
    assert box.due_sends() == [send]
    box.on_appended(ack(send))
    assert box.take_receipts() == ["r0"]
    assert box.take_receipts() == [] and box.figures()["receipts_waiting"] == 0


def _four_batches(clock) -> tuple[SensorOutbox, list[Append]]:
    """Deliveries r0..r4 in batches 1..4 (batch 2 holds r1 and r2), all sent."""
    box, src = make(clock), Deliveries()
    for batch in ([0], [1, 2], [3], [4]):
        for j in batch:
            box.add_delivery(**src.next(readings=1), receipt=f"r{j}")
        box.flush()
    sends = box.due_sends()
    assert [sorted(delivered(a)) for a in sends] == [[0], [1, 2], [3], [4]]
    return box, sends


@pytest.mark.parametrize("order", list(permutations(range(4))), ids=str)
def test_receipts_come_in_order_whatever_order_the_batches_are_acknowledged(clock, order):
    box, sends = _four_batches(clock)
    receipts_of = [["r0"], ["r1", "r2"], ["r3"], ["r4"]]
    taken: list[str] = []
    acked: set[int] = set()
    for i in order:
        box.on_appended(ack(sends[i]))
        acked.add(i)
        taken += box.take_receipts()
        prefix = 0
        while prefix in acked:
            prefix += 1
        # exactly the receipts of the acknowledged prefix, in order, each once
        assert taken == [r for batch in receipts_of[:prefix] for r in batch], (order, i)
    assert taken == ["r0", "r1", "r2", "r3", "r4"]


def test_receipt_only_delivery_is_released_at_once_when_nothing_is_pending(clock):
    box, src = make(clock), Deliveries()
    box.add_delivery(receipt="dup-1")
    assert box.take_receipts() == ["dup-1"]
    box.add_delivery(**src.next(readings=1), receipt="r0")
    box.flush()
    [send] = box.due_sends()
    box.on_appended(ack(send))
    box.add_delivery(receipt="dup-2")  # everything before it is committed
    assert box.take_receipts() == ["r0", "dup-2"]


def test_receipt_only_delivery_waits_for_earlier_deliveries_in_the_open_batch(clock):
    box, src = make(clock), Deliveries()
    box.add_delivery(**src.next(readings=1))  # no receipt (e.g. QoS 0), still earlier
    box.add_delivery(receipt="dup")
    assert box.take_receipts() == []
    clock.advance(0.2)
    [send] = box.due_sends()
    assert box.take_receipts() == []
    box.on_appended(ack(send))
    assert box.take_receipts() == ["dup"]


def test_receipt_only_delivery_waits_for_the_last_closed_batch_not_for_later_ones(clock):
    box, src = make(clock), Deliveries()
    box.add_delivery(**src.next(readings=1), receipt="r0")
    box.flush()
    [one] = box.due_sends()
    box.add_delivery(receipt="dup")  # open batch empty: waits for batch 1
    box.add_delivery(**src.next(readings=1), receipt="r1")  # later, in the open batch
    assert box.take_receipts() == []
    box.on_appended(ack(one))
    assert box.take_receipts() == ["r0", "dup"]  # r1 still waits for its own batch
    box.flush()
    [two] = box.due_sends()
    box.on_appended(ack(two))
    assert box.take_receipts() == ["r1"]


def test_drop_receipts_forgets_the_waiting_ones(clock):
    box, src = make(clock), Deliveries()
    box.add_delivery(**src.next(readings=1), receipt="r0")
    box.add_delivery(**src.next(readings=1), receipt="r1")
    box.flush()
    [send] = box.due_sends()
    assert box.drop_receipts() == 2 and box.figures()["receipts_waiting"] == 0
    box.add_delivery(**src.next(readings=1), receipt="r2")  # a new connection's
    box.on_appended(ack(send))
    assert box.take_receipts() == []  # r0, r1 are gone; r2 waits for its batch
    box.flush()
    [two] = box.due_sends()
    box.on_appended(ack(two))
    assert box.take_receipts() == ["r2"]
    assert box.drop_receipts() == 0
    assert box.figures()["acked_readings"] == 3  # dropping receipts drops no data


def test_batch_refused_as_invalid_releases_its_receipts_and_later_ones_wait(clock):
    box, src = make(clock), Deliveries()
    for j in range(3):
        box.add_delivery(**src.next(readings=1), receipt=f"r{j}")
        box.flush()
    one, two, three = box.due_sends()
    box.on_refused(refusal(two, reason="invalid", retry_after_s=0.0))
    assert box.take_receipts() == []  # r1's batch is settled, but r0's is not
    box.on_refused(refusal(one, reason="invalid", retry_after_s=0.0))
    assert box.take_receipts() == ["r0", "r1"]  # refused for good: nothing to wait for
    clock.advance(10.0)
    assert [a.batch_id for a in box.due_sends()] == [three.batch_id]  # refused ones: never
    box.on_appended(ack(three))
    assert box.take_receipts() == ["r2"]
    f = box.figures()
    assert (f["refused_invalid"], f["rejected_readings"], f["acked_readings"]) == (2, 2, 1)


def test_retryable_refusal_does_not_release_receipts(clock):
    box, src = make(clock), Deliveries()
    box.add_delivery(**src.next(readings=1), receipt="r0")
    box.flush()
    [send] = box.due_sends()
    for reason in ("disk_budget", "disk_full", "error", "stopping"):
        box.on_refused(refusal(send, reason=reason))
        assert box.take_receipts() == [], reason
        clock.advance(2.0)
        assert box.due_sends() == [send]
    box.on_journal_restarted()
    assert box.take_receipts() == []
    box.on_appended(ack(send))
    assert box.take_receipts() == ["r0"]


# ---- back-pressure -----------------------------------------------------------------------------
def test_back_pressure_counts_quarantined_and_mark_bytes(clock):
    box = make(clock, buffer_max_bytes=6_000)
    big = [bad(f"q:{k}", size=4096) for k in range(2)]
    box.add_delivery(quarantined=big[:1], marks=[SourceMark("m", "v" * 84)])
    box.flush()
    expected = big[0].nbytes + (1 + 84 + 16)
    assert box.figures()["unacked_bytes"] == expected and box.has_room()
    box.add_delivery(quarantined=big[1:])
    box.flush()
    assert box.figures()["unacked_bytes"] == expected + big[1].nbytes >= 6_000
    assert not box.has_room() and box.room() == 0 and box.figures()["held"] == 1
    for send in box.due_sends():
        box.on_appended(ack(send))
    assert box.has_room() and box.figures()["unacked_bytes"] == 0


def test_a_flood_of_quarantined_input_turns_back_pressure_on(clock):
    box = make(clock, buffer_max_bytes=10_000)
    for _ in range(20):  # ~83 KB of bad input, no readings
        box.add_delivery(quarantined=[bad("q", size=4096)])
    assert not box.has_room()


def test_has_open_and_unacknowledged_batches_follow_the_outbox(clock):
    box, src = make(clock, max_in_flight=1), Deliveries()
    assert not box.has_open() and box.unacknowledged_batches() == 0
    box.add_delivery(marks=[SourceMark("k", "v")])
    assert box.has_open() and box.unacknowledged_batches() == 0
    box.add_delivery(**src.next(readings=25))  # joins the marks (no readings open): closes
    assert not box.has_open() and box.unacknowledged_batches() == 1
    box.add_delivery(**src.next(readings=10))
    assert not box.has_open() and box.unacknowledged_batches() == 2
    first, = box.due_sends()  # one in flight, one queued: both unacknowledged
    assert box.unacknowledged_batches() == 2 and len(first.batch) == 25 and first.marks
    box.on_appended(ack(first))
    assert box.unacknowledged_batches() == 1
    [second] = box.due_sends()
    box.on_refused(refusal(second))
    assert box.unacknowledged_batches() == 1
    box.on_appended(ack(second))
    assert box.unacknowledged_batches() == 0 and box.idle()


# ---- the property: receipts exactly once, in order, never early --------------------------------
class Journal:
    """A simulated journal: commits a batch id once (a duplicate is answered as such); a batch
    it calls invalid the first time it sees it stays invalid (as content-based validation
    does); otherwise it commits, refuses for now, or the message is lost."""

    def __init__(self) -> None:
        self.committed: set[BatchId] = set()
        self.poisoned: set[BatchId] = set()

    def answer(self, append: Append, fate: str, retry_after_s: float):
        bid = append.batch_id
        if bid in self.poisoned:
            return refusal(append, "invalid", 0.0)
        if bid in self.committed:
            return ack(append, duplicate=True)
        if fate == "invalid":
            self.poisoned.add(bid)
            return refusal(append, "invalid", 0.0)
        if fate == "refuse":
            return refusal(append, "disk_budget", retry_after_s)
        self.committed.add(bid)
        return ack(append)


OPS = st.tuples(
    st.sampled_from(["deliver"] * 5 + ["tick"] * 3 + ["journal"] * 4 + ["reply"] * 4
                    + ["restart", "flush", "drop"]),
    st.integers(0, 40),  # deliver: readings (0 for most); journal/reply: which message
    st.integers(0, 2),  # deliver: quarantined inputs
    st.sampled_from(["content", "content", "content", "receipt-only"]),  # deliver: what
    st.booleans(),  # deliver: with a receipt
    st.floats(0.0, 4.0),  # tick: seconds
    st.sampled_from(["ok", "ok", "refuse", "invalid", "lose"]),  # journal: what it does
    st.booleans(),  # reply: lost
    st.booleans(),  # reply: delivered twice
)


@settings(max_examples=300, deadline=None, report_multiple_bugs=False,
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])
@given(ops=st.lists(OPS, min_size=10, max_size=150), max_in_flight=st.integers(1, 4))
def test_every_receipt_is_released_once_in_order_and_never_before_its_commit(ops, max_in_flight):
    clock = FakeClock()
    box = make(clock, batch_max_readings=6, max_in_flight=max_in_flight,
               buffer_max_bytes=3_000)
    src, journal = Deliveries(), Journal()
    sizes_of: dict[int, tuple[int, int]] = {}  # delivery j -> (readings, quarantined)
    receipt_of: dict[str, int] = {}  # receipt -> its delivery j
    batch_of: dict[int, int] = {}  # delivery j (with content) -> batch number
    first_send: dict[int, Append] = {}
    settled: set[int] = set()  # batch numbers committed or refused for good
    pending: list[str] = []  # receipts not yet taken nor dropped, in the order added
    released: Counter[str] = Counter()
    to_journal: list[Append] = []
    to_sensor: list = []

    def sent(appends: list[Append]) -> None:
        for a in appends:
            no = a.batch_id.batch_no
            if no in first_send:
                was = first_send[no]
                assert (a.batch, a.quarantined, a.marks) == (was.batch, was.quarantined,
                                                             was.marks), "a resend changed it"
                assert a.resend_floor >= was.resend_floor
                to_journal.append(a)
                continue
            first_send[no] = a
            reads = Counter(r.values["d"] for r in a.batch.readings()) if a.batch else Counter()
            bads = Counter(int(q.source.split(":")[1]) for q in a.quarantined)
            for m in a.marks:  # every delivery with content has one mark
                j = int(m.key[1:])
                assert j not in batch_of, f"delivery {j} in batches {batch_of[j]} and {no}"
                batch_of[j] = no
                # whole: all its readings and quarantined inputs are in this batch
                assert (reads.pop(j, 0), bads.pop(j, 0)) == sizes_of[j], (j, no)
            assert not reads and not bads, "content without its delivery's mark"
            if len(a.batch or ()) > box.batch_max_readings:
                assert len({r.values["d"] for r in a.batch.readings()}) == 1
            to_journal.append(a)

    def settle(reply) -> None:
        if isinstance(reply, Appended):
            if box.on_appended(reply) is not None:
                settled.add(reply.batch_id.batch_no)
        else:
            box.on_refused(reply)
            if reply.reason == "invalid":
                settled.add(reply.batch_id.batch_no)  # dropped now, or acknowledged before

    def unsettled_before(j: int) -> list[int]:
        """Deliveries up to j (with content) whose batch is not yet committed for good."""
        return [i for i in sizes_of if i <= j and batch_of.get(i) not in settled]

    def take() -> None:
        got = box.take_receipts()
        assert got == pending[:len(got)], "out of order, or one not waiting"
        del pending[:len(got)]
        for r in got:
            released[r] += 1
            assert not unsettled_before(receipt_of[r]), f"{r} released before its commit"
        if pending:  # and nothing held back that could go
            assert unsettled_before(receipt_of[pending[0]]), f"{pending[0]} held back"

    for what, n, nq, kind, with_receipt, seconds, fate, lost, twice in ops:
        if what == "deliver":
            j = src.j
            if kind == "content":
                d = src.next(readings=n if n < 20 else 0, quarantined=nq)
                sizes_of[j] = (len(d["readings"]), len(d["quarantined"]))
            else:
                d = src.next(mark=False)
            receipt = f"r{j}" if with_receipt else None
            if receipt is not None:
                receipt_of[receipt] = j
                pending.append(receipt)
            if box.has_room() or kind != "content":
                box.add_delivery(**d, receipt=receipt)
            else:  # a well-behaved source holds its input when full: it never happened
                del sizes_of[j]
                if receipt is not None:
                    pending.pop()
        elif what == "tick":
            clock.advance(seconds)
            sent(box.due_sends())
        elif what == "journal" and to_journal:
            append = to_journal.pop(n % len(to_journal))  # in any order
            if fate != "lose":
                to_sensor.append(journal.answer(append, fate, retry_after_s=seconds))
        elif what == "reply" and to_sensor:
            reply = to_sensor[n % len(to_sensor)]
            if not twice:
                to_sensor.remove(reply)
            if not lost:
                settle(reply)
        elif what == "restart":
            to_journal.clear()
            to_sensor.clear()
            box.on_journal_restarted()
        elif what == "flush":
            box.flush()
        elif what == "drop":
            assert box.drop_receipts() == len(pending)
            pending.clear()
        take()

    # Finally the link is perfect: everything settles and every receipt comes back.
    box.flush()
    for reply in to_sensor:
        settle(reply)
    take()
    for _ in range(200):
        if box.idle():
            break
        clock.advance(5.0)
        appends = box.due_sends()
        sent(appends)
        for append in appends:
            settle(journal.answer(append, "ok", 0.0))
            take()
    assert box.idle()
    take()
    assert pending == [] and box.figures()["receipts_waiting"] == 0
    assert all(n == 1 for n in released.values())  # exactly once
    assert set(batch_of) == set(sizes_of)  # every delivery with content went out
    assert settled == set(first_send)
    event(f"receipts released: {min(len(released), 10) // 5 * 5}+")
    event(f"invalid batches: {bool(journal.poisoned)}")
    event(f"batches bigger than batch_max_readings: "
          f"{any(len(a.batch or ()) > 6 for a in first_send.values())}")
