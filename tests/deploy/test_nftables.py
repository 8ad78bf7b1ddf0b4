"""`fleetgw deploy nftables`: the rule set opens exactly what the config listens on beyond
loopback, each rule naming its config key; nft itself accepts it; loaded into a network
namespace it lets a configured port through and drops every other one.

nft checks (``nft -c``) need the nftables package and CAP_NET_ADMIN; the namespace test also
needs root (it makes two throwaway network namespaces joined by a veth pair; the host's own
namespace is never touched). Without them these tests are skipped, unless
``FLEETGW_REQUIRE_NFTABLES=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config.loader import parse_config
from tools.cli import main
from tools.nftables import PYTHON_CAN_UDP_MULTICAST_PORT, ruleset

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "nftables.conf"
SHIPPED_CONFIG = ROOT / "deploy" / "fleetgw.toml"
REQUIRE_ENV = "FLEETGW_REQUIRE_NFTABLES"

#: Every accept rule of the base (not derived from a listener), by what it lets in.
BASE_ACCEPTS = {
    'iif "lo" accept',
    "ct state established,related accept",
    "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
    "icmp type echo-request limit rate 5/second burst 10 packets accept",
    "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, "
    "parameter-problem } accept",
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } "
    "ip6 hoplimit 255 accept",
    "icmpv6 type { mld-listener-query } ip6 saddr fe80::/10 accept",
    "icmpv6 type echo-request limit rate 5/second burst 10 packets accept",
    "udp sport 67 udp dport 68 accept",
    "ip6 saddr fe80::/10 udp sport 547 udp dport 546 accept",
    "tcp dport 22 ip saddr @mgmt_v4 accept",
    "tcp dport 22 ip6 saddr @mgmt_v6 accept",
}

EXPOSED = """
[metrics]
listen_address = "0.0.0.0"
port = 9478

[broker]
enabled = true
listen_address = "0.0.0.0"
port = 18831
allow_anonymous = false
password_file = "/etc/fleetgw/broker.passwd"

[[sensors]]
id = "gnss0"
type = "nmea"
[sensors.nmea]
source = "udp://0.0.0.0:10110"

[[sensors]]
id = "gnss1"
type = "nmea"
[sensors.nmea]
source = "tcp://192.0.2.7:2947"
"""


def accepts(text: str) -> dict[str, str]:
    """The accept rules of the input chain: rule without its comment -> the comment."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") or not re.search(r"\baccept\b", line):
            continue
        rule, _, comment = line.partition(' comment "')
        found[rule.strip()] = comment.rstrip('"')
    return found


