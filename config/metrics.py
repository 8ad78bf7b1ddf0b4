"""[metrics]: the gateway's Prometheus endpoint and the health readings it journals.

Where this sits: beside the data path, watching it. `actors.metrics.actor.MetricsActor` samples
the live supervision tree and the journal every ``refresh_s`` and serves them as Prometheus text
on ``listen_address:port``; ``sensor:health`` (`actors.sensors.actor.HealthSensor`) journals
the same figures as ``gateway_health`` readings every ``health_interval_s``, so they are routed,
synced and reach ClickHouse like any reading.

I9: the endpoint listens on loopback (127.0.0.1) unless ``listen_address`` says otherwise; it
has no authentication, so only configure another address on a network you trust (or put a
reverse proxy with TLS in front). Validation does no I/O (the port and the temperature file are
tried when the actor starts). `FieldProblem` is imported at call time, as in config.broker.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

import attrs

from config.fields import FieldProblem, _address, _non_negative, _port, _positive

if TYPE_CHECKING:
    from config.schema import SensorSettings

#: The endpoint's default TCP port (9477: not taken by a common exporter). Two gateways on one
#: computer need different ports: the second one reports "address in use" and keeps retrying.
DEFAULT_METRICS_PORT = 9477
DEFAULT_REFRESH_S = 2.0
DEFAULT_HEALTH_INTERVAL_S = 30.0
#: ``cpu_temp_path`` value that turns the temperature off.
NO_CPU_TEMP = "none"
#: The health sensor's id (its actor is ``sensor:health``): reserved, no [[sensors]] may use it.
HEALTH_SENSOR_ID = "health"


def _one_line(inst: Any, attr: attrs.Attribute, value: str) -> None:
    if any(c in value for c in "\n\r\x00"):
        raise FieldProblem(attr.name, f"must be a path on one line (got {value!r})")


@attrs.frozen
class MetricsSettings:
    """[metrics]: the Prometheus endpoint (``GET /metrics``) and the health readings."""

    #: Run the metrics actor (and the health sensor) at all.
    enabled: bool = True
    #: The one address the endpoint listens on. 127.0.0.1 (default) keeps it on this computer;
    #: any other address exposes the figures to that network, without authentication (I9:
    #: only when configured here).
    listen_address: str = attrs.field(default="127.0.0.1", validator=_address)
    #: Its TCP port. A port in use does not stop the gateway: the endpoint reports the problem
    #: (``fleetgw topology``: metrics ``problem``) and tries again every 30 s.
    port: int = attrs.field(default=DEFAULT_METRICS_PORT, validator=_port)
    #: Seconds between samples of the supervision tree and the journal (what a scrape sees).
    #: The lane backlog's query is re-run less often when it is slow (at most 5% of the time).
    refresh_s: float = attrs.field(default=DEFAULT_REFRESH_S, validator=_positive)
    #: Seconds between ``gateway_health`` readings journaled by ``sensor:health`` (synced to
    #: central like any reading); 0 turns the health sensor off.
    health_interval_s: float = attrs.field(default=DEFAULT_HEALTH_INTERVAL_S,
                                           validator=_non_negative)
    #: File with the CPU temperature in millidegrees Celsius. Empty (default): the first of
    #: /sys/class/thermal/thermal_zone*/temp whose type is cpu-thermal (Raspberry Pi) or
    #: x86_pkg_temp, else thermal_zone0; none there: no temperature. "none": never read one.
    cpu_temp_path: str = attrs.field(default="", validator=_one_line)

    @property
    def loopback(self) -> bool:
        """Whether the endpoint listens on this computer only."""
        return ipaddress.ip_address(self.listen_address).is_loopback


@attrs.frozen
class SamplingSettings:
    """What the metrics actor and the health sensor start with: [metrics], and the facts of
    the config a snapshot reports beside the live tree."""

    metrics: MetricsSettings
    #: [gateway].device_id: the device of the health readings.
    device_id: str
    #: [journal].disk_budget_bytes.
    disk_budget_bytes: int


@attrs.frozen
class HealthSensorSettings:
    """What ``sensor:health`` starts with: a sensor entry for its outbox (id `HEALTH_SENSOR_ID`,
    the gateway's device) and what it samples with."""

    sensor: SensorSettings
    sampling: SamplingSettings
