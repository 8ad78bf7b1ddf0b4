"""`fleetgw demo` (`make demo`): the whole mission on one machine, through a link outage.

Where this sits: outside the gateway. It provisions a fleet CA, the receiver's certificate and
the demo vehicle's key and client certificate (`tools.provisioning`), starts the central
receiver on loopback with HTTPS and required client certificates, storing in embedded
ClickHouse (chdb), and runs the gateway on the embedded defaults (config/demo.toml: simulated
IMU, GPS and engine; journal; router; OpenVINO model) with its uplink posting through a TCP
link (`tools.link_proxy`). Then:

1. the link is up: readings flow sensor -> journal -> router/model -> uplink -> ClickHouse;
2. the link is cut (connections reset): the gateway keeps journaling, the uplink backs off;
3. the link comes back: the backlog drains, P1 first;
4. the gateway stops (orderly), a sensorless run drains what is left, the receiver stops, and
   the per-device reconciliation prints: journaled, synced, rows in ClickHouse (FINAL and
   raw), duplicates, lag — I5 holds when FINAL == distinct seqs == synced.

When mosquitto is installed, the gateway also gets real sources (config/demo_sources.toml):
its own supervised mosquitto (no anonymous clients: a login whose password comes from
``FLEETGW_DEMO_MQTT_PASSWORD``, made up when unset) with an MQTT sensor fed by
`tools.mqtt_publisher`, a CAN sensor decoding config/demo_vehicle.dbc from `tools.can_player`
(UDP multicast), and an NMEA sensor fed by `tools.nmea_replay` (config/demo_drive.nmea over
UDP); malformed input from the feeders lands in the journal's quarantine. Without mosquitto the demo runs on the simulator alone.

Everything lives in ``DATA_DIR/demo`` (default ./data/demo), made afresh on every run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from actors.journal.reader import JournalReader
from config.loader import default_config_path
from tools.central_process import CentralProcess
from tools.gateway_process import GatewayProcess
from tools.link_proxy import LinkProxy
from tools.provisioning import create_ca, create_device, create_server

DEVICE = "veh-001"
UPLINK = """
[uplink]
url = "{url}"
keys_dir = "{keys}"
tls_cert = "{keys}/{device}.crt"
tls_key = "{keys}/{device}.key"
tls_ca = "{keys}/ca.crt"
p2_linger_s = 1.0
p3_linger_s = 2.0
backoff_base_s = 0.5
backoff_cap_s = 4.0
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def counts(journal: str) -> tuple[int, int, int]:
    """(journaled, syncable, synced) of the demo device, read from the journal."""
    try:
        with JournalReader(journal) as reader:
            journaled = sum(d.count for d in reader.stats().devices)
            syncable, synced, _ = reader.sync_counts().get(DEVICE, (0, 0, None))
    except Exception:  # not created yet
        return 0, 0, 0
    return journaled, syncable, synced


