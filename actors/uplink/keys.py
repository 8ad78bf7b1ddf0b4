"""Device signing keys: which Ed25519 key signs a device's batches.

Where this sits on the data path: step 6, when a planned batch is sealed. Each device signs
with its own key, ``<keys_dir>/<device_id>.key`` as written by ``fleetgw provision device``
(PEM PKCS8 Ed25519, or a 64-hex-character seed), mode 0600; the receiver checks the signature
against the public key registered for that device. A gateway that hosts several devices holds
one key file per device.

Keys are loaded once per device and kept; a device without a usable key is not an error of the
whole uplink: its batches wait (the journal keeps them) with a reason that names the file and
the command that fixes it, and the key is looked for again after `RETRY_S`. Key material never
appears in a message, a repr or a log line — only paths.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

KEY_SUFFIX = ".key"
#: Seconds before a missing or unusable key file is looked for again.
RETRY_S = 30.0
HEX_SEED_CHARS = 64


class KeyFileError(ValueError):
    """A private key file cannot be used: missing, unreadable, not Ed25519, or readable by
    group or others. The message names the path and the fix, never the key."""


def _read_private(path: Path) -> bytes:
    """A private key file's bytes, refused (before reading) when group or others may access
    it."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path}: a private key must be private, but group or others may "
                           f"access it (mode {mode:04o}). Hint: chmod 600 {path}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file ({exc.strerror})") from None


def load_private_key(path: str | os.PathLike[str]) -> ed25519.Ed25519PrivateKey:
    """The Ed25519 key in ``path``: PEM PKCS8, or (legacy) a 64-hex-character seed."""
    path = Path(path)
    data = _read_private(path)
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):  # their messages are safe, but say it our way
            raise KeyFileError(f"{path}: not a readable unencrypted PEM private key") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"{path}: not an Ed25519 key (found "
                               f"{type(key).__name__.lstrip('_')})")
        return key
    if len(text) == HEX_SEED_CHARS:
        try:
            return ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text.decode()))
        except (ValueError, UnicodeDecodeError):
            pass
    raise KeyFileError(f"{path}: not an Ed25519 key (PEM PKCS8, or a legacy seed of 64 hex "
                       "characters); create one with `fleetgw provision device`")


def load_signing_key(path: str | os.PathLike[str]) -> nacl.signing.SigningKey:
    """The device key in ``path`` as a pynacl signing key (for `actors.uplink.envelope.seal`).
    Raises KeyFileError naming the path: missing, unreadable, not Ed25519, or not mode 0600."""
    key = load_private_key(path)
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    return nacl.signing.SigningKey(seed)


class KeyRing:
    """Signing keys by device id, from ``directory`` (or one ``default`` key for all)."""

    def __init__(self, directory: str | os.PathLike[str] | None,
                 default: nacl.signing.SigningKey | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.default = default
        self.clock = clock
        self._keys: dict[str, nacl.signing.SigningKey] = {}
        self._missing: dict[str, tuple[float, str]] = {}

    @classmethod
    def single(cls, key: nacl.signing.SigningKey) -> KeyRing:
        """One key signs for every device (tests; direct mode, where nobody verifies)."""
        return cls(None, key)

    def __repr__(self) -> str:
        return f"KeyRing({str(self.directory) if self.directory else None!r})"

    def path(self, device_id: str) -> Path | None:
        return self.directory / f"{device_id}{KEY_SUFFIX}" if self.directory else None

    def key(self, device_id: str) -> nacl.signing.SigningKey | str:
        """The device's key, or why there is none (the batch waits)."""
        if device_id in self._keys:
            return self._keys[device_id]
        path = self.path(device_id)
        if path is None or "/" in device_id:
            if self.default is not None:
                return self.default
            return f"no signing key for device {device_id}"
        retry_at, reason = self._missing.get(device_id, (0.0, ""))
        if self.clock() < retry_at:
            return reason
        try:
            self._keys[device_id] = load_signing_key(path)
        except KeyFileError as exc:
            if self.default is not None and not path.exists():
                return self.default
            reason = (f"device {device_id} has no usable signing key: {exc}"
                      + ("" if path.exists() else
                         f" (run: fleetgw provision device --id {device_id})"))
            self._missing[device_id] = (self.clock() + RETRY_S, reason)
            return reason
        self._missing.pop(device_id, None)
        return self._keys[device_id]

    def forget(self, device_id: str) -> None:
        """Read the device's key file again at the next use (it may have been re-keyed)."""
        self._keys.pop(device_id, None)
        self._missing.pop(device_id, None)
