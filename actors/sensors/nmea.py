"""NMEA 0183 GPS source: sentences from a serial port, a TCP server or a UDP port -> readings.

Where this sits on the data path: just before step 1. An NMEA sensor actor calls
`NmeaSource.poll` every tick; the source reads what its connection has (never blocking), cuts it
into lines, checks each (printable ASCII, ``$``, checksum ``*hh`` verified, pynmea2 parse,
strict field syntax) and returns one `Reading` per accepted sentence and a `QuarantinedInput`
for each bad line (I8), with a reason an operator can act on. A sentence type not configured
is only counted (``ignored``, once its checksum is right). Connection trouble never raises: it
is recorded (``problem``, ``state``), and the source reconnects with a doubling backoff. A
stream connection's unfinished line is quarantined when the connection ends (never glued to
the next connection's data), and the first line of a new connection is dropped (counted in
``fragments_dropped``) when it does not start with ``$``: the tail of a sentence sent before
we connected.

Readings: ``kind`` from the settings; the values use the simulator's gps names where they mean
the same, and leave out whatever the sentence leaves empty:

=====  ==========================================================================================
all    ``sentence`` ("GGA"), ``talker`` ("GP", "GN", ...; absent for proprietary sentences)
GGA    lat, lon (signed decimal degrees), alt_m, geoid_m, sats, hdop, ``quality`` (the GGA fix
       quality 0..8), fix (0: no fix, 1: 2D, 2: 3D — GGA does not say 2D or 3D, so a fix
       with an altitude counts as 3D)
RMC    lat, lon, speed_kmh, course_deg, mag_var_deg (west negative), ``status`` ("A"/"V"),
       ``mode`` (FAA mode letter), fix = 0 when status is V or mode is N
VTG    course_deg, course_mag_deg, speed_kmh (the km/h field, else knots converted), mode
GSA    fix (GSA's fix type 1/2/3 as 0/1/2), ``selection`` ("A"/"M"), ``sats_used`` (satellites
       listed — one constellation's on multi-GNSS receivers), pdop, hdop, vdop, ``system``
       (NMEA 4.11 system id)
GLL    lat, lon, status, mode, fix = 0 when status is V
=====  ==========================================================================================

A sentence that says it has no fix (GGA quality 0, RMC/GLL status V) carries no position,
altitude, speed or course: receivers fill those with stale or guessed values. Such a sentence
is still a reading (fix = 0 and what else is left), so "fix lost" is visible.

Timestamps: a sentence's UTC time of day is combined with the date of the last RMC, so a
replayed log keeps its own times; across UTC midnight the day is the one that puts the time
nearest the previous sentence's. Sentences without a time (VTG, GSA, an empty time field)
take the time of the last timed sentence. Before any RMC date is known, when the known date
is older than `DATE_MAX_AGE_S` of the gateway's clock, or when an RMC date is outside
2000..2200 (a receiver without a valid almanac), readings carry the receive time (counted in
``ts_from_receive``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from datetime import date

import pynmea2

from config.nmea import NmeaEndpoint, NmeaSourceSettings
from messages.errors import MessageValidationError
from messages.journal import QuarantinedInput
from messages.readings import TS_MAX_NS, TS_MIN_NS, Reading

NS = 1_000_000_000
DAY_NS = 86_400 * NS
KNOTS_TO_KMH = 1.852
#: A known date is trusted this long (gateway monotonic seconds) after the last timed sentence.
DATE_MAX_AGE_S = 600.0
#: A sentence without its own time takes the last timed sentence's time when that came at most
#: this many seconds (gateway monotonic) before it; else the receive time.
UNTIMED_MAX_AGE_S = 5.0
CONNECT_TIMEOUT_S = 5.0
READ_CHUNK = 65536
UDP_RCVBUF = 1 << 20
#: Bytes read per poll at most (the rest waits for the next poll).
READ_BUDGET = 1 << 18
#: Quarantine reason codes (``quarantined_<code>`` in `NmeaSource.figures`).
REASONS = ("not_ascii", "no_start", "no_checksum", "truncated", "bad_checksum", "malformed",
           "bad_field", "too_long", "partial", "invalid")
#: Fewest fields each sentence has (NMEA 0183 2.x); fewer means the line lost its tail.
MIN_FIELDS = {"GGA": 14, "RMC": 11, "VTG": 8, "GSA": 17, "GLL": 6}
_IGNORED_TYPES_MAX = 16

_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_INT = re.compile(r"\d+")
_TIME = re.compile(r"(\d\d)(\d\d)(\d\d)(\.\d+)?")
_LAT = re.compile(r"(\d{1,2})([0-5]\d(?:\.\d*)?)")
_LON = re.compile(r"(\d{1,3})([0-5]\d(?:\.\d*)?)")


class _Refused(ValueError):
    """A line is refused: ``code`` (one of REASONS) and the operator-facing reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# ---- field syntax (pynmea2's converters return the raw text on error; these refuse) ---------
