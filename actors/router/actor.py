"""RouterActor: the journal consumer that puts every record in a lane (data path step 4).

A thin shell over `Router` (actors/router/router.py) on the shared consumer shell
(`actors.journal.consumer.ConsumerActor`: read after the durable cursor, one commit in flight,
resend, restore). Each commit holds the lane decisions, the aggregate records of closed
windows, the marks of raw P3 records now aggregated, the router's own state and its new
cursor — committed together (I4). After a crash it restores cursor and state from the journal:
nothing skipped, nothing routed twice, no aggregate emitted twice or lost.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from actors.journal.consumer import ConsumerActor
from actors.journal.reader import Record
from actors.router.aggregate import Aggregate
from actors.router.router import Router
from config.policy import Lane, load_policy
from messages.journal import Aggregated, ConsumerCommit, ConsumerCommitted, RouteDecisions
from messages.readings import ReadingBatch

#: The consumer name of the router in the journal's cursor table.
CONSUMER = "router"


def aggregate_outputs(aggregates: list[Aggregate]) -> tuple[ReadingBatch, ...]:
    """The aggregate records as batches (a batch holds one sensor's readings)."""
    by_sensor: dict[str, list] = defaultdict(list)
    for agg in aggregates:
        by_sensor[agg.sensor_id].append(agg.to_reading())
    return tuple(ReadingBatch.from_readings(r) for r in by_sensor.values())


class RouterActor(ConsumerActor):
    """Routes journal records under the configured policy."""

    CONSUMER = CONSUMER

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.router: Router | None = None
        self.routed = 0
        self.aggregates = 0
        self.verdicts: Counter[str] = Counter()
        self.lanes: Counter[str] = Counter()

    def on_init(self) -> None:
        self.policy = load_policy(self.settings.policy_path)
        super().on_init()

    def restore_state(self, state: str | None) -> None:
        self.router = (Router.from_state(self.policy, json.loads(state)) if state
                       else Router(self.policy))

    def build_commit(self, records: list[Record]) -> ConsumerCommit:
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
        return self.new_commit(
            records[-1].pos,
            outputs=aggregate_outputs(aggregates) or None,
            output_lane=Lane.P3.value,
            decisions=RouteDecisions(tuple(pos), tuple(lane), tuple(rule), tuple(drop),
                                     tuple(expires)) if pos else None,
            aggregated=tuple(Aggregated(a.device_id, a.sensor_id, a.first_pos, a.last_pos)
                             for a in aggregates),
            state=json.dumps(self.router.to_state(), separators=(",", ":")),
        )

    def on_committed(self, commit: ConsumerCommit, msg: ConsumerCommitted) -> None:
        self.routed += len(commit.decisions.pos) if commit.decisions else 0
        self.aggregates += len(commit.aggregated)

    def figures(self) -> list[tuple[str, Any]]:
        figures = super().figures()
        figures += [("routed", self.routed), ("aggregates", self.aggregates)]
        figures += [(f"lane_{k}", v) for k, v in sorted(self.lanes.items())]
        figures += [(f"verdict_{k}", v) for k, v in sorted(self.verdicts.items())]
        return figures
