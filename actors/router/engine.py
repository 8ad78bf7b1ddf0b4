"""The policy engine: which rule, and so which lane, a record takes.

Where this sits on the data path: step 4, first thing the router does with each journal record
— rules in policy order, first match wins, the ``[default]`` when none does. The engine is
stateless (sampling, dedup and aggregation keep their state in their own classes), so the same
record always gets the same `Decision`. `explain` is what ``fleetgw policy check --explain``
prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, Protocol

import attrs

from actors.router.predicates import Predicate, format_literal
from config.policy import Lane, Policy, Rule

#: Distinct (sensor id, kind) pairs whose candidate rules are cached; beyond it the cache
#: starts afresh (a misbehaving source inventing ids cannot grow memory without bound).
MAX_CACHED_PAIRS = 4096


class Routable(Protocol):
    """What the engine reads of a record: a journal `Record` or a `Reading` both fit."""

    @property
    def sensor_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def values(self) -> Mapping[str, Any]: ...


@attrs.frozen(slots=True)
class Decision:
    """The route of one record: the rule that matched (the default rule when none did) and
    why, one phrase per criterion, e.g. ``("sensor 'imu0' matches 'imu*'", "kind: any",
    "when 'ax < -4.4' holds")``."""

    rule: Rule
    why: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def lane(self) -> Lane:
        return self.rule.lane

    @property
    def is_default(self) -> bool:
        return self.rule.is_default


def _pattern_hit(what: str, value: str, patterns: tuple[str, ...]) -> tuple[bool, str]:
    """Whether ``value`` matches one of ``patterns`` (empty: any), and the phrase saying so."""
    if not patterns:
        return True, f"{what}: any"
    for p in patterns:
        if fnmatchcase(value, p):
            return True, f"{what} {value!r} matches {p!r}"
    shown = repr(patterns[0]) if len(patterns) == 1 else "any of " + ", ".join(map(repr, patterns))
    return False, f"{what} {value!r} does not match {shown}"


@attrs.frozen(slots=True)
class _Candidate:
    """A rule whose sensor and kind patterns match a (sensor, kind) pair; it matches a record
    of that pair when ``when`` holds (or is None). ``decision`` is prebuilt: matching
    allocates nothing."""

    when: Predicate | None
    decision: Decision


class PolicyEngine:
    """Matches records against a `Policy`: rules in order, first match wins."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._cache: dict[tuple[str, str], tuple[_Candidate, ...]] = {}
        self._default = Decision(policy.default, ("no rule matched",))

    def _candidates(self, sensor_id: str, kind: str) -> tuple[_Candidate, ...]:
        """Rules whose patterns match the pair, in order, up to the first without `when`."""
        out = []
        for rule in self.policy.rules:
            s_ok, s_why = _pattern_hit("sensor", sensor_id, rule.sensors)
            k_ok, k_why = _pattern_hit("kind", kind, rule.kinds)
            if not (s_ok and k_ok):
                continue
            when_why = "no 'when'" if rule.when is None else f"when '{rule.when}' holds"
            out.append(_Candidate(rule.when, Decision(rule, (s_why, k_why, when_why))))
            if rule.when is None:
                break  # later rules can never be reached for this pair
        if len(self._cache) >= MAX_CACHED_PAIRS:
            self._cache.clear()
        found = self._cache[(sensor_id, kind)] = tuple(out)
        return found

    def match(self, record: Routable, values: Mapping[str, Any] | None = None) -> Decision:
        """The decision for ``record``. ``values``: its decoded values when the caller has
        them (a journal `Record` decodes its payload on every ``.values``)."""
        cands = self._cache.get((record.sensor_id, record.kind))
        if cands is None:
            cands = self._candidates(record.sensor_id, record.kind)
        for cand in cands:
            if cand.when is None:
                return cand.decision
            if values is None:
                values = record.values
            if cand.when(values):
                return cand.decision
        return self._default

    def explain(self, record: Routable, values: Mapping[str, Any] | None = None) -> str:
        """Every rule tried, in order, with the criterion that failed or the reasons it
        matched, then the lane and what the router does in that lane."""
        if values is None:
            values = record.values
        lines = [f"record   {_describe_record(record)}",
                 "values   " + " ".join(f"{k}={_show(v)}" for k, v in values.items())]
        chosen: Rule | None = None
        for rule in self.policy.rules:
            s_ok, s_why = _pattern_hit("sensor", record.sensor_id, rule.sensors)
            k_ok, k_why = _pattern_hit("kind", record.kind, rule.kinds)
            if not s_ok or not k_ok:
                lines.append(f"{rule.where}: no: {s_why if not s_ok else k_why}")
                continue
            if rule.when is not None and not rule.when(values):
                lines.append(f"{rule.where}: no: when {rule.when.explain(values)}")
                continue
            when_why = "no 'when'" if rule.when is None else f"when {rule.when.explain(values)}"
            lines.append(f"{rule.where}: MATCH: {s_why}; {k_why}; {when_why}")
            chosen = rule
            break
        if chosen is None:
            chosen = self.policy.default
            lines.append("no rule matched: the default applies")
        elif chosen.index is not None and chosen.index + 1 < len(self.policy.rules):
            lines.append("(first match wins: later rules are not tried)")
        lines.append(f"lane     {chosen.lane}  ({chosen.where})")
        lines += [f"         {line}" for line in describe_rule(chosen, values)]
        return "\n".join(lines)


