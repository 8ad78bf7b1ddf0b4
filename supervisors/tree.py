"""The gateway's supervision tree, built from its config as data (DESIGN.md "The shape").

    gateway (root, one_for_one)
    ├── journal        JournalWriter — the only writer of journal.db
    ├── broker         BrokerActor — the gateway's own mosquitto (only with [broker] enabled)
    ├── sensors        Supervisor(one_for_one)
    │     ├── sensor:<id>    SimSensor | MqttSensor | CanSensor | NmeaSensor (one per sensor)
    │     └── sensor:health  HealthSensor — the gateway's own health as readings (with
    │                        [metrics] enabled and health_interval_s > 0)
    ├── processing     Supervisor(one_for_one)
    │     ├── router   RouterActor — puts every record in a lane (policy engine)
    │     └── model    ModelRunnerActor — safety rules + OpenVINO inference of device windows
    ├── uplink         UplinkActor — syncs P1/P2/P3 to central (only with [uplink] url)
    └── metrics        MetricsActor — GET /metrics on loopback (only with [metrics] enabled)

The journal comes first: sensors and consumers need its address, and in an orderly stop
(reverse order) the router closes its windows and the sensors drain into the journal before it
closes; the uplink stops before them, and the metrics actor, last, stops first. one_for_one at
the root: when the journal restarts, sensors keep their unacknowledged batches and resend them
to its new address, and the uplink resends what it had in flight.
"""

from __future__ import annotations

import attrs

from config.metrics import HEALTH_SENSOR_ID, HealthSensorSettings, SamplingSettings
from config.schema import (
    GatewayConfig,
    SensorActorSettings,
    SensorSettings,
    UplinkActorSettings,
)
from supervisors.spec import ChildSpec, Restart, Strategy, SupervisorFlags, SupervisorSpec

SENSOR_CLASSES = {
    "sim": "actors.sensors.actor.SimSensor",
    "mqtt": "actors.sensors.actor.MqttSensor",
    "can": "actors.sensors.actor.CanSensor",
    "nmea": "actors.sensors.actor.NmeaSensor",
}
BROKER_CLASS = "actors.broker.actor.BrokerActor"
JOURNAL_CLASS = "actors.journal.actor.JournalWriter"
SUPERVISOR_CLASS = "supervisors.supervisor.Supervisor"
ROUTER_CLASS = "actors.router.actor.RouterActor"
MODEL_CLASS = "actors.model_runner.actor.ModelRunnerActor"
UPLINK_CLASS = "actors.uplink.actor.UplinkActor"
METRICS_CLASS = "actors.metrics.actor.MetricsActor"
HEALTH_CLASS = "actors.sensors.actor.HealthSensor"
#: Niceness of the journal consumers (router, model runner): they yield the CPU to sensors
#: and the journal (I6). The router catches up at 3x ingest, the model runner much faster.
CONSUMER_NICE = 10
#: The uplink yields to sensors and the journal too, but less: P1 goes out now.
UPLINK_NICE = 5


def sensor_name(sensor_id: str) -> str:
    return f"sensor:{sensor_id}"


