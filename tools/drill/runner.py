"""`fleetgw drill run`: a drill played against a real gateway, and its verdict.

Where this sits: the drill's driver, outside the gateway, on the harness's `Rig`. In order:

1. read and check the drill file in full (`spec.load_drill`; a bad file: exit 2);
2. start the rig (receiver, link proxy, gateway; a rig that cannot start: exit 2);
3. from the moment every actor runs: the load (if any), the I9 socket sampler, and the
   timeline — one thread plays each step at its time on the monotonic clock; a step that
   cannot be applied (the random target was restarting, the gateway was down) is recorded
   as "not applied: why" and the drill goes on; steps that end a fault (resume, restore, free,
   restart) are steps of their own;
4. at ``duration_s`` the load stops, every fault still on is ended, and the drill waits (up to
   ``settle_s``) for what the broker acknowledged (load, MQTT floods) to reach the journal;
5. `Rig.finish` (orderly stop, drain run, receiver stopped, `RigResults`), then the journal
   is read once more (`evidence.read_journal_facts`), the checks run and the report prints.

Exit status: 0 every checked invariant holds, 1 a violation (or the gateway did not come back
after a power cut, or the drill could not finish), 2 a bad drill file or a rig that could not
start. The work dir is a temporary directory removed at the end unless ``keep`` names one.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from tools.drill import evidence as ev
from tools.drill.checks import Check, run_checks
from tools.drill.loader import Drill, load_drill
from tools.drill.report import Report, render_text
from tools.drill.sockets import SocketSampler
from tools.drill.spec import (
    DEFAULT_FLOOD_INPUTS,
    RANDOM,
    ROOT_ACTOR,
    DrillError,
    flood_sensor,
    signal_of,
)
from tools.drill.timeline import Step
from tools.harness.results import recoveries
from tools.harness.rig import Rig, RigError, Sample

#: Seconds without a new load message in the journal after which the settle wait gives up
#: early (what has not arrived by then is not coming: the checks will say so).
SETTLE_QUIET_S = 5.0
#: Errors a step may meet that mean "could not apply it now", not a broken drill.
STEP_ERRORS = (RigError, OSError, ValueError, RuntimeError, KeyError)


@attrs.define
class Applied:
    """One step of the timeline as it went: planned and actual time (seconds since the drill
    began), what, on what, and whether it was applied (``note``: the detail, or why not)."""

    planned_s: float
    at_s: float
    kind: str
    target: str
    applied: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class DrillRun:
    """Plays ``drill``'s timeline against a started ``rig``."""

    def __init__(self, drill: Drill, rig: Rig, short: bool) -> None:
        self.drill = drill
        self.rig = rig
        self.duration_s = drill.duration_s(short)
        self.steps = drill.timeline(short)
        self.targets_rng = random.Random(f"{drill.file.drill.seed}/targets")
        self.applied: list[Applied] = []
        #: harness-level failures that are the gateway's fault (no restart after a power cut)
        self.problems: list[str] = []
        #: (fault index, occurrence) -> the actor a pause stopped (its end resumes that one)
        self.paused: dict[tuple[int, int], str] = {}
        #: actor name -> faults the drill applied to it (kill, pause, inject)
        self.hits: dict[str, int] = {}
        #: flooded sensor id -> malformed inputs sent
        self.flooded: dict[str, int] = {}
        self.load: Any = None
        self.t0 = 0.0  # rig time when the drill began
        #: seconds each phase took: start (the rig), finish (stop, drain, read back)
        self.phases: dict[str, float] = {}

    def now(self) -> float:
        return round(self.rig.now() - self.t0, 3)

    # ---- the run --------------------------------------------------------------------------
    def play(self) -> tuple[Any, ev.Evidence]:
        """Load, timeline, settle, finish: the rig's results and the evidence."""
        self.t0 = self.rig.now()
        self.load = self._start_load()
        sampler = SocketSampler(self.rig, self.drill.parsed).start()
        try:
            for step in self.steps:
                self._wait_until(step.at_s)
                self.applied.append(self.apply(step))
            self._wait_until(self.duration_s)
        finally:
            if self.load is not None:
                self.load.stop()
            self.end_all()
            sockets = sampler.stop()
        self.settle()
        finishing = time.monotonic()
        results = self.rig.finish(self.drill.file.drill.drain_timeout_s)
        self.phases["finish_s"] = round(time.monotonic() - finishing, 1)
        return results, self.gather(results, sockets)

    def _wait_until(self, at_s: float) -> None:
        delay = at_s - self.now()
        if delay > 0:
            time.sleep(delay)

    # ---- steps ----------------------------------------------------------------------------
    def apply(self, step: Step) -> Applied:
        """Do ``step``; never raises for a fault that cannot be applied now."""
        fault, at = step.fault, self.now()
        kind = f"{fault.kind} (end)" if step.end else fault.kind
        target = fault.fixed_target
        try:
            if step.end:
                target, note = self._end(step)
            else:
                if fault.targets:
                    target = self._choose(fault.targets)
                note = self._start(step, target)
        except STEP_ERRORS as exc:
            why = str(exc) or type(exc).__name__
            if step.end and fault.kind == "power_cut":
                self.problems.append(f"the gateway did not come back after the power cut at "
                                     f"{step.at_s:g}s: {why}")
            return Applied(step.at_s, at, kind, target, False, f"not applied: {why}")
        return Applied(step.at_s, at, kind, target, True, note)

    def _choose(self, targets: tuple[str, ...]) -> str:
        """One of ``targets`` (seeded); "random": any actor of the live tree but the root."""
        choice = self.targets_rng.choice(targets)
        if choice != RANDOM:
            return choice
        names = sorted(n for n in self.rig.nodes() if n != ROOT_ACTOR)
        return self.targets_rng.choice(names)

    def _hit(self, target: str) -> None:
        self.hits[target] = self.hits.get(target, 0) + 1

    def _start(self, step: Step, target: str) -> str:
        fault, rig = step.fault, self.rig
        if fault.kind == "kill":
            event = rig.kill(target, signal_of(fault))
            self._hit(target)
            return f"{event.kind} pid {event.pid}"
        if fault.kind == "pause":
            event = rig.pause(target)
            self.paused[(step.index, step.occurrence)] = target
            self._hit(target)
            return f"SIGSTOP pid {event.pid}"
        if fault.kind == "inject":
            rig.inject(target, fault.fault or "", fault.seconds or 0.0)
            self._hit(target)
            return fault.describe()
        if fault.kind == "power_cut":
            rig.power_cut()
            return "every gateway process SIGKILLed"
        if fault.kind == "link":
            rig.link_fault(fault.fault or "", **(fault.params or {}))
            return fault.describe()
        if fault.kind == "disk_full":
            rig.fill_disk()
            usage = rig.disk.usage()
            return f"filled: {usage.free} bytes free of {usage.total}"
        if fault.kind == "clock_jump":
            rig.clock_jump(fault.jump_s or 0.0)
            return fault.describe()
        if fault.kind == "corrupt_model":
            self._hit("model")
            event = rig.corrupt_model()
            return f"{event.detail} corrupted, runner SIGKILLed (or already restarting)"
        if fault.kind == "flood":
            sensor = flood_sensor(target)
            event = rig.flood(sensor, fault.inputs or DEFAULT_FLOOD_INPUTS)
            sent = int(event.detail.split()[0])
            self.flooded[sensor] = self.flooded.get(sensor, 0) + sent
            return event.detail
        raise ValueError(f"unknown fault kind {fault.kind}")  # spec.FAULT_TYPES is complete

    def _end(self, step: Step) -> tuple[str, str]:
        kind, rig = step.fault.kind, self.rig
        if kind == "pause":
            target = self.paused.pop((step.index, step.occurrence), None)
            if target is None:
                raise RigError("its pause was not applied")
            rig.resume(target)
            return target, "SIGCONT (if its watchdog had not killed it)"
        if kind == "power_cut":
            took = rig.restart()
            return "gateway", f"every actor ran again after {took:g}s"
        if kind == "link":
            rig.link_restore()
            return "link", "restored"
        if kind == "disk_full":
            rig.free_disk()
            return "disk", "freed"
        raise ValueError(f"fault kind {kind} has no end")

    def end_all(self) -> None:
        """At the end of the timeline: end every fault still on, so the drain sees a healthy
        gateway (and record a gateway that is down when it should run)."""
        rig = self.rig
        for target in list(self.paused.values()):
            with contextlib.suppress(*STEP_ERRORS):
                rig.resume(target)
        self.paused.clear()
        if rig.link is not None:
            with contextlib.suppress(*STEP_ERRORS):
                rig.link_restore()
        if rig.disk is not None:
            with contextlib.suppress(*STEP_ERRORS):
                rig.free_disk()
        gateway = rig.gateway
        if gateway is None or gateway.proc is None or gateway.proc.poll() is not None:
            self.problems.append("the gateway was not running at the end of the drill")

    # ---- the load -------------------------------------------------------------------------
    def _start_load(self) -> Any:
        settings = self.drill.file.load
        if settings is None:
            return None
        from tools.harness.load import MqttLoad

        host, port = self.rig.mqtt_address()
        return MqttLoad(host, port, self.drill.load_topic, settings.rate_hz,
                        settings.src).start()

    def _journaled(self) -> dict[int, int]:
        from tools.harness.load import journaled_numbers

        settings = self.drill.file.load
        assert settings is not None
        try:
            return dict(journaled_numbers(self.rig.data_dir, settings.sensor, settings.src,
                                          self.rig.key_file))
        except Exception:  # no journal yet, or a damaged one: the checks will say
            return {}

    def _quarantined(self) -> dict[str, int]:
        from actors.journal.reader import JournalReader

        try:
            with JournalReader(self.rig.journal_path) as reader:
                return {q.sensor_id: q.quarantined for q in reader.stats().quarantine}
        except Exception:  # as above
            return {}

    def settle(self) -> None:
        """Wait until the journal holds what the broker acknowledged — every load message
        and every malformed MQTT flood message (quarantined) — or nothing new arrived for
        `SETTLE_QUIET_S`, or the drill's ``settle_s`` passed."""
        mqtt_floods = {s: n for s, n in self.flooded.items()
                       if self.drill.sensor_type(s) == "mqtt"}
        if self.load is None and not mqtt_floods:
            return
        deadline = time.monotonic() + self.drill.file.drill.settle_s
        seen, changed = None, time.monotonic()
        while time.monotonic() < deadline:
            journaled = self._journaled() if self.load is not None else {}
            quarantined = self._quarantined() if mqtt_floods else {}
            if all(n in journaled for n in (self.load.acked if self.load else ())) and \
                    all(quarantined.get(s, 0) >= n for s, n in mqtt_floods.items()):
                return
            progress = (len(journaled), sum(quarantined.values()))
            if progress != seen:
                seen, changed = progress, time.monotonic()
            elif time.monotonic() - changed > SETTLE_QUIET_S:
                return
            time.sleep(0.5)

    # ---- evidence -------------------------------------------------------------------------
    def gather(self, results: Any, sockets: ev.SocketWatch) -> ev.Evidence:
        """The evidence, every time in it (events, commit ages, samples) in seconds since the
        drill began."""
        rig = self.rig
        results = ev.shifted(results, self.t0)
        samples = [Sample(round(s.at_s - self.t0, 3), s.tree) for s in rig.all_samples()]
        found = recoveries(results.events, samples)
        limits = self.drill.file.invariants
        load = None
        if self.load is not None:
            settings = self.drill.file.load
            assert settings is not None
            load = ev.LoadLedger(settings.sensor, self.drill.load_topic, self.load.published,
                                 frozenset(self.load.acked), frozenset(self.load.unknown),
                                 self._journaled())
        return ev.Evidence(
            results=results, journal=ev.read_journal_facts(rig.journal_path),
            sensor_acked=ev.sensor_acked(samples), recoveries=found,
            excused=ev.excused_windows(results.events, found, limits.commit_pause_settle_s),
            sockets=sockets,
            floods={s: (self.drill.sensor_type(s), n) for s, n in self.flooded.items()},
            hits=dict(self.hits), load=load, writer_checks=rig.writer_checks,
            link={k: getattr(rig.link, k) for k in ("connections", "bytes_up", "bytes_down",
                                                    "resets")} if rig.link else {})


