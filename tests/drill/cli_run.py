"""Runs `fleetgw drill run` as the operator does, for the drill system tests.

The drill runs in a child process (``python -m tools.cli drill run FILE --json --keep DIR``)
with its work dir under the test's tmp_path, so a failing test leaves the rig's logs, journal
and report.json there; afterwards no process may still be running from that work dir.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from tools.gateway_process import ROOT

#: Seconds a drill run may take here at most (a --short drill takes ~30-45 s on an idle
#: 2-core machine; a loaded one is slower).
DRILL_TIMEOUT_S = 420


def run_drill(path: str | Path, work: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    """Exit status, the JSON report and stderr of ``fleetgw drill run path --json``."""
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "drill", "run", str(path), "--json", "--keep",
         str(work), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=DRILL_TIMEOUT_S, check=False)
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if str(work) in " ".join(p.info.get("cmdline") or [])]
    assert not leftovers, f"processes left running from {work}: {leftovers}"
    report = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, report, done.stderr


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {c["invariant"]: c["status"] for c in report.get("invariants", [])}


def explain(report: dict[str, Any], stderr: str) -> str:
    """What to print when a drill did not go as expected."""
    lines = [f"{c['invariant']} {c['status']}: {c['explanation']}"
             for c in report.get("invariants", [])]
    lines += [f"problem: {p}" for p in report.get("problems", [])]
    lines += [f"fault {f['at_s']}s {f['kind']} {f['target']}: {f['note']}"
              for f in report.get("faults", []) if not f.get("applied")]
    return "\n".join(lines) + ("\nstderr: " + stderr[-2000:] if stderr else "")
