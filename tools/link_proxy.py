"""A TCP proxy that plays the gateway's link: up, cut, or holding answers — real sockets.

Where this sits: between the uplink and the receiver in the demo, the sync benchmark and the
fault tests. The gateway posts to the proxy's loopback port; the proxy forwards bytes both
ways. Faults it makes:

- ``cut()``: every open connection is reset and new ones are refused at once (a dead radio);
  ``restore()`` lets traffic through again;
- ``hold_answers()``: requests still reach the receiver (which stores the batch) but the first
  bytes of each answer are held back and ``answer_held`` is set — the moment to SIGKILL the
  uplink "in the middle of a POST" after central stored it and before the gateway knows;
  ``restore()`` drops what was held (the connection is closed);
- ``request_forwarded``: set whenever request bytes went to the receiver (the moment to kill
  the receiver in the middle of an insert);
- ``answer_delay_s``: answers arrive that much later (a slow link; a POST stays in flight).

It only ever listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

CHUNK = 65536
UP, CUT, HOLD = "up", "cut", "hold"


class LinkProxy:
    """Forwards 127.0.0.1:``port`` (0: any free) to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.state = UP
        self.answer_held = threading.Event()
        self.request_forwarded = threading.Event()
        self.connections = 0
        #: Seconds each answer is held back before it is forwarded (a slow link).
        self.answer_delay_s = 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="link-proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- faults ---------------------------------------------------------------------------
    def cut(self) -> None:
        """Reset every connection; refuse new ones until `restore`."""
        self.state = CUT
        self._reset_all()

    def hold_answers(self) -> None:
        """Forward requests, hold back answers (see the module docstring)."""
        self.answer_held.clear()
        self.state = HOLD

    def restore(self) -> None:
        """Back to forwarding; connections with a held answer are closed (the answer is
        lost, as when a link drops after the server replied)."""
        if self.state == HOLD:
            self._reset_all()
        self.state = UP

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self._reset_all()

    # ---- plumbing -------------------------------------------------------------------------
    def _reset_all(self) -> None:
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:
            _drop(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.state == CUT:
                _drop(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the receiver is down: the client sees the connection end
                continue
            server.settimeout(None)
            self.connections += 1
            with self._lock:
                self._open.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                if not request and self.state == HOLD:
                    self.answer_held.set()
                    return  # held: never forwarded; `restore` closes the connection
                if not request and self.answer_delay_s > 0:
                    time.sleep(self.answer_delay_s)  # a slow link: the answer comes late
                if self.state == CUT:
                    break
                dst.sendall(data)
                if request:
                    self.request_forwarded.set()
        except OSError:
            pass
        finally:
            if self.state != HOLD:
                for sock in (src, dst):
                    _drop(sock)
                with self._lock:
                    self._open.discard(src)
                    self._open.discard(dst)


def _drop(sock: socket.socket) -> None:
    """End a connection now: shutdown first (close alone does not wake another thread blocked
    in recv on it, so the peer would wait for an answer forever), then close with RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
