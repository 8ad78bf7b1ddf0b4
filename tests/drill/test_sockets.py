"""I9, watched: the socket sampler flags a real process listening beyond loopback, accepts
loopback and what the gateway config asks for, and names connections beyond loopback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from config.loader import parse_config
from tools.drill.sockets import SocketSampler, configured_listeners, is_loopback

LISTENER = """
import socket, sys, time
inside = socket.create_server(("127.0.0.1", 0))
outside = socket.create_server(("0.0.0.0", 0))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", int(sys.argv[1])))
print(inside.getsockname()[1], outside.getsockname()[1], flush=True)
time.sleep(120)
"""


class Gateway:
    """The one thing the sampler asks of a rig's gateway: its processes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        return [self.pid]


class Rig:
    def __init__(self, pid: int) -> None:
        self.gateway = Gateway(pid)
        self.watch = None  # no live tree: processes are named by psutil


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("not-an-ip", False)])
def test_loopback_addresses_are_told_apart(host, loopback):
    assert is_loopback(host) is loopback


def test_the_config_asks_for_can_multicast_and_non_loopback_sources_only():
    parsed = parse_config({
        "broker": {"enabled": True, "listen_address": "0.0.0.0", "port": 18830,
                   "allow_anonymous": False, "password_file": "/etc/mosquitto/passwd"},
        "sensors": [
            {"id": "n1", "type": "nmea", "nmea": {"source": "udp://127.0.0.1:10110"}},
            {"id": "n2", "type": "nmea", "nmea": {"source": "udp://0.0.0.0:10111"}},
            {"id": "c1", "type": "can", "can": {"interface": "udp_multicast", "port": 43119,
                                                "channel": "239.1.1.1",
                                                "dbc": "config/demo_vehicle.dbc"}}]})
    assert configured_listeners(parsed) == [("tcp", "0.0.0.0", 18830), ("udp", "0.0.0.0", 10111),
                                            ("udp", "*", 43119)]


def test_a_process_listening_beyond_loopback_is_exposed_unless_configured():
    parsed = parse_config({"sensors": [
        {"id": "c1", "type": "can", "can": {"interface": "udp_multicast", "port": 43997,
                                            "channel": "239.1.1.1",
                                            "dbc": "config/demo_vehicle.dbc"}}]})
    child = subprocess.Popen([sys.executable, "-c", LISTENER, "43997"], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        inside, outside = child.stdout.readline().split()
        sampler = SocketSampler(Rig(child.pid), parsed)
        sampler.sample()
        watch = sampler.stop()
    finally:
        child.kill()
        child.wait()
    assert watch.samples == 1
    assert f"tcp 127.0.0.1:{inside}" in watch.loopback
    assert [e["address"] for e in watch.exposed] == [f"tcp 0.0.0.0:{outside}"]
    assert watch.exposed[0]["pid"] == child.pid
    assert watch.configured == ["udp 0.0.0.0:43997"]
    assert watch.outbound == []
