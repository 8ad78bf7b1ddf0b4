"""UplinkActor: the actor that syncs the P1/P2/P3 lanes to central (data path step 6).

A thin shell over `Uplink` (uplink.py), one thing in flight at a time:

1. ``uplink.plan()``; a changed plan is committed to the journal as a state-only
   ``ConsumerCommit("uplink", ...)`` and the actor waits for ``ConsumerCommitted`` — batch
   boundaries are durable before their first send, so a retry after any crash (SIGKILL in the
   middle of a POST included) resends the identical batch, which central stores once (I5);
2. ``uplink.next_send(now)``: a batch goes to the POST worker thread (pycurl blocks; the actor
   keeps answering heartbeats and looks at the POST every `POST_POLL_S`); a P2/P3 batch is
   first built (read, encoded, compressed, signed) in a builder thread with its own journal
   connection, so that building 5000 records never holds up a P1 send; or the actor waits —
   for the link budget, a backoff, a sync window — at most ``poll_s``, or until the journal
   says ``NewRecords`` (the router routed more);
3. the answer, judged by ``uplink.on_result``: acknowledged -> ``AdvanceWatermark`` to the
   journal (which may then evict those records, I7) and wait for ``WatermarkAdvanced``; retry,
   split or later -> back to 1.

The journal is the only state: after a restart the actor reads its pending batches and the
watermarks back and continues. An orderly stop does not wait for a POST in flight: whatever it
stored is a duplicate when resent. Every few checks it also advances a `ModelUpdater` (newer
signed models from the receiver, within the link budget) in the same worker thread, between
sends.
"""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import nacl.signing

from actors.base import SupervisedActor, log
from actors.journal.actor import journal_path
from actors.journal.consumer import RESEND_AFTER_S, TRANSIENT_REFUSALS
from actors.journal.keys import KeyRing as JournalKeyRing
from actors.journal.keys import keyring_from
from actors.journal.reader import JournalReader
from actors.journal.schema import JournalError
from actors.model_runner.registry import ModelRegistry
from actors.uplink.client import BatchSink, PostResult, UplinkClient
from actors.uplink.envelope import SignedBatch
from actors.uplink.keys import KeyRing
from actors.uplink.link import P1, Backoff, LinkBudget, LinkClass, SyncWindows
from actors.uplink.model_update import FAILED, INSTALLED, REFUSED, ModelUpdater, UpdateStep
from actors.uplink.planner import BatchPlanner, PlannedBatch
from actors.uplink.uplink import ACKED, CONSUMER, NOTHING, SPLIT, Send, Uplink, Wait
from config.schema import UplinkActorSettings, UplinkSettings
from messages.journal import (
    AdvanceWatermark,
    ConsumerCommit,
    ConsumerCommitRefused,
    ConsumerCommitted,
    NewRecords,
    WatermarkAdvanced,
    WatermarkRefused,
)
from messages.supervision import StopChild

#: Seconds between looks at the POST in flight, and at a model update step.
POST_POLL_S = 0.005
MODEL_POLL_S = 0.05
BUILD_POLL_S = 0.005
DIRECT = "direct"


def current_link(settings: UplinkSettings) -> str | None:
    """The link class in use: the first line of ``link_file`` when configured (None: the file
    is missing or empty — no link), else ``link``."""
    if not settings.link_file:
        return settings.link
    try:
        with open(settings.link_file) as f:
            name = f.readline().strip()
    except OSError:
        return None
    return name or None


def without_userinfo(url: str) -> str:
    """``url`` for a log line: a ``user:password@`` in it is left out."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def make_sink(settings: UplinkSettings) -> BatchSink:
    """The uplink's `BatchSink` for its mode."""
    if settings.mode == DIRECT:
        from actors.uplink.direct import DirectSink

        password = os.environ.get(settings.password_env, "") if settings.password_env else ""
        return DirectSink(settings.url, settings.database, user=settings.user,
                          password=password, tls_ca=settings.tls_ca or None,
                          connect_timeout_s=settings.connect_timeout_s,
                          total_timeout_s=settings.total_timeout_s)
    return UplinkClient(settings.url, tls_cert=settings.tls_cert or None,
                        tls_key=settings.tls_key or None, tls_ca=settings.tls_ca or None,
                        connect_timeout_s=settings.connect_timeout_s,
                        total_timeout_s=settings.total_timeout_s)


