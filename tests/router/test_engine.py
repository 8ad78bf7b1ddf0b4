"""The policy engine: rules in order, first match wins, the default when none does; sensor and
kind patterns are globs; `explain` says which rule matched and why."""

from fnmatch import fnmatchcase

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.router.engine import PolicyEngine
from actors.router.predicates import Predicate
from config.policy import Lane, Policy, Rule, load_policy, parse_policy
from messages.readings import Reading
from tests.router import TS0, record
from tests.router.test_predicates import nodes, records, reference


def policy(*rules, default="P3") -> Policy:
    return parse_policy({"rules": list(rules), "default": {"lane": default}}, "t.toml")


def reading(sensor, kind, **values):
    return Reading("veh-1", sensor, TS0, kind, values)


def test_first_matching_rule_wins():
    engine = PolicyEngine(policy(
        {"name": "braking", "kind": "imu", "when": "ax < -4.4", "lane": "P1"},
        {"name": "impact", "kind": "imu", "when": "ax < -19", "lane": "P2"},
        {"name": "imu", "kind": "imu", "lane": "P3"},
    ))
    assert engine.match(reading("imu0", "imu", ax=-25.0)).name == "braking"
    assert engine.match(reading("imu0", "imu", ax=-1.0)).name == "imu"


def test_record_no_rule_matches_takes_the_default_lane():
    engine = PolicyEngine(policy({"name": "gps", "kind": "gps", "lane": "P2"}, default="P1"))
    decision = engine.match(reading("can0", "dtc", code=1))
    assert decision.is_default and decision.lane is Lane.P1 and decision.name == "default"
    assert decision.why == ("no rule matched",)


def test_sensor_and_kind_patterns_are_globs():
    engine = PolicyEngine(policy(
        {"name": "front", "sensor": ["imu-front*", "imu0"], "kind": "imu", "lane": "P2"},
        {"name": "any-imu", "sensor": "imu?", "lane": "P3"},
        {"name": "nav", "kind": "[gn]ps*", "lane": "EPHEMERAL", "ttl_s": 60},
    ))
    assert engine.match(reading("imu-front-left", "imu", ax=0)).name == "front"
    assert engine.match(reading("imu0", "imu", ax=0)).name == "front"
    assert engine.match(reading("imu1", "imu", ax=0)).name == "any-imu"
    assert engine.match(reading("imu12", "imu", ax=0)).is_default  # ? is one character
    assert engine.match(reading("x", "gps2", lat=0)).name == "nav"
    assert engine.match(reading("x", "nps", lat=0)).name == "nav"
    assert engine.match(reading("x", "GPS", lat=0)).is_default  # case matters


def test_decision_says_why_it_matched():
    engine = PolicyEngine(policy({"name": "hot", "kind": "eng*", "when": "coolant_c > 105",
                                  "lane": "P1"}))
    decision = engine.match(reading("engine0", "engine", coolant_c=110.0))
    assert decision.why == ("sensor: any", "kind 'engine' matches 'eng*'",
                            "when 'coolant_c > 105' holds")


def test_missing_or_mistyped_value_does_not_match_and_does_not_raise():
    engine = PolicyEngine(policy({"name": "fix-lost", "kind": "gps", "when": "fix == 0",
                                  "lane": "P1"}))
    assert engine.match(reading("gps0", "gps", lat=1.0)).is_default
    assert engine.match(reading("gps0", "gps", fix="none")).is_default
    assert engine.match(reading("gps0", "gps", fix=0)).name == "fix-lost"


def test_journal_record_is_matched_from_its_payload():
    engine = PolicyEngine(policy({"name": "b", "kind": "imu", "when": "ax < -4.4", "lane": "P1"}))
    assert engine.match(record(1, TS0, {"ax": -5.0}, kind="imu")).name == "b"
    assert engine.match(record(2, TS0, {"ax": 0.0}, kind="imu")).is_default


