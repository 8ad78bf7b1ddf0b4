"""I9, watched: the sockets of the gateway's processes, sampled while a drill runs.

Where this sits: beside the drill runner, outside the gateway. Every `SAMPLE_INTERVAL_S` a
thread lists the sockets of the gateway's processes (the run process, the actor process group
and their children, e.g. the broker's mosquitto) with psutil: a socket listening (TCP LISTEN, or
a bound UDP socket without a peer) beyond loopback is exposed unless the gateway config asks
for it (`configured_listeners`: a broker or NMEA source on another address, CAN over multicast
UDP); a connection to an address beyond loopback is phoning home. What it saw is a
`SocketWatch` for `checks.check_i9`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from typing import Any

import psutil

from config.fields import is_loopback
from config.schema import GatewayConfig
from tools.drill.evidence import SocketWatch
from tools.harness.rig import walk

SAMPLE_INTERVAL_S = 2.0


def configured_listeners(parsed: GatewayConfig) -> list[tuple[str, str, int]]:
    """(kind, host or "*", port) the config asks the gateway to listen on beyond loopback: what
    the firewall opens for it (`tools.nftables.inbound_needs`)."""
    from tools.nftables import inbound_needs

    def host(address: str) -> str:  # a multicast receiver binds every address for its group
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(address).is_multicast:
                return "*"
        return address

    return [(o.proto, host(o.address), o.port) for o in inbound_needs(parsed)]


def gateway_processes(gateway: Any) -> dict[int, psutil.Process]:
    """The processes of a running gateway (anything with ``pids()``: the run process and the
    actor process group) and their children (mosquitto), by pid."""
    procs: dict[int, psutil.Process] = {}
    for pid in gateway.pids():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs[pid] = proc
            for child in proc.children(recursive=True):
                procs[child.pid] = child
    return procs


class SocketSampler:
    """Samples ``rig``'s gateway sockets from a thread until `stop`; `watch` holds the result."""

    def __init__(self, rig: Any, parsed: GatewayConfig) -> None:
        self.rig = rig
        self.allowed = configured_listeners(parsed)
        self.watch = SocketWatch()
        self._loopback: set[str] = set()
        self._configured: set[str] = set()
        self._seen: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="i9-sockets")

    def start(self) -> SocketSampler:
        self._thread.start()
        return self

    def stop(self) -> SocketWatch:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(30)
        self.watch.loopback = sorted(self._loopback)
        self.watch.configured = sorted(self._configured)
        return self.watch

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            with contextlib.suppress(Exception):  # the gateway may be mid power cut
                self.sample()

    def _processes(self) -> dict[int, psutil.Process]:
        gateway = self.rig.gateway
        return {} if gateway is None else gateway_processes(gateway)

    def _actor_names(self) -> dict[int, str]:
        watch = self.rig.watch
        sample = watch.latest() if watch is not None else None
        return {n["pid"]: n["name"] for n in walk(sample.tree) if n.get("pid")} \
            if sample is not None else {}

    def _allowed(self, kind: str, host: str, port: int) -> bool:
        return any(kind == k and port == p and h in ("*", host) for k, h, p in self.allowed)

    def sample(self) -> None:
        """One look at every socket of the gateway's processes."""
        procs = self._processes()
        if not procs:
            return
        names = self._actor_names()
        for pid, proc in procs.items():
            try:
                connections = proc.net_connections(kind="inet")
                label = names.get(pid) or proc.name()
            except psutil.Error:
                continue
            for conn in connections:
                self._judge(pid, label, conn)
        self.watch.samples += 1

    def _judge(self, pid: int, label: str, conn: Any) -> None:
        kind = "tcp" if conn.type == socket.SOCK_STREAM else "udp"
        listening = conn.status == psutil.CONN_LISTEN if kind == "tcp" else \
            bool(conn.laddr) and not conn.raddr
        if listening:
            host, port = conn.laddr.ip, conn.laddr.port
            where = f"{kind} {host}:{port}"
            if is_loopback(host):
                self._loopback.add(where)
            elif self._allowed(kind, host, port):
                self._configured.add(where)
            elif ("exposed", where) not in self._seen:
                self._seen.add(("exposed", where))
                self.watch.exposed.append({"pid": pid, "process": label, "address": where})
        elif conn.raddr and not is_loopback(conn.raddr.ip):
            remote = f"{kind} {conn.raddr.ip}:{conn.raddr.port}"
            if ("outbound", remote) not in self._seen:
                self._seen.add(("outbound", remote))
                self.watch.outbound.append({"pid": pid, "process": label, "remote": remote})
