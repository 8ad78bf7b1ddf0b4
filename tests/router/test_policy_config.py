"""Policy files: each kind of mistake gets an error naming the file, the rule (index and name),
the key and the problem; the shipped example loads and documents every option."""

import re
import tomllib

import pytest

from config.policy import (
    STATS,
    AggregateSpec,
    DedupSpec,
    Lane,
    PolicyError,
    example_policy_path,
    load_policy,
    parse_policy,
)

DEFAULT = {"default": {"lane": "P3"}}


def problems_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(tomllib.loads(text), "policy.toml")
    return info.value.problems


def rule_problems(**rule) -> list[str]:
    rule.setdefault("name", "r")
    rule.setdefault("lane", "P2")
    with pytest.raises(PolicyError) as info:
        parse_policy({"rules": [rule], **DEFAULT}, "policy.toml")
    return info.value.problems


def test_error_names_file_rule_key_and_problem():
    text = """
[[rules]]
name = "a"
kind = "engine"
lane = "P1"
[[rules]]
name = "b"
kind = "gps"
lane = "P1"
[[rules]]
name = "harsh-braking"
when = "ax => 3"
lane = "P1"
[default]
lane = "P3"
"""
    with pytest.raises(PolicyError) as info:
        parse_policy(tomllib.loads(text), "policy.toml")
    assert str(info.value) == (
        "policy.toml: rules[2] \"harsh-braking\": when: unknown operator '=>' in 'ax => 3' "
        "(use <, <=, ==, !=, >=, >)"
    )


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # keys and types
        ({"lane": "P1", "whne": "ax < 1"}, "whne: unknown key (did you mean 'when'?)"),
        ({"lane": "P1", "colour": 1}, "colour: unknown key (known keys: name, sensor"),
        ({"lane": "P1", "ttl_s": "1h"}, "ttl_s: expected seconds (got '1h')"),
        ({"lane": "P1", "ttl_s": True}, "ttl_s: expected seconds (got True)"),
        ({"lane": "P1", "ttl_s": 0}, "ttl_s: must be > 0 (got 0)"),
        ({"lane": "P1", "sensor": 3}, "sensor: expected a glob pattern or a list of them"),
        ({"lane": "P1", "kind": []}, "kind: is empty (omit kind to match any kind)"),
        ({"lane": "P1", "kind": ["imu", "imu"]}, "kind: lists an entry twice"),
        # lane
        ({"lane": "P4"}, "lane: must be one of P1, P2, P3, EPHEMERAL (got 'P4')"),
        ({"lane": "p1"}, "lane: must be one of P1, P2, P3, EPHEMERAL (got 'p1') (lanes are "
                         "upper case: 'P1')"),
        ({"lane": None}, "lane: required key is missing"),
        # when
        ({"when": "fix = 0"}, "when: unknown operator '=' in 'fix = 0' (use == to compare)"),
        ({"when": "ax < 1 && ay > 2"}, "combine comparisons with and, or, not"),
        ({"when": "(ax < 1"}, "when: missing ')' for the '(' at column 1 in '(ax < 1'"),
        ({"when": "ax < "}, "when: expected a number, a quoted string or true/false after "
                            "'ax <', got at the end"),
        ({"when": ""}, "when: is empty"),
        ({"when": 5}, "when: expected a condition like 'ax < -4.4' (got 5)"),
        ({"when": "moving < true"}, "'<' cannot compare with true (use == or !=)"),
        # EPHEMERAL
        ({"lane": "EPHEMERAL"}, "ttl_s: required for EPHEMERAL"),
        # options that do not fit the lane
        ({"lane": "P1", "aggregate": {"window_s": 10}},
         'aggregate: only P3 rules aggregate (this rule\'s lane is P1); remove it or set '
         'lane = "P3"'),
        ({"lane": "P3", "dedup": {"window_s": 10}}, "dedup: only P2 rules deduplicate"),
        ({"lane": "P1", "sample": {"every_s": 10}},
         "sample: P1 safety records are never sampled"),
        # dedup
        ({"dedup": {}}, "dedup.window_s: required key is missing (seconds)"),
        ({"dedup": {"window_s": 0}}, "dedup.window_s: must be >= 0.001 (got 0)"),
        ({"dedup": {"window_s": 5, "windw": 1}}, "dedup.windw: unknown key (did you mean "
                                                 "'window_s'?)"),
        ({"dedup": {"window_s": 5, "min_distance_m": -1}}, "dedup.min_distance_m: must be >= 0"),
        ({"dedup": {"window_s": 5, "lat_field": "y"}},
         "dedup.lat_field: only applies with min_distance_m > 0"),
        ({"dedup": {"window_s": 5, "fields": []}}, "dedup.fields: is empty: nothing to compare"),
        ({"dedup": {"window_s": 5, "fields": ["a b"]}}, "dedup.fields: 'a b' is not a value name"),
        ({"dedup": 5}, "dedup: expected a table like dedup = { ... } (got 5)"),
        # aggregate
        ({"lane": "P3", "aggregate": {"window_s": 10, "stats": ["avg"]}},
         "aggregate.stats: unknown statistic 'avg' (choose from count, min, max, mean, median, "
         "last)"),
        ({"lane": "P3", "aggregate": {"window_s": 10, "stats": []}}, "aggregate.stats: is empty"),
        ({"lane": "P3", "aggregate": {"stats": ["min"]}}, "aggregate.window_s: required key"),
        ({"lane": "P3", "aggregate": {"window_s": 10, "fields": []}}, "aggregate.fields: is empty"),
        # sample
        ({"sample": {"every_s": 30, "while": "speed_kmh << 1"}},
         "sample.while: unknown operator '<<'"),
        ({"sample": {"while": "speed_kmh < 1"}}, "sample.every_s: required key is missing"),
        # name
        ({"name": "has space", "lane": "P1"}, "name: must be 1-124 characters"),
        ({"name": "default", "lane": "P1"}, "name: 'default' is reserved"),
    ],
)
def test_bad_rule_error_names_rule_key_and_problem(rule, expected):
    if rule.get("lane", "") is None:
        del rule["lane"]
        rule["name"] = "r"
        with pytest.raises(PolicyError) as info:
            parse_policy({"rules": [rule], **DEFAULT}, "policy.toml")
        found = info.value.problems
    else:
        found = rule_problems(**rule)
    name = rule.get("name", "r")
    assert any(p.startswith("rules[0]") and expected in p for p in found), found
    if re.match(r"^[A-Za-z0-9][A-Za-z0-9_.:\-/]*$", name) and name != "default":
        assert all(p.startswith(f'rules[0] "{name}": ') for p in found), found


