"""Property test of eviction (I2, I7): whatever the order of appends, routing decisions,
watermarks, time passing and evictions (forced by squeezing the sensors' share of the budget
before an append), per device every journaled record is either still there or in an evicted
run (counted, not assumed), unsynced P1 is never evicted, and verify() holds.
"""

from __future__ import annotations

import shutil
import tempfile

import apsw
from hypothesis import HealthCheck, assume, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from actors.journal import Journal
from messages.journal import (
    LANES,
    Appended,
    BatchId,
    ConsumerCommit,
    ConsumerCommitted,
    RouteDecisions,
)
from tests.journal import TS0, make_batch

DEVICES = ("veh-1", "veh-2")


class EvictionMachine(RuleBasedStateMachine):
    @initialize()
    def open_journal(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="fleetgw-evict-prop-")
        self.path = f"{self.dir}/journal.db"
        self.now = TS0 + 10**12
        self.journal = Journal(self.path, synchronous="NORMAL", clock_ns=lambda: self.now)
        self.journaled: dict[str, int] = {}  # device -> records acknowledged (the model)
        self.p1_kept: set[tuple[str, int]] = set()  # (device, seq) routed P1, not dropped
        self.batch_no = 0
        self.cursor = self.journal.cursor("router")
        self.request = 0

    def teardown(self) -> None:
        if hasattr(self, "journal"):
            self.journal.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _append(self, devices: list[str]) -> bool:
        self.batch_no += 1
        reply = self.journal.append(
            BatchId("imu-1", 1, self.batch_no), make_batch("imu-1", devices, f"b{self.batch_no}")
        )
        if isinstance(reply, Appended):
            for r in reply.ranges:
                self.journaled[r.device_id] = self.journaled.get(r.device_id, 0) + r.count
            return True
        assert reply.reason == "disk_budget", reply
        return False

    @rule(devices=st.lists(st.sampled_from(DEVICES), min_size=1, max_size=40))
    def append(self, devices: list[str]) -> None:
        assert self._append(devices)  # the default budget is far away

    @rule(data=st.data())
    def route(self, data: st.DataObject) -> None:
        records = self.journal.read(self.cursor, 60)
        assume(records)
        n = data.draw(st.integers(1, len(records)))
        pos, lane, rule_, drop, expires = [], [], [], [], []
        for r in records[:n]:
            ln = data.draw(st.sampled_from(LANES))
            dr = data.draw(st.sampled_from((None, None, "duplicate")))
            pos.append(r.pos.value)
            lane.append(ln)
            rule_.append("r")
            drop.append(dr)
            expires.append(
                self.now + data.draw(st.integers(-10, 10)) * 10**9 if ln == "EPHEMERAL" else None
            )
            if ln == "P1" and dr is None:
                self.p1_kept.add((r.device_id, r.seq))
        self.request += 1
        commit = ConsumerCommit(
            "router", self.request, self.cursor, records[n - 1].pos,
            decisions=RouteDecisions(tuple(pos), tuple(lane), tuple(rule_), tuple(drop),
                                     tuple(expires)),
            state=f'{{"n": {self.request}}}',
        )
        assert isinstance(self.journal.commit_consumer(commit), ConsumerCommitted)
        self.cursor = commit.new

    @rule(device=st.sampled_from(DEVICES), lane=st.sampled_from(LANES), share=st.floats(0, 1))
    def watermark(self, device: str, lane: str, share: float) -> None:
        last = self.journaled.get(device, 0)
        self.journal.advance_watermark(device, lane, int(last * share))

    @rule()
    def time_passes(self) -> None:
        self.now += 7 * 10**9

    @rule(squeeze=st.integers(1_000, 200_000), devices=st.lists(st.sampled_from(DEVICES), min_size=1, max_size=20))
    def evict(self, squeeze: int, devices: list[str]) -> None:
        """Shrink the sensors' share below what the journal uses, then append: it evicts."""
        saved = self.journal.sensor_budget_bytes
        self.journal.sensor_budget_bytes = max(1, self.journal.usage_bytes() - squeeze)
        before = self.journal.evicted_records
        try:
            self._append(devices)
        finally:
            self.journal.sensor_budget_bytes = saved
        event("evicted" if self.journal.evicted_records > before else "nothing to evict")

    def _db(self, sql: str) -> list[tuple]:
        conn = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    @invariant()
    def journaled_is_kept_plus_evicted(self) -> None:
        if not hasattr(self, "journal"):
            return
        kept = dict(self._db("SELECT device_id, count(*) FROM records GROUP BY 1"))
        evicted = dict(
            self._db("SELECT device_id, sum(seq_hi - seq_lo + 1) FROM evicted GROUP BY 1")
        )
        for device in set(kept) | set(evicted) | set(self.journaled):
            assert kept.get(device, 0) + evicted.get(device, 0) == self.journaled.get(device, 0)

    @invariant()
    def unsynced_p1_is_never_evicted(self) -> None:
        if not hasattr(self, "journal"):
            return
        marks = self.journal.watermarks()
        present = set(self._db("SELECT device_id, seq FROM records WHERE lane = 'P1'"))
        for device, seq in self.p1_kept:
            if seq > marks.get(device, {}).get("P1", 0):
                assert (device, seq) in present, (device, seq)

    @invariant()
    def verify_holds(self) -> None:
        if hasattr(self, "journal"):
            report = self.journal.verify()
            assert report.ok, report.problems


EvictionMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_eviction_properties = EvictionMachine.TestCase
