"""The uplink's choices beside plain priority, on a real journal and the real receiver (chdb):
lower lanes take turns after `STARVE_AFTER` higher-lane sends, short P2/P3 backlogs linger
for fuller batches, a caller may offer only some lanes (the actor's free POST channels) and
build P2/P3 batches elsewhere, and a 401 makes the uplink read the device's key file again."""

from __future__ import annotations

import itertools

import nacl.signing
import pytest

pytest.importorskip("chdb", reason="chdb is the central extra: pip install 'fleetgw[central]'")

from actors.uplink.keys import KeyRing
from actors.uplink.uplink import ACKED, RETRY, STARVE_AFTER, Send, Wait
from tests.uplink.test_uplink_e2e import (  # noqa: F401 (fixtures: backend, journal, ...)
    DEVICES,
    GATEWAY,
    KEY,
    Clock,
    backend,
    central_counts,
    fill,
    journal,
    make_uplink,
    persist,
    run,
    start_central,
)
from tools.central_process import write_device_key


def test_steady_higher_lanes_cannot_starve_p3(journal, start_central, backend):  # noqa: F811
    synced = fill(journal)  # P1, P2 and P3 records, interleaved
    central, clock = start_central(), Clock()
    uplink = make_uplink(journal, central.url, clock, max_records=5)  # many batches per lane
    lanes = [o.batch.lane for o in run(uplink, journal, clock)]
    first_p3 = lanes.index("P3")
    assert lanes[:STARVE_AFTER] == ["P1"] * STARVE_AFTER  # priority first...
    # ... then the lower lanes take turns: P3 goes within two rounds, long before P1 is done.
    assert first_p3 <= 2 * (STARVE_AFTER + 1) and "P1" in lanes[first_p3:]
    longest_without_p3 = max(len(list(run_)) for p3, run_ in
                             itertools.groupby(lanes[:lanes.index("P3", first_p3 + 1)],
                                               key=lambda lane: lane == "P3") if not p3)
    assert longest_without_p3 <= 2 * STARVE_AFTER + 1
    assert central_counts(backend) == (synced, synced, synced)  # and every record once


def test_a_short_backlog_lingers_and_a_full_batch_goes_at_once(journal):  # noqa: F811
    fill(journal, readings=250)
    clock = Clock()
    uplink = make_uplink(journal, "http://127.0.0.1:1", clock)
    uplink.linger_s = {"P3": 10.0}
    state = uplink.plan(clock.now)  # P1, P2 planned; P3 (short of 200 records) lingers
    assert state is not None and '"lane":"P3"' not in state and '"lane":"P1"' in state
    assert uplink.linger_wait_s(clock.now) == pytest.approx(10.0)
    assert '"lane":"P3"' not in uplink.plan(clock.now + 5)
    assert '"lane":"P3"' in uplink.plan(clock.now + 10.0)
    # A backlog of a full batch does not linger.
    fill(journal, readings=2000)
    eager = make_uplink(journal, "http://127.0.0.1:1", clock, max_records=50)
    eager.linger_s = {"P3": 3600.0}
    assert '"lane":"P3"' in (eager.plan(clock.now) or "")


def test_only_the_offered_lanes_are_sent_and_builds_can_happen_elsewhere(
        journal, start_central):  # noqa: F811
    fill(journal, readings=500)
    central, clock = start_central(), Clock()
    uplink = make_uplink(journal, central.url, clock)
    persist(uplink, journal)
    uplink.defer_build = lambda batch: batch.lane != "P1"
    choice = uplink.next_send(clock.now, ["P2", "P3"])  # P1 pending, but not offered
    assert isinstance(choice, Wait) and choice.reason.startswith("building a P2")
    assert {b.lane for b in uplink.build_requests} == {"P2", "P3"}
    for batch, key in list(uplink.build_requests.items()):  # the actor's builder thread
        uplink.set_built(batch, uplink.planner.build(uplink.reader, batch, key, GATEWAY))
    assert not uplink.build_requests
    choice = uplink.next_send(clock.now, ["P2", "P3"])
    assert isinstance(choice, Send) and choice.batch.lane == "P2"
    assert uplink.on_result(choice, uplink.client.post(choice.signed), clock.now).action == ACKED
    p1 = uplink.next_send(clock.now, ["P1"])  # built inline: P1 is never deferred
    assert isinstance(p1, Send) and p1.batch.lane == "P1"


def test_a_401_makes_the_uplink_read_the_device_key_again(
        journal, start_central, tmp_path, backend):  # noqa: F811
    fill(journal, readings=250)
    central, clock = start_central(), Clock()  # registers KEY for every device
    old = nacl.signing.SigningKey.generate()
    for device in DEVICES:
        write_device_key(tmp_path / "keys", device, old)  # the gateway still has the old key
    uplink = make_uplink(journal, central.url, clock)
    uplink.keys = KeyRing(tmp_path / "keys", clock=clock)
    refused = run(uplink, journal, clock, until=lambda done: len(done) == 1)
    assert refused[0].action == RETRY and "401" in refused[0].reason
    for device in DEVICES:  # the operator re-keys the gateway (fleetgw provision --replace)
        write_device_key(tmp_path / "keys", device, KEY)
    outcomes = run(uplink, journal, clock)
    assert outcomes and {o.action for o in outcomes} == {ACKED}
    assert central_counts(backend)[0] > 0
