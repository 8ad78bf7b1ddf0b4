"""CAN bus source: frames from python-can, decoded with a DBC file (cantools), as readings.

Where this sits on the data path: just before step 1, like the ``sim`` source. A CanSensor
actor calls `CanSource.poll` every tick (and when `CanSource.fileno` is readable), hands the
readings to its `SensorOutbox` and the quarantined inputs to the journal (I8). The source never
blocks and never raises for bus trouble: a failed bus is closed, reopened after a backoff, and
the trouble shows in `CanSource.figures` (``state``, ``problem``, counters).

What a frame becomes (`FrameDecoder`):

- a data frame whose identifier (and id type: 11 or 29 bit) the DBC defines, with the DBC's
  length: one `Reading` — kind = ``kinds[message name]`` or the message name; values = the
  decoded, scaled signals (for a multiplexed message, those the multiplexer selects) named
  after the signals (characters outside [A-Za-z0-9_.:-/] become "_", leading "_" dropped);
  an enumerated signal gives its raw number, or its label when ``decode_choices``. No extra
  values are added: the kind names the message.
- its timestamp: the frame's (python-can ``msg.timestamp``, kernel receive time on socketcan)
  rounded to the microsecond; when that is missing or further than `MAX_CLOCK_SKEW_NS` from
  the receive clock (adapters that count from their own power-up), the receive clock.
- a data frame with the wrong length, one cantools cannot decode, or one whose values break
  `Reading`'s rules (e.g. a NaN float signal): a `QuarantinedInput` and ``decode_failures``.
- a frame the DBC does not know: counted per identifier (``unknown_ids``, ``unknown_top``) and,
  when ``unknown_ids = "quarantine"``, quarantined too.
- an error frame: counted (``error_frames``; ``bus_off`` for CAN_ERR_BUSOFF), described in
  ``last_error``; a remote (RTR) frame: counted (``remote_frames``).

- a udp_multicast datagram python-can cannot unpack: a frame that failed to decode (its bytes
  are not available: python-can drops them), quarantined; the bus stays open.

Always: ``frames == readings + unknown_ids + decode_failures + error_frames + remote_frames``
(frames dropped by the filters are not frames; they count in ``filtered``); ``quarantined``
counts the `QuarantinedInput` values handed out. The bus side adds ``bus_errors`` (failed opens
and receives), ``reconnects`` (reopens after the bus had been open), ``state``, ``problem``.
The receive clock is ``clock_ns()`` read once per poll.

A quarantined frame's ``source`` is ``can:0x1a0`` (``can:0x18ff50e5`` for a 29-bit id, always 8
digits) and its ``raw`` the SocketCAN layout: the 4-byte big-endian id (bit 31 set for a 29-bit
id) followed by the data bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import can
import cantools

from config.can import CanSourceSettings
from messages.errors import MessageValidationError
from messages.journal import QuarantinedInput
from messages.readings import IDENT_RE, TS_MAX_NS, TS_MIN_NS, Reading, Value

NS = 1_000_000_000
#: A frame timestamp further than this from the receive clock is not the wall clock (many
#: adapters count from their own power-up): the receive clock is used instead.
MAX_CLOCK_SKEW_NS = 300 * NS
#: Unknown identifiers counted one by one (more distinct ones count only in the total), and
#: how many of the most frequent the ``unknown_top`` figure names.
UNKNOWN_TRACKED = 256
UNKNOWN_TOP = 5
#: Reconnect delays lose up to this fraction at random, so gateways do not retry in step.
JITTER = 0.25
#: SocketCAN's flag for a 29-bit identifier in a raw can_id, and the error classes of an error
#: frame's identifier (linux/can/error.h).
CAN_EFF_FLAG = 0x80000000
CAN_ERR_BUSOFF = 0x040
CAN_ERR_CRTL = 0x004
_ERROR_CLASSES = (
    (0x001, "tx-timeout"), (0x002, "lost-arbitration"), (CAN_ERR_CRTL, "controller"),
    (0x008, "protocol-violation"), (0x010, "transceiver"), (0x020, "no-ack"),
    (CAN_ERR_BUSOFF, "bus-off"), (0x080, "bus-error"), (0x100, "restarted"),
)
_CONTROLLER = (
    (0x01, "rx-overflow"), (0x02, "tx-overflow"), (0x04, "rx-warning"), (0x08, "tx-warning"),
    (0x10, "rx-passive"), (0x20, "tx-passive"), (0x40, "back-to-active"),
)
_TS_MIN_S, _TS_MAX_S = TS_MIN_NS // NS, TS_MAX_NS // NS
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-/]")


def safe_name(name: str, fallback: str = "signal") -> str:
    """``name`` as an identifier of `IDENT_RE` (unsafe characters become "_", a leading
    non-alphanumeric is dropped, at most 128 characters); ``fallback`` when nothing is left."""
    name = _UNSAFE.sub("_", name).lstrip("_.:-/")[:128]
    return name if name and IDENT_RE.match(name) else fallback


def id_text(frame_id: int, extended: bool) -> str:
    """An identifier as operators read it: ``0x1A0``, ``0x18FF50E5`` (29-bit: 8 digits)."""
    return f"0x{frame_id:08X}" if extended else f"0x{frame_id:03X}"


def raw_frame(msg: can.Message) -> bytes:
    """A frame's bytes for quarantine: 4-byte big-endian id (bit 31: 29-bit id) + data."""
    can_id = (msg.arbitration_id & 0x1FFFFFFF) | (CAN_EFF_FLAG if msg.is_extended_id else 0)
    return struct.pack(">I", can_id) + bytes(msg.data or b"")


