"""Settings of a CAN bus source: which bus, which DBC, which frames, and how to recover.

Where this sits: the config of the first step of the data path for a ``can`` sensor. The lead's
``[[sensors]]`` entry carries these keys; `actors.sensors.can.CanSource` reads them. Validation
does no I/O: whether the DBC file exists and parses is checked by `CanSource.open`, which names
the file and the problem.

Example (TOML)::

    interface = "socketcan"
    channel = "can0"
    dbc = "/etc/fleetgw/vehicle.dbc"
    filters = [{ can_id = 0x1A0, can_mask = 0x7F0 }]
    kinds = { EngineData = "engine", VehicleDynamics = "imu" }
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from config.fields import FieldProblem
from messages.readings import IDENT_RE

#: python-can's default group of the ``udp_multicast`` interface (IPv4), used when ``channel``
#: is empty (python-can itself defaults to an IPv6 group, which many small networks lack).
UDP_MULTICAST_DEFAULT_GROUP = "239.74.163.2"
#: The channel of the ``virtual`` interface when ``channel`` is empty (python-can's default).
VIRTUAL_DEFAULT_CHANNEL = "channel-0"
#: Largest 11-bit (standard) and 29-bit (extended) CAN identifiers.
STANDARD_ID_MAX = 0x7FF
EXTENDED_ID_MAX = 0x1FFFFFFF
UNKNOWN_ID_MODES = ("count", "quarantine")
DEFAULT_RECONNECT_MIN_S = 0.5
DEFAULT_RECONNECT_MAX_S = 30.0
#: A busy 500 kbit/s bus carries ~4000 frames/s, ~80 per 20 ms poll: plenty of headroom.
DEFAULT_MAX_FRAMES_PER_POLL = 1000


def _positive(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or value <= 0:
        raise FieldProblem(attr.name, f"must be > 0 (got {value!r})")


def _known_interface(inst: Any, attr: attrs.Attribute, value: str) -> None:
    import can  # lazily: only configs with a CAN sensor pay for the import

    if value not in can.VALID_INTERFACES:
        names = ", ".join(sorted(can.VALID_INTERFACES))
        raise FieldProblem(
            attr.name,
            f"must be a python-can interface name (got {value!r}); python-can {can.__version__} "
            f"has: {names}. On a Raspberry Pi with a CAN HAT use 'socketcan'",
        )


def _can_id(inst: Any, attr: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not 0 <= value <= EXTENDED_ID_MAX:
        raise FieldProblem(attr.name, f"must be in 0..0x1FFFFFFF (got {value!r})")


@attrs.frozen
class CanFilterSettings:
    """One receive filter (``filters = [{can_id = ..., can_mask = ...}]``).

    A frame passes when ``frame_id & can_mask == can_id & can_mask`` and its id type (11 or
    29 bit) is the filter's. Error frames always pass (they report the bus's health).
    """

    #: The identifier to match (11-bit unless ``extended``).
    can_id: int = attrs.field(validator=_can_id)
    #: Which bits of the identifier must match; the default matches every bit (exactly
    #: ``can_id``); 0 matches every identifier of the filter's type.
    can_mask: int = attrs.field(default=EXTENDED_ID_MAX, validator=_can_id)
    #: Match 29-bit (extended) identifiers instead of 11-bit ones.
    extended: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.extended and self.can_id > STANDARD_ID_MAX:
            raise FieldProblem(
                "can_id",
                f"must be <= 0x7FF for an 11-bit identifier (got {self.can_id:#x}); "
                "set extended = true for a 29-bit one",
            )

    def as_python_can(self) -> dict[str, Any]:
        """The filter as python-can's ``can_filters`` entry."""
        return {"can_id": self.can_id, "can_mask": self.can_mask, "extended": self.extended}


