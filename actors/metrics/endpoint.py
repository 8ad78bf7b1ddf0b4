"""The HTTP side of the metrics: ``GET /metrics`` on one address and port.

Where this sits: the metrics actor opens a `MetricsEndpoint` at start. prometheus_client's
server answers in daemon threads of its own, from the actor's registry, so the actor's thread
never waits on a client. A port that cannot be taken (another gateway's, another program's)
is a `problem` the actor shows and retries, never an exception: metrics must not take the
gateway down.
"""

from __future__ import annotations

import errno
import ipaddress
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

#: Seconds between attempts to listen while the port cannot be taken.
LISTEN_RETRY_S = 30.0
#: What helps, per errno of a failed listen.
_HINTS = {
    errno.EADDRINUSE: "address in use; set [metrics] port",
    errno.EADDRNOTAVAIL: "no such address on this computer; set [metrics] listen_address",
    errno.EACCES: "permission denied; set [metrics] port",
}


def host_port(address: str, port: int) -> str:
    """``address:port``, with an IPv6 address in brackets."""
    if ipaddress.ip_address(address).version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


class MetricsEndpoint:
    """Serves ``registry`` over HTTP on ``address:port`` once `open` succeeds."""

    def __init__(self, address: str, port: int, registry: CollectorRegistry) -> None:
        self.address, self.port = address, port
        self.registry = registry
        self.server: Any = None
        #: Why the endpoint is not listening ("" while it is, or before the first `open`).
        self.problem = ""

    @property
    def listening(self) -> bool:
        return self.server is not None

    @property
    def where(self) -> str:
        return host_port(self.address, self.port)

    def open(self) -> bool:
        """Start listening (again); False when the port cannot be taken (``problem`` says
        why and what helps)."""
        if self.server is not None:
            return True
        try:
            self.server, _thread = start_http_server(self.port, self.address, self.registry)
        except OSError as exc:
            hint = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
            self.problem = f"metrics: cannot listen on {self.where}: {hint}"
            return False
        self.problem = ""
        return True

    def close(self) -> None:
        """Stop listening and release the port."""
        if self.server is not None:
            server, self.server = self.server, None
            server.shutdown()
            server.server_close()
