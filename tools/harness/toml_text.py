"""TOML text from Python values: the configs the harness and the tests write.

Where this sits: beside the harness. A gateway config is a dict of sections (tables) plus the
``sensors`` array of tables; `dumps` writes it back as TOML that `config.loader` reads. Nested
dicts inside a section or a sensor become inline tables.
"""

from __future__ import annotations

import json
from typing import Any


def toml_value(value: Any) -> str:
    """``value`` as TOML (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float) and value != value:
        raise ValueError("TOML config values cannot be NaN")
    return json.dumps(value)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def config_text(sensors: list[dict], **sections: dict) -> str:
    """A gateway config: ``[section]`` tables, then one ``[[sensors]]`` table per sensor."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{_key(k)} = {toml_value(v)}" for k, v in values.items()]
    for sensor in sensors:
        lines.append("[[sensors]]")
        lines += [f"{_key(k)} = {toml_value(v)}" for k, v in sensor.items()]
    return "\n".join(lines) + "\n"


def dumps(config: dict[str, Any]) -> str:
    """A whole parsed config (as `tomllib` returns it) written back as TOML."""
    sections = {k: v for k, v in config.items() if k != "sensors"}
    bad = [k for k, v in sections.items() if not isinstance(v, dict)]
    if bad:
        raise ValueError(f"top-level keys must be tables ([section]); not: {', '.join(bad)}")
    return config_text(list(config.get("sensors", [])), **sections)
