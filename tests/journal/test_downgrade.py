"""`fleetgw journal downgrade` (actors/journal/downgrade.py): the journal's side of a rollback.

The previous release's journal is the real fixture it wrote (tests/fixtures/journal_v5.db). The
new release migrates it, seals new records, and is rolled back. After the downgrade the file
must be a v5 journal the way v5 wrote it (its tables and columns), with everything from both
releases in it in clear. A later re-upgrade must work again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import apsw
import pytest

from actors.journal import Journal, JournalKeyError, load_keyring, open_readonly
from actors.journal.actor import take_writer_lock
from actors.journal.downgrade import downgrade
from actors.journal.keys import create_key_file
from actors.journal.schema import SCHEMA_VERSION
from messages.journal import START, BatchId, ConsumerCommit, QuarantinedInput
from tests.journal import TS0
from tests.journal.test_encryption import batch
from tools.cli import main as cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "journal_v5.db"
STATE = '{"window": "downgraded-state"}'


def columns(path: str) -> dict[str, list[tuple]]:
    """Every table's columns (name, type, notnull, pk), the way a release sees its schema."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        tables = [n for (n,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
        return {t: [(r[1], r[2], r[3], r[5]) for r in conn.execute(f"PRAGMA table_info({t})")]
                for t in tables}
    finally:
        conn.close()


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def upgraded(tmp_path: Path) -> tuple[str, str, list[str]]:
    """The v5 fixture after the new release ran on it with a key: sealed records, a sealed
    quarantined input and a sealed consumer state on top of the v5 ones. Returns the journal,
    the key file, and every payload in position order as the new release reads them."""
    path, key = str(tmp_path / "journal.db"), str(tmp_path / "journal.key")
    shutil.copy(FIXTURE, path)
    create_key_file(key)
    with Journal(path, synchronous="NORMAL", keyring=load_keyring(key)) as j:
        j.append(BatchId("gps0", 1, 1), batch("new-release"), 0,
                 (QuarantinedInput.of("nmea:udp", "bad checksum", b"$GPGGA,bad*00", TS0),))
        cursor = j.cursor("rollback-test")
        assert j.commit_consumer(ConsumerCommit("rollback-test", 1, cursor, cursor,
                                                state=STATE)).cursor == cursor
    with open_readonly(path, key) as reader:
        payloads = [r.payload for r in reader.read(START, 10_000)]
    return path, key, payloads


def test_the_downgraded_journal_is_a_v5_journal_holding_everything_in_clear(
    upgraded: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    path, key, payloads = upgraded
    assert downgrade(path, 5, load_keyring(key)) == SCHEMA_VERSION
    pristine = str(tmp_path / "v5.db")
    shutil.copy(FIXTURE, pristine)
    assert columns(path) == columns(pristine)  # the schema v5 wrote, nothing more
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.pragma("user_version") == 5
        assert [p for (p,) in conn.execute("SELECT payload FROM records ORDER BY pos")] == payloads
        assert {t for (t,) in conn.execute("SELECT DISTINCT typeof(payload) FROM records")} == {
            "text"}
        assert conn.execute("SELECT raw FROM quarantine ORDER BY id DESC LIMIT 1").fetchone()[0] \
            == b"$GPGGA,bad*00"
        assert conn.execute("SELECT state FROM cursors WHERE consumer = 'rollback-test'"
                            ).fetchone()[0] == STATE
        assert [r[0] for r in conn.execute("PRAGMA integrity_check")] == ["ok"]
    finally:
        conn.close()
    assert json.loads(payloads[-1])["note"] == "new-release-2"


def test_after_a_downgrade_the_next_upgrade_migrates_again_and_nothing_is_lost(
    upgraded: tuple[str, str, list[str]]
) -> None:
    path, key, payloads = upgraded
    downgrade(path, 5, load_keyring(key))
    with Journal(path, synchronous="NORMAL", keyring=load_keyring(key)) as j:
        assert j.migrated_from == 5
        assert j.verify().ok
        new = j.append(BatchId("gps0", 2, 1), batch("re-upgraded", 1))
        assert new.ranges[0].seq_lo == 4  # veh-1's seqs go on after the three of gps0
    with open_readonly(path, key) as reader:
        assert [r.payload for r in reader.read(START, 10_000)][:-1] == payloads


def test_a_downgrade_needs_the_key_and_changes_nothing_without_it(
    upgraded: tuple[str, str, list[str]]
) -> None:
    path, _, _ = upgraded
    before = digest(path)
    with pytest.raises(JournalKeyError, match="give the journal's key file"):
        downgrade(path, 5, None)
    assert digest(path) == before


def test_the_cli_refuses_while_a_gateway_holds_the_journal_then_takes_it_back(
    upgraded: tuple[str, str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, key, _ = upgraded
    lock = take_writer_lock(path)  # what the running journal actor holds
    try:
        assert cli(["journal", "downgrade", "--db", path, "--to", "5", "--key-file", key]) == 2
        assert "another journal writer holds" in capsys.readouterr().err
    finally:
        os.close(lock)
    assert cli(["journal", "downgrade", "--db", path, "--to", "5", "--key-file", key]) == 0
    assert f"from schema v{SCHEMA_VERSION} back to v5" in capsys.readouterr().out
    assert cli(["journal", "downgrade", "--db", path, "--to", "5"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli(["journal", "downgrade", "--db", path, "--to", "0"]) == 2
    assert cli(["journal", "downgrade", "--db", path, "--to", "4"]) == 1  # no step v5 -> v4
    assert "cannot be taken back" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="only root makes files for another user")
def test_root_inspecting_or_downgrading_leaves_the_journal_files_to_their_owner(
    upgraded: tuple[str, str, list[str]]
) -> None:
    path, key, _ = upgraded
    for name in (path, path + "-wal", path + "-shm", path + ".writer-lock"):
        if os.path.exists(name):
            os.chown(name, 65534, 65534)  # the gateway's user owns its journal
            if name != path:
                os.unlink(name)
    with open_readonly(path):  # `sudo fleetgw journal stats` on a stopped gateway
        pass
    downgrade(path, 5, load_keyring(key))
    made = [p for p in (path + "-wal", path + "-shm", path + ".writer-lock")
            if os.path.exists(p)]
    assert made  # SQLite and the lock did make files beside it ...
    assert {(os.stat(p).st_uid, os.stat(p).st_gid) for p in made} == {(65534, 65534)}
