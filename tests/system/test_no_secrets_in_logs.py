"""Secrets never reach a log: one full `fleetgw demo`, then every secret it made is looked for,
in every form a leak could take, in every log and output it wrote.

The secrets: every file under the demo's directory that is mode 0600 or named ``*.key`` (the
fleet CA's, the receiver's, the probe's and the device's Ed25519 keys, PEM PKCS8; the journal's
key ring, ``<id> <64 hex>`` lines; the broker's password file; the broker's persistence) and the
MQTT password, given to the demo through ``FLEETGW_DEMO_MQTT_PASSWORD`` (the demo's mosquitto
accepts only that login, so the gateway's MQTT sensor really uses it). The forms: the file's
text, each secret line and token of it (16 characters or more), and each key's raw bytes as
hex (both cases), base64 (standard and URL-safe, padded or not) and a Python bytes repr.
Where: every ``*.log``/``*.out``/``*.err`` file, the demo's own output, and the text files that
are no secret (configs, state files), which must not hold a copy either.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.system.harness import ROOT
from tools.demo import MQTT_PASSWORD_ENV

pytestmark = pytest.mark.system
pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")

#: Shorter strings match by chance.
MIN_FORM = 16
LOG_SUFFIXES = (".log", ".out", ".err")
TEXT_SUFFIXES = (".toml", ".json", ".conf", ".pub", ".crt", ".txt")
PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----(.*?)-----END \1-----", re.S)
HEX_RUN = re.compile(rb"[0-9a-fA-F]{32,}")


def byte_forms(raw: bytes) -> set[bytes]:
    """The ways key bytes could be printed."""
    b64 = base64.b64encode(raw)
    url = base64.urlsafe_b64encode(raw)
    return {raw.hex().encode(), raw.hex().upper().encode(), b64, b64.rstrip(b"="), url,
            url.rstrip(b"="), repr(raw)[2:-1].encode()}


def secret_forms(data: bytes) -> set[bytes]:
    """What a leak of a secret file's content would look like in a log."""
    forms = {data, data.strip()}
    for match in PEM_BLOCK.finditer(data):
        body = match.group(2).split()
        forms.add(b"".join(body))
        forms.update(body)  # each base64 line
        key = serialization.load_pem_private_key(match.group(0), password=None)
        try:
            forms |= byte_forms(key.private_bytes(serialization.Encoding.Raw,
                                                  serialization.PrivateFormat.Raw,
                                                  serialization.NoEncryption()))
        except ValueError:  # not a raw-able key type (RSA, EC): its DER then
            forms |= byte_forms(base64.b64decode(b"".join(body)))
    if b"\x00" not in data:  # text: its lines and tokens (key ring lines, password hashes)
        for line in data.splitlines():
            if line.startswith((b"#", b"-----")):
                continue
            forms.add(line.strip())
            forms.update(re.split(rb"[\s:$]+", line))
        for run in HEX_RUN.findall(data):
            forms |= byte_forms(bytes.fromhex(run.decode()[: len(run) // 2 * 2]))
    return {f for f in forms if len(f) >= MIN_FORM}


def is_secret_file(path: Path) -> bool:
    return path.suffix == ".key" or stat.S_IMODE(path.stat().st_mode) == 0o600


def leaks(forms: dict[bytes, str], texts: dict[str, bytes]) -> list[str]:
    return [f"{what} in {where}" for where, data in texts.items()
            for form, what in forms.items() if form in data]


def test_the_scan_finds_a_key_in_each_form_it_derives(tmp_path):
    """The scanner itself: a PEM key's seed in hex, a key ring's key in base64, found."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    ring_key = os.urandom(32)
    ring = b"# header\n1 " + ring_key.hex().encode() + b"\n"
    forms = {f: "pem" for f in secret_forms(pem)} | {f: "ring" for f in secret_forms(ring)}
    assert seed.hex().encode() in forms and base64.b64encode(ring_key) in forms
    log = {"gateway.log": b"msg=" + seed.hex().encode() + b" ring="
                          + base64.b64encode(ring_key).rstrip(b"=")}
    assert sorted(leaks(forms, log)) == ["pem in gateway.log", "ring in gateway.log"]
    assert leaks(forms, {"clean.log": b"ts=1 level=info msg=\"-----BEGIN PRIVATE KEY-----\""}) \
        == []


def test_no_secret_the_demo_made_or_was_given_appears_in_any_log(tmp_path):
    password = secrets.token_urlsafe(24)
    result = subprocess.run(
        [sys.executable, "-m", "tools.cli", "demo", "--data-dir", str(tmp_path),
         "--up-s", "4", "--cut-s", "3", "--after-s", "4"],
        cwd=ROOT, capture_output=True, timeout=600,
        env={**os.environ, MQTT_PASSWORD_ENV: password})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:].decode(errors="replace")
    root = tmp_path / "demo"
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]

    # The secrets, and every form of them.
    secret_files = sorted(p for p in files if is_secret_file(p))
    names = {p.name for p in secret_files}
    assert {"ca.key", "receiver.key", "veh-001.key", "probe.key"} <= names, names
    forms: dict[bytes, str] = {}
    for path in secret_files:
        derived = secret_forms(path.read_bytes())
        # A key file gives its key bytes (32: Ed25519 seeds, SecretBox keys) and their printings.
        assert derived and (path.suffix != ".key" or any(
            re.fullmatch(rb"[0-9a-f]{64}", f) for f in derived)), (path, derived)
        forms |= dict.fromkeys(derived, str(path.relative_to(root)))
    forms |= {f: "the MQTT password" for f in
              {password.encode(), *byte_forms(password.encode())} if len(f) >= MIN_FORM}

    # Where they must not be: logs and outputs, and the text files that are no secret.
    logs = {str(p.relative_to(root)): p.read_bytes() for p in files
            if p.name.endswith(LOG_SUFFIXES) and p not in secret_files}
    logs["the demo's output"] = output
    texts = {str(p.relative_to(root)): p.read_bytes() for p in files
             if p.suffix in TEXT_SUFFIXES and p not in secret_files}
    found = leaks(forms, logs) + leaks(forms, texts)
    assert not found, found

    # The scan read the real thing: the gateway's, the receiver's and the broker's logs, with
    # the MQTT sensor logged in under the password's user, and the uplink at work.
    log_bytes = sum(len(data) for data in logs.values())
    assert log_bytes >= 8000, {k: len(v) for k, v in logs.items()}
    assert b"uplink to https://" in logs["gateway/data/gateway.log"]
    assert logs["central/central.out"] and logs["gateway/gateway.out"]
    if b"real sources too" in output:  # mosquitto installed: the login was used
        assert re.search(rb"as fleetgw-veh-001-cabin-mqtt .*u'demo'",
                         logs["gateway/data/broker/mosquitto.log"])
        assert "gateway/broker.passwd" in forms.values()
    if (root / "gateway" / "data" / "journal.key").exists():  # encryption at rest configured
        assert "gateway/data/journal.key" in forms.values()