def keep_record(workdir: Path, report: Report, rig: Rig, t0: float) -> None:
    """For a kept work dir: the report (report.json) and every sample of the live tree
    (samples.jsonl: {"at_s": seconds since the drill began, "tree"}) beside the rig's files."""
    (workdir / "report.json").write_text(json.dumps(report.to_json(), indent=1, default=str))
    with open(workdir / "samples.jsonl", "w") as out:
        for sample in rig.all_samples():
            out.write(json.dumps({"at_s": round(sample.at_s - t0, 3), "tree": sample.tree})
                      + "\n")


def run_drill(path: str, as_json: bool = False, short: bool = False,
              keep: str | None = None) -> int:
    """`fleetgw drill run`: the exit status (module docstring)."""
    try:
        drill = load_drill(path)
    except DrillError as exc:
        print(f"fleetgw drill run: bad drill file:\n{exc}", file=sys.stderr)
        return 2
    if keep and Path(keep).exists() and (not Path(keep).is_dir() or any(Path(keep).iterdir())):
        print(f"fleetgw drill run: --keep {keep}: must be a new or empty directory (a drill "
              "never reuses another run's journal or keys)", file=sys.stderr)
        return 2
    workdir = Path(keep).resolve() if keep else \
        Path(tempfile.mkdtemp(prefix=f"fleetgw-drill-{drill.name}-"))
    began = time.monotonic()
    settings = drill.file.gateway
    rig = Rig(workdir / "rig", drill.gateway_config, receiver=settings.receiver,
              devices=settings.devices, disk_mb=settings.disk_mb, clock=settings.clock)
    try:
        try:
            starting = time.monotonic()
            rig.start()
        except Exception as exc:  # RigError, DiskError, ClockControlError...
            print(f"fleetgw drill run: {drill.name}: the rig could not start: {exc}",
                  file=sys.stderr)
            return 2
        run = DrillRun(drill, rig, short)
        run.phases["start_s"] = round(time.monotonic() - starting, 1)
        checks: list[Check] = []
        results = evidence = None
        try:
            results, evidence = run.play()
            checks = run_checks(evidence, drill.file.invariants)
        except Exception as exc:  # the report says what could not be done
            run.problems.append(f"the drill could not finish: {type(exc).__name__}: {exc}")
        report = Report(drill, short, run.duration_s, checks, run.applied, run.problems,
                        results, evidence, round(time.monotonic() - began, 1), run.phases,
                        str(workdir) if keep else None)
        if keep:
            keep_record(workdir, report, rig, run.t0)
    finally:
        rig.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        print(json.dumps(report.to_json(), indent=None, separators=(",", ":"), default=str))
    else:
        print(render_text(report))
    return report.exit_status
