"""The gateway's own health as readings: kind ``gateway_health``, one per ``health_interval_s``.

Where this sits: the source of ``sensor:health`` (`actors.sensors.actor.HealthSensor`), the
first step of the data path like any sensor's. Its readings go through the sensor outbox to the
journal (acknowledged, resent after a journal restart), are routed (P3 in the shipped policy),
synced, and land in central's readings table, so a fleet's gateways can be compared in
ClickHouse. The figures come from the same `GatewaySnapshot` the metrics endpoint serves;
figures a gateway does not have (no uplink, no CPU sensor, the model runner off) are left out.
"""

from __future__ import annotations

from actors.metrics.snapshot import GatewaySnapshot
from messages.readings import Reading, Value

KIND = "gateway_health"


def health_values(s: GatewaySnapshot) -> dict[str, Value]:
    """The reading's values (names are stable: central's queries use them)."""
    values: dict[str, Value | None] = {
        "restarts_total": s.restarts_total,
        "actors_down": s.actors_down,
        "journal_records": s.journal_records_total,
        "journal_usage_bytes": s.journal_usage_bytes,
        "commits_per_s": s.journal_commits_per_s,
        "commit_ms_p99": (None if s.journal_commit_s is None
                          else round(s.journal_commit_s.p99 * 1000, 3)),
        "drops_total": s.drops_total,
    }
    for lane in s.backlog:
        key = f"backlog_{lane.lane.lower()}"
        values[f"{key}_records"] = lane.records
        values[f"{key}_bytes"] = lane.bytes
        values[f"{key}_oldest_s"] = round(lane.oldest_age_s, 1)
    fraction = s.disk_used_fraction
    values.update({
        "disk_used_fraction": None if fraction is None else round(fraction, 4),
        "cpu_temp_c": None if s.host.cpu_temp_c is None else round(s.host.cpu_temp_c, 1),
        "load1": None if s.host.load is None else round(s.host.load[0], 2),
        "inference_p99_us": None if s.inference_s is None else round(s.inference_s.p99 * 1e6),
        "sync_failures": None if s.sync is None else s.sync.failures,
    })
    return {name: value for name, value in values.items() if value is not None}


class HealthSource:
    """Turns snapshots into ``gateway_health`` readings of ``device_id`` from ``sensor_id``."""

    def __init__(self, sensor_id: str, device_id: str) -> None:
        self.sensor_id = sensor_id
        self.device_id = device_id

    def reading(self, snapshot: GatewaySnapshot) -> Reading:
        """The reading of ``snapshot``, timed when the snapshot was taken."""
        return Reading(self.device_id, self.sensor_id, snapshot.taken_ns, KIND,
                       health_values(snapshot))
