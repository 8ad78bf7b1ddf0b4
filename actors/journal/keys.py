"""Encryption at rest: the journal's key ring, sealing payloads, and checking a ring against a
journal.

Where this sits on the data path: step 2. `Journal` seals every new record's payload (and every
quarantined input's raw bytes) with the ring's active key before the INSERT, and stores the key
id beside it (``records.key_id``; NULL: in clear, written before encryption was configured);
readers open payloads with the key of that id. So a stolen SD card yields device ids, kinds and
timestamps (the journal's indexes need them) but no reading's values.

The key file (``[journal] key_file``, mode 0600) holds one key per line, ``<id> <64 hex>``; the
highest id seals new records, lower ids stay to open older ones. Rotation appends a new id
(`rotate_key_file`): history stays readable, new records use the new key. The journal keeps
each id's fingerprint (``keys`` table, a one-way hash: never the key) so a wrong key is refused
before anything is written, and a key that records still need can never silently go missing.

Sealing is NaCl's SecretBox (XSalsa20-Poly1305): ``nonce (24 random bytes) || box``, the
format ``nacl.secret.SecretBox.decrypt`` reads. A damaged or swapped ciphertext fails its MAC.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Sequence

import apsw
import nacl.bindings
import nacl.exceptions

from actors.journal.schema import JournalError

KEY_BYTES = nacl.bindings.crypto_secretbox_KEYBYTES
NONCE_BYTES = nacl.bindings.crypto_secretbox_NONCEBYTES
#: What sealing adds to each payload: the nonce and the MAC.
SEAL_OVERHEAD_BYTES = NONCE_BYTES + nacl.bindings.crypto_secretbox_MACBYTES
_LINE_RE = re.compile(r"^\s*(\d{1,9})\s+([0-9a-fA-F]{64})\s*$")
_HEADER = (
    "# fleetgw journal key ring. Keep it 0600, owned by the gateway's user, and never on the\n"
    "# same unencrypted medium as the journal if you can help it (see deploy/SECURITY.md).\n"
    "# One key per line: <id> <64 hex digits>. New records are sealed with the highest id;\n"
    "# lower ids open older records. Rotate with `fleetgw journal key rotate`.\n"
)


class JournalKeyError(JournalError):
    """The key ring and the journal do not fit (missing, wrong or unreadable key): the
    gateway refuses to start rather than write records nobody could read."""


def fingerprint(key: bytes) -> str:
    """A one-way, printable name of ``key`` (32 hex digits): safe in logs and in the journal."""
    return hashlib.blake2b(key, digest_size=16, person=b"fleetgw-jkey-fp1").hexdigest()


class KeyRing:
    """The keys of one key file: ``keys`` by id; new records are sealed with ``active_id``."""

    def __init__(self, keys: dict[int, bytes], path: str = "") -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        if any(len(k) != KEY_BYTES for k in keys.values()):
            raise ValueError(f"keys must be {KEY_BYTES} bytes")
        self._keys = dict(keys)
        self.path = path
        self.active_id = max(keys)
        self._active = keys[self.active_id]

    def __repr__(self) -> str:  # never the key material
        return f"KeyRing({self.path!r}, ids={sorted(self._keys)}, active={self.active_id})"

    @property
    def ids(self) -> list[int]:
        return sorted(self._keys)

    def fingerprint(self, key_id: int) -> str:
        return fingerprint(self._keys[key_id])

    def seal(self, plaintexts: Sequence[bytes]) -> list[bytes]:
        """``plaintexts`` sealed with the active key, each under its own random nonce."""
        nonces = os.urandom(NONCE_BYTES * len(plaintexts))
        # The _easy form writes MAC || ciphertext straight away (crypto_secretbox pads with
        # zero bytes and strips them again: ~40% slower here for the same output).
        box, key = nacl.bindings.crypto_secretbox_easy, self._active
        out = []
        for i, text in enumerate(plaintexts):
            nonce = nonces[i * NONCE_BYTES:(i + 1) * NONCE_BYTES]
            out.append(nonce + box(text, nonce, key))
        return out

    def seal_texts(self, texts: Sequence[str]) -> list[bytes]:
        return self.seal([t.encode() for t in texts])

    def open(self, key_id: int, sealed: bytes, what: str) -> bytes:
        """The plaintext of ``sealed`` (sealed with key ``key_id``); ``what`` names it in the
        error (e.g. "record veh-1/42")."""
        key = self._keys.get(key_id)
        if key is None:
            raise JournalKeyError(self.path, f"{what} is sealed with key id {key_id}, which key "
                                  f"file {self.path} does not hold (ids {self.ids})")
        try:
            return nacl.bindings.crypto_secretbox_open_easy(
                sealed[NONCE_BYTES:], sealed[:NONCE_BYTES], key)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise JournalKeyError(self.path, f"{what} does not open with key id {key_id} of "
                                  f"{self.path}: the record is damaged or was altered") from None


def _problem_with_mode(path: str, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"journal key file {path} is not a regular file"
    if st.st_mode & 0o077:
        return (f"journal key file {path} is accessible to group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}`")
    return None


def load_keyring(path: str) -> KeyRing:
    """The key ring in ``path``. Raises JournalKeyError saying what is wrong (missing, too
    open, unparseable line N, duplicate id) without ever quoting key material."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise JournalKeyError(path, f"journal key file {path} does not exist") from None
    except OSError as exc:
        raise JournalKeyError(path, f"journal key file {path} cannot be read: "
                              f"{exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        problem = _problem_with_mode(path, os.fstat(fd))
        if problem:
            raise JournalKeyError(path, problem)
        data = fh.read(1 << 16)
    keys: dict[int, bytes] = {}
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise JournalKeyError(path, f"journal key file {path} is not a key file (not ASCII "
                              "text; expected lines `<id> <64 hex digits>`)") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE_RE.match(line)
        if m is None:  # never echo the line: it may hold key material
            raise JournalKeyError(path, f"journal key file {path} line {n} is not `<id> <64 "
                                  "hex digits>`")
        key_id = int(m.group(1))
        if key_id == 0 or key_id in keys:
            raise JournalKeyError(path, f"journal key file {path} line {n}: key id {key_id} "
                                  + ("is reserved (ids start at 1)" if key_id == 0
                                     else "appears twice"))
        keys[key_id] = bytes.fromhex(m.group(2))
    if not keys:
        raise JournalKeyError(path, f"journal key file {path} holds no key")
    return KeyRing(keys, path)


def _write_key_file(path: str, keys: dict[int, bytes], exclusive: bool) -> None:
    """Write ``keys`` to ``path`` atomically, mode 0600 from the start, synced to disk."""
    directory = os.path.dirname(os.path.abspath(path))
    body = _HEADER + "".join(f"{i} {keys[i].hex()}\n" for i in sorted(keys))
    fd, tmp = tempfile.mkstemp(prefix=".journal-key-", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if path exists: never overwrite a key
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_key_file(path: str) -> KeyRing:
    """A new key file at ``path`` with key id 1. Refuses to replace an existing file."""
    if os.path.lexists(path):
        raise JournalKeyError(path, f"journal key file {path} already exists; use `fleetgw "
                              "journal key rotate` to add a key")
    try:
        _write_key_file(path, {1: os.urandom(KEY_BYTES)}, exclusive=True)
    except FileExistsError:
        raise JournalKeyError(path, f"journal key file {path} already exists") from None
    except OSError as exc:
        raise JournalKeyError(path, f"cannot create journal key file {path}: "
                              f"{exc.strerror}") from None
    return load_keyring(path)


def rotate_key_file(path: str) -> KeyRing:
    """Add a new key (the next id) to ``path``; it seals records from the gateway's next start,
    and the older keys stay to open older records."""
    ring = load_keyring(path)
    keys = {i: ring._keys[i] for i in ring.ids}
    keys[ring.active_id + 1] = os.urandom(KEY_BYTES)
    try:
        _write_key_file(path, keys, exclusive=False)
    except OSError as exc:
        raise JournalKeyError(path, f"cannot rewrite journal key file {path}: "
                              f"{exc.strerror}") from None
    return load_keyring(path)


# ---- a key ring against a journal --------------------------------------------------------------

def _journal_keys(conn: apsw.Connection) -> dict[int, str]:
    """The key ids the journal on ``conn`` has sealed with, and their fingerprints ({} for a
    journal of a schema before encryption)."""
    has = conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'keys'").fetchone()
    if not has:
        return {}
    return dict(conn.execute("SELECT key_id, fingerprint FROM keys"))


#: Where sealed values live: (table, its key id column).
SEALED_COLUMNS = (("records", "key_id"), ("quarantine", "key_id"), ("cursors", "state_key_id"))


def sealed_counts(conn: apsw.Connection) -> dict[int, int]:
    """Key id -> records, quarantined inputs and consumer states sealed with it (a scan of
    each table: for verify, `key show`, and a key the ring lacks)."""
    counts: dict[int, int] = {}
    for table, column in SEALED_COLUMNS:
        for key_id, n in conn.execute(f"SELECT {column}, count(*) FROM {table} "
                                      f"WHERE {column} IS NOT NULL GROUP BY {column}"):
            counts[key_id] = counts.get(key_id, 0) + n
    return counts


def check_keyring(conn: apsw.Connection, path: str, ring: KeyRing | None) -> list[int]:
    """Check that ``ring`` opens everything the journal on ``conn`` sealed; return the ids the
    journal used that the ring no longer holds and no record needs (retired keys).

    Raises JournalKeyError when a key id's fingerprint differs (wrong key: another gateway's,
    or a replaced file), when a key that records still need is missing, or when the journal
    holds sealed data and no key ring is configured."""
    used = _journal_keys(conn)
    if not used:
        return []
    ids = ", ".join(str(i) for i in sorted(used))
    if ring is None:
        raise JournalKeyError(
            path, f"{path} holds payloads sealed with key id(s) {ids}, but no [journal] "
            "key_file is configured: set it to the key file that belongs to this journal "
            "(a sealed journal never goes back to writing in clear)")
    retired = []
    # A scan, so only when the ring lacks a key the journal used.
    needed = sealed_counts(conn) if any(k not in ring.ids for k in used) else {}
    for key_id, fp in sorted(used.items()):
        if key_id in ring.ids:
            if ring.fingerprint(key_id) != fp:
                raise JournalKeyError(
                    path, f"key id {key_id} in {ring.path} (fingerprint "
                    f"{ring.fingerprint(key_id)[:16]}) is not the key {path} was sealed with "
                    f"(fingerprint {fp[:16]}): the journal was copied from another gateway or "
                    "the key file was replaced; restore the key file that belongs to this "
                    "journal")
        elif (n := needed.get(key_id, 0)):
            raise JournalKeyError(
                path, f"{n} records (quarantined inputs and consumer states counted) of "
                f"{path} are sealed with key id {key_id} (fingerprint "
                f"{fp[:16]}), which {ring.path} no longer holds: put that key back (keys are "
                "retired only once no record needs them; `fleetgw journal verify` counts them)")
        else:
            retired.append(key_id)
    return retired


def register_active_key(conn: apsw.Connection, ring: KeyRing, now_ns: int) -> None:
    """Record the ring's active key (id and fingerprint) before the first record it seals.
    Call after `check_keyring`, on the writer's connection. Writes only for a key the journal
    has not seen, so a restart on a full disk opens as before."""
    if ring.active_id in _journal_keys(conn):
        return
    with conn:
        conn.execute("INSERT INTO keys(key_id, fingerprint, added_ns) VALUES (?, ?, ?)",
                     (ring.active_id, ring.fingerprint(ring.active_id), now_ns))


def prepare_keyring(key_file: str, journal: str) -> tuple[KeyRing | None, str]:
    """What `fleetgw run` does before the actors start: load the key ring of ``key_file``
    ("" = none), creating it when missing and ``journal`` has nothing sealed, and check it
    against ``journal`` if that exists. Returns the ring and a line for the log. Raises
    JournalKeyError (the gateway refuses to start)."""
    used: dict[int, str] = {}
    if os.path.exists(journal):
        conn = apsw.Connection(journal, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            try:
                used = _journal_keys(conn)
            except apsw.Error:  # not a journal: the journal refuses it, with its own words
                return keyring_from(key_file) if key_file else None, "journal unreadable"
            if not key_file:
                check_keyring(conn, journal, None)
                return None, ("journal payloads are stored in clear: set [journal] key_file "
                              "to seal them (deploy/SECURITY.md)")
            if not os.path.lexists(key_file) and used:
                raise JournalKeyError(
                    journal, f"journal key file {key_file} does not exist, and {journal} "
                    f"holds payloads sealed with key id(s) "
                    f"{', '.join(map(str, sorted(used)))}: restore the key file that belongs "
                    "to this journal (a journal copied from another gateway needs that "
                    "gateway's key file); without it they cannot be read")
            ring, created = _load_or_create(key_file)
            check_keyring(conn, journal, ring)
        finally:
            conn.close()
    elif not key_file:
        return None, ("journal payloads are stored in clear: set [journal] key_file to seal "
                      "them (deploy/SECURITY.md)")
    else:
        ring, created = _load_or_create(key_file)
    line = (f"journal payloads sealed with key id {ring.active_id} "
            f"(fingerprint {ring.fingerprint(ring.active_id)[:16]}) of {key_file}")
    return ring, ("created " + line if created else line)


def keyring_from(key_file: str) -> KeyRing | None:
    """The ring of ``key_file`` ("" = None: payloads in clear), as actors load it."""
    return load_keyring(key_file) if key_file else None


def _load_or_create(path: str) -> tuple[KeyRing, bool]:
    if os.path.lexists(path):
        return load_keyring(path), False
    return create_key_file(path), True