def _num(stype: str, name: str, text: str) -> float | None:
    if not text:
        return None
    if not _NUM.fullmatch(text):
        raise _Refused("bad_field", f"{stype} field {name} {text!r} is not a number")
    return float(text)


def _int(stype: str, name: str, text: str) -> int | None:
    if not text:
        return None
    if not _INT.fullmatch(text) or len(text) > 6:
        raise _Refused("bad_field", f"{stype} field {name} {text!r} is not a small whole number")
    return int(text)


def _letter(stype: str, name: str, text: str, allowed: str) -> str | None:
    if not text:
        return None
    if len(text) != 1 or text not in allowed:
        raise _Refused("bad_field", f"{stype} field {name} {text!r} must be one of "
                                    f"{', '.join(allowed)}")
    return text


def _time_of_day(stype: str, text: str) -> int | None:
    """hhmmss[.sss] -> ns since midnight (a leap second 60 is kept)."""
    if not text:
        return None
    m = _TIME.fullmatch(text)
    if not m or int(m[1]) > 23 or int(m[2]) > 59 or int(m[3]) > 60:
        raise _Refused("bad_field", f"{stype} field time {text!r} is not hhmmss.ss UTC")
    frac = round(float(m[4]) * NS) if m[4] else 0
    return (int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])) * NS + frac


def _date(text: str) -> int | None:
    """ddmmyy -> ns since the epoch of that midnight UTC (yy < 80: 20yy, else 19yy)."""
    if not text:
        return None
    if len(text) != 6 or not text.isdigit():
        raise _Refused("bad_field", f"RMC field date {text!r} is not ddmmyy")
    yy = int(text[4:])
    try:
        day = date(2000 + yy if yy < 80 else 1900 + yy, int(text[2:4]), int(text[:2]))
    except ValueError:
        raise _Refused("bad_field", f"RMC field date {text!r} is not a calendar date") from None
    return (day.toordinal() - 719_163) * DAY_NS  # 719163: date(1970, 1, 1).toordinal()


def _coordinate(stype: str, d: list[str], i: int, out: dict) -> None:
    """lat (ddmm.mm, N/S) at d[i], d[i+1] and lon (dddmm.mm, E/W) at d[i+2], d[i+3]."""
    for name, pattern, limit, signs, k in (("lat", _LAT, 90.0, "NS", i), ("lon", _LON, 180.0,
                                                                             "EW", i + 2)):
        text, hemi = d[k], d[k + 1]
        if not text and not hemi:
            continue
        m = pattern.fullmatch(text)
        if not m:
            raise _Refused("bad_field", f"{stype} field {name} {text!r} is not "
                                        f"{'ddmm.mmmm' if name == 'lat' else 'dddmm.mmmm'}")
        value = int(m[1]) + float(m[2]) / 60.0
        if value > limit or hemi not in signs or not hemi:
            raise _Refused("bad_field", f"{stype} field {name} {text!r},{hemi!r} is out of range "
                                        f"or lacks its {'/'.join(signs)} direction")
        out[name] = round(-value if hemi == signs[1] else value, 8)


