"""A model's manifest: what its files are, what it takes and gives, and who vouches for it.

Where this sits: between training (tools/training writes and signs it) and the model runner
(which loads nothing a manifest does not vouch for). A model directory holds

    model.xml, model.bin   the OpenVINO IR (f32 weights)
    manifest.json          canonical JSON (sorted keys, 2-space indent, trailing newline)
    manifest.sig           {"key_id": ..., "signature": ...}: Ed25519 over manifest.json's bytes

The signature is kept beside the manifest (not inside it), so the manifest and the IR are
byte-identical whoever trains them; only the signature depends on the key.

Manifest keys (``format`` = ``fleetgw.model/1``): ``version``, ``name``, ``files`` (name ->
sha256 hex of every other file), ``input`` (name, shape, dtype, feature_set, names, groups,
window_ns), ``outputs``, ``labels`` (the anomaly type of each ``group_error`` column),
``threshold`` (score at and above which a window is an anomaly), ``compile`` (OpenVINO
properties), ``training`` (seeds, data sha256, sizes, architecture), ``libraries`` (versions),
``metrics`` (precision/recall per anomaly type, rules alone beside the model), ``self_test``
(input vectors, expected outputs and tolerances).

Trust: a key is trusted when its public key (64 hex characters, one line) is a ``*.pub`` file
in the trusted-keys directory (the repository's ``models/trusted_keys`` by default). Private
keys never enter the repository: `generate_key` writes one with mode 0600 wherever asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nacl.encoding
import nacl.exceptions
import nacl.signing

MANIFEST_FORMAT = "fleetgw.model/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
REQUIRED_KEYS = ("format", "version", "name", "files", "input", "outputs", "labels",
                 "threshold", "compile", "training", "libraries", "metrics", "self_test")
MODEL_XML, MODEL_BIN = "model.xml", "model.bin"
#: A model version is a directory name: no separators, no leading dot.
VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")
#: The repository, its shipped models and trusted public keys.
REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_MODELS = REPO_ROOT / "models"
DEFAULT_TRUSTED_KEYS = REPO_MODELS / "trusted_keys"


class ManifestError(ValueError):
    """A model directory that must not be loaded; the message says which file and why."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """The manifest's exact bytes (deterministic: sorted keys, no NaN)."""
    return (json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def key_id(verify_key: nacl.signing.VerifyKey) -> str:
    """A short, stable name of a public key: the first 16 hex of its sha256."""
    return hashlib.sha256(bytes(verify_key)).hexdigest()[:16]


# ---- keys -------------------------------------------------------------------------------
def generate_key(path: str | os.PathLike[str]) -> str:
    """Write a new signing key (hex seed, mode 0600) to ``path`` and its public key to
    ``path.pub``; return the public key's hex."""
    key = nacl.signing.SigningKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.encode(nacl.encoding.HexEncoder).decode() + "\n")
    public = key.verify_key.encode(nacl.encoding.HexEncoder).decode()
    Path(f"{os.fspath(path)}.pub").write_text(public + "\n")
    return public


def load_signing_key(path: str | os.PathLike[str]) -> nacl.signing.SigningKey:
    try:
        text = Path(path).read_text().strip()
        return nacl.signing.SigningKey(text.encode(), encoder=nacl.encoding.HexEncoder)
    except OSError as exc:
        raise ManifestError(f"signing key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
        raise ManifestError(f"signing key {path}: not a hex Ed25519 seed (64 hex characters; "
                            "create one with `fleetgw model keygen PATH`)") from exc


def trusted_keys(directory: str | os.PathLike[str] | None = None
                 ) -> dict[str, nacl.signing.VerifyKey]:
    """key_id -> public key, for every ``*.pub`` file in ``directory``."""
    directory = Path(DEFAULT_TRUSTED_KEYS if directory is None else directory)
    keys = {}
    for pub in sorted(directory.glob("*.pub")):
        try:
            vk = nacl.signing.VerifyKey(pub.read_text().strip().encode(),
                                        encoder=nacl.encoding.HexEncoder)
        except (ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
            raise ManifestError(f"trusted key {pub}: not a hex Ed25519 public key") from exc
        keys[key_id(vk)] = vk
    return keys


# ---- writing ----------------------------------------------------------------------------
def write_signed(model_dir: str | os.PathLike[str], manifest: Mapping[str, Any],
                 signing_key: nacl.signing.SigningKey) -> None:
    """Write ``manifest`` (with ``files`` filled in from the directory) and its signature."""
    model_dir = Path(model_dir)
    data = dict(manifest)
    data["format"] = MANIFEST_FORMAT
    data["files"] = {p.name: sha256_file(p) for p in sorted(model_dir.iterdir())
                     if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ManifestError(f"manifest for {model_dir} lacks {missing}")
    body = canonical_json(data)
    (model_dir / MANIFEST).write_bytes(body)
    signature = signing_key.sign(body).signature.hex()
    (model_dir / SIGNATURE).write_bytes(canonical_json(
        {"key_id": key_id(signing_key.verify_key), "signature": signature}))


# ---- verifying --------------------------------------------------------------------------
def verify_model_dir(model_dir: str | os.PathLike[str],
                     keys: Mapping[str, nacl.signing.VerifyKey]) -> dict[str, Any]:
    """The manifest of ``model_dir`` once its signature is by a trusted key and every file
    matches its sha256; raises ManifestError naming the file and the problem otherwise."""
    model_dir = Path(model_dir)
    try:
        body = (model_dir / MANIFEST).read_bytes()
        sig = json.loads((model_dir / SIGNATURE).read_bytes())
    except FileNotFoundError as exc:
        raise ManifestError(f"{model_dir}: {Path(exc.filename).name} is missing "
                            "(not a model directory?)") from exc
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{model_dir / SIGNATURE}: unreadable ({exc})") from exc
    if not isinstance(sig, dict) or "key_id" not in sig or "signature" not in sig:
        raise ManifestError(f"{model_dir / SIGNATURE}: needs key_id and signature")
    key = keys.get(str(sig["key_id"]))
    if key is None:
        raise ManifestError(f"{model_dir}: signed by key {sig['key_id']}, which is not trusted "
                            "(add its .pub to the trusted keys directory)")
    try:
        key.verify(body, bytes.fromhex(str(sig["signature"])))
    except (ValueError, nacl.exceptions.BadSignatureError) as exc:
        raise ManifestError(f"{model_dir}: bad signature on {MANIFEST} (altered after "
                            "signing, or signed by another key)") from exc
    manifest = json.loads(body)
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if manifest.get("format") != MANIFEST_FORMAT or missing:
        raise ManifestError(f"{model_dir / MANIFEST}: format {manifest.get('format')!r}, "
                            f"missing {missing} (expected {MANIFEST_FORMAT})")
    for name, digest in manifest["files"].items():
        path = model_dir / name
        if Path(name).name != name:
            raise ManifestError(f"{model_dir / MANIFEST}: file name {name!r} is not plain")
        if not path.is_file():
            raise ManifestError(f"{path}: missing (listed in the manifest)")
        actual = sha256_file(path)
        if actual != digest:
            raise ManifestError(f"{path}: sha256 {actual[:16]}… does not match the manifest's "
                                f"{digest[:16]}… (corrupted or replaced)")
    return manifest


def model_sha256(manifest: Mapping[str, Any]) -> str:
    """The model's identity in inference records: sha256 of its canonical manifest (which
    names every file's sha256)."""
    return hashlib.sha256(canonical_json(manifest)).hexdigest()
