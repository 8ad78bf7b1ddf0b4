"""[metrics] in the gateway config: documented defaults (loopback, port 9477), strict checks
with errors naming the key, and the health sensor's reserved id."""

from __future__ import annotations

import pytest

from config.loader import ConfigError, parse_config
from config.metrics import DEFAULT_METRICS_PORT, MetricsSettings


def test_the_defaults_listen_on_loopback_and_journal_health_every_30_s() -> None:
    metrics = parse_config({}).metrics
    assert metrics == MetricsSettings()
    assert (metrics.enabled, metrics.listen_address, metrics.port) == (True, "127.0.0.1", 9477)
    assert DEFAULT_METRICS_PORT == 9477 and metrics.loopback
    assert (metrics.refresh_s, metrics.health_interval_s, metrics.cpu_temp_path) == (2.0, 30.0,
                                                                                     "")


def test_another_address_is_allowed_only_when_configured() -> None:
    metrics = parse_config({"metrics": {"listen_address": "0.0.0.0", "port": 9100}}).metrics
    assert not metrics.loopback and metrics.port == 9100
    assert parse_config({"metrics": {"listen_address": "::1"}}).metrics.loopback


@pytest.mark.parametrize(("section", "problem"), [
    ({"port": 80}, "metrics.port: must be a TCP port in 1024..65535 (got 80)"),
    ({"listen_address": "localhost"},
     "metrics.listen_address: must be an IP address such as 127.0.0.1 or ::1 (got 'localhost')"),
    ({"refresh_s": 0}, "metrics.refresh_s: must be > 0 (got 0.0)"),
    ({"health_interval_s": -1}, "metrics.health_interval_s: must be >= 0 (got -1.0)"),
    ({"cpu_temp_path": "a\nb"}, "metrics.cpu_temp_path: must be a path on one line"),
    ({"scrape": True}, "metrics: unknown key(s) scrape"),
])
def test_a_bad_value_is_named_with_its_key(section: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"metrics": section}, "gw.toml")
    assert f"gw.toml: {problem}" in str(caught.value)


def test_the_health_sensors_id_is_reserved_while_it_runs() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"sensors": [{"id": "health"}]}, "gw.toml")
    assert "sensors: id 'health' is the gateway's own health sensor's" in str(caught.value)
    assert "health_interval_s = 0" in str(caught.value)
    config = parse_config({"sensors": [{"id": "health"}], "metrics": {"health_interval_s": 0}})
    assert config.sensors[0].id == "health"