def describe_error_frame(msg: can.Message) -> str:
    """The error classes of a SocketCAN error frame, e.g. ``controller (rx-passive)``."""
    classes = [name for bit, name in _ERROR_CLASSES if msg.arbitration_id & bit]
    data = bytes(msg.data or b"")
    if msg.arbitration_id & CAN_ERR_CRTL and len(data) > 1:
        detail = [name for bit, name in _CONTROLLER if data[1] & bit]
        if detail:
            classes[classes.index("controller")] = f"controller ({', '.join(detail)})"
    return ", ".join(classes) or f"error frame {msg.arbitration_id:#x}"


def load_dbc(path: str, sensor_id: str) -> cantools.database.can.Database:
    """Load and check the DBC file. Raises ValueError naming the file and what helps."""
    where = f"CAN sensor {sensor_id}: DBC file {path!r}"
    try:
        db = cantools.database.load_file(path)
    except FileNotFoundError:
        raise ValueError(
            f"{where} not found (setting dbc; a relative path is taken from {os.getcwd()})"
        ) from None
    except IsADirectoryError:
        raise ValueError(f"{where} is a directory, not a DBC file (setting dbc)") from None
    except OSError as exc:
        raise ValueError(f"{where} cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # cantools: UnsupportedDatabaseFormatError, parse errors
        raise ValueError(f"{where} cannot be parsed: {exc}") from None
    if not isinstance(db, cantools.database.can.Database) or not db.messages:
        raise ValueError(f"{where} defines no CAN messages; nothing could be decoded")
    return db


class _Message:
    """What the decoder needs of one DBC message, prepared once."""

    __slots__ = ("kind", "label", "length", "message", "names", "source")

    def __init__(self, message: Any, kind: str) -> None:
        self.message = message
        self.kind = kind
        self.length = message.length
        ident = id_text(message.frame_id, message.is_extended_frame)
        self.label = f"{message.name} ({ident})"
        self.source = f"can:{ident.lower()}"
        # Value names: identifier-safe signal names, made unique when sanitising collides.
        self.names: dict[str, str] = {}
        taken: set[str] = set()
        for signal in message.signals:
            name = base = safe_name(signal.name)
            n = 1
            while name in taken:
                n += 1
                name = f"{base[:120]}_{n}"
            taken.add(name)
            self.names[signal.name] = name


class FrameDecoder:
    """Turns received frames into readings or quarantined inputs and counts every outcome.

    Pure logic over one loaded DBC: no bus, no clock (the caller passes the receive time).
    Build with `from_settings`.
    """

    def __init__(
        self, db: Any, settings: CanSourceSettings, sensor_id: str, device_id: str,
        dbc_path: str = "",
    ) -> None:
        self.settings, self.sensor_id, self.device_id = settings, sensor_id, device_id
        #: How reasons name the DBC: its file name (the full path is in the config).
        self.dbc_name = os.path.basename(dbc_path) or "the DBC"
        names = {m.name for m in db.messages}
        missing = sorted(set(settings.kinds) - names)
        if missing:
            raise ValueError(
                f"CAN sensor {sensor_id}: kinds names message(s) {', '.join(missing)} that "
                f"DBC file {dbc_path!r} does not define (it defines: {', '.join(sorted(names))})"
            )
        self._messages = {
            (m.frame_id, bool(m.is_extended_frame)): _Message(
                m, settings.kinds.get(m.name) or safe_name(m.name, "can")
            )
            for m in db.messages
        }
        self._filters = tuple(
            (f.can_id, f.can_mask, f.extended) for f in settings.filters
        )
        self._decode_choices = settings.decode_choices
        self._quarantine_unknown = settings.unknown_ids == "quarantine"
        self.frames = self.readings = self.unknown_ids = self.decode_failures = 0
        self.error_frames = self.bus_off = self.remote_frames = self.filtered = 0
        self.clock_fallbacks = self.quarantined = 0
        self.last_error = ""
        self.unknown_by_id: Counter[tuple[int, bool]] = Counter()

    @classmethod
    def from_settings(
        cls, settings: CanSourceSettings, sensor_id: str, device_id: str
    ) -> FrameDecoder:
        """Load ``settings.dbc`` and prepare. Raises ValueError (file, problem, what helps)."""
        return cls(load_dbc(settings.dbc, sensor_id), settings, sensor_id, device_id, settings.dbc)

    def passes(self, msg: can.Message) -> bool:
        """Whether the configured filters let the frame through (error frames always pass)."""
        if not self._filters or msg.is_error_frame:
            return True
        frame_id, extended = msg.arbitration_id, bool(msg.is_extended_id)
        return any(
            ext == extended and (can_id ^ frame_id) & mask == 0
            for can_id, mask, ext in self._filters
        )

    def decode(self, msg: can.Message, received_ns: int) -> Reading | QuarantinedInput | None:
        """One frame's outcome: a reading, a quarantined input, or None (counted only)."""
        if not self.passes(msg):
            self.filtered += 1
            return None
        self.frames += 1
        if msg.is_error_frame:
            self.error_frames += 1
            self.last_error = describe_error_frame(msg)
            if msg.arbitration_id & CAN_ERR_BUSOFF:
                self.bus_off += 1
            return None
        if msg.is_remote_frame:
            self.remote_frames += 1
            return None
        key = (msg.arbitration_id, bool(msg.is_extended_id))
        info = self._messages.get(key)
        if info is None:
            return self._unknown(msg, key, received_ns)
        data = bytes(msg.data or b"")
        if len(data) != info.length:
            return self._refuse(
                info, msg, f"{len(data)} data bytes, {self.dbc_name} says {info.length}",
                received_ns,
            )
        try:
            decoded = info.message.decode(
                data, decode_choices=self._decode_choices, allow_excess=False
            )
        except Exception as exc:  # cantools DecodeError, or anything a corner case raises
            return self._refuse(info, msg, f"cannot decode: {exc}", received_ns)
        names = info.names
        values: dict[str, Value] = {}
        for signal, value in decoded.items():
            if not isinstance(value, int | float):  # NamedSignalValue: the label
                value = str(getattr(value, "name", value))
            values[names.get(signal) or safe_name(signal)] = value
        try:
            reading = Reading(
                self.device_id, self.sensor_id, self._frame_ns(msg.timestamp, received_ns),
                info.kind, values,
            )
        except MessageValidationError as exc:
            return self._refuse(info, msg, str(exc), received_ns)
        self.readings += 1
        return reading

    def garbled(self, source: str, reason: str, received_ns: int) -> QuarantinedInput:
        """Something arrived that is not even a frame (e.g. a stray datagram on the
        udp_multicast group): counted as a frame that failed to decode, and quarantined."""
        self.frames += 1
        self.decode_failures += 1
        self.quarantined += 1
        return QuarantinedInput.of(source, reason, b"", received_ns)

    def figures(self) -> dict[str, int | str]:
        top = ", ".join(
            f"{id_text(i, ext)}={n}" for (i, ext), n in self.unknown_by_id.most_common(UNKNOWN_TOP)
        )
        return {
            "frames": self.frames, "readings": self.readings, "unknown_ids": self.unknown_ids,
            "decode_failures": self.decode_failures, "error_frames": self.error_frames,
            "bus_off": self.bus_off, "remote_frames": self.remote_frames,
            "filtered": self.filtered, "quarantined": self.quarantined,
            "clock_fallbacks": self.clock_fallbacks, "unknown_top": top,
            "last_error": self.last_error,
        }

    # ---- helpers -----------------------------------------------------------------------
    def _frame_ns(self, ts: Any, received_ns: int) -> int:
        if isinstance(ts, int | float) and _TS_MIN_S <= ts < _TS_MAX_S:  # False for NaN
            ns = round(ts * 1e6) * 1000
            if abs(ns - received_ns) <= MAX_CLOCK_SKEW_NS:
                return ns
        self.clock_fallbacks += 1
        return received_ns

    def _unknown(
        self, msg: can.Message, key: tuple[int, bool], received_ns: int
    ) -> QuarantinedInput | None:
        self.unknown_ids += 1
        if key in self.unknown_by_id or len(self.unknown_by_id) < UNKNOWN_TRACKED:
            self.unknown_by_id[key] += 1
        if not self._quarantine_unknown:
            return None
        self.quarantined += 1
        ident = id_text(*key)
        kind = "29-bit" if key[1] else "11-bit"
        reason = (f"unknown CAN id {ident} ({kind}, {len(msg.data or b'')} data bytes): "
                  f"{self.dbc_name} does not define it")
        return QuarantinedInput.of(f"can:{ident.lower()}", reason, raw_frame(msg), received_ns)

    def _refuse(
        self, info: _Message, msg: can.Message, why: str, received_ns: int
    ) -> QuarantinedInput:
        self.decode_failures += 1
        self.quarantined += 1
        return QuarantinedInput.of(info.source, f"{info.label}: {why}", raw_frame(msg),
                                   received_ns)


def _default_bus(**kwargs: Any) -> can.BusABC:
    # ignore_config: no ~/can.ini or CAN_* environment variables sneaking into the bus.
    return can.Bus(ignore_config=True, **kwargs)


class CanSource:
    """A CAN bus as a source of readings (see the module docstring for what a frame becomes).

    ``state``: ``new`` (before `open`), ``open`` (bus up), ``backoff`` (bus down, reopened on
    a poll after the delay), ``closed``. ``bus_factory`` builds the bus from
    `CanSourceSettings.bus_kwargs` (default: ``can.Bus`` without config files); tests and
    embedders may pass their own. ``rng`` draws the backoff jitter. ``bus`` is the python-can
    bus while one is open (None otherwise); ``decoder`` the `FrameDecoder` after `open`.
    """

    def __init__(
        self, settings: CanSourceSettings, sensor_id: str, device_id: str, *,
        clock_ns: Callable[[], int] = time.time_ns, clock: Callable[[], float] = time.monotonic,
        bus_factory: Callable[..., can.BusABC] = _default_bus, rng: random.Random | None = None,
    ) -> None:
        for field, value in (("sensor_id", sensor_id), ("device_id", device_id)):
            if not IDENT_RE.match(value):
                raise MessageValidationError("CanSource", field, value, "an identifier "
                                             "([A-Za-z0-9_.:-/], starting with a letter or digit)")
        self.settings, self.sensor_id, self.device_id = settings, sensor_id, device_id
        self._clock_ns, self._clock = clock_ns, clock
        self._bus_factory, self._rng = bus_factory, rng or random.Random()
        self.decoder: FrameDecoder | None = None
        self.bus: can.BusABC | None = None
        self.state = "new"
        self.problem = ""
        self.reconnects = self.bus_errors = self.opens = 0
        self._failures = 0  # consecutive failures: the backoff exponent
        self._retry_at = 0.0
        self._healthy = False  # a frame arrived since the last (re)open
        self._bus_state: Any = None
        self._state_supported = False
        self.name = f"{settings.interface}:{settings.bus_channel or '-'}"

    # ---- the source contract -------------------------------------------------------------
    def open(self) -> None:
        """Load the DBC and make the first connection attempt.

        Raises ValueError for what no retry cures: the DBC missing, unreadable or unparseable,
        ``kinds`` naming messages the DBC lacks, an interface python-can cannot load here or
        whose arguments it refuses. A bus that cannot be opened now (e.g. can0 not up yet, an
        adapter unplugged) is retried after a backoff.
        """
        self._shutdown()  # opened again: start afresh
        self.decoder = FrameDecoder.from_settings(self.settings, self.sensor_id, self.device_id)
        self._connect(first=True)

    def poll(self, max_items: int) -> tuple[list[Reading], list[QuarantinedInput]]:
        """Up to ``max_items`` readings from the frames waiting now (never blocks, never raises
        for bus trouble), plus what was quarantined meanwhile."""
        readings: list[Reading] = []
        quarantined: list[QuarantinedInput] = []
        decoder = self.decoder
        if decoder is None or self.state == "closed":
            return readings, quarantined
        if self.bus is None and not (self._clock() >= self._retry_at and self._connect()):
            return readings, quarantined
        bus = self.bus
        received_ns = self._clock_ns()
        for _ in range(self.settings.max_frames_per_poll):
            if len(readings) >= max_items:
                break
            try:
                msg = bus.recv(timeout=0)
            except Exception as exc:  # CanError, OSError, or a driver's own
                if _is_garbled_datagram(exc):
                    quarantined.append(decoder.garbled(
                        f"can:{self.name}", f"undecodable datagram on {self.name}: "
                        f"{exc.__cause__ or exc}", received_ns))
                    continue
                self._fail(f"receive on {self.name} failed: {_describe(exc)}")
                break
            if msg is None:
                break
            out = decoder.decode(msg, received_ns)
            if out is None:
                if msg.is_error_frame and msg.arbitration_id & CAN_ERR_BUSOFF:
                    self.problem = (f"bus-off reported by the CAN controller on {self.name}; "
                                    "check wiring, termination and bitrate")
                continue
            if isinstance(out, Reading):
                readings.append(out)
                if not self._healthy or self.problem:  # data flows: the trouble is over
                    self._healthy, self._failures, self.problem = True, 0, ""
            else:
                quarantined.append(out)
        if self.bus is not None and self._state_supported:
            self._check_bus_state()
        return readings, quarantined

    def fileno(self) -> int | None:
        """The bus's file descriptor (socketcan, udp_multicast) to watch for readability, or
        None (no bus now, or an interface without one). It changes when the bus is reopened."""
        if self.bus is None:
            return None
        try:
            fd = self.bus.fileno()
        except Exception:  # NotImplementedError: e.g. the virtual interface
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None

    def figures(self) -> dict[str, int | float | str]:
        """Counters (stable names; see the module docstring) plus ``state``, ``problem``,
        ``bus`` (interface:channel) and, where the interface reports it, ``bus_state``."""
        out: dict[str, int | float | str] = {
            "state": self.state, "problem": self.problem, "bus": self.name,
            "reconnects": self.reconnects, "bus_errors": self.bus_errors,
        }
        out.update(self.decoder.figures() if self.decoder else {})
        if self._state_supported and self._bus_state is not None:
            out["bus_state"] = self._bus_state.name.lower()
        return out

    def close(self) -> None:
        """Shut the bus down; later polls return nothing."""
        self._shutdown()
        self.state = "closed"

    # ---- connection and backoff ----------------------------------------------------------
    def _connect(self, first: bool = False) -> bool:
        try:
            bus = self._bus_factory(**self.settings.bus_kwargs())
        except (NotImplementedError, ValueError, TypeError) as exc:
            # CanInterfaceNotImplementedError (driver or platform missing) or arguments the
            # interface refuses: a config problem at the first attempt, retried later on.
            if first:
                raise ValueError(
                    f"CAN sensor {self.sensor_id}: interface {self.settings.interface!r} with "
                    f"channel {self.settings.bus_channel!r} cannot be used here: {exc} (install "
                    "its driver, fix the channel, or pick another interface)"
                ) from None
            self._fail(f"cannot open {self.name}: {_describe(exc)}")
            return False
        except Exception as exc:  # CanInitializationError, OSError (no such device), ...
            self._fail(f"cannot open {self.name}: {_describe(exc)}{_hint(self.settings, exc)}")
            return False
        self.bus, self.state, self._healthy = bus, "open", False
        self.opens += 1
        if self.opens > 1:
            self.reconnects += 1
        self.problem = ""
        self._state_supported = type(bus).state is not can.BusABC.state
        self._bus_state = None
        return True

    def _fail(self, problem: str) -> None:
        self.bus_errors += 1
        self._shutdown()
        delay = min(self.settings.reconnect_max_s,
                    self.settings.reconnect_min_s * 2.0 ** min(self._failures, 62))
        delay *= 1.0 - JITTER * self._rng.random()
        self._failures += 1
        self._retry_at = self._clock() + delay
        self.state = "backoff"
        self.problem = f"{problem}; retrying in {delay:.1f} s"

    def _shutdown(self) -> None:
        bus, self.bus = self.bus, None
        if bus is not None:
            with contextlib.suppress(Exception):  # a dead bus may fail to close; it is gone
                bus.shutdown()

    def _check_bus_state(self) -> None:
        try:
            state = self.bus.state
        except Exception:
            return
        if state is can.BusState.ERROR and self._bus_state is not can.BusState.ERROR:
            self.decoder.bus_off += 1
            self.problem = f"{self.name} reports bus state ERROR (bus-off)"
        self._bus_state = state


def _is_garbled_datagram(exc: BaseException) -> bool:
    # udp_multicast wraps a datagram it cannot unpack this way; the socket itself is fine.
    return isinstance(exc, can.CanOperationError) and "could not unpack" in str(exc)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


def _hint(settings: CanSourceSettings, exc: BaseException) -> str:
    if settings.interface != "socketcan":
        return ""
    if getattr(exc, "errno", None) == errno.EAFNOSUPPORT:
        return " (this kernel has no SocketCAN: `modprobe can_raw`, or enable the CAN HAT overlay)"
    return (f" (is {settings.channel} up? `ip link set {settings.channel} up type can "
            f"bitrate 500000`; `ip -br link show type can` lists the CAN interfaces)")


__all__ = ["CanSource", "FrameDecoder", "load_dbc", "safe_name"]
