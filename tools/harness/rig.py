"""`Rig`: a real gateway and a real central receiver on loopback, faults, and what happened.

Where this sits: the core of the fault-injection harness (tools/harness), used by the tests and
by `fleetgw drill run`. In a directory of its own a rig

- provisions a fleet CA, the receiver's certificate and a key + client certificate per device
  (`tools.provisioning`), starts the receiver (HTTPS with required client certificates, chdb)
  on a free loopback port, and a `LinkProxy` that plays the link between uplink and receiver;
- writes the gateway's config (the given one, with fault injection on, free ports, and its
  uplink pointed at the link) and starts `fleetgw run` (`GatewayProcess`), optionally on a small
  real disk (`SmallDisk`) and under a controllable wall clock (`ClockControl`);
- watches the live supervision tree (one long-lived `fleetgw topology --json --watch`), so
  restarts, time to recover and the journal's commit pauses are measured as they happen;
- injects faults, each recorded as a `FaultEvent`: SIGKILL/SIGSTOP of any actor by name,
  exception/exit/hang/slowdown/segfault inside an actor, a power cut (every gateway process at
  once) and a restart, link faults, a full disk, a clock jump, a corrupt model install, floods
  of malformed input;
- finishes: an orderly stop, a drain run without sensors until the uplink has synced the
  journal, the receiver stopped, and `RigResults` read from the journal and from ClickHouse.

Nothing listens beyond 127.0.0.1. `close()` leaves no process and no mount behind, whatever
state the rig is in.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import attrs

from config.loader import default_config_path, parse_config
from messages.supervision import FAULT_KINDS
from tools.gateway_process import ROOT, GatewayProcess
from tools.harness.toml_text import dumps
from tools.health_checks import actors_down, by_name, walk

#: Seconds between samples of the live tree.
SAMPLE_INTERVAL_S = 0.5
#: How long a gateway may take to start (every actor running).
START_TIMEOUT_S = 90.0
#: Seconds between checks of which processes have journal.db open for writing (I3).
WRITER_CHECK_S = 2.0


class RigError(RuntimeError):
    """The rig could not do what was asked (bad target, no such sensor, nothing started)."""


@attrs.define
class FaultEvent:
    """One fault the rig injected: when (seconds since the rig started), what, on what; and,
    for faults that kill or stop actors, how long until the target ran again."""

    at_s: float
    kind: str
    target: str
    detail: str = ""
    #: pid of the target when it was hit (recovery = running again with another pid)
    pid: int | None = None
    recovered_s: float | None = None
    #: when the fault ended (link restored, disk freed, process resumed), if it does
    ended_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class Sample:
    """One look at the live tree: when, and the tree (JSON, as `fleetgw topology --json`)."""

    at_s: float
    tree: dict[str, Any]


def free_port() -> int:
    """A free loopback port (the kernel's choice)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TreeWatch:
    """A `fleetgw topology --json --watch` child: one JSON tree per line, kept as `Sample`s."""

    def __init__(self, admin_port: int, t0: float, output: Path) -> None:
        self.samples: list[Sample] = []
        self.t0 = t0
        self.lock = threading.Lock()
        with open(output, "a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "topology", "--json", "--watch",
                 "--interval", str(SAMPLE_INTERVAL_S), "--admin-port", str(admin_port)],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True, name="tree-watch")
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                sample = Sample(round(time.monotonic() - self.t0, 3), json.loads(line))
                with self.lock:
                    self.samples.append(sample)

    def latest(self) -> Sample | None:
        with self.lock:
            return self.samples[-1] if self.samples else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(10)