def watch(journal: str, seconds: float, phase: str) -> None:
    """Print the journal's figures every few seconds for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
        journaled, syncable, synced = counts(journal)
        say(f"[{phase}] journaled {journaled}, to sync {syncable}, synced {synced}, "
            f"waiting {syncable - synced}")


def gateway_config(base: str, url: str, keys: Path, port: int, sensors: bool) -> str:
    """config/demo.toml (with or without its sensors) plus the uplink section."""
    text = base if sensors else base.split("[[sensors]]", 1)[0]
    text = text.replace("admin_port = 19001", f"admin_port = {port}")
    return text + UPLINK.format(url=url, keys=keys, device=DEVICE)


CONFIG_DIR = Path(default_config_path()).parent


def sources_config() -> tuple[str, dict[str, int]] | None:
    """config/demo_sources.toml with free ports (and the DBC's absolute path), and those
    ports; None when mosquitto is not installed."""
    from actors.broker.launcher import BrokerError, find_binary

    try:
        find_binary("mosquitto")
    except BrokerError:
        return None
    ports = {"broker": free_port(), "can": free_port(), "nmea": free_port()}
    text = (CONFIG_DIR / "demo_sources.toml").read_text()
    text = (text.replace("port = 18830", f"port = {ports['broker']}")
                .replace("port = 43113", f"port = {ports['can']}")
                .replace("udp://127.0.0.1:10110", f"udp://127.0.0.1:{ports['nmea']}")
                .replace('dbc = "config/demo_vehicle.dbc"',
                         f'dbc = "{CONFIG_DIR / "demo_vehicle.dbc"}"'))
    return text, ports


#: The demo broker's login. The password is read from this environment variable (made up for
#: the run when unset, and set there, so the gateway and the publisher inherit it); the broker
#: keeps only its hash.
MQTT_USER = "demo"
MQTT_PASSWORD_ENV = "FLEETGW_DEMO_MQTT_PASSWORD"


def broker_login(text: str, directory: Path) -> str:
    """The sources config with the broker closed to anonymous clients: a mosquitto password
    file in ``directory`` (PBKDF2-SHA512, mosquitto 2's ``$7$`` format, 0600) and the
    sensors' login in [mqtt] (the password by the name of its environment variable)."""
    password = os.environ.get(MQTT_PASSWORD_ENV) or secrets.token_urlsafe(24)
    os.environ[MQTT_PASSWORD_ENV] = password
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    path = directory / "broker.passwd"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{MQTT_USER}:$7$101${base64.b64encode(salt).decode()}$"
                 f"{base64.b64encode(digest).decode()}\n")
    broker = "[broker]\nenabled = true\n"
    if broker not in text:
        raise RuntimeError(f"config/demo_sources.toml has no {broker!r} to add the login to")
    text = text.replace(broker, f"{broker}allow_anonymous = false\n"
                                f"password_file = {json.dumps(str(path))}\n")
    return text + (f'\n[mqtt]\nusername = "{MQTT_USER}"\n'
                   f'password_env = "{MQTT_PASSWORD_ENV}"\n')


def start_feeders(ports: dict[str, int], out_dir: Path) -> list[subprocess.Popen]:
    """The sources' feeders: MQTT publisher, CAN bus player, NMEA log replay."""
    commands = {
        "mqtt_publisher": ["--port", str(ports["broker"]), "--device", DEVICE, "--rate", "5",
                           "--username", MQTT_USER, "--password-env", MQTT_PASSWORD_ENV],
        "can_player": ["--interface", "udp_multicast", "--channel", "239.74.163.9",
                       "--port", str(ports["can"]), "--dbc", str(CONFIG_DIR / "demo_vehicle.dbc"),
                       "--rate", "10"],
        "nmea_replay": [str(CONFIG_DIR / "demo_drive.nmea"),
                        f"udp://127.0.0.1:{ports['nmea']}", "--rate", "1", "--loop", "--live"],
    }
    procs = []
    for module, args in commands.items():
        with open(out_dir / f"{module}.out", "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", f"tools.{module}", *args],
                                          stdout=out, stderr=subprocess.STDOUT))
    return procs


