"""Config files: strict types, unknown keys refused, errors naming file, key and problem."""

import pytest

from config import ConfigError, load_config, parse_config
from config.loader import default_config_path


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "gw.toml")
    return info.value.problems


def test_shipped_demo_config_is_valid():
    config = load_config(default_config_path())
    assert [s.id for s in config.sensors] == ["imu0", "gps0", "engine0"]
    assert config.journal.synchronous == "FULL"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"sensors": [{"id": "a", "rate_hz": 0}]}, "sensors[0].rate_hz: must be > 0 (got 0.0)"),
        ({"sensors": [{"id": "a", "rate_hz": "fast"}]},
         "sensors[0].rate_hz: expected a number (got 'fast')"),
        ({"sensors": [{"id": "a", "kind": "lidar"}]}, "sensors[0].kind: must be one of"),
        ({"sensors": [{"rate_hz": 1}]}, "sensors[0].id: required key 'id' is missing"),
        ({"sensors": [{"id": "a"}, {"id": "a"}]}, "sensors: ids must be unique"),
        ({"journal": {"bogus": 1}}, "journal: unknown key(s) bogus"),
        ({"journal": {"disk_budget_bytes": 10}}, "journal.disk_budget_bytes: must be >= 1048576"),
        ({"journal": {"synchronous": "OFF"}}, "journal.synchronous: must be one of FULL"),
        ({"gateway": {"admin_port": 80}}, "gateway.admin_port: must be a TCP port"),
        ({"gateway": {"fault_injection": "yes"}}, "gateway.fault_injection: expected true or false"),
        ({"gatewy": {}}, "<top level>: unknown key(s) gatewy"),
    ],
)
def test_bad_config_error_names_key_and_problem(data, expected):
    assert any(expected in p for p in problems(data)), problems(data)


def test_error_message_names_the_file(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("[journal]\nsynchronous = 'OFF'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: journal.synchronous: must be one of")


def test_missing_file_and_broken_toml_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[journal\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
