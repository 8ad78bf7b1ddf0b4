"""The MQTT source: a paho-mqtt 2 session driven from the sensor actor's own thread.

Where this sits on the data path: step 1 for MQTT sensors. A broker (the gateway's local
mosquitto, or any MQTT 3.1.1/5 broker) delivers QoS 1 messages to the sensor's persistent
session; `MqttMessages` turns each delivery into readings (or a quarantined input) plus a
redelivery mark and a receipt; the sensor's outbox commits them to the journal as one unit, and
only then is the receipt taken and the PUBACK sent (DESIGN.md step 2). So a message the broker
delivered is either journaled or redelivered — and a redelivery of a message already journaled
(the gateway died between the commit and the PUBACK) is recognised by its mark and only
acknowledged, not journaled again.

Redelivery marks: per packet id, a fingerprint of topic and payload of the message last
journaled under it, committed with that message. MQTT says a re-sent PUBLISH keeps its packet id
and has DUP set, and a packet id is reused only after its PUBACK arrived; so a DUP delivery
whose id and fingerprint match the mark is the same message again. (The one case this gets
wrong: a new message with the same topic and payload that reuses the id after our PUBACK got
through, and whose first delivery was lost on the wire. It would be acknowledged without being
journaled — identical content, but a lost reading. Brokers cycle ids through 65535, so this
needs an identical message exactly 65535 ids later plus a lost connection at that moment.)

`MqttSession` drives paho without its network thread (THESPIAN_NOTES.md: never send from a
thread): the actor watches the socket and calls `read` when it is readable, and `step` on its
timer (connect, keepalive, writes, reconnect backoff). Only the blocking part of a connection
attempt (TCP connect and TLS handshake) runs in a short-lived thread that sends nothing; the
actor does not touch the client until it is done.
"""

from __future__ import annotations

import hashlib
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from actors.sensors.decoders import DecodeError, build_decoder
from config.mqtt import LEVEL_REF, MqttConnection, MqttSourceSettings, MqttTopicSettings
from messages.errors import MessageValidationError
from messages.journal import QuarantinedInput, SourceMark
from messages.readings import IDENT_RE, Reading

#: Session states (figures show them).
DISCONNECTED, CONNECTING, HANDSHAKE, CONNECTED = (
    "disconnected", "connecting", "awaiting-connack", "connected")
#: Bytes read from the socket at once (paho asks for a packet's few bytes at a time).
READ_CHUNK = 256 * 1024


@attrs.frozen(slots=True)
class Delivery:
    """One PUBLISH the broker delivered to the session (``session``: the connection number it
    came on — a PUBACK is only meaningful on that connection)."""

    mid: int
    qos: int
    dup: bool
    retain: bool
    topic: bytes
    payload: bytes
    received_ns: int
    session: int


@attrs.frozen(slots=True)
class Receipt:
    """What to acknowledge once a delivery is committed: packet ``mid`` on connection
    ``session``."""

    session: int
    mid: int
    qos: int


def fingerprint(topic: bytes, payload: bytes) -> str:
    """Identity of a message's content for the redelivery marks (96-bit BLAKE2b)."""
    digest = hashlib.blake2b(topic, digest_size=12)
    digest.update(b"\x00")
    digest.update(payload)
    return digest.hexdigest()


class TopicRule:
    """One ``[[sensors.mqtt.topics]]`` entry, compiled: matching, device, kind, decoder."""

    def __init__(self, settings: MqttTopicSettings) -> None:
        self.settings = settings
        self.levels = settings.filter.split("/")
        self.decoder = build_decoder(settings.decoder)
        self._device_refs = [int(n) for n in LEVEL_REF.findall(settings.device)]
        self._kind_refs = [int(n) for n in LEVEL_REF.findall(settings.kind)]

    def matches(self, levels: list[str]) -> bool:
        """MQTT matching (§4.7): ``+`` one level, ``#`` this level and all below; topics
        starting with ``$`` are not matched by a leading wildcard."""
        pattern = self.levels
        if levels and levels[0].startswith("$") and pattern[0] in ("+", "#"):
            return False
        for i, want in enumerate(pattern):
            if want == "#":
                return True
            if i >= len(levels):
                return False
            if want != "+" and want != levels[i]:
                return False
        return len(levels) == len(pattern)

    def fill(self, template: str, refs: list[int], levels: list[str], what: str) -> str:
        """``template`` with its {N} references replaced by topic levels; raises DecodeError
        when a level is missing or the result is not an identifier."""
        if not refs:
            return template
        for n in refs:
            if n > len(levels):
                raise DecodeError(f"{what} {template!r} needs topic level {n}, the topic has "
                                  f"{len(levels)}")

        value = LEVEL_REF.sub(lambda m: levels[int(m.group(1)) - 1], template)
        if not IDENT_RE.match(value):
            raise DecodeError(f"{what} {value!r} from the topic is not an identifier "
                              "([A-Za-z0-9_.:-/], starting with a letter or digit)")
        return value

    def device(self, levels: list[str], default: str) -> str:
        return self.fill(self.settings.device, self._device_refs, levels, "device") or default

    def kind(self, levels: list[str]) -> str:
        return self.fill(self.settings.kind, self._kind_refs, levels, "kind")