def stop_feeders(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_demo(data_dir: str, up_s: float, cut_s: float, after_s: float) -> int:
    root = Path(data_dir).resolve() / "demo"
    shutil.rmtree(root, ignore_errors=True)
    pki, keys, gw_dir = root / "pki", root / "gateway" / "keys", root / "gateway"
    say(f"provisioning a fleet CA, the receiver's certificate and {DEVICE}'s key in {root}")
    create_ca(pki / "ca")
    create_server(pki / "ca", pki / "receiver", hosts=("127.0.0.1",))
    central_dir = root / "central"
    create_device(pki / "ca", keys, DEVICE, devices_dir=central_dir / "devices")
    probe = create_device(pki / "ca", pki / "probe", "probe")
    central = CentralProcess(
        central_dir, free_port(),
        tls=(pki / "receiver" / "receiver.crt", pki / "receiver" / "receiver.key",
             pki / "ca" / "ca.crt"),
        probe=(probe.cert, probe.key, pki / "ca" / "ca.crt"))
    link = LinkProxy(("127.0.0.1", central.port))
    base = Path(default_config_path()).read_text()
    config = gw_dir / "gateway.toml"
    port = free_port()
    url = f"https://127.0.0.1:{link.port}"
    sources = sources_config()
    if sources is not None:
        sources = (broker_login(sources[0], gw_dir), sources[1])
    main_config = gateway_config(base, url, keys, port, sensors=True)
    if sources is not None:
        main_config += "\n" + sources[0]
    config.write_text(main_config)
    say(f"central receiver (HTTPS, client certificates required, chdb) on {central.url}")
    central.start()
    gateway = GatewayProcess(str(config), str(gw_dir / "data"), port,
                             str(gw_dir / "gateway.out"))
    journal = gateway.journal_path
    feeders: list[subprocess.Popen] = []
    try:
        say(f"gateway on config/demo.toml, uplink {url} (the link, then the receiver)")
        gateway.start()
        if sources is not None:
            feeders = start_feeders(sources[1], gw_dir)
            say(f"real sources too (config/demo_sources.toml): the gateway's own mosquitto on "
                f"127.0.0.1:{sources[1]['broker']} (login required) with an MQTT publisher, a "
                f"CAN bus player "
                f"(demo_vehicle.dbc) and an NMEA log replay")
        else:
            say("mosquitto is not installed: simulated sensors only (apt-get install mosquitto "
                "adds MQTT, CAN and NMEA sources to the demo)")
        watch(journal, up_s, "link up")
        link.cut()
        say(f"LINK CUT for {cut_s:.0f} s: connections reset; the journal keeps everything")
        watch(journal, cut_s, "link cut")
        link.restore()
        say("link restored: the backlog drains, P1 first")
        watch(journal, after_s, "link up")
        stop_feeders(feeders)
        say("stopping the gateway (orderly: what is in flight finishes)")
        gateway.terminate()
        report_sources(journal)
        drain = GatewayProcess(str(gw_dir / "drain.toml"), str(gw_dir / "data"), port,
                               str(gw_dir / "drain.out"))
        Path(drain.config_path).write_text(gateway_config(base, url, keys, port, False))
        say("a run without sensors syncs what is left")
        drain.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, syncable, synced = counts(journal)
            if syncable and synced == syncable:
                break
            time.sleep(0.5)
        drain.terminate()
    finally:
        stop_feeders(feeders)
        gateway.stop()
        link.close()
        central.stop()
    return reconcile_and_print(str(gw_dir / "data"), central)


def report_sources(journal: str) -> None:
    """Readings per source kind and what went to the quarantine."""
    try:
        with JournalReader(journal) as reader:
            stats = reader.stats()
            per_sensor = reader.records_per_sensor()
    except Exception:
        return
    say("journaled per sensor: " + ", ".join(f"{s} {n}" for s, n in per_sensor.items()))
    for q in stats.quarantine:
        say(f"quarantined from {q.sensor_id}: {q.quarantined} (last: {q.last_reason}); "
            f"fleetgw journal quarantine --db {journal} shows them")


def reconcile_and_print(data_dir: str, central: CentralProcess) -> int:
    from central.config import load_central_config
    from tools.central_cmd import open_backend
    from tools.reconcile import central_counts, reconcile, render

    backend = open_backend(load_central_config(central.config_path).backend)
    try:
        with JournalReader(os.path.join(data_dir, "journal.db")) as reader:
            rows = reconcile(reader, central_counts(backend, reader.generation))
    finally:
        backend.close()
    print()
    print(render(rows))
    print()
    ok = all(r.ok for r in rows)
    say("I5 holds: every record the journal marks synced is in ClickHouse exactly once "
        "(count() FINAL == distinct seqs == synced)" if ok else
        "I5 DOES NOT HOLD: see the table above")
    say(f"query it yourself: fleetgw central query --config {central.config_path} "
        "\"SELECT lane, count() FROM readings FINAL GROUP BY lane\"")
    return 0 if ok else 1


def demo_command(data_dir: str, up_s: float, cut_s: float, after_s: float) -> int:
    return run_demo(data_dir, up_s, cut_s, after_s)
