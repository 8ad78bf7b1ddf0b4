"""Reading a drill: the file structured and then checked against the gateway it names.

Where this sits: the first step of `fleetgw drill run`. `load_drill` reads the TOML, structures
each section (`spec`), reads the gateway config (a path relative to the drill, an inline
table, or the demo default) and checks every fault, the load and the invariants against that
gateway's tree and sensors, listing every problem it finds (`DrillError`). The `Drill` it
returns is all the runner needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from config.loader import ConfigError, default_config_path, parse_config, read_toml
from config.schema import GatewayConfig
from supervisors.spec import SupervisorSpec
from supervisors.tree import gateway_tree
from tools.drill.spec import (
    RANDOM,
    ROOT_ACTOR,
    DrillError,
    DrillFile,
    FaultSection,
)
from tools.drill.timeline import Step, expand


@attrs.frozen
class Drill:
    """A drill ready to run: the file's sections plus the gateway config they refer to."""

    path: str
    file: DrillFile
    #: The gateway config as decoded TOML (what the `Rig` is given) and as parsed.
    gateway_config: dict[str, Any]
    parsed: GatewayConfig
    #: Actor names of the gateway's tree (the root first).
    actors: tuple[str, ...]
    #: The load's topic (resolved from the sensor's filter when the file gives none).
    load_topic: str = ""

    @property
    def name(self) -> str:
        return self.file.drill.name

    def duration_s(self, short: bool) -> float:
        settings = self.file.drill
        if short and settings.short_duration_s is not None:
            return settings.short_duration_s
        return settings.duration_s

    def sensor_type(self, sensor_id: str) -> str:
        return next((s.type for s in self.parsed.sensors if s.id == sensor_id), "?")

    def timeline(self, short: bool) -> list[Step]:
        return expand(self.file.faults, self.duration_s(short), self.file.drill.seed)


def actor_names(parsed: GatewayConfig, receiver: bool) -> tuple[str, ...]:
    """Names of the actors of ``parsed``'s tree (the root first; the uplink when a receiver
    is there to sync to or the config has an uplink url)."""
    names = [ROOT_ACTOR]

    def visit(spec: SupervisorSpec) -> None:
        for child in spec.children:
            names.append(child.name)
            if child.is_supervisor:
                visit(child.settings)

    visit(gateway_tree(parsed))
    if receiver and "uplink" not in names:
        names.append("uplink")
    return tuple(names)


def floodable(sensor: dict[str, Any], parsed: GatewayConfig) -> str | None:
    """Why the rig cannot flood ``sensor`` (a raw [[sensors]] table), or None if it can."""
    kind = sensor.get("type", "sim")
    if kind == "mqtt":
        return None if parsed.broker.enabled else \
            "its broker is not the gateway's own: set [broker] enabled = true in the config"
    if kind == "nmea":
        source = sensor.get("nmea", {}).get("source", "udp://127.0.0.1:10110")
        return None if source.startswith("udp://") else \
            f"floods go to UDP NMEA sources; its source is {source}"
    if kind == "can":
        can = sensor.get("can", {})
        if can.get("interface") != "udp_multicast":
            return f"floods go to CAN over udp_multicast; its interface is {can.get('interface')}"
        if not can.get("channel") or not can.get("port"):
            return "a flood needs its multicast group and port: set can.channel and can.port"
        return None
    return f"a {kind} sensor has no input to flood"


def topic_matches(topic: str, topic_filter: str) -> bool:
    from paho.mqtt.client import topic_matches_sub

    return topic_matches_sub(topic_filter, topic)


def _structure(data: dict[str, Any], path: str) -> DrillFile:
    from config.loader import structure_strict

    data = dict(data)
    for i, fault in enumerate(data.get("faults") or []):
        if isinstance(fault, dict) and isinstance(fault.get("target"), str):
            data["faults"] = list(data["faults"])
            data["faults"][i] = {**fault, "target": [fault["target"]]}
    try:
        return structure_strict(data, DrillFile, path)
    except ConfigError as exc:
        raise DrillError(path, exc.problems) from None


def _gateway_config(raw: Any, drill_path: Path) -> tuple[dict[str, Any], str]:
    """The gateway config (decoded TOML) and where it came from."""
    if raw is None:
        where = str(default_config_path())
        return read_toml(where, lambda p, problems: DrillError(
            str(drill_path), [f"gateway.config: {where}: {'; '.join(problems)}"])), where
    if isinstance(raw, dict):
        return raw, "gateway.config"
    if not isinstance(raw, str) or not raw:
        raise DrillError(str(drill_path), [
            f"gateway.config: must be a path to a gateway TOML or a [gateway.config] table "
            f"(got {raw!r})"])
    where = str((drill_path.parent / raw).resolve())
    return read_toml(where, lambda p, problems: DrillError(
        str(drill_path), [f"gateway.config: {where}: {'; '.join(problems)}"])), where


