"""[broker]: the gateway's own MQTT broker (a supervised mosquitto child process).

Where this sits: in front of the data path. MQTT devices on the vehicle publish to this broker;
the gateway's MQTT sensors subscribe with persistent sessions and acknowledge a message (QoS 1)
only after the journal committed it (DESIGN.md I1), so the broker holds what is not yet
journaled. `actors.broker.launcher.MosquittoLauncher` turns these settings into a
mosquitto.conf and keeps the process alive; `actors.broker.actor.BrokerActor` supervises it.

Validation does no I/O (whether the binary or the password file exist is checked when the broker
starts, and reported there).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from config.fields import FieldProblem, _address, _non_negative, _port, _positive

DEFAULT_BROKER_PORT = 1883
#: Messages mosquitto keeps per persistent client that is offline or behind (mosquitto's own
#: default, 1000, drops QoS 1 messages beyond it without telling anyone).
DEFAULT_MAX_QUEUED_MESSAGES = 1_000_000
#: Payload bytes kept per such client (256 MiB; mosquitto keeps its queues in memory).
DEFAULT_MAX_QUEUED_BYTES = 256 << 20
#: QoS 1 messages sent to one client and not yet acknowledged. mosquitto's default, 20, caps a
#: subscriber that acknowledges after each journal commit at 20 messages per commit.
DEFAULT_MAX_INFLIGHT_MESSAGES = 1000


def _breaks_line(text: str) -> bool:
    # mosquitto reads its config line by line: a line break in a value would add lines.
    return any(c in text for c in "\n\r\x00")


def _one_line(inst: Any, attr: attrs.Attribute, value: str) -> None:
    if _breaks_line(value):
        raise FieldProblem(attr.name, f"must not contain line breaks or NUL (got {value!r})")


def _lines(inst: Any, attr: attrs.Attribute, value: tuple[str, ...]) -> None:
    for line in value:
        if _breaks_line(line):
            raise FieldProblem(attr.name, f"must hold one mosquitto.conf line per entry "
                                      f"(got {line!r})")


@attrs.frozen
class BrokerSettings:
    """[broker]: a local mosquitto the gateway starts, watches and restarts.

    I9: it listens on loopback (127.0.0.1) unless ``listen_address`` says otherwise, and it
    never listens beyond loopback for anonymous clients: a non-loopback address needs
    ``allow_anonymous = false`` and a ``password_file``.
    """

    #: Run the broker at all; false: MQTT sensors use an external broker and none runs here.
    enabled: bool = False
    #: The mosquitto executable: a path, or a name looked up on PATH and then in /usr/sbin and
    #: /usr/local/sbin (Debian: ``apt-get install mosquitto`` puts it in /usr/sbin).
    binary: str = attrs.field(default="mosquitto", validator=_one_line)
    #: The one address the broker listens on. 127.0.0.1 (default) keeps it on this computer;
    #: anything else exposes it to the network (then a password file is required).
    listen_address: str = attrs.field(default="127.0.0.1", validator=_address)
    #: Its TCP port (MQTT's standard 1883).
    port: int = attrs.field(default=DEFAULT_BROKER_PORT, validator=_port)
    #: Directory of its config, persistence database, log and pid file; empty means
    #: DATA_DIR/broker.
    data_dir: str = attrs.field(default="", validator=_one_line)
    #: Messages kept per persistent client while it is offline or behind; beyond it mosquitto
    #: drops QoS 1 messages for that client. Kept in memory (and in the persistence file).
    max_queued_messages: int = attrs.field(default=DEFAULT_MAX_QUEUED_MESSAGES,
                                           validator=_positive)
    #: Payload bytes kept per such client; 0 means no byte limit (``max_queued_messages`` only).
    max_queued_bytes: int = attrs.field(default=DEFAULT_MAX_QUEUED_BYTES,
                                        validator=_non_negative)
    #: QoS 1 messages in flight to one client (sent, not yet acknowledged). A gateway sensor
    #: acknowledges after the journal commit, so this bounds how much a commit can cover.
    max_inflight_messages: int = attrs.field(default=DEFAULT_MAX_INFLIGHT_MESSAGES,
                                             validator=_positive)
    #: Seconds between saves of the in-memory state (sessions, queued messages) to disk; a
    #: clean stop always saves. 0 means only on a clean stop: a crash or power cut then loses
    #: everything queued since the broker started.
    autosave_interval_s: int = attrs.field(default=10, validator=_non_negative)
    #: Restart delay after the broker exited: doubles from ``restart_min_s`` up to
    #: ``restart_max_s``; a broker that ran longer than ``restart_max_s`` restarts after
    #: ``restart_min_s`` again.
    restart_min_s: float = attrs.field(default=0.5, validator=_positive)
    restart_max_s: float = attrs.field(default=30.0, validator=_positive)
    #: Accept clients without a username/password. Only allowed on a loopback address.
    allow_anonymous: bool = True
    #: mosquitto password file (``mosquitto_passwd -c FILE USER``); empty means none. Required
    #: when ``allow_anonymous`` is false.
    password_file: str = attrs.field(default="", validator=_one_line)
    #: Raw mosquitto.conf lines appended after the generated ones, for what the settings above
    #: do not cover (e.g. ``"persistent_client_expiration 14d"``). mosquitto checks them when it
    #: starts; a mistake shows in the broker's ``problem``.
    extra_config: tuple[str, ...] = attrs.field(default=(), validator=_lines)

    def __attrs_post_init__(self) -> None:
        if not self.binary:
            raise FieldProblem("binary", "must name the mosquitto executable (got '')")
        if self.restart_max_s < self.restart_min_s:
            raise FieldProblem("restart_max_s", f"must be >= restart_min_s ({self.restart_min_s}) "
                                            f"(got {self.restart_max_s!r})")
        if not self.loopback and self.allow_anonymous:
            raise FieldProblem("allow_anonymous", f"must be false when listen_address is not a "
                                              f"loopback address (got true with "
                                              f"{self.listen_address!r}): anonymous clients "
                                              f"from the network could publish and read "
                                              f"everything; set a password_file")
        if not self.allow_anonymous and not self.password_file:
            raise FieldProblem("password_file", "must be set when allow_anonymous is false "
                                            "(create one with mosquitto_passwd -c FILE USER)")

    @property
    def loopback(self) -> bool:
        """Whether the broker listens on this computer only."""
        return ipaddress.ip_address(self.listen_address).is_loopback
