"""A `fleetgw central serve` child process: the receiver on loopback, started, killed, queried.

Where this sits: outside the data path, for the demo, the sync benchmark and the system tests.
It writes a receiver config (plain HTTP on 127.0.0.1, or HTTPS with required client
certificates when given ``tls``; chdb in ``directory``), starts the real serve command, waits
for ``/v1/health`` with a deadline, and can SIGKILL it (an outage or a crash mid-insert) or stop
it; queries go through ``fleetgw central query`` (one process owns a chdb path: query only
while it is stopped).
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nacl.signing

from central.devices import DeviceRegistry
from tools.gateway_process import ROOT


def write_device_key(keys_dir: str | os.PathLike[str], device_id: str,
                     key: nacl.signing.SigningKey) -> Path:
    """A gateway's signing key file for ``device_id`` (hex seed, 0600)."""
    path = Path(keys_dir) / f"{device_id}.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.encode().hex() + "\n")
    return path


#: PEM paths: (certificate, key, CA). For the receiver: its certificate, its key, and the CA
#: client certificates must chain to; for a client: its certificate, its key, and the CA that
#: signed the receiver's certificate.
TlsFiles = tuple[str | os.PathLike[str], str | os.PathLike[str], str | os.PathLike[str]]


def _toml_string(path: str | os.PathLike[str]) -> str:
    """An absolute path as a TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(str(Path(path).resolve()))


class CentralProcess:
    """One receiver in a child process, its config and data in ``directory``.

    ``tls``: serve HTTPS with required client certificates (`TlsFiles` for the receiver);
    ``probe`` is then the client certificate the health check presents (a receiver with mTLS
    answers nobody without one), required with ``tls``. Without ``tls``: plain HTTP."""

    def __init__(self, directory: str | os.PathLike[str], port: int,
                 extra_config: str = "", tls: TlsFiles | None = None,
                 probe: TlsFiles | None = None) -> None:
        if tls is not None and probe is None:
            raise ValueError("a TLS receiver requires client certificates: give probe "
                             "(certificate, key, CA) for its health check, e.g. one made by "
                             "`fleetgw provision device --id probe`")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.config_path = self.directory / "central.toml"
        self.output_path = self.directory / "central.out"
        self.devices = DeviceRegistry(self.directory / "devices")
        receiver_tls = ""
        if tls is not None:
            cert, key, client_ca = (_toml_string(p) for p in tls)
            receiver_tls = f"tls_cert = {cert}\ntls_key = {key}\ntls_client_ca = {client_ca}\n"
        self.config_path.write_text(
            f'[receiver]\nhost = "127.0.0.1"\nport = {port}\ndevices_dir = "devices"\n'
            f'{receiver_tls}'
            f'[backend]\nkind = "chdb"\npath = "central.chdb"\n{extra_config}')
        self.tls = tls is not None
        self._probe_context: ssl.SSLContext | None = None
        if probe is not None and self.tls:
            cert, key, ca = (str(p) for p in probe)
            self._probe_context = ssl.create_default_context(cafile=ca)
            self._probe_context.load_cert_chain(cert, key)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def register(self, device_id: str, key: nacl.signing.SigningKey,
                 replace: bool = False) -> None:
        self.devices.register(device_id, key.verify_key.encode().hex(), replace=replace)

    def start(self, timeout_s: float = 60.0) -> CentralProcess:
        with open(self.output_path, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tools.cli", "central", "serve", "--config",
                 str(self.config_path)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the receiver exited ({self.proc.returncode}): "
                                   f"{self.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the receiver did not answer within {timeout_s} s")
            time.sleep(0.05)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/health", timeout=1,
                                        context=self._probe_context) as reply:
                return reply.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, perhaps in the middle of an insert."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout_s: float = 60.0) -> None:
        """An orderly stop (SIGTERM); SIGKILL if it does not end in time."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        try:
            return self.output_path.read_text()
        except OSError:
            return ""

    def query(self, sql: str, fmt: str = "TSV") -> str:
        """Run ``sql`` through `fleetgw central query` (the receiver must be stopped)."""
        result = subprocess.run(
            [sys.executable, "-m", "tools.cli", "central", "query", "--config",
             str(self.config_path), "--format", fmt, sql],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"central query failed: {result.stderr.strip()}")
        return result.stdout
