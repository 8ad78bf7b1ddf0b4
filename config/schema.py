"""The gateway's configuration: frozen, documented classes with defaults as named constants.

Validation does no I/O (`config.loader` reads the TOML and reports errors with file and key).
Each field says what it means and what 0 or empty means.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from config.broker import BrokerSettings
from config.can import CanSourceSettings
from config.fields import (
    FieldProblem,
    _ident,
    _non_negative,
    _one_of,
    _port,
    _positive,
)
from config.metrics import HEALTH_SENSOR_ID, MetricsSettings
from config.mqtt import (
    MqttConnection,
    MqttSettings,
    MqttSourceSettings,
    default_client_id,
)
from config.nmea import NmeaSourceSettings

DEFAULT_ADMIN_PORT = 19001
DEFAULT_DISK_BUDGET_BYTES = 1 << 30  # 1 GiB
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0

SENSOR_KINDS = ("imu", "gps", "engine")
SENSOR_TYPES = ("sim", "mqtt", "can", "nmea")
SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
UPLINK_MODES = ("receiver", "direct")
SYNCED_LANES = ("P1", "P2", "P3")




@attrs.frozen
class GatewaySettings:
    """[gateway]: identity and process-level settings."""

    #: Default device id for sensors that do not set their own.
    device_id: str = attrs.field(default="veh-001", validator=_ident)
    #: Thespian admin port (loopback only). `fleetgw run --admin-port` overrides it.
    admin_port: int = attrs.field(default=DEFAULT_ADMIN_PORT, validator=_port)
    #: Seconds between one-line status prints of `fleetgw run`; 0 disables them.
    status_interval_s: float = attrs.field(default=5.0, validator=_non_negative)
    #: Log level of the gateway's structured log lines.
    log_level: str = attrs.field(
        default="info", validator=_one_of(("debug", "info", "warning", "error"))
    )
    #: Accept `InjectFault` messages (tests and drills only; never in the field).
    fault_injection: bool = False
    #: Seconds an orderly stop may take before the actor system is torn down anyway.
    stop_timeout_s: float = attrs.field(default=10.0, validator=_positive)


@attrs.frozen
class JournalSettings:
    """[journal]: the durable SQLite journal (DATA_DIR/journal.db)."""

    #: SQLite synchronous mode; FULL (default) makes every acknowledged commit survive power loss.
    synchronous: str = attrs.field(default="FULL", validator=_one_of(SYNCHRONOUS_MODES))
    #: Disk budget in bytes for the database and its WAL; when reached, appends are refused
    #: (sensors hold their data) until space is freed. Must be >= 1 MiB.
    disk_budget_bytes: int = attrs.field(default=DEFAULT_DISK_BUDGET_BYTES)
    #: Seconds a sensor waits before retrying a refused batch.
    refused_retry_s: float = attrs.field(default=1.0, validator=_positive)
    #: Heartbeat deadline for the journal (seconds without an answer before SIGKILL). A commit
    #: on a slow SD card can take a while: keep this generous.
    heartbeat_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    #: Inputs sources could not decode are kept in the journal's quarantine (raw bytes, source,
    #: reason, time) for operators: at most this many, the oldest go first (the per-sensor
    #: totals still count them). `fleetgw journal quarantine` lists them.
    quarantine_max_rows: int = attrs.field(default=10_000, validator=_positive)
    #: Encryption at rest: the key file (mode 0600; `fleetgw journal key new`) whose keys seal
    #: every reading's values in the journal, so a stolen SD card yields no telemetry. A
    #: relative path is under DATA_DIR. Created on first start if missing while nothing is
    #: sealed; a journal with sealed records refuses to start without its key. Empty: values
    #: stored in clear (a warning at start).
    key_file: str = attrs.field(default="")

    @key_file.validator
    def _check_key_file(self, attr: attrs.Attribute, value: str) -> None:
        if any(c in value for c in "\n\r\0"):
            raise FieldProblem("key_file", f"must not contain line breaks or NUL (got {value!r})")

    def key_path(self, data_dir: str) -> str:
        """The key file, resolved against ``data_dir`` ("" = no encryption). Environment
        variables are expanded, so a systemd credential works:
        ``key_file = "${CREDENTIALS_DIRECTORY}/journal.key"``. ValueError if one is unset."""
        if not self.key_file:
            return ""
        path = os.path.expandvars(os.path.expanduser(self.key_file))
        if "$" in path:
            raise ValueError(f"[journal] key_file {self.key_file!r}: an environment variable "
                             "in it is not set (systemd sets CREDENTIALS_DIRECTORY only with "
                             "LoadCredential=)")
        return os.path.join(data_dir, path)

    @disk_budget_bytes.validator
    def _check_budget(self, attr: attrs.Attribute, value: int) -> None:
        if value < 1 << 20:
            raise FieldProblem("disk_budget_bytes", f"must be >= 1048576 (1 MiB) (got {value!r})")


@attrs.frozen
class SupervisionSettings:
    """[supervision]: restart intensity, backoff and the heartbeat watchdog."""

    #: Max restarts of one supervisor's children within `period_s` before it escalates.
    intensity: int = attrs.field(default=10, validator=_positive)
    #: Window of the intensity count, seconds.
    period_s: float = attrs.field(default=30.0, validator=_positive)
    #: First restart delay of a child that crashes again soon after a restart, seconds.
    backoff_initial_s: float = attrs.field(default=0.1, validator=_positive)
    #: Upper bound of the restart delay, seconds.
    backoff_max_s: float = attrs.field(default=5.0, validator=_positive)
    #: A child that ran this long without crashing has its backoff reset, seconds.
    backoff_reset_s: float = attrs.field(default=10.0, validator=_positive)
    #: Seconds between heartbeats to each child.
    heartbeat_interval_s: float = attrs.field(
        default=DEFAULT_HEARTBEAT_INTERVAL_S, validator=_positive
    )
    #: Seconds without a heartbeat answer before a child is SIGKILLed and restarted.
    heartbeat_timeout_s: float = attrs.field(
        default=DEFAULT_HEARTBEAT_TIMEOUT_S, validator=_positive
    )


@attrs.frozen
class SensorSettings:
    """[[sensors]]: one sensor actor each."""

    #: Unique sensor id (the actor is named ``sensor:<id>``).
    id: str = attrs.field(validator=_ident)
    #: Source type: ``sim`` (seeded synthetic vehicle telemetry), ``mqtt`` (subscriptions on
    #: the [mqtt] broker; the ``mqtt`` table below), ``can`` (a CAN bus decoded with a DBC;
    #: the ``can`` table) or ``nmea`` (GPS over NMEA 0183; the ``nmea`` table).
    type: str = attrs.field(default="sim", validator=_one_of(SENSOR_TYPES))
    #: sim only: what the simulator produces: ``imu`` (ax..gz), ``gps`` (lat, lon, speed...),
    #: ``engine``.
    kind: str = attrs.field(default="imu", validator=_one_of(SENSOR_KINDS))
    #: sim only: readings per second.
    rate_hz: float = attrs.field(default=10.0, validator=_positive)
    #: Device id of the readings; empty means [gateway].device_id.
    device_id: str = attrs.field(default="")
    #: Seed of the simulator (same seed, same values).
    seed: int = 0
    #: A batch is sent when it holds this many readings ...
    batch_max_readings: int = attrs.field(default=500, validator=_positive)
    #: ... or when its oldest reading is this old, seconds.
    batch_max_age_s: float = attrs.field(default=0.2, validator=_positive)
    #: Bytes of unacknowledged batches held; when full the sensor holds its source
    #: (back-pressure) instead of dropping.
    buffer_max_bytes: int = attrs.field(default=8 << 20, validator=_positive)
    #: Batches sent but not acknowledged at once.
    max_in_flight: int = attrs.field(default=16, validator=_positive)
    #: Resend a batch not acknowledged after this many seconds.
    resend_after_s: float = attrs.field(default=3.0, validator=_positive)
    #: type = "mqtt": topic filters, their device/kind mapping and payload decoders.
    mqtt: MqttSourceSettings | None = None
    #: type = "can": the bus (interface, channel, bitrate), the DBC, filters and kinds.
    can: CanSourceSettings | None = None
    #: type = "nmea": where the NMEA 0183 stream comes from (serial, TCP or UDP) and which
    #: sentences count.
    nmea: NmeaSourceSettings | None = None

    def __attrs_post_init__(self) -> None:
        tables = {"mqtt": self.mqtt, "can": self.can, "nmea": self.nmea}
        for name, table in tables.items():
            if name == self.type and table is None:
                raise FieldProblem(name, f"is required for a sensor of type {name!r} "
                                         f"(a [sensors.{name}] table)")
            if name != self.type and table is not None:
                raise FieldProblem(name, f"is only for sensors of type {name!r} "
                                         f"(this one is {self.type!r})")

    @device_id.validator
    def _check_device(self, attr: attrs.Attribute, value: str) -> None:
        if value:
            _ident(self, attr, value)


@attrs.frozen
class SensorActorSettings:
    """What a sensor actor starts with: its ``[[sensors]]`` entry (device id filled in) and,
    for an MQTT sensor, its broker connection resolved from [mqtt] and [broker]."""

    sensor: SensorSettings
    mqtt: MqttConnection | None = None


@attrs.frozen
class RouterSettings:
    """[router]: the policy engine that puts every journaled record in a lane."""

    #: Policy TOML (see config/policy.example.toml); empty means that shipped example.
    policy: str = ""
    #: Records routed per journal commit at most.
    batch_records: int = attrs.field(default=2000, validator=_positive)
    #: Seconds between polls of the journal; also the shortest interval between two commits
    #: of less than a full batch (each commit is a durable transaction of the journal).
    poll_s: float = attrs.field(default=0.5, validator=_positive)

    @property
    def policy_path(self) -> str:
        if self.policy:
            return self.policy
        from config.policy import example_policy_path

        return str(example_policy_path())


@attrs.frozen
class ModelSettings:
    """[model]: the model runner (OpenVINO anomaly model + deterministic safety rules)."""

    #: Run the model runner at all (false: no inference, no rule events).
    enabled: bool = True
    #: Registry of installed models; empty means DATA_DIR/models.
    registry: str = ""
    #: Directory of trusted model-signing public keys (*.pub); empty means the shipped
    #: models/trusted_keys.
    trusted_keys: str = ""
    #: Model installed and activated at start when the registry has no active model; empty
    #: means the shipped model (models/DEFAULT names it), "none" means start without one
    #: (windows then get inference-error records until `fleetgw model activate`).
    bundled: str = ""
    #: Records read per journal commit at most.
    batch_records: int = attrs.field(default=2000, validator=_positive)
    #: Seconds between polls of the journal (and the shortest interval between two commits of
    #: less than a full batch).
    poll_s: float = attrs.field(default=0.5, validator=_positive)
    #: Seconds of record time a device window waits for late readings beyond its end.
    grace_s: float = attrs.field(default=2.0, validator=_non_negative)
    #: At most one safety event per device and type (a rule or a model label) within this
    #: many seconds of record time; 0 means one per rule hit and per anomalous window.
    event_debounce_s: float = attrs.field(default=10.0, validator=_non_negative)
    #: Seconds between looks at the registry for a newly activated model.
    check_s: float = attrs.field(default=2.0, validator=_positive)


@attrs.frozen
class LinkClassSettings:
    """[[uplink.links]]: a kind of link the gateway may be on (wifi, cellular, satellite)."""

    #: The class's name (``[uplink] link`` or the ``link_file`` names the current one).
    name: str = attrs.field(validator=_ident)
    #: Bytes/s P2 and P3 may use on this link; 0 means unlimited.
    rate_bytes_s: float = attrs.field(default=0.0, validator=_non_negative)
    #: Bytes the budget may save up (a burst); a batch larger than this goes when the bucket
    #: is full and leaves it in debt.
    burst_bytes: float = attrs.field(default=1 << 20, validator=_positive)
    #: A metered link carries only the lanes in ``[uplink] metered_lanes`` (P1 always).
    metered: bool = False


def _lanes(inst: Any, attr: attrs.Attribute, value: tuple[str, ...]) -> None:
    for lane in value:
        if lane not in SYNCED_LANES:
            raise FieldProblem(attr.name, f"must name lanes from {', '.join(SYNCED_LANES)} "
                                          f"(got {lane!r})")


def _window(inst: Any, attr: attrs.Attribute, value: tuple[str, ...]) -> None:
    from actors.uplink.link import parse_window

    for text in value:
        try:
            parse_window(text)
        except ValueError as exc:
            raise FieldProblem(attr.name, f"must hold HH:MM-HH:MM windows: {exc}") from None


@attrs.frozen
class UplinkSettings:
    """[uplink]: delayed sync of the P1/P2/P3 lanes to central (no ``url``: no uplink; the
    journal keeps everything, within its disk budget)."""

    #: ``receiver``: signed batches to a fleetgw receiver (`fleetgw central serve`);
    #: ``direct``: INSERTs straight into a ClickHouse server's HTTP interface.
    mode: str = attrs.field(default="receiver", validator=_one_of(UPLINK_MODES))
    #: The receiver's (or ClickHouse's) base URL, e.g. ``https://central.example:18443``.
    #: Empty: no uplink runs.
    url: str = ""
    #: The gateway's id in central's audit columns; empty means [gateway].device_id.
    gateway_id: str = attrs.field(default="")
    #: Directory of device signing keys ``<device_id>.key`` (`fleetgw provision device`);
    #: empty means DATA_DIR/keys.
    keys_dir: str = ""
    #: mTLS: the gateway's client certificate and key, and the CA that signed the receiver's
    #: certificate (PEM files; all three or none).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    #: direct mode: the ClickHouse database, user, and the NAME of the environment variable
    #: holding the password (never the password itself: config files get copied around).
    database: str = "fleetgw"
    user: str = "default"
    password_env: str = ""
    #: The link class in use (one of ``links``) ...
    link: str = "default"
    #: ... or a file whose first line names it (written by the network manager's hook);
    #: read before every send, so a link change takes effect at once. Empty: ``link`` only.
    link_file: str = ""
    #: The link classes; the default is one unmetered, unlimited class named "default".
    links: tuple[LinkClassSettings, ...] = (LinkClassSettings("default"),)
    #: Lanes a metered link carries (P1 always).
    metered_lanes: tuple[str, ...] = attrs.field(default=("P1",), validator=_lanes)
    #: P1's own reserved budget, bytes/s and burst (P1 never waits behind P2/P3 bytes).
    p1_rate_bytes_s: float = attrs.field(default=64 << 10, validator=_non_negative)
    p1_burst_bytes: float = attrs.field(default=1 << 20, validator=_positive)
    #: Daily UTC windows when P2 and P3 may sync, e.g. ["22:00-06:00"]; empty: always.
    windows: tuple[str, ...] = attrs.field(default=(), validator=_window)
    #: Backoff after a failed send: decorrelated jitter between these, seconds.
    backoff_base_s: float = attrs.field(default=1.0, validator=_positive)
    backoff_cap_s: float = attrs.field(default=300.0, validator=_positive)
    #: Records per batch at most, and about this many uncompressed wire bytes.
    max_records: int = attrs.field(default=5000, validator=_positive)
    max_raw_bytes: int = attrs.field(default=8 << 20, validator=_positive)
    #: Seconds a P2 / P3 backlog short of a full batch waits for more records before it is
    #: sent (fewer, larger batches: less overhead per record); P1 never waits.
    p2_linger_s: float = attrs.field(default=2.0, validator=_non_negative)
    p3_linger_s: float = attrs.field(default=10.0, validator=_non_negative)
    #: pycurl timeouts, seconds.
    connect_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    total_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    #: Seconds between looks at the journal when nothing woke the uplink.
    poll_s: float = attrs.field(default=1.0, validator=_positive)
    #: Fetch newer signed models from the receiver (receiver mode), every ``model_check_s``.
    model_updates: bool = True
    model_check_s: float = attrs.field(default=3600.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise FieldProblem("url", f"must be an http:// or https:// URL (got {self.url!r})")
        tls = {"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_ca": self.tls_ca}
        if (self.tls_cert or self.tls_key) and not (self.tls_cert and self.tls_key):
            missing = ", ".join(k for k in ("tls_cert", "tls_key") if not tls[k])
            raise FieldProblem(missing, "must be set too: a client certificate needs its key")
        if self.mode == "receiver" and any(tls.values()) and not all(tls.values()):
            missing = ", ".join(k for k, v in tls.items() if not v)
            raise FieldProblem(missing, "must be set too: the receiver's HTTPS needs the "
                                        "client certificate, its key and the CA (mTLS)")
        names = [c.name for c in self.links]
        if len(set(names)) != len(names):
            raise FieldProblem("links", f"names must be unique (got {names})")
        if not self.link_file and self.link not in names:
            raise FieldProblem("link", f"must name one of links ({', '.join(names)}) "
                                       f"(got {self.link!r})")
        if self.backoff_cap_s < self.backoff_base_s:
            raise FieldProblem("backoff_cap_s", f"must be >= backoff_base_s "
                                                f"({self.backoff_base_s})")

    @gateway_id.validator
    def _check_gateway(self, attr: attrs.Attribute, value: str) -> None:
        if value:
            _ident(self, attr, value)

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@attrs.frozen
class UplinkActorSettings:
    """What the uplink actor starts with: its section, and the model section (where model
    updates over the air are installed, and which keys they must be signed by)."""

    uplink: UplinkSettings
    model: ModelSettings


@attrs.frozen
class GatewayConfig:
    """The whole gateway configuration (one TOML file)."""

    gateway: GatewaySettings = GatewaySettings()
    journal: JournalSettings = JournalSettings()
    supervision: SupervisionSettings = SupervisionSettings()
    router: RouterSettings = RouterSettings()
    model: ModelSettings = ModelSettings()
    uplink: UplinkSettings = UplinkSettings()
    sensors: tuple[SensorSettings, ...] = attrs.field(default=())
    #: The MQTT broker of ``type = "mqtt"`` sensors (see [broker] for running one locally).
    mqtt: MqttSettings = MqttSettings()
    #: A local MQTT broker (mosquitto) the gateway runs and supervises; off by default.
    broker: BrokerSettings = BrokerSettings()
    #: The Prometheus endpoint (loopback) and the gateway's health readings; on by default.
    metrics: MetricsSettings = MetricsSettings()

    @sensors.validator
    def _unique_sensors(self, attr: attrs.Attribute, value: tuple[SensorSettings, ...]) -> None:
        seen: set[str] = set()
        for s in value:
            if s.id in seen:
                raise FieldProblem("sensors", f"ids must be unique (got {s.id!r} twice)")
            seen.add(s.id)

    def __attrs_post_init__(self) -> None:
        if (self.metrics.enabled and self.metrics.health_interval_s > 0
                and any(s.id == HEALTH_SENSOR_ID for s in self.sensors)):
            raise FieldProblem("sensors", f"id {HEALTH_SENSOR_ID!r} is the gateway's own health "
                                          f"sensor's (sensor:{HEALTH_SENSOR_ID}); rename this "
                                          f"sensor, or set [metrics] health_interval_s = 0")

    def device_of(self, sensor: SensorSettings) -> str:
        """The device id a sensor's readings carry."""
        return sensor.device_id or self.gateway.device_id

    def mqtt_connection(self, sensor: SensorSettings) -> MqttConnection:
        """An MQTT sensor's connection: [mqtt], pointed at the local broker when [broker] runs
        one, and its client id."""
        assert sensor.mqtt is not None
        broker = self.mqtt
        if self.broker.enabled:
            host = self.broker.listen_address
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1"
            broker = attrs.evolve(broker, host=host, port=self.broker.port)
        client_id = sensor.mqtt.client_id or default_client_id(self.device_of(sensor), sensor.id)
        return MqttConnection(broker, sensor.mqtt, client_id)


