"""Provisioning: the fleet CA, the receiver's TLS certificate, and each device's key.

Where this sits: beside the data path, run by operators (`fleetgw provision`, in
tools/provision_cmd.py) before a gateway first syncs. It makes the two credentials step 6
(the uplink) needs — a device's Ed25519 key, which signs its batches, and an X.509 client
certificate for the mTLS connection to the central receiver — and registers the device's
public key with the receiver (`central.devices.DeviceRegistry`). The uplink reads a device
key back with `actors.uplink.keys.load_signing_key` (also used here to read the CA's key).

Files (PEM; private keys PKCS8, unencrypted, mode 0600, created with O_CREAT|O_EXCL so no
other user can read them even briefly; certificates 0644):

    CA_DIR/ca.key            the fleet CA's key: keep it offline, it signs every certificate
    CA_DIR/ca.crt            the CA certificate (self-signed; keyCertSign, cRLSign)
    OUT/receiver.key, .crt   the receiver's TLS key and certificate (serverAuth, SAN = hosts)
    OUT/<device_id>.key      the device's key: signs batches AND is its TLS client key
    OUT/<device_id>.crt      its client certificate (CN = device id, clientAuth)
    OUT/ca.crt               a copy of the CA certificate: the receiver verifies clients
                             with it (``tls_client_ca``), a gateway verifies the receiver
    DEVICES_DIR/<id>.pub     the device's public key, hex (the receiver's registry)

Key types, measured rather than assumed (Python 3.11 ssl on OpenSSL 3.0.19 as the receiver,
pycurl 7.49 on libcurl 8.23 / OpenSSL 3.6.5 as the uplink): TLS 1.3 and TLS 1.2 handshakes
complete with an Ed25519 CA, Ed25519 server certificate and Ed25519 client certificate, so
every key here is Ed25519 — one algorithm, and a device needs a single key file.
tests/provision/test_mtls.py keeps that proved on every run. A TLS stack without Ed25519
(OpenSSL before 1.1.1, some proxies and HSMs) would need ECDSA P-256 TLS keys instead.
Using the device key for both TLS and batch signatures is safe across the two uses: a batch
signature covers canonical JSON, a TLS signature a handshake transcript, and neither parses
as the other.

Nothing here prints or logs; errors name paths, never key material.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path

import attrs
import nacl.encoding
import nacl.exceptions
import nacl.signing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from actors.durable import fsync_dir, write_atomic
from actors.uplink.keys import load_private_key
from central.devices import DEVICE_ID_RE, DeviceKeyError, DeviceRegistry

CA_KEY, CA_CERT = "ca.key", "ca.crt"
RECEIVER_KEY, RECEIVER_CERT = "receiver.key", "receiver.crt"
KEY_SUFFIX, CERT_SUFFIX = ".key", ".crt"
DEFAULT_CA_NAME = "fleetgw fleet CA"
DEFAULT_CA_DAYS = 3650
#: Leaf certificates: 825 days, the longest TLS clients commonly accept.
DEFAULT_LEAF_DAYS = 825
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
#: Certificates start this long before "now", for clocks behind the issuer's: a Raspberry Pi has
#: no RTC and boots on the time it saved at shutdown until NTP or GPS steps it (a drill with
#: the clock 90 min behind found 5 minutes too short: "certificate is not yet valid").
BACKDATE = dt.timedelta(days=2)
PRIVATE_MODE, PUBLIC_MODE = 0o600, 0o644
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME_RE = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*$")


class ProvisionError(ValueError):
    """A refused provisioning step; the message says what, which path, why, and the fix.
    ``bad_input``: the request itself is wrong (a bad id, host or days, no CA where it was
    said to be) rather than refused by what exists (a key that would be overwritten)."""

    def __init__(self, message: str, *, bad_input: bool = False) -> None:
        super().__init__(message)
        self.bad_input = bad_input


@attrs.frozen
class Issued:
    """What one `create_*` call wrote. ``fingerprint``: the certificate's SHA-256, hex pairs
    with colons (as ``openssl x509 -fingerprint -sha256`` prints it)."""

    key: Path
    cert: Path
    common_name: str
    fingerprint: str
    not_after: dt.datetime
    #: The CA certificate copied beside the leaf (None for the CA itself).
    ca_copy: Path | None = None
    #: Devices: the Ed25519 public key, 64 hex characters.
    public_hex: str = ""
    #: Devices: the registry file written (None: no ``devices_dir`` given).
    registered: Path | None = None


# ---- keys -----------------------------------------------------------------------------------
def public_hex(signing_key: nacl.signing.SigningKey) -> str:
    """The signing key's public half as 64 hex characters (the registry's form)."""
    return signing_key.verify_key.encode(nacl.encoding.HexEncoder).decode()


def _pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Write a private key, 0600 from its first byte (O_CREAT|O_EXCL, so never through a
    file or link that was there). ``replace``: a temporary file renamed over ``path``."""
    target = path.with_name(f".{path.name}.new") if replace else path
    if replace:
        target.unlink(missing_ok=True)  # left by a run that died; ours alone (0600, O_EXCL)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# ---- certificates ---------------------------------------------------------------------------
