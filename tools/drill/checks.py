"""The invariant checks of a drill: pure functions from `Evidence` to a verdict.

Where this sits: after the rig finished (tools/drill/runner.py gathers the `Evidence`). Each
check returns a `Check`: PASS, FAIL or NOT CHECKED (the drill could not look: said plainly,
never counted as a pass in the explanation), the figures it used and one line saying what was
checked. `CHECKS` maps the invariants of DESIGN.md to their check; ``recovery`` is the extra
check a drill's ``max_recover_s`` asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from tools.drill.evidence import Evidence
from tools.drill.spec import InvariantsSection

PASS, FAIL, NOT_CHECKED = "PASS", "FAIL", "NOT CHECKED"
#: How many example items (missing numbers, problems, sockets) a check lists in its figures.
EXAMPLES = 10


@attrs.frozen
class Check:
    """The verdict on one invariant."""

    invariant: str
    status: str
    explanation: str
    figures: dict[str, Any] = attrs.field(factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _verdict(invariant: str, ok: bool, passed: str, failed: str,
             figures: dict[str, Any]) -> Check:
    return Check(invariant, PASS if ok else FAIL, passed if ok else failed, figures)


def check_i1(ev: Evidence, limits: InvariantsSection) -> Check:
    """Acked means durable: every message the broker acknowledged to the load is journaled;
    every reading the journal acknowledged to a sensor is there."""
    figures: dict[str, Any] = {}
    problems: list[str] = []
    checked: list[str] = []
    if ev.load is not None:
        missing = ev.load.missing()
        figures["load"] = ev.load.to_json()
        if missing:
            figures["load"]["first_missing"] = missing[:EXAMPLES]
            problems.append(f"{len(missing)} of {len(ev.load.acked)} messages the broker "
                            f"acknowledged are not in the journal (first: "
                            f"{', '.join(map(str, missing[:5]))})")
        checked.append(f"all {len(ev.load.acked)} broker-acknowledged load messages journaled")
    evicted = ev.evicted
    sensors = {}
    for sensor, acked in sorted(ev.sensor_acked.items()):
        journaled = ev.journal.records_per_sensor.get(sensor, 0)
        sensors[sensor] = {"acked": acked, "journaled": journaled}
        if journaled + evicted < acked:
            problems.append(f"sensor {sensor}: the journal acknowledged {acked} readings and "
                            f"holds {journaled}" + (f" (+{evicted} evicted)" if evicted else ""))
    if sensors:
        figures["sensors"] = sensors
        figures["evicted"] = evicted
        checked.append(f"each of {len(sensors)} sensors' acknowledged readings (as last seen "
                       "per incarnation) are in the journal")
    if not checked:
        return Check("I1", NOT_CHECKED, "no load and no sensor figures: nothing acknowledged "
                                        "was seen", figures)
    return _verdict("I1", not problems, "; ".join(checked), "; ".join(problems), figures)


def check_i2(ev: Evidence, limits: InvariantsSection) -> Check:
    """Per device, seqs strictly increasing, no gaps, no reuse: the journal's verify."""
    problems = ev.results.verify_problems
    figures = {"journaled": ev.results.journaled, "devices": len(ev.results.journal_per_device),
               "problems": len(problems), "first_problems": problems[:EXAMPLES]}
    return _verdict("I2", not problems,
                    f"journal verify: integrity ok, seqs 1..n with no gap or reuse on "
                    f"{len(ev.results.journal_per_device)} devices",
                    f"journal verify found {len(problems)} problems, first: "
                    f"{problems[0] if problems else ''}", figures)


def check_i3(ev: Evidence, limits: InvariantsSection) -> Check:
    """Single writer: no process but the journal actor's had journal.db open for writing."""
    seen = ev.results.foreign_writers
    figures = {"writer_checks": ev.writer_checks, "foreign_writers": len(seen),
               "first_foreign": seen[:EXAMPLES]}
    if not seen and ev.writer_checks == 0:
        return Check("I3", NOT_CHECKED, "the rig never looked at journal.db's writers",
                     figures)
    return _verdict("I3", not seen,
                    f"{ev.writer_checks} looks at the processes with journal.db open for "
                    "writing found only the journal actor",
                    f"{len(seen)} looks found another process writing journal.db "
                    f"(first: {seen[0] if seen else ''})", figures)


def check_i4(ev: Evidence, limits: InvariantsSection) -> Check:
    """A consumer's outputs and cursor commit together: every record at or below the router's
    cursor has the lane the router gave it."""
    facts = ev.journal
    figures = {"router_cursor": facts.router_cursor,
               "records_below_cursor": facts.records_below_cursor,
               "unrouted_below_cursor": facts.unrouted_below_cursor}
    if facts.router_cursor is None:
        return Check("I4", NOT_CHECKED, "the router never committed a cursor", figures)
    return _verdict("I4", facts.unrouted_below_cursor == 0,
                    f"all {facts.records_below_cursor} records at or below the router's cursor "
                    f"(pos {facts.router_cursor}) have their lane (the model runner's and the "
                    "uplink's outputs are not checked)",
                    f"{facts.unrouted_below_cursor} records at or below the router's cursor "
                    f"(pos {facts.router_cursor}) have no lane: the cursor moved without them",
                    figures)


