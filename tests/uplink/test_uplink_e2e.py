"""The uplink end to end: a real journal, routed lanes, real signatures, pycurl to the real
receiver on loopback storing in embedded chdb. Every synced record is stored centrally exactly
once (I5) — also after a replay of every batch, a receiver outage, a batch too large for the
receiver, and a batch eviction shrank after central had stored it. Time is a fake monotonic
clock moved by the uplink's own waits: nothing sleeps."""

from __future__ import annotations

import contextlib
import itertools
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import nacl.signing
import pytest

pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")
pytest.importorskip("pycurl")

from actors.journal import Journal
from actors.journal.reader import JournalReader
from actors.uplink.client import UplinkClient
from actors.uplink.link import Backoff, LinkBudget, LinkClass, SyncWindows
from actors.uplink.planner import BatchPlanner
from actors.uplink.uplink import (
    ACKED,
    CONSUMER,
    IDLE_S,
    RETRY,
    Outcome,
    Send,
    Uplink,
    Wait,
)
from central.backend import ChdbBackend
from central.config import ReceiverSettings
from central.devices import DeviceRegistry
from central.receiver import Receiver, ReceiverServer
from central.schema import RECORD_TABLES
from messages.journal import BatchId, ConsumerCommit, ConsumerCommitted, RouteDecisions
from messages.readings import ReadingBatch, encode_values

KEY = nacl.signing.SigningKey(b"u" * 32)
DEVICES = ("veh-1", "veh-2")
GATEWAY, LINK = "gw-1", "wifi"
READINGS = 3000
APPEND_BATCH = 250
#: Lanes by position, cycling; every DROP_EVERY-th record is policy-dropped.
LANE_CYCLE = ("P1", "P2", "P3", "P2", "P3", "EPHEMERAL", "P3")
DROP_EVERY = 11
MAX_STEPS = 500
_ids = itertools.count(1)