def test_rule_without_name_is_named_by_index():
    found = problems_of('[[rules]]\nlane = "P1"\n[default]\nlane = "P3"\n')
    assert found == ["rules[0]: name: required key is missing (a unique rule name like "
                     '"harsh-braking")']


def test_all_problems_of_a_file_are_reported_at_once():
    found = problems_of(
        '[[rules]]\nname = "a"\nlane = "P9"\n'
        '[[rules]]\nname = "b"\nlane = "P1"\nwhen = "x >"\n'
        '[default]\nlane = "P3"\n'
    )
    assert len(found) == 2
    assert found[0].startswith('rules[0] "a": lane:') and found[1].startswith('rules[1] "b": when:')


def test_duplicate_rule_names_are_refused():
    found = problems_of('[[rules]]\nname = "a"\nkind = "x"\nlane = "P1"\n'
                        '[[rules]]\nname = "a"\nkind = "y"\nlane = "P2"\n[default]\nlane = "P3"\n')
    assert found == ['rules[1] "a": name: already used by rules[0] (rule names must be unique)']


def test_rule_shadowed_by_an_earlier_catch_all_is_refused():
    found = problems_of('[[rules]]\nname = "all-imu"\nkind = "imu"\nlane = "P3"\n'
                        '[[rules]]\nname = "braking"\nkind = "imu"\nwhen = "ax < -4"\nlane = "P1"\n'
                        '[default]\nlane = "P3"\n')
    assert found == ['rules[1] "braking": unreachable: rules[0] "all-imu" has no \'when\' and '
                     "matches all its records first (move this rule up or narrow that one)"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[rules]]\nname = "a"\nlane = "P1"\nkind = "x"\n', 'default: required table is missing'),
        ('[default]\nlane = "P3"\nkind = "imu"\n',
         "default: kind: not allowed in [default] (it applies to records no rule matched"),
        ('[default]\nlane = "EPHEMERAL"\n', "default: ttl_s: required for EPHEMERAL"),
        ('[default]\nlane = "P3"\n[rule]\nname = "x"\n',
         "rule: unknown key (did you mean 'rules'?)"),
        ('[default]\nlane = "P3"\n[rules]\nname = "x"\n',
         "rules: expected an array of tables ([[rules]] entries)"),
        ('default = "P3"\n', "default: expected a table ([default]) (got 'P3')"),
        ('rules = [1]\n[default]\nlane = "P3"\n', "rules[0]: expected a table ([[rules]] entry)"),
    ],
)
def test_bad_file_structure_is_reported(text, expected):
    found = problems_of(text)
    assert any(expected in p for p in found), found


