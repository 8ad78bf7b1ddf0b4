"""I9 on the richest gateway: no socket of the gateway's process tree is on an address beyond
loopback unless the config asks for one, and nothing connects beyond loopback.

One real `fleetgw run` for the module: simulated IMU/GPS/engine, an MQTT sensor on the
gateway's own mosquitto, a CAN bus over UDP multicast, an NMEA source on UDP, the model runner,
metrics, the health sensor, and the uplink syncing to a real receiver. Every socket of the run
process, the Thespian admin and logger, every actor and the mosquitto child is read with
psutil (TCP and UDP, IPv4 and IPv6).

The one configured exception: python-can's ``udp_multicast`` bus (4.x) binds its port on every
address (``bind(("", port))``) and joins the group on the default interface; the config has no
key to bind it elsewhere. It is a demo and test interface (on the Pi, ``socketcan`` has no IP
socket at all), and `tools.nftables` lets in only datagrams addressed to the group. The test
checks that this socket is the only one beyond loopback and that the firewall generator lists
it, so a new listener shows up here and in the rule set together.
"""

from __future__ import annotations

import socket
from pathlib import Path

import nacl.signing
import psutil
import pytest

from config.loader import load_config
from supervisors import system
from tests.mosquitto import require_mosquitto
from tests.system.conftest import DEMO_SENSORS
from tests.system.harness import ROOT, GatewayUnderTest, free_port, wait_for, walk
from tools.central_process import CentralProcess, write_device_key
from tools.drill.sockets import gateway_processes, is_loopback
from tools.nftables import inbound_needs

pytestmark = [pytest.mark.system, require_mosquitto]
pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")

DEVICE = "veh-001"
#: A group no other test uses (test_sources.py has .203, tests/sensors/test_can.py .187).
CAN_GROUP = "239.74.163.217"


class Rich:
    """The module's gateway, its receiver and the ports it was given."""

    def __init__(self, tmp: Path) -> None:
        self.can_port, self.nmea_port = free_port(), free_port()
        self.broker_port, self.metrics_port = free_port(), free_port()
        self.central = CentralProcess(tmp / "central", free_port())
        key = nacl.signing.SigningKey.generate()
        write_device_key(tmp / "data" / "keys", DEVICE, key)
        self.central.register(DEVICE, key)
        sensors = [*DEMO_SENSORS,
                   {"id": "cabin", "type": "mqtt", "batch_max_age_s": 0.1,
                    "mqtt": {"topics": [{"filter": "vehicles/+/cabin", "device": "{2}",
                                         "kind": "cabin"}]}},
                   {"id": "can0", "type": "can", "batch_max_age_s": 0.1,
                    "can": {"interface": "udp_multicast", "channel": CAN_GROUP,
                            "port": self.can_port,
                            "dbc": str(Path(ROOT) / "config" / "demo_vehicle.dbc")}},
                   {"id": "gnss0", "type": "nmea", "batch_max_age_s": 0.1,
                    "nmea": {"source": f"udp://127.0.0.1:{self.nmea_port}"}}]
        self.gw = GatewayUnderTest(
            tmp, sensors,
            broker={"enabled": True, "port": self.broker_port},
            metrics={"port": self.metrics_port, "health_interval_s": 1},
            uplink={"url": self.central.url, "p2_linger_s": 0.2, "p3_linger_s": 0.5,
                    "poll_s": 0.2, "backoff_base_s": 0.2, "backoff_cap_s": 2.0})

    def start(self) -> Rich:
        self.central.start()
        gw = self.gw.start()
        # Every source open, the broker up, the endpoint listening, something synced.
        wait_for(lambda: (n := gw.nodes())["broker"]["figures"].get("broker_state") == "running"
                 and n["sensor:cabin"]["figures"].get("mqtt_connected")
                 and n["sensor:can0"]["figures"].get("state") == "open"
                 and n["sensor:gnss0"]["figures"].get("state") == "open"
                 and n["metrics"]["figures"].get("listening")
                 and n["uplink"]["figures"].get("synced_records", 0) > 0,
                 120, "every source open, the broker and metrics up and a first sync")
        return self

    def stop(self) -> None:
        # Orderly stops are tested elsewhere; this module only reads sockets (a loaded machine
        # takes half a minute to drain the sensors).
        pgid = self.gw.pgid()
        if self.gw.proc is not None and self.gw.proc.poll() is None:
            self.gw.proc.kill()
            self.gw.proc.wait()
        if pgid:
            system.kill_group(pgid)
        self.gw.stop()
        self.central.kill()


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    setup = Rich(tmp_path_factory.mktemp("loopback"))
    try:
        yield setup.start()
    finally:
        setup.stop()


