"""MQTT settings: the broker connection ([mqtt]) and what an MQTT sensor subscribes to.

Where this sits: config for step 1 of the data path. Every sensor of ``type = "mqtt"`` is one
actor with one MQTT session (its own client id, a persistent session, QoS 1 with the PUBACK
sent only after the journal committed the message). ``[mqtt]`` says where the broker is and how
to log in; each sensor's ``[sensors.mqtt]`` lists its topic filters, and for each one the device
and kind its readings carry and the payload decoder. Validation does no I/O.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from config.decoders import DecoderSettings
from config.fields import FieldProblem, _ident, _non_negative, _positive

MQTT_PROTOCOLS = ("3.1.1", "5")
#: ``{N}`` in a topic rule's device or kind: level N (1-based) of the message's topic.
LEVEL_REF = re.compile(r"\{(\d+)\}")
#: MQTT client ids: printable, no spaces (brokers accept up to 65535 bytes; 3.1.1 promises 23).
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def check_topic_filter(value: str) -> str | None:
    """Why ``value`` is not a valid MQTT topic filter, or None (MQTT 3.1.1 §4.7)."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty MQTT topic filter"
    if len(value.encode()) > 65535 or "\x00" in value:
        return "must be at most 65535 bytes without NUL"
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "may use '#' only as the whole last level (e.g. 'fleet/#')"
        if "+" in level and level != "+":
            return "may use '+' only as a whole level (e.g. 'fleet/+/imu')"
    if value.startswith("$share/"):
        return "must not be a shared subscription ($share/...): each sensor owns its session"
    return None


def _topic_filter(inst: Any, attr: attrs.Attribute, value: str) -> None:
    problem = check_topic_filter(value)
    if problem is not None:
        raise FieldProblem(attr.name, f"{problem} (got {value!r})")


def _template(inst: Any, attr: attrs.Attribute, value: str) -> None:
    """A device/kind template: an identifier, possibly with {N} level references."""
    if not value:
        return
    plain = LEVEL_REF.sub("x", value)
    if "{" in plain or "}" in plain:
        raise FieldProblem(attr.name, "may use braces only as {N}, a topic level number "
                                      f"(got {value!r})")
    if any(int(n) < 1 for n in LEVEL_REF.findall(value)):
        raise FieldProblem(attr.name, f"level numbers in {{N}} start at 1 (got {value!r})")
    _ident(inst, attr, plain)


@attrs.frozen
class MqttTopicSettings:
    """[[sensors.mqtt.topics]]: one topic filter, and what its messages become."""

    #: MQTT topic filter, wildcards allowed: ``+`` one level, ``#`` the rest (last level).
    filter: str = attrs.field(validator=_topic_filter)
    #: Device id of the readings: an identifier, ``{N}`` = level N of the topic (e.g.
    #: ``"{2}"`` for ``fleet/veh-7/imu``), or empty = the sensor's device (or the decoder's
    #: device field, when it has one).
    device: str = attrs.field(default="", validator=_template)
    #: Kind of the readings (e.g. ``"engine"``), with ``{N}`` references like ``device``.
    kind: str = attrs.field(default="mqtt", validator=_template)
    #: Subscription QoS: 1 (default: at least once, acknowledged after the journal commit;
    #: with the redelivery marks, exactly once into the journal) or 0 (at most once: a message
    #: in flight when the gateway dies is lost). QoS 2 is not offered: QoS 1 plus the marks
    #: gives the same journal effect with half the round trips.
    qos: int = attrs.field(default=1)
    #: How payloads are decoded (JSON by default; or a fixed binary layout).
    decoder: DecoderSettings = attrs.field(factory=DecoderSettings)

    @qos.validator
    def _check_qos(self, attr: attrs.Attribute, value: int) -> None:
        if value not in (0, 1):
            raise FieldProblem("qos", f"must be 0 or 1 (got {value!r}); QoS 1 with the "
                                      "journal's redelivery marks already journals each "
                                      "message exactly once")


