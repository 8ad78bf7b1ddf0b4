"""The checks of `fleetgw health`, as pure functions of what was observed.

Where this sits: beside tools/health.py, which gathers the observations (two looks at the live
tree a few heartbeats apart, the journal's backlog read-only, the data dir's free space, the
model runner's self-test) and renders the verdicts. Nothing here talks to a gateway, so tests
drive every rule with hand-built trees. Trees are the inspector's JSON (`ActorNode.to_json`).

Each check is a `Check`: ok or not, a one-line reason, and its figures. What fails:

- actors: an actor the config's tree has is missing, not running, has no process, has been
  silent (no heartbeat answer) for longer than `silent_limit_s`, or restarted while we looked.
- journal_writable: the journal actor is not up; or in the window it refused appends and
  committed none; or it has not committed for `stall_s` while sensors hold unacknowledged
  batches; or the data dir's filesystem has less than ``min_free_bytes`` free.
- backlog: only with a limit (``max_backlog_age_s``): a lane whose oldest waiting record is
  older; also when the journal cannot be read at all.
- last_sync: central answered and refused this gateway's batches since its last
  acknowledgement (not a link problem); or, with ``require_sync``, the uplink has not had one
  batch acknowledged since it started (or there is no uplink). A link that is merely down is
  not a failure.
- model: the serving model's self-test failed, or the configured runner did not answer.
- version (only when an expected version is given): the running gateway is another release.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

#: Every check `fleetgw health` runs, in the order it shows them.
CHECKS = ("actors", "journal_writable", "backlog", "last_sync", "model")
RUNNING = "running"
#: Lanes whose records wait for central (the uplink drains them); "unrouted" waits for the
#: router.
SYNCED_LANES = ("P1", "P2", "P3")
MIB = 1 << 20


@attrs.frozen
class Check:
    """One check's verdict: ``ok``, a one-line ``reason`` and the figures it judged."""

    name: str
    ok: bool
    reason: str
    figures: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, "figures": dict(self.figures)}


@attrs.frozen
class Limits:
    """What `fleetgw health` tolerates (the command's options)."""

    #: A lane's oldest waiting record may be at most this old (seconds); None: no limit.
    max_backlog_age_s: float | None = None
    #: Require one acknowledged batch since the uplink started (the canary's proof of sync).
    require_sync: bool = False
    #: Free bytes the data dir's filesystem must keep.
    min_free_bytes: int = 16 * MIB
    #: Seconds without a commit, while sensors hold unacknowledged batches, that mean stalled.
    stall_s: float = 30.0
    #: The release the gateway must run (None: any).
    expect_version: str | None = None


