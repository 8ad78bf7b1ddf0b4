"""`fleetgw policy check` from the command line."""

import json
import subprocess
import sys

from tools.gateway_process import ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", "policy", "check", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_example_policy_checks_and_explains_a_harsh_braking_record():
    record = {"device_id": "veh-001", "sensor_id": "imu0", "ts": 1_700_000_000_000_000_000,
              "kind": "imu", "values": {"ax": -5.0, "ay": 0.0, "az": 9.8}}
    result = run("config/policy.example.toml", "--explain", json.dumps(record))
    assert result.returncode == 0, result.stderr
    assert 'lane     P1  (rules[1] "harsh-braking")' in result.stdout


def test_bad_policy_exits_2_naming_file_rule_and_key(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('[[rules]]\nname = "x"\nwhen = "ax => 3"\nlane = "P1"\n[default]\nlane = "P3"\n')
    result = run(str(bad))
    assert result.returncode == 2
    assert f'{bad}: rules[0] "x": when:' in result.stderr
