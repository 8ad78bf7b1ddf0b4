"""A private ClickHouse server for the direct-mode tests (fixtures, shared by tests/conftest.py).

`clickhouse` is one ``clickhouse-server`` process (Debian's package: 18.16) for the session,
in a temporary directory: its own config on loopback, free ports (HTTP, and HTTPS with a
certificate for 127.0.0.1 from a private CA, ``ca_file``), data and logs under that
directory, a ``default`` user without a password and a ``writer`` user with one. Each test
that uses it gets its own database (`clickhouse_db`). Without the binary the tests that need it
are skipped, unless ``FLEETGW_REQUIRE_CLICKHOUSE=1`` (CI) makes that a failure. Readiness is
polled (``GET /ping``) against a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import itertools
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BINARY = "clickhouse-server"
#: Debian installs the server in /usr/sbin, which is not on every user's PATH.
EXTRA_PATH = "/usr/sbin:/usr/local/sbin"
REQUIRE_ENV = "FLEETGW_REQUIRE_CLICKHOUSE"
START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 15.0
POLL_S = 0.05
WRITER, WRITER_PASSWORD = "writer", "wr1ter-Secret"
_databases = itertools.count(1)

CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{root}/log/server.log</log>
        <errorlog>{root}/log/server.err.log</errorlog>
        <size>10M</size>
        <count>1</count>
        <console>0</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <https_port>{https_port}</https_port>
    <tcp_port>{tcp_port}</tcp_port>
    <openSSL>
        <server>
            <certificateFile>{root}/tls/server.crt</certificateFile>
            <privateKeyFile>{root}/tls/server.key</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>
        </server>
    </openSSL>
    <path>{root}/data/</path>
    <tmp_path>{root}/tmp/</tmp_path>
    <user_files_path>{root}/user_files/</user_files_path>
    <format_schema_path>{root}/format_schemas/</format_schema_path>
    <users_config>{root}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <max_concurrent_queries>20</max_concurrent_queries>
</yandex>
"""
USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <{writer}>
            <password>{password}</password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </{writer}>
    </users>
    <quotas><default></default></quotas>
</yandex>
"""


def clickhouse_binary() -> str:
    """The server's path; skips the test (fails it under FLEETGW_REQUIRE_CLICKHOUSE=1) when
    it is not installed."""
    found = shutil.which(BINARY) or shutil.which(
        BINARY, path=os.pathsep.join([os.environ.get("PATH", ""), EXTRA_PATH]))
    if found is None:
        reason = (f"{BINARY} is not installed (Debian: apt-get install -y clickhouse-server); "
                  "the direct-mode tests need a real server")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires it", pytrace=False)
        pytest.skip(reason)
    return found


def write_tls_files(directory: Path) -> Path:
    """A private CA and the server's certificate for 127.0.0.1 (ECDSA P-256, valid a day) in
    ``directory``; the CA certificate's path."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def certificate(subject: str, key, issuer: str, issuer_key, *extensions):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1)))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test-ca", ca_key, "test-ca", ca_key,
                     x509.BasicConstraints(ca=True, path_length=0))
    server = certificate("clickhouse", key, "test-ca", ca_key,
                         x509.SubjectAlternativeName([x509.IPAddress(
                             ipaddress.ip_address("127.0.0.1"))]),
                         x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]))
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return directory / "ca.crt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ClickHouseProcess:
    """One private clickhouse-server in ``root``; `start` again after `crash` or `stop`
    reuses the same ports and data (an outage, not a new server)."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary, self.root = binary, root
        self.http_port, self.https_port, self.tcp_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}/"
        self.https_url = f"https://127.0.0.1:{self.https_port}/"
        self.process: subprocess.Popen | None = None
        for name in ("log", "data", "tmp", "user_files", "format_schemas"):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.ca_file = write_tls_files(root / "tls")
        (root / "config.xml").write_text(CONFIG.format(
            root=root, http_port=self.http_port, https_port=self.https_port,
            tcp_port=self.tcp_port))
        (root / "users.xml").write_text(USERS.format(writer=WRITER, password=WRITER_PASSWORD))

    def start(self) -> None:
        """Start the server and return once ``/ping`` answers (or fail with its log)."""
        with open(self.root / "log" / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(
                [self.binary, f"--config-file={self.root / 'config.xml'}"], cwd=self.root,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._pings():
            if self.process.poll() is not None:
                pytest.fail(f"clickhouse-server exited with {self.process.returncode} while "
                            f"starting:\n{self.log_tail()}", pytrace=False)
            if time.monotonic() > deadline:
                self.crash()
                pytest.fail(f"clickhouse-server did not answer /ping within "
                            f"{START_DEADLINE_S:.0f} s:\n{self.log_tail()}", pytrace=False)
            with contextlib.suppress(subprocess.TimeoutExpired):  # poll: it may exit
                self.process.wait(timeout=POLL_S)

    def _pings(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "ping", timeout=1) as response:
                return response.read().strip() == b"Ok."
        except OSError:
            return False

    def stop(self) -> None:
        """Stop it (SIGTERM; SIGKILL after STOP_DEADLINE_S: it waits for idle keep-alive
        connections) and wait for the exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.crash()

    def crash(self) -> None:
        """SIGKILL: gone at once, its connections reset (a crash or a power cut)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for name in ("stdout.log", "server.err.log"):
            path = self.root / "log" / name
            if path.exists():
                texts += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(texts)

    def query(self, sql: str, database: str = "") -> str:
        """Run ``sql`` over plain HTTP (independent of the code under test); its TSV output.
        Raises AssertionError with ClickHouse's message when it fails."""
        params = {"database": database} if database else {}
        request = urllib.request.Request(f"{self.url}?{urllib.parse.urlencode(params)}",
                                         data=sql.encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.read().decode()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{sql[:80]!r}: HTTP {exc.code}: "
                                 f"{exc.read().decode(errors='replace')}") from None


@pytest.fixture(scope="session")
def clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseProcess]:
    """The session's private clickhouse-server (started on first use, killed at the end)."""
    server = ClickHouseProcess(clickhouse_binary(), tmp_path_factory.mktemp("clickhouse"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def clickhouse_db(clickhouse: ClickHouseProcess) -> Iterator[str]:
    """A database name of this test's own (created by the code under test), dropped after."""
    name = f"fleetgw_test_{os.getpid()}_{next(_databases)}"
    yield name
    clickhouse.query(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def start_clickhouse(tmp_path: Path) -> Iterator[Callable[[], ClickHouseProcess]]:
    """Start a private server of this test's own (to kill and restart); killed after."""
    servers: list[ClickHouseProcess] = []

    def start() -> ClickHouseProcess:
        servers.append(ClickHouseProcess(clickhouse_binary(),
                                         tmp_path / f"clickhouse-{len(servers)}"))
        servers[-1].start()
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