def load_drill(path: str | Path) -> Drill:
    """Read and check the drill at ``path``: every section, the gateway config it names, and
    every fault against that gateway. Raises `DrillError` listing every problem found."""
    path = Path(path)
    text = str(path)
    data = read_toml(text, DrillError)
    raw_gateway = data.get("gateway")
    gateway_raw = raw_gateway.get("config") if isinstance(raw_gateway, dict) else None
    if isinstance(raw_gateway, dict):
        data["gateway"] = {k: v for k, v in raw_gateway.items() if k != "config"}
    spec = _structure(data, text)
    config, where = _gateway_config(gateway_raw, path)
    try:
        parsed = parse_config(config, where)
    except ConfigError as exc:
        inline = isinstance(gateway_raw, dict)
        prefix = "gateway.config." if inline else f"gateway.config: {where}: "
        raise DrillError(text, [prefix + p for p in exc.problems]) from None
    actors = actor_names(parsed, spec.gateway.receiver)
    sensors = {s.get("id"): s for s in config.get("sensors", []) if isinstance(s, dict)}
    problems: list[str] = []
    topic = _check_load(spec, parsed, sensors, problems)
    for i, fault in enumerate(spec.faults):
        problems += [f"faults[{i}].{p}" for p in _fault_problems(fault, spec, parsed, actors,
                                                                 sensors)]
    problems += _invariant_problems(spec)
    if problems:
        raise DrillError(text, problems)
    return Drill(text, spec, config, parsed, actors, topic)


def _check_load(spec: DrillFile, parsed: GatewayConfig, sensors: dict[str, dict],
                problems: list[str]) -> str:
    """The load's topic; problems of [load] appended to ``problems``."""
    load = spec.load
    if load is None:
        return ""
    sensor = sensors.get(load.sensor)
    if sensor is None:
        problems.append(f"load.sensor: no sensor {load.sensor!r} in the gateway config (it has: "
                        f"{', '.join(sensors) or 'none'})")
        return ""
    if sensor.get("type") != "mqtt":
        problems.append(f"load.sensor: {load.sensor} is a {sensor.get('type', 'sim')} sensor; "
                        "the load publishes to an MQTT sensor")
        return ""
    if not parsed.broker.enabled:
        problems.append("load.sensor: the load publishes to the gateway's own broker: set "
                        "[broker] enabled = true in the gateway config")
        return ""
    from tools.harness.rig import topic_for

    sensor_settings = next(s for s in parsed.sensors if s.id == load.sensor)
    filters = [t.filter for t in sensor_settings.mqtt.topics]
    topic = load.topic or topic_for(filters[0])
    if not any(topic_matches(topic, f) for f in filters):
        problems.append(f"load.topic: {topic!r} matches none of sensor {load.sensor}'s topic "
                        f"filters ({', '.join(filters)})")
    return topic


def _fault_problems(fault: FaultSection, spec: DrillFile, parsed: GatewayConfig,
                    actors: tuple[str, ...], sensors: dict[str, dict]) -> list[str]:
    """What is wrong with ``fault`` in this gateway (keys relative to the fault)."""
    problems = []
    duration = spec.drill.duration_s
    if fault.at_s >= duration:
        problems.append(f"at_s: must be < drill.duration_s ({duration:g}; got {fault.at_s:g})")
    if fault.kind == "flood":
        for target in fault.targets:
            sensor_id = target.removeprefix("sensor:")
            if sensor_id not in sensors:
                problems.append(f"target: no sensor {sensor_id!r} in the gateway config (it "
                                f"has: {', '.join(sensors) or 'none'})")
            elif (why := floodable(sensors[sensor_id], parsed)) is not None:
                problems.append(f"target: sensor {sensor_id} cannot be flooded: {why}")
    else:
        for target in fault.targets:
            if target == ROOT_ACTOR:
                problems.append(f"target: {ROOT_ACTOR} is the root: its death is the whole "
                                "gateway's (use kind = \"power_cut\")")
            elif target != RANDOM and target not in actors:
                problems.append(f"target: no actor {target!r} in this gateway's tree (it has: "
                                f"{', '.join(a for a in actors if a != ROOT_ACTOR)}; or "
                                f"\"{RANDOM}\")")
    gateway = spec.gateway
    if fault.kind == "link" and not gateway.receiver:
        problems.append("kind: a link fault needs the receiver (gateway.receiver = true)")
    if fault.kind == "disk_full" and gateway.disk_mb is None:
        problems.append("kind: disk_full needs the data dir on a small disk (gateway.disk_mb)")
    if fault.kind == "clock_jump" and not gateway.clock:
        problems.append("kind: clock_jump needs a controllable clock (gateway.clock = true)")
    if fault.kind == "corrupt_model" and not parsed.model.enabled:
        problems.append("kind: corrupt_model needs the model runner ([model] enabled = true "
                        "in the gateway config)")
    return problems


def _invariant_problems(spec: DrillFile) -> list[str]:
    check = spec.invariants.check
    problems = []
    if "I5" in check and not spec.gateway.receiver:
        problems.append("invariants.check: I5 compares the journal with central: it needs the "
                        "receiver (gateway.receiver = true)")
    if "I8" in check and not any(f.kind == "flood" for f in spec.faults):
        problems.append("invariants.check: I8 is about malformed input: add a fault of kind "
                        "flood")
    return problems