class MqttMessages:
    """Turns deliveries into what the outbox commits as a unit: readings or a quarantined
    input, the redelivery mark, and the receipt (plain logic: tests drive it directly)."""

    def __init__(self, source: MqttSourceSettings, sensor_id: str, device_id: str,
                 journaled_marks: Mapping[str, str]) -> None:
        self.sensor_id = sensor_id
        self.device_id = device_id
        self.rules = [TopicRule(t) for t in source.topics]
        #: packet id -> fingerprint of the message last journaled (or held) under it.
        self.marks: dict[int, str] = {}
        for key, value in journaled_marks.items():
            if key.isdigit():
                self.marks[int(key)] = value
        self.counts = {"messages": 0, "readings": 0, "quarantined": 0, "redeliveries": 0,
                       "redelivered_new": 0, "unmatched": 0}

    def handle(self, d: Delivery) -> tuple[list[Reading], list[QuarantinedInput],
                                          list[SourceMark], Receipt | None]:
        """What delivery ``d`` becomes. Never raises for bad input (I8)."""
        self.counts["messages"] += 1
        receipt = Receipt(d.session, d.mid, d.qos) if d.qos > 0 else None
        marks: list[SourceMark] = []
        if d.qos > 0:
            fp = fingerprint(d.topic, d.payload)
            if d.dup and self.marks.get(d.mid) == fp:
                # Already journaled (or held in the outbox): acknowledge, do not store again.
                self.counts["redeliveries"] += 1
                return [], [], [], receipt
            if d.dup:
                self.counts["redelivered_new"] += 1
            self.marks[d.mid] = fp
            marks.append(SourceMark(str(d.mid), fp))
        readings, quarantined = self.decode(d)
        self.counts["readings"] += len(readings)
        self.counts["quarantined"] += len(quarantined)
        return readings, quarantined, marks, receipt

    def decode(self, d: Delivery) -> tuple[list[Reading], list[QuarantinedInput]]:
        try:
            topic = d.topic.decode("utf-8")
        except UnicodeDecodeError:
            return [], [self._reject(d, repr(d.topic)[2:-1], "topic is not valid UTF-8")]
        levels = topic.split("/")
        rule = next((r for r in self.rules if r.matches(levels)), None)
        if rule is None:
            # Subscribed filters and rules are the same list, so only a broker delivering
            # outside them (or an old session's subscription) gets here.
            self.counts["unmatched"] += 1
            return [], [self._reject(d, topic, "topic matches none of the sensor's filters")]
        try:
            kind = rule.kind(levels)
            records = rule.decoder.decode(d.payload, d.received_ns)
            readings = []
            for record in records:
                device = record.device_id or rule.device(levels, self.device_id)
                readings.append(Reading(device, self.sensor_id, record.ts, kind,
                                        record.values))
        except DecodeError as exc:
            return [], [self._reject(d, topic, str(exc))]
        except MessageValidationError as exc:
            return [], [self._reject(d, topic, str(exc))]
        if not readings:
            return [], [self._reject(d, topic, "payload holds no readings")]
        return readings, []

    @staticmethod
    def _reject(d: Delivery, topic: str, reason: str) -> QuarantinedInput:
        return QuarantinedInput.of(f"mqtt:{topic}", reason, d.payload, d.received_ns)