class Rig:
    """A gateway (+ receiver + link) under test in ``directory``.

    ``config``: the gateway config as TOML text, a parsed dict, or None for the embedded
    default (config/demo.toml). ``receiver``: run a central receiver and point the uplink at
    it through the link proxy (the config's [uplink] keeps its other settings).
    ``devices``: device ids to provision besides those the config names (e.g. an MQTT topic's
    device). ``disk_mb``: put the data dir on a real tmpfs of that size (`SmallDisk`).
    ``clock``: run the gateway under a wall clock the rig can jump (`ClockControl`).
    """

    def __init__(self, directory: str | os.PathLike[str],
                 config: str | dict[str, Any] | None = None, *, receiver: bool = True,
                 devices: tuple[str, ...] = (), disk_mb: int | None = None,
                 clock: bool = False) -> None:
        self.directory = Path(directory).resolve()
        if config is None:
            config = Path(default_config_path()).read_text()
        if isinstance(config, str):
            try:
                config = tomllib.loads(config)
            except tomllib.TOMLDecodeError as exc:
                raise RigError(f"the gateway config is not valid TOML: {exc}") from None
        self.base_config: dict[str, Any] = config
        self.use_receiver = receiver
        self.extra_devices = tuple(devices)
        self.disk_mb = disk_mb
        self.use_clock = clock
        self.t0 = time.monotonic()
        self.events: list[FaultEvent] = []
        self.samples: list[Sample] = []
        self.runs = 0
        self.admin_port = free_port()
        self.metrics_port = free_port()
        self.broker_port = free_port()
        self.disk: Any = None
        self.clock: Any = None
        self.central: Any = None
        self.link: Any = None
        self.gateway: GatewayProcess | None = None
        self.watch: TreeWatch | None = None
        self.device_ids: tuple[str, ...] = ()
        self.config_path = self.directory / "gateway.toml"
        #: I3 checks: moments a process other than the journal actor had journal.db open for
        #: writing (sampled every `WRITER_CHECK_S` while a gateway runs)
        self.foreign_writers: list[dict[str, Any]] = []
        self.writer_checks = 0
        self._writer_stop = threading.Event()
        self._writer_thread: threading.Thread | None = None

    # ---- set-up ---------------------------------------------------------------------------
    @property
    def data_dir(self) -> str:
        base = Path(self.disk.directory) if self.disk is not None else self.directory
        return str(base / "data")

    @property
    def journal_path(self) -> str:
        return os.path.join(self.data_dir, "journal.db")

    @property
    def key_file(self) -> str:
        """The journal's key file ("" = payloads in clear), as the gateway resolves it."""
        journal = self.base_config.get("journal", {})
        return parse_config({"journal": journal}, "<rig config>").journal.key_path(self.data_dir)

    def now(self) -> float:
        """Seconds since the rig was made."""
        return round(time.monotonic() - self.t0, 3)

    def start(self) -> Rig:
        """Start everything and wait until every actor runs."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            if self.disk_mb is not None:
                from tools.harness.disk import SmallDisk

                self.disk = SmallDisk(self.directory / "disk", self.disk_mb)
            if self.use_clock:
                from tools.harness.clock import ClockControl

                self.clock = ClockControl(self.directory / "clock")
            config = self.gateway_config(self.base_config)
            if self.use_receiver:
                self.start_receiver(config)
                config = self.with_uplink(config)
            self.config_path.write_text(dumps(config))
            self.start_gateway()
        except BaseException:
            self.close()
            raise
        return self

    def gateway_config(self, base: dict[str, Any]) -> dict[str, Any]:
        """``base`` with this rig's ports and fault injection on, checked like `fleetgw run`
        checks a config (a bad one is a `RigError` naming the problem)."""
        config = copy.deepcopy(base)
        gateway = config.setdefault("gateway", {})
        gateway["admin_port"] = self.admin_port
        gateway["fault_injection"] = True
        gateway.setdefault("status_interval_s", 1.0)
        config.setdefault("metrics", {})["port"] = self.metrics_port
        if config.get("broker", {}).get("enabled"):
            config["broker"]["port"] = self.broker_port
        from config import ConfigError

        try:
            parsed = parse_config(config, "<rig config>")
        except ConfigError as exc:
            raise RigError(f"bad gateway config: {exc}") from None
        devices = {parsed.gateway.device_id, *self.extra_devices}
        devices |= {parsed.device_of(s) for s in parsed.sensors}
        self.device_ids = tuple(sorted(devices))
        return config

    def start_receiver(self, config: dict[str, Any]) -> None:
        from tools.central_process import CentralProcess
        from tools.link_proxy import LinkProxy
        from tools.provisioning import create_ca, create_device, create_server

        pki, keys = self.directory / "pki", self.directory / "keys"
        central_dir = self.directory / "central"
        if not (pki / "ca" / "ca.crt").exists():
            create_ca(pki / "ca")
            create_server(pki / "ca", pki / "receiver", hosts=("127.0.0.1",))
            for device in self.device_ids:
                create_device(pki / "ca", keys, device, devices_dir=central_dir / "devices")
            create_device(pki / "ca", pki / "probe", "probe")
        self.central = CentralProcess(
            central_dir, free_port(),
            tls=(pki / "receiver" / "receiver.crt", pki / "receiver" / "receiver.key",
                 pki / "ca" / "ca.crt"),
            probe=(pki / "probe" / "probe.crt", pki / "probe" / "probe.key",
                   pki / "ca" / "ca.crt"))
        self.central.start()
        self.link = LinkProxy(("127.0.0.1", self.central.port))

    def with_uplink(self, config: dict[str, Any]) -> dict[str, Any]:
        keys = self.directory / "keys"
        gateway_id = config.get("uplink", {}).get("gateway_id") or \
            config["gateway"].get("device_id", "veh-001")
        uplink = config.setdefault("uplink", {})
        uplink.update(url=f"https://127.0.0.1:{self.link.port}", keys_dir=str(keys),
                      tls_cert=str(keys / f"{gateway_id}.crt"),
                      tls_key=str(keys / f"{gateway_id}.key"), tls_ca=str(keys / "ca.crt"))
        for key, value in (("p2_linger_s", 1.0), ("p3_linger_s", 2.0),
                           ("backoff_base_s", 0.5), ("backoff_cap_s", 4.0)):
            uplink.setdefault(key, value)
        return config

    def start_gateway(self, config_path: Path | None = None, wait: bool = True) -> None:
        """Start a run of the gateway (the rig's config, or ``config_path``)."""
        self.runs += 1
        env = self.clock.env() if self.clock is not None else None
        self.gateway = GatewayProcess(str(config_path or self.config_path), self.data_dir,
                                      self.admin_port,
                                      str(self.directory / f"run{self.runs}.out"), env=env)
        earlier = self.gateway.pgid()
        self.gateway.start()
        if not wait:
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            proc = self.gateway.proc
            assert proc is not None
            if proc.poll() is not None:
                raise RigError(f"the gateway exited ({proc.returncode}) while starting: "
                               f"{self.run_output()[-1500:]}")
            if self.gateway.pgid() not in (None, earlier):
                break
            if time.monotonic() > deadline:
                raise RigError(f"the gateway did not start within {START_TIMEOUT_S:g}s")
            time.sleep(0.1)
        self.watch = TreeWatch(self.admin_port, self.t0, self.directory / "watch.err")
        self._writer_stop.clear()
        self._writer_thread = threading.Thread(target=self._check_writers, daemon=True,
                                               name="writer-check")
        self._writer_thread.start()
        self.wait_until(self.ready, START_TIMEOUT_S,
                        "every actor of the config to run and every MQTT sensor to subscribe")

    def ready(self) -> bool:
        """Every actor the config's tree has is running (a supervisor can be up before it
        has started its children), and every MQTT sensor has its subscriptions (what a
        broker acknowledges before that reaches no subscriber: no source could keep it)."""
        from actors.journal.reader import JournalReader
        from actors.sensors.mqtt import SUBSCRIPTIONS_MARK
        from supervisors.tree import actor_names
        assert self.gateway is not None
        parsed = parse_config(tomllib.loads(Path(self.gateway.config_path).read_text()),
                              self.gateway.config_path)
        if actors_down(self.tree(), actor_names(parsed)):
            return False
        mqtt = [s.id for s in parsed.sensors if s.type == "mqtt"]
        if not mqtt:
            return True
        with JournalReader(self.journal_path) as reader:
            return all(SUBSCRIPTIONS_MARK in reader.source_marks(sid) for sid in mqtt)

    def _check_writers(self) -> None:
        """I3, watched: only the journal actor's process opens journal.db for writing."""
        import psutil

        from supervisors import system

        path = os.path.realpath(self.journal_path)
        while not self._writer_stop.wait(WRITER_CHECK_S):
            gateway = self.gateway
            pgid = gateway.pgid() if gateway is not None else None
            sample = self.watch.latest() if self.watch is not None else None
            if not pgid or sample is None:
                continue
            journal_pid = next((n["pid"] for n in walk(sample.tree) if n["name"] == "journal"),
                               None)
            writers = []
            for proc in system.group_members(pgid):
                with contextlib.suppress(psutil.Error, OSError):
                    for f in proc.open_files():
                        if os.path.realpath(f.path) == path and f.mode != "r":
                            writers.append(proc.pid)
            self.writer_checks += 1
            # A restarted journal may not be in the latest sample yet: only a writer that is
            # still there in the next sample, and not the journal then either, counts.
            foreign = [pid for pid in writers if pid != journal_pid]
            if foreign:
                time.sleep(SAMPLE_INTERVAL_S * 3)
                latest = self.watch.latest() if self.watch is not None else None
                now_journal = next((n["pid"] for n in walk(latest.tree)
                                    if n["name"] == "journal"), None) if latest else None
                foreign = [pid for pid in foreign if pid != now_journal
                           and psutil.pid_exists(pid)]
                if foreign:
                    self.foreign_writers.append({"at_s": self.now(), "pids": foreign,
                                                 "journal_pid": now_journal})

    def run_output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / f"run{self.runs}.out").read_text()
        return ""

    # ---- the live tree --------------------------------------------------------------------
    def wait_until(self, predicate: Any, timeout_s: float, what: str) -> Any:
        """Poll ``predicate`` until truthy; `RigError` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(RigError, KeyError, OSError):
                value = predicate()
                if value:
                    return value
            time.sleep(0.1)
        raise RigError(f"timed out after {timeout_s:g}s waiting for {what}")

    def tree(self, max_age_s: float = 3.0) -> dict[str, Any]:
        """The latest sample of the live tree (at most ``max_age_s`` old)."""
        if self.watch is None:
            raise RigError("the gateway is not running")
        sample = self.watch.latest()
        if sample is None or self.now() - sample.at_s > max_age_s:
            if not self.watch.alive():
                raise RigError("the inspector lost the gateway (it is not answering)")
            raise RigError("no fresh sample of the tree")
        return sample.tree

    def nodes(self) -> dict[str, dict[str, Any]]:
        return by_name(self.tree())

    def node(self, name: str) -> dict[str, Any]:
        nodes = self.nodes()
        if name not in nodes:
            raise RigError(f"no actor named {name!r}; the tree has: {', '.join(nodes)}")
        return nodes[name]

    def all_running(self) -> bool:
        return all(n["state"] == "running" and n["pid"] for n in walk(self.tree()))

    def figures(self, name: str) -> dict[str, Any]:
        return dict(self.node(name)["figures"])

    # ---- faults ---------------------------------------------------------------------------
    def record(self, kind: str, target: str, detail: str = "", pid: int | None = None,
               ended: bool = False) -> FaultEvent:
        at = self.now()
        event = FaultEvent(at, kind, target, detail, pid, ended_s=at if ended else None)
        self.events.append(event)
        return event

    def kill(self, actor: str, sig: signal.Signals = signal.SIGKILL) -> FaultEvent:
        """Send a real signal to the process of actor ``actor``."""
        pid = self.node(actor)["pid"]
        if not pid:
            raise RigError(f"actor {actor!r} has no process now (state "
                           f"{self.node(actor)['state']})")
        os.kill(pid, sig)
        return self.record(signal.Signals(sig).name, actor, pid=pid,
                           ended=sig != signal.SIGSTOP)

    def pause(self, actor: str) -> FaultEvent:
        """SIGSTOP: the actor hangs without knowing (its supervisor's watchdog may kill it)."""
        return self.kill(actor, signal.SIGSTOP)

    def resume(self, actor: str) -> None:
        """SIGCONT for a paused actor (if the watchdog has not killed it meanwhile)."""
        for event in reversed(self.events):
            if event.kind == "SIGSTOP" and event.target == actor and event.ended_s is None:
                event.ended_s = self.now()
                with contextlib.suppress(ProcessLookupError):
                    os.kill(event.pid, signal.SIGCONT)
                return
        raise RigError(f"actor {actor!r} was not paused by this rig")

    def inject(self, actor: str, kind: str, seconds: float = 0.0) -> FaultEvent:
        """A fault inside actor ``actor``: exception, exit, segfault, hang or slow (for
        ``seconds``). The gateway accepts it because the rig turned fault injection on."""
        if kind not in FAULT_KINDS:
            raise RigError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
        pid = self.node(actor)["pid"]
        code = ("import sys\nfrom tools.faults import FaultError, inject\n"
                f"try:\n    inject({self.admin_port}, {actor!r}, {kind!r}, {seconds!r})\n"
                "except FaultError as exc:\n    sys.exit(str(exc))\n")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise RigError(f"injecting {kind} into {actor}: "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
        return self.record(kind, actor, f"{seconds:g}s" if seconds else "", pid=pid,
                           ended=kind != "slow")

    def power_cut(self) -> FaultEvent:
        """Every gateway process dies at once (SIGKILL to the run process and the actor
        process group): a power cut. `restart` boots it again."""
        gateway = self._running_gateway()
        pgid = gateway.pgid()
        if pgid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        assert gateway.proc is not None
        gateway.proc.kill()
        gateway.proc.wait()
        self._forget_run()
        return self.record("power_cut", "gateway", pid=gateway.proc.pid)

    def restart(self) -> float:
        """Boot the gateway again after a power cut; returns seconds until every actor ran."""
        began = time.monotonic()
        if self.gateway is not None:
            self.gateway.stop()  # whatever the cut left (a stale admin port, say)
        self.start_gateway()
        took = round(time.monotonic() - began, 3)
        for event in self.events:
            if event.kind == "power_cut" and event.recovered_s is None:
                event.recovered_s = took
                event.ended_s = self.now()
        return took

    def _running_gateway(self) -> GatewayProcess:
        if self.gateway is None or self.gateway.proc is None or \
                self.gateway.proc.poll() is not None:
            raise RigError("the gateway is not running")
        return self.gateway

    def _forget_run(self) -> None:
        """Keep what this run's tree said (restarts, samples) before it goes away."""
        self._writer_stop.set()
        if self._writer_thread is not None:
            self._writer_thread.join(WRITER_CHECK_S * 3 + 5)
            self._writer_thread = None
        if self.watch is None:
            return
        self.watch.stop()
        with self.watch.lock:
            self.samples += self.watch.samples
        self.watch = None

    def link_fault(self, kind: str, **params: Any) -> FaultEvent:
        """A fault of the link between uplink and receiver (`LinkProxy`): cut, blackhole,
        latency (seconds, jitter_s), bandwidth (bytes_per_s, burst_bytes), reset_mid_body
        (after_bytes, times), hold_answers."""
        if self.link is None:
            raise RigError("this rig has no receiver, so no link to fault")
        method = getattr(self.link, kind, None)
        if kind.startswith("_") or kind in ("restore", "close") or not callable(method):
            raise RigError(f"unknown link fault {kind!r}")
        method(**params)
        detail = ", ".join(f"{k}={v}" for k, v in params.items())
        return self.record(f"link_{kind}", "link", detail)

    def link_restore(self) -> None:
        if self.link is None:
            raise RigError("this rig has no receiver, so no link to restore")
        self.link.restore()
        self._end("link_")

    def _end(self, prefix: str) -> None:
        for event in self.events:
            if event.kind.startswith(prefix) and event.ended_s is None:
                event.ended_s = self.now()

    def fill_disk(self) -> FaultEvent:
        """Fill the data dir's (small, real) disk to the last byte."""
        if self.disk is None:
            raise RigError("this rig has no small disk: make it with disk_mb=")
        self.disk.fill()
        return self.record("disk_full", "disk", f"{self.disk_mb} MB")

    def free_disk(self) -> None:
        if self.disk is None:
            raise RigError("this rig has no small disk: make it with disk_mb=")
        self.disk.free()
        self._end("disk_full")

    def clock_jump(self, seconds: float) -> FaultEvent:
        """Step the gateway's wall clock by ``seconds`` (NTP or GPS fixing a Pi's clock);
        its monotonic clock runs on."""
        if self.clock is None:
            raise RigError("this rig's gateway has no controllable clock: make it with "
                           "clock=True")
        self.clock.jump(seconds)
        return self.record("clock_jump", "clock", f"{seconds:+g}s", ended=True)

    def corrupt_model(self) -> FaultEvent:
        """Corrupt the installed, active model on disk (a bad write on an SD card) and restart
        the model runner so it loads it again: it must refuse it and keep journaling."""
        from actors.model_runner.registry import ModelRegistry

        registry = ModelRegistry(os.path.join(self.data_dir, "models"))
        version = registry.active_version()
        if version is None:
            raise RigError("no model is installed and active in this gateway")
        weights = registry.versions / version / "model.bin"
        data = bytearray(weights.read_bytes())
        for i in range(0, len(data), max(1, len(data) // 64)):
            data[i] ^= 0xFF
        weights.write_bytes(bytes(data))
        event = self.record("corrupt_model", "model", f"version {version}", ended=True)
        pid = self.node("model")["pid"]
        if pid:
            with contextlib.suppress(ProcessLookupError):  # a crash-looping runner just died
                os.kill(pid, signal.SIGKILL)
            event.pid = pid
        return event

    def flood(self, sensor_id: str, count: int) -> FaultEvent:
        """``count`` malformed inputs to source sensor ``sensor_id`` (MQTT: to its first
        topic filter's topic; NMEA and CAN over UDP: datagrams to its address)."""
        from tools.harness import load

        sensor = self.sensor_config(sensor_id)
        kind = sensor.get("type", "sim")
        if kind == "mqtt":
            host, port = self.mqtt_address()
            topic = topic_for(sensor["mqtt"]["topics"][0]["filter"])
            sent = load.flood_mqtt(host, port, topic, count)
        elif kind == "nmea":
            source = sensor.get("nmea", {}).get("source", "udp://127.0.0.1:10110")
            if not source.startswith("udp://"):
                raise RigError(f"sensor {sensor_id}: floods go to UDP sources; its source is "
                               f"{source}")
            host, _, port = source[len("udp://"):].rpartition(":")
            sent = load.flood_udp(host, int(port), count)
        elif kind == "can" and sensor.get("can", {}).get("interface") == "udp_multicast":
            can = sensor["can"]
            sent = load.flood_udp(can["channel"], int(can["port"]), count,
                                  payloads=load.MALFORMED)
        else:
            raise RigError(f"sensor {sensor_id} ({kind}) has no input the rig can flood")
        return self.record("flood", f"sensor:{sensor_id}", f"{sent} malformed inputs",
                           ended=True)

    def sensor_config(self, sensor_id: str) -> dict[str, Any]:
        for sensor in self.base_config.get("sensors", []):
            if sensor.get("id") == sensor_id:
                return sensor
        raise RigError(f"no sensor {sensor_id!r} in the gateway config")

    def mqtt_address(self) -> tuple[str, int]:
        """The broker the gateway's MQTT sensors use (its own, when [broker] runs one)."""
        parsed = parse_config(tomllib.loads(self.config_path.read_text()), str(self.config_path))
        if parsed.broker.enabled:
            host = parsed.broker.listen_address
            return ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host), parsed.broker.port
        return parsed.mqtt.host, parsed.mqtt.port

    # ---- recovery -------------------------------------------------------------------------
    def wait_recovered(self, event: FaultEvent, timeout_s: float = 60.0) -> float:
        """Wait until ``event``'s target runs again (another pid, state running); record and
        return the seconds it took from the fault."""
        def back() -> bool:
            node = self.node(event.target)
            return node["state"] == "running" and node["pid"] not in (None, event.pid)

        self.wait_until(back, timeout_s, f"{event.target} to run again after {event.kind}")
        event.recovered_s = round(self.now() - event.at_s, 3)
        return event.recovered_s

    def fill_recoveries(self) -> None:
        """For faults nobody waited on (a drill's timeline): how long until the target ran
        again, judged from the samples of the tree (`results.recoveries`)."""
        from tools.harness.results import recoveries

        found = {(r.kind, r.at_s): r.recovered_s
                 for r in recoveries([e.to_json() for e in self.events], self.all_samples())}
        for event in self.events:
            if event.recovered_s is None:
                event.recovered_s = found.get((event.kind, event.at_s))

    def all_samples(self) -> list[Sample]:
        samples = list(self.samples)
        if self.watch is not None:
            with self.watch.lock:
                samples += self.watch.samples
        return samples

    def restarts(self) -> dict[str, int]:
        """Restarts per actor over every run of this rig. A supervisor reports its children's
        counts; when it restarts (or the gateway does), they start again from 0, so a count
        that goes down carries what it had reached."""
        carried: dict[str, int] = {}
        last: dict[str, int] = {}
        for sample in self.all_samples():
            for node in walk(sample.tree):
                name, count = node["name"], node.get("restarts", 0)
                if count < last.get(name, 0):
                    carried[name] = carried.get(name, 0) + last[name]
                last[name] = count
        return {name: carried.get(name, 0) + count for name, count in last.items()}

    # ---- the end --------------------------------------------------------------------------
    def stop_gateway(self) -> int | None:
        """An orderly stop (SIGTERM) of the running gateway; its exit status."""
        if self.gateway is None or self.gateway.proc is None or \
                self.gateway.proc.poll() is not None:
            return None
        self._forget_run()
        code = self.gateway.terminate()
        self.gateway.stop()
        return code

    def drain(self, timeout_s: float = 180.0) -> bool:
        """After the gateway stopped: a run without sensors until the uplink has synced every
        syncable record (or ``timeout_s``); True when it did."""
        if self.central is None:
            return True
        if self.link is not None:
            self.link_restore()
        config = tomllib.loads(self.config_path.read_text())
        config.pop("sensors", None)
        config.setdefault("metrics", {})["health_interval_s"] = 0  # no new readings
        drain_path = self.directory / "drain.toml"
        drain_path.write_text(dumps(config))
        self.start_gateway(drain_path, wait=False)
        deadline = time.monotonic() + timeout_s
        drained = False
        try:
            while time.monotonic() < deadline:
                syncable, synced = self.sync_totals()
                if syncable == synced:
                    drained = True
                    break
                time.sleep(0.5)
        finally:
            assert self.gateway is not None
            if self.gateway.proc is not None and self.gateway.proc.poll() is None:
                self.gateway.terminate()
            self.gateway.stop()
        return drained

    def sync_totals(self) -> tuple[int, int]:
        """(syncable, synced) over every device, from the journal."""
        from actors.journal.reader import JournalReader

        try:
            with JournalReader(self.journal_path) as reader:
                counts = reader.sync_counts()
        except Exception:  # not created yet, or being created
            return 0, -1
        return sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())

    def finish(self, drain_timeout_s: float = 180.0) -> Any:
        """Orderly stop, drain, stop the receiver, and read back everything: `RigResults`."""
        from tools.harness.results import collect

        self.fill_recoveries()
        exit_status = self.stop_gateway()
        drained = self.drain(drain_timeout_s)
        if self.central is not None:
            self.central.stop()
        return collect(self, exit_status, drained)

    def disk_budget_bytes(self) -> int:
        """The journal's disk budget in this rig's config."""
        return parse_config(tomllib.loads(self.config_path.read_text()),
                            str(self.config_path)).journal.disk_budget_bytes

    def close(self) -> None:
        """Leave nothing behind: gateway processes, the watcher, the receiver, the link, the
        mount. Safe to call in any state, more than once."""
        self._writer_stop.set()
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        if self.gateway is not None:
            self.gateway.stop()
        if self.link is not None:
            self.link.close()
        if self.central is not None:
            self.central.stop()
        if self.disk is not None:
            with contextlib.suppress(Exception):
                self.disk.free()
            self.disk.unmount()
        if self.clock is not None:
            self.clock.close()

    def __enter__(self) -> Rig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def topic_for(topic_filter: str) -> str:
    """A concrete topic matching ``topic_filter`` ("+" and "#" filled in)."""
    levels = ["flood" if level == "+" else level for level in topic_filter.split("/")]
    if levels and levels[-1] == "#":
        levels[-1] = "flood"
    return "/".join(levels)