def generated(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(ROOT)
    code = main(["deploy", "nftables", *args])
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return str(path)


# ---- what is opened -----------------------------------------------------------------------
def test_default_config_opens_nothing_beyond_the_base(capsys, monkeypatch):
    code, out, err = generated([], capsys, monkeypatch)
    assert code == 0, err
    assert set(accepts(out)) == BASE_ACCEPTS
    assert "# none: this config listens on loopback only" in out
    assert "policy drop;" in out and "flush ruleset" not in out
    # Only our table, replaced atomically: declared, deleted, defined.
    assert re.findall(r"^(?:delete )?table .*$", out, re.M) == [
        "table inet fleetgw", "delete table inet fleetgw", "table inet fleetgw {"]


def test_each_listener_beyond_loopback_gets_one_rule_naming_its_config_key(
        tmp_path, capsys, monkeypatch):
    code, out, err = generated(["--config", write(tmp_path, EXPOSED)], capsys, monkeypatch)
    assert code == 0, err
    rules = accepts(out)
    opened = {rule: comment for rule, comment in rules.items() if rule not in BASE_ACCEPTS}
    assert opened == {
        "meta nfproto ipv4 tcp dport 9478 accept":
            "metrics.listen_address=0.0.0.0 metrics.port=9478",
        "meta nfproto ipv4 tcp dport 18831 accept":
            "broker.listen_address=0.0.0.0 broker.port=18831",
        "meta nfproto ipv4 udp dport 10110 accept":
            "sensors[0] (gnss0) nmea.source=udp://0.0.0.0:10110",
    }  # the NMEA TCP source is a client: nothing opened for it


def test_a_specific_address_is_matched_and_ipv6_any_covers_both_families():
    config = parse_config({
        "metrics": {"listen_address": "192.0.2.5"},
        "broker": {"enabled": True, "listen_address": "2001:db8::5", "port": 18832,
                   "allow_anonymous": False, "password_file": "p"},
        "sensors": [{"id": "g", "type": "nmea", "nmea": {"source": "udp://[::]:10111"}},
                    {"id": "l", "type": "nmea", "nmea": {"source": "udp://127.0.0.1:10112"}}],
    })
    opened = set(accepts(ruleset(config, "x"))) - BASE_ACCEPTS
    assert opened == {"ip daddr 192.0.2.5 tcp dport 9477 accept",
                      "ip6 daddr 2001:db8::5 tcp dport 18832 accept",
                      "udp dport 10111 accept"}


def test_can_over_multicast_lets_in_only_datagrams_to_its_group_and_igmp():
    config = parse_config({"sensors": [
        {"id": "can0", "type": "can",
         "can": {"interface": "udp_multicast", "channel": "239.74.163.9", "port": 43114,
                 "dbc": "x.dbc"}},
        {"id": "can1", "type": "can", "can": {"interface": "udp_multicast", "dbc": "x.dbc"}},
        {"id": "can6", "type": "can",
         "can": {"interface": "udp_multicast", "channel": "ff15::9", "dbc": "x.dbc"}},
        {"id": "pi", "type": "can", "can": {"channel": "can0", "dbc": "x.dbc"}},
    ]})
    rules = accepts(ruleset(config, "x"))
    opened = {rule: comment for rule, comment in rules.items() if rule not in BASE_ACCEPTS}
    default = PYTHON_CAN_UDP_MULTICAST_PORT
    assert opened == {
        "ip daddr 239.74.163.9 udp dport 43114 accept":
            "sensors[0] (can0) can.interface=udp_multicast channel=239.74.163.9 port=43114",
        f"ip daddr 239.74.163.2 udp dport {default} accept":
            f"sensors[1] (can1) can.interface=udp_multicast channel=239.74.163.2 "
            f"port={default}",
        f"ip6 daddr ff15::9 udp dport {default} accept":
            f"sensors[2] (can6) can.interface=udp_multicast channel=ff15::9 port={default}",
        "ip protocol igmp accept":
            "IGMP: sensors[0] (can0) can.interface=udp_multicast channel=239.74.163.9 "
            "port=43114",
    }  # socketcan ("pi") has no IP socket


def test_the_python_can_default_port_is_the_one_assumed():
    import inspect

    from can.interfaces.udp_multicast import UdpMulticastBus

    signature = inspect.signature(UdpMulticastBus.__init__)
    assert signature.parameters["port"].default == PYTHON_CAN_UDP_MULTICAST_PORT


def test_ssh_comes_only_from_the_networks_given(capsys, monkeypatch):
    code, out, _ = generated([], capsys, monkeypatch)
    assert "elements" not in out  # empty sets: no SSH from anywhere by default
    code, out, err = generated(["--ssh-from", "10.8.0.0/16", "--ssh-from", "2001:db8::/48",
                                "--ssh-from", "192.0.2.9", "--ssh-port", "2222"],
                               capsys, monkeypatch)
    assert code == 0, err
    assert "elements = { 10.8.0.0/16, 192.0.2.9/32 }" in out
    assert "elements = { 2001:db8::/48 }" in out
    assert "tcp dport 2222 ip saddr @mgmt_v4 accept" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--config", "/nonexistent/gateway.toml"], "/nonexistent/gateway.toml: file not found"),
    (["--ssh-port", "0"], "--ssh-port must be in 1..65535 (got 0)"),
])
def test_bad_input_is_refused_with_exit_2(args, message, capsys, monkeypatch):
    code, out, err = generated(args, capsys, monkeypatch)
    assert (code, out) == (2, "") and message in err


def test_an_invalid_config_names_its_key_and_exits_2(tmp_path, capsys, monkeypatch):
    bad = write(tmp_path, '[metrics]\nlisten_address = "everywhere"\n')
    code, out, err = generated(["--config", bad], capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert f"{bad}: metrics.listen_address: must be an IP address" in err


def test_a_bad_ssh_network_is_a_usage_error(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        generated(["--ssh-from", "10.0.0.0/33"], capsys, monkeypatch)
    assert exc.value.code == 2
    assert "expected a network such as 192.0.2.0/24" in capsys.readouterr().err


def test_the_shipped_rule_set_is_what_the_generator_prints(capsys, monkeypatch):
    args = ["--config", "deploy/fleetgw.toml"] if SHIPPED_CONFIG.exists() else []
    code, out, err = generated(args, capsys, monkeypatch)
    assert code == 0, err
    assert SHIPPED.read_text() == out, (
        f"deploy/nftables.conf is stale: regenerate it with `fleetgw deploy nftables "
        f"{' '.join(args)} > deploy/nftables.conf`")


# ---- nft accepts it, and it does what it says -----------------------------------------------
def nft_path() -> str | None:
    return shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)


def need_nft() -> list[str]:
    """The command that checks a rule set against the kernel: ``nft`` here, or, without
    CAP_NET_ADMIN, nft as root of a fresh user and network namespace (the same kernel check)."""
    nft = nft_path()
    problem = "nft is not installed (apt-get install nftables)"
    if nft is not None:
        for prefix in ([], ["unshare", "--user", "--map-root-user", "--net"]):
            probe = subprocess.run([*prefix, nft, "-c", "-f", "-"],
                                   input="table inet fleetgw_probe\n", capture_output=True,
                                   text=True, timeout=30)
            if probe.returncode == 0:
                return [*prefix, nft]
            problem = f"nft -c cannot run here: {probe.stderr.strip()}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{problem}, and {REQUIRE_ENV}=1 requires it", pytrace=False)
    pytest.skip(problem)


