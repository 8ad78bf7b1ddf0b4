"""Provisioning (tools.provisioning, `fleetgw provision`): the fleet CA, the receiver's
certificate and each device's one Ed25519 key are written private (0600, never overwritten
unless asked), chain to the CA with the right names and usages; a device's key is registered
with the receiver and signs batches it verifies; a key file others may read is refused; the
command prints paths, fingerprints and public keys — never private key material."""

from __future__ import annotations

import base64
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from actors.uplink.keys import KeyFileError, load_signing_key
from central.devices import DeviceRegistry
from tests.provision.conftest import DEVICE
from tools.provisioning import (
    ProvisionError,
    create_ca,
    create_device,
    create_server,
    public_hex,
)

REPO = Path(__file__).resolve().parents[2]


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def extension(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


def secrets_of(key_path: Path) -> list[str]:
    """Forms a private key could leak in: the PEM body, the raw seed in hex and base64."""
    pem_body = [line for line in key_path.read_text().splitlines() if "-----" not in line]
    seed = bytes(load_signing_key(key_path))
    return [*pem_body, seed.hex(), seed.hex().upper(), base64.b64encode(seed).decode()]


# ---- what is written ------------------------------------------------------------------------
def test_the_ca_is_a_self_signed_ed25519_ca_whose_key_only_its_owner_reads(fleet):
    ca = cert_of(fleet.ca.cert)
    assert mode(fleet.ca.key) == 0o600 and mode(fleet.ca.cert) == 0o644
    assert isinstance(ca.public_key(), ed25519.Ed25519PublicKey)
    assert ca.subject == ca.issuer
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fleetgw fleet CA"
    ca.verify_directly_issued_by(ca)
    constraints = extension(ca, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = extension(ca, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    key = serialization.load_pem_private_key(fleet.ca.key.read_bytes(), password=None)
    assert key.public_key() == ca.public_key()
    assert fleet.ca.fingerprint == ca.fingerprint(hashes.SHA256()).hex(":").upper()


def test_the_receiver_certificate_names_its_hosts_and_serves_only(fleet):
    cert = cert_of(fleet.receiver.cert)
    cert.verify_directly_issued_by(cert_of(fleet.ca.cert))
    with pytest.raises(InvalidSignature):  # the check can fail: another CA did not sign it
        cert.verify_directly_issued_by(cert_of(fleet.rogue_ca.cert))
    assert mode(fleet.receiver.key) == 0o600
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "127.0.0.1"
    san = extension(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert not extension(cert, x509.BasicConstraints).value.ca
    assert fleet.receiver.ca_copy.read_bytes() == fleet.ca.cert.read_bytes()


def test_hosts_become_ip_or_dns_names_in_order(tmp_path, fleet):
    issued = create_server(fleet.ca.key.parent, tmp_path / "srv",
                           ["central.example.net", "10.1.2.3", "::1", "central.example.net"])
    san = extension(cert_of(issued.cert), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["central.example.net"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"),
                                                       ipaddress.ip_address("::1")]
    assert issued.common_name == "central.example.net"


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["-x.example"], ["a..b"]])
def test_a_host_that_is_neither_an_ip_nor_a_dns_name_is_bad_input(tmp_path, fleet, hosts):
    with pytest.raises(ProvisionError) as caught:
        create_server(fleet.ca.key.parent, tmp_path / "srv", hosts)
    assert caught.value.bad_input
    assert not (tmp_path / "srv").exists()


def test_a_device_has_one_ed25519_key_for_its_batches_and_its_client_certificate(fleet):
    cert = cert_of(fleet.device.cert)
    cert.verify_directly_issued_by(cert_of(fleet.ca.cert))
    assert fleet.device.key == fleet.device.key.parent / f"{DEVICE}.key"
    assert mode(fleet.device.key) == 0o600
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    signing_key = load_signing_key(fleet.device.key)
    raw = cert.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    assert raw == signing_key.verify_key.encode()  # the TLS key IS the batch signing key
    assert fleet.device.public_hex == public_hex(signing_key) == raw.hex()
    assert fleet.device.ca_copy.read_bytes() == fleet.ca.cert.read_bytes()


def test_the_registered_key_verifies_what_the_loaded_key_signs(fleet):
    registry = DeviceRegistry(fleet.devices_dir)
    assert fleet.device.registered == registry.directory / f"{DEVICE}.pub"
    assert fleet.device.registered.read_text() == fleet.device.public_hex + "\n"
    signed = load_signing_key(fleet.device.key).sign(b"a batch header")
    assert registry.key(DEVICE).verify(signed) == b"a batch header"
    assert registry.key(DEVICE) != load_signing_key(fleet.rogue_device.key).verify_key


def test_keys_are_private_from_their_first_byte_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        ca = create_ca(tmp_path / "ca")
        device = create_device(tmp_path / "ca", tmp_path / "gw", DEVICE)
    finally:
        os.umask(previous)
    assert mode(ca.key) == mode(device.key) == 0o600
    assert mode(device.cert) == 0o644


# ---- refusing to overwrite -------------------------------------------------------------------
def test_an_existing_ca_is_kept_unless_forced(fleet):
    before = fleet.ca.key.read_bytes(), fleet.ca.cert.read_bytes()
    with pytest.raises(ProvisionError, match=f"{fleet.ca.key} exists; refusing to overwrite"):
        create_ca(fleet.ca.key.parent)
    assert (fleet.ca.key.read_bytes(), fleet.ca.cert.read_bytes()) == before
    forced = create_ca(fleet.ca.key.parent, force=True)
    assert forced.key.read_bytes() != before[0] and forced.cert.read_bytes() != before[1]
    assert mode(forced.key) == 0o600
    assert sorted(p.name for p in forced.key.parent.iterdir()) == ["ca.crt", "ca.key"]


def test_an_existing_device_key_is_kept_unless_replaced(fleet):
    old_key = load_signing_key(fleet.device.key)
    before = fleet.device.key.read_bytes()
    with pytest.raises(ProvisionError, match="refusing to overwrite a device key") as caught:
        create_device(fleet.ca.key.parent, fleet.device.key.parent, DEVICE,
                      fleet.devices_dir)
    assert str(fleet.device.key) in str(caught.value) and not caught.value.bad_input
    assert fleet.device.key.read_bytes() == before
    replaced = create_device(fleet.ca.key.parent, fleet.device.key.parent, DEVICE,
                             fleet.devices_dir, replace=True)
    new_key = load_signing_key(replaced.key)
    assert new_key != old_key and mode(replaced.key) == 0o600
    registry = DeviceRegistry(fleet.devices_dir)
    assert registry.key(DEVICE) == new_key.verify_key != old_key.verify_key
    assert sorted(p.name for p in replaced.key.parent.iterdir()) == [
        "ca.crt", f"{DEVICE}.crt", f"{DEVICE}.key"]  # no temporary file left


def test_a_registered_device_is_not_re_keyed_from_another_directory(tmp_path, fleet):
    with pytest.raises(ProvisionError, match="already registered .* --replace"):
        create_device(fleet.ca.key.parent, tmp_path / "other-gw", DEVICE, fleet.devices_dir)
    assert not (tmp_path / "other-gw").exists()
    assert DeviceRegistry(fleet.devices_dir).key(DEVICE).encode().hex() == \
        fleet.device.public_hex


def test_a_link_planted_where_the_key_goes_is_refused_and_not_followed(tmp_path, fleet):
    out = tmp_path / "gw"
    out.mkdir()
    (out / f"{DEVICE}.key").symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(ProvisionError, match="exists; refusing to overwrite"):
        create_device(fleet.ca.key.parent, out, DEVICE)
    assert not (tmp_path / "elsewhere.key").exists()


def test_a_directory_holding_another_cas_certificate_is_not_mixed(fleet):
    with pytest.raises(ProvisionError, match="another CA's certificate"):
        create_device(fleet.ca.key.parent, fleet.rogue_device.key.parent, "veh-002")
    assert not (fleet.rogue_device.key.parent / "veh-002.key").exists()


@pytest.mark.parametrize("device_id", ["../veh-001", "a/b", ".hidden", "", "x" * 129,
                                       "veh 1"])
def test_a_device_id_that_cannot_name_a_file_is_bad_input(tmp_path, fleet, device_id):
    with pytest.raises(ProvisionError) as caught:
        create_device(fleet.ca.key.parent, tmp_path / "gw", device_id, tmp_path / "devs")
    assert caught.value.bad_input
    assert f"device id {device_id!r} must be 1-128 characters" in str(caught.value)
    assert not (tmp_path / "gw").exists() and not (tmp_path / "devs").exists()


def test_without_a_ca_nothing_is_issued(tmp_path):
    with pytest.raises(ProvisionError) as caught:
        create_device(tmp_path / "no-ca", tmp_path / "gw", DEVICE)
    assert caught.value.bad_input
    assert f"fleetgw provision ca --dir {tmp_path / 'no-ca'}" in str(caught.value)
    assert not (tmp_path / "gw").exists()


# ---- loading a device key ---------------------------------------------------------------------
def test_a_legacy_hex_seed_file_loads_as_the_same_key(tmp_path, fleet):
    legacy = tmp_path / "legacy.key"
    seed = bytes(load_signing_key(fleet.device.key))
    legacy.write_text(seed.hex() + "\n")
    legacy.chmod(0o600)
    assert load_signing_key(legacy) == load_signing_key(fleet.device.key)


def _ec_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _encrypted_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))


UNUSABLE = {
    "not ed25519": (_ec_key_pem, "not an Ed25519 key"),
    "encrypted": (_encrypted_pem, "not a readable unencrypted PEM private key"),
    "short hex": (lambda: b"ab" * 31, "not an Ed25519 key (PEM PKCS8, or a legacy seed"),
    "not hex": (lambda: b"zz" * 32, "not an Ed25519 key (PEM PKCS8, or a legacy seed"),
}


@pytest.mark.parametrize("case", UNUSABLE, ids=list(UNUSABLE))
def test_an_unusable_key_file_is_refused_naming_its_path(tmp_path, case):
    make, problem = UNUSABLE[case]
    path = tmp_path / "device.key"
    data = make()
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path)
    assert str(caught.value).startswith(f"{path}: {problem}")
    assert data.decode().strip() not in str(caught.value)


