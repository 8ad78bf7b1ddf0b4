"""A TCP proxy that plays the gateway's field link — up, cut, silent, slow, narrow or flaky —
over real sockets.

Where this sits: between the uplink and the receiver in the demo, the sync benchmark, the
fault tests and the drills. The gateway posts to the proxy's loopback port; the proxy forwards
bytes both ways through one delay line per direction (chunks are stamped on arrival and
delivered when due, in order). Faults it makes:

Modes — one at a time; calling one replaces the mode before it:

- ``cut()``: every open connection is reset and new ones are refused at once (a dead radio);
- ``blackhole()``: packets vanish. Open connections stay open (no RST, no FIN) but nothing is
  forwarded either way; new connections are accepted and get nothing either, so a client sees
  its request go out and no answer come until its own timeout. Leaving the blackhole drops the
  connections that lived through it (bytes were lost: the stream cannot be resumed);
- ``hold_answers()``: requests still reach the receiver (which stores the batch) but answers
  are held back and ``answer_held`` is set — the moment to SIGKILL the uplink "in the middle of
  a POST" after central stored it and before the gateway knows. Leaving the hold closes the
  open connections (the held answers are lost).

Shapers — they combine with each other and with ``hold_answers()``, and stay until
``restore()``:

- ``latency(seconds, jitter_s)``: every chunk both ways arrives that much later (plus a random
  share of the jitter), order kept, throughput not reduced (a delay line, not a sleep per
  chunk); ``answer_delay_s`` adds a delay to answers only (a POST stays in flight);
- ``bandwidth(bytes_per_s, burst_bytes)``: one token bucket shared by all connections and both
  directions (a radio's airtime), so 1 MB at 50 kB/s takes about 20 s;
- ``reset_mid_body(after_bytes, times)``: the next ``times`` requests (a request: what the
  client sends before the next answer begins) reach the receiver truncated after
  ``after_bytes`` bytes, then both sides are reset (RST); ``resets`` counts them and
  ``reset_done`` is set. A shorter request passes, and the next one on its connection is cut.

``restore()`` ends every fault and returns to plain forwarding (queued chunks go at once).
``condition`` describes the faults for a report ("up", "blackhole", "latency 200ms, bandwidth
50000 B/s"); ``counters`` says what the link did (``bytes_up``, ``bytes_down``,
``connections``, ``resets``); ``request_forwarded`` is set whenever request bytes reached the
receiver (the moment to kill the receiver in the middle of an insert). ``close()`` ends every
thread the proxy started.

It only ever listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import random
import select
import socket
import struct
import termios
import threading
import time
from collections import deque

CHUNK = 65536
#: Bytes a direction of one connection holds in its delay line before it stops reading (the
#: link's buffer; the sender's TCP then pushes back).
QUEUE_MAX_BYTES = 4 << 20
#: Longest a delivery thread waits for a peer to take bytes before it looks whether the
#: connection was closed meanwhile (seconds).
SEND_WAIT_S = 0.5
UP, CUT, HOLD, BLACKHOLE = "up", "cut", "hold", "blackhole"
#: Delay-line markers: the sender ended its side (FIN); reset both sides here.
EOF, RESET = object(), object()


class LinkProxy:
    """Forwards 127.0.0.1:``port`` (0: any free) to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        #: The mode: UP, CUT, HOLD or BLACKHOLE (the shapers are in `faults`).
        self.state = UP
        self.answer_held = threading.Event()
        self.request_forwarded = threading.Event()
        self.reset_done = threading.Event()
        #: Connections accepted and kept (forwarded, or swallowed by a blackhole).
        self.connections = 0
        #: Bytes delivered to the receiver / to the client; connections reset mid-body.
        self.bytes_up = self.bytes_down = self.resets = 0
        #: Seconds each answer is held back before it is forwarded (a slow link).
        self.answer_delay_s = 0.0
        self._latency_s = self._jitter_s = 0.0
        self._bucket: _TokenBucket | None = None
        self._reset_after_bytes = 0
        self._resets_left = 0
        self._lock = threading.Lock()
        self._open: set[_Connection] = set()
        self._epoch = 0  # counts drops of every connection (an accept in flight checks it)
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._start(self._accept, "link-proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def faults(self) -> tuple[str, ...]:
        """The faults in force, each described for a report; empty when the link is up."""
        found = [] if self.state == UP else [self.state]
        if self._latency_s or self._jitter_s:
            jitter = f" ±{self._jitter_s * 1000:.0f}ms" if self._jitter_s else ""
            found.append(f"latency {self._latency_s * 1000:.0f}ms{jitter}")
        if self.answer_delay_s:
            found.append(f"answer delay {self.answer_delay_s * 1000:.0f}ms")
        if self._bucket is not None:
            found.append(f"bandwidth {self._bucket.rate:g} B/s")
        if self._resets_left:
            left = f" ({self._resets_left} left)" if self._resets_left > 1 else ""
            found.append(f"reset after {self._reset_after_bytes} B{left}")
        return tuple(found)

    @property
    def condition(self) -> str:
        """One line for a report: "up", "cut", "latency 200ms, bandwidth 50000 B/s", ..."""
        return ", ".join(self.faults) or UP

    @property
    def counters(self) -> dict[str, int]:
        """What the link did, for a drill report. (A property: the drill rig takes every public
        method but restore and close for a fault.)"""
        with self._lock:
            return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                    "connections": self.connections, "resets": self.resets}

    # ---- faults ---------------------------------------------------------------------------
    def cut(self) -> None:
        """Reset every connection; refuse new ones until `restore`."""
        self._enter(CUT)

    def blackhole(self) -> None:
        """Forward nothing, end nothing, until `restore` (see the module docstring)."""
        self._enter(BLACKHOLE)

    def hold_answers(self) -> None:
        """Forward requests, hold back answers (see the module docstring)."""
        self.answer_held.clear()
        self._enter(HOLD)

    def latency(self, seconds: float, jitter_s: float = 0.0) -> None:
        """Deliver every chunk, both ways, ``seconds`` (+ up to ``jitter_s``) after it came."""
        if seconds < 0 or jitter_s < 0:
            raise ValueError(f"latency and jitter must be >= 0 s (got {seconds}, {jitter_s})")
        self._latency_s, self._jitter_s = float(seconds), float(jitter_s)
        self._wake_all()

    def bandwidth(self, bytes_per_s: float, burst_bytes: int | None = None) -> None:
        """Share ``bytes_per_s`` among all connections and both directions; ``burst_bytes``
        (default: a tenth of a second's worth) may go at once after a pause."""
        if bytes_per_s <= 0 or (burst_bytes is not None and burst_bytes <= 0):
            raise ValueError(f"bandwidth and burst must be > 0 (got {bytes_per_s} B/s, "
                             f"burst {burst_bytes} B); restore() lifts the limit")
        burst = burst_bytes or max(1, int(bytes_per_s / 10))
        self._bucket = _TokenBucket(float(bytes_per_s), min(burst, CHUNK))
        self._wake_all()

    def reset_mid_body(self, after_bytes: int, times: int = 1) -> None:
        """The next ``times`` requests reach the receiver cut after ``after_bytes`` bytes, then
        both sides are reset (``resets``, ``reset_done``)."""
        if after_bytes < 0 or times < 1:
            raise ValueError(f"after_bytes must be >= 0 and times >= 1 (got {after_bytes}, "
                             f"{times})")
        with self._lock:
            self._reset_after_bytes, self._resets_left = after_bytes, times
        self.reset_done.clear()

    def restore(self) -> None:
        """Back to plain forwarding. Connections that lived through a blackhole or had an
        answer held are closed (their bytes are lost, as when a link drops)."""
        self._latency_s = self._jitter_s = self.answer_delay_s = 0.0
        self._bucket = None
        with self._lock:
            self._resets_left = 0
            for conn in self._open:
                conn.reset_after = None
        self._enter(UP)

    def close(self) -> None:
        """Stop listening, reset every connection and end every thread."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._drop_all()
        for thread in list(self._threads):
            thread.join(timeout=5)

    # ---- plumbing -------------------------------------------------------------------------
    def _enter(self, mode: str) -> None:
        with self._lock:
            leaving, self.state = self.state, mode
        if mode == CUT or (leaving in (HOLD, BLACKHOLE) and leaving != mode):
            self._drop_all()
        self._wake_all()

    def _drop_all(self) -> None:
        with self._lock:
            self._epoch += 1
            conns = list(self._open)
        for conn in conns:
            self._finish(conn, reset=True)

    def _wake_all(self) -> None:
        """Let every waiting thread look at the faults again."""
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            with conn.changed:
                conn.changed.notify_all()

    def _start(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=name)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode, epoch = self.state, self._epoch
            if mode == CUT:
                _drop(client)
                continue
            server = None
            if mode != BLACKHOLE:  # in a blackhole the receiver hears nothing at all
                try:
                    server = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()  # the receiver is down: the client sees the connection end
                    continue
                server.settimeout(None)
            conn = _Connection(client, server)
            with self._lock:
                kept = epoch == self._epoch  # no cut or restore dropped everything meanwhile
                if kept:
                    self._open.add(conn)
                    self.connections += 1
            if not kept:
                _drop(client)
                if server is not None:
                    _drop(server)
                continue
            self._start(self._read, "link-proxy-read-up", conn, True)
            if server is not None:
                self._start(self._read, "link-proxy-read-down", conn, False)
                self._start(self._deliver, "link-proxy-deliver-up", conn, True)
                self._start(self._deliver, "link-proxy-deliver-down", conn, False)

    def _read(self, conn: _Connection, up: bool) -> None:
        """Reads one side and puts what may pass into the other direction's delay line."""
        src = conn.client if up else conn.server
        try:
            while True:
                data = src.recv(CHUNK)
                mode = self.state
                if mode == CUT:
                    break
                if mode == BLACKHOLE or conn.server is None or (mode == HOLD and not up):
                    # Swallowed, the FIN too; leaving the blackhole or the hold drops the conn.
                    if not data:
                        return
                    if mode == HOLD:
                        self.answer_held.set()
                    continue
                if not data:
                    conn.push(up, EOF)
                    return
                if not up:
                    with self._lock:
                        conn.request_bytes = 0  # an answer: the next request starts afresh
                    conn.push(False, data)
                    continue
                data, reset = self._admit_request(conn, data)
                if data:
                    conn.push(True, data)
                if reset:
                    conn.push(True, RESET)
                    return
        except OSError:
            pass
        self._finish(conn, reset=True)

    def _admit_request(self, conn: _Connection, data: bytes) -> tuple[bytes, bool]:
        """The part of ``data`` that goes on, and whether the connection is reset after it."""
        with self._lock:
            if conn.reset_after is None and conn.request_bytes == 0 and self._resets_left:
                self._resets_left -= 1  # this request is one of the next `times`
                conn.reset_after = self._reset_after_bytes
            limit, reset = conn.reset_after, False
            if limit is not None and conn.request_bytes + len(data) >= limit:
                data, reset, conn.reset_after = data[:limit - conn.request_bytes], True, None
            conn.request_bytes += len(data)
        return data, reset

    def _deliver(self, conn: _Connection, up: bool) -> None:
        """Sends one direction's delay line on when each chunk is due, within the bandwidth."""
        dst = conn.server if up else conn.client
        try:
            while (data := conn.pop_when_due(up, self._delay)) is not None:
                if self.state == BLACKHOLE:
                    continue  # in flight when the blackhole began: lost
                if data is EOF:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    if conn.end_direction():
                        self._finish(conn, reset=False)
                    return
                if data is RESET:
                    _wait_sent(dst)  # the receiver gets all of the first after_bytes
                    self._finish(conn, reset=True)
                    with self._lock:
                        self.resets += 1
                    self.reset_done.set()
                    return
                self._send(conn, dst, data, up)
        except OSError:
            self._finish(conn, reset=True)

    def _delay(self, up: bool, spread: float) -> float:
        delay = self._latency_s + spread * self._jitter_s
        return delay if up else delay + self.answer_delay_s

    def _send(self, conn: _Connection, dst: socket.socket, data: bytes, up: bool) -> None:
        view = memoryview(data)
        while view:
            bucket = self._bucket
            piece = view if bucket is None else view[:bucket.burst]
            if bucket is not None and not conn.wait_turn(bucket.reserve(len(piece)),
                                                         lambda b=bucket: self._bucket is b):
                return
            conn.send_all(dst, piece)
            with self._lock:
                if up:
                    self.bytes_up += len(piece)
                else:
                    self.bytes_down += len(piece)
            if up:
                self.request_forwarded.set()
            view = view[len(piece):]

    def _finish(self, conn: _Connection, reset: bool) -> None:
        """End ``conn``: with a reset (RST both ways) or, both sides having ended, plainly."""
        if not conn.end():
            return
        with self._lock:
            self._open.discard(conn)
            if conn.reset_after is not None:  # claimed by reset_mid_body and not used
                self._resets_left += 1
        for sock in (conn.client, conn.server):
            if sock is not None:
                if reset:
                    _drop(sock)
                else:
                    with contextlib.suppress(OSError):
                        sock.close()


