"""Every drill shipped in drills/ passes its short version on a real gateway: exit 0, every
invariant it checks PASS, every fault of its timeline applied at least once.

These are what `.ci/run` runs (through `make test`): a short version of each field chaos drill
— kill storm, crash-looping model, flapping link, power-cut loop, disk full, malformed flood.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.drill.cli_run import explain, run_drill, verdicts
from tests.mosquitto import require_mosquitto
from tools.drill.loader import load_drill
from tools.gateway_process import ROOT

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

DRILLS = sorted((Path(ROOT) / "drills").glob("*.toml"))


def needs(path: Path) -> list[pytest.MarkDecorator]:
    """What a drill needs from this machine: mosquitto (the gateway's own broker), root (a
    small real disk is a tmpfs mount)."""
    drill = load_drill(path)
    marks = []
    if drill.parsed.broker.enabled:
        marks.append(require_mosquitto)
    if drill.file.gateway.disk_mb is not None:
        marks.append(pytest.mark.skipif(os.geteuid() != 0,
                                        reason="a small real disk (tmpfs mount) needs root"))
    return marks


def test_the_six_field_drills_are_shipped():
    assert {p.stem for p in DRILLS} == {"kill_storm", "crash_looping_model", "flapping_link",
                                        "power_cut_loop", "disk_full", "malformed_flood"}


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=needs(p)) for p in DRILLS])
def test_the_short_drill_passes_every_invariant_it_checks(path, tmp_path):
    status, report, stderr = run_drill(path, tmp_path / "work", "--short")
    assert status == 0, explain(report, stderr)
    checked = verdicts(report)
    assert set(checked.values()) == {"PASS"}, explain(report, stderr)
    assert list(checked)[:len(load_drill(path).file.invariants.check)] == \
        list(load_drill(path).file.invariants.check)
    kinds = {f["kind"] for f in report["faults"] if f["applied"]}
    planned = {f.kind for f in load_drill(path).file.faults
               if f.at_s < load_drill(path).duration_s(short=True)}
    assert planned <= kinds, f"never applied: {planned - kinds}\n{explain(report, stderr)}"
    assert report["figures"]["journaled"] > 0
