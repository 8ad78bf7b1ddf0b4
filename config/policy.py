"""Routing policy: which lane each record takes, and what the router does with it on the way.

Where this sits on the data path: step 4 — the router (`actors.router`) matches every journal
record against these rules (in order, first match wins, else ``[default]``) and assigns a lane:
P1 safety (sync as soon as any link exists, retried until acknowledged), P2 navigation
(batched, deduplicated), P3 metrics (aggregated, compressed) or EPHEMERAL (kept locally for a
TTL, never synced). The lane also decides what eviction may take first (DESIGN.md I7).

The file format is documented, option by option, in ``config/policy.example.toml``;
``fleetgw policy check FILE`` validates a file and explains a record's route.

Validation is a pass of its own over the decoded TOML (no I/O, every problem collected), written
by hand rather than with cattrs like `config.loader`: each problem must name the rule by index
and name, and several checks span keys (an option that does not fit the rule's lane, a rule
that an earlier one shadows). Problems read ``rules[2] "harsh-braking": when: <problem>``.
"""

from __future__ import annotations

import difflib
import math
from enum import StrEnum
from pathlib import Path
from typing import Any

import attrs

from actors.router.predicates import Predicate, PredicateError
from config.loader import read_toml
from messages.readings import IDENT_RE

#: Per-field statistics an aggregate can carry.
STATS = ("count", "min", "max", "mean", "median", "last")
#: Rule names become part of aggregate kinds ("agg:<name>"), which are identifiers too.
MAX_RULE_NAME = 124
DEFAULT_NAME = "default"
#: Windows and intervals below a millisecond are refused (timestamps are ns; this is a typo).
MIN_WINDOW_S = 0.001
DEFAULT_LAT_FIELD = "lat"
DEFAULT_LON_FIELD = "lon"


class Lane(StrEnum):
    """Where a record goes; the order is the uplink's priority."""

    P1 = "P1"  #: safety: sync as soon as any link exists, retried until acknowledged
    P2 = "P2"  #: navigation snapshots: batched, deduplicated
    P3 = "P3"  #: metrics: aggregated, compressed
    EPHEMERAL = "EPHEMERAL"  #: kept locally for ttl_s, never synced


LANES = tuple(lane.value for lane in Lane)


class PolicyError(Exception):
    """The policy cannot be used; ``problems`` lists each as ``where: key: what is wrong``."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


@attrs.frozen
class DedupSpec:
    """``dedup`` (P2 only): drop a record that repeats the last one kept from the same stream
    (device, sensor, rule) within ``window_s``.

    A record within the window is dropped when its ``fields`` equal the last kept record's AND
    (with ``min_distance_m`` > 0) its position moved less than ``min_distance_m`` from it. A
    record missing a position, or older than the window, is kept.
    """

    #: Seconds after the last kept record during which repeats are dropped (> 0).
    window_s: float
    #: Value names compared. None: all of the record's values. Empty: none (position only;
    #: the default when min_distance_m is set).
    fields: tuple[str, ...] | None = None
    #: Metres a position must move to count as new; 0: positions are not compared.
    min_distance_m: float = 0.0
    #: Value names of latitude and longitude (degrees), used when min_distance_m > 0.
    lat_field: str = DEFAULT_LAT_FIELD
    lon_field: str = DEFAULT_LON_FIELD

    @property
    def window_ns(self) -> int:
        return round(self.window_s * 1e9)


@attrs.frozen
class AggregateSpec:
    """``aggregate`` (P3 only): per stream, tumbling windows of ``window_s`` aligned to
    multiples of it on the record time; each closed window becomes one aggregate record
    (kind ``agg:<rule>``) that is synced, while the raw records stay local until evicted."""

    #: Window length in seconds (> 0); windows start at multiples of it since the epoch.
    window_s: float
    #: Statistics per field, a subset of STATS.
    stats: tuple[str, ...] = STATS
    #: Value names aggregated. None: every numeric value of the records.
    fields: tuple[str, ...] | None = None

    @property
    def window_ns(self) -> int:
        return round(self.window_s * 1e9)


@attrs.frozen
class SampleSpec:
    """``sample`` (not P1): keep at most one record per ``every_s`` per stream, while
    ``while_`` holds (a record for which it does not hold is kept and not counted)."""

    #: Seconds between kept records (> 0).
    every_s: float
    #: Condition under which sampling applies (TOML key ``while``); None: always.
    while_: Predicate | None = None

    @property
    def every_ns(self) -> int:
        return round(self.every_s * 1e9)


@attrs.frozen
class Rule:
    """One ``[[rules]]`` entry (or the ``[default]`` table, named "default").

    A rule matches a record when its sensor id matches one of ``sensors``, its kind one of
    ``kinds`` (glob patterns; empty matches any) and ``when`` holds for its values.
    """

    #: Unique identifier; aggregates of this rule have kind ``agg:<name>``.
    name: str
    #: Position in ``rules`` (0-based); None for the default.
    index: int | None
    lane: Lane
    #: Sensor id glob patterns (fnmatch: * ? [abc]); empty: any sensor.
    sensors: tuple[str, ...] = ()
    #: Record kind glob patterns; empty: any kind.
    kinds: tuple[str, ...] = ()
    #: Condition over the record's values; None: always.
    when: Predicate | None = None
    #: Seconds the raw record stays local after its ts. Required for EPHEMERAL (then deleted,
    #: never synced); for other lanes a bound applied only once the record is synced or
    #: aggregated (I7: unsynced P1 is never evicted). None: kept until the budget needs room.
    ttl_s: float | None = None
    dedup: DedupSpec | None = None
    aggregate: AggregateSpec | None = None
    sample: SampleSpec | None = None

    @property
    def is_default(self) -> bool:
        return self.index is None

    @property
    def where(self) -> str:
        """How errors and explanations name it: ``rules[2] "harsh-braking"`` or ``default``."""
        return DEFAULT_NAME if self.index is None else f'rules[{self.index}] "{self.name}"'

    @property
    def ttl_ns(self) -> int | None:
        return None if self.ttl_s is None else round(self.ttl_s * 1e9)


@attrs.frozen
class Policy:
    """A validated routing policy: ordered rules (first match wins) and the default."""

    rules: tuple[Rule, ...]
    default: Rule
    #: Where it was loaded from (for messages).
    source: str = "<policy>"

    def rule(self, name: str) -> Rule:
        """The rule called ``name`` (``default`` for the default). Raises KeyError."""
        for r in (*self.rules, self.default):
            if r.name == name:
                return r
        raise KeyError(name)


# ---- validation -------------------------------------------------------------------------------

_RULE_KEYS = ("name", "sensor", "kind", "when", "lane", "ttl_s", "dedup", "aggregate", "sample")
_DEFAULT_KEYS = ("lane", "ttl_s", "dedup", "aggregate", "sample")
_DEDUP_KEYS = ("window_s", "fields", "min_distance_m", "lat_field", "lon_field")
_AGGREGATE_KEYS = ("window_s", "stats", "fields")
_SAMPLE_KEYS = ("every_s", "while")


class _Problem(Exception):
    """One key's problem; collected, then reported with the rule that holds the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")


