"""The drill file: every problem is found before anything starts, each naming the file, the
key and what is wrong; and the timeline expands as the file says (repeats, jitter, ends)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tools.drill.loader import load_drill
from tools.drill.spec import DEFAULT_ENDS_AFTER_S, DrillError, FaultSection
from tools.drill.timeline import expand, occurrence_times
from tools.harness.toml_text import toml_value

ROOT = Path(__file__).resolve().parents[2]

#: A valid drill: a gateway with a sim sensor, an MQTT sensor on the gateway's own broker, an
#: NMEA UDP source and a CAN bus without a multicast port (not floodable).
BASE = {
    "drill": {"name": "t", "duration_s": 20},
    "gateway": {"config": {
        "gateway": {"device_id": "veh-001"},
        "broker": {"enabled": True},
        "sensors": [
            {"id": "imu0", "kind": "imu", "rate_hz": 10},
            {"id": "cabin", "type": "mqtt", "mqtt": {"topics": [{"filter": "drill/+/cabin"}]}},
            {"id": "gnss0", "type": "nmea", "nmea": {"source": "udp://127.0.0.1:47999"}},
            {"id": "can0", "type": "can", "can": {"interface": "udp_multicast",
                                                  "dbc": "config/demo_vehicle.dbc"}},
        ]}},
    "invariants": {"check": ["I1"]},
}


def dump(data: dict) -> str:
    """A drill as TOML: tables, arrays of tables ([[faults]]), inline values below them."""
    lines = []
    for section, value in data.items():
        if isinstance(value, list):
            for item in value:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "drill.toml"
    path.write_text(data if isinstance(data, str) else dump(data))
    return path


def drill_with(**sections) -> dict:
    data = copy.deepcopy(BASE)
    for name, value in sections.items():
        if value is None:
            data.pop(name, None)
        elif isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name].update(value)
        else:
            data[name] = value
    return data


def problems(tmp_path: Path, data: dict | str) -> list[str]:
    path = write(tmp_path, data)
    with pytest.raises(DrillError) as caught:
        load_drill(path)
    text = str(caught.value)
    assert all(line.startswith(f"{path}: ") for line in text.splitlines()), text
    return caught.value.problems


def fault(**keys) -> dict:
    """A [[faults]] entry: a kill of sensor:imu0 at 1 s with ``keys`` changed (None: left out)."""
    entry = {"kind": "kill", "at_s": 1, "target": "sensor:imu0", **keys}
    return {k: v for k, v in entry.items() if v is not None}


def test_a_valid_drill_loads_with_its_gateway_tree(tmp_path):
    drill = load_drill(write(tmp_path, drill_with(faults=[fault()])))
    assert drill.name == "t"
    assert {"journal", "sensors", "sensor:imu0", "sensor:cabin", "processing", "router",
            "uplink", "broker"} <= set(drill.actors)
    assert drill.actors[0] == "gateway"


@pytest.mark.parametrize("shipped", sorted((ROOT / "drills").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_every_shipped_drill_loads_and_its_short_run_has_faults(shipped):
    drill = load_drill(shipped)
    assert drill.timeline(short=True), "the --short run would apply no fault"
    assert drill.duration_s(short=True) <= 30, "keep the CI version short"


def test_the_lossy_test_drill_loads():
    assert load_drill(ROOT / "tests" / "drill" / "lossy.toml").file.load is not None


@pytest.mark.parametrize(("data", "expected"), [
    # the file itself
    ("[drill\n", "not valid TOML"),
    # [drill]
    (drill_with(drill=None), "drill: required key 'drill' is missing"),
    (drill_with(drill={"name": "a b"}), "drill.name: must be 1-128 characters"),
    (drill_with(drill={"duration_s": 0}), "drill.duration_s: must be > 0 (got 0"),
    (drill_with(drill={"short_duration_s": 30}),
     "drill.short_duration_s: must be <= duration_s (20; got 30)"),
    (drill_with(drill={"seconds": 3}), "drill: unknown key(s) seconds"),
    (drill_with(drill={"seed": "x"}), "drill.seed: expected an integer (got 'x')"),
    (drill_with(drill={"settle_s": -1}), "drill.settle_s: must be > 0 (got -1"),
    # [gateway]
    (drill_with(gateway={"config": "nowhere.toml"}), "gateway.config: "),
    (drill_with(gateway={"config": 5}), "gateway.config: must be a path to a gateway TOML"),
    (drill_with(gateway={"config": {"sensors": [{"id": "x", "kind": "imu", "rate_hz": 0}]}}),
     "gateway.config.sensors[0].rate_hz: must be > 0"),
    (drill_with(gateway={"disk_mb": 0}), "gateway.disk_mb: must be > 0 (got 0)"),
    (drill_with(gateway={"clock": "yes"}), "gateway.clock: expected true or false"),
    (drill_with(gateway={"colour": 1}), "gateway: unknown key(s) colour"),
    # [load]
    (drill_with(load={"sensor": "nope"}), "load.sensor: no sensor 'nope' in the gateway config"),
    (drill_with(load={"sensor": "imu0"}), "load.sensor: imu0 is a sim sensor"),
    (drill_with(load={"sensor": "cabin", "topic": "other/x"}),
     "load.topic: 'other/x' matches none of sensor cabin's topic filters (drill/+/cabin)"),
    (drill_with(load={"sensor": "cabin", "rate_hz": 0}), "load.rate_hz: must be > 0"),
    # [invariants]
    (drill_with(invariants=None), "invariants: required key 'invariants' is missing"),
    (drill_with(invariants={"check": []}), "invariants.check: must list at least one of I1"),
    (drill_with(invariants={"check": ["I10"]}), "invariants.check: must list invariants from "),
    (drill_with(invariants={"check": ["I1", "I1"]}), "invariants.check: lists an invariant twice"),
    (drill_with(invariants={"max_commit_pause_s": 0}),
     "invariants.max_commit_pause_s: must be > 0"),
    (drill_with(invariants={"max_recover_s": -2}), "invariants.max_recover_s: must be > 0"),
    (drill_with(invariants={"check": ["I8"]}),
     "invariants.check: I8 is about malformed input: add a fault of kind flood"),
    (drill_with(gateway={"receiver": False}, invariants={"check": ["I5"]}),
     "invariants.check: I5 compares the journal with central: it needs the receiver"),
])
def test_a_bad_section_is_refused_naming_file_key_and_problem(tmp_path, data, expected):
    found = problems(tmp_path, data)
    assert any(expected in p for p in found), found


@pytest.mark.parametrize(("keys", "expected"), [
    ({"kind": "explode"}, "faults[0].kind: must be one of kill, pause, inject"),
    ({"at_s": -1}, "faults[0].at_s: must be >= 0 (got -1"),
    ({"at_s": 20}, "faults[0].at_s: must be < drill.duration_s (20; got 20)"),
    ({"jump_s": 5}, "faults[0].jump_s: is only for kind clock_jump (this fault is kind kill)"),
    ({"target": None}, "faults[0].target: is required for kind kill"),
    ({"target": []}, "faults[0].target: must name an actor"),
    ({"target": "sensor:nope"}, "faults[0].target: no actor 'sensor:nope' in this gateway's "
                                "tree"),
    ({"target": ["router", "gateway"]}, "faults[0].target: gateway is the root"),
    ({"count": 3}, "faults[0].count: needs every_s"),
    ({"until_s": 9}, "faults[0].until_s: needs every_s"),
    ({"every_s": 2, "until_s": 0.5}, "faults[0].until_s: must be >= at_s (1; got 0.5)"),
    ({"every_s": 2, "until_s": 9, "count": 2}, "faults[0].until_s: and count both bound"),
    ({"every_s": 0}, "faults[0].every_s: must be > 0"),
    ({"jitter_s": -1}, "faults[0].jitter_s: must be >= 0"),
    ({"signal": "SIGSTOP"}, "faults[0].signal: must be one of SIGKILL"),
    ({"kind": "inject"}, "faults[0].fault: is required for kind inject"),
    ({"kind": "inject", "fault": "melt"}, "faults[0].fault: must be one of exception, exit"),
    ({"kind": "inject", "fault": "exit", "seconds": 2},
     "faults[0].seconds: is only for fault = \"slow\""),
    ({"kind": "pause", "ends_after_s": 0}, "faults[0].ends_after_s: must be > 0"),
    ({"kind": "flood", "target": "imu0"},
     "faults[0].target: sensor imu0 cannot be flooded: a sim sensor has no input to flood"),
    ({"kind": "flood", "target": "can0"}, "faults[0].target: sensor can0 cannot be flooded: a "
                                          "flood needs its multicast group and port"),
    ({"kind": "flood", "target": "nope"}, "faults[0].target: no sensor 'nope'"),
    ({"kind": "flood", "target": "cabin", "inputs": 0}, "faults[0].inputs: must be > 0"),
    ({"kind": "disk_full", "target": None}, "faults[0].kind: disk_full needs the data dir on a "
                                            "small disk (gateway.disk_mb)"),
    ({"kind": "clock_jump", "target": None}, "faults[0].jump_s: is required for kind "
                                             "clock_jump"),
    ({"kind": "clock_jump", "target": None, "jump_s": 60},
     "faults[0].kind: clock_jump needs a controllable clock (gateway.clock = true)"),
    ({"kind": "power_cut"}, "faults[0].target: is only for kind kill or pause or inject or "
                            "flood (this fault is kind power_cut)"),
    ({"kind": "link", "target": None}, "faults[0].fault: is required for kind link"),
    ({"kind": "link", "target": None, "fault": "snow"},
     "faults[0].fault: must be a link fault: one of "),
    ({"kind": "link", "target": None, "fault": "latency", "params": {"ms": 5}},
     "faults[0].params.ms: is not a parameter of link fault latency (it takes: seconds"),
    ({"kind": "link", "target": None, "fault": "latency", "params": {"seconds": "x"}},
     "faults[0].params.seconds: must be a number (got 'x')"),
    ({"kind": "link", "target": None, "fault": "bandwidth"},
     "faults[0].params: must give bytes_per_s for link fault bandwidth"),
    ({"kind": "corrupt_model", "target": None},
     "faults[0].kind: corrupt_model needs the model runner"),
])
def test_a_bad_fault_is_refused_naming_its_index_key_and_problem(tmp_path, keys, expected):
    entry = fault(**keys)
    gateway = copy.deepcopy(BASE["gateway"])
    gateway["config"]["model"] = {"enabled": False}
    found = problems(tmp_path, drill_with(gateway=gateway, faults=[entry]))
    assert any(expected in p for p in found), found


def test_a_link_fault_without_a_receiver_is_refused(tmp_path):
    found = problems(tmp_path, drill_with(gateway={"receiver": False},
                                          faults=[{"kind": "link", "at_s": 1, "fault": "cut"}]))
    assert "faults[0].kind: a link fault needs the receiver (gateway.receiver = true)" in found


def test_a_load_needs_the_gateways_own_broker(tmp_path):
    gateway = copy.deepcopy(BASE["gateway"])
    gateway["config"]["broker"]["enabled"] = False
    found = problems(tmp_path, drill_with(gateway=gateway, load={"sensor": "cabin"}))
    assert any(p.startswith("load.sensor: the load publishes to the gateway's own broker")
               for p in found), found


def test_every_problem_is_listed_at_once(tmp_path):
    found = problems(tmp_path, drill_with(
        load={"sensor": "nope"},
        faults=[fault(target="ghost"), fault(kind="clock_jump", target=None, jump_s=1)],
        invariants={"check": ["I8"]}))
    assert [p.split(":")[0] for p in found] == ["load.sensor", "faults[0].target",
                                                "faults[1].kind", "invariants.check"]


def test_a_missing_drill_file_is_named(tmp_path):
    with pytest.raises(DrillError, match="nowhere.toml: file not found"):
        load_drill(tmp_path / "nowhere.toml")


def test_the_gateway_config_path_is_relative_to_the_drill_file(tmp_path):
    (tmp_path / "gw").mkdir()
    (tmp_path / "gw" / "g.toml").write_text(
        '[[sensors]]\nid = "imu7"\nkind = "imu"\nrate_hz = 5\n')
    drill = load_drill(write(tmp_path, drill_with(gateway={"config": "gw/g.toml"})))
    assert "sensor:imu7" in drill.actors
    missing = problems(tmp_path, drill_with(gateway={"config": "gw/none.toml"}))
    assert missing == [f"gateway.config: {tmp_path / 'gw' / 'none.toml'}: file not found"]
    (tmp_path / "gw" / "bad.toml").write_text('[gateway]\nadmin_port = 1\n')
    bad = problems(tmp_path, drill_with(gateway={"config": "gw/bad.toml"}))
    assert bad == [f"gateway.config: {tmp_path / 'gw' / 'bad.toml'}: gateway.admin_port: must "
                   "be a TCP port in 1024..65535 (got 1)"]


# ---- the timeline ---------------------------------------------------------------------------
def section(**keys) -> FaultSection:
    return FaultSection(**{"kind": "kill", "at_s": 1.0, "target": ("router",), **keys})


def test_a_fault_without_repeats_happens_once():
    assert occurrence_times(section(at_s=3.0), 10) == [3.0]
    assert occurrence_times(section(at_s=12.0), 10) == []  # the short run ends before it


def test_repeats_stop_at_count_at_until_or_at_the_end():
    assert occurrence_times(section(every_s=2.0, count=3), 100) == [1.0, 3.0, 5.0]
    assert occurrence_times(section(every_s=2.0, until_s=6.0), 100) == [1.0, 3.0, 5.0]
    assert occurrence_times(section(every_s=2.5), 9) == [1.0, 3.5, 6.0, 8.5]
    assert occurrence_times(section(every_s=2.0, count=10), 6) == [1.0, 3.0, 5.0]


def test_faults_that_end_get_an_end_step_clamped_to_the_end_of_the_drill():
    pause = section(kind="pause", at_s=2.0)
    link = FaultSection(kind="link", at_s=8.0, fault="cut", ends_after_s=5.0)
    steps = expand((pause, link), 10.0, seed=1)
    assert [(s.at_s, s.fault.kind, s.end) for s in steps] == [
        (2.0, "pause", False), (2.0 + DEFAULT_ENDS_AFTER_S["pause"], "pause", True),
        (8.0, "link", False), (10.0, "link", True)]


def test_a_fault_that_ends_at_the_end_of_the_drill_has_no_end_step():
    steps = expand((FaultSection(kind="link", at_s=1.0, fault="cut"),), 10.0, seed=1)
    assert [s.end for s in steps] == [False]


def test_an_end_comes_before_a_start_at_the_same_moment():
    cut = FaultSection(kind="link", at_s=1.0, every_s=2.0, fault="cut", ends_after_s=2.0)
    steps = expand((cut,), 6.0, seed=0)
    assert [(s.at_s, s.end) for s in steps] == [(1.0, False), (3.0, True), (3.0, False),
                                                (5.0, True), (5.0, False), (6.0, True)]


def test_jitter_is_seeded_and_within_its_bound():
    storm = section(every_s=2.0, jitter_s=1.0)
    first = [s.at_s for s in expand((storm,), 20.0, seed=7)]
    assert first == [s.at_s for s in expand((storm,), 20.0, seed=7)]
    assert first != [s.at_s for s in expand((storm,), 20.0, seed=8)]
    for planned, at in zip(occurrence_times(storm, 20.0), first, strict=False):
        assert planned <= at < planned + 1.0


def test_the_short_run_keeps_only_what_happens_before_its_end(tmp_path):
    drill = load_drill(write(tmp_path, drill_with(
        drill={"short_duration_s": 5}, faults=[fault(at_s=1), fault(at_s=8)])))
    assert [s.at_s for s in drill.timeline(short=True)] == [1.0]
    assert [s.at_s for s in drill.timeline(short=False)] == [1.0, 8.0]