def _field(d: list[str], i: int) -> str:
    return d[i] if i < len(d) else ""


# ---- the sentences: data fields -> (values, time of day ns or None, date ns or None) ---------
def _gga(d: list[str]) -> tuple[dict, int | None, int | None]:
    v: dict = {}
    tod = _time_of_day("GGA", d[0])
    quality = _int("GGA", "quality", d[5])
    _coordinate("GGA", d, 1, v)
    alt = _num("GGA", "altitude", d[8])
    if alt is not None:
        v["alt_m"] = alt
    geoid = _num("GGA", "geoid separation", d[10])
    if geoid is not None:
        v["geoid_m"] = geoid
    sats, hdop = _int("GGA", "satellites", d[6]), _num("GGA", "hdop", d[7])
    if sats is not None:
        v["sats"] = sats
    if hdop is not None:
        v["hdop"] = hdop
    if quality is not None:
        v["quality"] = quality
        if quality == 0:
            for name in ("lat", "lon", "alt_m", "geoid_m"):
                v.pop(name, None)
            v["fix"] = 0
        else:
            v["fix"] = 2 if alt is not None else 1
    return v, tod, None


def _rmc(d: list[str]) -> tuple[dict, int | None, int | None]:
    v: dict = {}
    tod = _time_of_day("RMC", d[0])
    status = _letter("RMC", "status", d[1], "AV")
    _coordinate("RMC", d, 2, v)
    speed, course = _num("RMC", "speed", d[6]), _num("RMC", "course", d[7])
    if speed is not None:
        v["speed_kmh"] = round(speed * KNOTS_TO_KMH, 3)
    if course is not None:
        v["course_deg"] = course
    day = _date(d[8])
    var = _num("RMC", "magnetic variation", d[9])
    if var is not None:
        hemi = _letter("RMC", "variation direction", d[10], "EW")
        v["mag_var_deg"] = -var if hemi == "W" else var
    mode = _letter("RMC", "mode", _field(d, 11), "ADEFMNPRS")
    if status is not None:
        v["status"] = status
    if mode is not None:
        v["mode"] = mode
    if status == "V" or mode == "N":
        for name in ("lat", "lon", "speed_kmh", "course_deg"):
            v.pop(name, None)
        v["fix"] = 0
    return v, tod, day


def _vtg(d: list[str]) -> tuple[dict, int | None, int | None]:
    v: dict = {}
    course, mag = _num("VTG", "course", d[0]), _num("VTG", "magnetic course", d[2])
    knots, kmh = _num("VTG", "speed knots", d[4]), _num("VTG", "speed km/h", d[6])
    if course is not None:
        v["course_deg"] = course
    if mag is not None:
        v["course_mag_deg"] = mag
    if kmh is not None:
        v["speed_kmh"] = kmh
    elif knots is not None:
        v["speed_kmh"] = round(knots * KNOTS_TO_KMH, 3)
    mode = _letter("VTG", "mode", _field(d, 8), "ADEFMNPRS")
    if mode is not None:
        v["mode"] = mode
    return v, None, None


def _gsa(d: list[str]) -> tuple[dict, int | None, int | None]:
    v: dict = {}
    selection = _letter("GSA", "selection mode", d[0], "AM")
    fix_type = _letter("GSA", "fix type", d[1], "123")
    if selection is not None:
        v["selection"] = selection
    if fix_type is not None:
        v["fix"] = int(fix_type) - 1
    used = [s for s in d[2:14] if s]
    for s in used:
        _int("GSA", "satellite id", s)
    v["sats_used"] = len(used)
    for name, text in (("pdop", d[14]), ("hdop", d[15]), ("vdop", d[16])):
        value = _num("GSA", name, text)
        if value is not None:
            v[name] = value
    system = _field(d, 17)
    if system:
        if len(system) != 1 or system not in "0123456789ABCDEF":
            raise _Refused("bad_field", f"GSA field system id {system!r} is not a hex digit")
        v["system"] = int(system, 16)
    return v, None, None


