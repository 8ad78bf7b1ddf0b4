"""`fleetgw deploy nftables`: the inbound firewall a gateway config needs, as an nftables rule set.

Where this sits: outside the data path, at deployment (DESIGN.md I9: nothing listens beyond
loopback unless configured). `inbound_needs` reads a validated `GatewayConfig` and lists every
socket the gateway would open to the network: the metrics endpoint and the local broker on a
non-loopback ``listen_address``, an NMEA source bound to a non-loopback UDP address, a CAN bus
over UDP multicast. `ruleset` turns that into one ``table inet fleetgw``: input policy drop,
loopback, established/related, the ICMP/ICMPv6 and DHCP a host needs, SSH from a management
set (empty unless ``--ssh-from``), and one accept rule per need whose comment names the config
key. Everything else the gateway opens stays on loopback (the Thespian admin and actor ports,
see supervisors/hardening.py) or is outbound (uplink, external MQTT broker, NMEA over TCP).

Why outbound stays open (policy accept): the gateway reaches central, an MQTT broker, DNS and
NTP by name, at addresses that change (DNS updates, fail-over, CDNs); a rule set of
addresses would break the uplink silently at the next DNS change. Per-service egress control
belongs to systemd (``IPAddressDeny=``/``IPAddressAllow=`` in the unit), not to this table.

The file loads atomically and touches only its own table (``table``, ``delete table``, then
the definition), so other tables (Docker's, the distribution's) are left as they are; but any
base chain on the input hook may drop, so a packet must pass this table too. It filters the
host's input hook: a gateway in a container with bridge networking is reached through the
forward hook instead (give the container host networking, or publish no port).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import TYPE_CHECKING

import attrs

from config.fields import is_loopback

if TYPE_CHECKING:  # the CLI builds its parser from `add_arguments` without the config modules
    from config.schema import GatewayConfig

TABLE = "fleetgw"
#: python-can's udp_multicast port when ``[sensors.can] port`` is 0 (its documented default).
PYTHON_CAN_UDP_MULTICAST_PORT = 43113
SSH_PORT = 22
#: Echo requests answered at most this fast (a ping works; a flood does not cost the Pi).
ECHO_LIMIT = "limit rate 5/second burst 10 packets"
#: nftables refuses longer rule comments.
COMMENT_MAX = 128
INDENT = "\t\t"


@attrs.frozen
class Opening:
    """One inbound need of the config: ``proto`` (tcp/udp) to ``port`` on ``address`` (the
    bound address: 0.0.0.0 or :: for every address, a multicast group, or one local address),
    and ``key``: the config key that asks for it (the rule's comment)."""

    proto: str
    port: int
    address: str
    key: str


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def inbound_needs(config: GatewayConfig) -> list[Opening]:
    """Every socket the config opens beyond loopback, in config order."""
    needs: list[Opening] = []
    if config.metrics.enabled and not config.metrics.loopback:
        m = config.metrics
        needs.append(Opening("tcp", m.port, m.listen_address,
                             f"metrics.listen_address={m.listen_address} metrics.port={m.port}"))
    if config.broker.enabled and not config.broker.loopback:
        b = config.broker
        needs.append(Opening("tcp", b.port, b.listen_address,
                             f"broker.listen_address={b.listen_address} broker.port={b.port}"))
    for i, sensor in enumerate(config.sensors):
        where = f"sensors[{i}] ({_short(sensor.id)})"
        if sensor.type == "nmea" and sensor.nmea is not None:
            # tcp:// is a client connection and serial:// no socket: only udp:// binds.
            ep = sensor.nmea.endpoint
            if ep.scheme == "udp" and not is_loopback(ep.host):
                needs.append(Opening("udp", ep.port, ep.host,
                                     f"{where} nmea.source={_short(str(ep), 60)}"))
        if sensor.type == "can" and sensor.can is not None \
                and sensor.can.interface == "udp_multicast":
            # python-can binds the port on every address and joins the group: only datagrams
            # to the group are let in (a unicast datagram to the port would be a CAN frame).
            port = sensor.can.port or PYTHON_CAN_UDP_MULTICAST_PORT
            group = sensor.can.bus_channel
            needs.append(Opening("udp", port, group,
                                 f"{where} can.interface=udp_multicast "
                                 f"channel={group} port={port}"))
    return needs


def loopback_listeners(config: GatewayConfig) -> list[str]:
    """What the config keeps on loopback (printed in the rule set's header for auditors)."""
    found = [f"Thespian admin 127.0.0.1:{config.gateway.admin_port} (gateway.admin_port)",
             "Thespian actors 127.0.0.1:* (supervisors/hardening.py)"]
    if config.metrics.enabled and config.metrics.loopback:
        found.append(f"metrics {config.metrics.listen_address}:{config.metrics.port}")
    if config.broker.enabled and config.broker.loopback:
        found.append(f"broker {config.broker.listen_address}:{config.broker.port}")
    for i, sensor in enumerate(config.sensors):
        if sensor.type == "nmea" and sensor.nmea is not None:
            ep = sensor.nmea.endpoint
            if ep.scheme == "udp" and is_loopback(ep.host):
                found.append(f"sensors[{i}] ({_short(sensor.id)}) nmea {ep}")
    return found


def _daddr(address: str) -> str:
    """The match on the destination for a socket bound to ``address`` ('' = any address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""  # a host name, resolved when the socket opens: every address
    if ip.is_unspecified:
        # 0.0.0.0 hears IPv4 only; :: hears both (Linux's default IPV6_V6ONLY=0).
        return "meta nfproto ipv4 " if ip.version == 4 else ""
    return f"{'ip' if ip.version == 4 else 'ip6'} daddr {ip} "


def _comment(text: str) -> str:
    clean = "".join(c if c.isprintable() and c not in '"\\' else "?" for c in text)
    clean = clean.encode()[:COMMENT_MAX].decode(errors="ignore")
    return f'comment "{clean}"'


def _ipv4_multicast(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.version == 4 and ip.is_multicast


def listener_rules(needs: list[Opening]) -> list[str]:
    """One accept rule per need, its comment the config key; IGMP once when an IPv4 group is
    joined (queries keep it joined on switches that snoop; ICMPv6 MLD is in the base rules)."""
    rules = [f"{_daddr(n.address)}{n.proto} dport {n.port} accept {_comment(n.key)}"
             for n in needs]
    groups = [n for n in needs if _ipv4_multicast(n.address)]
    if groups:
        rules.append(f"ip protocol igmp accept {_comment('IGMP: ' + groups[0].key)}")
    return rules


def _networks(texts: tuple[str, ...], version: int) -> list[str]:
    nets = []
    for text in texts:
        net = ipaddress.ip_network(text, strict=False)
        if net.version == version:
            nets.append(str(net))
    return nets


def _elements(nets: list[str]) -> str:
    return f"\t\telements = {{ {', '.join(nets)} }}\n" if nets else ""


def ruleset(config: GatewayConfig, source: str, ssh_from: tuple[str, ...] = (),
            ssh_port: int = SSH_PORT, command: str = "fleetgw deploy nftables") -> str:
    """The complete nftables file for ``config`` (``source``: how it was named, ``command``:
    what made it, both for the header). ``ssh_from``: networks (CIDR) SSH is accepted from;
    empty: from nowhere."""
    listeners = listener_rules(inbound_needs(config))
    if not listeners:
        listeners = ["# none: this config listens on loopback only"]
    v4, v6 = _networks(ssh_from, 4), _networks(ssh_from, 6)
    on_loopback = "\n".join(f"#   {line}" for line in loopback_listeners(config))
    return f"""#!/usr/sbin/nft -f
# fleetgw: inbound firewall for {source}.
# Generated by: {command}
# (run it again after changing the config).
#
# Input: dropped unless accepted below (loopback, replies, ICMP/ICMPv6 a host needs, DHCP
# client replies, SSH from the mgmt sets, and one rule per listener the config puts beyond
# loopback, its comment naming the config key). Output: accepted (the uplink, an MQTT broker,
# DNS and NTP are reached by name at addresses that change; restrict egress per service with
# systemd's IPAddressAllow=/IPAddressDeny= instead). Forwarding: not touched here.
#
# SSH: accepted only from the mgmt_v4/mgmt_v6 sets, EMPTY unless generated with
# `--ssh-from CIDR`. Loading this over SSH keeps your session (established) but refuses new
# ones; add your management network first, or at run time:
#   nft add element inet {TABLE} mgmt_v4 {{ 192.0.2.0/24 }}
#
# Load: nft -f THIS_FILE (atomic; replaces table inet {TABLE} only, other tables stay).
# Remove: nft delete table inet {TABLE}
#
# On loopback only (no rule needed, lo is accepted):
{on_loopback}

table inet {TABLE}
delete table inet {TABLE}

table inet {TABLE} {{
\tset mgmt_v4 {{
\t\ttype ipv4_addr
\t\tflags interval
{_elements(v4)}\t}}

\tset mgmt_v6 {{
\t\ttype ipv6_addr
\t\tflags interval
{_elements(v6)}\t}}

\tchain input {{
\t\ttype filter hook input priority filter; policy drop;

\t\tiif "lo" accept comment "loopback: Thespian admin and actor ports, local listeners (I9)"
\t\tiif != "lo" ip daddr 127.0.0.0/8 drop comment "loopback addresses only from lo"
\t\tiif != "lo" ip6 daddr ::1 drop comment "loopback addresses only from lo"
\t\tct state established,related accept comment "replies to what the gateway opened"
\t\tct state invalid drop

\t\ticmp type {{ destination-unreachable, time-exceeded, parameter-problem }} accept
\t\ticmp type echo-request {ECHO_LIMIT} accept
\t\ticmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, parameter-problem }} accept
\t\ticmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }} ip6 hoplimit 255 accept comment "IPv6 neighbour discovery, SLAAC"
\t\ticmpv6 type {{ mld-listener-query }} ip6 saddr fe80::/10 accept comment "IPv6 multicast listener queries"
\t\ticmpv6 type echo-request {ECHO_LIMIT} accept

\t\tudp sport 67 udp dport 68 accept comment "DHCPv4 client: server replies"
\t\tip6 saddr fe80::/10 udp sport 547 udp dport 546 accept comment "DHCPv6 client: server replies"

\t\ttcp dport {ssh_port} ip saddr @mgmt_v4 accept comment "SSH from the management networks"
\t\ttcp dport {ssh_port} ip6 saddr @mgmt_v6 accept comment "SSH from the management networks"

\t\t# Listeners the gateway config puts beyond loopback:
{chr(10).join(INDENT + rule for rule in listeners)}
\t}}
}}
"""


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a network such as 192.0.2.0/24, 2001:db8::/32 or one address "
            f"(got {text!r})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fleetgw deploy nftables`."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="gateway TOML config (default: the embedded config/demo.toml, "
                             "as `fleetgw run`)")
    parser.add_argument("--ssh-from", action="append", type=_cidr, default=[], metavar="CIDR",
                        help="accept SSH from this network (repeatable; default: from "
                             "nowhere, the mgmt sets stay empty)")
    parser.add_argument("--ssh-port", type=int, default=SSH_PORT, metavar="PORT",
                        help=f"the SSH daemon's port (default {SSH_PORT})")


def nftables_command(config_path: str | None, ssh_from: list[str], ssh_port: int) -> int:
    """Print the rule set for the config; exit 2 (message on stderr) when it cannot be read
    or is not valid."""
    from config.loader import ConfigError, default_config_path, load_config

    if not 1 <= ssh_port <= 65535:
        print(f"fleetgw deploy nftables: --ssh-port must be in 1..65535 (got {ssh_port})",
              file=sys.stderr)
        return 2
    path = config_path or str(default_config_path())
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"fleetgw deploy nftables: cannot use the config:\n{exc}", file=sys.stderr)
        return 2
    source = config_path if config_path else "the embedded default config (config/demo.toml)"
    command = " ".join(["fleetgw deploy nftables",
                        *([f"--config {config_path}"] if config_path else []),
                        *(f"--ssh-from {net}" for net in ssh_from),
                        *([f"--ssh-port {ssh_port}"] if ssh_port != SSH_PORT else [])])
    sys.stdout.write(ruleset(config, source, tuple(ssh_from), ssh_port, command))
    return 0