def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not sign_certs, content_commitment=False,
                         key_encipherment=False, data_encipherment=False,
                         key_agreement=False, key_cert_sign=sign_certs, crl_sign=sign_certs,
                         encipher_only=False, decipher_only=False)


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise ProvisionError(f"days must be a whole number > 0 (got {days!r})",
                             bad_input=True)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ed25519.Ed25519PrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise ProvisionError(f"no CA in {ca_dir} ({CA_CERT} and {CA_KEY} expected); create "
                             f"one with `fleetgw provision ca --dir {ca_dir}`", bad_input=True)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise ProvisionError(f"{cert_path}: not a PEM certificate", bad_input=True) from None
    key = load_private_key(key_path)
    if cert.public_key() != key.public_key():
        raise ProvisionError(f"{key_path} is not the key of {cert_path}: the CA directory "
                             "mixes two CAs", bad_input=True)
    return cert, key


def _issue(subject: str, public_key: ed25519.Ed25519PublicKey, ca_cert: x509.Certificate,
           ca_key: ed25519.Ed25519PrivateKey, days: int,
           extensions: Sequence[x509.ExtensionType]) -> x509.Certificate:
    """A leaf certificate signed by the CA, valid ``days`` but never beyond the CA."""
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(ca_cert.subject).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - BACKDATE).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(sign_certs=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, None)  # Ed25519: the algorithm fixes the hash


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_ca_copy(ca_cert: x509.Certificate, out_dir: Path, replace: bool) -> Path:
    """Where the CA certificate goes beside a leaf; refused when another CA's is there."""
    path = out_dir / CA_CERT
    if path.is_file() and not replace:
        try:
            same = x509.load_pem_x509_certificate(path.read_bytes()) == ca_cert
        except ValueError:
            same = False
        if not same:
            raise ProvisionError(f"{path} holds another CA's certificate; refusing to mix two "
                                 "CAs in one directory (use another --out, or overwrite it with "
                                 "--force / --replace)")
    return path


def _new_files(out_dir: Path, key_name: str, cert_name: str,
                replace: bool, what: str, flag: str) -> tuple[Path, Path]:
    key_path, cert_path = out_dir / key_name, out_dir / cert_name
    if not replace:
        for path in (key_path, cert_path):
            if os.path.lexists(path):
                raise ProvisionError(f"{path} exists; refusing to overwrite {what} "
                                     f"(to replace it: {flag})")
    return key_path, cert_path


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ProvisionError(f"{directory}: cannot create the directory ({exc.strerror})",
                             bad_input=True) from None


# ---- the three steps --------------------------------------------------------------------------
def create_ca(directory: str | os.PathLike[str], name: str = DEFAULT_CA_NAME,
              days: int = DEFAULT_CA_DAYS, *, force: bool = False) -> Issued:
    """A new fleet CA in ``directory``: ``ca.key`` (0600) and a self-signed ``ca.crt``.
    Refuses to overwrite an existing CA unless ``force`` (everything the old CA issued then
    has to be issued again)."""
    _check_days(days)
    if not name.strip():
        raise ProvisionError("the CA name must not be empty", bad_input=True)
    directory = Path(directory)
    key_path, cert_path = _new_files(directory, CA_KEY, CA_CERT, force, "a CA",
                                      "--force; every certificate it issued must be issued "
                                      "again")
    _mkdir(directory)
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(sign_certs=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, None))
    _write_private(key_path, _pem(key), replace=force)
    write_atomic(cert_path, _cert_pem(cert), PUBLIC_MODE)
    return Issued(key_path, cert_path, name, _fingerprint(cert), cert.not_valid_after_utc)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # unique, in order
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not DNS_NAME_RE.match(host):
                raise ProvisionError(f"host {host!r} is neither an IP address nor a DNS name",
                                     bad_input=True) from None
            names.append(x509.DNSName(host.lower()))
    if not names:
        raise ProvisionError("give at least one host the receiver is reached at",
                             bad_input=True)
    return x509.SubjectAlternativeName(names)


