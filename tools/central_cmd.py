"""`fleetgw central serve|query --config FILE`: run the ingest receiver, or query its store.

Where this sits: beside the central side of the data path. ``serve`` opens the configured
backend (embedded chdb owns its path for as long as it runs), creates missing tables, and
serves `central.receiver` (and the model store of ``[models] directory``, if set) until
SIGTERM or Ctrl-C; its first stdout line says where it listens. ``query`` runs one SQL
statement against the same backend and prints the result — with chdb it must open the path
itself, so it cannot run while a receiver holds it (it says so). Exit status: 0 ok, 1 failed
(storage, network), 2 bad config or usage.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from types import FrameType

from central.backend import (
    DEFAULT_QUERY_FORMAT,
    Backend,
    BackendError,
    ChdbBackend,
    HttpClickHouseBackend,
)
from central.config import BackendSettings, CentralConfig, backend_password, load_central_config
from config.loader import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _LogfmtFormatter(logging.Formatter):
    """``ts=... level=... logger=...`` then the message, itself logfmt (central.receiver)."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        ts = f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}Z"
        line = (f"ts={ts} level={record.levelname.lower()} logger={record.name} "
                f"{record.getMessage()}")
        if record.exc_info:
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line


def _setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_LogfmtFormatter())
    logger = logging.getLogger("fleetgw.central")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def open_backend(settings: BackendSettings) -> Backend:
    """The configured backend. Raises BackendError (BackendLocked for a busy chdb path) or
    ValueError (a password variable that is not set)."""
    if settings.kind == "chdb":
        return ChdbBackend(settings.path)
    return HttpClickHouseBackend(settings.url, settings.user, backend_password(settings),
                                 settings.database, settings.timeout_s)


def _load(config_path: str, verb: str) -> tuple[CentralConfig, Backend] | int:
    try:
        config = load_central_config(config_path)
    except ConfigError as exc:
        print(f"fleetgw central {verb}: {len(exc.problems)} problem(s) in the config",
              file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    try:
        return config, open_backend(config.backend)
    except ValueError as exc:
        print(f"fleetgw central {verb}: {config_path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BackendError as exc:
        print(f"fleetgw central {verb}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # leaves serve_forever in the main thread


def serve_command(config_path: str) -> int:
    """Serve until SIGTERM/SIGINT; 0 after an orderly stop."""
    from actors.uplink.envelope import PATH
    from central.devices import DeviceRegistry
    from central.metrics import ReceiverMetrics
    from central.model_store import ModelStore
    from central.receiver import LOG, Receiver, ReceiverServer, logfmt

    _setup_logging()
    loaded = _load(config_path, "serve")
    if isinstance(loaded, int):
        return loaded
    config, backend = loaded
    settings = config.receiver
    try:
        backend.ensure_schema()
        receiver = Receiver(backend, DeviceRegistry(settings.devices_dir),
                            settings.max_raw_bytes, ReceiverMetrics(settings.late_after_s))
        models = ModelStore(config.models.directory) if config.models.directory else None
        server = ReceiverServer(settings, receiver, models)
    except BackendError as exc:
        print(f"fleetgw central serve: cannot create the tables: {exc}", file=sys.stderr)
        backend.close()
        return EXIT_FAILED
    except ValueError as exc:  # TLS files
        print(f"fleetgw central serve: {config_path}: {exc}", file=sys.stderr)
        backend.close()
        return EXIT_USAGE
    except OSError as exc:
        print(f"fleetgw central serve: cannot listen on {settings.host}:{settings.port}: "
              f"{exc.strerror or exc} (receiver.host/port in {config_path})", file=sys.stderr)
        backend.close()
        return EXIT_FAILED
    if not os.path.isdir(settings.devices_dir):
        LOG.warning("%s", logfmt({"event": "no-devices", "devices_dir": settings.devices_dir,
                                  "warning": "not a directory: every batch will be refused "
                                             "(403) until devices are registered"}))
    if models is not None and not models.directory.is_dir():
        LOG.warning("%s", logfmt({"event": "no-models", "directory": models.directory,
                                  "warning": "not a directory: the model catalog is empty "
                                             "until model versions are put there"}))
    signal.signal(signal.SIGTERM, _stop)
    print(f"fleetgw central: receiving on {server.url}{PATH} (devices {settings.devices_dir}, "
          f"backend {backend!r}, models {models.directory if models else 'none'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        backend.close()
    print("fleetgw central: stopped", flush=True)
    return EXIT_OK


def query_command(config_path: str, sql: str, fmt: str | None = None) -> int:
    """Print the result of ``sql`` (in ``fmt``, default pretty); 1 when it fails."""
    loaded = _load(config_path, "query")
    if isinstance(loaded, int):
        return loaded
    _config, backend = loaded
    try:
        print(backend.query(sql, fmt or DEFAULT_QUERY_FORMAT), end="")
    except BackendError as exc:
        print(f"fleetgw central query: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        backend.close()
    return EXIT_OK
