"""MQTT source logic without a broker: topic matching and mapping, the redelivery marks, bad
input into quarantine, config validation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.sensors.mqtt import Delivery, MqttMessages, Receipt, TopicRule, fingerprint
from config.loader import ConfigError, parse_config
from config.mqtt import MqttSourceSettings, MqttTopicSettings, check_topic_filter
from config.schema import FieldProblem

NOW = 1_800_000_000 * 10**9


def rule(filter_: str, **kw) -> TopicRule:
    return TopicRule(MqttTopicSettings(filter=filter_, **kw))


def delivery(topic: str | bytes, payload: bytes, mid: int = 1, dup: bool = False,
             qos: int = 1, session: int = 1) -> Delivery:
    topic = topic.encode() if isinstance(topic, str) else topic
    return Delivery(mid, qos, dup, False, topic, payload, NOW, session)


def messages(*topics: MqttTopicSettings, marks=None) -> MqttMessages:
    source = MqttSourceSettings(topics=topics or (MqttTopicSettings(filter="fleet/#"),))
    return MqttMessages(source, "mq0", "veh-001", marks or {})


@pytest.mark.parametrize(
    ("filter_", "topic", "match"),
    [
        ("fleet/+/imu", "fleet/veh-1/imu", True),
        ("fleet/+/imu", "fleet/veh-1/gps", False),
        ("fleet/+/imu", "fleet/veh-1/imu/x", False),
        ("fleet/#", "fleet", True),  # '#' also matches the parent level (MQTT 4.7.1.2)
        ("fleet/#", "fleet/a/b/c", True),
        ("fleet/#", "fleets/a", False),
        ("+/+", "a/b", True),
        ("+", "/a", False),
        ("+/a", "/a", True),  # an empty first level is a level
        ("#", "$SYS/broker/uptime", False),  # wildcards never match $ topics at the start
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/", False),
    ],
)
def test_topic_matching_follows_mqtt(filter_: str, topic: str, match: bool) -> None:
    assert rule(filter_).matches(topic.split("/")) is match


@pytest.mark.parametrize(
    ("filter_", "problem"),
    [("", "non-empty"), ("a/#/b", "'#'"), ("a/b#", "'#'"), ("a/+b", "'+'"),
     ("$share/g/a", "shared"), ("a\x00b", "NUL")],
)
def test_bad_topic_filters_are_refused_with_the_rule(filter_: str, problem: str) -> None:
    assert problem in check_topic_filter(filter_)
    with pytest.raises(FieldProblem, match="filter"):
        MqttTopicSettings(filter=filter_)


def test_device_and_kind_come_from_topic_levels() -> None:
    m = messages(MqttTopicSettings(filter="fleet/+/+", device="{2}", kind="{3}"))
    readings, quarantined, marks, receipt = m.handle(
        delivery("fleet/veh-7/engine", b'{"rpm": 900, "ts": 1800000000000}'))
    assert not quarantined
    [r] = readings
    assert (r.device_id, r.sensor_id, r.kind, dict(r.values)) == (
        "veh-7", "mq0", "engine", {"rpm": 900, "ts": 1800000000000})
    assert receipt == Receipt(1, 1, 1)
    assert marks[0].key == "1"
    assert marks[0].value == fingerprint(b"fleet/veh-7/engine", b'{"rpm": 900, "ts": 1800000000000}')


def test_a_topic_level_that_is_no_identifier_is_quarantined_not_a_crash() -> None:
    m = messages(MqttTopicSettings(filter="fleet/+/imu", device="{2}"))
    readings, quarantined, _marks, receipt = m.handle(delivery("fleet/veh 1/imu", b'{"a": 1}'))
    assert readings == []
    [q] = quarantined
    assert q.source == "mqtt:fleet/veh 1/imu"
    assert "not an identifier" in q.reason and q.raw == b'{"a": 1}'
    assert receipt is not None  # quarantined is committed, so it is acknowledged too


def test_a_level_reference_beyond_the_topic_is_quarantined() -> None:
    m = messages(MqttTopicSettings(filter="fleet/#", device="{3}"))
    _r, [q], _m, _rc = m.handle(delivery("fleet/a", b'{"a": 1}'))
    assert "level 3" in q.reason


def test_first_matching_rule_wins_and_unmatched_topics_are_quarantined() -> None:
    m = messages(MqttTopicSettings(filter="a/+", kind="first"),
                 MqttTopicSettings(filter="a/#", kind="second"))
    [r], _q, _m, _rc = m.handle(delivery("a/b", b'{"v": 1}'))
    assert r.kind == "first"
    [r], _q, _m, _rc = m.handle(delivery("a/b/c", b'{"v": 1}'))
    assert r.kind == "second"
    _r, [q], _m, _rc = m.handle(delivery("zzz", b'{"v": 1}'))
    assert "none of the sensor's filters" in q.reason
    assert m.counts["unmatched"] == 1


def test_invalid_utf8_topic_is_quarantined() -> None:
    m = messages()
    _r, [q], _m, _rc = m.handle(delivery(b"fleet/\xff", b"{}"))
    assert "UTF-8" in q.reason


def test_redelivery_of_a_journaled_message_is_only_acknowledged() -> None:
    payload = b'{"v": 1}'
    journaled = {"7": fingerprint(b"fleet/x", payload)}
    m = messages(marks=journaled)
    readings, quarantined, marks, receipt = m.handle(delivery("fleet/x", payload, mid=7, dup=True))
    assert (readings, quarantined, marks) == ([], [], [])
    assert receipt == Receipt(1, 7, 1)
    assert m.counts["redeliveries"] == 1


def test_same_packet_id_without_dup_is_a_new_message() -> None:
    payload = b'{"v": 1}'
    m = messages(marks={"7": fingerprint(b"fleet/x", payload)})
    readings, _q, marks, _rc = m.handle(delivery("fleet/x", payload, mid=7, dup=False))
    assert len(readings) == 1 and marks[0].key == "7"


def test_dup_with_other_content_under_the_id_is_journaled() -> None:
    m = messages(marks={"7": fingerprint(b"fleet/x", b'{"v": 1}')})
    readings, _q, marks, _rc = m.handle(delivery("fleet/x", b'{"v": 2}', mid=7, dup=True))
    assert len(readings) == 1 and marks[0].value == fingerprint(b"fleet/x", b'{"v": 2}')
    assert m.counts["redelivered_new"] == 1


def test_a_redelivery_within_one_incarnation_is_recognised() -> None:
    m = messages()
    first = m.handle(delivery("fleet/x", b'{"v": 1}', mid=3))
    again = m.handle(delivery("fleet/x", b'{"v": 1}', mid=3, dup=True, session=2))
    assert len(first[0]) == 1 and again[:3] == ([], [], [])
    assert again[3] == Receipt(2, 3, 1)


def test_qos0_messages_carry_no_mark_and_no_receipt() -> None:
    m = messages()
    readings, _q, marks, receipt = m.handle(delivery("fleet/x", b'{"v": 1}', qos=0))
    assert len(readings) == 1 and marks == [] and receipt is None


def test_mqtt_sensor_config_from_toml() -> None:
    config = parse_config({
        "mqtt": {"host": "broker.local", "port": 8883, "protocol": "3.1.1"},
        "sensors": [{"id": "mq0", "type": "mqtt", "mqtt": {"topics": [
            {"filter": "fleet/+/engine", "device": "{2}", "kind": "engine"},
            {"filter": "raw/#", "decoder": {"type": "struct", "format": "<Iff",
                                           "fields": ["ts_ms", "a", "b"], "ts_field": "ts_ms"}},
        ]}}],
    })
    [sensor] = config.sensors
    conn = config.mqtt_connection(sensor)
    assert (conn.broker.host, conn.broker.port, conn.broker.protocol) == (
        "broker.local", 8883, "3.1.1")
    assert conn.client_id == "fleetgw-veh-001-mq0"
    assert sensor.mqtt.topics[1].decoder.type == "struct"


def test_local_broker_replaces_host_and_port() -> None:
    config = parse_config({
        "broker": {"enabled": True, "port": 18830},
        "sensors": [{"id": "mq0", "type": "mqtt", "mqtt": {"topics": [{"filter": "a"}]}}],
    })
    conn = config.mqtt_connection(config.sensors[0])
    assert (conn.broker.host, conn.broker.port) == ("127.0.0.1", 18830)


@pytest.mark.parametrize(
    ("sensor", "key"),
    [
        ({"id": "mq0", "type": "mqtt"}, "mqtt"),
        ({"id": "s", "type": "sim", "mqtt": {"topics": [{"filter": "a"}]}}, "mqtt"),
        ({"id": "mq0", "type": "mqtt", "mqtt": {"topics": []}}, "topics"),
        ({"id": "mq0", "type": "mqtt", "mqtt": {"topics": [{"filter": "a", "qos": 2}]}}, "qos"),
        ({"id": "mq0", "type": "mqtt", "mqtt": {"topics": [{"filter": "a", "device": "{0}"}]}},
         "device"),
        ({"id": "mq0", "type": "mqtt", "mqtt": {"topics": [{"filter": "a", "kind": "x y"}]}},
         "kind"),
        ({"id": "mq0", "type": "mqtt", "mqtt": {"client_id": "a b", "topics": [{"filter": "a"}]}},
         "client_id"),
    ],
)
def test_bad_mqtt_sensor_config_names_the_key(sensor: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"sensors": [sensor]})
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("mqtt", "key"),
    [({"protocol": "4"}, "protocol"), ({"port": 0}, "port"), ({"tls_cert": "c"}, "tls_key"),
     ({"password_env": "not a var"}, "password_env"), ({"reconnect_min_s": 5,
                                                         "reconnect_max_s": 1}, "reconnect")],
)
def test_bad_broker_config_names_the_key(mqtt: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"mqtt": mqtt})
    assert key in str(err.value)


@settings(max_examples=300, deadline=None)
@given(topic=st.binary(max_size=40), payload=st.binary(max_size=200), mid=st.integers(1, 65535),
       dup=st.booleans(), qos=st.sampled_from([0, 1]))
def test_fuzzed_deliveries_never_raise_and_good_data_still_flows(
        topic: bytes, payload: bytes, mid: int, dup: bool, qos: int) -> None:
    m = messages(MqttTopicSettings(filter="#", device="{1}"))
    readings, quarantined, _marks, _receipt = m.handle(
        Delivery(mid, qos, dup, False, topic, payload, NOW, 1))
    # Either readings, or one quarantined input, or nothing (a recognised redelivery).
    assert (readings and not quarantined) or (not readings and len(quarantined) <= 1)
    good = json.dumps({"v": 1.5}).encode()
    [r], [], _m, _rc = m.handle(delivery("veh-1/x", good, mid=(mid % 65535) + 1))
    assert r.values["v"] == 1.5 and r.device_id == "veh-1"


def _publish_packet(topic: bytes, payload: bytes, mid: int, qos: int, v5: bool,
                    props: bytes = b"") -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if v5:
        body += bytes([len(props)]) + props
    return body + payload


@pytest.mark.parametrize("v5", [True, False])
def test_the_fast_publish_parser_matches_the_packet(v5: bool) -> None:
    import paho.mqtt.client as paho

    from actors.sensors.mqtt import _Client

    client = _Client(paho.CallbackAPIVersion.VERSION2, client_id="t",
                     protocol=paho.MQTTv5 if v5 else paho.MQTTv311, manual_ack=True)
    got = []
    client.on_publish_fast = lambda *args: got.append(args)
    props = b"\x01\x01" if v5 else b""  # payload format indicator = 1
    client._in_packet = {"command": 0x30 | 0x08 | (1 << 1) | 0x01,
                         "packet": bytearray(_publish_packet(b"a/b", b'{"v": 1}', 42, 1, v5,
                                                             props))}
    assert client._handle_publish() == paho.MQTT_ERR_SUCCESS
    assert got == [(42, 1, True, True, b"a/b", b'{"v": 1}')]
    client._in_packet = {"command": 0x30 | (1 << 1),
                         "packet": bytearray(b"\x00\x09a/b")}  # topic longer than the packet
    assert client._handle_publish() == paho.MQTT_ERR_PROTOCOL
    assert len(got) == 1
