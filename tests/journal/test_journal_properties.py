"""Property tests: whatever sensors and consumers do — new batches, resends, restarts as new
incarnations, late messages from dead ones, consumer commits and their resends, journal
reopens, time passing — in any order, every device's seqs stay 1..n with no gap (I2) and every
distinct batch is stored exactly once.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from actors.journal import Journal
from actors.journal.journal import DEAD_INCARNATION_GRACE_NS
from messages.journal import Appended, BatchId, ConsumerCommit, Position
from messages.readings import ReadingBatch
from tests.journal import TS0, device_seqs, make_batch, stored_markers

SENSORS = ("imu-1", "gps-1")
DEVICES = ("veh-1", "veh-2", "veh-3")
Incarnation = tuple[str, int]  # (sensor_id, incarnation)


class JournalMachine(RuleBasedStateMachine):
    """A model of what was acknowledged, checked against the journal after every step."""

    sent = Bundle("sent")

    @initialize()
    def open_journal(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fleetgw-journal-prop-")
        self.path = f"{self.dir}/journal.db"
        self.now = TS0
        self.journal = self._open()
        self.live: dict[str, int] = dict.fromkeys(SENSORS, 1)
        self.dead: list[Incarnation] = []
        self.next_no: dict[Incarnation, int] = {}
        self.floor: dict[Incarnation, int] = {}  # the sender never resends below it
        self.expected: dict[str, int] = {}  # marker -> readings stored under it
        self.replies: dict[BatchId, tuple[Appended, int]] = {}  # reply, commit time
        self.consumer_pos = Position(0)
        self.consumer_request = 0
        self.serial = 0

    def _open(self) -> Journal:
        return Journal(self.path, synchronous="NORMAL", clock_ns=lambda: self.now,
                       monotonic_ns=lambda: self.now)

    def teardown(self) -> None:
        if hasattr(self, "journal"):
            self.journal.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _append_new(self, inc: Incarnation, devices: list[str], raise_floor: bool):
        batch_id = BatchId(inc[0], inc[1], self.next_no.get(inc, 1))
        self.next_no[inc] = batch_id.batch_no + 1
        if raise_floor:  # every earlier batch was acknowledged
            self.floor[inc] = batch_id.batch_no
        self.serial += 1
        marker = f"m{self.serial}"
        batch = make_batch(inc[0], devices, marker)
        reply = self.journal.append(batch_id, batch, resend_floor=self.floor.get(inc, 0))
        assert isinstance(reply, Appended) and not reply.duplicate, reply
        assert sum(r.count for r in reply.ranges) == len(devices)
        self.expected[marker] = len(devices)
        self.replies[batch_id] = (reply, self.now)
        return batch_id, batch

    @rule(
        target=sent,
        sensor=st.sampled_from(SENSORS),
        devices=st.lists(st.sampled_from(DEVICES), min_size=1, max_size=6),
        raise_floor=st.booleans(),
    )
    def append_new_batch(self, sensor: str, devices: list[str], raise_floor: bool):
        return self._append_new((sensor, self.live[sensor]), devices, raise_floor)

    @rule(target=sent, data=st.data())
    def late_new_batch_from_a_dead_incarnation(self, data: st.DataObject):
        assume(self.dead)
        inc = data.draw(st.sampled_from(self.dead))
        return self._append_new(inc, ["veh-1"], raise_floor=False)

    @rule(sent=sent)
    def resend(self, sent: tuple[BatchId, ReadingBatch]) -> None:
        batch_id, batch = sent
        original, committed_at = self.replies[batch_id]
        # What a sender can do: resend soon (within the grace, messages are not in flight
        # longer) and never below its floor.
        assume(self.now - committed_at <= DEAD_INCARNATION_GRACE_NS)
        assume(batch_id.batch_no >= self.floor.get((batch_id.sensor_id, batch_id.incarnation), 0))
        reply = self.journal.append(batch_id, batch)
        assert reply == Appended(
            batch_id, original.ranges, original.first, original.last, duplicate=True
        )

    @rule(sensor=st.sampled_from(SENSORS), incarnation=st.integers(0, 2**62))
    def restart_sensor(self, sensor: str, incarnation: int) -> None:
        # Incarnation ids are random: a new one may be smaller than the dead one.
        assume(incarnation != self.live[sensor] and (sensor, incarnation) not in self.dead)
        self.dead.append((sensor, self.live[sensor]))
        self.live[sensor] = incarnation

    @rule()
    def time_passes(self) -> None:
        self.now += DEAD_INCARNATION_GRACE_NS + 1

    @rule()
    def reopen_journal(self) -> None:
        self.journal.close()
        self.journal = self._open()

    @rule(with_outputs=st.booleans(), resend=st.booleans())
    def consumer_commits(self, with_outputs: bool, resend: bool) -> None:
        assume(self.journal.last_position() > self.consumer_pos)
        self.consumer_request += 1
        outputs = None
        if with_outputs:
            self.serial += 1
            marker = f"m{self.serial}"
            outputs = make_batch("router", ["veh-1", "veh-2"], marker, kind="agg")
        commit = ConsumerCommit(
            "router",
            self.consumer_request,
            self.consumer_pos,
            self.journal.last_position(),
            outputs,
        )
        for attempt in range(2 if resend else 1):
            reply = self.journal.commit_consumer(commit)
            assert reply.duplicate == (attempt == 1), reply
        if outputs is not None:
            self.expected[marker] = 2
        self.consumer_pos = commit.new

    @invariant()
    def every_batch_is_stored_exactly_once(self) -> None:
        if hasattr(self, "journal"):
            assert stored_markers(self.path) == self.expected

    @invariant()
    def seqs_run_one_to_n_per_device(self) -> None:
        if hasattr(self, "journal"):
            for device_id, seqs in device_seqs(self.path).items():
                assert seqs == list(range(1, len(seqs) + 1)), device_id
            assert self.journal.cursor("router") == self.consumer_pos


JournalMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,  # a loaded 2-core machine: fsync and reopen times vary
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_journal_properties = JournalMachine.TestCase
