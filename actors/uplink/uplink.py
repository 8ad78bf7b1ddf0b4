"""The uplink's logic, one step at a time: plan, pick the next batch to send, judge the answer.

Where this sits on the data path: step 6. The actor shell (actors/uplink/actor.py) drives an
`Uplink` in a loop:

1. ``state = uplink.plan()``; when not None, commit it to the journal as a state-only
   ``ConsumerCommit("uplink", request_id, cursor, cursor, state=state)`` and wait for
   ``ConsumerCommitted`` — batch boundaries are durable BEFORE their first send.
2. ``choice = uplink.next_send(now, lanes)``: a `Send` (post ``choice.signed``) or a `Wait`
   (sleep ``seconds``, or until ``NewRecords`` arrives); ``lanes``: those whose POST channel is
   free (the actor posts P1 on a channel of its own). It only ever picks batches read back
   from the journal's stored state, so an unpersisted batch is never sent.
3. ``outcome = uplink.on_result(choice, client.post(choice.signed), now)`` (or steps 2-3 in
   one: ``uplink.send_one(now)``); on ``ACKED`` send ``AdvanceWatermark(device_id, lane,
   outcome.watermark)`` and wait for its reply before the next step.

Order within a (device, lane): only its lowest pending batch is ever in flight, and a watermark
moves to a batch's ``seq_hi`` only when it is acknowledged — so a watermark never covers a
record central has not got, and eviction of "synced" records (I7) never loses data (habit 9).
Between keys: lanes in priority order, then the key sent least recently (no device starves);
after `STARVE_AFTER` consecutive sends while a lower lane waited, a ready lower lane goes (the
one sent least recently): steady P1 and P2 streams cannot starve P3.

Answers: 200 ok/duplicate -> acked; 409 (central holds another body under this identity: the
first version, sent before eviction shrank the batch) -> acked, the records are central;
413 -> split: the lane's batch size halves and the batch is re-planned. 413 means nothing of
this send was stored; should an earlier send of the same batch (outcome unknown, e.g. before a
crash) have stored it, the halves overlap it under new identities and central's
ReplacingMergeTree key (device_id, generation, seq) collapses them, so I5 still holds. A batch
of one record that is too large cannot be split: it is retried later (quarantine: not yet).
No answer, 429 or 5xx -> the whole link backs off (Backoff, decorrelated jitter); any other
refusal -> that key alone backs off, at least `LATER_MIN_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import attrs
import nacl.signing

from actors.journal.reader import JournalReader
from actors.uplink.client import BatchSink, PostResult
from actors.uplink.envelope import SignedBatch
from actors.uplink.keys import KeyRing
from actors.uplink.link import LATER, RETRY, SPLIT, Backoff, LinkBudget, SyncWindows, classify
from actors.uplink.planner import (
    SYNCED_LANES,
    BatchPlanner,
    PlannedBatch,
    pending_from_state,
    pending_to_state,
)

#: The uplink's consumer name in the journal (its cursor never moves: it only stores state).
CONSUMER = "uplink"
#: How long to wait when nothing is pending, or a lane is closed by window or link rules
#: (the actor also wakes on NewRecords).
IDLE_S = 5.0
#: The least back-off after a refusal by the receiver (operator attention needed), unless the
#: backoff's cap is lower.
LATER_MIN_S = 60.0
#: The receiver's success statuses (`central.receiver`).
STORED = ("ok", "duplicate")
HTTP_OK, HTTP_UNAUTHORIZED, HTTP_CONFLICT = 200, 401, 409
NOTHING = "nothing to send"
#: Lanes go in priority order (P1, P2, P3), but after this many consecutive sends while a lower
#: lane had a batch pending, the ready lower lane sent least recently goes: steady P1 and P2
#: streams cannot starve P3 (the lower lanes take turns).
STARVE_AFTER = 3
#: How soon to look again at a batch being built in another thread.
BUILD_WAIT_S = 0.01
ACKED = "acked"


@attrs.frozen(slots=True)
class Send:
    """Post ``signed``, the signed form of the persisted ``batch``."""

    batch: PlannedBatch
    signed: SignedBatch


@attrs.frozen(slots=True)
class Wait:
    """Nothing may go now: ask again after ``seconds`` (``reason`` for logs and metrics)."""

    seconds: float
    reason: str


@attrs.frozen(slots=True)
class Outcome:
    """What a POST's answer means for ``batch``: ``action`` ACKED (advance the watermark of
    its device and lane to ``watermark``), RETRY (after ``retry_after_s``; nothing to do
    meanwhile) or SPLIT (re-planned smaller at the next `Uplink.plan`)."""

    action: str
    batch: PlannedBatch
    reason: str
    retry_after_s: float = 0.0
    watermark: int | None = None


class Uplink:
    """Plans, picks and judges batches; the caller persists state, posts and moves watermarks.
    ``now`` arguments are monotonic seconds; ``wall_clock`` (epoch seconds) is for windows."""

    def __init__(self, reader: JournalReader, planner: BatchPlanner, client: BatchSink,
                 budget: LinkBudget, windows: SyncWindows, backoff: Backoff,
                 keys: KeyRing | nacl.signing.SigningKey, gateway_id: str, link_class: str,
                 wall_clock: Callable[[], float] = time.time,
                 linger_s: Mapping[str, float] | None = None) -> None:
        self.reader, self.planner, self.client = reader, planner, client
        self.budget, self.windows, self.backoff = budget, windows, backoff
        self.keys = keys if isinstance(keys, KeyRing) else KeyRing.single(keys)
        self.gateway_id, self.link_class = gateway_id, link_class
        self.wall_clock = wall_clock
        self.linger_s = dict(linger_s or {})
        self._backlog_since: dict[tuple[str, str], float] = {}
        self._signed: dict[PlannedBatch, SignedBatch | None] = {}
        self._finished: set[PlannedBatch] = set()  # split or fully evicted: drop from state
        self._link_hold = (0.0, "")
        self._key_holds: dict[tuple[str, str], tuple[float, str]] = {}
        self._sent_at: dict[tuple[str, str], int] = {}
        self._sends = 0
        self._passed_over = 0  # consecutive sends while a lower lane had a batch pending
        self._lane_sent_at: dict[str, int] = {}
        #: Which batches another thread builds (the actor: P2/P3, so that encoding and zstd
        #: never hold up a P1 send); their requests wait in `build_requests`.
        self.defer_build: Callable[[PlannedBatch], bool] = lambda batch: False
        self.build_requests: dict[PlannedBatch, nacl.signing.SigningKey] = {}

    def pending(self) -> list[PlannedBatch]:
        """The batches persisted in the journal (the only ones ever sent)."""
        return pending_from_state(self.reader.consumer_state(CONSUMER)[1])

    def _live(self, stored: list[PlannedBatch]) -> list[PlannedBatch]:
        """Stored batches neither acknowledged (seq_hi <= watermark) nor finished."""
        marks = self.reader.watermarks()
        return [b for b in stored if b not in self._finished
                and b.seq_hi > marks.get(b.device_id, {}).get(b.lane, 0)]

    def plan(self, now: float | None = None) -> str | None:
        """The pending state to commit before sending (acknowledged and finished batches
        dropped, new ones planned); None when the stored state is already that. A lane with a
        ``linger_s`` plans a batch short of its size only once its backlog is that old."""
        stored = self.pending()
        live = self._live(stored)
        new = self.planner.next_batches(self.reader, pending=live)
        pending = live + self._ripe(new, time.monotonic() if now is None else now)
        self._finished &= set(stored)
        self._signed = {b: s for b, s in self._signed.items() if b in pending}
        self.build_requests = {b: k for b, k in self.build_requests.items() if b in pending}
        return None if pending == stored else pending_to_state(pending)

    def _ripe(self, batches: list[PlannedBatch], now: float) -> list[PlannedBatch]:
        """The batches to plan now: full ones, and those of keys whose backlog waited its
        lane's linger (fewer, larger batches: less overhead per record on the link)."""
        keys = {b.key for b in batches}
        self._backlog_since = {k: t for k, t in self._backlog_since.items() if k in keys}
        ripe = []
        for batch in batches:
            linger = self.linger_s.get(batch.lane, 0.0)
            since = self._backlog_since.setdefault(batch.key, now)
            if batch.count >= self.planner.max_records[batch.lane] or now - since >= linger:
                ripe.append(batch)
                del self._backlog_since[batch.key]
        return ripe

    def linger_wait_s(self, now: float) -> float | None:
        """Seconds until the first lingering backlog is ripe (None: none lingers)."""
        waits = [self.linger_s.get(lane, 0.0) - (now - since)
                 for (_, lane), since in self._backlog_since.items()]
        return max(0.0, min(waits)) if waits else None

    def next_send(self, now: float, lanes: Sequence[str] = SYNCED_LANES) -> Send | Wait:
        """The next persisted batch of ``lanes`` the link policy lets go now (its bytes are
        then spent from the link budget), or how long to wait and why."""
        hold_until, why = self._link_hold
        if now < hold_until:
            return Wait(hold_until - now, why)
        heads: dict[tuple[str, str], PlannedBatch] = {}
        for batch in self._live(self.pending()):
            if batch.lane not in lanes:
                continue
            if batch.key not in heads or batch.seq_lo < heads[batch.key].seq_lo:
                heads[batch.key] = batch
        waits: list[Wait] = []
        ready: list[Send] = []
        lower_pending = False
        for batch in sorted(heads.values(), key=self._priority):
            if ready:
                if batch.lane == ready[0].batch.lane:
                    continue
                lower_pending = True
                if self._passed_over < STARVE_AFTER:
                    break  # the top lane goes; nothing lower needs building or budget now
            hold_until, why = self._key_holds.get(batch.key, (0.0, ""))
            closed = (None if self.windows.open(batch.lane, self.wall_clock())
                      else f"{batch.lane} is outside its sync windows")
            closed = closed or self.budget.allowed(self.link_class, batch.lane)
            if now < hold_until:
                waits.append(Wait(hold_until - now, why))
            elif closed:
                waits.append(Wait(IDLE_S, closed))
            elif isinstance(key := self.keys.key(batch.device_id), str):
                later = min(LATER_MIN_S, self.backoff.cap_s)
                self._key_holds[batch.key] = (now + later, key)
                waits.append(Wait(later, key))
            elif batch not in self._signed and self.defer_build(batch):
                self.build_requests[batch] = key  # built elsewhere, then `set_built`
                waits.append(Wait(BUILD_WAIT_S, f"building a {batch.lane} batch"))
            elif (signed := self._build(batch, key)) is None:
                self._finished.add(batch)  # nothing left of it: dropped at the next plan
            elif (wait_s := self.budget.wait_s(self.link_class, batch.lane,
                                               len(signed.body))) > 0:
                waits.append(Wait(wait_s, f"{batch.lane} link budget"))
            else:
                ready.append(Send(batch, signed))
        if not ready:
            return min(waits, key=lambda w: w.seconds, default=Wait(IDLE_S, NOTHING))
        choice = ready[0]
        if len(ready) > 1:  # only once STARVE_AFTER is hit: the lower lane sent least recently
            choice = min(ready[1:], key=lambda s: self._lane_sent_at.get(s.batch.lane, -1))
        self._passed_over = self._passed_over + 1 if choice is ready[0] and lower_pending else 0
        self.budget.spend(self.link_class, choice.batch.lane, len(choice.signed.body))
        self._sends += 1
        self._sent_at[choice.batch.key] = self._lane_sent_at[choice.batch.lane] = self._sends
        return choice

    def set_built(self, batch: PlannedBatch, signed: SignedBatch | None) -> None:
        """The signed form of ``batch``, built elsewhere (see ``defer_build``); kept only while
        it is still requested (`plan` drops the requests of batches no longer pending)."""
        if self.build_requests.pop(batch, None) is not None:
            self._signed[batch] = signed

    def _priority(self, batch: PlannedBatch) -> tuple[int, int, str]:
        return (SYNCED_LANES.index(batch.lane), self._sent_at.get(batch.key, 0),
                batch.device_id)

    def _build(self, batch: PlannedBatch, key: nacl.signing.SigningKey) -> SignedBatch | None:
        """The batch's signed form, built once while it is pending (a rebuild is identical)."""
        if batch not in self._signed:
            self._signed[batch] = self.planner.build(self.reader, batch, key, self.gateway_id)
        return self._signed[batch]

    def send_one(self, now: float) -> Outcome | Wait:
        """`next_send`, then post it with the client and judge the answer."""
        choice = self.next_send(now)
        if isinstance(choice, Wait):
            return choice
        return self.on_result(choice, self.client.post(choice.signed), now)

    def _acked(self, batch: PlannedBatch) -> None:
        self.backoff.reset()
        self._key_holds.pop(batch.key, None)

    def on_result(self, send: Send, result: PostResult, now: float) -> Outcome:
        """What the receiver's answer to ``send`` means (see the module docstring)."""
        batch = send.batch
        body = result.body or {}
        if result.status == HTTP_OK and body.get("status") in STORED \
                and body.get("acked_seq_hi") == batch.seq_hi:
            self._acked(batch)
            return Outcome(ACKED, batch, str(body["status"]), watermark=batch.seq_hi)
        if result.status == HTTP_CONFLICT:
            self._acked(batch)
            return Outcome(ACKED, batch, "conflict: central holds an earlier version of this "
                                         "batch (sent before eviction shrank it)",
                           watermark=batch.seq_hi)
        if result.status == HTTP_OK:  # stored, but not the answer this batch needs
            verdict_action, reason = LATER, f"unexpected reply {body!r}"
        else:
            verdict = classify(result.status, result.error)
            verdict_action, reason = verdict.action, verdict.reason
            detail = body.get("reason") or (result.error if result.status else None)
            if detail:
                reason = f"{reason}: {str(detail)[:300]}"
        if result.status == HTTP_UNAUTHORIZED:  # re-keyed? read the key file again
            self.keys.forget(batch.device_id)
            self._signed = {b: s for b, s in self._signed.items()
                            if b.device_id != batch.device_id}
        if verdict_action == SPLIT and batch.count > 1:
            size = self.planner.split(batch.lane, batch.count)
            self._finished.add(batch)
            return Outcome(SPLIT, batch, f"{reason}: {batch.lane} batches now {size} records")
        delay = self.backoff.next_s()
        if verdict_action == RETRY:
            self._link_hold = (now + delay, reason)
        else:  # LATER, or a one-record batch that is too large
            delay = max(min(LATER_MIN_S, self.backoff.cap_s), delay)
            self._key_holds[batch.key] = (now + delay, reason)
        return Outcome(RETRY, batch, reason, retry_after_s=delay)
