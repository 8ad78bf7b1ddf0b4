"""`fleetgw health`: is the running gateway fit to serve? The gate of a staged rollout.

Where this sits: outside the gateway, like the inspector (tools/topology.py): it attaches to
the actor system on the admin port (never starting one) and asks the gateway root for a
`HealthReport` — the live tree and what the running config says the tree must hold — twice, a
few heartbeats apart, so counters show what the gateway does now. Between the two looks it
reads the journal's backlog (read-only, like any consumer: I3), the data dir's free space,
and has the model runner self-test its serving model. tools/health_checks.py judges;
deploy/ROLLOUT.md says how a rollout gates on it.

Exit status: 0 healthy, 1 unhealthy (the report names the failed checks), 2 the gateway could
not be reached (within --wait) or bad usage. With --wait it polls until healthy or the time is
up, so a canary can be judged right after its restart.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any

import attrs

from messages.health import HealthReport, HealthRequest, ModelSelfTested, SelfTestModel
from tools.health_checks import (
    Check,
    Limits,
    check_actors,
    check_backlog,
    check_journal,
    check_model,
    check_sync,
    check_version,
)
from tools.topology import InspectorError, ask_root, attach_root

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_UNREACHABLE = 0, 1, 2
#: Seconds the root has to answer a HealthRequest.
REPORT_TIMEOUT_S = 10.0
#: Seconds the model runner has to answer its self-test (it answers between two batches).
MODEL_TIMEOUT_S = 15.0
#: Upper bound on one whole attempt, whatever Thespian does inside (seconds).
ATTEMPT_DEADLINE_S = 60
#: Seconds between attempts with --wait.
POLL_INTERVAL_S = 2.0

_ids = itertools.count(1)


@attrs.frozen
class HealthResult:
    """One attempt's verdict on a reachable gateway."""

    version: str
    checked_at: str
    data_dir: str
    checks: tuple[Check, ...]

    @property
    def healthy(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "checks": {c.name: c.to_json() for c in self.checks},
                "version": self.version, "checked_at": self.checked_at,
                "data_dir": self.data_dir}


def window_s(heartbeat_interval_s: float) -> float:
    """How far apart the two looks at the tree are: a sensor's figures reach the root two
    heartbeats after they change (sensor -> sensors supervisor -> root)."""
    return min(max(3 * heartbeat_interval_s + 0.2, 1.0), 10.0)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Prober:
    """The questions one attempt asks the gateway on ``admin_port``."""

    def __init__(self, admin_port: int) -> None:
        self.admin_port = admin_port
        self.asys, self.root = attach_root(admin_port)

    def ask(self, message: Any, reply_type: type, timeout_s: float) -> Any:
        """See `tools.topology.ask_root`."""
        return ask_root(self.asys, self.root, self.admin_port, message, reply_type, timeout_s)

    def report(self) -> HealthReport:
        report = self.ask(HealthRequest(next(_ids)), HealthReport, REPORT_TIMEOUT_S)
        if report is None:
            raise InspectorError(f"the gateway on admin port {self.admin_port} did not answer "
                                 f"in {REPORT_TIMEOUT_S:g}s")
        return report

    def model_selftest(self) -> ModelSelfTested | None:
        return self.ask(SelfTestModel(next(_ids)), ModelSelfTested, MODEL_TIMEOUT_S)


def read_backlog(data_dir: str) -> tuple[list[dict[str, Any]] | None, str]:
    """What waits per lane in DATA_DIR/journal.db (read-only; payloads are not read), or None
    and why not."""
    import apsw

    from actors.journal.reader import JournalReader
    from actors.journal.schema import JournalError

    path = os.path.join(data_dir, "journal.db")
    try:
        with JournalReader(path) as reader:
            lanes = reader.backlog()
    except (JournalError, apsw.Error, OSError) as exc:
        return None, str(exc)
    now_ns = time.time_ns()
    return [{"lane": b.lane, "records": b.records, "bytes": b.bytes,
             "oldest_age_s": None if b.oldest_ts is None
             else round(max(0.0, (now_ns - b.oldest_ts) / 1e9), 1)} for b in lanes], ""