@attrs.frozen
class MqttSourceSettings:
    """[sensors.mqtt]: what one MQTT sensor subscribes to."""

    #: Topic filters and their mapping (at least one). A message matching several filters is
    #: handled by the first that matches.
    topics: tuple[MqttTopicSettings, ...] = attrs.field()
    #: MQTT client id of this sensor's persistent session; empty = ``fleetgw-<device>-<id>``.
    #: Must stay the same across restarts: the broker keeps the session's messages under it.
    client_id: str = attrs.field(default="")

    @topics.validator
    def _check_topics(self, attr: attrs.Attribute, value: tuple) -> None:
        if not value:
            raise FieldProblem("topics", "must list at least one topic filter")
        filters = [t.filter for t in value]
        if len(set(filters)) != len(filters):
            raise FieldProblem("topics", f"filters must be unique (got {filters})")

    @client_id.validator
    def _check_client_id(self, attr: attrs.Attribute, value: str) -> None:
        if value and not CLIENT_ID_RE.match(value):
            raise FieldProblem("client_id", "must be 1-128 characters from [A-Za-z0-9_.:-] "
                                            f"(got {value!r})")


@attrs.frozen
class MqttSettings:
    """[mqtt]: the broker every MQTT sensor connects to. With ``[broker] enabled`` the gateway
    runs the broker itself and its sensors connect to that one (``host``/``port`` here are
    then not used)."""

    #: Broker host name or address.
    host: str = "127.0.0.1"
    #: Broker port (1883 plain, 8883 usually with TLS).
    port: int = attrs.field(default=1883)
    #: MQTT protocol version: "5" (default) or "3.1.1".
    protocol: str = attrs.field(default="5")
    #: User name; empty = none.
    username: str = ""
    #: Name of the environment variable holding the password (never the password itself: a
    #: config file is not a secret store). Empty = no password.
    password_env: str = ""
    #: TLS: CA bundle to verify the broker with; set it to use TLS. ``tls_cert``/``tls_key``:
    #: a client certificate and its key (both or neither).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    #: Seconds between keepalive pings; the broker drops the session's connection after 1.5x
    #: this without traffic.
    keepalive_s: int = attrs.field(default=30, validator=_positive)
    #: MQTT 5: seconds the broker keeps the session (and queues QoS 1 messages for it) while
    #: the sensor is disconnected. MQTT 3.1.1 sessions persist until the broker forgets them.
    session_expiry_s: int = attrs.field(default=7 * 24 * 3600, validator=_non_negative)
    #: Seconds a connection attempt may take: the TCP connect and TLS handshake, and then
    #: again the broker's CONNACK.
    connect_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    #: Reconnect backoff: the first wait, doubling (with jitter) up to the cap, seconds.
    reconnect_min_s: float = attrs.field(default=0.2, validator=_positive)
    reconnect_max_s: float = attrs.field(default=30.0, validator=_positive)

    @port.validator
    def _check_port(self, attr: attrs.Attribute, value: int) -> None:
        if not 1 <= value <= 65535:
            raise FieldProblem("port", f"must be a TCP port in 1..65535 (got {value!r})")

    @protocol.validator
    def _check_protocol(self, attr: attrs.Attribute, value: str) -> None:
        if value not in MQTT_PROTOCOLS:
            raise FieldProblem("protocol", f"must be one of {', '.join(MQTT_PROTOCOLS)} "
                                           f"(got {value!r})")

    def __attrs_post_init__(self) -> None:
        if not self.host:
            raise FieldProblem("host", "must name the broker (e.g. \"127.0.0.1\")")
        if (self.tls_cert or self.tls_key) and not (self.tls_cert and self.tls_key):
            missing = "tls_key" if self.tls_cert else "tls_cert"
            raise FieldProblem(missing, "must be set too: a client certificate needs its key")
        if self.tls_cert and not self.tls_ca:
            raise FieldProblem("tls_ca", "must be set to use TLS (the CA that signed the "
                                         "broker's certificate)")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise FieldProblem("reconnect_max_s", f"must be >= reconnect_min_s "
                                                  f"({self.reconnect_min_s})")
        if self.password_env and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.password_env):
            raise FieldProblem("password_env", "must be an environment variable name "
                                               f"(got {self.password_env!r})")


@attrs.frozen
class MqttConnection:
    """What one MQTT sensor actor gets: its broker connection and its subscriptions."""

    broker: MqttSettings
    source: MqttSourceSettings
    client_id: str


def default_client_id(device_id: str, sensor_id: str) -> str:
    """``fleetgw-<device>-<sensor>`` with only the characters client ids may hold."""
    return re.sub(r"[^A-Za-z0-9_.:\-]", "-", f"fleetgw-{device_id}-{sensor_id}")[:128]
