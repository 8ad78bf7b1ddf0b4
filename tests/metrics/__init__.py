"""Tests of the metrics (actors/metrics) and the health readings (actors/sensors/health.py):
snapshots from hand-built trees and real journal files, the Prometheus text, the HTTP endpoint.

`tree` builds an `ActorNode` tree like the root's `TopologyReport`, with the figures the real
actors report (names as in their ``figures()``).
"""

from __future__ import annotations

from typing import Any

from messages.supervision import ActorNode


def node(name: str, cls: str, state: str = "running", restarts: int = 0,
         uptime_s: float | None = 12.0, children: tuple[ActorNode, ...] = (),
         **figures: Any) -> ActorNode:
    return ActorNode(name, cls, 1000, state, restarts, None, uptime_s, tuple(figures.items()),
                     children)


def tree(*, uplink: bool = True, model: bool = True) -> ActorNode:
    """A gateway's tree: journal, three sensors (one backing off after 2 restarts, one an MQTT
    sensor that dropped QoS 0 messages), router, model runner and uplink as asked."""
    sensors = node("sensors", "Supervisor", restarts=1, children=(
        node("sensor:imu0", "SimSensor", quarantined=0, ack_ms_p50=2.0, ack_ms_p99=9.5),
        node("sensor:mq0", "MqttSensor", quarantined=3, rejected_readings=1,
             mqtt_qos0_dropped=7, mqtt_quarantined=3),
        node("sensor:gps0", "SimSensor", state="backing_off", restarts=2, uptime_s=None),
    ))
    processing = (node("router", "RouterActor", backlog=40),)
    if model:
        processing += (node("model", "ModelRunnerActor", backlog=12, inferences=30,
                            latency_p50_us=600, latency_p99_us=2100),)
    children = (
        node("journal", "JournalWriter", records=999, commits=50, commits_per_s=12.5,
             commit_ms_p50=1.5, commit_ms_p99=20.0, refused=2, usage_bytes=4096),
        sensors,
        node("processing", "Supervisor", children=processing),
    )
    if uplink:
        children += (node("uplink", "UplinkActor", sent=9, acked=7, bytes_sent=12345,
                          retries=2, failures=2, synced_records=700, pending=1,
                          waiting="nothing to send"),)
    return node("gateway", "Gateway", children=(*children, node("metrics", "MetricsActor")))
