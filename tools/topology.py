"""`fleetgw topology`: the actor topology inspector.

Where this sits: outside the gateway. It attaches to the running actor system on the admin port
(never starting or shutting one down), asks the gateway root for the supervision tree, and
prints it — as text, as JSON (`--json`), as Graphviz (`--dot`), or refreshed with changes marked
(`--watch`).
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

#: Figures shown in the text view, per kind of actor (all go to --json).
TEXT_FIGURES = (
    "records", "appended", "commits_per_s", "last_commit_age_s", "refused",
    "readings_added", "acked_readings", "unacked_batches", "unacked_bytes", "held",
    "ack_ms_p99", "routed", "backlog", "aggregates", "children", "strategy",
)


class InspectorError(RuntimeError):
    """The inspector could not get a tree (no gateway, or it does not answer)."""


def fetch_tree(admin_port: int, timeout_s: float = 5.0) -> ActorNode:
    """The live tree of the gateway on ``admin_port``. Raises InspectorError."""
    from supervisors.gateway import GLOBAL_NAME, Gateway

    try:
        asys = system.attach(admin_port)
    except system.NoGatewayError as exc:
        raise InspectorError(str(exc)) from None
    except Exception as exc:  # e.g. InvalidActorAddress: something else holds the port
        raise InspectorError(f"admin port {admin_port} does not answer as a fleetgw actor "
                             f"system ({type(exc).__name__}: {exc})") from None
    root = asys.createActor(Gateway, globalName=GLOBAL_NAME)
    request = TopologyRequest(next(_ids))
    asys.tell(root, request)
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        reply = asys.listen(remaining)
        if reply is None:
            break
        if isinstance(reply, TopologyReport) and reply.request_id == request.request_id:
            return reply.root
        if isinstance(reply, GatewayNotConfigured):
            # Our lookup found (or created) a root that no run process has started; an
            # unclaimed root removes itself (supervisors.gateway.UNCLAIMED_EXIT_S).
            raise InspectorError(f"admin port {admin_port} has an actor system but no gateway")
    raise InspectorError(f"the gateway on admin port {admin_port} did not answer in "
                         f"{timeout_s:g}s")


def _fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_text(root: ActorNode, previous: ActorNode | None = None) -> str:
    """The tree as indented text; with ``previous``, changed restart counts and states are
    marked with ``*``."""
    before = {n.name: n for n in _walk(previous)} if previous else {}
    lines = [f"{'NAME':34} {'CLASS':12} {'PID':>7} {'STATE':11} {'RESTARTS':>8} "
             f"{'UPTIME':>7}  FIGURES / LAST EXIT"]

    def visit(node: ActorNode, prefix: str, last: bool, depth: int) -> None:
        branch = "" if depth == 0 else ("└─ " if last else "├─ ")
        old = before.get(node.name)
        mark = "*" if old is not None and (old.restarts != node.restarts
                                           or old.state != node.state) else " "
        figures = dict(node.figures)
        shown = " ".join(f"{k}={figures[k]}" for k in TEXT_FIGURES
                         if k in figures and figures[k] is not None)
        if node.last_exit:
            shown = f"{shown}  last_exit: {node.last_exit}".strip()
        name = f"{prefix}{branch}{node.name}"
        lines.append(
            f"{mark}{name:33} {node.cls:12} {node.pid or '-':>7} {node.state:11} "
            f"{node.restarts:>8} {_fmt_uptime(node.uptime_s):>7}  {shown}"
        )
        child_prefix = prefix + ("" if depth == 0 else ("   " if last else "│  "))
        for i, child in enumerate(node.children):
            visit(child, child_prefix, i == len(node.children) - 1, depth + 1)

    visit(root, "", True, 0)
    return "\n".join(lines)


def render_dot(root: ActorNode) -> str:
    """The tree as a Graphviz digraph."""
    colors = {"running": "palegreen", "starting": "lightyellow", "restarting": "orange",
              "backing_off": "orange", "stopping": "lightgrey", "dead": "salmon"}
    out = ["digraph fleetgw {", '  node [shape=box, style="rounded,filled", fontname="monospace"];']

    def node_id(node: ActorNode) -> str:
        return json.dumps(node.name)

    def visit(node: ActorNode) -> None:
        label = f"{node.name}\\n{node.cls} pid {node.pid or '-'}\\n{node.state}, " \
                f"{node.restarts} restarts"
        out.append(f'  {node_id(node)} [label="{label}", '
                   f'fillcolor={colors.get(node.state, "white")}];')
        for child in node.children:
            out.append(f"  {node_id(node)} -> {node_id(child)};")
            visit(child)

    visit(root)
    out.append("}")
    return "\n".join(out)


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
                print(f"\x1b[2J\x1b[H{time.strftime('%H:%M:%S')}  (* = changed since last "
                      f"refresh; Ctrl-C to quit)")
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
