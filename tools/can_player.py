"""Play plausible CAN traffic described by a DBC: the demo's stand-in for a vehicle's bus.

Where this sits: outside the gateway, in front of step 1 of the data path. It sends frames on
a python-can bus (for the demo: ``udp_multicast``, which a gateway's CanSensor on the same host
or LAN receives) and the gateway decodes them with the same DBC.

Each tick (``rate_hz`` per second) sends every message of the DBC once, with values from
`plan`: a deterministic function of (seed, tick). The demo vehicle's signals
(config/demo_vehicle.dbc) follow one driving story — stand, pull away, cruise, brake, stand —
so speed, rpm, throttle, brake pedal and accelerations agree; a signal the story does not know
swings slowly inside its DBC range; enumerated signals step through their labels.

    python -m tools.can_player --interface udp_multicast --channel 239.74.163.2 \\
        --dbc config/demo_vehicle.dbc --rate 20 [--seconds N] [--port P] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import can
import cantools

from config.can import UDP_MULTICAST_DEFAULT_GROUP

DEMO_DBC = Path(__file__).resolve().parent.parent / "config" / "demo_vehicle.dbc"
#: One loop of the driving story, seconds: stand, pull away, cruise, brake, stand.
STORY_S = 60.0


def _story(t: float, seed: int) -> dict[str, float]:
    """The demo vehicle at ``t`` seconds into the play: physical values by signal name."""
    cruise = 45.0 + 10.0 * ((seed * 7919) % 5) / 4.0  # km/h, per seed
    phase = t % STORY_S
    if phase < 5.0:  # standing
        v, a = 0.0, 0.0
    elif phase < 20.0:  # pulling away
        a = cruise / 3.6 / 15.0
        v = a * (phase - 5.0) * 3.6
    elif phase < 40.0:  # cruising, gently up and down
        v = cruise + 2.0 * math.sin((phase - 20.0) / 20.0 * 2 * math.pi)
        a = 2.0 / 3.6 * math.cos((phase - 20.0) / 20.0 * 2 * math.pi) * 2 * math.pi / 20.0
    elif phase < 50.0:  # braking
        a = -cruise / 3.6 / 10.0
        v = cruise + a * (phase - 40.0) * 3.6
    else:
        v, a = 0.0, 0.0
    braking = 40.0 <= phase < 50.0
    gear = min(5, 1 + int(v / 18.0))
    rpm = max(800.0, v * (0.0, 120.0, 70.0, 50.0, 38.0, 30.0)[gear]) if v > 0 else 800.0
    yaw = 8.0 * math.sin(2 * math.pi * t / 17.0) if v > 5.0 else 0.0  # deg/s
    throttle = 0.0 if braking or v == 0.0 else (35.0 if a > 0.5 else 15.0)
    return {
        "EngineSpeed": rpm, "CoolantTemp": 20.0 + 70.0 * (1.0 - math.exp(-t / 120.0)),
        "ThrottlePos": throttle, "OilPressure": 100.0 + rpm * 0.08,
        "EngineTorque": -30.0 if braking else (150.0 if a > 0.5 else (60.0 if v else 10.0)),
        "VehicleSpeed": v, "YawRate": yaw, "LongAccel": a,
        "LatAccel": math.radians(yaw) * v / 3.6,
        "PedalState": 1.0 if braking else 0.0, "AbsActive": 0.0,
        "BrakePressure": 25.0 if braking else 0.0, "PedalTravel": 30.0 if braking else 0.0,
        "PackVoltage": 13.9 + 0.2 * math.sin(t / 7.0),
        "PackCurrent": -20.0 if v > 0 else 5.0, "StateOfCharge": max(0.0, 80.0 - t / 600.0),
        "CellTempMax": 25.0 + v / 20.0,
        "TireTemp": 25.0 + v / 10.0,
        "PressureFL": 230.0, "PressureFR": 232.5, "PressureRL": 240.0, "PressureRR": 242.5,
    }


def _bounds(sig: Any) -> tuple[float, float]:
    """The physical range a signal may carry: its DBC min/max, else what its bits hold."""
    if sig.is_float:
        lo, hi = -1000.0, 1000.0
    else:
        raw_lo = -(1 << (sig.length - 1)) if sig.is_signed else 0
        raw_hi = (1 << (sig.length - 1)) - 1 if sig.is_signed else (1 << sig.length) - 1
        ends = (raw_lo * sig.scale + sig.offset, raw_hi * sig.scale + sig.offset)
        lo, hi = min(ends), max(ends)
    if sig.minimum is not None:
        lo = max(lo, sig.minimum)
    if sig.maximum is not None:
        hi = min(hi, sig.maximum)
    return lo, max(lo, hi)


def _generic(sig: Any, t: float, k: int, seed: int) -> float:
    """A value for a signal the story does not know: labels in turn, or a slow swing."""
    if sig.choices:
        keys = sorted(int(key) for key in sig.choices)
        return float(keys[(k // 20 + seed) % len(keys)])
    lo, hi = _bounds(sig)
    h = zlib.crc32(f"{seed}:{sig.name}".encode())
    period = 10.0 + h % 50
    return lo + (hi - lo) * (0.5 + 0.4 * math.sin(2 * math.pi * t / period + h % 628 / 100))


def plan(db: Any, seed: int, k: int, rate_hz: float) -> list[tuple[Any, dict[str, float]]]:
    """What tick ``k`` sends: (cantools message, physical values) for every message of ``db``.
    Deterministic in (seed, k, rate_hz); values lie in each signal's range."""
    t = k / rate_hz
    story = _story(t, seed)
    rng = random.Random(seed * 1_000_003 + k)
    out = []
    for message in db.messages:
        mux_value = None
        for sig in message.signals:
            if sig.is_multiplexer:
                ids = sorted({i for s in message.signals for i in (s.multiplexer_ids or ())})
                mux_value = ids[k % len(ids)] if ids else 0
        values: dict[str, float] = {}
        for sig in message.signals:
            if sig.multiplexer_ids is not None and mux_value not in sig.multiplexer_ids:
                continue
            if sig.is_multiplexer:
                value = float(mux_value)
            elif sig.name == "AliveCounter":
                value = float(k % 16)
            elif sig.name in story:
                value = story[sig.name]
                if not sig.choices and value:
                    value += rng.gauss(0.0, abs(sig.scale))  # a little sensor noise
            else:
                value = _generic(sig, t, k, seed)
            lo, hi = _bounds(sig)
            values[sig.name] = min(hi, max(lo, value))
        out.append((message, values))
    return out