def make_updater(settings: UplinkActorSettings, budget: LinkBudget,
                 data_dir: str) -> ModelUpdater:
    """Model updates over the air: the receiver's catalog into the model registry the model
    runner serves from, downloads paid from the P3 budget."""
    s, model = settings.uplink, settings.model
    registry = ModelRegistry(model.registry or os.path.join(data_dir, "models"),
                             model.trusted_keys or None)
    return ModelUpdater(s.url, registry, os.path.join(data_dir, "model-downloads"),
                        tls_cert=s.tls_cert or None, tls_key=s.tls_key or None,
                        tls_ca=s.tls_ca or None, budget=budget, link_class=s.link,
                        connect_timeout_s=s.connect_timeout_s, check_s=s.model_check_s)


def make_budget(settings: UplinkSettings) -> LinkBudget:
    return LinkBudget([LinkClass(c.name, c.rate_bytes_s, c.burst_bytes, c.metered)
                       for c in settings.links],
                      settings.p1_rate_bytes_s, settings.p1_burst_bytes, settings.metered_lanes)


#: The POST channels, each its own connection and worker thread: P1 never waits behind a P2/P3
#: POST (a large batch, a slow link); P2 and P3 share the other, in priority order.
P1_CHANNEL, BULK = "p1", "bulk"
CHANNEL_LANES = {P1_CHANNEL: (P1,), BULK: ("P2", "P3")}


def channel_of(lane: str) -> str:
    return P1_CHANNEL if lane == P1 else BULK


@attrs.define
class Channel:
    """One POST channel: its sink (own connection), worker, and the POST in flight."""

    name: str
    sink: BatchSink
    pool: ThreadPoolExecutor
    post: Future | None = None
    sending: Send | None = None