def describe_rule(rule: Rule, values: Mapping[str, Any] | None = None) -> list[str]:
    """One line per option of the rule's lane (what the router does with its records)."""
    lines = [{
        Lane.P1: "P1 safety: synced as soon as any link exists, retried until acknowledged",
        Lane.P2: "P2 navigation: batched",
        Lane.P3: "P3 metrics: compressed",
        Lane.EPHEMERAL: "EPHEMERAL: kept locally, never synced",
    }[rule.lane]]
    if rule.ttl_s is not None:
        lines.append(f"ttl_s {rule.ttl_s:g}: may be deleted {rule.ttl_s:g} s after its ts"
                     + {Lane.EPHEMERAL: "", Lane.P3: " once synced or aggregated"}.get(
                         rule.lane, " once synced"))
    if rule.sample is not None:
        s = rule.sample
        cond = "" if s.while_ is None else f" while {s.while_}"
        line = f"sample: at most one record every {s.every_s:g} s{cond}"
        if s.while_ is not None and values is not None:
            line += f" (now: {s.while_.explain(values)})"
        lines.append(line)
    if rule.dedup is not None:
        d = rule.dedup
        what = ("all values are" if d.fields is None
                else f"{', '.join(d.fields)} {'is' if len(d.fields) == 1 else 'are'}"
                if d.fields else "")
        near = (f"moved < {d.min_distance_m:g} m ({d.lat_field}/{d.lon_field})"
                if d.min_distance_m else "")
        lines.append(f"dedup: within {d.window_s:g} s of the last kept record, drop it when "
                     + " and ".join(x for x in (f"{what} identical" if what else "", near) if x))
    if rule.aggregate is not None:
        a = rule.aggregate
        fields = "every numeric value" if a.fields is None else ", ".join(a.fields)
        lines.append(f"aggregate: {a.window_s:g} s windows of {fields}: {', '.join(a.stats)}; "
                     f"the aggregate (kind agg:{rule.name}) is synced, raw records stay local")
    return lines


def _show(value: object) -> str:
    return format_literal(value) if isinstance(value, str | bool) else repr(value)


def _describe_record(record: Routable) -> str:
    parts = [f"sensor {record.sensor_id}", f"kind {record.kind}"]
    device = getattr(record, "device_id", None)
    if device is not None:
        parts.insert(0, f"device {device}")
    ts = getattr(record, "ts", None)
    if isinstance(ts, int):
        when = datetime.fromtimestamp(ts // 10**9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        parts.append(f"ts {ts} ({when}.{ts % 10**9:09d}Z)")
    return "  ".join(parts)