class _Client(paho.Client):
    """paho's client with buffered reads: paho reads a packet a few bytes at a time (three or
    more recv calls per message); this reads the socket in large chunks and serves paho from
    the buffer, and notes when the socket has nothing more (``drained``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = bytearray()
        self._rpos = 0
        self.drained = False

    def reset_buffer(self) -> None:
        self._rbuf = bytearray()
        self._rpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            try:
                chunk = super()._sock_recv(READ_CHUNK)
            except BlockingIOError:
                self.drained = True
                raise
            if not chunk:
                return b""  # connection closed: paho handles it
            self._rbuf = bytearray(chunk)
            self._rpos = 0
        end = min(len(self._rbuf), self._rpos + bufsize)
        data = bytes(self._rbuf[self._rpos:end])
        self._rpos = end
        return data


class MqttSession:
    """One sensor's MQTT session: connect, subscribe, read deliveries, acknowledge, keepalive,
    reconnect with backoff. Everything but the connect thread runs in the caller's thread."""

    def __init__(self, conn: MqttConnection, *, clock: Callable[[], float] = time.monotonic,
                 clock_ns: Callable[[], int] = time.time_ns, host: str | None = None,
                 port: int | None = None) -> None:
        self.conn = conn
        self.broker = conn.broker
        self.host = host or self.broker.host
        self.port = port or self.broker.port
        self._clock = clock
        self._clock_ns = clock_ns
        self.state = DISCONNECTED
        #: Connection number: receipts of an earlier connection are never acknowledged.
        self.session = 0
        self.problem = ""
        self.session_present: bool | None = None
        self._client: _Client | None = None
        self._inbox: list[Delivery] = []
        self._retry_at = 0.0
        self._backoff = 0.0
        self._deadline = 0.0
        self._connect_thread: threading.Thread | None = None
        self._connect_error: BaseException | None = None
        self.counts = {"connects": 0, "disconnects": 0, "acks": 0, "stale_receipts": 0,
                       "connect_failures": 0}

    # ---- the client -------------------------------------------------------------------------
    def _new_client(self) -> _Client:
        b = self.broker
        v5 = b.protocol == "5"
        client = _Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2,
            client_id=self.conn.client_id,
            clean_session=None if v5 else False,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            manual_ack=True,
        )
        client.connect_timeout = b.connect_timeout_s
        client.suppress_exceptions = False
        if b.username or b.password_env:
            password = None
            if b.password_env:
                password = os.environ.get(b.password_env)
                if password is None:
                    raise ValueError(f"[mqtt] password_env names {b.password_env}, which is "
                                     "not set in the gateway's environment")
            client.username_pw_set(b.username or None, password)
        if b.tls_ca:
            client.tls_set(ca_certs=b.tls_ca, certfile=b.tls_cert or None,
                           keyfile=b.tls_key or None, cert_reqs=ssl.CERT_REQUIRED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # ---- driving ----------------------------------------------------------------------------
    def step(self) -> None:
        """Advance connection management: start a connection attempt when due, finish one
        the connect thread completed, time out a silent broker, keepalive and writes."""
        now = self._clock()
        if self.state == DISCONNECTED and now >= self._retry_at:
            self._start_connect()
        elif self.state == CONNECTING:
            thread = self._connect_thread
            if thread is not None and not thread.is_alive():
                self._finish_connect()
        elif self.state == HANDSHAKE:
            self._fill(1)  # CONNACK (deliveries right behind it wait in the inbox)
            if self.state == HANDSHAKE and now > self._deadline:
                self._lost(f"no CONNACK from {self.host}:{self.port} within "
                           f"{self.broker.connect_timeout_s} s")
        if self.state in (HANDSHAKE, CONNECTED) and self._client is not None:
            rc = self._client.loop_misc()
            if rc == paho.MQTT_ERR_SUCCESS and self._client.want_write():
                rc = self._client.loop_write()
            if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN) and self.state != \
                    DISCONNECTED:
                self._lost(f"connection to {self.host}:{self.port} lost "
                           f"({paho.error_string(rc)})")

    def read(self, max_messages: int) -> list[Delivery]:
        """Up to ``max_messages`` deliveries waiting on the socket; never blocks."""
        self._fill(max_messages)
        out = self._inbox[:max_messages]
        del self._inbox[:max_messages]
        return out

    def _fill(self, budget: int) -> None:
        """Read packets until the socket has no more or ``budget`` deliveries wait. Protocol
        packets (CONNACK, SUBACK, PINGRESP) are handled on the way."""
        client = self._client
        if client is None or self.state not in (HANDSHAKE, CONNECTED):
            return
        client.drained = False
        while not client.drained and len(self._inbox) < max(1, budget):
            rc = client.loop_read()
            if self._client is not client:
                return  # the connection was refused or lost while reading
            if rc != paho.MQTT_ERR_SUCCESS:
                self._lost(f"connection to {self.host}:{self.port} lost "
                           f"({paho.error_string(rc)})")
                return

    def ack(self, receipts: list[Receipt]) -> None:
        """PUBACK the receipts of the current connection (others are stale: the broker
        redelivers those messages on the new connection)."""
        client = self._client
        for r in receipts:
            if r.session != self.session or self.state != CONNECTED or client is None:
                self.counts["stale_receipts"] += 1
                continue
            client.ack(r.mid, r.qos)
            self.counts["acks"] += 1

    def fileno(self) -> int | None:
        """The socket to watch for reading (only while connected)."""
        if self.state not in (HANDSHAKE, CONNECTED) or self._client is None:
            return None
        sock = self._client.socket()
        return sock.fileno() if sock is not None else None

    def close(self) -> None:
        """Disconnect cleanly (the persistent session stays with the broker)."""
        client = self._client
        if client is not None and self.state in (HANDSHAKE, CONNECTED):
            try:
                client.disconnect()
                client.loop_write()
            except Exception:
                pass
        self._drop_client()
        self.state = DISCONNECTED

    # ---- connection management --------------------------------------------------------------
    def _start_connect(self) -> None:
        try:
            client = self._new_client()
        except (ValueError, OSError, ssl.SSLError) as exc:
            self._failed(f"cannot set up the MQTT client: {exc}")
            return
        self._client = client
        self.state = CONNECTING
        self._connect_error = None
        b = self.broker

        def connect() -> None:  # blocking TCP + TLS: in a thread that sends no actor message
            try:
                if b.protocol == "5":
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = b.session_expiry_s
                    client.connect(self.host, self.port, b.keepalive_s, clean_start=False,
                                   properties=props)
                else:
                    client.connect(self.host, self.port, b.keepalive_s)
            except BaseException as exc:  # reported by _finish_connect
                self._connect_error = exc

        self._connect_thread = threading.Thread(target=connect, name="mqtt-connect",
                                                daemon=True)
        self._connect_thread.start()

    def _finish_connect(self) -> None:
        self._connect_thread = None
        if self._connect_error is not None:
            exc = self._connect_error
            self._drop_client()
            self.state = DISCONNECTED
            self._failed(f"cannot connect to {self.host}:{self.port}: {exc}")
            return
        self.state = HANDSHAKE
        self._deadline = self._clock() + self.broker.connect_timeout_s

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self._lost(f"broker {self.host}:{self.port} refused the connection: {reason}")
            return
        self.session += 1
        self.state = CONNECTED
        self.problem = ""
        self._backoff = 0.0
        self.counts["connects"] += 1
        self.session_present = bool(flags.session_present)
        topics = self.conn.source.topics
        if self.broker.protocol == "5":
            # retainHandling=1: retained messages only for a new subscription, so resubscribing
            # on every connect never replays them into the journal.
            client.subscribe([(t.filter, SubscribeOptions(qos=t.qos, retainHandling=1))
                              for t in topics])
        elif not self.session_present:
            # MQTT 3.1.1 resends retained messages on every SUBSCRIBE: subscribe only when the
            # broker has no session for us (it keeps the subscriptions otherwise).
            client.subscribe([(t.filter, t.qos) for t in topics])

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        if self.state != DISCONNECTED:
            self._lost(f"broker {self.host}:{self.port} closed the connection ({reason})")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._inbox.append(Delivery(
            message.mid, message.qos, bool(message.dup), bool(message.retain),
            bytes(message._topic), bytes(message.payload), self._clock_ns(), self.session))

    def _lost(self, why: str) -> None:
        self.counts["disconnects"] += 1
        self._drop_client()
        self.state = DISCONNECTED
        self._failed(why)

    def _failed(self, why: str) -> None:
        self.problem = why
        self.counts["connect_failures"] += 1
        b = self.broker
        self._backoff = min(b.reconnect_max_s, max(b.reconnect_min_s, self._backoff * 2))
        self._retry_at = self._clock() + self._backoff * random.uniform(0.8, 1.2)

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._inbox = []
        if client is not None:
            client.on_disconnect = None
            try:
                sock = client.socket()
                if sock is not None:
                    sock.close()
            except Exception:
                pass

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mqtt_state": self.state, "mqtt_session": self.session}
        out.update({f"mqtt_{k}": v for k, v in self.counts.items()})
        if self.problem:
            out["mqtt_problem"] = self.problem
        return out