def encode(message: Any, values: dict[str, float]) -> can.Message:
    """The python-can frame carrying ``values`` of ``message``."""
    data = message.encode(values, scaling=True, strict=True)
    return can.Message(
        arbitration_id=message.frame_id, is_extended_id=message.is_extended_frame,
        is_fd=bool(message.is_fd), data=data,
    )


def play(
    bus: can.BusABC, db: Any, rate_hz: float, duration: float | None = None, seed: int = 0,
    *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Send ``plan`` ticks at ``rate_hz`` for ``duration`` seconds (None: until ``stop()``).
    Returns the number of frames sent. Ticks keep to an absolute schedule (no drift)."""
    if not rate_hz > 0:
        raise ValueError(f"rate_hz must be > 0 (got {rate_hz!r})")
    start, sent, k = clock(), 0, 0
    ticks = None if duration is None else max(1, math.ceil(duration * rate_hz))
    while (ticks is None or k < ticks) and not stop():
        wait = start + k / rate_hz - clock()
        if wait > 0:
            sleep(wait)
        for message, values in plan(db, seed, k, rate_hz):
            bus.send(encode(message, values), timeout=1.0)
            sent += 1
        k += 1
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.can_player", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--interface", default="udp_multicast", help="python-can interface")
    parser.add_argument("--channel", default="", help="bus channel (udp_multicast: group "
                        f"address, default {UDP_MULTICAST_DEFAULT_GROUP})")
    parser.add_argument("--port", type=int, default=0, help="udp_multicast port (0: default)")
    parser.add_argument("--dbc", default=str(DEMO_DBC), help="DBC file (default: the demo's)")
    parser.add_argument("--rate", type=float, default=20.0, help="ticks per second")
    parser.add_argument("--seconds", type=float, default=None, help="stop after (default: never)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        db = cantools.database.load_file(args.dbc)
    except Exception as exc:
        print(f"can_player: cannot load DBC {args.dbc}: {exc}", file=sys.stderr)
        return 2
    channel = args.channel or (UDP_MULTICAST_DEFAULT_GROUP
                               if args.interface == "udp_multicast" else None)
    kwargs: dict[str, Any] = {"port": args.port} if args.port else {}
    try:
        bus = can.Bus(interface=args.interface, channel=channel, ignore_config=True, **kwargs)
    except Exception as exc:
        print(f"can_player: cannot open {args.interface}:{channel}: {exc}", file=sys.stderr)
        return 1
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print(f"can_player: {len(db.messages)} messages x {args.rate:g} Hz on "
          f"{args.interface}:{channel}{f' port {args.port}' if args.port else ''}",
          file=sys.stderr, flush=True)
    try:
        sent = play(bus, db, args.rate, args.seconds, args.seed, stop=lambda: bool(stopping))
    except KeyboardInterrupt:
        sent = -1
    except can.CanError as exc:
        print(f"can_player: send failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bus.shutdown()
    if sent >= 0:
        print(f"can_player: sent {sent} frames", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
