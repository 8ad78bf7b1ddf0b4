"""NMEA 0183 source settings: where a GPS's sentences come from and which ones become readings.

Where this sits on the data path: before step 1. An NMEA sensor's `NmeaSourceSettings` (a TOML
table) tells `actors.sensors.nmea.NmeaSource` what to open — a serial port, a TCP server (a GPS
daemon's raw port, a replay tool) or a local UDP port — and which sentence types to turn into
readings. Validation does no I/O.

Example::

    { source = "serial:///dev/ttyACM0?baud=9600", sentences = ["GGA", "RMC"], kind = "gps" }
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import attrs

from config.schema import FieldProblem

DEFAULT_SOURCE = "udp://127.0.0.1:10110"  # 10110: the IANA port for NMEA 0183 over IP
DEFAULT_SENTENCES = ("GGA", "RMC", "VTG", "GSA")
#: Sentence types a reading can be made of (others are counted as ignored).
SUPPORTED_SENTENCES = ("GGA", "GLL", "GSA", "RMC", "VTG")
#: NMEA 0183 allows 82 bytes per sentence, '$' and CR LF included.
NMEA_MAX_LINE_BYTES = 82
DEFAULT_MAX_LINE_BYTES = 120
MAX_LINE_BYTES_LIMIT = 4096
DEFAULT_BAUD = 9600
SCHEMES = ("serial", "tcp", "udp")
_URL_HELP = ("serial:///dev/ttyACM0?baud=9600, tcp://host:port (connect to a server) or "
             "udp://127.0.0.1:10110 (bind a local port)")


@attrs.frozen
class NmeaEndpoint:
    """A parsed ``source`` URL: ``scheme`` is serial, tcp or udp; ``host``/``port`` for tcp and
    udp (udp: the local address bound; port 0 picks a free one), ``path``/``baud`` for
    serial."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""
    baud: int = DEFAULT_BAUD

    def __str__(self) -> str:
        if self.scheme == "serial":
            return f"serial://{self.path}?baud={self.baud}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_source(url: str, field: str = "source") -> NmeaEndpoint:
    """The endpoint ``url`` names; raises FieldProblem(``field``, ...) for anything else."""
    bad = f"must be a URL like {_URL_HELP} (got {url!r})"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FieldProblem(field, f"{bad}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise FieldProblem(field, bad)
    if parts.fragment or parts.username or parts.password:
        raise FieldProblem(field, bad)
    if scheme == "serial":
        if parts.netloc or not parts.path.startswith("/"):
            raise FieldProblem(field, f"must name a device path: serial:///dev/ttyACM0 (three "
                                      f"slashes) (got {url!r})")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - {"baud"})
        if unknown:
            raise FieldProblem(field, f"knows only the serial option baud (got "
                                      f"{', '.join(unknown)} in {url!r})")
        baud = DEFAULT_BAUD
        if "baud" in query:
            text = query["baud"]
            if not text.isdigit() or not 50 <= int(text) <= 4_000_000:
                raise FieldProblem(field, f"baud must be a rate in 50..4000000 such as 9600 or "
                                          f"115200 (got {text!r})")
            baud = int(text)
        return NmeaEndpoint("serial", path=parts.path, baud=baud)
    if parts.path not in ("", "/") or parts.query:
        raise FieldProblem(field, f"{scheme} URLs take only host:port (got {url!r})")
    host = parts.hostname or ""
    if scheme == "tcp":
        if not host or port is None or port == 0:
            raise FieldProblem(field, f"must name the server to connect to: tcp://host:port "
                                      f"(got {url!r})")
    else:
        if port is None:
            raise FieldProblem(field, f"must name the local port to bind: udp://127.0.0.1:10110 "
                                      f"(got {url!r})")
        host = host or "127.0.0.1"  # nothing listens beyond loopback unless configured (I9)
    return NmeaEndpoint(scheme, host=host, port=port)


def _ident(inst: object, attr: attrs.Attribute, value: str) -> None:
    from messages.readings import IDENT_RE

    if not isinstance(value, str) or not IDENT_RE.match(value):
        raise FieldProblem(attr.name, f"must be 1-128 characters from [A-Za-z0-9_.:-/] "
                                      f"(got {value!r})")


@attrs.frozen
class NmeaSourceSettings:
    """An NMEA 0183 source (GPS receiver): where from, which sentences, how to reconnect."""

    #: ``serial:///dev/ttyACM0?baud=9600`` (baud defaults to 9600), ``tcp://host:port`` (a
    #: client connection, e.g. a GPS daemon's raw port or `python -m tools.nmea_replay`) or
    #: ``udp://127.0.0.1:10110`` (bind that local address; ``udp://:10110`` binds loopback).
    source: str = DEFAULT_SOURCE
    #: Sentence types (without talker: GGA matches GPGGA and GNGGA) that become readings, from
    #: GGA, GLL, GSA, RMC, VTG. Others are counted as ignored, not quarantined. Must not be
    #: empty.
    sentences: tuple[str, ...] = DEFAULT_SENTENCES
    #: The readings' kind.
    kind: str = attrs.field(default="gps", validator=_ident)
    #: Longest line accepted, bytes, CR LF included (82..4096). NMEA 0183 says 82; the default
    #: leaves room for receivers' high-precision modes. A longer line is cut and quarantined.
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    #: After a lost connection (or a failed open) the next attempt waits ``reconnect_min_s``,
    #: doubling up to ``reconnect_max_s`` while attempts keep failing, seconds.
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def __attrs_post_init__(self) -> None:
        parse_source(self.source)
        if not self.sentences:
            raise FieldProblem("sentences", f"must name at least one of "
                                            f"{', '.join(SUPPORTED_SENTENCES)}")
        for name in self.sentences:
            if name not in SUPPORTED_SENTENCES:
                raise FieldProblem("sentences", f"must name types from "
                                                f"{', '.join(SUPPORTED_SENTENCES)}, without the "
                                                f"talker (GGA, not GPGGA) (got {name!r})")
        if isinstance(self.max_line_bytes, bool) or not (
            NMEA_MAX_LINE_BYTES <= self.max_line_bytes <= MAX_LINE_BYTES_LIMIT
        ):
            raise FieldProblem("max_line_bytes", f"must be in {NMEA_MAX_LINE_BYTES}.."
                                                 f"{MAX_LINE_BYTES_LIMIT} (got "
                                                 f"{self.max_line_bytes!r})")
        if not self.reconnect_min_s > 0:
            raise FieldProblem("reconnect_min_s", f"must be > 0 (got {self.reconnect_min_s!r})")
        if not self.reconnect_max_s >= self.reconnect_min_s:
            raise FieldProblem("reconnect_max_s", f"must be >= reconnect_min_s "
                                                  f"({self.reconnect_min_s}) (got "
                                                  f"{self.reconnect_max_s!r})")

    @property
    def endpoint(self) -> NmeaEndpoint:
        """``source`` parsed."""
        return parse_source(self.source)
