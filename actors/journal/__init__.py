"""The journal: the durable, single-writer SQLite log every reading passes through first.

Where this sits on the data path (DESIGN.md, "The data path: journal first"): sensors append
batches and are acknowledged only after the commit (I1); each reading gets the next per-device
seq, gapless across crashes, under a generation id made when the journal was created (I2);
only `Journal` writes journal.db (I3); consumers — router, model runner, uplink lanes — read
with their own read-only `JournalReader` and commit outputs and cursor together (I4); appends
beyond the disk budget are refused, not raised, and never cost committed data (I7).

- `journal`: `Journal`, the writer (the journal actor wraps it)
- `reader`: `JournalReader`, `Record`, stats and verify (also used by `fleetgw journal`)
- `schema`: tables, versioned migrations, the errors of opening a journal
- `keys`: encryption at rest — the key ring, sealing payloads, checking a ring against a journal
"""

from actors.journal.journal import Journal
from actors.journal.keys import JournalKeyError, KeyRing, load_keyring
from actors.journal.reader import (
    JournalReader,
    JournalStats,
    Record,
    VerifyReport,
    open_readonly,
)
from actors.journal.schema import (
    JournalError,
    JournalNotFound,
    NotAJournal,
    SchemaTooNew,
    SchemaTooOld,
)

__all__ = [
    "Journal",
    "JournalError",
    "JournalKeyError",
    "JournalNotFound",
    "JournalReader",
    "JournalStats",
    "KeyRing",
    "NotAJournal",
    "Record",
    "SchemaTooNew",
    "SchemaTooOld",
    "VerifyReport",
    "load_keyring",
    "open_readonly",
]