def _gll(d: list[str]) -> tuple[dict, int | None, int | None]:
    v: dict = {}
    _coordinate("GLL", d, 0, v)
    tod = _time_of_day("GLL", _field(d, 4))
    status = _letter("GLL", "status", _field(d, 5), "AV")
    mode = _letter("GLL", "mode", _field(d, 6), "ADEFMNPRS")
    if status is not None:
        v["status"] = status
    if mode is not None:
        v["mode"] = mode
    if status == "V" or mode == "N":
        v.pop("lat", None)
        v.pop("lon", None)
        v["fix"] = 0
    return v, tod, None


_HANDLERS: dict[str, Callable[[list[str]], tuple[dict, int | None, int | None]]] = {
    "GGA": _gga, "RMC": _rmc, "VTG": _vtg, "GSA": _gsa, "GLL": _gll,
}


class NmeaParser:
    """Lines -> readings, with the date/time state that stamps them (see module doc).

    `parse` returns a Reading, a QuarantinedInput, or None for an empty line or an ignored
    sentence; ``counts`` counts each outcome (``readings``, ``ignored``, the REASONS, ...).
    """

    def __init__(self, settings: NmeaSourceSettings, sensor_id: str, device_id: str,
                 source: str) -> None:
        self.sensor_id, self.device_id, self.kind = sensor_id, device_id, settings.kind
        self.source = source
        self.max_line_bytes = settings.max_line_bytes
        self._wanted = frozenset(settings.sentences)
        self.counts: dict[str, int] = dict.fromkeys(
            ("readings", "ignored", "quarantined", "ts_from_receive", "bad_dates", *REASONS), 0
        )
        self.ignored_types: list[str] = []
        #: UTC (ns) of the last timed sentence once a date is known, and when it came (mono).
        self._last_utc: int | None = None
        self._last_mono = 0.0

    def quarantine(self, code: str, reason: str, raw: bytes, received_ns: int
                   ) -> QuarantinedInput:
        self.counts[code] += 1
        self.counts["quarantined"] += 1
        return QuarantinedInput.of(self.source, reason, raw, received_ns)

    def parse(self, line: bytes, received_ns: int, mono: float
              ) -> Reading | QuarantinedInput | None:
        try:
            return self._parse(line, received_ns, mono)
        except _Refused as exc:
            return self.quarantine(exc.code, str(exc), line, received_ns)

    def _parse(self, line: bytes, received_ns: int, mono: float) -> Reading | None:
        text_b = line.rstrip(b"\r\n")
        if not text_b.strip():
            return None
        if len(text_b) + 2 > self.max_line_bytes:
            raise _Refused("too_long", f"line too long: {len(text_b) + 2} bytes with CR LF, "
                                       f"max_line_bytes is {self.max_line_bytes} (NMEA 0183: 82)")
        bad = _NOT_PRINTABLE.search(text_b)
        if bad:
            raise _Refused("not_ascii", f"not NMEA text: byte 0x{bad[0][0]:02x} at offset "
                                        f"{bad.start()} is not printable ASCII")
        text = text_b.decode("ascii")
        if text[0] not in "$!":
            raise _Refused("no_start", f"no sentence start: a sentence begins with '$' "
                                       f"(line begins {text[:16]!r})")
        star = text.rfind("*")
        if star < 0:
            raise _Refused("no_checksum", "no checksum: '*hh' missing at the end (a truncated "
                                          "line, or a sender without checksums)")
        given = text[star + 1:]
        if not _HEX2.fullmatch(given):
            if len(given) < 2 and all(c in "0123456789ABCDEFabcdef" for c in given):
                raise _Refused("truncated", f"truncated: the checksum is cut short "
                                            f"('*{given}')")
            raise _Refused("malformed", f"malformed: the checksum must be two hex digits "
                                        f"after '*' (got '*{given[:8]}')")
        body = text[1:star]
        computed = 0
        for byte in body.encode("ascii"):
            computed ^= byte
        if computed != int(given, 16):
            raise _Refused("bad_checksum", f"checksum mismatch: the line says *{given.upper()}, "
                                           f"its content gives *{computed:02X} (corrupted)")
        # the address: talker + type (GPGGA), or a proprietary P... sentence
        address = body.split(",", 1)[0]
        if address[:1] == "P":
            talker, stype = "", address
        elif len(address) == 5 and address.isalnum():
            talker, stype = address[:2], address[2:]
        else:
            raise _Refused("malformed", f"malformed: address {address[:12]!r} is not a talker "
                                        f"and sentence type such as GPGGA")
        if stype not in self._wanted:
            self.counts["ignored"] += 1
            if stype not in self.ignored_types and len(self.ignored_types) < _IGNORED_TYPES_MAX:
                self.ignored_types.append(stype)
            return None
        try:
            msg = pynmea2.parse(text, check=True)
        except pynmea2.ParseError as exc:
            detail = exc.args[0][0] if exc.args and isinstance(exc.args[0], tuple) else exc
            raise _Refused("malformed", f"malformed: pynmea2 cannot parse it ({detail})") from None
        data = msg.data
        if len(data) < MIN_FIELDS[stype]:
            raise _Refused("truncated", f"truncated: {stype} has {len(data)} fields, expected at "
                                        f"least {MIN_FIELDS[stype]}")
        values, tod, day = _HANDLERS[stype](data)
        values["sentence"] = stype
        if talker:
            values["talker"] = talker
        ts = self._stamp(tod, day, received_ns, mono)
        try:
            reading = Reading(self.device_id, self.sensor_id, ts, self.kind, values)
        except MessageValidationError as exc:
            raise _Refused("invalid", f"invalid reading: {exc}") from None
        self.counts["readings"] += 1
        return reading

    def _stamp(self, tod: int | None, day: int | None, received_ns: int, mono: float) -> int:
        """The reading's time (see module doc: date of the last RMC + time of day)."""
        last = self._last_utc
        if last is not None and mono - self._last_mono > DATE_MAX_AGE_S:
            last = self._last_utc = None  # the date may be stale: wait for the next RMC
        if tod is not None and day is not None:
            utc = day + tod
            if TS_MIN_NS <= utc < TS_MAX_NS:
                self._last_utc, self._last_mono = utc, mono
                return utc
            self.counts["bad_dates"] += 1
        elif tod is not None and last is not None:
            utc = last - last % DAY_NS + tod
            if utc - last > DAY_NS // 2:
                utc -= DAY_NS  # a late sentence from before midnight
            elif last - utc > DAY_NS // 2:
                utc += DAY_NS  # past midnight before the next RMC
            if TS_MIN_NS <= utc < TS_MAX_NS:
                self._last_utc, self._last_mono = utc, mono
                return utc
        elif tod is None and last is not None and mono - self._last_mono <= UNTIMED_MAX_AGE_S:
            return last
        self.counts["ts_from_receive"] += 1
        return received_ns


