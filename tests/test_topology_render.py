"""`fleetgw topology`'s views of a supervision tree, built directly (no actor system): the
watch view gives the change since the last refresh beside restarts, backlog figures and the
totals; the Graphviz view is a well-formed digraph whose labels carry restarts and backlogs."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from messages.supervision import ActorNode
from tools.topology import render_dot, render_text, render_totals


def tree(*, restarts: int = 0, backlog: int = 120, records: int = 5000, pending: int = 2,
         unacked_bytes: int = 4096, backlog_p1: int = 7, state: str = "running") -> ActorNode:
    """A small gateway: journal, a sensor under a supervisor, a consumer and the uplink."""
    def leaf(name: str, cls: str, pid: int, *figures, **kw) -> ActorNode:
        return ActorNode(name=name, cls=cls, pid=pid, state=kw.get("state", "running"),
                         restarts=kw.get("restarts", 0), last_exit=None, uptime_s=30.0,
                         figures=tuple(figures))

    sensors = ActorNode(
        name="sensors", cls="Supervisor", pid=None, state="running", restarts=0,
        last_exit=None, uptime_s=31.0, figures=(("strategy", "one_for_one"),),
        children=(leaf("sensor:imu0", "SimSensor", 102, ("readings_added", 900),
                       ("unacked_batches", 3), ("unacked_bytes", unacked_bytes), ("held", 0),
                       restarts=restarts, state=state),))
    return ActorNode(
        name="gateway", cls="Gateway", pid=100, state="running", restarts=0, last_exit=None,
        uptime_s=32.0, figures=(),
        children=(leaf("journal", "JournalWriter", 101, ("records", records),
                       ("commits_per_s", 4.2)),
                  sensors,
                  leaf("router", "Router", 103, ("routed", 800), ("backlog", backlog)),
                  leaf("uplink", "UplinkActor", 104, ("pending", pending),
                       ("backlog_p1", backlog_p1), ("mode", "http"))))


def row(text: str, name: str) -> str:
    (line,) = [line for line in text.splitlines() if re.search(rf"\b{re.escape(name)}\s", line)]
    return line


def test_the_watch_view_shows_each_change_since_the_last_refresh():
    before = tree(restarts=2, backlog=90, records=4000, pending=5, unacked_bytes=4096)
    after = tree(restarts=3, backlog=120, records=5000, pending=2, unacked_bytes=4096)
    text = render_text(after, previous=before)
    sensor = row(text, "sensor:imu0")
    assert sensor.startswith("*") and " 3(+1) " in sensor  # a restart: marked and counted
    assert "unacked_bytes=4096 " in sensor  # unchanged: no (+0)
    assert "backlog=120(+30)" in row(text, "router")
    uplink = row(text, "uplink")
    assert "pending=2(-3)" in uplink and "backlog_p1=7" in uplink and "(+" not in uplink
    assert not row(text, "router").startswith("*")
    assert text.splitlines()[0] == ("actors 6/6 running  restarts total 3(+1)  "
                                    "journal records 5000(+1000)  commits/s 4.2")


def test_without_a_previous_refresh_there_are_no_changes_to_show():
    text = render_text(tree(restarts=3, backlog=120))
    assert "(+" not in text and "(-" not in text
    assert not any(line.startswith("*") for line in text.splitlines())
    assert "backlog=120" in row(text, "router") and " 3 " in row(text, "sensor:imu0")
    assert render_totals(tree(restarts=3)).startswith("actors 6/6 running  restarts total 3")


def test_a_state_change_alone_is_marked():
    text = render_text(tree(state="backing_off"), previous=tree())
    assert row(text, "sensor:imu0").startswith("*")
    assert "actors 5/6 running" in text.splitlines()[0]


def test_the_dot_view_is_a_digraph_with_every_node_quoted_and_labelled():
    dot = render_dot(tree(restarts=3, backlog=120))
    assert dot.startswith("digraph fleetgw {") and dot.endswith("}")
    assert dot.count("{") == dot.count("}") == 1
    declared = set(re.findall(r'^  ("(?:[^"\\]|\\.)*") \[label=', dot, re.MULTILINE))
    edges = re.findall(r'^  ("(?:[^"\\]|\\.)*") -> ("(?:[^"\\]|\\.)*");$', dot, re.MULTILINE)
    assert declared == {'"gateway"', '"journal"', '"sensors"', '"sensor:imu0"', '"router"',
                        '"uplink"'}
    assert len(edges) == 5 and {end for edge in edges for end in edge} <= declared
    assert '"sensors" -> "sensor:imu0"' in dot
    sensor = next(line for line in dot.splitlines() if line.startswith('  "sensor:imu0" ['))
    assert "restarts 3" in sensor and "unacked_batches=3" in sensor
    assert "backlog=120" in next(line for line in dot.splitlines()
                                 if line.startswith('  "router" ['))


def test_the_dot_view_escapes_quotes_in_names():
    odd = ActorNode(name='sensor:"x"\\y', cls="SimSensor", pid=1, state="running", restarts=0,
                    last_exit=None, uptime_s=None)
    root = ActorNode(name="gateway", cls="Gateway", pid=None, state="running", restarts=0,
                     last_exit=None, uptime_s=None, children=(odd,))
    dot = render_dot(root)
    assert '"gateway" -> "sensor:\\"x\\"\\\\y";' in dot
    if shutil.which("dot"):
        check_with_graphviz(dot)


@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz's dot is not installed")
def test_graphviz_reads_the_dot_view():
    check_with_graphviz(render_dot(tree(restarts=1)))


def check_with_graphviz(dot: str) -> None:
    result = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert result.stdout.count("<g id=\"node") == dot.count(" [label=")