@attrs.frozen
class CanSourceSettings:
    """A CAN bus read through python-can and decoded with a DBC file (cantools).

    One reading per received frame whose identifier the DBC defines: its signals, decoded and
    scaled, are the reading's values. See `actors.sensors.can` for names, kinds and timestamps.
    """

    #: The DBC file describing the bus's messages (cantools also reads .kcd, .sym and .arxml
    #: by extension). Required. A relative path is relative to the gateway's working directory.
    dbc: str = attrs.field()
    #: python-can interface: ``socketcan`` on the Pi (a CAN HAT, or ``vcan0`` for a bench);
    #: ``virtual`` (in-process, tests) and ``udp_multicast`` (across processes: demo, tests).
    interface: str = attrs.field(default="socketcan", validator=_known_interface)
    #: The bus: the network interface for socketcan (``can0``; required), the multicast group
    #: address for udp_multicast (empty: 239.74.163.2), any name for virtual (empty:
    #: ``channel-0``); other interfaces: as python-can documents them (empty: their default).
    channel: str = ""
    #: UDP port of udp_multicast (0: python-can's default, 43113); must be 0 elsewhere.
    port: int = attrs.field(default=0)
    #: Bit rate in bit/s handed to the interface; 0 leaves the interface's own. Must be 0 for
    #: socketcan: the OS sets it (``ip link set can0 up type can bitrate 500000``).
    bitrate: int = attrs.field(default=0)
    #: Receive filters; a frame passes when one matches. Empty: every frame. socketcan filters
    #: in the kernel; other interfaces filter in the source.
    filters: tuple[CanFilterSettings, ...] = ()
    #: Reading kind per DBC message name, e.g. ``{EngineData = "engine"}``. A message not
    #: listed gets its own name as the kind (characters outside [A-Za-z0-9_.:-/] become "_").
    kinds: dict[str, str] = attrs.field(factory=dict, hash=False)  # a dict: not hashable
    #: Enumerated signals (DBC ``VAL_``): false gives the raw number, true the label string
    #: (a number without a label stays a number).
    decode_choices: bool = False
    #: Frames whose identifier the DBC does not define: ``count`` them (per identifier, in
    #: the figures) or also ``quarantine`` each one (raw bytes kept for an operator).
    unknown_ids: str = attrs.field(default="count")
    #: Backoff between reconnect attempts after the bus failed: starts at the min, doubles
    #: per failed attempt up to the max (seconds; a little jitter is taken off).
    reconnect_min_s: float = attrs.field(default=DEFAULT_RECONNECT_MIN_S, validator=_positive)
    reconnect_max_s: float = attrs.field(default=DEFAULT_RECONNECT_MAX_S, validator=_positive)
    #: Frames read per poll at most (unknown, error and refused frames count too), so one
    #: poll stays short on a flooded bus.
    max_frames_per_poll: int = attrs.field(
        default=DEFAULT_MAX_FRAMES_PER_POLL, validator=_positive
    )

    @dbc.validator
    def _check_dbc(self, attr: attrs.Attribute, value: str) -> None:
        if not value.strip():
            raise FieldProblem("dbc", "must name the DBC file describing the bus (got '')")

    @kinds.validator
    def _check_kinds(self, attr: attrs.Attribute, value: dict[str, str]) -> None:
        for name, kind in value.items():
            if not name:
                raise FieldProblem("kinds", "keys must be DBC message names (got '')")
            if not IDENT_RE.match(kind):
                raise FieldProblem(
                    f"kinds.{name}",
                    f"must be 1-128 characters from [A-Za-z0-9_.:-/] (got {kind!r})",
                )

    @unknown_ids.validator
    def _check_unknown(self, attr: attrs.Attribute, value: str) -> None:
        if value not in UNKNOWN_ID_MODES:
            raise FieldProblem(
                "unknown_ids", f"must be one of {', '.join(UNKNOWN_ID_MODES)} (got {value!r})"
            )

    @port.validator
    def _check_port(self, attr: attrs.Attribute, value: int) -> None:
        if not 0 <= value <= 65535:
            raise FieldProblem("port", f"must be a UDP port in 1..65535, or 0 (got {value!r})")

    @bitrate.validator
    def _check_bitrate(self, attr: attrs.Attribute, value: int) -> None:
        if value < 0:
            raise FieldProblem("bitrate", f"must be >= 0 (got {value!r}); 0 keeps the bus's")

    def __attrs_post_init__(self) -> None:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise FieldProblem(
                "reconnect_max_s",
                f"must be >= reconnect_min_s ({self.reconnect_min_s}) (got {self.reconnect_max_s})",
            )
        if self.port and self.interface != "udp_multicast":
            raise FieldProblem(
                "port", f"is for interface udp_multicast only (got {self.port} with "
                        f"{self.interface!r}); leave it 0"
            )
        if self.interface == "socketcan":
            if not self.channel:
                raise FieldProblem(
                    "channel", "must name the CAN network interface for socketcan, e.g. 'can0' "
                               "(see `ip -br link show type can`)"
                )
            if self.bitrate:
                raise FieldProblem(
                    "bitrate",
                    f"must be 0 for socketcan (got {self.bitrate}): the OS sets it, e.g. "
                    f"`ip link set {self.channel} up type can bitrate {self.bitrate}`",
                )
        if self.interface == "udp_multicast" and self.channel:
            try:
                multicast = ipaddress.ip_address(self.channel).is_multicast
            except ValueError:
                multicast = False
            if not multicast:
                raise FieldProblem(
                    "channel", f"must be a multicast group address for udp_multicast, e.g. "
                               f"{UDP_MULTICAST_DEFAULT_GROUP!r} (got {self.channel!r})"
                )

    @property
    def bus_channel(self) -> str:
        """The channel handed to python-can (the documented default when ``channel`` is empty)."""
        if self.channel:
            return self.channel
        if self.interface == "udp_multicast":
            return UDP_MULTICAST_DEFAULT_GROUP
        if self.interface == "virtual":
            return VIRTUAL_DEFAULT_CHANNEL
        return ""

    def bus_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``can.Bus`` for this bus (filters are applied by the source)."""
        kwargs: dict[str, Any] = {"interface": self.interface}
        if self.bus_channel:
            kwargs["channel"] = self.bus_channel
        if self.bitrate:
            kwargs["bitrate"] = self.bitrate
        if self.port:
            kwargs["port"] = self.port
        if self.interface == "socketcan" and self.filters:
            kwargs["can_filters"] = [f.as_python_can() for f in self.filters]
        return kwargs
