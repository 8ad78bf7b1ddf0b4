"""The metrics actor and the health sensor in the supervision tree, as [metrics] says: the
metrics actor last under the root (stopped first), niced; sensor:health last of the sensors."""

from __future__ import annotations

from config.loader import load_config, parse_config
from config.metrics import HealthSensorSettings, SamplingSettings
from supervisors.spec import Restart, validate
from supervisors.tree import CONSUMER_NICE, gateway_tree

SENSORS = [{"id": "imu0"}, {"id": "gps0", "kind": "gps"}]


def test_the_demo_tree_has_the_metrics_actor_last_and_the_health_sensor() -> None:
    config = load_config("config/demo.toml")
    tree = gateway_tree(config)
    assert validate(tree) == []
    assert [c.name for c in tree.children][-1] == "metrics"
    metrics = tree.child("metrics")
    assert (metrics.actor_class, metrics.restart, metrics.nice) == (
        "actors.metrics.actor.MetricsActor", Restart.PERMANENT, CONSUMER_NICE)
    assert metrics.settings == SamplingSettings(config.metrics, "veh-001",
                                                config.journal.disk_budget_bytes)
    health = tree.child("sensors").settings.children[-1]
    assert (health.name, health.actor_class, health.nice) == (
        "sensor:health", "actors.sensors.actor.HealthSensor", CONSUMER_NICE)
    assert isinstance(health.settings, HealthSensorSettings)
    assert (health.settings.sensor.id, health.settings.sensor.device_id) == ("health", "veh-001")
    assert health.settings.sampling == metrics.settings


def test_health_interval_zero_keeps_the_endpoint_without_the_health_sensor() -> None:
    tree = gateway_tree(parse_config({"sensors": SENSORS, "metrics": {"health_interval_s": 0}}))
    assert "metrics" in [c.name for c in tree.children]
    assert [c.name for c in tree.child("sensors").settings.children] == ["sensor:imu0",
                                                                         "sensor:gps0"]


def test_metrics_off_means_neither() -> None:
    tree = gateway_tree(parse_config({"sensors": SENSORS, "metrics": {"enabled": False}}))
    assert "metrics" not in [c.name for c in tree.children]
    assert len(tree.child("sensors").settings.children) == 2
    assert validate(tree) == []
