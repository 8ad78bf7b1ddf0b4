"""Replay an NMEA 0183 log to a gateway's NMEA source; write the demo drive log.

Where this sits: outside the data path, a stand-in GPS receiver for demos and tests. It sends
a log's sentences, paced epoch by epoch (an epoch: the sentences of one fix time), to an
`NmeaSource`:

    python -m tools.nmea_replay config/demo_drive.nmea udp://127.0.0.1:10110 --rate 5 [--loop]
    python -m tools.nmea_replay config/demo_drive.nmea tcp://127.0.0.1:10110 --rate 5

``udp://host:port`` sends datagrams there (one per sentence, or one per epoch with
``--per-epoch``); ``tcp://host:port`` listens there (loopback unless told otherwise), waits for
the first client and streams to every connected client, as a GPS daemon's raw port does.

``python -m tools.nmea_replay --write-demo config/demo_drive.nmea`` regenerates the demo log
from `demo_drive` (deterministic): a 5-minute 1 Hz drive through Lisbon with RMC, VTG, GGA and
GSA per epoch (GSV every 10 s, which the default source settings ignore), a tunnel without a
fix, and a few deliberately bad lines (checksum errors, truncated sentences, binary junk) so a
demo shows the quarantine.
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

EARTH_R_M = 6_371_008.8
DEMO_LOG = Path(__file__).resolve().parent.parent / "config" / "demo_drive.nmea"
#: Sentence types whose first field is the fix time (GLL has it in its fifth).
_TIMED = {"GGA": 1, "RMC": 1, "GNS": 1, "ZDA": 1, "GST": 1, "GLL": 5}


# ---- sentences and logs ------------------------------------------------------------------------
def sentence(body: str) -> str:
    """``$body*hh`` with the NMEA checksum (XOR of the body's bytes)."""
    checksum = 0
    for byte in body.encode("ascii"):
        checksum ^= byte
    return f"${body}*{checksum:02X}"


def read_log(path: str | Path) -> list[bytes]:
    """A log's lines as bytes, line ends removed, empty lines skipped (bad bytes kept)."""
    data = Path(path).read_bytes()
    return [line.rstrip(b"\r") for line in data.split(b"\n") if line.strip()]


def epoch_time(line: bytes) -> bytes | None:
    """The fix time field of a timed sentence (GGA, RMC, GLL, ...), else None."""
    if line[:1] not in (b"$", b"!"):
        return None
    fields = line.split(b"*", 1)[0].split(b",")
    index = _TIMED.get(fields[0][3:6].decode("ascii", "replace"))
    if index is None or index >= len(fields) or not fields[index]:
        return None
    return fields[index]


def epochs(lines: Iterable[bytes]) -> list[list[bytes]]:
    """Lines grouped by fix time: a new epoch starts where a timed sentence's time differs
    from the current epoch's; untimed and bad lines stay with the epoch they are in."""
    groups: list[list[bytes]] = []
    current: bytes | None = None
    for line in lines:
        t = epoch_time(line)
        if not groups or (t is not None and current is not None and t != current):
            groups.append([])
        if t is not None:
            current = t
        groups[-1].append(line)
    return groups


def restamp(line: bytes, now: datetime) -> bytes:
    """``line`` with its fix time (and an RMC's date) set to ``now``, checksum recomputed —
    only for a well-formed sentence whose checksum was right: a bad line stays bad."""
    if not line.startswith(b"$") or b"*" not in line:
        return line
    body, _, tail = line[1:].partition(b"*")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        return line
    if sentence(text).encode() != line[:len(body) + 4] or len(tail) != 2:
        return line  # bad checksum or a truncated line: replayed as it is
    fields = text.split(",")
    index = _TIMED.get(fields[0][2:5])
    if index is None or index >= len(fields) or not fields[index]:
        return line
    fields[index] = now.strftime("%H%M%S.") + f"{now.microsecond // 10000:02d}"
    if fields[0][2:5] == "RMC" and len(fields) > 9:
        fields[9] = now.strftime("%d%m%y")
    return sentence(",".join(fields)).encode()


# ---- replay ------------------------------------------------------------------------------------
def _endpoint(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("udp", "tcp") or parts.port is None:
        raise ValueError(f"target must be udp://host:port or tcp://host:port (got {url!r})")
    return parts.scheme, parts.hostname or "127.0.0.1", parts.port


def replay(
    lines: Sequence[bytes],
    target_url: str,
    rate_hz: float = 1.0,
    *,
    loop: bool = False,
    per_epoch: bool = False,
    stop: threading.Event | None = None,
    on_listen: Callable[[tuple[str, int]], None] | None = None,
    wait_for_client: bool = True,
    live: bool = False,
) -> int:
    """Send ``lines`` to ``target_url`` at ``rate_hz`` epochs per second (<= 0: as fast as
    possible); returns the number of lines sent (to the first client for TCP).

    udp://host:port: datagrams to that address, one per line (``per_epoch``: one per epoch).
    tcp://host:port: listen there (port 0: a free one; ``on_listen`` gets the address), wait
    for the first client (``wait_for_client``), then stream each epoch to every client
    connected. ``loop`` repeats the log until ``stop`` is set; ``stop`` ends the replay early.
    ``live``: each epoch carries the time it is sent (`restamp`), as a receiver would now.
    """
    scheme, host, port = _endpoint(target_url)
    stop = stop or threading.Event()
    groups = epochs(lines)
    if not groups:
        return 0
    sender = _UdpSender(host, port, per_epoch) if scheme == "udp" else _TcpServer(host, port)
    try:
        if on_listen is not None:
            on_listen(sender.address)
        if isinstance(sender, _TcpServer) and wait_for_client:
            while not sender.clients and not stop.is_set():
                sender.accept(timeout=0.1)
        sent = 0
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        start = time.monotonic()
        k = 0
        while not stop.is_set():
            for group in groups:
                delay = start + k * period - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return sent
                if live:
                    now = datetime.now(UTC)
                    group = [restamp(line, now) for line in group]
                sent += sender.send(group)
                k += 1
            if not loop:
                break
        return sent
    finally:
        sender.close()


class _UdpSender:
    def __init__(self, host: str, port: int, per_epoch: bool) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.target, self.per_epoch = (host, port), per_epoch
        self.address = (host, port)

    def send(self, group: list[bytes]) -> int:
        try:
            if self.per_epoch:
                self.sock.sendto(b"".join(line + b"\r\n" for line in group), self.target)
            else:
                for line in group:
                    self.sock.sendto(line + b"\r\n", self.target)
        except OSError:
            return 0  # nobody listening (ICMP refused) or a full buffer: like a real GPS
        return len(group)

    def close(self) -> None:
        self.sock.close()


class _TcpServer:
    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(8)
        self.address = self.listener.getsockname()[:2]
        self.clients: list[socket.socket] = []
        self.first: socket.socket | None = None

    def accept(self, timeout: float = 0.0) -> None:
        self.listener.settimeout(timeout)
        try:
            while True:
                client, _ = self.listener.accept()
                client.settimeout(2.0)
                self.clients.append(client)
                self.first = self.first or client
                self.listener.settimeout(0.0)
        except (BlockingIOError, TimeoutError, OSError):
            return

    def send(self, group: list[bytes]) -> int:
        self.accept()
        data = b"".join(line + b"\r\n" for line in group)
        sent = 0
        for client in list(self.clients):
            try:
                client.sendall(data)
                if client is self.first:
                    sent = len(group)
            except OSError:  # the client went away (or stalled): drop it
                self.clients.remove(client)
                client.close()
        return sent

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.listener.close()


# ---- the demo drive ----------------------------------------------------------------------------
#: Legs of the drive: (seconds, target speed km/h, turn rate deg/s, satellites lost).
_DEMO_LEGS = (
    (12, 0, 0.0, False),     # parked, engine running
    (55, 42, 0.0, False),    # pull away east-north-east along the avenue
    (9, 18, 10.0, False),    # right turn
    (48, 50, 0.0, False),
    (14, 0, 0.0, False),     # brake for a red light
    (18, 0, 0.0, False),     # wait
    (30, 45, 0.0, False),
    (16, 55, 0.0, True),     # through a tunnel: no fix
    (24, 55, -0.6, False),   # gentle left curve
    (10, 16, -9.0, False),   # left turn
    (44, 38, 0.0, False),
    (20, 0, 0.0, False),     # stop at the delivery address
)
#: Deliberately bad lines: epoch -> (kind, sentence index in the epoch).
_DEMO_BAD = {41: ("checksum", 2), 97: ("truncated", 0), 133: ("junk", 1), 188: ("checksum", 0),
             236: ("truncated", 2)}
_SATS = ((2, 45, 120), (5, 30, 200), (7, 62, 50), (9, 18, 280), (13, 15, 310), (15, 55, 160),
         (18, 40, 90), (20, 25, 240), (24, 70, 20), (26, 12, 330), (29, 35, 170), (30, 50, 60))


def _dm(value: float, width: int) -> str:
    """Degrees -> NMEA ddmm.mmmmm (``width`` degree digits)."""
    value = abs(value)
    degrees = int(value)
    minutes = round((value - degrees) * 60.0, 5)
    if minutes >= 60.0:
        degrees, minutes = degrees + 1, 0.0
    return f"{degrees:0{width}d}{minutes:08.5f}"


def demo_drive(start: datetime = datetime(2024, 5, 14, 9, 30, tzinfo=UTC),
               lat0: float = 38.7369, lon0: float = -9.1427) -> list[str]:
    """The demo drive's log lines (deterministic; bad lines included, see `_DEMO_BAD`)."""
    lines: list[str] = []
    lat, lon, heading, v = lat0, lon0, 68.0, 0.0
    distance = 0.0
    t = 0
    for seconds, target_kmh, turn, no_fix in _DEMO_LEGS:
        for _ in range(seconds):
            # kinematics, 1 s steps: at most 2 m/s^2 either way
            target = target_kmh / 3.6
            v = min(target, v + 2.0) if v < target else max(target, v - 2.5)
            heading = (heading + turn * (v > 0.5)) % 360.0
            north = v * math.cos(math.radians(heading))
            east = v * math.sin(math.radians(heading))
            lat += math.degrees(north / EARTH_R_M)
            lon += math.degrees(east / (EARTH_R_M * math.cos(math.radians(lat))))
            distance += v
            when = start + timedelta(seconds=t)
            epoch = _demo_epoch(when, t, lat, lon, heading, v, distance, no_fix)
            bad = _DEMO_BAD.get(t)
            if bad is not None:
                kind, index = bad
                epoch[index] = _spoil(epoch[index], kind)
            lines.extend(epoch)
            t += 1
    return lines


def _demo_epoch(when: datetime, t: int, lat: float, lon: float, heading: float, v: float,
                distance: float, no_fix: bool) -> list[str]:
    hms = when.strftime("%H%M%S") + ".00"
    dmy = when.strftime("%d%m%y")
    knots = v * 3.6 / 1.852
    sats = 0 if no_fix else 8 + round(2.0 * math.sin(t / 37.0) + math.sin(t / 11.0))
    hdop = round(0.5 + 4.5 / sats, 2) if sats else 99.99
    alt = 62.0 + 18.0 * math.sin(distance / 900.0)
    lat_s, ns = _dm(lat, 2), "N" if lat >= 0 else "S"
    lon_s, ew = _dm(lon, 3), "E" if lon >= 0 else "W"
    used = ",".join([f"{s[0]:02d}" for s in _SATS[:sats]] + [""] * (12 - sats))
    course = f"{heading:.2f}"
    if no_fix:
        epoch = [
            sentence(f"GNRMC,{hms},V,,,,,,,{dmy},,,N"),
            sentence("GNVTG,,T,,M,,N,,K,N"),
            sentence(f"GNGGA,{hms},,,,,0,00,99.99,,,,,,"),
            sentence("GNGSA,A,1,,,,,,,,,,,,,99.99,99.99,99.99"),
        ]
    else:
        pdop, vdop = round(hdop * 1.7, 2), round(hdop * 1.4, 2)
        epoch = [
            sentence(f"GNRMC,{hms},A,{lat_s},{ns},{lon_s},{ew},{knots:.3f},{course},{dmy},,,A"),
            sentence(f"GNVTG,{course},T,,M,{knots:.3f},N,{v * 3.6:.3f},K,A"),
            sentence(f"GNGGA,{hms},{lat_s},{ns},{lon_s},{ew},1,{sats:02d},{hdop:.2f},"
                     f"{alt:.1f},M,50.2,M,,"),
            sentence(f"GNGSA,A,3,{used},{pdop:.2f},{hdop:.2f},{vdop:.2f}"),
        ]
    if t % 10 == 0:
        in_view = _SATS[:4]
        body = ",".join(f"{prn:02d},{elev:02d},{az:03d},{30 + prn % 15}" for prn, elev, az
                        in in_view)
        epoch.append(sentence(f"GPGSV,1,1,{len(in_view):02d},{body}"))
    return epoch


def _spoil(line: str, kind: str) -> str:
    if kind == "checksum":  # one character changed in transit, the checksum kept
        i = line.index(",", 10) + 2
        return line[:i] + ("7" if line[i] != "7" else "3") + line[i + 1:]
    if kind == "truncated":  # the receiver's buffer overran mid-sentence
        return line[: len(line) * 2 // 3]
    return "\u00b5b\x01\x07\x5c\x01\xe8\x03\x8a\x1f"  # a binary UBX message leaking in


def write_demo(path: str | Path = DEMO_LOG) -> int:
    """Write the demo drive log (LF line ends; the junk line as Latin-1 bytes); returns the
    number of lines."""
    lines = demo_drive()
    Path(path).write_bytes(b"".join(line.encode("latin-1") + b"\n" for line in lines))
    return len(lines)


# ---- command line ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.nmea_replay",
        description="Replay an NMEA 0183 log over UDP (datagrams) or TCP (serve it).",
    )
    parser.add_argument("file", help="NMEA log, one sentence per line")
    parser.add_argument("target", nargs="?", help="udp://host:port or tcp://host:port")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="epochs per second (default 1; 0 = as fast as possible)")
    parser.add_argument("--loop", action="store_true", help="repeat the log until interrupted")
    parser.add_argument("--per-epoch", action="store_true",
                        help="udp: one datagram per epoch instead of one per sentence")
    parser.add_argument("--live", action="store_true",
                        help="stamp each epoch with the current UTC time (good sentences only)")
    parser.add_argument("--write-demo", action="store_true",
                        help="write the demo drive log to FILE and exit")
    args = parser.parse_args(argv)
    if args.write_demo:
        n = write_demo(args.file)
        print(f"wrote {n} lines to {args.file}")
        return 0
    if not args.target:
        parser.error("a target (udp://host:port or tcp://host:port) is required")
    try:
        lines = read_log(args.file)
        _endpoint(args.target)
    except (OSError, ValueError) as exc:
        print(f"nmea_replay: {exc}", file=sys.stderr)
        return 2

    def listening(address: tuple[str, int]) -> None:
        if args.target.startswith("tcp"):
            print(f"serving {args.file} on tcp://{address[0]}:{address[1]}; waiting for a client")

    try:
        sent = replay(lines, args.target, args.rate, loop=args.loop, per_epoch=args.per_epoch,
                      on_listen=listening, live=args.live)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"nmea_replay: {args.target}: {exc}", file=sys.stderr)
        return 1
    print(f"sent {sent} lines to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