def free_bytes(data_dir: str) -> int | None:
    try:
        return shutil.disk_usage(data_dir).free
    except OSError:
        return None


def check_once(admin_port: int, data_dir: str | None, limits: Limits) -> HealthResult:
    """One attempt: two looks at the tree with the journal, disk and model probes between."""
    prober = Prober(admin_port)
    first = prober.report()
    started = time.monotonic()
    window = window_s(first.heartbeat_interval_s)
    directory = data_dir or first.data_dir
    answer = prober.model_selftest() if first.model_configured else None
    lanes, problem = read_backlog(directory)
    free = free_bytes(directory)
    with contextlib.suppress(ValueError):
        time.sleep(window - (time.monotonic() - started))  # negative: the window has passed
    second = prober.report()
    elapsed = time.monotonic() - started
    tree, before = second.root.to_json(), first.root.to_json()
    checks = [
        check_actors(tree, before, second.expected, second.heartbeat_interval_s),
        check_journal(tree, before, elapsed, free, second.journal_budget_bytes, limits),
        check_backlog(lanes, problem, limits),
        check_sync(tree, second.uplink_configured, limits),
        check_model(second.model_configured, answer, MODEL_TIMEOUT_S),
    ]
    if limits.expect_version is not None:
        checks.append(check_version(second.version, limits.expect_version))
    return HealthResult(second.version, now_iso(), directory, tuple(checks))


def render_text(result: HealthResult, admin_port: int) -> str:
    """A compact table: one row per check, then the actors that are not up."""
    verdict = "HEALTHY" if result.healthy else "UNHEALTHY: " + ", ".join(result.failed())
    lines = [f"fleetgw {result.version} on admin port {admin_port}: {verdict}  "
             f"(checked {result.checked_at})",
             f"{'CHECK':17} {'':4}  REASON"]
    for check in result.checks:
        lines.append(f"{check.name:17} {'ok' if check.ok else 'FAIL':4}  {check.reason}")
    for check in result.checks:
        if check.name == "actors":
            lines += [f"  - {d['name']}: {d['why']} (restarts {d['restarts']})"
                      for d in check.figures.get("down", [])]
    return "\n".join(lines)


def _deadline_hit(_signum: int, _frame: Any) -> None:
    raise InspectorError(f"no answer within {ATTEMPT_DEADLINE_S}s")


def health_command(admin_port: int, data_dir: str | None, as_json: bool, wait_s: float | None,
                   limits: Limits) -> int:
    """`fleetgw health`: print the verdict (a table, or one JSON object) and return the exit
    status. With ``wait_s``, attempts repeat until one is healthy or the time is up; the last
    attempt is what is printed."""
    if data_dir is not None and not os.path.isdir(data_dir):
        print(f"fleetgw health: --data-dir {data_dir}: not a directory", file=sys.stderr)
        return EXIT_UNREACHABLE
    signal.signal(signal.SIGALRM, _deadline_hit)
    deadline = time.monotonic() + (wait_s or 0.0)
    while True:
        result: HealthResult | None = None
        error = ""
        signal.alarm(ATTEMPT_DEADLINE_S)
        try:
            result = check_once(admin_port, data_dir, limits)
        except InspectorError as exc:
            error = str(exc)
        finally:
            signal.alarm(0)
        remaining = deadline - time.monotonic()
        if (result is not None and result.healthy) or remaining <= 0:
            break
        status = error if result is None else "unhealthy: " + "; ".join(
            f"{c.name}: {c.reason}" for c in result.checks if not c.ok)
        print(f"fleetgw health: {status} (retrying for {remaining:.0f}s more)", file=sys.stderr,
              flush=True)
        time.sleep(min(POLL_INTERVAL_S, max(remaining, 0.0)))
    if result is None:
        print(f"fleetgw health: cannot reach the gateway: {error}", file=sys.stderr)
        if as_json:
            print(json.dumps({"healthy": False, "checks": {}, "version": None,
                              "checked_at": now_iso(), "error": error}))
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        print(render_text(result, admin_port))
    return EXIT_HEALTHY if result.healthy else EXIT_UNHEALTHY
