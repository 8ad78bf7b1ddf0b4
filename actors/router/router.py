"""The router's logic: one journal record in, its lane, verdict and any closed aggregates out.

Where this sits on the data path: step 4. The router actor (a thin shell, wired separately)
reads journal records after its cursor, passes each through `Router.route` in journal order,
and sends the journal its outputs (aggregate records, lane marks) with its new cursor and
`Router.to_state()` so they commit together (I4): a restarted router restores the state with
`Router.from_state` and continues exactly where the committed cursor is.

Per record, in this order: match (`PolicyEngine`: first rule wins, else the default) ->
sample (rules with ``sample``) -> dedup (P2 rules with ``dedup``) -> aggregate (P3 rules with
``aggregate``). A record dropped by a step goes no further; the verdict's reason is what
metrics count it under (I7).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from actors.router.aggregate import Aggregate, Aggregator
from actors.router.dedup import Deduplicator
from actors.router.engine import Decision, PolicyEngine
from actors.router.sampling import Sampler
from actors.router.verdict import KEEP, STATE_VERSION, Verdict, check_state_version
from config.policy import Lane, Policy

_NONE: tuple[Aggregate, ...] = ()


@attrs.frozen(slots=True)
class Routed:
    """What the router decided for one record: the rule and lane, keep or drop (with the
    reason), and the aggregates of windows this record closed."""

    decision: Decision
    verdict: Verdict
    aggregates: tuple[Aggregate, ...] = ()

    @property
    def lane(self) -> Lane:
        return self.decision.lane

    @property
    def keep(self) -> bool:
        return self.verdict.keep


class Router:
    """Routes journal records under a policy; its whole state is `to_state()`."""

    def __init__(self, policy: Policy, sampler: Sampler | None = None,
                 dedup: Deduplicator | None = None, aggregator: Aggregator | None = None) -> None:
        self.policy = policy
        self.engine = PolicyEngine(policy)
        self.sampler = Sampler() if sampler is None else sampler
        self.dedup = Deduplicator() if dedup is None else dedup
        self.aggregator = Aggregator() if aggregator is None else aggregator

    def route(self, record: Any, values: Mapping[str, Any] | None = None) -> Routed:
        """Route one journal `Record` (``values``: its decoded values, if already at hand)."""
        if values is None:
            values = record.values
        decision = self.engine.match(record, values)
        rule = decision.rule
        verdict = KEEP
        if rule.sample is not None:
            verdict = self.sampler.offer(record, rule, values)
            if not verdict.keep:
                return Routed(decision, verdict)
        if rule.dedup is not None:
            verdict = self.dedup.offer(record, rule, values)
            if not verdict.keep:
                return Routed(decision, verdict)
        if rule.aggregate is not None:
            return Routed(decision, verdict, self.aggregator.add(record, rule, values))
        return Routed(decision, verdict, _NONE)

    def flush(self, until_ts: int) -> tuple[Aggregate, ...]:
        """Close every aggregation window ending at or before ``until_ts``."""
        return self.aggregator.flush(until_ts)

    def to_state(self) -> dict[str, Any]:
        """Everything the router must persist with its cursor, as a JSON-able dict."""
        return {
            "version": STATE_VERSION,
            "sampler": self.sampler.to_state(),
            "dedup": self.dedup.to_state(),
            "aggregator": self.aggregator.to_state(),
        }

    @classmethod
    def from_state(cls, policy: Policy, state: Mapping[str, Any]) -> Router:
        """A router that continues from ``state`` under ``policy`` (which may have changed:
        state of rules that are gone is inert; open windows close with the statistics they
        were opened with)."""
        check_state_version(state, "router")
        return cls(policy, Sampler.from_state(state["sampler"]),
                   Deduplicator.from_state(state["dedup"]),
                   Aggregator.from_state(state["aggregator"]))
