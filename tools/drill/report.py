"""A drill's report: the verdict per invariant, the figures, the fault timeline.

Where this sits: the last step of `fleetgw drill run`. `Report` holds what the run produced;
`to_json` is the ``--json`` object, `render_text` the operator's view: one block per invariant
(PASS / FAIL / NOT CHECKED, its explanation, its figures), the drill's figures (produced,
acknowledged, journaled, synced, ClickHouse FINAL and raw, duplicates, the longest commit
pause, restarts and time to recover per actor, P1 latency), the fault timeline and anything
that kept the drill from a verdict. `exit_status` is the command's.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs

from tools.drill.checks import Check, longest_pause

if TYPE_CHECKING:
    from tools.drill.evidence import Evidence
    from tools.drill.loader import Drill
    from tools.drill.runner import Applied
    from tools.harness.results import RigResults


@attrs.define
class Report:
    drill: Drill
    short: bool
    duration_s: float
    checks: list[Check]
    applied: list[Applied]
    problems: list[str]
    results: RigResults | None
    evidence: Evidence | None
    took_s: float
    #: seconds the rig took to start and to finish (stop, drain, read back)
    phases: dict[str, float] = attrs.field(factory=dict)
    kept_in: str | None = None

    @property
    def violations(self) -> list[str]:
        return [c.invariant for c in self.checks if c.failed]

    @property
    def exit_status(self) -> int:
        return 1 if self.violations or self.problems or not self.checks else 0

    def figures(self) -> dict[str, Any]:
        """The drill's headline figures (empty when it did not finish)."""
        res, evid = self.results, self.evidence
        if res is None or evid is None:
            return {}
        longest, at, _, overall = longest_pause(evid)
        sensors = {s.id for s in self.drill.parsed.sensors}
        produced: dict[str, Any] = {
            "sensor_records_journaled": {k: v for k, v in
                                         evid.journal.records_per_sensor.items()
                                         if k in sensors}}
        acknowledged: dict[str, Any] = {"sensor_readings": sum(evid.sensor_acked.values())}
        if evid.load is not None:
            produced["load_published"] = evid.load.published
            acknowledged["load_messages"] = len(evid.load.acked)
            acknowledged["load_unknown"] = len(evid.load.unknown)
        return {
            "produced": produced,
            "acknowledged": acknowledged,
            "journaled": res.journaled,
            "synced": res.synced,
            "syncable": res.syncable,
            "central_final": res.central_final,
            "central_raw": res.central_raw,
            "duplicates": res.duplicates,
            "longest_commit_pause_s": longest,
            "longest_commit_pause_at_s": at,
            "longest_commit_pause_including_excused_s": overall,
            "restarts": res.restarts,
            "recovery": self.recovery_per_actor(),
            "p1_latency": attrs.asdict(res.p1_latency),
            "link": evid.link,
            "quarantined": res.quarantined,
            "drops": res.drops,
            "orderly_stop_exit_status": res.exit_status,
            "drained": res.drained,
        }

    def recovery_per_actor(self) -> dict[str, dict[str, Any]]:
        """Per actor a fault hit: faults, how many it recovered from, longest and mean time."""
        per: dict[str, dict[str, Any]] = {}
        for r in self.evidence.recoveries if self.evidence else []:
            entry = per.setdefault(r.target, {"faults": 0, "recovered": 0, "times_s": []})
            entry["faults"] += 1
            if r.recovered_s is not None:
                entry["recovered"] += 1
                entry["times_s"].append(r.recovered_s)
        for entry in per.values():
            times = entry.pop("times_s")
            entry["longest_s"] = max(times, default=None)
            entry["mean_s"] = round(sum(times) / len(times), 3) if times else None
        return dict(sorted(per.items()))

    def to_json(self) -> dict[str, Any]:
        settings = self.drill.file.drill
        return {
            "drill": settings.name,
            "file": self.drill.path,
            "short": self.short,
            "duration_s": self.duration_s,
            "seed": settings.seed,
            "took_s": self.took_s,
            "phases": self.phases,
            "passed": self.exit_status == 0,
            "exit_status": self.exit_status,
            "violations": self.violations,
            "invariants": [c.to_json() for c in self.checks],
            "figures": self.figures(),
            "faults": [a.to_json() for a in self.applied],
            "problems": self.problems,
            "kept_in": self.kept_in,
        }


def _lines(figures: dict[str, Any], indent: str = "      ") -> list[str]:
    out = []
    for key, value in figures.items():
        if isinstance(value, dict) and value and len(json.dumps(value, default=str)) > 70:
            out.append(f"{indent}{key}:")
            out += _lines(value, indent + "  ")
        else:
            text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
            out.append(f"{indent}{key}: {text}")
    return out


def render_text(report: Report) -> str:
    settings = report.drill.file.drill
    length = f"{report.duration_s:g}s" + (f" (--short of {settings.duration_s:g}s)"
                                          if report.short else "")
    phases = ", ".join(f"{k.removesuffix('_s')} {v:g}s" for k, v in report.phases.items())
    lines = [f"drill {settings.name}: {length}, seed {settings.seed}, took {report.took_s:g}s"
             + (f" ({phases})" if phases else "")]
    if settings.description:
        lines.append(f"  {settings.description}")
    lines += ["", "INVARIANTS"]
    for check in report.checks:
        lines.append(f"  {check.invariant:<8} {check.status:<11} {check.explanation}")
        lines += _lines(check.figures)
    lines += ["", "FIGURES"]
    lines += _lines(report.figures(), "  ") or ["  (none: the drill did not finish)"]
    done = sum(a.applied for a in report.applied)
    lines += ["", f"FAULTS ({done} applied, {len(report.applied) - done} not applied; seconds "
                  "since the gateway ran)",
              f"  {'PLANNED':>8} {'AT':>8}  {'KIND':<18} {'TARGET':<16} NOTE"]
    for a in report.applied:
        lines.append(f"  {a.planned_s:>8.2f} {a.at_s:>8.2f}  {a.kind:<18} {a.target:<16} "
                     f"{a.note}")
    if report.problems:
        lines += ["", "PROBLEMS"] + [f"  {p}" for p in report.problems]
    if report.kept_in:
        lines += ["", f"work dir kept: {report.kept_in}"]
    verdict = "PASS: every checked invariant holds" if report.exit_status == 0 else \
        "FAIL: " + ", ".join(report.violations + (["problems"] if report.problems else [])
                             or ["no invariant could be checked"])
    lines += ["", f"RESULT {verdict}"]
    return "\n".join(lines)
