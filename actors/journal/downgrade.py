"""Taking a journal back to the schema of an earlier release: the journal's side of a rollback.

Where this sits: outside the data path, in the rollback of a staged rollout (deploy/ROLLOUT.md).
A release migrates the journal forward on its first start, and the release before it refuses
a newer schema (`SchemaTooNew`). To roll back without losing a single acknowledged reading, the
NEW release's `fleetgw journal downgrade --to N` runs while no gateway writes (it takes the
writer lock, I3). It undoes the migrations above N in one transaction, keeping every record,
cursor and watermark, and the release of schema N then opens the journal as its own.
The next upgrade migrates it forward again.

Each step here is the exact inverse of a migration in schema.MIGRATIONS. Append one for every
new migration that can be undone. A migration that cannot be undone makes `downgrade` refuse,
naming the version, before it changes anything.
"""

from __future__ import annotations

import os

import apsw

from actors.journal.keys import JournalKeyError, KeyRing
from actors.journal.schema import (
    BUSY_TIMEOUT_MS,
    SCHEMA_VERSION,
    JournalError,
    NotAJournal,
    _identify,
    give_back_to_owner,
    retype_payload,
)

#: Sealed values opened and rewritten per statement batch (bounds memory, not the transaction).
CHUNK = 5000


def _open_all(conn: apsw.Connection, ring: KeyRing | None, table: str, row: str, key: str,
              value: str, what: str) -> int:
    """Rewrite every value of ``table`` sealed (column ``key`` not NULL) in clear, in chunks
    in the order of its primary key ``row``."""
    opened, last = 0, None
    while True:
        rows = conn.execute(
            f"SELECT {row}, {key}, {value} FROM {table} WHERE {key} IS NOT NULL "
            f"AND (?1 IS NULL OR {row} > ?1) ORDER BY {row} LIMIT ?2", (last, CHUNK)).fetchall()
        if not rows:
            return opened
        if ring is None:
            raise JournalKeyError(conn.filename, f"{conn.filename} holds sealed {what}: give "
                                  "the journal's key file (--key-file) to take it back to a "
                                  "schema that stores them in clear")
        clear = []
        for rowid, key_id, sealed in rows:
            plain = ring.open(key_id, sealed, f"{what} {rowid}")
            clear.append((plain if table == "quarantine" else plain.decode(), rowid))
        conn.executemany(f"UPDATE {table} SET {value} = ?, {key} = NULL WHERE {row} = ?", clear)
        opened += len(rows)
        last = rows[-1][0]


def _undo_v6(conn: apsw.Connection, ring: KeyRing | None) -> None:
    """v6 -> v5: every sealed payload, quarantined input and consumer state back in clear,
    then the key columns and the keys table dropped and payload TEXT again."""
    _open_all(conn, ring, "records", "pos", "key_id", "payload", "record at pos")
    _open_all(conn, ring, "quarantine", "id", "key_id", "raw", "quarantined input")
    _open_all(conn, ring, "cursors", "consumer", "state_key_id", "state", "the state of")
    (not_text,) = conn.execute(
        "SELECT count(*) FROM records WHERE typeof(payload) != 'text'").fetchone()
    if not_text:
        raise JournalError(conn.filename, f"{not_text} payloads are not text after opening "
                           "them: the journal is damaged (`fleetgw journal verify`)")
    conn.execute("""
        ALTER TABLE records DROP COLUMN key_id;
        ALTER TABLE quarantine DROP COLUMN key_id;
        ALTER TABLE cursors DROP COLUMN state_key_id;
        DROP TABLE keys;
    """)
    retype_payload(conn, "ANY", "TEXT")


#: Step v -> v - 1 for each schema version v that can be undone.
DOWNGRADES = {6: _undo_v6}


def downgrade(path: str, to_version: int, keyring: KeyRing | None) -> int:
    """Take the journal at ``path`` back to schema ``to_version`` in one transaction; return
    the version it had (unchanged when already at or below ``to_version``). Raises
    JournalError (a JournalKeyError when sealed data needs a key) with nothing changed."""
    from actors.journal.actor import take_writer_lock

    if not 1 <= to_version <= SCHEMA_VERSION:
        raise ValueError(f"--to must be a schema version in 1..{SCHEMA_VERSION} "
                         f"(got {to_version})")
    if not os.path.isfile(path):
        raise NotAJournal(path, "the file does not exist")
    lock = take_writer_lock(path)  # no gateway may write while it changes under it (I3)
    conn = apsw.Connection(path)
    try:
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
        found = _identify(conn, path)
        if found <= to_version:
            return found
        missing = [v for v in range(found, to_version, -1) if v not in DOWNGRADES]
        if missing:
            raise JournalError(path, f"schema v{missing[0]} of {path} cannot be taken back "
                               f"(no downgrade step): it stays at v{found}")
        conn.transaction_mode = "IMMEDIATE"
        try:
            with conn:
                for version in range(found, to_version, -1):
                    DOWNGRADES[version](conn, keyring)
                conn.pragma("user_version", to_version)
        except apsw.Error as exc:
            raise JournalError(path, f"taking {path} from schema v{found} back to "
                               f"v{to_version} failed ({exc}); it was left unchanged at "
                               f"v{found}") from exc
        problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise JournalError(path, f"{path} after the downgrade: {'; '.join(problems[:3])}")
        return found
    finally:
        conn.close()
        os.close(lock)
        give_back_to_owner(path)
