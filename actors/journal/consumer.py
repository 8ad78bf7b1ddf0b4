"""The shell every journal consumer shares: read after the cursor, commit outputs with it.

Where this sits on the data path: step 3. The router and the model runner (and later the
uplink lanes) subclass `ConsumerActor`: it opens the journal read-only, restores the durable
cursor and the consumer's state, reads records after the cursor on `NewRecords` and on a poll
timer, asks the subclass to turn them into ONE `ConsumerCommit` (outputs + new cursor + state),
and keeps that commit in flight until the journal answers — resent unchanged (same request
id: the journal answers a duplicate) after `RESEND_AFTER_S` or a journal restart. A refused
commit whose cursor is not the journal's restores cursor and state from the journal. An
orderly stop waits for the commit in flight. So after any crash the consumer continues exactly
at its committed cursor (I4): nothing skipped, nothing done twice.
"""

from __future__ import annotations

import random
import time
from typing import Any

from actors.base import SupervisedActor, log
from actors.journal.actor import journal_path
from actors.journal.keys import keyring_from
from actors.journal.reader import JournalReader, Record
from actors.journal.schema import JournalError
from messages.journal import (
    ConsumerCommit,
    ConsumerCommitRefused,
    ConsumerCommitted,
    NewRecords,
    Position,
)
from messages.supervision import StopChild

#: Resend an unanswered commit after this long (seconds).
RESEND_AFTER_S = 5.0
#: Refusals that mean "not now" (the commit is kept and resent), not "wrong cursor".
TRANSIENT_REFUSALS = ("disk_budget", "disk_full", "stopping")


class ConsumerActor(SupervisedActor):
    """A journal consumer. Subclasses set `CONSUMER` and implement `restore_state`,
    `build_commit` and (optionally) `on_committed`, `on_poll`. Their settings need
    ``batch_records`` and ``poll_s``."""

    #: The consumer's name in the journal's cursor table.
    CONSUMER = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reader: JournalReader | None = None
        self.cursor = Position(0)
        self.in_flight: ConsumerCommit | None = None
        self.sent_at = 0.0
        self.stop_request: tuple[Any, StopChild] | None = None
        self.stopped = False
        self.commits = 0

    def on_init(self) -> None:
        self.start_timer("poll", self.settings.poll_s)

    # ---- subclass hooks -----------------------------------------------------------------
    def restore_state(self, state: str | None) -> None:
        """Rebuild the logic object from the state committed with the cursor (None: never
        committed)."""
        raise NotImplementedError

    def build_commit(self, records: list[Record]) -> ConsumerCommit:
        """ONE commit for ``records`` (read after the cursor); use `new_commit`."""
        raise NotImplementedError

    def on_committed(self, commit: ConsumerCommit, msg: ConsumerCommitted) -> None:
        """``commit`` is durable (count what it did)."""

    def on_poll(self) -> None:
        """Called on every poll tick, after reading."""

    # ---- reading ------------------------------------------------------------------------
    def open_reader(self) -> bool:
        """Open the journal read-only and restore cursor + state (the journal may still be
        creating the file: then try again at the next poll)."""
        if self.reader is not None:
            return True
        keyring = keyring_from(self.journal_key_file)  # a bad key file crashes: not a retry
        try:
            self.reader = JournalReader(journal_path(self.data_dir), keyring)
        except JournalError:
            return False
        self.restore()
        return True

    def restore(self) -> None:
        assert self.reader is not None
        self.cursor, state = self.reader.consumer_state(self.CONSUMER)
        self.restore_state(state)
        log().info("%s resumes at %s", self.CONSUMER, self.cursor)

    def on_timer_poll(self) -> None:
        if self.in_flight is not None and time.monotonic() - self.sent_at > RESEND_AFTER_S:
            self.send_commit()
        self.work()
        self.on_poll()
        self.start_timer("poll", self.settings.poll_s)

    def receiveMsg_NewRecords(self, msg: NewRecords, sender: Any) -> None:
        self.work()

    def work(self) -> None:
        if self.stop_request is not None and self.in_flight is None:
            self.finish_stop()
        if self.in_flight is not None or self.stopped or not self.open_reader():
            return
        assert self.reader is not None
        records = self.reader.read(self.cursor, self.settings.batch_records)
        if not records:
            return
        if (len(records) < self.settings.batch_records
                and time.monotonic() - self.sent_at < self.settings.poll_s):
            # Each commit is a durable journal transaction on the acknowledgement path:
            # commit a full batch at once, a partial one at most once per poll interval.
            return
        self.in_flight = self.build_commit(records)
        self.send_commit()

    def new_commit(self, new: Position, **fields: Any) -> ConsumerCommit:
        """A commit moving the cursor from where it is to ``new`` with ``fields``."""
        return ConsumerCommit(consumer=self.CONSUMER,
                              request_id=random.SystemRandom().getrandbits(62),
                              expected=self.cursor, new=new, **fields)

    def send_commit(self) -> None:
        journal = self.peers.get("journal")
        if journal is not None and self.in_flight is not None:
            self.sent_at = time.monotonic()
            self.send(journal, self.in_flight)

    # ---- the journal's answers ----------------------------------------------------------
    def receiveMsg_ConsumerCommitted(self, msg: ConsumerCommitted, sender: Any) -> None:
        commit = self.in_flight
        if commit is None or msg.request_id != commit.request_id:
            return  # a duplicate answer to an earlier commit
        self.in_flight = None
        self.cursor = commit.new
        self.commits += 1
        self.on_committed(commit, msg)
        self.work()  # more backlog?

    def receiveMsg_ConsumerCommitRefused(self, msg: ConsumerCommitRefused, sender: Any) -> None:
        if self.in_flight is None or msg.request_id != self.in_flight.request_id:
            return
        if msg.reason.startswith(TRANSIENT_REFUSALS):
            if self.stop_request is not None:
                # Stopping, and the journal cannot take it now (a full disk): drop it rather
                # than hold the stop. Nothing is lost: outputs and cursor commit together
                # (I4), so the next start redoes this work from the durable cursor.
                self.in_flight = None
                self.finish_stop()
                return
            self.sent_at = time.monotonic()  # keep it; resent after RESEND_AFTER_S
            return
        # Our cursor is not the journal's: the in-memory state is ahead of what is durable.
        log().warning("%s commit refused (%s); restoring from the journal", self.CONSUMER,
                      msg.reason)
        self.in_flight = None
        self.restore()

    def on_peers_changed(self, names: set[str]) -> None:
        if "journal" in names:
            self.send_commit()  # the journal restarted: the commit in flight may be lost

    # ---- stop ---------------------------------------------------------------------------
    def on_stop(self, msg: StopChild, sender: Any) -> None:
        # Open state needs no flush: it is committed with the cursor and continues after the
        # next start. Only the commit in flight must land first.
        self.stop_request = (sender, msg)
        if self.in_flight is None:
            self.finish_stop()

    def finish_stop(self) -> None:
        assert self.stop_request is not None
        requester, msg = self.stop_request
        self.stop_request = None
        self.stopped = True
        self.reply_stopped(requester, msg, clean=True)

    def on_exit(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def figures(self) -> list[tuple[str, Any]]:
        backlog = None
        if self.reader is not None:
            backlog = self.reader.last_position().value - self.cursor.value
        return super().figures() + [("commits", self.commits), ("cursor", self.cursor.value),
                                    ("backlog", backlog)]
