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

`MqttSession` runs paho's network thread, which never sends an actor message (THESPIAN_NOTES:
never send from a thread): it queues deliveries and wakes the actor through a socketpair the
actor watches; the actor reads them, journals them and acknowledges the committed ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
from collections import deque
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
DISCONNECTED, CONNECTING, CONNECTED = "disconnected", "connecting", "connected"
#: The source mark holding the filters the broker's session holds for the sensor (JSON list).
SUBSCRIPTIONS_MARK = "mqtt:subscriptions"
#: Bytes read from the socket at once.
READ_CHUNK = 16 * 1024
#: QoS 0 deliveries queued for the actor at most (more are dropped and counted).
MAX_QUEUED_QOS0 = 50_000
#: Seconds `MqttSession.close` waits for paho's thread.
CLOSE_WAIT_S = 0.2
#: Topics whose rule, device and kind are remembered (a fleet's topics repeat).
TOPIC_CACHE_SIZE = 4096


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
        #: topic -> (rule, device, kind), or a DecodeError for a topic that maps to nothing.
        self._topics: dict[bytes, tuple[TopicRule, str, str] | DecodeError] = {}
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
        mapping = self._topics.get(d.topic)
        if mapping is None:
            mapping = self._map_topic(d.topic)
            if len(self._topics) >= TOPIC_CACHE_SIZE:
                self._topics.clear()
            self._topics[d.topic] = mapping
        if isinstance(mapping, DecodeError):
            return [], [self._reject(d, str(mapping))]
        rule, device, kind = mapping
        try:
            records = rule.decoder.decode(d.payload, d.received_ns)
            readings = [Reading(record.device_id or device, self.sensor_id, record.ts, kind,
                                record.values) for record in records]
        except (DecodeError, MessageValidationError) as exc:
            return [], [self._reject(d, str(exc))]
        if not readings:
            return [], [self._reject(d, "payload holds no readings")]
        return readings, []

    def _map_topic(self, raw: bytes) -> tuple[TopicRule, str, str] | DecodeError:
        """The rule, device and kind of topic ``raw``, or why it maps to nothing."""
        try:
            topic = raw.decode("utf-8")
        except UnicodeDecodeError:
            return DecodeError("topic is not valid UTF-8")
        levels = topic.split("/")
        rule = next((r for r in self.rules if r.matches(levels)), None)
        if rule is None:
            # Subscribed filters and rules are the same list, so only a broker delivering
            # outside them (or an old session's subscription) gets here.
            return DecodeError("topic matches none of the sensor's filters")
        try:
            return rule, rule.device(levels, self.device_id), rule.kind(levels)
        except DecodeError as exc:
            return exc

    def _reject(self, d: Delivery, reason: str) -> QuarantinedInput:
        if reason == "topic matches none of the sensor's filters":
            self.counts["unmatched"] += 1
        topic = d.topic.decode("utf-8", "backslashreplace")
        return QuarantinedInput.of(f"mqtt:{topic}", reason, d.payload, d.received_ns)


