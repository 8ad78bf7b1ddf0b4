"""The link proxy the demo, the sync benchmark, the fault tests and the drills use, against
real loopback peers: a cut ends every open connection at once — also one whose request is
waiting for an answer, with the proxy's threads blocked in recv — and refuses new ones until the
link is restored; a blackhole swallows traffic and ends nothing; latency delays each chunk
without cutting throughput; bandwidth is one bucket for all; a reset mid-body leaves the
receiver a truncated request; restore() ends each; close() ends every thread."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

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


# ---- the field link's other faults, against a real loopback peer ------------------------------
class Peer:
    """A loopback TCP server behind the proxy, one thread per connection: it echoes what it
    reads (``echo``) or only keeps it, and records per connection the bytes it got and how the
    connection ended ("eof" or "reset")."""

    def __init__(self, echo: bool) -> None:
        self.echo = echo
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.received: list[bytearray] = []
        self.endings: list[str | None] = []
        self.changed = threading.Condition()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def wait(self, predicate, what: str, timeout_s: float = 30) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout_s), f"timed out waiting for {what}"

    def total(self) -> int:
        return sum(len(r) for r in self.received)

    def close(self) -> None:
        for sock in [self.listener, *self._conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept / recv (close alone does not)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.changed:
                index = len(self.received)
                self.received.append(bytearray())
                self.endings.append(None)
                self._conns.append(conn)
                self.changed.notify_all()
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        ending = "eof"
        try:
            while data := conn.recv(65536):
                with self.changed:
                    self.received[index] += data
                    self.changed.notify_all()
                if self.echo:
                    conn.sendall(data)
        except ConnectionResetError:
            ending = "reset"
        except OSError:
            ending = "closed"
        with self.changed:
            self.endings[index] = ending
            self.changed.notify_all()
        conn.close()


@pytest.fixture
def echo():
    peer = Peer(echo=True)
    yield peer
    peer.close()


@pytest.fixture
def sink():
    peer = Peer(echo=False)
    yield peer
    peer.close()


@pytest.fixture
def link_to():
    """Makes proxies; on teardown closes them and checks that every proxy thread ended."""
    links: list[LinkProxy] = []

    def make(peer: Peer) -> LinkProxy:
        links.append(LinkProxy(peer.address))
        return links[-1]

    yield make
    for link in links:
        link.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("link-proxy")]


def connect(link: LinkProxy, timeout_s: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", link.port), timeout=timeout_s)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the connection ended after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def round_trip(sock: socket.socket, message: bytes) -> bytes:
    sock.sendall(message)
    return recv_exactly(sock, len(message))


def no_answer(sock: socket.socket, wait_s: float = 0.5) -> bool:
    """Whether nothing came back within ``wait_s`` and the connection is still open (neither
    FIN nor RST: the recv times out)."""
    sock.settimeout(wait_s)
    try:
        sock.recv(100)
    except TimeoutError:
        return True
    return False


def send_in_background(sock: socket.socket, data: bytes) -> threading.Thread:
    thread = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    thread.start()
    return thread


def test_plain_forwarding_counts_bytes_and_passes_a_half_close_on(link_to, echo):
    link = link_to(echo)
    assert link.condition == "up" and link.faults == ()
    payload = os.urandom(1 << 20)
    with connect(link) as client:
        sender = send_in_background(client, payload)
        assert recv_exactly(client, len(payload)) == payload
        sender.join()
        client.shutdown(socket.SHUT_WR)  # the peer sees EOF and closes: so does the client
        assert client.recv(100) == b""
    echo.wait(lambda: echo.endings == ["eof"], "the peer to see the client's EOF")
    assert link.counters == {"bytes_up": len(payload), "bytes_down": len(payload),
                               "connections": 1, "resets": 0}


def test_a_blackhole_swallows_traffic_without_ending_connections_until_restored(link_to, echo):
    link = link_to(echo)
    before = connect(link)
    assert round_trip(before, b"hello") == b"hello"
    link.blackhole()
    assert link.condition == "blackhole"
    before.sendall(b"lost")
    before.shutdown(socket.SHUT_WR)  # its FIN vanishes too
    assert no_answer(before)  # no answer, no FIN, no RST: only the client's own timeout
    during = connect(link)  # accepted...
    during.sendall(b"also lost")
    assert no_answer(during)  # ...and then nothing
    assert bytes(echo.received[0]) == b"hello" and len(echo.received) == 1  # nothing got through
    assert echo.endings == [None]

    link.restore()
    assert link.condition == "up"
    for sock in (before, during):  # they lived through the blackhole: dropped
        sock.settimeout(30)
        assert ended(sock)
        sock.close()
    with connect(link) as after:
        assert round_trip(after, b"back") == b"back"


def test_latency_delays_every_chunk_without_dividing_throughput(link_to, echo):
    link = link_to(echo)
    link.latency(0.2)
    assert link.condition == "latency 200ms"
    with connect(link) as client:
        started = time.monotonic()
        assert round_trip(client, b"ping") == b"ping"
        assert time.monotonic() - started >= 0.4  # 0.2 s each way

        # 4 MB each way is at least 64 chunks: a sleep per chunk would take 64 * 0.2 s = 12.8 s
        # per direction; a delay line takes the latency once, plus the transfer.
        payload = os.urandom(4 << 20)
        started = time.monotonic()
        sender = send_in_background(client, payload)
        assert recv_exactly(client, len(payload)) == payload
        assert time.monotonic() - started < 8
        sender.join()

        link.latency(0.02, jitter_s=0.05)  # jitter never reorders a direction
        assert link.condition == "latency 20ms ±50ms"
        messages = b"".join(b"%05d" % i for i in range(300))
        for i in range(0, len(messages), 5):
            client.sendall(messages[i:i + 5])
        assert recv_exactly(client, len(messages)) == messages

        link.latency(60)  # what is on its way when the link is restored goes at once
        client.sendall(b"queued")
        link.restore()
        assert recv_exactly(client, 6) == b"queued"


def test_bandwidth_is_one_bucket_shared_by_all_connections(link_to, sink):
    link = link_to(sink)
    link.bandwidth(200_000)
    assert link.condition == "bandwidth 200000 B/s"
    first, second = connect(link), connect(link)
    started = time.monotonic()
    for sock in (first, second):  # 2 x 200 kB at 200 kB/s together: about 2 s
        send_in_background(sock, b"x" * 200_000)
    sink.wait(lambda: sink.total() == 400_000, "400 kB through the link")
    assert time.monotonic() - started >= 1.5
    assert link.bytes_up == 400_000

    link.bandwidth(1000)  # 100 kB would take 100 s; restoring the link lets it go at once
    send_in_background(first, b"y" * 100_000)
    sink.wait(lambda: link.bytes_up > 400_000, "the first bytes at 1 kB/s")
    link.restore()
    sink.wait(lambda: sink.total() == 500_000, "the rest once restored")
    for sock in (first, second):
        sock.close()


def test_latency_and_bandwidth_combine(link_to, sink):
    link = link_to(sink)
    link.latency(0.3)
    link.bandwidth(100_000)
    assert link.condition == "latency 300ms, bandwidth 100000 B/s"
    with connect(link) as client:
        started = time.monotonic()
        client.sendall(b"z" * 100_000)  # 0.3 s late, then about 0.9 s of airtime
        sink.wait(lambda: sink.total() == 100_000, "100 kB through the link")
        assert time.monotonic() - started >= 1.0
    link.restore()
    assert link.condition == "up"


def saw_reset(sock: socket.socket, data: bytes) -> bool:
    """Whether sending ``data`` and then reading to the end meets a reset (BrokenPipe comes
    only after one)."""
    try:
        sock.sendall(data)
        while sock.recv(65536):
            pass  # an echo of what got through before the reset
    except (ConnectionResetError, BrokenPipeError):
        return True
    return False


def test_a_reset_mid_body_leaves_the_receiver_a_truncated_request(link_to, sink):
    link = link_to(sink)
    link.reset_mid_body(1000)
    assert link.condition == "reset after 1000 B"
    request = b"POST /batch HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + os.urandom(100_000)
    with connect(link) as client:
        assert saw_reset(client, request)
    assert link.reset_done.wait(30) and link.resets == 1
    sink.wait(lambda: sink.endings[0] is not None, "the receiver to see the connection end")
    assert bytes(sink.received[0]) == request[:1000] and sink.endings[0] in ("reset", "eof")

    assert link.condition == "up"  # times=1: the next request passes whole
    with connect(link) as client:
        client.sendall(request)
        sink.wait(lambda: len(sink.received) == 2 and len(sink.received[1]) == len(request),
                  "the next request in full")
    assert link.resets == 1


def test_a_reset_mid_body_counts_a_request_from_after_the_last_answer(link_to, echo):
    link = link_to(echo)
    link.reset_mid_body(50, times=2)
    assert link.condition == "reset after 50 B (2 left)"
    with connect(link) as client:
        assert round_trip(client, b"short" * 2) == b"short" * 2  # under 50 bytes: passes
        assert saw_reset(client, b"L" * 100)  # the next request on the connection: cut at 50
    echo.wait(lambda: echo.endings[0] is not None, "the receiver to see the connection end")
    assert bytes(echo.received[0]) == b"short" * 2 + b"L" * 50
    assert link.condition == "reset after 50 B"  # one left

    link.restore()  # ends the plan
    with connect(link) as client:
        assert round_trip(client, b"W" * 100) == b"W" * 100
    assert link.resets == 1


def test_held_answers_are_lost_and_their_connections_closed_on_restore(link_to, echo):
    link = link_to(echo)
    link.hold_answers()
    assert link.condition == "hold"
    with connect(link) as client:
        client.sendall(b"stored")
        assert link.answer_held.wait(30)
        echo.wait(lambda: bytes(echo.received[0]) == b"stored", "the request at the receiver")
        assert no_answer(client)
        link.restore()
        client.settimeout(30)
        assert ended(client)
    with connect(link) as client:
        assert round_trip(client, b"again") == b"again"


@pytest.mark.parametrize("fault, args", [("latency", (-1,)), ("latency", (0.1, -0.1)),
                                         ("bandwidth", (0,)), ("bandwidth", (100, 0)),
                                         ("reset_mid_body", (-1,)), ("reset_mid_body", (10, 0))])
def test_a_fault_with_a_bad_figure_is_refused_with_the_figure(link_to, sink, fault, args):
    link = link_to(sink)
    with pytest.raises(ValueError, match="got"):
        getattr(link, fault)(*args)
    assert link.condition == "up"