class UplinkActor(SupervisedActor):
    """Syncs the journal's lanes to central under the link policy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reader: JournalReader | None = None
        self.uplink: Uplink | None = None
        self.channels: dict[str, Channel] = {}
        self.journal_keyring: JournalKeyRing | None = None
        self.keys: KeyRing | None = None
        self.builder: ThreadPoolExecutor | None = None
        self.builds: dict[PlannedBatch, Future] = {}
        self.build_reader = threading.local()
        self.commit: ConsumerCommit | None = None
        self.watermark: AdvanceWatermark | None = None
        self.marks: list[AdvanceWatermark] = []  # acknowledged, waiting for the journal
        self.sent_at = 0.0  # of the commit or watermark in flight
        self.updater: ModelUpdater | None = None
        self.model_step: Future | None = None
        self.next_model_step = 0.0
        self.schema_ready = False
        self.stopped = False
        self.stop_request: tuple[Any, StopChild] | None = None
        self.waiting = "starting"
        self.last_problem = ""
        #: sent: POSTs answered; retries: POSTs of a batch posted before (in this
        #: incarnation); failures: answers that were neither acknowledged nor a split.
        self.counts = {"sent": 0, "acked": 0, "synced_records": 0, "bytes_sent": 0,
                       "retries": 0, "failures": 0, "splits": 0, "state_commits": 0}
        #: Batches posted and not yet acknowledged or split: posting one again is a retry.
        self.posted: set[PlannedBatch] = set()
        #: Monotonic times of the last acknowledged batch and of the last batch the receiver
        #: answered but refused (a 4xx other than 413/429: not a link problem) — `fleetgw
        #: health` tells a link that is down from a central that says no.
        self.last_ack_mono: float | None = None
        self.last_refusal_mono: float | None = None

    def on_init(self) -> None:
        settings: UplinkActorSettings = self.settings
        self.config = s = settings.uplink
        self.channels = {name: Channel(name, make_sink(s), ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"uplink-{name}")) for name in CHANNEL_LANES}
        self.budget = make_budget(s)
        self.windows = SyncWindows(s.windows)
        if s.mode != DIRECT and s.model_updates and settings.model.enabled:
            self.updater = make_updater(settings, self.budget, self.data_dir or ".")
        if s.mode == DIRECT:  # ClickHouse checks no signatures: sign with a throwaway key
            self.keys = KeyRing.single(nacl.signing.SigningKey.generate())
        else:
            self.keys = KeyRing(s.keys_dir or Path(self.data_dir or ".") / "keys")
        self.builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uplink-build")
        log().info("uplink to %s (%s mode, link %s)", without_userinfo(s.url), s.mode,
                   s.link_file or s.link)
        self.start_timer("resend", RESEND_AFTER_S)
        self.step()

    # ---- the loop -------------------------------------------------------------------------
    def busy(self) -> bool:
        """Anything in flight (a stop waits for it)."""
        return (self.journal_busy() or bool(self.marks) or self.model_step is not None
                or any(c.post is not None for c in self.channels.values()))

    def journal_busy(self) -> bool:
        return self.commit is not None or self.watermark is not None

    def open(self) -> bool:
        """Open the journal read-only and build the `Uplink` (the journal may still be
        creating its file: then try again at the next step)."""
        if self.uplink is not None:
            return True
        self.journal_keyring = keyring_from(self.journal_key_file)  # a bad key file crashes
        try:
            self.reader = JournalReader(journal_path(self.data_dir), self.journal_keyring)
        except JournalError:
            return False
        s = self.config
        assert self.keys is not None
        self.uplink = Uplink(self.reader, BatchPlanner(s.max_records, s.max_raw_bytes),
                             self.channels[BULK].sink, self.budget, self.windows,
                             Backoff(s.backoff_base_s, s.backoff_cap_s), self.keys,
                             s.gateway_id, s.link,
                             linger_s={"P2": s.p2_linger_s, "P3": s.p3_linger_s})
        self.uplink.defer_build = lambda batch: batch.lane != P1
        log().info("uplink resumes with %d pending batches", len(self.uplink.pending()))
        return True

    def step(self) -> None:
        """Do the next thing: persist a changed plan, send a batch, or wait."""
        if self.journal_busy():
            return
        if self.marks:  # also while stopping: an acknowledged batch's watermark goes first
            self.watermark = self.marks.pop(0)
            self.send_in_flight()
            return
        if self.stopped:
            self.finish_stop()
            return
        s = self.config
        if not self.open():
            self.wait("the journal is not open yet", s.poll_s)
            return
        assert self.uplink is not None and self.reader is not None
        now = time.monotonic()
        state = self.uplink.plan(now)
        if state is not None:
            cursor = self.reader.consumer_state(CONSUMER)[0]
            self.commit = ConsumerCommit(CONSUMER, random.SystemRandom().getrandbits(62),
                                         cursor, cursor, state=state)
            self.send_in_flight()
            return
        link = current_link(s)
        if link is None:
            self.wait(f"no link ({s.link_file} names none)", s.poll_s)
            return
        self.uplink.link_class = link
        free = [c for c in self.channels.values() if c.post is None
                and not (c.name == BULK and self.model_step is not None)]
        if not free:
            return  # a POST's answer steps again
        choice = self.uplink.next_send(now, [lane for c in free for lane in CHANNEL_LANES[c.name]])
        self.start_builds()
        if isinstance(choice, Wait):
            linger = self.uplink.linger_wait_s(now)
            if linger is not None and linger < choice.seconds:
                choice = Wait(linger, "a lane's backlog lingers for a fuller batch"
                              if choice.reason == NOTHING else choice.reason)
            if self.channels[BULK] in free and self.model_update_due(link, now):
                return
            self.wait(choice.reason, choice.seconds)
            return
        channel = self.channels[channel_of(choice.batch.lane)]
        if choice.batch in self.posted:
            self.counts["retries"] += 1
        self.posted.add(choice.batch)
        self.waiting = "sending"
        channel.sending = choice
        channel.post = channel.pool.submit(self.post_batch, channel.sink, choice.signed)
        self.start_timer("post", POST_POLL_S)
        self.step()  # the other channel may have something to send too

    # ---- P2/P3 batches are built (read, encoded, compressed, signed) in another thread -----
    def start_builds(self) -> None:
        assert self.uplink is not None and self.builder is not None
        for batch, key in list(self.uplink.build_requests.items()):
            if batch not in self.builds:
                self.builds[batch] = self.builder.submit(self.build_batch, batch, key)
        if self.builds:
            self.start_timer("build", BUILD_POLL_S)

    def build_batch(self, batch: PlannedBatch, key: nacl.signing.SigningKey
                    ) -> SignedBatch | None:
        """Builder thread: the batch's signed form, read through the thread's own reader."""
        reader = getattr(self.build_reader, "reader", None)
        if reader is None:
            reader = self.build_reader.reader = JournalReader(journal_path(self.data_dir),
                                                              self.journal_keyring)
        assert self.uplink is not None
        return self.uplink.planner.build(reader, batch, key, self.config.gateway_id)

    def on_timer_build(self) -> None:
        assert self.uplink is not None
        for batch, future in list(self.builds.items()):
            if future.done():
                del self.builds[batch]
                self.uplink.set_built(batch, future.result())  # a failed build crashes us
        if self.builds:
            self.start_timer("build", BUILD_POLL_S)
        self.step()

    def post_batch(self, sink: BatchSink, signed: SignedBatch) -> PostResult:
        """A channel's worker thread: the POST (direct mode: the tables are made first; an
        idempotent CREATE ... IF NOT EXISTS, so both channels may race to it)."""
        if self.config.mode == DIRECT and not self.schema_ready:
            from actors.uplink.direct import DirectError

            try:
                sink.ensure_schema()  # type: ignore[attr-defined]
            except DirectError as exc:
                return PostResult(exc.status, None, f"creating the tables: {exc.reason}", 0,
                                  0.0)
            self.schema_ready = True
        return sink.post(signed)

    # ---- model updates --------------------------------------------------------------------
    def model_update_due(self, link: str, now: float) -> bool:
        """Between sends, when due and P3 may sync: one step of the model updater in the
        worker thread (a catalog check, one chunk, or the install)."""
        if (self.updater is None or now < self.next_model_step
                or not self.windows.open("P3", time.time())):
            return False
        self.updater.link_class = link
        self.waiting = "model update"
        self.model_step = self.channels[BULK].pool.submit(self.updater.step, now)
        self.start_timer("model", MODEL_POLL_S)
        return True

    def on_timer_model(self) -> None:
        if self.model_step is None:
            return
        if not self.model_step.done():
            self.start_timer("model", MODEL_POLL_S)
            return
        future, self.model_step = self.model_step, None
        step: UpdateStep = future.result()  # never raises for the network or the disk
        self.next_model_step = time.monotonic() + step.wait_s
        if step.action in (INSTALLED, REFUSED, FAILED):
            level = log().info if step.action == INSTALLED else log().warning
            level("model update %s: %s: %s", step.action, step.version or "-", step.reason)
            self.counts[f"models_{step.action}"] = self.counts.get(
                f"models_{step.action}", 0) + 1
        self.step()

    def wait(self, reason: str, seconds: float) -> None:
        self.waiting = reason
        self.start_timer("step", min(seconds, self.config.poll_s))

    def on_timer_step(self) -> None:
        self.step()

    def receiveMsg_NewRecords(self, msg: NewRecords, sender: Any) -> None:
        self.step()

    def on_timer_post(self) -> None:
        for channel in self.channels.values():
            if channel.post is not None and channel.post.done():
                self.on_answer(channel)
        if any(c.post is not None for c in self.channels.values()):
            self.start_timer("post", POST_POLL_S)
        self.step()

    def on_answer(self, channel: Channel) -> None:
        """A channel's POST is answered: judge it; acknowledged -> its watermark is queued
        for the journal."""
        assert channel.post is not None and channel.sending is not None
        assert self.uplink is not None
        post, send = channel.post, channel.sending
        channel.post = channel.sending = None
        result = post.result()  # the sink never raises for the network: anything else crashes
        self.counts["sent"] += 1
        self.counts["bytes_sent"] += result.sent_bytes
        outcome = self.uplink.on_result(send, result, time.monotonic())
        batch = outcome.batch
        if outcome.action in (ACKED, SPLIT):
            self.posted.discard(send.batch)
        if outcome.action == ACKED:
            self.last_ack_mono = time.monotonic()
            self.counts["acked"] += 1
            self.counts["synced_records"] += batch.count
            self.marks.append(AdvanceWatermark(batch.device_id, batch.lane,
                                               outcome.watermark or batch.seq_hi,
                                               random.SystemRandom().getrandbits(62)))
            return
        if outcome.action == SPLIT:
            self.counts["splits"] += 1
        else:
            self.counts["failures"] += 1
            if result.status is not None and result.status < 500 and result.status != 429:
                self.last_refusal_mono = time.monotonic()
        if outcome.reason != self.last_problem:
            log().warning("uplink: %s/%s %d..%d: %s (next try in %.1f s)", batch.device_id,
                          batch.lane, batch.seq_lo, batch.seq_hi, outcome.reason,
                          outcome.retry_after_s)
        self.last_problem = outcome.reason

    # ---- the journal's answers ------------------------------------------------------------
    def send_in_flight(self) -> None:
        journal = self.peers.get("journal")
        message = self.commit or self.watermark
        if journal is not None and message is not None:
            self.sent_at = time.monotonic()
            self.send(journal, message)

    def on_timer_resend(self) -> None:
        if self.journal_busy() and time.monotonic() - self.sent_at > RESEND_AFTER_S:
            self.send_in_flight()
        self.start_timer("resend", RESEND_AFTER_S)

    def on_peers_changed(self, names: set[str]) -> None:
        if "journal" in names:
            self.send_in_flight()  # the journal restarted: what was in flight may be lost

    def receiveMsg_ConsumerCommitted(self, msg: ConsumerCommitted, sender: Any) -> None:
        if self.commit is None or msg.request_id != self.commit.request_id:
            return  # a duplicate answer
        self.commit = None
        self.counts["state_commits"] += 1
        self.step()

    def receiveMsg_ConsumerCommitRefused(self, msg: ConsumerCommitRefused, sender: Any) -> None:
        if self.commit is None or msg.request_id != self.commit.request_id:
            return
        if msg.reason.startswith(TRANSIENT_REFUSALS):
            self.sent_at = time.monotonic()  # kept; resent after RESEND_AFTER_S
            return
        log().warning("uplink state commit refused (%s); planning again", msg.reason)
        self.commit = None
        self.step()

    def receiveMsg_WatermarkAdvanced(self, msg: WatermarkAdvanced, sender: Any) -> None:
        if self.watermark is None or msg.request_id != self.watermark.request_id:
            return
        self.watermark = None
        self.step()

    def receiveMsg_WatermarkRefused(self, msg: WatermarkRefused, sender: Any) -> None:
        if self.watermark is None or msg.request_id != self.watermark.request_id:
            return
        if msg.reason.startswith(TRANSIENT_REFUSALS):
            self.sent_at = time.monotonic()  # kept; resent after RESEND_AFTER_S
            return
        # Refused for good (a defect): drop it; the batch is resent and answered duplicate.
        log().error("uplink: the journal refused watermark %s/%s %d: %s", msg.device_id,
                    msg.lane, msg.seq, msg.reason)
        self.watermark = None
        self.step()

    # ---- stop -----------------------------------------------------------------------------
    def on_stop(self, msg: StopChild, sender: Any) -> None:
        # Nothing to flush: pending batches are in the journal. What is in flight (a POST, its
        # watermark) is finished first, so that after an orderly stop the journal's synced
        # records are exactly central's; should the supervisor's shutdown timeout cut it
        # short, the batch is resent after the next start and answered "duplicate".
        self.stopped = True
        self.stop_request = (sender, msg)
        self.finish_stop()

    def finish_stop(self) -> None:
        if self.stop_request is not None and not self.busy():
            requester, msg = self.stop_request
            self.stop_request = None
            self.reply_stopped(requester, msg, clean=True)

    def on_exit(self) -> None:
        if self.builder is not None:
            self.builder.shutdown(wait=False, cancel_futures=True)
        for channel in self.channels.values():
            channel.pool.shutdown(wait=False, cancel_futures=True)
            if channel.post is None:
                channel.sink.close()
        if self.model_step is None and self.updater is not None:
            self.updater.close()
        if self.reader is not None:
            self.reader.close()

    def figures(self) -> list[tuple[str, Any]]:
        pending = None
        if self.uplink is not None:
            pending = len(self.uplink.pending())
        return super().figures() + [
            ("mode", self.config.mode), ("link", current_link(self.config) or "none"),
            ("pending", pending), *self.counts.items(), ("waiting", self.waiting),
            ("last_problem", self.last_problem or "none"),
            ("last_ack_age_s", _age(self.last_ack_mono)),
            ("last_refusal_age_s", _age(self.last_refusal_mono))]


def _age(mono: float | None) -> float | None:
    """Seconds since monotonic time ``mono`` (None: never)."""
    return None if mono is None else round(time.monotonic() - mono, 1)