def sockets(gw: GatewayUnderTest) -> list[dict]:
    """Every inet socket of the gateway's processes: pid, process name, kind, family, state,
    local and remote address."""
    found = []
    for pid, proc in gateway_processes(gw).items():
        try:
            conns, name = proc.net_connections(kind="inet"), proc.name()
        except psutil.NoSuchProcess:
            continue  # a short-lived helper (the model's self-test child) that has finished
        for c in conns:
            found.append({
                "pid": pid, "process": name,
                "kind": "tcp" if c.type == socket.SOCK_STREAM else "udp",
                "family": "ipv6" if c.family == socket.AF_INET6 else "ipv4",
                "status": c.status, "local": (c.laddr.ip, c.laddr.port) if c.laddr else None,
                "remote": (c.raddr.ip, c.raddr.port) if c.raddr else None})
    return found


def bound(s: dict) -> bool:
    """A socket that receives from anyone: TCP LISTEN, or UDP bound without a peer."""
    if s["kind"] == "tcp":
        return s["status"] == psutil.CONN_LISTEN
    return s["local"] is not None and s["remote"] is None


def test_no_gateway_socket_is_on_a_non_loopback_address_except_the_configured_can_bus(rich):
    gw, central_port = rich.gw, rich.central.port

    def sample_with_the_uplink_connected() -> tuple[dict, list[dict]] | None:
        nodes = gw.nodes()
        found = sockets(gw)
        uplink = nodes["uplink"]["pid"]
        return (nodes, found) if any(
            s["pid"] == uplink and s["remote"] == ("127.0.0.1", central_port)
            for s in found) else None

    nodes, found = wait_for(sample_with_the_uplink_connected, 60,
                            "a sample with the uplink's connection to the receiver")
    # The sample holds each kind of socket the config opens, all on loopback.
    held = {(s["kind"], s["local"]): s["pid"] for s in found if bound(s)}
    mosquitto = nodes["broker"]["figures"]["broker_pid"]
    assert held.get(("tcp", ("127.0.0.1", rich.broker_port))) == mosquitto, held
    assert held.get(("tcp", ("127.0.0.1", rich.metrics_port))) == nodes["metrics"]["pid"], held
    assert held.get(("udp", ("127.0.0.1", rich.nmea_port))) == nodes["sensor:gnss0"]["pid"], held
    assert held.get(("tcp", ("127.0.0.1", gw.port))), held  # the Thespian admin

    # Beyond loopback: exactly the CAN bus's multicast socket, held by its sensor.
    exposed = [s for s in found if bound(s) and not is_loopback(s["local"][0])]
    assert [(s["pid"], s["kind"], s["local"]) for s in exposed] == [
        (nodes["sensor:can0"]["pid"], "udp", ("0.0.0.0", rich.can_port))], exposed
    # ... and it is what the firewall generator derives from the config, nothing more.
    needs = inbound_needs(load_config(gw.config_path))
    assert [(n.proto, n.port, n.address) for n in needs] == [
        ("udp", rich.can_port, CAN_GROUP)]

    # Nothing phones home: every peer is on this computer.
    remote = [s for s in found if s["remote"] and not is_loopback(s["remote"][0])]
    assert not remote, remote


def own_listeners(pid: int) -> set[tuple[str, int]]:
    """TCP listeners ``pid`` holds that its parent does not (a forked actor keeps copies of
    its ancestors' listening sockets). Raises psutil.NoSuchProcess when either is gone."""
    def listening(proc: psutil.Process) -> set[tuple[str, int]]:
        return {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN}

    proc = psutil.Process(pid)
    return listening(proc) - listening(psutil.Process(proc.ppid()))


def test_admin_and_every_actor_listen_on_127_0_0_1(rich):
    """supervisors/hardening.py makes Thespian bind 127.0.0.1 (upstream binds 0.0.0.0): if the
    patch stopped working, the admin's or an actor's own port would be elsewhere."""
    gw = rich.gw
    admin = system.read_state(gw.data_dir)["admin_pid"]
    assert ("127.0.0.1", gw.port) in own_listeners(admin)

    def listeners_per_actor() -> dict[str, set[tuple[str, int]]]:
        # One consistent look: an actor restarted meanwhile (a loaded machine) means again.
        actors = {n["name"]: n["pid"] for n in walk(gw.tree()) if n.get("pid")}
        return {name: own_listeners(pid) for name, pid in actors.items()}

    ports = wait_for(listeners_per_actor, 30, "the listeners of every actor")
    assert {"gateway", "journal", "broker", "sensor:cabin", "sensor:can0", "sensor:gnss0",
            "router", "model", "uplink", "metrics"} <= set(ports)
    for name, own in ports.items():
        assert own, f"{name} has no listening socket of its own"
        assert {ip for ip, _port in own} == {"127.0.0.1"}, (name, own)
    # Each actor has a port of its own (none shares another's).
    every = [p for own in ports.values() for p in own]
    assert len(every) == len(set(every)), ports
