"""JournalWriter: the actor shell around `Journal`, the only writer of DATA_DIR/journal.db (I3).

Where this sits: sensors send `Append` and get `Appended` only after the commit (I1) or
`AppendRefused` (back-pressure: disk budget or a full disk); consumers send `ConsumerCommit`
(I4); the uplink sends `AdvanceWatermark`. After each commit the journal tells the consumers
among its peers `NewRecords` (they poll as well, so a lost notice costs only latency).
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

import apsw

from actors.base import SupervisedActor, latency_figures, log
from actors.journal.journal import Journal
from actors.journal.keys import keyring_from
from actors.journal.schema import SCHEMA_VERSION, JournalError
from messages.journal import (
    AdvanceWatermark,
    Append,
    Appended,
    AppendRefused,
    ConsumerCommit,
    ConsumerCommitRefused,
    ConsumerCommitted,
    NewRecords,
    ReadSourceMarks,
    SourceMarksRead,
    WatermarkAdvanced,
    WatermarkRefused,
)
from messages.supervision import StopChild

#: Peers that consume the journal and want NewRecords (later issues add them to the tree).
UPLINK = "uplink"
CONSUMER_PEERS = ("router", "model", UPLINK)
#: Commit latencies kept for the figures' p50/p99: the last COMMIT_WINDOW_S seconds, at most
#: COMMIT_SAMPLES commits.
COMMIT_WINDOW_S = 60.0
COMMIT_SAMPLES = 4096


def journal_path(data_dir: str) -> str:
    return os.path.join(data_dir, "journal.db")


class WriterLocked(JournalError):
    """Another process (a running gateway's journal) holds the journal's writer lock."""


def take_writer_lock(db_path: str) -> int:
    """An exclusive flock next to the journal, held for this writer's life: a second writer
    (I3) fails to start instead of writing. The kernel drops it when the process dies."""
    import fcntl

    fd = os.open(f"{db_path}.writer-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WriterLocked(
            db_path, f"another journal writer holds {db_path}: refusing to be a second writer "
            "(I3)") from None
    return fd


class JournalWriter(SupervisedActor):
    """Turns journal messages into `Journal` calls; replies only after the commit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.journal: Journal | None = None
        self.commits = 0
        self.records = 0
        self.refused = 0
        self.duplicates = 0
        self.last_commit_mono: float | None = None
        self.commit_times: deque[float] = deque(maxlen=4096)
        #: (monotonic end, seconds) of each commit: the whole call into `Journal`, transaction
        #: and fsync included (what an acknowledgement waits for).
        self.commit_seconds: deque[tuple[float, float]] = deque(maxlen=COMMIT_SAMPLES)

    def on_init(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        if self.settings.synchronous != "FULL":
            log().warning("journal synchronous=%s: a power cut may lose commits already "
                          "acknowledged (I1 holds across process crashes only)",
                          self.settings.synchronous)
        self.writer_lock = take_writer_lock(journal_path(self.data_dir))
        self.journal = Journal(
            journal_path(self.data_dir),
            synchronous=self.settings.synchronous,
            disk_budget_bytes=self.settings.disk_budget_bytes,
            refused_retry_s=self.settings.refused_retry_s,
            quarantine_max_rows=self.settings.quarantine_max_rows,
            keyring=keyring_from(self.journal_key_file),
        )
        found = self.journal.migrated_from
        if 0 < found < SCHEMA_VERSION:
            log().warning("journal %s migrated from schema v%d to v%d (generation %s kept); "
                          "a release older than this one can no longer open it",
                          self.journal.path, found, SCHEMA_VERSION, self.journal.generation())
        if self.journal.retired_key_ids:
            log().info("journal key ids %s are retired: no record needs them",
                       self.journal.retired_key_ids)

    def committed(self, count: int, started: float) -> None:
        """A commit of ``count`` records that began at monotonic ``started`` is done."""
        now = time.monotonic()
        self.commits += 1
        self.records += count
        self.last_commit_mono = now
        self.commit_times.append(now)
        self.commit_seconds.append((now, now - started))

    def notify_consumers(self, upto: Any, names: tuple[str, ...] = CONSUMER_PEERS) -> None:
        for name in names:
            address = self.peers.get(name)
            if address is not None:
                self.send(address, NewRecords(upto))

    def receiveMsg_Append(self, msg: Append, sender: Any) -> None:
        if self.journal is None:  # closed by an orderly stop: the sender keeps the batch
            self.send(sender, AppendRefused(msg.batch_id, "stopping", "the journal is stopping",
                                            self.settings.refused_retry_s))
            return
        started = time.monotonic()
        reply = self.journal.append(msg.batch_id, msg.batch, msg.resend_floor,
                                    msg.quarantined, msg.marks)
        if isinstance(reply, Appended):
            if reply.duplicate:
                self.duplicates += 1
            elif msg.batch is None:
                self.committed(0, started)
            else:
                self.committed(len(msg.batch), started)
                self.notify_consumers(reply.last)
        else:
            self.refused += 1
        self.send(sender, reply)

    def receiveMsg_ReadSourceMarks(self, msg: ReadSourceMarks, sender: Any) -> None:
        if self.journal is None:
            return  # stopping: the sensor asks again when the journal is back
        marks = self.journal.source_marks(msg.sensor_id)
        self.send(sender, SourceMarksRead(msg.sensor_id, tuple(sorted(marks.items()))))

    def receiveMsg_ConsumerCommit(self, msg: ConsumerCommit, sender: Any) -> None:
        if self.journal is None:
            self.send(sender, ConsumerCommitRefused(msg.consumer, msg.request_id, msg.expected,
                                                    "stopping: the journal is stopping"))
            return
        started = time.monotonic()
        reply = self.journal.commit_consumer(msg)
        if isinstance(reply, ConsumerCommitted) and not reply.duplicate:
            self.committed(len(msg.outputs) if msg.outputs is not None else 0, started)
            if msg.outputs is not None:
                self.notify_consumers(self.journal.last_position())
            elif msg.decisions is not None:  # newly routed records: the uplink may send them
                self.notify_consumers(self.journal.last_position(), (UPLINK,))
        self.send(sender, reply)

    def receiveMsg_AdvanceWatermark(self, msg: AdvanceWatermark, sender: Any) -> None:
        refused = None
        if self.journal is None:
            refused = "stopping: the journal is stopping"
        else:
            try:
                seq = self.journal.advance_watermark(msg.device_id, msg.lane, msg.seq)
            except ValueError as exc:  # bad request from the uplink: say so, do not crash
                refused = f"invalid: {exc}"
            except apsw.FullError as exc:
                refused = f"disk_full: {exc}"
        if refused is not None:
            log().warning("journal refused a watermark for %s/%s: %s", msg.device_id, msg.lane,
                          refused)
            self.send(sender, WatermarkRefused(msg.device_id, msg.lane, msg.seq, refused,
                                               msg.request_id))
            return
        self.send(sender, WatermarkAdvanced(msg.device_id, msg.lane, seq, msg.request_id))

    def figures(self) -> list[tuple[str, Any]]:
        now = time.monotonic()
        recent = [t for t in self.commit_times if now - t <= 5.0]
        figures: list[tuple[str, Any]] = [
            ("records", self.journal.last_position().value if self.journal else None),
            ("appended", self.records),
            ("commits", self.commits),
            ("commits_per_s", round(len(recent) / 5.0, 1)),
            ("last_commit_age_s",
             None if self.last_commit_mono is None else round(now - self.last_commit_mono, 2)),
            ("refused", self.refused),
            ("duplicates", self.duplicates),
        ]
        figures += latency_figures("commit", self.commit_seconds, now - COMMIT_WINDOW_S)
        if self.journal is not None:
            figures.append(("usage_bytes", self.journal.usage_bytes()))
        return figures

    def on_stop(self, msg: StopChild, sender: Any) -> None:
        self.close()
        self.reply_stopped(sender, msg, clean=True)

    def on_exit(self) -> None:
        self.close()

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if getattr(self, "writer_lock", None) is not None:
            os.close(self.writer_lock)
            self.writer_lock = None