class _Table:
    """Typed, checked access to one TOML table; every key read is marked known."""

    def __init__(self, data: dict[str, Any], prefix: str = "") -> None:
        self.data, self.prefix = data, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def unknown(self, known: tuple[str, ...]) -> list[str]:
        out = []
        for extra in (k for k in self.data if k not in known):
            close = difflib.get_close_matches(extra, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(known)
            out.append(f"{self.key(extra)}: unknown key ({hint})")
        return out

    def number(self, name: str, *, required: bool = False, minimum: float | None = None,
               positive: bool = False, what: str = "a number") -> float | None:
        if name not in self.data:
            if required:
                raise _Problem(self.key(name), f"required key is missing ({what})")
            return None
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Problem(self.key(name), f"expected {what} (got {value!r})")
        if not math.isfinite(value):
            raise _Problem(self.key(name), f"must be finite (got {value!r})")
        if positive and value <= 0:
            raise _Problem(self.key(name), f"must be > 0 (got {value!r})")
        if minimum is not None and value < minimum:
            raise _Problem(self.key(name), f"must be >= {minimum} (got {value!r})")
        return float(value)

    def string(self, name: str, *, required: bool = False, what: str = "a string") -> str | None:
        if name not in self.data:
            if required:
                raise _Problem(self.key(name), f"required key is missing ({what})")
            return None
        value = self.data[name]
        if not isinstance(value, str):
            raise _Problem(self.key(name), f"expected {what} (got {value!r})")
        return value

    def strings(self, name: str, what: str) -> tuple[str, ...] | None:
        """A string or a list of strings (None when absent)."""
        if name not in self.data:
            return None
        value = self.data[name]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            raise _Problem(self.key(name), f"expected {what} (got {value!r})")
        if len(set(items)) != len(items):
            raise _Problem(self.key(name), f"lists an entry twice (got {value!r})")
        return tuple(items)

    def table(self, name: str) -> _Table | None:
        if name not in self.data:
            return None
        value = self.data[name]
        if not isinstance(value, dict):
            raise _Problem(self.key(name), f"expected a table like {name} = {{ ... }} "
                                            f"(got {value!r})")
        return _Table(value, f"{self.key(name)}.")


def _identifier(table: _Table, name: str, *, required: bool = False) -> str | None:
    value = table.string(name, required=required, what="a value name")
    if value is not None and not IDENT_RE.match(value):
        raise _Problem(table.key(name), f"must be a value name from [A-Za-z0-9_.:-/] "
                                        f"(got {value!r})")
    return value


def _names(table: _Table, name: str) -> tuple[str, ...] | None:
    names = table.strings(name, "a list of value names")
    for n in names or ():
        if not IDENT_RE.match(n):
            raise _Problem(table.key(name), f"{n!r} is not a value name ([A-Za-z0-9_.:-/])")
    return names


def _predicate(table: _Table, name: str) -> Predicate | None:
    text = table.string(name, what="a condition like 'ax < -4.4'")
    if text is None:
        return None
    try:
        return Predicate.parse(text)
    except PredicateError as exc:
        raise _Problem(table.key(name), str(exc)) from None


def _dedup(t: _Table) -> DedupSpec:
    window_s = t.number("window_s", required=True, minimum=MIN_WINDOW_S, what="seconds")
    distance = t.number("min_distance_m", minimum=0.0, what="metres") or 0.0
    fields = _names(t, "fields")
    lat, lon = _identifier(t, "lat_field"), _identifier(t, "lon_field")
    if distance == 0.0 and (lat or lon):
        raise _Problem(t.key("lat_field" if lat else "lon_field"),
                       "only applies with min_distance_m > 0 (set it, or remove this key)")
    if fields == () and distance == 0.0:
        raise _Problem(t.key("fields"), "is empty: nothing to compare (omit it to compare all "
                                        "values, or set min_distance_m)")
    if fields is None and distance > 0.0:
        fields = ()  # position only
    assert window_s is not None
    return DedupSpec(window_s, fields, distance, lat or DEFAULT_LAT_FIELD,
                     lon or DEFAULT_LON_FIELD)


def _aggregate(t: _Table) -> AggregateSpec:
    window_s = t.number("window_s", required=True, minimum=MIN_WINDOW_S, what="seconds")
    stats = t.strings("stats", "a list of statistics")
    if stats is not None:
        wrong = [s for s in stats if s not in STATS]
        if wrong:
            raise _Problem(t.key("stats"), f"unknown statistic {wrong[0]!r} "
                                           f"(choose from {', '.join(STATS)})")
        if not stats:
            raise _Problem(t.key("stats"), f"is empty (choose from {', '.join(STATS)})")
    fields = _names(t, "fields")
    if fields == ():
        raise _Problem(t.key("fields"), "is empty (omit it to aggregate every numeric value)")
    assert window_s is not None
    ordered = STATS if stats is None else tuple(s for s in STATS if s in stats)
    return AggregateSpec(window_s, ordered, fields)


def _sample(t: _Table) -> SampleSpec:
    every_s = t.number("every_s", required=True, minimum=MIN_WINDOW_S, what="seconds")
    assert every_s is not None
    return SampleSpec(every_s, _predicate(t, "while"))


def _lane_options(t: _Table, lane: Lane, problems: list[str]) -> dict[str, Any]:
    """ttl_s, dedup, aggregate, sample: each checked on its own and against the lane."""
    options: dict[str, Any] = {}
    lane_hint = f"(this rule's lane is {lane})"
    for key, build, fits, hint in (
        ("dedup", _dedup, lane is Lane.P2,
         f'only P2 rules deduplicate {lane_hint}; remove it or set lane = "P2"'),
        ("aggregate", _aggregate, lane is Lane.P3,
         f'only P3 rules aggregate {lane_hint}; remove it or set lane = "P3"'),
        ("sample", _sample, lane is not Lane.P1,
         "P1 safety records are never sampled; remove it or choose lane P2, P3 or EPHEMERAL"),
    ):
        try:
            sub = t.table(key)
            if sub is None:
                continue
            if not fits:
                raise _Problem(t.key(key), hint)
            problems.extend(sub.unknown({"dedup": _DEDUP_KEYS, "aggregate": _AGGREGATE_KEYS,
                                         "sample": _SAMPLE_KEYS}[key]))
            options[key] = build(sub)
        except _Problem as exc:
            problems.append(str(exc))
    try:
        ttl = t.number("ttl_s", positive=True, what="seconds")
        if ttl is None and lane is Lane.EPHEMERAL:
            raise _Problem(t.key("ttl_s"), "required for EPHEMERAL (seconds the record stays "
                                           "local before it is deleted, e.g. ttl_s = 3600)")
        options["ttl_s"] = ttl
    except _Problem as exc:
        problems.append(str(exc))
    return options


def _lane(t: _Table) -> Lane:
    value = t.string("lane", required=True, what="one of " + ", ".join(LANES))
    if value not in LANES:
        hint = f" (lanes are upper case: {value.upper()!r})" if value.upper() in LANES else ""
        raise _Problem("lane", f"must be one of {', '.join(LANES)} (got {value!r}){hint}")
    return Lane(value)


def _rule(index: int | None, data: dict[str, Any], problems: list[str]) -> Rule | None:
    """Validate one rule (or the default when index is None); its problems go to problems."""
    t, mine = _Table(data), []
    keys = _DEFAULT_KEYS if index is None else _RULE_KEYS
    for line in t.unknown(keys):
        if index is None and line.split(":")[0] in ("name", "sensor", "kind", "when"):
            line = (f"{line.split(':')[0]}: not allowed in [default] (it applies to records no "
                    f"rule matched; put match criteria in a [[rules]] entry)")
        mine.append(line)
    fields: dict[str, Any] = {"index": index}
    if index is None:
        fields["name"] = DEFAULT_NAME
    steps = [("lane", lambda: _lane(t))]
    if index is not None:
        steps += [("name", lambda: _rule_name(t)),
                  ("sensors", lambda: t.strings("sensor", "a glob pattern or a list of them")),
                  ("kinds", lambda: t.strings("kind", "a glob pattern or a list of them")),
                  ("when", lambda: _predicate(t, "when"))]
    for field, step in steps:
        try:
            value = step()
            if value == () and field in ("sensors", "kinds"):
                key = field[:-1]
                raise _Problem(key, f"is empty (omit {key} to match any {key})")
            if value is not None:
                fields[field] = value
        except _Problem as exc:
            mine.append(str(exc))
    if "lane" in fields:
        fields.update(_lane_options(t, fields["lane"], mine))
    where = DEFAULT_NAME if index is None else f"rules[{index}]"
    if index is not None and "name" in fields:
        where += f' "{fields["name"]}"'
    problems.extend(f"{where}: {m}" for m in mine)
    if mine or "lane" not in fields or "name" not in fields:
        return None
    return Rule(**fields)


def _rule_name(t: _Table) -> str:
    name = t.string("name", required=True, what='a unique rule name like "harsh-braking"')
    assert name is not None
    if not IDENT_RE.match(name) or len(name) > MAX_RULE_NAME:
        raise _Problem("name", f"must be 1-{MAX_RULE_NAME} characters from [A-Za-z0-9_.:-/] "
                               f"starting with a letter or digit (got {name!r})")
    if name == DEFAULT_NAME:
        raise _Problem("name", f"{DEFAULT_NAME!r} is reserved for the [default] table")
    return name


def _shadowed(rules: list[Rule]) -> list[str]:
    """Rules that can never match because an earlier rule without `when` takes all their
    records (same or wider sensor and kind patterns)."""
    def covers(wide: tuple[str, ...], narrow: tuple[str, ...]) -> bool:
        return not wide or "*" in wide or (bool(narrow) and set(narrow) <= set(wide))

    out = []
    for i, later in enumerate(rules):
        for earlier in rules[:i]:
            if (earlier.when is None and covers(earlier.sensors, later.sensors)
                    and covers(earlier.kinds, later.kinds)):
                out.append(f"{later.where}: unreachable: {earlier.where} has no 'when' and "
                           f"matches all its records first (move this rule up or narrow that "
                           f"one)")
                break
    return out


def parse_policy(data: dict[str, Any], path: str = "<policy>") -> Policy:
    """Validate a decoded TOML policy. Raises PolicyError listing every problem."""
    problems = _Table(data).unknown(("rules", "default"))
    rules: list[Rule] = []
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        problems.append("rules: expected an array of tables ([[rules]] entries)")
        raw_rules = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(raw_rules):
        if not isinstance(entry, dict):
            problems.append(f"rules[{i}]: expected a table ([[rules]] entry) (got {entry!r})")
            continue
        rule = _rule(i, entry, problems)
        if rule is None:
            continue
        if rule.name in seen:
            problems.append(f"{rule.where}: name: already used by rules[{seen[rule.name]}] "
                            f"(rule names must be unique)")
            continue
        seen[rule.name] = i
        rules.append(rule)
    default = None
    if "default" not in data:
        problems.append('default: required table is missing (add [default] with lane = "P3", '
                        "say: the lane of records no rule matches)")
    elif not isinstance(data["default"], dict):
        problems.append(f"default: expected a table ([default]) (got {data['default']!r})")
    else:
        default = _rule(None, data["default"], problems)
    problems.extend(_shadowed(rules))
    if problems or default is None:
        raise PolicyError(path, problems)
    return Policy(tuple(rules), default, path)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy TOML file. Raises PolicyError (file, rule, key, problem)."""
    path = str(path)
    return parse_policy(read_toml(path, PolicyError), path)


def example_policy_path() -> Path:
    """The documented example shipped beside this module (config/policy.example.toml)."""
    return Path(__file__).with_name("policy.example.toml")