class _Connection:
    """One client connection, its receiver connection (none in a blackhole) and a delay line
    per direction (True: up, client to receiver)."""

    def __init__(self, client: socket.socket, server: socket.socket | None) -> None:
        self.client, self.server = client, server
        #: Guards the fields below; notified on every change and on every fault change.
        self.changed = threading.Condition()
        self.lines: dict[bool, deque[tuple[float, float, object]]] = {True: deque(),
                                                                      False: deque()}
        self.queued = {True: 0, False: 0}  # bytes in each delay line
        self.closed = False
        self.directions_ended = 0
        #: Bytes of the current request so far (guarded by the proxy's lock, like the next).
        self.request_bytes = 0
        #: Set when this connection carries one of reset_mid_body's requests: reset after so
        #: many request bytes.
        self.reset_after: int | None = None

    def push(self, up: bool, data: object) -> None:
        """Stamp ``data`` (bytes, EOF or RESET) and queue it; wait while the line is full."""
        size = len(data) if isinstance(data, bytes) else 0
        with self.changed:
            self.lines[up].append((time.monotonic(), random.random(), data))
            self.queued[up] += size
            self.changed.notify_all()
            while self.queued[up] > QUEUE_MAX_BYTES and not self.closed:
                self.changed.wait()

    def pop_when_due(self, up: bool, delay) -> object | None:
        """The next item of a direction once ``delay(up, spread)`` after its arrival has
        passed (asked again on every wake-up: the latency may change); None once closed."""
        line = self.lines[up]
        with self.changed:
            while not self.closed:
                if line:
                    arrival, spread, data = line[0]
                    left = arrival + delay(up, spread) - time.monotonic()
                    if left <= 0:
                        line.popleft()
                        if isinstance(data, bytes):
                            self.queued[up] -= len(data)
                        self.changed.notify_all()  # room for the reader
                        return data
                    self.changed.wait(left)
                else:
                    self.changed.wait()
            return None

    def wait_turn(self, wait_s: float, still) -> bool:
        """Wait ``wait_s`` for a bandwidth slot, less if ``still()`` turns false (the limit
        changed); False if the connection closed meanwhile."""
        deadline = time.monotonic() + wait_s
        with self.changed:
            while (not self.closed and still()
                   and (left := deadline - time.monotonic()) > 0):
                self.changed.wait(left)
            return not self.closed

    def send_all(self, sock: socket.socket, data: memoryview) -> None:
        """Send ``data``, waiting in select rather than in send, so a peer that reads nothing
        never pins this thread inside a socket call (which would keep the socket alive after
        another thread closes it, and delay its RST). Raises OSError once closed."""
        while data:
            if self.closed:
                raise OSError("connection closed")
            try:
                data = data[sock.send(data, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                try:
                    select.select([], [sock], [], SEND_WAIT_S)
                except ValueError:  # closed meanwhile (fileno -1)
                    raise OSError("connection closed") from None

    def end_direction(self) -> bool:
        """One direction delivered its FIN; True when both have."""
        with self.changed:
            self.directions_ended += 1
            return self.directions_ended == 2

    def end(self) -> bool:
        """Mark closed and wake every thread; True for the one caller that closed it."""
        with self.changed:
            if self.closed:
                return False
            self.closed = True
            self.changed.notify_all()
            return True


class _TokenBucket:
    """Bytes per second with a burst, shared by whoever reserves: `reserve` always grants and
    says how long to wait first (the bucket runs into debt), so turns are taken in order."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self, size: int) -> float:
        """Take ``size`` bytes' worth; the seconds to wait before sending them."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= size
            return max(0.0, -self._tokens / self.rate)


def _wait_sent(sock: socket.socket, timeout_s: float = 2.0) -> None:
    """Wait (briefly, bounded) until the peer's kernel acknowledged all sent on ``sock``, so a
    reset does not discard bytes still in our send queue (Linux TIOCOUTQ; elsewhere no wait)."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(OSError, ValueError):
        while time.monotonic() < deadline:
            raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            if struct.unpack("i", raw)[0] == 0:
                return
            time.sleep(0.005)


def _drop(sock: socket.socket) -> None:
    """End a connection now with a reset: shutdown(SHUT_RD) wakes a thread blocked in recv on
    it and sends nothing (close alone does not wake it, and the peer would wait for an answer
    forever), then close with SO_LINGER 0 sends the RST (no FIN before it)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()
