"""The central receiver's configuration: frozen, documented classes, strict TOML loading.

Where this sits: beside the central side, read once by ``fleetgw central serve`` and
``fleetgw central query`` (see ``central/example.toml``). Validation does no I/O; relative paths
are resolved against the config file's directory when loading (`load_central_config`);
`password_env` is read when the backend is built (`backend_password`), never at load and never
logged. Errors read like the gateway's: ``central.toml: receiver.port must be ...``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import attrs

from actors.uplink.envelope import DEFAULT_MAX_RAW_BYTES
from config.loader import ConfigError, read_toml, structure_strict
from config.schema import FieldProblem

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18443
#: Compressed body limit (Content-Length), bytes.
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_DEVICES_DIR = "devices"
DEFAULT_CHDB_PATH = "central.chdb"
#: A stored row whose event time is this far behind its ingest time counts as late, seconds.
DEFAULT_LATE_AFTER_S = 300.0
BACKEND_KINDS = ("chdb", "http")
PATH_FIELDS = {"receiver": ("tls_cert", "tls_key", "tls_client_ca", "devices_dir"),
               "backend": ("path",), "models": ("directory",)}


def _positive(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or value <= 0:
        raise FieldProblem(attr.name, f"must be > 0 (got {value!r})")


def _seconds(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise FieldProblem(attr.name, f"must be a finite number of seconds > 0 (got {value!r})")


def _port(inst: Any, attr: attrs.Attribute, value: int) -> None:
    if value != 0 and not 1024 <= value <= 65535:
        raise FieldProblem(attr.name, f"must be a TCP port in 1024..65535, or 0 for any free "
                                      f"port (got {value!r})")


@attrs.frozen
class ReceiverSettings:
    """[receiver]: the HTTP(S) endpoint gateways post batches to."""

    #: Address to bind. Loopback by default (I9); anything else is logged as a warning.
    host: str = DEFAULT_HOST
    #: TCP port; 0 picks a free one (printed at start; tests).
    port: int = attrs.field(default=DEFAULT_PORT, validator=_port)
    #: Largest request body (compressed batch) accepted, bytes; larger: 413 unread.
    max_body_bytes: int = attrs.field(default=DEFAULT_MAX_BODY_BYTES, validator=_positive)
    #: Largest decompressed body accepted, bytes; larger: 413.
    max_raw_bytes: int = attrs.field(default=DEFAULT_MAX_RAW_BYTES, validator=_positive)
    #: PEM server certificate (chain) and its key; empty: plain HTTP.
    tls_cert: str = ""
    tls_key: str = ""
    #: PEM CA bundle that client certificates must chain to. With TLS it is required: every
    #: client must present a certificate (mTLS).
    tls_client_ca: str = ""
    #: Directory of ``<device_id>.pub`` public keys (see central.devices).
    devices_dir: str = DEFAULT_DEVICES_DIR
    #: Seconds: a stored row whose event time is more than this behind the time the receiver
    #: got it counts in ``fleetgw_receiver_late_rows_total`` (``GET /metrics``).
    late_after_s: float = attrs.field(default=DEFAULT_LATE_AFTER_S, validator=_seconds)

    def __attrs_post_init__(self) -> None:
        tls = {"tls_cert": self.tls_cert, "tls_key": self.tls_key,
               "tls_client_ca": self.tls_client_ca}
        if any(tls.values()) and not all(tls.values()):
            missing = ", ".join(k for k, v in tls.items() if not v)
            raise FieldProblem(missing, "must be set too: TLS needs tls_cert, tls_key and "
                                        "tls_client_ca (client certificates are required)")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


@attrs.frozen
class BackendSettings:
    """[backend]: where batches are stored."""

    #: ``chdb``: embedded ClickHouse in the receiver's process at ``path`` (one process per
    #: path); ``http``: a ClickHouse server or cluster at ``url``.
    kind: str = "chdb"
    #: chdb data directory.
    path: str = DEFAULT_CHDB_PATH
    #: http: the server's HTTP(S) interface, e.g. ``http://127.0.0.1:8123/``.
    url: str = ""
    #: http: user, its database (empty: the user's default) and request timeout.
    user: str = "default"
    database: str = ""
    timeout_s: float = attrs.field(default=30.0, validator=_positive)
    #: http: the password, or (better) the NAME of an environment variable holding it; at
    #: most one of the two. Empty: no password.
    password: str = attrs.field(default="", repr=False)
    password_env: str = ""

    def __attrs_post_init__(self) -> None:
        if self.kind not in BACKEND_KINDS:
            raise FieldProblem("kind", f"must be one of {', '.join(BACKEND_KINDS)} "
                                       f"(got {self.kind!r})")
        if self.kind == "http" and not self.url.startswith(("http://", "https://")):
            raise FieldProblem("url", f"must be an http:// or https:// URL for kind = \"http\" "
                                      f"(got {self.url!r})")
        if self.kind == "chdb" and not self.path:
            raise FieldProblem("path", "must name the chdb data directory for kind = \"chdb\"")
        if self.password and self.password_env:
            raise FieldProblem("password", "and password_env are exclusive: set one")


@attrs.frozen
class ModelsSettings:
    """[models]: signed model versions offered to gateways (see central.model_store)."""

    #: Directory of ``<version>/`` model directories, served at ``GET /v1/models``; empty:
    #: this receiver serves no models (404).
    directory: str = ""


@attrs.frozen
class CentralConfig:
    """A central receiver config file."""

    receiver: ReceiverSettings = ReceiverSettings()
    backend: BackendSettings = BackendSettings()
    models: ModelsSettings = ModelsSettings()


def backend_password(settings: BackendSettings) -> str:
    """The password to use; ConfigError-free: a missing variable is a ValueError naming it."""
    if not settings.password_env:
        return settings.password
    try:
        return os.environ[settings.password_env]
    except KeyError:
        raise ValueError(f"backend.password_env names {settings.password_env}, which is not "
                         "set in the environment") from None


def parse_central_config(data: dict[str, Any], path: str = "<config>") -> CentralConfig:
    """Validate a decoded TOML document. Raises ConfigError listing every problem."""
    return structure_strict(data, CentralConfig, path)


def load_central_config(path: str | os.PathLike[str]) -> CentralConfig:
    """Read and validate a central TOML config; relative paths in it are taken from the
    file's directory. Raises ConfigError (file, key, problem)."""
    path = str(path)
    config = parse_central_config(read_toml(path, ConfigError), path)
    base = Path(path).resolve().parent

    def resolved(section: Any, names: tuple[str, ...]) -> Any:
        return attrs.evolve(section, **{n: str(base / getattr(section, n)) for n in names
                                        if getattr(section, n)})

    return attrs.evolve(config, **{section: resolved(getattr(config, section), names)
                                   for section, names in PATH_FIELDS.items()})