def check_i5(ev: Evidence, limits: InvariantsSection) -> Check:
    """Exactly-once effect centrally: per device FINAL == uniqExact == synced, and the drain
    synced everything."""
    res = ev.results
    bad = [row for row in res.reconciliation if not row.get("ok")]
    figures = {"drained": res.drained, "syncable": res.syncable, "synced": res.synced,
               "central_final": res.central_final, "central_raw": res.central_raw,
               "central_unique": res.central_unique, "duplicates": res.duplicates,
               "devices": len(res.reconciliation), "devices_not_ok": [r.get("device_id")
                                                                   for r in bad]}
    problems = []
    if not res.drained:
        problems.append(f"the drain run synced {res.synced} of {res.syncable} syncable "
                        "records in time")
    for row in bad:
        problems.append(f"device {row.get('device_id')}: synced {row.get('synced')}, central "
                        f"FINAL {row.get('central_final')}, unique {row.get('central_unique')}")
    if not res.reconciliation:
        problems.append("no device to reconcile")
    return _verdict("I5", not problems,
                    f"{len(res.reconciliation)} devices: count() FINAL == uniqExact == synced "
                    f"({res.synced}), everything syncable synced",
                    "; ".join(problems), figures)


def longest_pause(ev: Evidence) -> tuple[float | None, float | None, int, float | None]:
    """(longest commit pause outside excused windows, when it was seen, samples excused,
    longest pause including excused ones) from the journal's last_commit_age_s samples: a
    sample (t, age) means no commit in [t - age, t]."""
    longest = at = overall = None
    excused = 0
    for t, age in ev.results.commit_ages:
        overall = age if overall is None else max(overall, age)
        if any(start <= t and t - age <= end for start, end, _ in ev.excused):
            excused += 1
            continue
        if longest is None or age > longest:
            longest, at = age, t
    return longest, at, excused, overall


def check_i6(ev: Evidence, limits: InvariantsSection) -> Check:
    """Journaling never pauses beyond max_commit_pause_s because another actor fails."""
    longest, at, excused, overall = longest_pause(ev)
    samples = len(ev.results.commit_ages)
    figures = {"samples": samples, "samples_excused": excused,
               "longest_commit_pause_s": longest, "at_s": at,
               "longest_including_excused_s": overall,
               "max_commit_pause_s": limits.max_commit_pause_s,
               "excused_windows": [f"{why}: {start:g}-{end:g}s" for start, end, why
                                   in ev.excused]}
    if longest is None:
        return Check("I6", NOT_CHECKED, f"no commit age sample outside excused windows "
                                        f"({samples} samples, {excused} excused)", figures)
    return _verdict("I6", longest <= limits.max_commit_pause_s,
                    f"longest pause between journal commits {longest:g}s <= "
                    f"{limits.max_commit_pause_s:g}s over {samples - excused} samples (pauses "
                    f"overlapping {len(ev.excused)} faults of the journal/gateway/sensors/disk/"
                    "clock excused)",
                    f"journal commits paused {longest:g}s (seen at {at:g}s) > "
                    f"{limits.max_commit_pause_s:g}s while no excusing fault was on", figures)


def check_i7(ev: Evidence, limits: InvariantsSection) -> Check:
    """The journal stays within its disk budget; unsynced P1 is never evicted."""
    res = ev.results
    p1_evictions = {k: n for k, n in res.drops.items()
                    if k.endswith("/P1") and k.split("/")[0] not in ("synced",
                                                                     "policy_dropped")}
    figures = {"usage_bytes_max": res.usage_bytes_max, "budget_bytes": res.budget_bytes,
               "evicted": ev.evicted, "drops": res.drops,
               "unsynced_p1_evicted": ev.journal.unsynced_p1_evicted}
    problems = []
    if res.budget_bytes is not None and res.usage_bytes_max > res.budget_bytes:
        problems.append(f"the journal used {res.usage_bytes_max} bytes, over its budget of "
                        f"{res.budget_bytes}")
    if ev.journal.unsynced_p1_evicted or p1_evictions:
        problems.append(f"unsynced P1 evicted: {ev.journal.unsynced_p1_evicted} seqs above the "
                        f"P1 watermark; drops {p1_evictions}")
    budget = "no budget" if res.budget_bytes is None else f"budget {res.budget_bytes}"
    return _verdict("I7", not problems,
                    f"usage at most {res.usage_bytes_max} bytes ({budget}); {ev.evicted} "
                    "records evicted, none of them unsynced P1",
                    "; ".join(problems), figures)


