"""`fleetgw drill run` end to end: a lossy gateway is caught, a bad drill file is refused.

The lossy drill (tests/drill/lossy.toml) runs a real gateway whose MQTT sensor subscribes with
QoS 0 under a QoS 1 load and is SIGKILLed again and again: the broker acknowledged messages
the journal never got. The drill must say so — I1 FAIL with the missing count — and exit 1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.drill.cli_run import explain, run_drill, verdicts
from tests.mosquitto import require_mosquitto
from tools.gateway_process import ROOT

HERE = Path(__file__).resolve().parent


@pytest.mark.system
@pytest.mark.timeout(600)
@require_mosquitto
def test_a_lossy_gateway_fails_i1_with_the_missing_count_and_exits_1(tmp_path):
    status, report, stderr = run_drill(HERE / "lossy.toml", tmp_path / "work")
    assert status == 1, explain(report, stderr)
    assert report["violations"] == ["I1"], explain(report, stderr)
    assert verdicts(report) == {"I1": "FAIL", "I2": "PASS"}
    i1 = report["invariants"][0]
    load = i1["figures"]["load"]
    assert load["acked"] > 0 and load["missing"] > 0
    assert load["missing"] == load["acked"] - load["journaled"]
    assert len(i1["figures"]["load"]["first_missing"]) == min(10, load["missing"])
    assert f"{load['missing']} of {load['acked']} messages the broker acknowledged are not " \
           "in the journal" in i1["explanation"]
    assert any(f["applied"] and f["kind"] == "kill" for f in report["faults"])
    assert (tmp_path / "work" / "report.json").exists()


def test_a_bad_drill_file_exits_2_naming_the_file_and_key(tmp_path):
    drill = tmp_path / "bad.toml"
    drill.write_text('[drill]\nname = "bad"\nduration_s = 10\n\n[[faults]]\nkind = "kill"\n'
                     'at_s = 1\ntarget = "sensor:ghost"\n\n[invariants]\ncheck = ["I2"]\n')
    done = subprocess.run([sys.executable, "-m", "tools.cli", "drill", "run", str(drill)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert f"{drill}: faults[0].target: no actor 'sensor:ghost' in this gateway's tree" in \
        done.stderr
    assert done.stdout == ""
