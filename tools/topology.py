"""`fleetgw topology`: the actor topology inspector.

Where this sits: outside the gateway. It attaches to the running actor system on the admin port
(never starting or shutting one down), asks the gateway root for the supervision tree, and
prints it — as text, as JSON (`--json`), as Graphviz (`--dot`, labels with restarts and backlog
figures), or refreshed with the change since the last refresh beside restarts, backlog figures
and the totals line (`--watch`: ``restarts 3(+1)``, ``backlog=120(+30)``).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

from messages.gateway import GatewayNotConfigured
from messages.supervision import ActorNode, TopologyReport, TopologyRequest
from supervisors import system

_ids = itertools.count(1)

#: Figures shown in the text view, per kind of actor (all go to --json), and any figure whose
#: name starts with "backlog_".
TEXT_FIGURES = (
    "records", "appended", "commits_per_s", "last_commit_age_s", "refused",
    "readings_added", "acked_readings", "unacked_batches", "unacked_bytes", "held", "pending",
    "ack_ms_p99", "routed", "backlog", "aggregates", "children", "strategy",
)
#: Figures that show work piling up: the watch view gives their change since the last refresh,
#: and the Graphviz labels carry them. So do figures named "backlog_*".
BACKLOG_FIGURES = ("backlog", "pending", "unacked_batches", "unacked_bytes", "held")


def is_backlog_figure(name: str) -> bool:
    return name in BACKLOG_FIGURES or name.startswith("backlog_")


class InspectorError(RuntimeError):
    """The inspector could not get a tree (no gateway, or it does not answer)."""


def attach_root(admin_port: int) -> tuple[Any, Any]:
    """(actor system, gateway root address) of the gateway on ``admin_port``, attached without
    ever starting a system (supervisors.system.attach). Raises InspectorError."""
    from supervisors.gateway import GLOBAL_NAME, Gateway

    try:
        asys = system.attach(admin_port)
        return asys, asys.createActor(Gateway, globalName=GLOBAL_NAME)
    except system.NoGatewayError as exc:
        raise InspectorError(str(exc)) from None
    except Exception as exc:  # e.g. InvalidActorAddress: something else holds the port
        raise InspectorError(f"admin port {admin_port} does not answer as a fleetgw actor "
                             f"system ({type(exc).__name__}: {exc})") from None


def ask_root(asys: Any, root: Any, admin_port: int, message: Any, reply_type: type,
             timeout_s: float) -> Any:
    """Send ``message`` (with a request id) to the gateway root; its reply of ``reply_type``
    with that id, or None after ``timeout_s``. Raises InspectorError when the root has no
    gateway."""
    asys.tell(root, message)
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        reply = asys.listen(remaining)
        if reply is None:
            break
        if isinstance(reply, GatewayNotConfigured) and \
                reply.request_id == message.request_id:
            # Our lookup found (or created) a root that no run process has started; an
            # unclaimed root removes itself (supervisors.gateway.UNCLAIMED_EXIT_S).
            raise InspectorError(f"admin port {admin_port} has an actor system but no gateway")
        if isinstance(reply, reply_type) and reply.request_id == message.request_id:
            return reply
    return None


def fetch_tree(admin_port: int, timeout_s: float = 5.0) -> ActorNode:
    """The live tree of the gateway on ``admin_port``. Raises InspectorError."""
    asys, root = attach_root(admin_port)
    reply = ask_root(asys, root, admin_port, TopologyRequest(next(_ids)), TopologyReport,
                     timeout_s)
    if reply is None:
        raise InspectorError(f"the gateway on admin port {admin_port} did not answer in "
                             f"{timeout_s:g}s")
    return reply.root


def _fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_text(root: ActorNode, previous: ActorNode | None = None) -> str:
    """The tree as indented text under a line of totals. With ``previous`` (the last refresh),
    rows whose restart count or state changed are marked ``*``, and restarts, backlog figures
    and the totals carry their change: ``3(+1)``, ``backlog=120(+30)``."""
    before = _by_path(previous)
    lines = [render_totals(root, previous),
             f"{'NAME':34} {'CLASS':13} {'PID':>7} {'STATE':11} {'RESTARTS':>8} "
             f"{'UPTIME':>7}  FIGURES / LAST EXIT"]

    def visit(node: ActorNode, path: tuple[str, ...], prefix: str, last: bool) -> None:
        branch = "" if len(path) == 1 else ("└─ " if last else "├─ ")
        old = before.get(path)
        mark = "*" if old is not None and (old.restarts != node.restarts
                                           or old.state != node.state) else " "
        old_restarts, old_figures = (None, {}) if old is None else (old.restarts,
                                                                     dict(old.figures))
        restarts = f"{node.restarts}{_change(node.restarts, old_restarts)}"
        shown = " ".join(
            f"{k}={v}{_change(v, old_figures.get(k)) if is_backlog_figure(k) else ''}"
            for k, v in _text_figures(node))
        if node.last_exit:
            shown = f"{shown}  last_exit: {node.last_exit}".strip()
        name = f"{prefix}{branch}{node.name}"
        lines.append(
            f"{mark}{name:33} {node.cls:13} {node.pid or '-':>7} {node.state:11} "
            f"{restarts:>8} {_fmt_uptime(node.uptime_s):>7}  {shown}"
        )
        child_prefix = prefix + ("" if len(path) == 1 else ("   " if last else "│  "))
        for i, child in enumerate(node.children):
            visit(child, (*path, child.name), child_prefix, i == len(node.children) - 1)

    visit(root, (root.name,), "", True)
    return "\n".join(lines)


def render_totals(root: ActorNode, previous: ActorNode | None = None) -> str:
    """One line over the whole tree: actors running, restarts in total and the journal's
    records and commits/s where it reports them; with ``previous``, the changes since."""
    nodes, old_nodes = list(_walk(root)), list(_walk(previous))
    running = sum(node.state == "running" for node in nodes)
    restarts = sum(node.restarts for node in nodes)
    old_restarts = sum(node.restarts for node in old_nodes) if previous else None
    parts = [f"actors {running}/{len(nodes)} running",
             f"restarts total {restarts}{_change(restarts, old_restarts)}"]
    journal = _by_path(root).get((root.name, "journal"))
    if journal is not None:
        figures = dict(journal.figures)
        old = _by_path(previous).get((root.name, "journal"))
        if figures.get("records") is not None:
            old_records = dict(old.figures).get("records") if old is not None else None
            parts.append(f"journal records {figures['records']}"
                         f"{_change(figures['records'], old_records)}")
        if figures.get("commits_per_s") is not None:
            parts.append(f"commits/s {figures['commits_per_s']}")
    return "  ".join(parts)


def render_dot(root: ActorNode) -> str:
    """The tree as a Graphviz digraph; each label carries the restarts and backlog figures."""
    colors = {"running": "palegreen", "starting": "lightyellow", "restarting": "orange",
              "backing_off": "orange", "stopping": "lightgrey", "dead": "salmon"}
    out = ["digraph fleetgw {", '  node [shape=box, style="rounded,filled", fontname="monospace"];']

    def visit(node: ActorNode) -> None:
        node_id = _dot_string(node.name)  # fleetgw names no two actors alike
        label = [node.name, f"{node.cls} pid {node.pid or '-'}",
                 f"{node.state}, restarts {node.restarts}"]
        backlog = [f"{k}={v}" for k, v in node.figures if is_backlog_figure(k) and v is not None]
        if backlog:
            label.append(" ".join(backlog))
        out.append(f"  {node_id} [label={_dot_string(*label)}, "
                   f"fillcolor={colors.get(node.state, 'white')}];")
        for child in node.children:
            out.append(f"  {node_id} -> {_dot_string(child.name)};")
            visit(child)

    visit(root)
    out.append("}")
    return "\n".join(out)


def _dot_string(*lines: str) -> str:
    """A double-quoted Graphviz string of ``lines`` (quotes and backslashes escaped)."""
    escaped = (" ".join(line.splitlines()).replace("\\", "\\\\").replace('"', '\\"')
               for line in lines)
    return '"' + "\\n".join(escaped) + '"'


def _text_figures(node: ActorNode):
    figures = dict(node.figures)
    shown = [k for k in TEXT_FIGURES if k in figures]
    shown += [k for k in figures if k.startswith("backlog_")]
    return [(k, figures[k]) for k in shown if figures[k] is not None]


def _change(new: Any, old: Any) -> str:
    """``(+30)`` / ``(-2)`` when a number changed; empty when it did not or is not a number."""
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (new, old)):
        return ""
    delta = new - old
    if delta == 0:
        return ""
    return f"({delta:+d})" if isinstance(delta, int) else f"({round(delta, 3):+g})"


def _by_path(root: ActorNode | None) -> dict[tuple[str, ...], ActorNode]:
    """Every node by its path of names from the root (an actor that moved is a new one)."""
    found: dict[tuple[str, ...], ActorNode] = {}

    def visit(node: ActorNode, path: tuple[str, ...]) -> None:
        found[path] = node
        for child in node.children:
            visit(child, (*path, child.name))

    if root is not None:
        visit(root, (root.name,))
    return found


def _walk(node: ActorNode | None):
    if node is None:
        return
    yield node
    for child in node.children:
        yield from _walk(child)


#: Upper bound on one attach + query, whatever Thespian does inside (seconds).
FETCH_DEADLINE_S = 20


def _deadline_hit(_signum: int, _frame: Any) -> None:
    raise InspectorError(f"no answer within {FETCH_DEADLINE_S}s")


def topology_command(admin_port: int, as_json: bool, dot: bool, watch: bool,
                     interval_s: float = 1.0, count: int | None = None) -> int:
    import signal

    signal.signal(signal.SIGALRM, _deadline_hit)
    previous: ActorNode | None = None
    shown = 0
    while True:
        signal.alarm(FETCH_DEADLINE_S)
        try:
            tree = fetch_tree(admin_port)
        except InspectorError as exc:
            signal.alarm(0)
            print(f"fleetgw topology: {exc}", file=sys.stderr)
            return 1
        signal.alarm(0)
        if as_json:
            print(json.dumps(tree.to_json(), indent=None if watch else 2), flush=True)
        elif dot:
            print(render_dot(tree), flush=True)
        else:
            if watch:
                print(f"\x1b[2J\x1b[H{time.strftime('%H:%M:%S')}  (* = restarts or state "
                      f"changed, (+n) = change since the last refresh; Ctrl-C to quit)")
            print(render_text(tree, previous), flush=True)
        shown += 1
        if not watch or (count is not None and shown >= count):
            return 0
        previous = tree
        try:
            time.sleep(interval_s)
        except KeyboardInterrupt:
            return 0


def as_dict(tree: ActorNode) -> dict[str, Any]:
    return tree.to_json()