def gateway_tree(config: GatewayConfig) -> SupervisorSpec:
    """The root supervisor's spec for ``config``."""
    sup = config.supervision

    def flags(strategy: Strategy) -> SupervisorFlags:
        return SupervisorFlags(
            strategy=strategy,
            intensity=sup.intensity,
            period_s=sup.period_s,
            backoff_initial_s=sup.backoff_initial_s,
            backoff_max_s=sup.backoff_max_s,
            backoff_reset_s=sup.backoff_reset_s,
            heartbeat_interval_s=sup.heartbeat_interval_s,
        )

    sensors = tuple(
        ChildSpec(
            name=sensor_name(s.id),
            actor_class=SENSOR_CLASSES[s.type],
            restart=Restart.PERMANENT,
            shutdown_timeout_s=max(5.0, s.resend_after_s * 2),
            heartbeat_timeout_s=sup.heartbeat_timeout_s,
            settings=SensorActorSettings(
                attrs.evolve(s, device_id=config.device_of(s)),
                config.mqtt_connection(s) if s.type == "mqtt" else None,
            ),
        )
        for s in config.sensors
    )
    metrics = config.metrics
    sampling = SamplingSettings(metrics, config.gateway.device_id,
                                config.journal.disk_budget_bytes)
    if metrics.enabled and metrics.health_interval_s > 0:
        # One reading a batch, sent at once; niced like the consumers: it only watches.
        health = SensorSettings(id=HEALTH_SENSOR_ID, device_id=config.gateway.device_id,
                                batch_max_readings=1, buffer_max_bytes=1 << 20)
        sensors += (ChildSpec(name=sensor_name(HEALTH_SENSOR_ID), actor_class=HEALTH_CLASS,
                              restart=Restart.PERMANENT,
                              shutdown_timeout_s=max(5.0, health.resend_after_s * 2),
                              heartbeat_timeout_s=sup.heartbeat_timeout_s,
                              settings=HealthSensorSettings(health, sampling),
                              nice=CONSUMER_NICE),)
    children = (
        ChildSpec(
            name="journal",
            actor_class=JOURNAL_CLASS,
            restart=Restart.PERMANENT,
            shutdown_timeout_s=10.0,
            heartbeat_timeout_s=config.journal.heartbeat_timeout_s,
            settings=config.journal,
        ),
    )
    if config.broker.enabled:
        # Before the sensors (MQTT sensors connect to it) and stopped after them.
        children += (ChildSpec(name="broker", actor_class=BROKER_CLASS,
                               restart=Restart.PERMANENT, shutdown_timeout_s=10.0,
                               heartbeat_timeout_s=sup.heartbeat_timeout_s,
                               settings=config.broker),)
    children += (
        ChildSpec(
            name="sensors",
            actor_class=SUPERVISOR_CLASS,
            restart=Restart.PERMANENT,
            # Children stop one after another, so their timeouts add up.
            shutdown_timeout_s=max(10.0, sum(c.shutdown_timeout_s for c in sensors) + 2.0),
            heartbeat_timeout_s=sup.heartbeat_timeout_s,
            settings=SupervisorSpec(flags(Strategy.ONE_FOR_ONE), sensors),
        ),
    )
    def consumer(name: str, actor_class: str, settings: object) -> ChildSpec:
        # A journal consumer may lag and catch up; acknowledgements must not (I6): it runs
        # niced, so sensors and the journal get the CPU first.
        return ChildSpec(name=name, actor_class=actor_class, restart=Restart.PERMANENT,
                         shutdown_timeout_s=10.0, heartbeat_timeout_s=sup.heartbeat_timeout_s,
                         settings=settings, nice=CONSUMER_NICE)

    processing = (consumer("router", ROUTER_CLASS, config.router),)
    if config.model.enabled:
        processing += (consumer("model", MODEL_CLASS, config.model),)
    children += (
        ChildSpec(
            name="processing",
            actor_class=SUPERVISOR_CLASS,
            restart=Restart.PERMANENT,
            shutdown_timeout_s=sum(c.shutdown_timeout_s for c in processing) + 2.0,
            heartbeat_timeout_s=sup.heartbeat_timeout_s,
            settings=SupervisorSpec(flags(Strategy.ONE_FOR_ONE), processing),
        ),
    )
    if config.uplink.enabled:
        uplink = config.uplink
        if not uplink.gateway_id:
            uplink = attrs.evolve(uplink, gateway_id=config.gateway.device_id)
        children += (ChildSpec(name="uplink", actor_class=UPLINK_CLASS,
                               restart=Restart.PERMANENT, shutdown_timeout_s=5.0,
                               heartbeat_timeout_s=sup.heartbeat_timeout_s,
                               settings=UplinkActorSettings(uplink, config.model),
                               nice=UPLINK_NICE),)
    if metrics.enabled:
        # Last: it watches everything else, and in an orderly stop it goes first.
        children += (ChildSpec(name="metrics", actor_class=METRICS_CLASS,
                               restart=Restart.PERMANENT, shutdown_timeout_s=5.0,
                               heartbeat_timeout_s=sup.heartbeat_timeout_s, settings=sampling,
                               nice=CONSUMER_NICE),)
    return SupervisorSpec(flags(Strategy.ONE_FOR_ONE), children)


def actor_names(config: GatewayConfig) -> tuple[str, ...]:
    """Every actor the tree of ``config`` has, supervisors and workers (the root excluded), in
    start order, depth first: what must run for the gateway to be whole (the test rig's
    readiness and `fleetgw health` compare the live tree with it)."""
    names: list[str] = []

    def visit(spec: SupervisorSpec) -> None:
        for child in spec.children:
            names.append(child.name)
            if isinstance(child.settings, SupervisorSpec):
                visit(child.settings)

    visit(gateway_tree(config))
    return tuple(names)