def test_missing_file_and_broken_toml_name_the_file(tmp_path):
    with pytest.raises(PolicyError, match="nope.toml: file not found"):
        load_policy(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[rules]\n")
    with pytest.raises(PolicyError, match="broken.toml: not valid TOML"):
        load_policy(broken)


def test_example_policy_loads_and_shows_every_option():
    policy = load_policy(example_policy_path())
    lanes = {r.lane for r in policy.rules}
    assert lanes == set(Lane)
    names = [r.name for r in policy.rules]
    assert names[:7] == ["safety-events", "harsh-braking", "impact", "engine-overheating",
                         "oil-pressure-low", "battery-low", "gps-fix-lost"]
    gps = policy.rule("gps-track")
    assert gps.dedup == DedupSpec(60.0, ("fix",), 15.0, "lat", "lon")
    assert gps.sample is not None and str(gps.sample.while_) == "speed_kmh < 1"
    engine = policy.rule("engine-metrics")
    assert engine.aggregate == AggregateSpec(10.0, STATS, ("rpm", "speed_kmh", "coolant_c",
                                                           "throttle_pct", "oil_kpa", "battery_v"))
    assert policy.rule("seat-vibration").ttl_s == 7200
    assert policy.default.lane is Lane.P3
    text = example_policy_path().read_text()
    for option in ("name", "sensor", "kind", "when", "lane", "ttl_s", "sample", "every_s",
                   "while", "dedup", "window_s", "fields", "min_distance_m", "lat_field",
                   "lon_field", "aggregate", "stats", "[default]"):
        assert re.search(rf"^#.*(?<![\w])({re.escape(option)})(?![\w])", text, re.M), option


def test_dedup_with_distance_compares_position_only_unless_fields_given():
    policy = parse_policy({"rules": [
        {"name": "a", "lane": "P2", "kind": "gps",
         "dedup": {"window_s": 5, "min_distance_m": 10}},
        {"name": "b", "lane": "P2", "kind": "nav", "dedup": {"window_s": 5}},
    ], **DEFAULT})
    assert policy.rule("a").dedup.fields == ()
    assert policy.rule("b").dedup.fields is None


def test_aggregate_stats_keep_the_canonical_order():
    policy = parse_policy({"rules": [
        {"name": "m", "lane": "P3", "aggregate": {"window_s": 5, "stats": ["last", "count"]}},
    ], **DEFAULT})
    assert policy.rule("m").aggregate.stats == ("count", "last")


# ---- fleetgw policy check ---------------------------------------------------------------------------

def test_check_command_prints_a_summary_of_a_valid_policy(capsys):
    from tools.policy_cmd import check_command

    assert check_command(str(example_policy_path()), None) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {example_policy_path()}: 12 rules, default lane P3")
    assert re.search(r"^\s+7 gps-track\s+P2\s+sensor gps\*; kind gps\s+ttl 86400s, sample, dedup$",
                     out, re.M)


def test_check_command_lists_problems_on_stderr_and_exits_2(tmp_path, capsys):
    from tools.policy_cmd import check_command

    bad = tmp_path / "policy.toml"
    bad.write_text('[[rules]]\nname = "harsh-braking"\nwhen = "ax => 3"\nlane = "P1"\n'
                   '[default]\nlane = "P3"\n')
    assert check_command(str(bad), None) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{bad}: rules[0] \"harsh-braking\": when: unknown operator '=>'" in captured.err


def test_check_command_explains_which_rule_a_record_takes(capsys):
    from tools.policy_cmd import check_command

    braking = ('{"device_id":"veh-001","sensor_id":"imu0","ts":1700000000000000000,'
               '"kind":"imu","values":{"ax":-5.2,"ay":0.1,"az":9.8}}')
    assert check_command(str(example_policy_path()), braking) == 0
    out = capsys.readouterr().out
    assert "rules[1] \"harsh-braking\": MATCH:" in out and "when ax < -4.4 [ax=-5.2: true]" in out
    assert "lane     P1  (rules[1] \"harsh-braking\")" in out
    assert check_command(str(example_policy_path()), '{"device_id": "v"}') == 2
    assert "Reading.sensor_id must be present" in capsys.readouterr().err
    assert check_command(str(example_policy_path()), "{nope") == 2
    assert "not valid JSON" in capsys.readouterr().err