def check_i8(ev: Evidence, limits: InvariantsSection) -> Check:
    """Bad input is quarantined, never stops the sensor's good data, never loses acked data."""
    res = ev.results
    figures: dict[str, Any] = {}
    problems = []
    for sensor, (kind, sent) in sorted(ev.floods.items()):
        quarantined = res.quarantined.get(sensor, 0)
        restarts = res.restarts.get(f"sensor:{sensor}", 0)
        # faults the drill itself aimed at the sensor or its supervisor restart it too
        own_hits = ev.hits.get(f"sensor:{sensor}", 0) + ev.hits.get("sensors", 0)
        figures[sensor] = {"type": kind, "malformed_sent": sent, "quarantined": quarantined,
                           "restarts": restarts, "other_faults": own_hits}
        if kind == "mqtt" and quarantined < sent:
            problems.append(f"sensor {sensor}: {sent} malformed messages acknowledged by the "
                            f"broker, {quarantined} quarantined")
        if kind != "mqtt" and quarantined == 0 and sent:
            problems.append(f"sensor {sensor}: none of {sent} malformed datagrams quarantined")
        if restarts > own_hits:
            problems.append(f"sensor {sensor} restarted {restarts} times with {own_hits} other "
                            "faults on it: the flood stopped it")
    if not ev.floods:
        return Check("I8", NOT_CHECKED, "no flood was sent", figures)
    if ev.load is not None:
        missing = ev.load.missing()
        figures["good_load"] = {"acked": len(ev.load.acked), "missing": len(missing)}
        if missing:
            problems.append(f"good data lost: {len(missing)} acknowledged load messages not "
                            "journaled")
    good = "; the good load's acknowledged messages all journaled" if ev.load else ""
    return _verdict("I8", not problems,
                    f"{len(ev.floods)} flooded sensors quarantined their malformed input "
                    f"(MQTT: every acknowledged one; UDP: some may be dropped by the kernel) "
                    f"and none was restarted by it{good}", "; ".join(problems), figures)


def check_i9(ev: Evidence, limits: InvariantsSection) -> Check:
    """Nothing listens beyond loopback unless configured; nothing phones home."""
    watch = ev.sockets
    figures = {"samples": watch.samples, "listening_on_loopback": len(watch.loopback),
               "loopback_examples": watch.loopback[:3], "configured": watch.configured,
               "exposed": watch.exposed[:EXAMPLES], "outbound": watch.outbound[:EXAMPLES]}
    if watch.samples == 0:
        return Check("I9", NOT_CHECKED, "the gateway's sockets were never sampled", figures)
    problems = []
    if watch.exposed:
        problems.append(f"listening beyond loopback: {watch.exposed[0]}")
    if watch.outbound:
        problems.append(f"connected beyond loopback: {watch.outbound[0]}")
    configured = f" ({len(watch.configured)} beyond loopback as configured)" \
        if watch.configured else ""
    return _verdict("I9", not problems,
                    f"{watch.samples} samples of the gateway processes' sockets: "
                    f"{len(watch.loopback)} listening, all on loopback{configured}; no "
                    "connection beyond loopback", "; ".join(problems), figures)


def check_recovery(ev: Evidence, limits: InvariantsSection) -> Check:
    """Every actor a fault hit ran again within max_recover_s (seen in the samples)."""
    limit = limits.max_recover_s
    assert limit is not None
    late, down = [], []
    for r in ev.recoveries:
        if r.recovered_s is not None and r.recovered_s > limit:
            late.append(r)
        elif r.outcome == "not running" and r.last_seen_s is not None \
                and r.last_seen_s >= r.at_s + limit:
            down.append(r)
    measured = [r.recovered_s for r in ev.recoveries if r.recovered_s is not None]
    figures = {"max_recover_s": limit, "faults": len(ev.recoveries),
               "recovered": len(measured), "longest_s": max(measured, default=None),
               "late": [r.to_json() for r in late][:EXAMPLES],
               "not_running": [r.to_json() for r in down][:EXAMPLES]}
    problems = [f"{r.target} took {r.recovered_s:g}s after {r.kind}" for r in late[:3]]
    problems += [f"{r.target} still not running {r.last_seen_s - r.at_s:g}s after {r.kind}"
                 for r in down[:3]]
    return _verdict("recovery", not problems,
                    f"{len(measured)} actors ran again within {limit:g}s of their fault "
                    f"(longest {max(measured, default=0):g}s); the others kept running or "
                    "were not seen again before the run ended", "; ".join(problems), figures)


CHECKS: dict[str, Callable[[Evidence, InvariantsSection], Check]] = {
    "I1": check_i1, "I2": check_i2, "I3": check_i3, "I4": check_i4, "I5": check_i5,
    "I6": check_i6, "I7": check_i7, "I8": check_i8, "I9": check_i9,
}


def run_checks(ev: Evidence, limits: InvariantsSection) -> list[Check]:
    """The checks the drill asks for, in the order it lists them (recovery last)."""
    checks = [CHECKS[name](ev, limits) for name in limits.check]
    if limits.max_recover_s is not None:
        checks.append(check_recovery(ev, limits))
    return checks