class _Client(paho.Client):
    """paho's client, faster on a busy subscription (measured with `fleetgw bench mqtt`):

    - paho reads one packet per readable event, a few bytes per recv (three or more system
      calls and a select per message); here the socket is read in large chunks and
      `loop_read` handles every packet waiting, until the socket would block;
    - paho looks up per-topic callbacks for every message (none are used here): each message
      goes straight to ``on_message``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            chunk = super()._sock_recv(READ_CHUNK)  # BlockingIOError: nothing more now
            if not chunk:
                return b""  # closed: paho handles it
            self._rbuf, self._rpos = chunk, 0
        end = min(len(self._rbuf), self._rpos + bufsize)
        data = self._rbuf[self._rpos:end]
        self._rpos = end
        return data

    #: Why the last connection attempt failed (paho's on_connect_fail does not say), and when
    #: the current one started (monotonic; None when none is under way).
    last_error: BaseException | None = None
    attempt_started: float | None = None

    def reconnect(self) -> Any:
        self._rbuf, self._rpos = b"", 0  # nothing of an old connection's stream is kept
        self.attempt_started = time.monotonic()
        try:
            rc = super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise
        if self._thread_terminate:
            # Closed while this attempt was under way: leave no connection behind.
            sock = self._sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        return rc

    def loop_read(self, max_packets: int = 1) -> Any:
        if self._sock is None:
            return paho.MQTT_ERR_NO_CONN
        # One read of the socket, then every whole packet it brought; what is left of a packet
        # waits for the next readable event (the buffer never holds a whole unread packet when
        # this returns, so paho's select cannot sleep on data we already have).
        rc = self._packet_read()
        while rc == paho.MQTT_ERR_SUCCESS and self._rpos < len(self._rbuf):
            if self._sock is None:
                return paho.MQTT_ERR_NO_CONN
            rc = self._packet_read()
        if rc == paho.MQTT_ERR_AGAIN:
            return paho.MQTT_ERR_SUCCESS
        if rc > 0:
            return self._loop_rc_handle(rc)
        return paho.MQTT_ERR_SUCCESS

    #: Set by the session: called with (mid, qos, dup, retain, topic, payload) for each QoS 0/1
    #: PUBLISH, parsed here without paho's per-message objects (MQTTMessage, Properties).
    on_publish_fast: Callable[[int, int, bool, bool, bytes, bytes], None] | None = None

    def _handle_publish(self) -> Any:
        fast = self.on_publish_fast
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if fast is None or qos > 1:
            return super()._handle_publish()
        packet = self._in_packet["packet"]
        try:
            end = 2 + int.from_bytes(packet[0:2], "big")
            topic = bytes(packet[2:end])
            mid = 0
            if qos:
                mid = int.from_bytes(packet[end:end + 2], "big")
                end += 2
            if self._protocol == paho.MQTTv5:
                length, shift = 0, 0
                while True:  # the properties' length: a variable byte integer
                    byte = packet[end]
                    end += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                end += length
            if not topic or end > len(packet) or (qos and mid == 0):
                raise IndexError("malformed")
        except IndexError:
            if not topic:  # e.g. an MQTT 5 topic alias: paho's own path handles it
                return super()._handle_publish()
            return paho.MQTT_ERR_PROTOCOL
        fast(mid, qos, bool(header & 0x08), bool(header & 0x01), topic, bytes(packet[end:]))
        return paho.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: Any) -> None:
        on_message = self.on_message
        if on_message is not None:
            with self._in_callback_mutex:
                on_message(self, self._userdata, message)


class MqttSession:
    """One sensor's MQTT session: connect, subscribe, deliveries, acknowledgements,
    keepalive, reconnect with backoff.

    paho's network thread (``loop_start``) reads and parses packets, keeps the connection
    alive and reconnects with a doubling backoff; it touches nothing of the actor: deliveries
    go into a queue and a byte on a socketpair tells the actor (which watches ``fileno()``)
    that there are some. The actor takes them with `read` and acknowledges committed ones
    with `ack` (paho's calls are thread-safe). Measured: parsing in the actor's own thread
    kept it so busy that Thespian's transmits to the journal backed off for seconds.
    """

    def __init__(self, conn: MqttConnection, *, clock: Callable[[], float] = time.monotonic,
                 clock_ns: Callable[[], int] = time.time_ns, host: str | None = None,
                 port: int | None = None, held_filters: tuple[str, ...] | None = None) -> None:
        self.conn = conn
        #: The filters the broker's session for this client id is known to hold (from the
        #: journal's marks: `SUBSCRIPTIONS_MARK`); None = not known. Changed by SUBACKs.
        self.held_filters = None if held_filters is None else tuple(sorted(held_filters))
        self.broker = conn.broker
        self.host = host or self.broker.host
        self.port = port or self.broker.port
        self._clock = clock
        self._clock_ns = clock_ns
        #: Guards what paho's thread and the actor share: state, session, the queue.
        self._lock = threading.Lock()
        self.state = DISCONNECTED
        #: Connection number: receipts of an earlier connection are never acknowledged.
        self.session = 0
        self.problem = ""
        self.session_present: bool | None = None
        self._client: _Client | None = None
        self._inbox: deque[Any] = deque()
        #: Called in paho's thread on each delivery; `read` then returns what it returned
        #: (the sensor passes `MqttMessages.handle`: decoding off the actor's thread). None:
        #: `read` returns the deliveries.
        self.handler: Callable[[Delivery], Any] | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._signalled = False
        self._subscribing: tuple[str, ...] | None = None
        self._reported = self.held_filters
        self._retry_at = 0.0
        self._setup_failures = 0
        self.counts = {"connects": 0, "disconnects": 0, "acks": 0, "stale_receipts": 0,
                       "connect_failures": 0, "qos0_dropped": 0}

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
        client.reconnect_delay_set(b.reconnect_min_s, b.reconnect_max_s)
        if b.username or b.password_env:
            password = None
            if b.password_env:
                password = os.environ.get(b.password_env)
                if password is None:
                    raise ValueError(f"[mqtt] password_env names {b.password_env}, which is "
                                     "not set in the gateway's environment")
            client.username_pw_set(b.username or None, password)
        if b.tls_ca:
            for setting, path in (("tls_ca", b.tls_ca), ("tls_cert", b.tls_cert),
                                  ("tls_key", b.tls_key)):
                if path and not os.path.isfile(path):
                    raise ValueError(f"[mqtt] {setting} {path}: no such file")
            client.tls_set(ca_certs=b.tls_ca, certfile=b.tls_cert or None,
                           keyfile=b.tls_key or None, cert_reqs=ssl.CERT_REQUIRED)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish_fast = self._on_publish
        return client

    # ---- driving (actor thread) -------------------------------------------------------------
    def step(self) -> None:
        """Start the client when due (it then connects and reconnects by itself), and end
        an attempt whose CONNACK does not come within ``connect_timeout_s``."""
        client = self._client
        if client is None:
            if self._clock() >= self._retry_at:
                self._start()
            return
        started = client.attempt_started
        if (self.state == CONNECTING and started is not None
                and time.monotonic() - started > self.broker.connect_timeout_s):
            sock = client._sock
            if sock is not None:
                client.attempt_started = None
                with self._lock:
                    self.counts["connect_failures"] += 1
                    self.problem = (f"no CONNACK from {self.host}:{self.port} within "
                                    f"{self.broker.connect_timeout_s:g} s")
                # paho's thread sees the connection end and retries after its backoff.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _start(self) -> None:
        b = self.broker
        try:
            client = self._new_client()
            if b.protocol == "5":
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = b.session_expiry_s
                client.connect_async(self.host, self.port, b.keepalive_s, clean_start=False,
                                     properties=props)
            else:
                client.connect_async(self.host, self.port, b.keepalive_s)
        except (ValueError, OSError, ssl.SSLError) as exc:
            # A setup problem (a missing password variable, unreadable TLS files): retry
            # slowly, it may be fixed without a restart (files appear after provisioning).
            self._setup_failures += 1
            self.problem = f"cannot set up the MQTT client: {exc}"
            self.counts["connect_failures"] += 1
            self._retry_at = self._clock() + min(
                b.reconnect_max_s, b.reconnect_min_s * 2 ** min(self._setup_failures, 10))
            return
        with self._lock:
            self.state = CONNECTING
        self._client = client
        client.loop_start()

    def read(self, max_messages: int) -> list[Any]:
        """Up to ``max_messages`` deliveries (or what ``handler`` made of them), oldest first;
        never blocks."""
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            n = min(max_messages, len(self._inbox))
            out = [self._inbox.popleft() for _ in range(n)]
            if not self._inbox:
                self._signalled = False
            else:
                self._wake()  # more waiting: keep the watch ready
        return out

    def pending(self) -> int:
        """Deliveries waiting to be read."""
        return len(self._inbox)

    def ack(self, receipts: list[Receipt]) -> None:
        """PUBACK the receipts of the current connection. Others are stale and dropped: the
        broker redelivers those messages on the new connection, and a PUBACK for an old
        packet id could acknowledge a different message that reuses it."""
        client = self._client
        with self._lock:  # on_disconnect/on_connect cannot slip between check and ack
            for r in receipts:
                if r.session != self.session or self.state != CONNECTED or client is None:
                    self.counts["stale_receipts"] += 1
                    continue
                client.ack(r.mid, r.qos)
                self.counts["acks"] += 1

    def fileno(self) -> int | None:
        """Readable when deliveries wait (the actor watches it)."""
        return self._wake_r.fileno()

    def close(self) -> None:
        """Disconnect cleanly (the persistent session stays with the broker)."""
        client, self._client = self._client, None
        if client is not None:
            client._thread_terminate = True  # an attempt under way closes its own socket
            with contextlib.suppress(Exception):
                client.disconnect()
            thread = client._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(CLOSE_WAIT_S)  # a TCP/TLS connect under way may hold it longer
        with self._lock:
            self.state = DISCONNECTED
            self._inbox.clear()
            self._signalled = False

    # ---- paho's thread ----------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            with self._lock:
                self.state = DISCONNECTED
                self.problem = (f"broker {self.host}:{self.port} refused the connection: "
                                f"{reason}")
                self.counts["connect_failures"] += 1
            return
        client.attempt_started = None
        with self._lock:
            self.session += 1
            self.state = CONNECTED
            self.problem = ""
            self.counts["connects"] += 1
            self.session_present = bool(flags.session_present)
        topics = self.conn.source.topics
        wanted = {t.filter for t in topics}
        held = set(self.held_filters) if self.held_filters is not None else wanted
        if self.session_present and held - wanted:
            client.unsubscribe(sorted(held - wanted))  # filters removed from the config
        if self.broker.protocol == "5":
            # retainHandling=1: retained messages only for a new subscription, so resubscribing
            # on every connect never replays them into the journal.
            client.subscribe([(t.filter, SubscribeOptions(qos=t.qos, retainHandling=1))
                              for t in topics])
        else:
            # MQTT 3.1.1 resends retained messages on every SUBSCRIBE: subscribe only to what
            # the broker's session does not hold (all of it without a session).
            new = topics if not self.session_present else [
                t for t in topics if t.filter not in held]
            if new:
                client.subscribe([(t.filter, t.qos) for t in new])
        if not self.session_present or held != wanted or self.held_filters is None:
            self._subscribing = tuple(sorted(wanted))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        with self._lock:
            if self._subscribing is not None and not any(
                    getattr(r, "is_failure", False) for r in reasons):
                self.held_filters, self._subscribing = self._subscribing, None

    def take_subscription_change(self) -> tuple[str, ...] | None:
        """The filters the broker now holds for us, once, when that changed since
        construction or the last call: what the actor commits as `SUBSCRIPTIONS_MARK`."""
        with self._lock:
            if self.held_filters is not None and self.held_filters != self._reported:
                self._reported = self.held_filters
                return self.held_filters
        return None

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        why = client.last_error
        client.attempt_started = None
        with self._lock:
            self.state = DISCONNECTED
            self.problem = f"cannot connect to {self.host}:{self.port}" + (
                f": {why}" if why is not None else "")
            self.counts["connect_failures"] += 1

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        client.attempt_started = None
        with self._lock:
            if self.state == CONNECTED:
                self.counts["disconnects"] += 1
                self.problem = f"connection to {self.host}:{self.port} lost ({reason})"
            elif self.state == CONNECTING and not self.problem.startswith("no CONNACK"):
                hint = (" (does the broker require a client certificate? set [mqtt] tls_cert "
                        "and tls_key)" if self.broker.tls_ca and not self.broker.tls_cert
                        else "")
                self.counts["connect_failures"] += 1
                self.problem = (f"broker {self.host}:{self.port} closed the connection before "
                                f"its CONNACK ({reason}){hint}")
            self.state = DISCONNECTED
            # Deliveries of the lost connection not read yet stay: they are journaled, their
            # receipts are stale, and the broker's redeliveries of them are recognised.

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._on_publish(message.mid, message.qos, bool(message.dup), bool(message.retain),
                         bytes(message._topic), bytes(message.payload))

    def _on_publish(self, mid: int, qos: int, dup: bool, retain: bool, topic: bytes,
                    payload: bytes) -> None:
        d = Delivery(mid, qos, dup, retain, topic, payload, self._clock_ns(), self.session)
        if d.qos == 0 and len(self._inbox) >= MAX_QUEUED_QOS0:
            with self._lock:
                # QoS 0 has no flow control: past the bound, drop (counted) rather than grow.
                # QoS 1 is bounded by the broker's in-flight limit: it waits for our PUBACKs.
                self.counts["qos0_dropped"] += 1
            return
        item = d if self.handler is None else self.handler(d)
        with self._lock:
            self._inbox.append(item)
            if not self._signalled:
                self._signalled = True
                self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"!")

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mqtt_state": self.state, "mqtt_session": self.session,
                               "mqtt_pending": len(self._inbox)}
        out.update({f"mqtt_{k}": v for k, v in self.counts.items()})
        if self.problem:
            out["mqtt_problem"] = self.problem
        return out
