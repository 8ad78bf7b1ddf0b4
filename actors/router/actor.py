"""RouterActor: the journal consumer that puts every record in a lane (data path step 4).

A thin shell over `Router` (actors/router/router.py). It reads records after its durable
cursor with its own read-only connection, routes them in bulk, and sends the journal ONE
`ConsumerCommit` holding the lane decisions, the aggregate records of closed windows, the
marks of raw P3 records now aggregated, its own state and its new cursor — committed together
(I4). After a crash it restores cursor and state from the journal: nothing skipped, nothing
routed twice, no aggregate emitted twice or lost. One commit is in flight at a time; it is
resent unchanged (same request id: the journal answers a duplicate) after a timeout or a
journal restart.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from typing import Any

from actors.base import SupervisedActor, log
from actors.journal.actor import journal_path
from actors.journal.reader import JournalReader, Record
from actors.journal.schema import JournalError
from actors.router.aggregate import Aggregate
from actors.router.router import Router
from config.policy import Lane, load_policy
from messages.journal import (
    Aggregated,
    ConsumerCommit,
    ConsumerCommitRefused,
    ConsumerCommitted,
    NewRecords,
    Position,
    RouteDecisions,
)
from messages.readings import ReadingBatch
from messages.supervision import StopChild

#: The consumer name of the router in the journal's cursor table.
CONSUMER = "router"
#: Resend an unanswered commit after this long (seconds).
RESEND_AFTER_S = 5.0


def aggregate_outputs(aggregates: list[Aggregate]) -> tuple[ReadingBatch, ...]:
    """The aggregate records as batches (a batch holds one sensor's readings)."""
    by_sensor: dict[str, list] = defaultdict(list)
    for agg in aggregates:
        by_sensor[agg.sensor_id].append(agg.to_reading())
    return tuple(ReadingBatch.from_readings(r) for r in by_sensor.values())


class RouterActor(SupervisedActor):
    """Routes journal records under the configured policy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reader: JournalReader | None = None
        self.router: Router | None = None
        self.cursor = Position(0)
        self.in_flight: ConsumerCommit | None = None
        self.sent_at = 0.0
        self.stop_request: tuple[Any, StopChild] | None = None
        self.stopped = False
        self.routed = 0
        self.commits = 0
        self.aggregates = 0
        self.verdicts: Counter[str] = Counter()
        self.lanes: Counter[str] = Counter()

    def on_init(self) -> None:
        self.policy = load_policy(self.settings.policy_path)
        self.start_timer("poll", self.settings.poll_s)

    # ---- reading and routing ----------------------------------------------------------
    def open_reader(self) -> bool:
        """Open the journal read-only and restore cursor + state (the journal may still be
        creating the file: then try again at the next poll)."""
        if self.reader is not None:
            return True
        try:
            self.reader = JournalReader(journal_path(self.data_dir))
        except JournalError:
            return False
        self.restore()
        return True

    def restore(self) -> None:
        assert self.reader is not None
        self.cursor, state = self.reader.consumer_state(CONSUMER)
        self.router = (Router.from_state(self.policy, json.loads(state)) if state
                       else Router(self.policy))
        log().info("router resumes at %s", self.cursor)

    def on_timer_poll(self) -> None:
        if self.in_flight is not None and time.monotonic() - self.sent_at > RESEND_AFTER_S:
            self.send_commit()
        self.work()
        self.start_timer("poll", self.settings.poll_s)

    def receiveMsg_NewRecords(self, msg: NewRecords, sender: Any) -> None:
        self.work()

    def work(self) -> None:
        if self.stop_request is not None and self.in_flight is None:
            self.finish_stop()
        if self.in_flight is not None or self.stopped or not self.open_reader():
            return
        assert self.reader is not None and self.router is not None
        records = self.reader.read(self.cursor, self.settings.batch_records)
        if not records:
            return
        if (len(records) < self.settings.batch_records
                and time.monotonic() - self.sent_at < self.settings.poll_s):
            # Each commit is a durable journal transaction on the acknowledgement path:
            # commit a full batch at once, a partial one at most once per poll interval.
            return
        self.in_flight = self.route(records)
        self.send_commit()

    def route(self, records: list[Record]) -> ConsumerCommit:
        """Route records into one commit (decisions, aggregates, marks, state, cursor)."""
        assert self.router is not None
        pos, lane, rule, drop, expires = [], [], [], [], []
        aggregates: list[Aggregate] = []
        for record in records:
            if record.kind.startswith("agg:"):
                continue  # our own output: the journal gave it its lane when it was written
            routed = self.router.route(record)
            r = routed.decision.rule
            pos.append(record.pos.value)
            lane.append(r.lane.value)
            rule.append(r.name)
            drop.append(None if routed.keep else routed.verdict.reason)
            expires.append(record.ts + r.ttl_ns if r.lane is Lane.EPHEMERAL and r.ttl_ns
                           else None)
            aggregates.extend(routed.aggregates)
            self.verdicts[routed.verdict.reason] += 1
            self.lanes[r.lane.value] += 1
        return ConsumerCommit(
            consumer=CONSUMER,
            request_id=random.SystemRandom().getrandbits(62),
            expected=self.cursor,
            new=records[-1].pos,
            outputs=aggregate_outputs(aggregates) or None,
            output_lane=Lane.P3.value,
            decisions=RouteDecisions(tuple(pos), tuple(lane), tuple(rule), tuple(drop),
                                     tuple(expires)) if pos else None,
            aggregated=tuple(Aggregated(a.device_id, a.sensor_id, a.first_pos, a.last_pos)
                             for a in aggregates),
            state=json.dumps(self.router.to_state(), separators=(",", ":")),
        )

    def send_commit(self) -> None:
        journal = self.peers.get("journal")
        if journal is not None and self.in_flight is not None:
            self.sent_at = time.monotonic()
            self.send(journal, self.in_flight)

    # ---- the journal's answers ----------------------------------------------------------
    def receiveMsg_ConsumerCommitted(self, msg: ConsumerCommitted, sender: Any) -> None:
        commit = self.in_flight
        if commit is None or msg.request_id != commit.request_id:
            return  # a duplicate answer to an earlier commit
        self.in_flight = None
        self.cursor = commit.new
        self.commits += 1
        self.routed += len(commit.decisions.pos) if commit.decisions else 0
        self.aggregates += len(commit.aggregated)
        self.work()  # more backlog?

    def receiveMsg_ConsumerCommitRefused(self, msg: ConsumerCommitRefused, sender: Any) -> None:
        if self.in_flight is None or msg.request_id != self.in_flight.request_id:
            return
        if msg.reason.startswith(("disk_budget", "disk_full", "stopping")):
            self.sent_at = time.monotonic()  # keep it; resent after RESEND_AFTER_S
            return
        # Our cursor is not the journal's: the in-memory state is ahead of what is durable.
        log().warning("router commit refused (%s); restoring from the journal", msg.reason)
        self.in_flight = None
        self.restore()

    def on_peers_changed(self, names: set[str]) -> None:
        if "journal" in names:
            self.send_commit()  # the journal restarted: the commit in flight may be lost

    # ---- stop ---------------------------------------------------------------------------
    def on_stop(self, msg: StopChild, sender: Any) -> None:
        # Open windows need no flush: they are part of the durable state and continue after
        # the next start. Only the commit in flight must land first.
        self.stop_request = (sender, msg)
        if self.in_flight is None:
            self.finish_stop()

    def finish_stop(self) -> None:
        assert self.stop_request is not None
        requester, msg = self.stop_request
        self.stop_request = None
        self.stopped = True
        self.reply_stopped(requester, msg, clean=True)

    def on_exit(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def figures(self) -> list[tuple[str, Any]]:
        figures = super().figures()
        backlog = None
        if self.reader is not None:
            backlog = self.reader.last_position().value - self.cursor.value
        figures += [("routed", self.routed), ("commits", self.commits),
                    ("aggregates", self.aggregates), ("cursor", self.cursor.value),
                    ("backlog", backlog)]
        figures += [(f"lane_{k}", v) for k, v in sorted(self.lanes.items())]
        figures += [(f"verdict_{k}", v) for k, v in sorted(self.verdicts.items())]
        return figures
