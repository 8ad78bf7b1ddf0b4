"""The supervision tree as data: validated without starting anything."""

from config.loader import load_config
from supervisors.spec import ChildSpec, SupervisorFlags, SupervisorSpec, validate
from supervisors.tree import gateway_tree


def test_gateway_tree_of_the_demo_config_is_valid_and_named_as_in_design():
    tree = gateway_tree(load_config("config/demo.toml"))
    assert validate(tree) == []
    assert [c.name for c in tree.children] == ["journal", "sensors", "processing", "metrics"]
    assert [c.name for c in tree.child("processing").settings.children] == ["router", "model"]
    sensors = tree.child("sensors").settings
    assert [c.name for c in sensors.children] == ["sensor:imu0", "sensor:gps0", "sensor:engine0",
                                                  "sensor:health"]
    assert all(c.settings.sensor.device_id == "veh-001" for c in sensors.children)


def test_duplicate_child_names_and_unknown_classes_are_reported():
    spec = SupervisorSpec(
        SupervisorFlags(),
        (
            ChildSpec("a", "actors.journal.actor.JournalWriter"),
            ChildSpec("a", "actors.nope.Missing"),
        ),
    )
    problems = validate(spec)
    assert any("root/a: child names must be unique" in p for p in problems)
    assert any("cannot load actor class 'actors.nope.Missing'" in p for p in problems)


def test_heartbeat_timeout_must_exceed_interval():
    spec = SupervisorSpec(
        SupervisorFlags(heartbeat_interval_s=1.0),
        (ChildSpec("j", "actors.journal.actor.JournalWriter", heartbeat_timeout_s=0.5),),
    )
    assert any("heartbeat_timeout_s" in p for p in validate(spec))