@pytest.mark.parametrize("config", ["default", "exposed", "shipped"])
def test_nft_accepts_the_rule_set(config, tmp_path, capsys, monkeypatch):
    nft = need_nft()
    if config == "shipped":
        path = SHIPPED
    else:
        args = ["--config", write(tmp_path, EXPOSED)] if config == "exposed" else []
        code, out, err = generated(args + ["--ssh-from", "10.8.0.0/16"], capsys, monkeypatch)
        assert code == 0, err
        path = tmp_path / "rules.nft"
        path.write_text(out)
    check = subprocess.run([*nft, "-c", "-f", str(path)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stderr


class Namespace:
    """A throwaway network namespace: a sleeping ``unshare --net`` process; commands run in
    it through nsenter. Gone when the process is."""

    def __init__(self) -> None:
        own = os.readlink("/proc/self/ns/net")
        self.proc = subprocess.Popen(["unshare", "--net", "sleep", "600"])
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.proc.pid}/ns/net") == own:  # not unshared yet
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                "unshare --net did not take effect"
            time.sleep(0.01)

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", *cmd],
                              capture_output=True, text=True, timeout=30, **kw)

    def popen(self, *cmd: str) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


LISTENER = """
import socket, sys
tcp = {}
for port in (9478, 9479):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(); tcp[port] = s
udp = {}
for port in (10110, 10111):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
    udp[port] = u
# The client sends to both ports back to back, after its TCP tries: wait long for the first,
# then briefly for the second (it would be there by then).
udp[10110].settimeout(60); udp[10111].settimeout(2)
print("ready", flush=True)
for port, u in udp.items():
    try:
        print("udp", port, u.recv(100).decode(), flush=True)
    except socket.timeout:
        print("udp", port, "nothing", flush=True)
"""

CLIENT = """
import socket, sys
for port in (9478, 9479):
    try:
        socket.create_connection(("10.77.0.1", port), timeout=2).close()
        print("tcp", port, "connected", flush=True)
    except OSError as exc:
        print("tcp", port, type(exc).__name__, flush=True)
for port in (10110, 10111):
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"hello", ("10.77.0.1", port))
"""


def test_loaded_it_lets_in_the_configured_ports_and_drops_the_rest(tmp_path, capsys,
                                                                   monkeypatch):
    need_nft()
    nft = nft_path()
    probe = subprocess.run(["unshare", "--net", "ip", "link", "add", "p0", "type", "veth", "peer",
                            "name", "p1"], capture_output=True, text=True, timeout=30) \
        if shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip") else None
    if probe is None or probe.returncode != 0:
        problem = ("network namespaces need root with CAP_SYS_ADMIN and CAP_NET_ADMIN, "
                   "unshare, nsenter and ip" + (f": {probe.stderr.strip()}" if probe else ""))
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{problem}, and {REQUIRE_ENV}=1 requires it", pytrace=False)
        pytest.skip(problem)
    code, out, err = generated(["--config", write(tmp_path, EXPOSED)], capsys, monkeypatch)
    assert code == 0, err
    rules = tmp_path / "rules.nft"
    rules.write_text(out)
    gw, peer = Namespace(), Namespace()
    listener = None
    try:
        link = subprocess.run(["ip", "link", "add", "fgw-gw", "netns", str(gw.proc.pid), "type",
                               "veth", "peer", "name", "fgw-peer", "netns", str(peer.proc.pid)],
                              capture_output=True, text=True, timeout=30)
        assert link.returncode == 0, link.stderr
        for ns, dev, addr in ((gw, "fgw-gw", "10.77.0.1/24"), (peer, "fgw-peer", "10.77.0.2/24")):
            for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", addr, "dev", dev],
                        ["ip", "link", "set", dev, "up"]):
                done = ns.run(*cmd)
                assert done.returncode == 0, (cmd, done.stderr)
        # Another table on the same hook, then ours twice (a reload): both stay, ours once.
        other = gw.run(nft, "-f", "-", input="table inet other {\n chain c { type filter hook "
                                             "input priority 10; policy accept; }\n}\n")
        assert other.returncode == 0, other.stderr
        for _ in range(2):
            loaded = gw.run(nft, "-f", str(rules))
            assert loaded.returncode == 0, loaded.stderr
        assert gw.run(nft, "list", "tables").stdout.split("\n")[:2] == [
            "table inet other", "table inet fleetgw"]

        listener = gw.popen(sys.executable, "-c", LISTENER)
        assert listener.stdout.readline().strip() == "ready", listener.stderr.read()
        client = peer.run(sys.executable, "-c", CLIENT)
        assert client.returncode == 0, client.stderr
        # 9478 (metrics) and 10110 (gnss0) are configured; 9479 and 10111 are not: dropped
        # silently (a timeout, not a refusal).
        assert client.stdout.splitlines() == ["tcp 9478 connected", "tcp 9479 TimeoutError"]
        heard, _ = listener.communicate(timeout=30)
        assert heard.splitlines() == ["udp 10110 hello", "udp 10111 nothing"]
    finally:
        if listener is not None and listener.poll() is None:
            listener.kill()
            listener.wait()
        for ns in (gw, peer):
            with contextlib.suppress(Exception):
                ns.close()

