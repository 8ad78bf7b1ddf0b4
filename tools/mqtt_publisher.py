"""A small MQTT publisher: the demo's stand-in for a vehicle's MQTT devices.

Where this sits: outside the gateway, feeding its MQTT sensor through the broker. It publishes
at QoS 1 on ``vehicles/<device>/cabin`` (JSON: millisecond time, cabin temperature, humidity,
CO2, occupancy) and ``vehicles/<device>/trailer`` (a packed little-endian struct ``<Qhh``:
milliseconds, temperature x100, door 0/1), and now and then a malformed payload so the
gateway's quarantine has something to show.

    python -m tools.mqtt_publisher --port 18830 --device veh-001 --rate 5 [--seconds 60]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import struct
import time

import paho.mqtt.client as paho

TRAILER = struct.Struct("<Qhh")


def cabin(t: float, rng: random.Random) -> bytes:
    """One cabin reading at time ``t`` (seconds since the epoch)."""
    return json.dumps({
        "ts": int(t * 1000),
        "cabin_temp_c": round(21.5 + 1.5 * math.sin(t / 60) + rng.gauss(0, 0.05), 2),
        "humidity_pct": round(45 + 5 * math.sin(t / 90) + rng.gauss(0, 0.3), 1),
        "co2_ppm": int(600 + 150 * (1 + math.sin(t / 45)) + rng.gauss(0, 5)),
        "occupied": True,
    }).encode()


def trailer(t: float, rng: random.Random) -> bytes:
    temp = 4.0 + 0.5 * math.sin(t / 120) + rng.gauss(0, 0.02)
    door = 1 if int(t) % 97 < 3 else 0
    return TRAILER.pack(int(t * 1000), int(round(temp * 100)), door)


def publish(host: str, port: int, device: str, rate_hz: float, seconds: float | None,
            bad_every: int, seed: int = 0, username: str = "", password: str = "") -> int:
    """Publish until ``seconds`` pass (None: forever); returns messages published."""
    rng = random.Random(seed)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"demo-publisher-{device}",
                         protocol=paho.MQTTv5)
    if username:
        client.username_pw_set(username, password or None)
    client.reconnect_delay_set(0.2, 5)
    client.connect_async(host, port, keepalive=30)
    client.loop_start()  # paho reconnects by itself when the broker restarts
    sent, started = 0, time.monotonic()
    try:
        n = 0
        while seconds is None or time.monotonic() - started < seconds:
            n += 1
            now = time.time()
            if bad_every and n % bad_every == 0:
                payload = b'{"ts": ' + str(int(now * 1000)).encode() + b', "cabin_temp_c": oops}'
            else:
                payload = cabin(now, rng)
            client.publish(f"vehicles/{device}/cabin", payload, qos=1)
            if n % max(1, int(rate_hz)) == 0:
                client.publish(f"vehicles/{device}/trailer", trailer(now, rng), qos=1)
            sent += 1
            time.sleep(1.0 / rate_hz)
    finally:
        client.disconnect()
        client.loop_stop()
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mqtt_publisher",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--device", default="veh-001")
    parser.add_argument("--rate", type=float, default=5.0, help="cabin messages per second")
    parser.add_argument("--seconds", type=float, default=None, help="stop after (default: never)")
    parser.add_argument("--bad-every", type=int, default=50,
                        help="every Nth cabin message is malformed (0: never)")
    parser.add_argument("--username", default="", help="MQTT user name (default: none)")
    parser.add_argument("--password-env", default="", metavar="NAME",
                        help="environment variable holding the password (never on the "
                             "command line, where `ps` shows it)")
    args = parser.parse_args(argv)
    password = os.environ.get(args.password_env, "") if args.password_env else ""
    if args.password_env and not password:
        parser.error(f"--password-env names {args.password_env}, which is not set")
    with contextlib.suppress(KeyboardInterrupt):
        publish(args.host, args.port, args.device, args.rate, args.seconds, args.bad_every,
                username=args.username, password=password)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