class Clock:
    """Monotonic seconds the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Central(ReceiverServer):
    """The receiver, killable like a process: `kill` also cuts its open keep-alive
    connections (a dead process's kernel would), so clients see the outage at once."""

    def __init__(self, settings: ReceiverSettings, receiver: Receiver) -> None:
        super().__init__(settings, receiver)
        self.live: set[socket.socket] = set()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def get_request(self):
        request, address = super().get_request()
        self.live.add(request)
        return request, address

    def shutdown_request(self, request) -> None:
        self.live.discard(request)
        super().shutdown_request(request)

    def kill(self) -> None:
        self.shutdown()
        for request in list(self.live):
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        self.server_close()
        self.thread.join()


@pytest.fixture
def backend(chdb_backend):
    return chdb_backend


@pytest.fixture
def start_central(backend, tmp_path: Path) -> Iterator[Callable[..., Central]]:
    """Start a receiver on loopback (``port`` 0: any free one); killed after the test."""
    registry = DeviceRegistry(tmp_path / "devices")
    for device in DEVICES:  # one gateway key signs for both devices
        registry.register(device, KEY.verify_key.encode().hex())
    running: list[Central] = []

    def start(port: int = 0, max_raw_bytes: int = 1 << 20) -> Central:
        settings = ReceiverSettings(port=port, devices_dir=str(registry.directory),
                                    max_raw_bytes=max_raw_bytes)
        running.append(Central(settings, Receiver(backend, registry, max_raw_bytes)))
        return running[-1]

    yield start
    for server in running:
        if server.thread.is_alive():
            server.kill()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.db", synchronous="NORMAL") as j:
        yield j


def imu_readings(n: int, marker: str) -> ReadingBatch:
    """``n`` imu readings alternating between the devices, dated now (central's tables drop
    records older than their TTL)."""
    ts0 = time.time_ns()
    return ReadingBatch(
        sensor_id="imu-1", device_ids=tuple(DEVICES[i % 2] for i in range(n)),
        ts=tuple(ts0 + i * 10_000_000 for i in range(n)), kinds=("imu",) * n,
        payloads=tuple(encode_values({"b": marker, "i": i, "ax": 0.5 * i}) for i in range(n)))


def fill(journal: Journal, readings: int = READINGS) -> int:
    """Append ``readings`` across the devices and route them all; how many should sync."""
    for n in range(readings // APPEND_BATCH):
        journal.append(BatchId("imu-1", 1, n + 1), imu_readings(APPEND_BATCH, f"m{n}"))
    cursor = journal.cursor("router")
    pos = tuple(range(cursor.value + 1, journal.last_position().value + 1))
    lanes = tuple(LANE_CYCLE[p % len(LANE_CYCLE)] for p in pos)
    drops = tuple("sampled-out" if p % DROP_EVERY == 0 else None for p in pos)
    synced = sum(lane != "EPHEMERAL" and drop is None for lane, drop in zip(lanes, drops, strict=True))
    reply = journal.commit_consumer(ConsumerCommit(
        "router", next(_ids), cursor, journal.last_position(),
        decisions=RouteDecisions(pos, lanes, ("rule",) * len(pos), drops, (None,) * len(pos))))
    assert isinstance(reply, ConsumerCommitted), reply
    return synced


def make_uplink(journal: Journal, url: str, clock: Clock, max_records: int = 200) -> Uplink:
    budget = LinkBudget([LinkClass(LINK, 2e6, 1e6)], p1_rate_bytes_s=1e6, p1_burst_bytes=1e6,
                        clock=clock)
    return Uplink(JournalReader(journal.path), BatchPlanner(max_records, 1 << 20),
                  UplinkClient(url, connect_timeout_s=2, total_timeout_s=20), budget,
                  SyncWindows(), Backoff(0.5, 4.0, random.Random(7)), KEY, GATEWAY, LINK)


def persist(uplink: Uplink, journal: Journal) -> None:
    """Commit the uplink's pending batches (state only, cursor unchanged) if they changed."""
    state = uplink.plan()
    if state is not None:
        cursor = journal.cursor(CONSUMER)
        reply = journal.commit_consumer(ConsumerCommit(CONSUMER, next(_ids), cursor, cursor,
                                                       state=state))
        assert isinstance(reply, ConsumerCommitted), reply


def run(uplink: Uplink, journal: Journal, clock: Clock, steps: int = MAX_STEPS,
        until: Callable[[list[Outcome]], bool] = lambda _: False) -> list[Outcome]:
    """The actor's loop, driven by hand: persist, send, advance watermarks; the clock moves
    by each wait. Stops when nothing is pending (nothing left to sync) or ``until`` says."""
    outcomes: list[Outcome] = []
    for _ in range(steps):
        persist(uplink, journal)
        step = uplink.send_one(clock.now)
        if isinstance(step, Wait):
            if not uplink.pending():
                return outcomes
            clock.now += step.seconds
            continue
        outcomes.append(step)
        if step.action == ACKED:
            journal.advance_watermark(step.batch.device_id, step.batch.lane, step.watermark)
        if until(outcomes):
            return outcomes
    raise AssertionError(f"not synced after {steps} steps: {outcomes[-3:]}")


def central_counts(backend: ChdbBackend) -> tuple[int, int, int]:
    """(count() FINAL, uniqExact(device_id, generation, seq), count()) over the record tables."""
    totals = [0, 0, 0]
    for table in RECORD_TABLES:
        for i, sql in enumerate((f"SELECT count() FROM {table} FINAL",
                                 f"SELECT uniqExact(device_id, generation, seq) FROM {table}",
                                 f"SELECT count() FROM {table}")):
            totals[i] += int(backend.query(sql, "TSV"))
    return tuple(totals)


def expected_watermarks(journal: Journal) -> dict[str, dict[str, int]]:
    """Per device and synced lane: the highest seq of a record that should be synced."""
    conn = apsw.Connection(journal.path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        marks: dict[str, dict[str, int]] = {}
        for device, lane, seq in conn.execute(
                "SELECT device_id, lane, max(seq) FROM records WHERE lane != 'EPHEMERAL' "
                "AND drop_reason IS NULL GROUP BY 1, 2"):
            marks.setdefault(device, {})[lane] = seq
        return marks
    finally:
        conn.close()


def test_every_synced_record_is_stored_once_and_a_replay_stores_nothing(
        journal, start_central, backend) -> None:
    synced = fill(journal)
    central, clock = start_central(), Clock()
    uplink = make_uplink(journal, central.url, clock)
    outcomes = run(uplink, journal, clock)
    assert {o.action for o in outcomes} == {ACKED}
    assert [o.batch.lane for o in outcomes[:2]] == ["P1", "P1"]  # priority: P1 goes first
    assert central_counts(backend) == (synced, synced, synced)  # I5
    assert journal.watermarks() == expected_watermarks(journal)
    # Replay: every batch rebuilt from the journal is byte-identical, so a duplicate.
    for outcome in outcomes:
        signed = uplink.planner.build(uplink.reader, outcome.batch, KEY, GATEWAY)
        result = uplink.client.post(signed)
        assert (result.status, result.body["status"]) == (200, "duplicate")
    assert central_counts(backend) == (synced, synced, synced)


def test_a_receiver_outage_is_retried_until_every_batch_lands(
        journal, start_central, backend) -> None:
    synced = fill(journal)
    central, clock = start_central(), Clock()
    uplink = make_uplink(journal, central.url, clock)
    run(uplink, journal, clock, until=lambda done: len(done) == 5)
    port = central.server_address[1]
    central.kill()
    failed = run(uplink, journal, clock, until=lambda done: len(done) == 3)
    assert {o.action for o in failed} == {RETRY}
    assert all(o.reason.startswith("link: curl error") for o in failed), failed
    held = uplink.next_send(clock.now)  # the link backs off, no batch is tried meanwhile
    assert (held.reason, held.seconds) == (failed[-1].reason,
                                           pytest.approx(failed[-1].retry_after_s))
    start_central(port=port)  # the same data, the same address
    run(uplink, journal, clock)
    assert central_counts(backend) == (synced, synced, synced)  # I5
    assert journal.watermarks() == expected_watermarks(journal)


def test_a_batch_too_large_for_the_receiver_is_split(journal, start_central, backend) -> None:
    synced = fill(journal, readings=500)
    clock = Clock()
    probe = make_uplink(journal, "http://127.0.0.1:1", clock)
    largest = max(probe.planner.build(probe.reader, b, KEY, GATEWAY).header.raw_bytes
                  for b in probe.planner.next_batches(probe.reader))
    central = start_central(max_raw_bytes=largest // 3)
    uplink = make_uplink(journal, central.url, clock)
    outcomes = run(uplink, journal, clock)
    assert "split" in {o.action for o in outcomes}
    assert max(uplink.planner.max_records.values()) < 200
    assert central_counts(backend) == (synced, synced, synced)


def test_a_batch_eviction_shrank_after_it_was_stored_counts_as_acknowledged(
        journal, start_central, backend) -> None:
    fill(journal, readings=500)
    central, clock = start_central(), Clock()
    uplink = make_uplink(journal, central.url, clock)
    persist(uplink, journal)
    batch = next(b for b in uplink.pending() if b.lane == "P2")
    signed = uplink.planner.build(uplink.reader, batch, KEY, GATEWAY)
    stored = uplink.on_result(Send(batch, signed), uplink.client.post(signed), clock.now)
    assert (stored.action, stored.reason) == (ACKED, "ok")
    # A crash before AdvanceWatermark; meanwhile eviction took the oldest P2 records.
    conn = apsw.Connection(journal.path)
    conn.set_busy_timeout(5000)
    conn.execute("DELETE FROM records WHERE device_id = ? AND lane = 'P2' AND seq <= ?",
                 (batch.device_id, batch.seq_lo + 10))
    conn.close()
    shrunk = uplink.planner.build(uplink.reader, batch, KEY, GATEWAY)
    assert shrunk.header.count < batch.count
    result = uplink.client.post(shrunk)
    assert result.status == 409
    again = uplink.on_result(Send(batch, shrunk), result, clock.now)
    assert (again.action, again.watermark) == (ACKED, batch.seq_hi)
    assert again.reason.startswith("conflict")
    assert central_counts(backend)[0] == batch.count  # the first version, whole


def test_a_metered_link_carries_only_p1_and_nothing_unpersisted_is_sent(journal) -> None:
    fill(journal, readings=500)
    clock = Clock()
    uplink = make_uplink(journal, "http://127.0.0.1:1", clock)  # nothing is posted here
    uplink.budget = LinkBudget([LinkClass(LINK, 2e6, 1e6, metered=True)], 1e6, 1e6,
                               clock=clock)
    assert uplink.next_send(clock.now) == Wait(IDLE_S, "nothing to send")  # none persisted
    persist(uplink, journal)
    lanes = []
    while isinstance(choice := uplink.next_send(clock.now), Send):
        lanes.append(choice.batch.lane)
        journal.advance_watermark(choice.batch.device_id, choice.batch.lane,
                                  choice.batch.seq_hi)
        persist(uplink, journal)
    assert lanes == ["P1", "P1"]
    assert choice == Wait(IDLE_S, "P2 does not use metered link wifi")
