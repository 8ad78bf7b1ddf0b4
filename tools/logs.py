"""Structured log lines (logfmt: ``ts=... level=... pid=... logger=... msg="..."``).

Where this sits: `fleetgw run` passes `thespian_log_config` to the actor system, so every actor
process's log records go through Thespian's logger process into DATA_DIR/gateway.log (and
warnings and errors also to stderr). Secrets never go into log lines: log names, not values.
"""

from __future__ import annotations

import logging
import time


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-_.:/@" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    """One line per record, key=value pairs, UTC timestamps with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"pid={record.process}",
            f"logger={_quote(record.name)}",
            f"msg={_quote(record.getMessage())}",
        ]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def thespian_log_config(log_file: str, level: str = "info") -> dict:
    """A logging dictConfig for the actor system: file gets ``level`` and up, stderr warnings."""
    lvl = level.upper()
    return {
        "version": 1,
        "formatters": {"logfmt": {"()": "tools.logs.LogfmtFormatter"}},
        "filters": {"notthespian": {"()": "tools.logs.NotThespianInternals"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": log_file,
                "formatter": "logfmt",
                "level": lvl,
            },
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "logfmt",
                "level": "WARNING",
                "filters": ["notthespian"],
            },
        },
        "root": {"handlers": ["file", "stderr"], "level": lvl},
    }


class NotThespianInternals(logging.Filter):
    """Keeps Thespian's own chatter (e.g. dead letters during a stop) off the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("Thespian")


class OwnInfoOthersWarnings(logging.Filter):
    """On the terminal: our own info lines, other libraries' warnings and up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("fleetgw")


def setup_process_logging(level: str = "info") -> None:
    """Logging of the run process itself (stderr, logfmt)."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    handler.addFilter(OwnInfoOthersWarnings())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