def create_server(ca_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                  hosts: Sequence[str] = DEFAULT_HOSTS, days: int = DEFAULT_LEAF_DAYS, *,
                  force: bool = False) -> Issued:
    """The receiver's TLS key and certificate (serverAuth; SAN: IP addresses for IP literals,
    DNS names otherwise; CN: the first host) in ``out_dir``, with a copy of the CA
    certificate. Refuses to overwrite them unless ``force``."""
    _check_days(days)
    san = _san(hosts)
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    out_dir = Path(out_dir)
    key_path, cert_path = _new_files(out_dir, RECEIVER_KEY, RECEIVER_CERT, force,
                                      "the receiver's key", "--force")
    ca_copy = _check_ca_copy(ca_cert, out_dir, force)
    _mkdir(out_dir)
    key = ed25519.Ed25519PrivateKey.generate()
    cert = _issue(hosts[0], key.public_key(), ca_cert, ca_key, days,
                  [san, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])])
    _write_private(key_path, _pem(key), replace=force)
    write_atomic(cert_path, _cert_pem(cert), PUBLIC_MODE)
    write_atomic(ca_copy, _cert_pem(ca_cert), PUBLIC_MODE)
    return Issued(key_path, cert_path, hosts[0], _fingerprint(cert), cert.not_valid_after_utc,
                  ca_copy)


def create_device(ca_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                  device_id: str, devices_dir: str | os.PathLike[str] | None = None,
                  days: int = DEFAULT_LEAF_DAYS, replace: bool = False) -> Issued:
    """A device's Ed25519 key (``<out_dir>/<device_id>.key``: batch signing and TLS client
    key), its client certificate (CN = device id, clientAuth) and a copy of the CA
    certificate; with ``devices_dir``, its public key registered there for the receiver.

    Without ``replace`` nothing is written when the device already has a key file in
    ``out_dir``, or is registered in ``devices_dir`` (its key would change). With it, the
    device is re-keyed: the old key stops working at the receiver once registered."""
    _check_days(days)
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise ProvisionError(f"device id {device_id!r} must be 1-128 characters from "
                             "[A-Za-z0-9_.:-] starting with a letter or digit",
                             bad_input=True)
    ca_cert, ca_key = _load_ca(Path(ca_dir))
    out_dir = Path(out_dir)
    key_path, cert_path = _new_files(out_dir, f"{device_id}{KEY_SUFFIX}",
                                      f"{device_id}{CERT_SUFFIX}", replace,
                                      "a device key", "--replace, which re-keys the device")
    ca_copy = _check_ca_copy(ca_cert, out_dir, replace)
    registry = DeviceRegistry(devices_dir) if devices_dir is not None else None
    if registry is not None and not replace:
        try:
            known = registry.key(device_id)
        except DeviceKeyError as exc:
            raise ProvisionError(f"{exc}; re-key the device with --replace") from None
        if known is not None:
            raise ProvisionError(f"device {device_id} is already registered in "
                                 f"{registry.directory} with another key; re-key it with "
                                 "--replace")
    # Every check passed: write key, certificate, CA copy, then register.
    _mkdir(out_dir)
    key = ed25519.Ed25519PrivateKey.generate()
    cert = _issue(device_id, key.public_key(), ca_cert, ca_key, days,
                  [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])])
    _write_private(key_path, _pem(key), replace=replace)
    write_atomic(cert_path, _cert_pem(cert), PUBLIC_MODE)
    write_atomic(ca_copy, _cert_pem(ca_cert), PUBLIC_MODE)
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw).hex()
    registered = None
    if registry is not None:
        try:
            registered = registry.register(device_id, public, replace=replace)
        except (DeviceKeyError, OSError) as exc:
            raise ProvisionError(f"wrote {key_path} but could not register it: {exc}; run "
                                 "again with --replace once fixed") from None
    return Issued(key_path, cert_path, device_id, _fingerprint(cert),
                  cert.not_valid_after_utc, ca_copy, public, registered)