def test_a_missing_key_file_is_refused_naming_its_path(tmp_path):
    with pytest.raises(KeyFileError, match=f"^{tmp_path / 'none.key'}: no such key file$"):
        load_signing_key(tmp_path / "none.key")


@pytest.mark.parametrize("file_mode", [0o640, 0o604, 0o660, 0o644])
def test_a_key_file_group_or_others_may_read_is_refused_with_the_fix(fleet, file_mode):
    fleet.device.key.chmod(file_mode)
    with pytest.raises(KeyFileError) as caught:
        load_signing_key(fleet.device.key)
    message = str(caught.value)
    assert f"(mode {file_mode:04o})" in message
    assert message.endswith(f"Hint: chmod 600 {fleet.device.key}")
    fleet.device.key.chmod(0o600)
    assert not [s for s in secrets_of(fleet.device.key) if s in message]
    assert public_hex(load_signing_key(fleet.device.key)) == fleet.device.public_hex


def test_a_ca_key_others_may_read_is_not_used_to_issue(tmp_path, fleet):
    fleet.ca.key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        create_device(fleet.ca.key.parent, tmp_path / "gw", "veh-002")
    assert not (tmp_path / "gw").exists()


# ---- the command --------------------------------------------------------------------------------
def fleetgw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", "provision", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_command_provisions_a_fleet_and_prints_no_private_key(tmp_path):
    ca, srv, gw, devs = (str(tmp_path / name) for name in ("ca", "srv", "gw", "devices"))
    runs = [fleetgw("ca", "--dir", ca),
            fleetgw("server", "--ca", ca, "--out", srv, "--host", "127.0.0.1",
                    "--host", "central.example"),
            fleetgw("device", "--id", DEVICE, "--ca", ca, "--out", gw, "--devices-dir", devs)]
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    assert all(r.stderr == "" for r in runs)
    device_key = Path(gw) / f"{DEVICE}.key"
    public = DeviceRegistry(devs).key(DEVICE).encode().hex()
    assert public == public_hex(load_signing_key(device_key))
    assert f"public key: {public}" in runs[2].stdout
    assert f"registered {DEVICE} with the receiver: {devs}/{DEVICE}.pub" in runs[2].stdout
    fingerprint = cert_of(Path(gw) / f"{DEVICE}.crt").fingerprint(hashes.SHA256())
    assert f"sha256 {fingerprint.hex(':').upper()}" in runs[2].stdout
    san = extension(cert_of(Path(srv) / "receiver.crt"), x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["central.example"]
    output = "".join(r.stdout + r.stderr for r in runs)
    for key_path in (Path(ca) / "ca.key", Path(srv) / "receiver.key", device_key):
        assert str(key_path) in output
        leaked = [s for s in secrets_of(key_path) if s in output]
        assert leaked == [], f"private key material of {key_path} printed"


def test_the_command_refuses_with_one_line_and_the_documented_status(tmp_path):
    ca, gw = str(tmp_path / "ca"), str(tmp_path / "gw")
    assert fleetgw("ca", "--dir", ca).returncode == 0
    again = fleetgw("ca", "--dir", ca)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr == (f"fleetgw provision ca: {ca}/ca.key exists; refusing to overwrite "
                            "a CA (to replace it: --force; every certificate it issued must "
                            "be issued again)\n")
    bad_id = fleetgw("device", "--id", "../evil", "--ca", ca, "--out", gw)
    assert bad_id.returncode == 2 and bad_id.stderr.count("\n") == 1
    assert bad_id.stderr.startswith("fleetgw provision device: device id '../evil' must be")
    no_ca = fleetgw("server", "--ca", str(tmp_path / "nowhere"), "--out", gw)
    assert no_ca.returncode == 2 and "no CA in" in no_ca.stderr
    assert fleetgw("device", "--id", DEVICE, "--ca", ca, "--out", gw).returncode == 0
    twice = fleetgw("device", "--id", DEVICE, "--ca", ca, "--out", gw)
    assert twice.returncode == 1 and "--replace" in twice.stderr
    assert fleetgw("device", "--id", DEVICE, "--ca", ca, "--out", gw,
                   "--replace").returncode == 0
    Path(ca, "ca.key").chmod(0o640)
    exposed = fleetgw("device", "--id", "veh-002", "--ca", ca, "--out", gw)
    assert exposed.returncode == 1 and exposed.stderr.count("\n") == 1
    assert exposed.stderr.rstrip().endswith(f"Hint: chmod 600 {ca}/ca.key")
    assert not Path(gw, "veh-002.key").exists()
