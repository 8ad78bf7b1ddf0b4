"""SensorOutbox: batching, in-flight limit, resends, refusals, journal restarts, back-pressure,
and the property that under any faults every reading is acknowledged exactly once."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from actors.sensors.outbox import SensorOutbox
from messages.journal import START, Append, Appended, AppendRefused, BatchId, SeqRange
from messages.readings import Reading

SENSOR = "imu0"
INCARNATION = 77
T0_NS = 1_700_000_000 * 10**9


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Readings:
    """Distinct readings in order: reading i carries the value i."""

    def __init__(self) -> None:
        self.i = 0

    def take(self, n: int) -> list[Reading]:
        first, self.i = self.i, self.i + n
        return [
            Reading("veh-001", SENSOR, T0_NS + i, "imu", {"i": i}) for i in range(first, self.i)
        ]


def make(clock: FakeClock, **overrides) -> SensorOutbox:
    settings = dict(
        batch_max_readings=10,
        batch_max_age_s=0.2,
        buffer_max_bytes=10_000,
        max_in_flight=4,
        resend_after_s=3.0,
        refused_retry_s=1.0,
        clock=clock,
    )
    settings.update(overrides)
    return SensorOutbox(SENSOR, INCARNATION, **settings)


def appended(append: Append, duplicate: bool = False) -> Appended:
    n = len(append.batch)
    return Appended(append.batch_id, (SeqRange("veh-001", 1, n),), START, START, duplicate)


def refused(append: Append, retry_after_s: float = 2.0, reason: str = "disk_budget"):
    return AppendRefused(append.batch_id, reason, "journal over its disk budget", retry_after_s)


def numbers(appends: list[Append]) -> list[int]:
    return [a.batch_id.batch_no for a in appends]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- batching ----------------------------------------------------------------------------------
def test_batches_close_at_max_readings_numbered_in_order(clock):
    box, src = make(clock), Readings()
    box.add(src.take(25))
    sends = box.due_sends()
    assert numbers(sends) == [1, 2]
    assert [a.batch_id for a in sends] == [BatchId(SENSOR, INCARNATION, n) for n in (1, 2)]
    assert [r.values["i"] for a in sends for r in a.batch.readings()] == list(range(20))
    assert box.figures()["open_readings"] == 5


def test_batch_closes_when_its_oldest_reading_is_old_enough(clock):
    box, src = make(clock), Readings()
    box.add(src.take(3))
    clock.advance(0.1)
    box.add(src.take(3))
    assert box.due_sends() == []
    assert box.next_deadline() == pytest.approx(1000.2)
    clock.advance(0.1)
    [send] = box.due_sends()
    assert len(send.batch) == 6


def test_flush_closes_open_batch_and_idle_after_all_acked(clock):
    box, src = make(clock), Readings()
    assert box.idle()
    box.add(src.take(4))
    assert not box.idle()
    box.flush()
    [send] = box.due_sends()
    assert len(send.batch) == 4 and not box.idle()
    box.on_appended(appended(send))
    assert box.idle()


def test_reading_of_another_sensor_is_rejected_before_anything_changes(clock):
    box = make(clock)
    stranger = Reading("veh-001", "gps0", T0_NS, "gps", {"lat": 1.0})
    with pytest.raises(ValueError, match="got a reading of sensor 'gps0'"):
        box.add(Readings().take(3) + [stranger])
    assert box.idle() and box.figures()["readings_added"] == 0


@pytest.mark.parametrize(
    "field", ["batch_max_readings", "batch_max_age_s", "buffer_max_bytes", "max_in_flight",
              "resend_after_s", "refused_retry_s"],
)
def test_settings_that_are_not_positive_are_rejected(clock, field):
    with pytest.raises(ValueError, match=f"{field} must be > 0"):
        make(clock, **{field: 0})


# ---- sending and acknowledgement ---------------------------------------------------------------
def test_at_most_max_in_flight_batches_are_out(clock):
    box, src = make(clock, max_in_flight=2), Readings()
    box.add(src.take(50))
    first = box.due_sends()
    assert numbers(first) == [1, 2]
    assert box.due_sends() == []
    box.on_appended(appended(first[0]))
    assert numbers(box.due_sends()) == [3]


def test_acked_batch_is_forgotten_and_latency_counts_from_first_send(clock):
    box, src = make(clock), Readings()
    box.add(src.take(10))
    [send] = box.due_sends()
    clock.advance(3.5)
    assert numbers(box.due_sends()) == [1]  # resent
    clock.advance(0.25)
    assert box.on_appended(appended(send)) == pytest.approx(3.75)
    f = box.figures()
    assert (f["acked_batches"], f["acked_readings"], f["unacked_batches"], f["unacked_bytes"]) == (
        1, 10, 0, 0)


def test_unacked_batch_is_resent_with_same_id_and_content(clock):
    box, src = make(clock), Readings()
    box.add(src.take(10))
    [first] = box.due_sends()
    clock.advance(2.9)
    assert box.due_sends() == []
    assert box.next_deadline() == pytest.approx(1003.0)
    clock.advance(0.1)
    [again] = box.due_sends()
    assert again.batch_id == first.batch_id and again.batch == first.batch
    clock.advance(3.0)
    assert box.due_sends() == [again]  # and again, until acknowledged
    assert box.figures()["resends"] == 2 and box.figures()["batches_sent"] == 1


def test_duplicate_ack_is_ignored(clock):
    box, src = make(clock), Readings()
    box.add(src.take(20))
    one, two = box.due_sends()
    assert box.on_appended(appended(one)) is not None
    assert box.on_appended(appended(one, duplicate=True)) is None
    assert box.on_appended(appended(one)) is None
    f = box.figures()
    assert (f["acked_batches"], f["acked_readings"], f["ignored_acks"]) == (1, 10, 2)
    assert f["unacked_batches"] == 1
    assert box.on_appended(appended(two, duplicate=True)) is not None  # a resend's reply counts


def test_ack_of_another_incarnation_or_sensor_is_ignored(clock):
    box, src = make(clock), Readings()
    box.add(src.take(10))
    [send] = box.due_sends()
    for other in (BatchId(SENSOR, INCARNATION + 1, 1), BatchId("gps0", INCARNATION, 1)):
        assert box.on_appended(Appended(other, (), START, START)) is None
    assert box.figures()["unacked_batches"] == 1
    assert box.on_appended(appended(send)) is not None


def test_resend_floor_is_the_lowest_batch_still_held(clock):
    box, src = make(clock, max_in_flight=2), Readings()
    box.add(src.take(40))
    one, two = box.due_sends()
    assert one.resend_floor == two.resend_floor == 1
    box.on_appended(appended(two))
    [three] = box.due_sends()
    assert three.resend_floor == 1  # batch 1 is still held
    box.on_appended(appended(one))
    [four] = box.due_sends()
    assert four.batch_id.batch_no == 4 and four.resend_floor == 3


# ---- refusals and journal restarts -------------------------------------------------------------
def test_refused_batch_is_kept_and_retried_when_the_journal_asked(clock):
    box, src = make(clock), Readings()
    box.add(src.take(10))
    [send] = box.due_sends()
    box.on_refused(refused(send, retry_after_s=2.0))
    assert box.next_deadline() == pytest.approx(1002.0)
    clock.advance(1.9)
    assert box.due_sends() == []
    clock.advance(0.1)
    assert box.due_sends() == [send]
    f = box.figures()
    assert (f["refused"], f["refused_disk_budget"], f["unacked_batches"]) == (1, 1, 1)


def test_refusal_without_a_retry_time_waits_refused_retry_s(clock):
    box, src = make(clock, refused_retry_s=5.0), Readings()
    box.add(src.take(10))
    [send] = box.due_sends()
    box.on_refused(refused(send, retry_after_s=0.0))
    assert box.next_deadline() == pytest.approx(1005.0)


def test_no_new_batch_is_sent_while_a_refused_one_waits(clock):
    box, src = make(clock), Readings()
    box.add(src.take(10))
    [send] = box.due_sends()
    box.on_refused(refused(send, retry_after_s=2.0))
    box.add(src.take(30))
    assert box.due_sends() == []  # the journal asked us to back off
    clock.advance(2.0)
    assert numbers(box.due_sends()) == [1, 2, 3, 4]


def test_batch_the_journal_calls_invalid_is_dropped_and_counted_not_retried(clock):
    box, src = make(clock), Readings()
    box.add(src.take(20))
    first, second = box.due_sends()
    box.on_refused(refused(first, retry_after_s=0.0, reason="invalid"))
    f = box.figures()
    assert (f["refused_invalid"], f["rejected_readings"], f["unacked_batches"]) == (1, 10, 1)
    clock.advance(10.0)
    # Never resent; the good batch behind it is resent as usual and nothing blocks new data.
    assert numbers(box.due_sends()) == [2]
    box.on_appended(appended(second))
    assert box.idle()


def test_late_ack_of_a_refused_batch_settles_it(clock):
    box, src = make(clock), Readings()
    box.add(src.take(10))
    [send] = box.due_sends()
    box.on_refused(refused(send))
    assert box.on_appended(appended(send)) is not None  # an earlier send got through
    box.add(src.take(10))
    assert numbers(box.due_sends()) == [2]  # no longer backing off
    box.on_refused(refused(send))  # a stale refusal for a settled batch: ignored
    assert box.figures()["unacked_batches"] == 1


def test_journal_restart_resends_all_in_flight(clock):
    box, src = make(clock, max_in_flight=3), Readings()
    box.add(src.take(50))
    sent = box.due_sends()
    assert numbers(sent) == [1, 2, 3]
    box.on_refused(refused(sent[1], retry_after_s=60.0))
    box.on_journal_restarted()
    assert box.next_deadline() < clock.now
    assert box.due_sends() == sent  # same ids, same content; none of the queued ones yet
    assert box.figures()["journal_restarts"] == 1


# ---- back-pressure -----------------------------------------------------------------------------
def test_buffer_full_stops_production_and_drops_nothing(clock):
    box, src = make(clock, buffer_max_bytes=2_000, max_in_flight=2), Readings()
    produced = 0
    while box.has_room():
        box.add(src.take(box.room()))
        produced = src.i
    assert box.room() == 0 and box.figures()["held"] == 1
    assert box.figures()["unacked_bytes"] >= 2_000
    clock.advance(10.0)  # time passes; nothing is dropped, nothing is produced
    acked: list[int] = []
    while not box.idle():
        for send in box.due_sends():
            box.on_appended(appended(send))
            acked += [r.values["i"] for r in send.batch.readings()]
        box.flush()
    assert acked == list(range(produced))
    assert box.has_room() and box.figures()["held"] == 1


def test_back_pressure_turns_on_once_per_episode(clock):
    box, src = make(clock, buffer_max_bytes=1_000, max_in_flight=1), Readings()
    for episode in (1, 2):
        while box.has_room():
            box.add(src.take(box.room()))
        assert box.figures()["held"] == episode
        for _ in range(3):  # still full: the same episode
            assert not box.has_room()
        while not box.has_room():
            [send] = box.due_sends()
            box.on_appended(appended(send))


# ---- the property: every reading is acknowledged exactly once ----------------------------------
class Journal:
    """A simulated journal: commits a batch id once, answers a duplicate with the first commit,
    forgets ids below the sender's resend floor (as the real journal may), and checks that one
    id always carries one content. Messages may reach it in any order."""

    def __init__(self) -> None:
        self.log: dict[BatchId, tuple] = {}  # every commit, for the final check
        self.remembered: dict[BatchId, tuple] = {}  # the ids it still knows
        self.floor = 0

    def answer(self, append: Append, refuse: bool, retry_after_s: float):
        bid, content = append.batch_id, (append.batch.ts, append.batch.payloads)
        if append.resend_floor > self.floor:
            self.floor = append.resend_floor
            self.remembered = {k: v for k, v in self.remembered.items() if k.batch_no >= self.floor}
        if bid in self.log:
            assert self.log[bid] == content, "one id, two contents"
        if bid.batch_no < self.floor:
            # Forgotten, but safe: the floor only passes batches already acknowledged.
            assert bid in self.log, "a batch below the resend floor was never committed"
            return appended(append, duplicate=True)
        if bid in self.remembered:
            return appended(append, duplicate=True)
        if refuse:
            return refused(append, retry_after_s)
        self.log[bid] = self.remembered[bid] = content
        return appended(append)


# One op: what happens, then its parameters (each op uses the ones it needs). Delivering and
# answering are weighted up: most interleavings worth finding need them.
OPS = st.tuples(
    st.sampled_from(["add"] * 3 + ["tick"] * 3 + ["deliver"] * 5 + ["reply"] * 5
                    + ["restart", "flush"]),
    st.integers(0, 50),  # add: how many readings; deliver/reply: which message in the channel
    st.floats(0.0, 4.0),  # tick: seconds that pass
    st.sampled_from(["ok", "ok", "refuse", "lose"]),  # deliver: what the journal does
    st.sampled_from([0.0, 0.5, 2.0]),  # deliver + refuse: the retry time asked for
    st.booleans(),  # reply: lost
    st.booleans(),  # reply: delivered twice
)


@settings(max_examples=300, deadline=None, report_multiple_bugs=False)
@given(ops=st.lists(OPS, min_size=10, max_size=200), max_in_flight=st.integers(1, 4),
       buffer_max_bytes=st.integers(200, 5_000))
def test_every_reading_is_acknowledged_exactly_once_under_any_faults(
    ops, max_in_flight, buffer_max_bytes
):
    clock = FakeClock()
    box = make(clock, batch_max_readings=7, max_in_flight=max_in_flight,
               buffer_max_bytes=buffer_max_bytes)
    src, journal = Readings(), Journal()
    to_journal: list[Append] = []
    to_sensor: list = []
    acked: Counter[BatchId] = Counter()
    floor = 0

    def settle(reply) -> None:
        if isinstance(reply, Appended):
            if box.on_appended(reply) is not None:
                acked[reply.batch_id] += 1
        else:
            box.on_refused(reply)

    for what, n, seconds, fate, retry_after_s, lost, twice in ops:
        if what == "add":
            if box.has_room():  # a well-behaved producer holds its source when full
                box.add(src.take(n % 25 + 1))
        elif what == "tick":
            clock.advance(seconds)
            for append in box.due_sends():
                # the sender's promise: floors never go back, nothing is sent below one
                assert floor <= append.resend_floor <= append.batch_id.batch_no
                floor = append.resend_floor
                to_journal.append(append)
        elif what == "deliver" and to_journal:
            append = to_journal.pop(n % len(to_journal))  # in any order
            if fate != "lose":
                to_sensor.append(journal.answer(append, fate == "refuse", retry_after_s))
        elif what == "reply" and to_sensor:
            reply = to_sensor[n % len(to_sensor)]
            if not twice:
                to_sensor.remove(reply)
            if not lost:
                settle(reply)
        elif what == "restart":
            to_journal.clear()  # the journal's mailbox is gone, and so are its replies
            to_sensor.clear()
            box.on_journal_restarted()
        elif what == "flush":
            box.flush()
        assert box.figures()["in_flight"] <= max_in_flight

    # Finally the link is perfect: everything gets answered and arrives.
    box.flush()
    for reply in to_sensor:
        settle(reply)
    for _ in range(100):  # a few rounds settle it: the buffer holds a few dozen batches at most
        if box.idle():
            break
        clock.advance(5.0)
        for append in box.due_sends():
            settle(journal.answer(append, refuse=False, retry_after_s=0.0))
    assert box.idle()

    assert set(acked) == set(journal.log)
    assert all(n == 1 for n in acked.values())  # exactly once
    committed = [payload for _ts, payloads in journal.log.values() for payload in payloads]
    assert sorted(committed, key=lambda p: int(p[5:-1])) == [f'{{"i":{i}}}' for i in range(src.i)]
    f = box.figures()
    assert f["readings_added"] == f["acked_readings"] == src.i
    for name in ("resends", "refused", "journal_restarts", "ignored_acks", "held"):
        event(f"{name} > 0: {f[name] > 0}")
    assert f["unacked_bytes"] == 0 and f["unacked_batches"] == 0