class LineFramer:
    """A byte stream -> lines (LF or CR LF ended, the end kept). A line longer than
    ``max_bytes`` is cut: its first ``max_bytes`` come out flagged as overlong and the rest is
    dropped up to the next LF (also when no LF has arrived yet: memory stays bounded)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._discarding = False
        self.discarded_bytes = 0

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """(line, overlong) pairs completed by ``data``."""
        buf = self._buf
        buf += data
        out: list[tuple[bytes, bool]] = []
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if self._discarding:
                self.discarded_bytes += end + 1 - start
                self._discarding = False
            elif end + 1 - start > self.max_bytes:
                out.append((bytes(buf[start:start + self.max_bytes]), True))
                self.discarded_bytes += end + 1 - start - self.max_bytes
            else:
                out.append((bytes(buf[start:end + 1]), False))
            start = end + 1
        del buf[:start]
        if len(buf) > self.max_bytes:
            if not self._discarding:
                out.append((bytes(buf[:self.max_bytes]), True))
                self.discarded_bytes += len(buf) - self.max_bytes
                self._discarding = True
            else:
                self.discarded_bytes += len(buf)
            buf.clear()
        return out

    def take_partial(self) -> bytes:
        """The unfinished line (for a connection that ended); the framer starts afresh."""
        partial = b"" if self._discarding else bytes(self._buf)
        self._buf.clear()
        self._discarding = False
        return partial


class _Transport:
    """One open connection: ``read`` returns bytes (None: nothing now; b"" only for an empty
    datagram) or raises ConnectionError/OSError when the connection is gone."""

    stream = True

    def fileno(self) -> int: ...

    def read(self) -> bytes | None: ...

    def close(self) -> None: ...


class _SocketTransport(_Transport):
    def __init__(self, sock: socket.socket, stream: bool) -> None:
        self.sock, self.stream = sock, stream

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bytes | None:
        try:
            if self.stream:
                data = self.sock.recv(READ_CHUNK)
                if not data:
                    raise ConnectionError("the server closed the connection")
                return data
            return self.sock.recv(READ_CHUNK)  # one datagram
        except (BlockingIOError, InterruptedError):
            return None

    def close(self) -> None:
        self.sock.close()


class _SerialTransport(_Transport):
    def __init__(self, endpoint: NmeaEndpoint) -> None:
        import serial  # pyserial

        self.port = serial.Serial(baudrate=endpoint.baud, timeout=0, exclusive=True)
        self.port.port = endpoint.path
        self.port.open()

    def fileno(self) -> int:
        return self.port.fileno()

    def read(self) -> bytes | None:
        return self.port.read(READ_CHUNK) or None

    def close(self) -> None:
        self.port.close()


def _sockaddr(host: str, port: int, kind: int) -> tuple[int, tuple]:
    """(family, address); a host name is resolved here (blocking: prefer IP addresses or
    names from /etc/hosts)."""
    try:
        ip = ipaddress.ip_address(host)
        return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)
    except ValueError:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=kind)[0]
        return family, addr


class NmeaSource:
    """An NMEA 0183 source (standard sensor source contract: open, poll, fileno, figures,
    close). See the module doc for values, timestamps and what is quarantined."""

    def __init__(self, settings: NmeaSourceSettings, sensor_id: str, device_id: str, *,
                 clock_ns: Callable[[], int] = time.time_ns,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.endpoint = settings.endpoint
        self.name = str(self.endpoint)
        self.parser = NmeaParser(settings, sensor_id, device_id, self.name)
        self.framer = LineFramer(settings.max_line_bytes)
        self._clock_ns, self._clock = clock_ns, clock
        self._transport: _Transport | None = None
        self._connecting: socket.socket | None = None
        self._connect_deadline = 0.0
        self._state = "closed"
        self._retry_at = 0.0
        self._backoff = settings.reconnect_min_s
        self._fresh = False  # the next line is the first of a new stream connection
        self._got_data = False
        #: (line, received ns, tag): tag "" a line, "overlong", "partial" (cut by a disconnect)
        self._pending: deque[tuple[bytes, int, str]] = deque()
        self.problem = ""
        self.counts = dict.fromkeys(("connects", "disconnects", "connect_failures", "bytes",
                                     "lines", "fragments_dropped"), 0)

    # ---- contract ----------------------------------------------------------------------------
    def open(self) -> None:
        """First connect attempt; I/O trouble is recorded and retried, never raised."""
        self._backoff = self.settings.reconnect_min_s
        self._connect()

    def poll(self, max_items: int) -> tuple[list[Reading], list[QuarantinedInput]]:
        """Readings and quarantined inputs now available (at most ``max_items`` together);
        never blocks, never raises for I/O trouble."""
        readings: list[Reading] = []
        quarantined: list[QuarantinedInput] = []
        if self._state == "backoff" and self._clock() >= self._retry_at:
            self._connect()
        if self._state == "connecting":
            self._check_connect()
        budget = READ_BUDGET
        lines_left = 4 * max_items + 64  # ignored sentences cost time too
        parse, parser = self.parser.parse, self.parser
        while len(readings) + len(quarantined) < max_items and lines_left > 0:
            if not self._pending:
                if self._state != "open" or budget <= 0:
                    break
                got = self._read()
                if got < 0 and not self._pending:  # nothing now (or lost: partial pending)
                    break
                budget -= max(got, 1)
                continue
            line, received_ns, tag = self._pending.popleft()
            lines_left -= 1
            self.counts["lines"] += 1
            if tag == "overlong":
                result: Reading | QuarantinedInput | None = parser.quarantine(
                    "too_long", f"line too long: no line end within max_line_bytes="
                                f"{self.settings.max_line_bytes} bytes (cut here, the rest "
                                f"dropped)", line, received_ns)
            elif tag == "partial":
                result = parser.quarantine(
                    "partial", "partial: the connection ended in the middle of this line",
                    line, received_ns)
            elif tag == "first" and line.lstrip()[:1] not in (b"$", b"!", b""):
                self.counts["fragments_dropped"] += 1  # the tail of a sentence sent earlier
                continue
            else:
                result = parse(line, received_ns, self._clock())
            if result is None:
                continue
            if isinstance(result, Reading):
                readings.append(result)
            else:
                quarantined.append(result)
        return readings, quarantined

    def fileno(self) -> int | None:
        """The socket's or serial port's fd while open (readable when data waits), else None."""
        if self._state != "open" or self._transport is None:
            return None
        try:
            return self._transport.fileno()
        except (OSError, ValueError):
            return None

    def figures(self) -> dict[str, int | float | str]:
        """Counters (stable names) plus ``state`` (closed, connecting, open, backoff),
        ``problem`` ("" when fine), ``retry_in_s`` and ``ignored_types``."""
        figures: dict[str, int | float | str] = {"state": self._state, "problem": self.problem}
        figures.update(self.counts)
        counts = self.parser.counts
        for name in ("readings", "ignored", "quarantined", "ts_from_receive", "bad_dates"):
            figures[name] = counts[name]
        for code in REASONS:
            figures[f"quarantined_{code}"] = counts[code]
        figures["discarded_bytes"] = self.framer.discarded_bytes
        figures["ignored_types"] = ",".join(self.parser.ignored_types)
        figures["retry_in_s"] = round(max(0.0, self._retry_at - self._clock()), 3) \
            if self._state == "backoff" else 0.0
        return figures

    def close(self) -> None:
        """Close the connection; poll returns nothing until `open` again."""
        self._drop_connection()
        self._pending.clear()
        self._state = "closed"

    @property
    def address(self) -> tuple | None:
        """The bound (udp) or peer (tcp) socket address while open, else None."""
        if isinstance(self._transport, _SocketTransport):
            sock = self._transport.sock
            return sock.getsockname() if not self._transport.stream else sock.getpeername()
        return None

    # ---- connection --------------------------------------------------------------------------
    def _connect(self) -> None:
        self._drop_connection()
        ep = self.endpoint
        try:
            if ep.scheme == "serial":
                self._opened(_SerialTransport(ep))
            elif ep.scheme == "udp":
                family, addr = _sockaddr(ep.host, ep.port, socket.SOCK_DGRAM)
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    # room for bursts between polls (the kernel caps it at rmem_max)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
                    sock.bind(addr)
                except OSError:
                    sock.close()
                    raise
                self._opened(_SocketTransport(sock, stream=False))
            else:
                family, addr = _sockaddr(ep.host, ep.port, socket.SOCK_STREAM)
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                err = sock.connect_ex(addr)
                if err in (0, errno.EISCONN):
                    self._opened(_SocketTransport(sock, stream=True))
                elif err in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                    self._connecting, self._state = sock, "connecting"
                    self._connect_deadline = self._clock() + CONNECT_TIMEOUT_S
                else:
                    sock.close()
                    raise OSError(err, _strerror(err))
        except Exception as exc:  # OSError, serial errors, resolver errors: retry later
            self._failed(f"cannot open: {_describe(exc)}")

    def _check_connect(self) -> None:
        sock = self._connecting
        assert sock is not None
        try:
            _, writable, _ = select.select([], [sock], [], 0)
        except (OSError, ValueError) as exc:
            self._failed(f"cannot connect: {_describe(exc)}")
            return
        if writable:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._connecting = None
            if err == 0:
                self._opened(_SocketTransport(sock, stream=True))
            else:
                sock.close()
                self._failed(f"cannot connect: {_strerror(err)}")
        elif self._clock() >= self._connect_deadline:
            self._failed(f"cannot connect: no answer within {CONNECT_TIMEOUT_S:g} s")

    def _opened(self, transport: _Transport) -> None:
        self._transport, self._state, self.problem = transport, "open", ""
        self._fresh = transport.stream
        self._got_data = False
        self.counts["connects"] += 1

    def _failed(self, problem: str) -> None:
        self._drop_connection()
        self.counts["connect_failures"] += 1
        self._backoff_then(problem)

    def _lost(self, problem: str) -> None:
        partial = self.framer.take_partial()
        if partial.strip():
            self._pending.append((partial, self._clock_ns(), "partial"))
        self._drop_connection()
        self.counts["disconnects"] += 1
        if self._got_data:  # the connection worked: start the backoff afresh
            self._backoff = self.settings.reconnect_min_s
        self._backoff_then(problem)

    def _backoff_then(self, problem: str) -> None:
        delay = self._backoff
        self._backoff = min(self.settings.reconnect_max_s, self._backoff * 2)
        self._state, self._retry_at = "backoff", self._clock() + delay
        self.problem = f"{self.name}: {problem}; retrying in {delay:g} s"

    def _drop_connection(self) -> None:
        for closable in (self._transport, self._connecting):
            if closable is not None:
                with contextlib.suppress(Exception):  # a broken connection may fail to close
                    closable.close()
        self._transport = self._connecting = None
        self.framer.take_partial()

    def _read(self) -> int:
        """Read one chunk (a datagram) into the pending lines; returns the bytes read, -1 when
        nothing was waiting or the connection was lost."""
        transport = self._transport
        assert transport is not None
        try:
            data = transport.read()
        except Exception as exc:  # OSError, serial errors: the connection is gone
            self._lost(f"connection lost: {_describe(exc)}")
            return -1
        if data is None:
            return -1
        self._got_data = True
        self.counts["bytes"] += len(data)
        received_ns = self._clock_ns()
        pending = self._pending
        if not transport.stream:  # a datagram ends its last line
            for line in data.split(b"\n"):
                if line.strip():
                    pending.append((line, received_ns, ""))
            return len(data)
        for line, overlong in self.framer.feed(data):
            tag = "overlong" if overlong else ""
            if self._fresh:
                self._fresh = False
                tag = tag or "first"
            pending.append((line, received_ns, tag))
        return len(data)


def _strerror(err: int) -> str:
    return os.strerror(err).lower()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]