def walk(node: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every node of a JSON tree (`fleetgw topology --json`, a HealthReport's), depth first."""
    yield node
    for child in node.get("children", ()):
        yield from walk(child)


def by_name(tree: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {} if tree is None else {n["name"]: n for n in walk(tree)}


def silent_limit_s(heartbeat_interval_s: float) -> float:
    """How long an actor may go without answering a heartbeat before it counts as down: a few
    intervals, and never under 3 s (a busy handler on a loaded Pi delays its answer)."""
    return max(6 * heartbeat_interval_s, 3.0)


def number(figures: Mapping[str, Any], name: str) -> float | None:
    value = figures.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def actors_down(tree: Mapping[str, Any], expected: Iterable[str],
                silent_limit: float | None = None,
                before: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The actors of ``expected`` that are not up in ``tree``: missing, not running, without a
    process, silent for more than ``silent_limit`` seconds (None: not judged), or restarted
    since the tree ``before`` (None: not judged). Each: name, state, restarts and why."""
    nodes, old = by_name(tree), by_name(before)
    down = []
    for name in expected:
        node = nodes.get(name)
        if node is None:
            down.append({"name": name, "state": "missing", "restarts": None,
                         "why": "not in the live tree"})
            continue
        state, restarts, silent = node["state"], node["restarts"], node.get("silent_s")
        why = None
        if state != RUNNING:
            why = f"{state}" + (f" (last exit: {node['last_exit']})" if node.get("last_exit")
                                else "")
        elif not node.get("pid"):
            why = "running without a process id yet"
        elif silent_limit is not None and silent is not None and silent > silent_limit:
            why = f"no heartbeat answer for {silent:.1f}s (hung or stopped)"
        elif name in old and restarts > old[name]["restarts"]:
            why = f"restarted {restarts - old[name]['restarts']} time(s) while checked"
        if why is not None:
            down.append({"name": name, "state": state, "restarts": restarts, "why": why})
    return down


def check_actors(tree: Mapping[str, Any], before: Mapping[str, Any] | None,
                 expected: tuple[str, ...], heartbeat_interval_s: float) -> Check:
    limit = silent_limit_s(heartbeat_interval_s)
    down = actors_down(tree, expected, limit, before)
    nodes = by_name(tree)
    restarts = sum(n["restarts"] for n in nodes.values())
    figures = {"expected": len(expected), "up": len(expected) - len(down), "down": down,
               "restarts_total": restarts, "silent_limit_s": limit}
    if down:
        shown = ", ".join(f"{d['name']} {d['why']}" + (f" [restarts {d['restarts']}]"
                                                        if d["restarts"] else "")
                          for d in down[:3])
        more = f" (+{len(down) - 3} more)" if len(down) > 3 else ""
        return Check("actors", False, f"{len(down)}/{len(expected)} not up: {shown}{more}",
                     figures)
    return Check("actors", True, f"{len(expected)}/{len(expected)} running, restarts total "
                                 f"{restarts}", figures)


def _sensor_sum(tree: Mapping[str, Any], figure: str) -> int:
    return int(sum(number(n.get("figures", {}), figure) or 0 for n in walk(tree)
                   if n["name"].startswith("sensor:")))


def _refusal_reasons(tree: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, int]:
    """Sensors' refusals during the window, by the journal's reason (refused_<reason>)."""
    now, old = by_name(tree), by_name(before)
    reasons: dict[str, int] = {}
    for name, node in now.items():
        if not name.startswith("sensor:"):
            continue
        figures, old_figures = node.get("figures", {}), old.get(name, {}).get("figures", {})
        for key, value in figures.items():
            if key.startswith("refused_") and isinstance(value, int):
                delta = value - (old_figures.get(key) or 0)
                if delta > 0:
                    reason = key.removeprefix("refused_")
                    reasons[reason] = reasons.get(reason, 0) + delta
    return reasons


def check_journal(tree: Mapping[str, Any], before: Mapping[str, Any], window_s: float,
                  free_bytes: int | None, budget_bytes: int, limits: Limits) -> Check:
    journal, old = by_name(tree).get("journal"), by_name(before).get("journal")
    figures: dict[str, Any] = {"window_s": round(window_s, 2), "free_bytes": free_bytes,
                               "min_free_bytes": limits.min_free_bytes,
                               "budget_bytes": budget_bytes}
    if journal is None or journal["state"] != RUNNING or not journal.get("pid"):
        state = "missing" if journal is None else journal["state"]
        return Check("journal_writable", False, f"the journal actor is {state}", figures)
    now_fig, old_fig = journal.get("figures", {}), (old or {}).get("figures", {})
    if old is None or old.get("pid") != journal.get("pid"):
        return Check("journal_writable", False, "the journal actor restarted while checked",
                     figures)
    appended = (number(now_fig, "appended") or 0) - (number(old_fig, "appended") or 0)
    refused = (number(now_fig, "refused") or 0) - (number(old_fig, "refused") or 0)
    last_commit = number(now_fig, "last_commit_age_s")
    held = _sensor_sum(tree, "unacked_batches")
    figures.update({"appended_in_window": int(appended), "refused_in_window": int(refused),
                    "last_commit_age_s": last_commit,
                    "commits_per_s": number(now_fig, "commits_per_s"),
                    "usage_bytes": number(now_fig, "usage_bytes"),
                    "sensor_unacked_batches": held})
    problems = []
    if refused > 0 and appended == 0:
        reasons = _refusal_reasons(tree, before)
        why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "reason not seen"
        problems.append(f"refusing appends: {int(refused)} refused, none committed in "
                        f"{window_s:.1f}s ({why})")
    elif appended == 0 and held > 0 and last_commit is not None and last_commit > limits.stall_s:
        problems.append(f"no commit for {last_commit:.0f}s while sensors hold {held} "
                        "unacknowledged batches")
    if free_bytes is not None and free_bytes < limits.min_free_bytes:
        problems.append(f"{free_bytes / MIB:.1f} MiB free on the data dir's filesystem (needs "
                        f"{limits.min_free_bytes / MIB:.0f} MiB)")
    if problems:
        return Check("journal_writable", False, "; ".join(problems), figures)
    free = "" if free_bytes is None else f"; {free_bytes / MIB:.0f} MiB free"
    if appended > 0:
        return Check("journal_writable", True, f"committing: +{int(appended)} records in "
                                               f"{window_s:.1f}s{free}", figures)
    since = "never" if last_commit is None else f"{last_commit:.0f}s ago"
    return Check("journal_writable", True, f"idle: nothing to append (last commit {since})"
                                           f"{free}", figures)


def check_backlog(lanes: list[dict[str, Any]] | None, problem: str, limits: Limits) -> Check:
    """``lanes``: per lane (unrouted, P1, P2, P3) records, bytes and oldest_age_s (None when
    nothing waits); None when the journal could not be read (``problem`` says why)."""
    if lanes is None:
        return Check("backlog", False, f"cannot read the journal's backlog: {problem}", {})
    limit = limits.max_backlog_age_s
    figures = {"lanes": {lane["lane"]: {k: v for k, v in lane.items() if k != "lane"}
                         for lane in lanes}, "max_backlog_age_s": limit}
    shown = ", ".join(f"{lane['lane']} {lane['records']}" + (
        f" (oldest {lane['oldest_age_s']:.0f}s)" if lane["records"] and
        lane["oldest_age_s"] is not None else "") for lane in lanes)
    if limit is not None:
        old = [lane for lane in lanes if lane["records"] and lane["oldest_age_s"] is not None
               and lane["oldest_age_s"] > limit]
        if old:
            worst = ", ".join(f"{lane['lane']} oldest {lane['oldest_age_s']:.0f}s"
                              for lane in old)
            return Check("backlog", False, f"older than {limit:g}s: {worst}", figures)
    return Check("backlog", True, shown or "nothing waits", figures)


def check_sync(tree: Mapping[str, Any], configured: bool, limits: Limits) -> Check:
    if not configured:
        if limits.require_sync:
            return Check("last_sync", False, "--require-sync, but this gateway has no uplink "
                                             "configured", {"configured": False})
        return Check("last_sync", True, "not configured", {"configured": False})
    uplink = by_name(tree).get("uplink")
    fig = dict(uplink.get("figures", {})) if uplink is not None else {}
    keys = ("pending", "acked", "failures", "last_ack_age_s", "last_refusal_age_s", "link",
            "waiting", "last_problem")
    figures = {"configured": True, **{k: fig.get(k) for k in keys}}
    if not fig:
        if limits.require_sync:
            return Check("last_sync", False, "the uplink is not running (no figures)", figures)
        return Check("last_sync", True, "uplink not running now (see actors)", figures)
    acked = number(fig, "acked") or 0
    ack_age, refusal_age = number(fig, "last_ack_age_s"), number(fig, "last_refusal_age_s")
    if refusal_age is not None and (ack_age is None or refusal_age < ack_age):
        return Check("last_sync", False, f"central refuses this gateway's batches "
                                         f"({refusal_age:.0f}s ago): {fig.get('last_problem')}",
                     figures)
    if limits.require_sync and acked == 0:
        return Check("last_sync", False, "no batch acknowledged since the uplink started "
                                         f"(--require-sync; waiting: {fig.get('waiting')}, last "
                                         f"problem: {fig.get('last_problem')})", figures)
    last = "no batch acknowledged yet" if ack_age is None else f"last ack {ack_age:.0f}s ago"
    return Check("last_sync", True, f"{last}, {int(acked)} acked, pending "
                                    f"{fig.get('pending')}, failures {fig.get('failures')} "
                                    f"(link: {fig.get('waiting')})", figures)


def check_model(configured: bool, answer: Any, timeout_s: float) -> Check:
    """``answer``: the runner's `ModelSelfTested`, or None when none came in ``timeout_s``."""
    if not configured:
        return Check("model", True, "not configured", {"configured": False})
    if answer is None:
        return Check("model", False, f"the model runner did not answer in {timeout_s:g}s",
                     {"configured": True})
    figures = {"configured": True, "version": answer.version or None,
               "latency_ms": answer.latency_ms, "vectors": answer.vectors}
    if not answer.ok:
        return Check("model", False, f"self-test failed: {answer.detail}", figures)
    return Check("model", True, f"{answer.version}: {answer.vectors} self-test vectors passed "
                                f"in {answer.latency_ms:g} ms", figures)


def check_version(running: str, expected: str) -> Check:
    figures = {"running": running, "expected": expected}
    if running != expected:
        return Check("version", False, f"the gateway runs {running}, not {expected} (was it "
                                       "restarted after the upgrade?)", figures)
    return Check("version", True, f"runs {running}", figures)
