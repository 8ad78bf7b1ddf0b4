"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

Where this sits: beside `fleetgw run`, between it and the service manager. Under
deploy/fleetgw.service (``Type=notify``, ``WatchdogSec=``) systemd passes ``NOTIFY_SOCKET``
(and ``WATCHDOG_USEC``/``WATCHDOG_PID``); the run process tells it READY=1 once the supervision
tree is up, STATUS= lines, WATCHDOG=1 while the gateway is alive and STOPPING=1 on SIGTERM.
Without ``NOTIFY_SOCKET`` (a terminal, a container, the tests) every call is a no-op.

The protocol: one datagram per message on an AF_UNIX SOCK_DGRAM socket, newline-separated
``KEY=VALUE`` assignments. The address is an absolute path or, starting with ``@``, a name in
the abstract namespace. systemd tells senders apart by the kernel's SCM_CREDENTIALS, so with
``NotifyAccess=main`` only the run process itself is heard; the variables are removed from the
environment at once so actor processes and their children (mosquitto, the model self-test) do
not inherit them. Sending never raises: a service manager that went away must not stop the
gateway (a failed WATCHDOG=1 only means systemd will act on its own).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

#: The environment variables systemd sets for the protocol (all removed by `from_environment`).
ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID = "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"


def log() -> logging.Logger:
    return logging.getLogger("fleetgw.sd_notify")


def socket_address(value: str) -> str | None:
    """The address to send to for a ``NOTIFY_SOCKET`` value: an absolute path as it is, ``@name``
    as ``\\0name`` (Linux abstract namespace); anything else (e.g. systemd 254's ``vsock:``)
    None."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def watchdog_usec(environ: MutableMapping[str, str], pid: int) -> int | None:
    """The watchdog timeout in microseconds meant for process ``pid`` (sd_watchdog_enabled(3)):
    ``WATCHDOG_USEC`` when it is a positive integer and ``WATCHDOG_PID`` is unset or ``pid``;
    otherwise None (a malformed value is logged)."""
    text = environ.get(ENV_WATCHDOG_USEC, "")
    if not text:
        return None
    owner = environ.get(ENV_WATCHDOG_PID, "")
    if owner and owner != str(pid):
        return None  # meant for another process (e.g. we were started by the service)
    if not text.isdigit() or int(text) == 0:
        log().warning("ignoring %s=%r: expected a positive number of microseconds",
                      ENV_WATCHDOG_USEC, text)
        return None
    return int(text)


class Notifier:
    """Sends sd_notify messages to ``address`` (None: every call does nothing).

    ``watchdog_usec`` is systemd's watchdog timeout; `ping_period_s` is half of it, the interval
    sd_watchdog_enabled(3) recommends between WATCHDOG=1 messages.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address else None
        self._sock: socket.socket | None = None
        self._failing = False  # a send failed: log again only after one succeeded

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None,
                         pid: int | None = None, unset: bool = True) -> Notifier:
        """A notifier for what systemd put in ``environ`` (default ``os.environ``), removing the
        variables from it when ``unset`` (so children do not inherit them)."""
        environ = os.environ if environ is None else environ
        value = environ.get(ENV_SOCKET, "")
        address = socket_address(value) if value else None
        if value and address is None:
            log().warning("ignoring %s=%r: expected an absolute path or @abstract name",
                          ENV_SOCKET, value)
        usec = watchdog_usec(environ, os.getpid() if pid is None else pid)
        if unset:
            for name in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                environ.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def ping_period_s(self) -> float | None:
        """Seconds between WATCHDOG=1 messages (half systemd's timeout); None: no watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True when it was sent."""
        if self.address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._failing:
                log().warning("cannot notify the service manager at %s: %s",
                              self.address.replace("\0", "@"), exc)
            self._failing = True
            return False
        self._failing = False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([status_assignment(status)] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(status_assignment(text))

    def watchdog(self) -> bool:
        """One keep-alive ping (only when systemd asked for them)."""
        return self.notify("WATCHDOG=1") if self.watchdog_usec else False

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([status_assignment(status)] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_assignment(text: str) -> str:
    """``STATUS=text`` on one line (a newline would start another assignment)."""
    return "STATUS=" + " ".join(text.split("\n"))


class Watchdog:
    """When to send WATCHDOG=1: every `period_s` while the gateway proved alive within the last
    `period_s` (`alive` records each proof: the root supervisor answered). A run loop that is
    stuck, or a root that stopped answering, ends the pings, and systemd restarts the service
    ``WatchdogSec`` (twice the period) later. Time comes in as monotonic seconds."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.period_s = notifier.ping_period_s
        self.last_alive: float | None = None
        self.last_ping: float | None = None

    @property
    def enabled(self) -> bool:
        return self.period_s is not None

    def alive(self, now: float) -> None:
        self.last_alive = now

    def due(self, now: float) -> bool:
        if self.period_s is None or self.last_alive is None:
            return False
        if now - self.last_alive > self.period_s:
            return False  # no proof of life lately: let systemd's deadline run out
        return self.last_ping is None or now - self.last_ping >= self.period_s

    def tick(self, now: float) -> bool:
        """Ping when due; True when a ping went out."""
        if not self.due(now):
            return False
        self.last_ping = now
        return self.notifier.watchdog()
