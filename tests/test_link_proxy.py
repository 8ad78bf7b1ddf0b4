"""The link proxy the demo, the sync benchmark and the fault tests use: a cut ends every open
connection at once — also one whose request is waiting for an answer, with the proxy's threads
blocked in recv — and refuses new ones until the link is restored."""

from __future__ import annotations

import socket
import threading

import pytest

from tools.link_proxy import LinkProxy


@pytest.fixture
def silent_server():
    """A server that accepts and reads but never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()
    listener.close()
    for conn in accepted:
        conn.close()


def ended(sock: socket.socket) -> bool:
    """Whether the peer ended the connection (FIN or RST); a timeout raises: it did not."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def dropped_on_arrival(port: int) -> bool:
    """Whether a new connection is ended at once (the reset may even beat connect())."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError):
        return True
    with sock:
        return ended(sock)


def test_a_cut_ends_a_connection_waiting_for_its_answer(silent_server):
    link = LinkProxy(silent_server)
    try:
        client = socket.create_connection(("127.0.0.1", link.port), timeout=30)
        client.sendall(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert link.request_forwarded.wait(30)
        link.cut()
        assert ended(client)  # at once, not after the client's own timeout
        assert dropped_on_arrival(link.port)  # while cut
        link.restore()
        link.request_forwarded.clear()
        again = socket.create_connection(("127.0.0.1", link.port), timeout=30)
        again.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert link.request_forwarded.wait(30)  # forwarded again
        for sock in (client, again):
            sock.close()
    finally:
        link.close()