def test_explain_lists_rules_tried_the_match_and_the_lane_options():
    engine = PolicyEngine(policy(
        {"name": "braking", "kind": "imu", "when": "ax < -4.4", "lane": "P1"},
        {"name": "gps", "kind": "gps", "lane": "P2",
         "dedup": {"window_s": 60, "min_distance_m": 15},
         "sample": {"every_s": 30, "while": "speed_kmh < 1"}},
        {"name": "later", "kind": "gps*", "when": "fix == 0", "lane": "P1"},
    ))
    text = engine.explain(reading("gps0", "gps", lat=1.0, lon=2.0, speed_kmh=0.0))
    lines = text.splitlines()
    assert lines[0].startswith("record   device veh-1  sensor gps0  kind gps  ts ")
    assert lines[1] == "values   lat=1.0 lon=2.0 speed_kmh=0.0"
    assert lines[2] == "rules[0] \"braking\": no: kind 'gps' does not match 'imu'"
    assert lines[3] == ("rules[1] \"gps\": MATCH: sensor: any; kind 'gps' matches 'gps'; "
                        "no 'when'")
    assert "(first match wins: later rules are not tried)" in lines
    assert "lane     P2  (rules[1] \"gps\")" in lines
    assert any("sample: at most one record every 30 s while speed_kmh < 1 (now: "
               "speed_kmh < 1 [speed_kmh=0.0: true] -> true)" in line for line in lines)
    assert any("dedup: within 60 s" in line and "moved < 15 m (lat/lon)" in line
               for line in lines)
    miss = engine.explain(reading("imu0", "imu", ax=-1.0))
    assert "rules[0] \"braking\": no: when ax < -4.4 [ax=-1.0: false] -> false" in miss
    assert "no rule matched: the default applies" in miss
    assert miss.splitlines()[-2] == "lane     P3  (default)"


def test_example_policy_routes_simulated_records_as_documented():
    from actors.sensors.sim import SimulatedSource
    from config.policy import example_policy_path

    engine = PolicyEngine(load_policy(example_policy_path()))
    seen: dict[str, set[str]] = {}
    for kind, sensor, rate in (("imu", "imu0", 50), ("gps", "gps0", 1), ("engine", "engine0", 10)):
        source = SimulatedSource(kind, rate, "veh-001", sensor, 1, TS0)
        for r in source.due(TS0 + 120 * 10**9, 100_000):
            seen.setdefault(kind, set()).add(engine.match(r).name)
    assert seen["gps"] == {"gps-track"}
    assert seen["engine"] == {"engine-metrics"}
    assert "imu-metrics" in seen["imu"] and seen["imu"] <= {"imu-metrics", "harsh-braking"}
    assert engine.match(reading("imu-seat-1", "imu", ax=0.1)).name == "seat-vibration"
    assert engine.match(reading("imu0", "imu", ax=-5.0)).lane is Lane.P1
    assert engine.match(reading("engine0", "engine", coolant_c=106.0)).name == "engine-overheating"
    assert engine.match(reading("gps0", "gps", fix=0)).name == "gps-fix-lost"


# ---- property: the engine agrees with a brute-force evaluation of the rules -----------------------

SENSORS = ["imu0", "imu1", "gps0", "eng-a", "x"]
KINDS = ["imu", "gps", "engine", "dtc"]
PATTERNS = st.sampled_from(["*", "imu*", "imu?", "gps0", "eng-[ab]", "x", "?ps*", "dtc", "imu"])


@st.composite
def rules(draw, index):
    when = draw(st.none() | nodes)
    return Rule(
        name=f"r{index}", index=index, lane=draw(st.sampled_from(list(Lane))),
        sensors=tuple(draw(st.lists(PATTERNS, max_size=2, unique=True))),
        kinds=tuple(draw(st.lists(PATTERNS, max_size=2, unique=True))),
        when=None if when is None else Predicate.from_node(when),
        ttl_s=1.0,
    )


@st.composite
def policies(draw):
    n = draw(st.integers(0, 6))
    return Policy(tuple(draw(rules(i)) for i in range(n)),
                  Rule("default", None, draw(st.sampled_from(list(Lane))), ttl_s=1.0))


def brute_force(pol: Policy, sensor: str, kind: str, values: dict) -> str:
    for rule in pol.rules:
        if rule.sensors and not any(fnmatchcase(sensor, p) for p in rule.sensors):
            continue
        if rule.kinds and not any(fnmatchcase(kind, p) for p in rule.kinds):
            continue
        if rule.when is not None and not reference(rule.when.node, values):
            continue
        return rule.name
    return "default"


@settings(deadline=None)  # a loaded 2-core machine: timings vary
@given(policies(), st.lists(st.tuples(st.sampled_from(SENSORS), st.sampled_from(KINDS), records),
                            min_size=1, max_size=12))
def test_match_agrees_with_brute_force_evaluation_of_the_rules(pol, stream):
    engine = PolicyEngine(pol)
    for sensor, kind, values in stream:  # repeated pairs exercise the candidate cache
        decision = engine.match(Reading("veh-1", sensor, TS0, kind, values or {"z": 0}),
                                values)
        assert decision.name == brute_force(pol, sensor, kind, values)
        chosen = pol.rule(decision.name)
        assert decision.lane is chosen.lane
        explained = engine.explain(Reading("veh-1", sensor, TS0, kind, values or {"z": 0}),
                                   values)
        assert f"lane     {chosen.lane}  ({chosen.where})" in explained
