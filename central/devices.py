"""The device registry: which devices may send batches, and the key each signs with.

Where this sits on the data path: central, the receiver's first check. A device is known when
``<devices_dir>/<device_id>.pub`` holds its Ed25519 public key as 64 hex characters on one line
(the form of ``models/trusted_keys``). Keys are read on every lookup, so a device registered
while the receiver runs is accepted at once; provisioning calls `DeviceRegistry.register`,
which writes atomically (a reader sees the old file or the new one, never half of one).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nacl.encoding
import nacl.exceptions
import nacl.signing

from actors.durable import write_atomic

#: Device ids that can name a file: `messages.readings.IDENT_RE` without "/".
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")
KEY_SUFFIX = ".pub"


class DeviceKeyError(ValueError):
    """A device id or public key is unusable; the message says which and why."""


def parse_public_key(text: str, where: str) -> nacl.signing.VerifyKey:
    """A hex Ed25519 public key; DeviceKeyError naming ``where`` otherwise."""
    try:
        return nacl.signing.VerifyKey(text.strip().encode(), encoder=nacl.encoding.HexEncoder)
    except (ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
        raise DeviceKeyError(f"{where}: not a hex Ed25519 public key (64 hex characters)"
                             ) from exc


class DeviceRegistry:
    """Public keys of known devices, one ``<device_id>.pub`` file each in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"DeviceRegistry({str(self.directory)!r})"

    def _path(self, device_id: str) -> Path:
        if not DEVICE_ID_RE.match(device_id):
            raise DeviceKeyError(f"device id {device_id!r} must be 1-128 characters from "
                                 "[A-Za-z0-9_.:-] starting with a letter or digit")
        return self.directory / f"{device_id}{KEY_SUFFIX}"

    def key(self, device_id: str) -> nacl.signing.VerifyKey | None:
        """The device's public key; None when it is not registered (or its id could not
        name one). Raises DeviceKeyError when its key file is malformed or unreadable."""
        try:
            path = self._path(device_id)
        except DeviceKeyError:
            return None
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise DeviceKeyError(f"{path}: cannot read the device key ({exc})") from None
        return parse_public_key(text, str(path))

    def register(self, device_id: str, public_hex: str, *, replace: bool = False) -> Path:
        """Register (or, with ``replace``, re-key) a device; return its key file. The same
        key again is a no-op. Raises DeviceKeyError for a bad id or key, or — unless
        ``replace`` — a device registered with another key or a malformed key file."""
        path = self._path(device_id)
        key = parse_public_key(public_hex, f"key for device {device_id}")
        if not replace:
            current = self.key(device_id)  # a malformed file raises: replace it knowingly
            if current == key:
                return path
            if current is not None:
                raise DeviceKeyError(f"device {device_id} is registered with another key "
                                     f"({path}); re-key it with replace=True")
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(path, key.encode(nacl.encoding.HexEncoder) + b"\n")
        return path
