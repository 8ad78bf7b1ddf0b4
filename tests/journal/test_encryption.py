"""Encryption at rest (actors/journal/keys.py): what a stolen SD card holds, and the refusals
that keep a wrong or missing key from ever costing data.

The journal under test is real (apsw, SecretBox); the "other machine" is another directory with
its own key file, and `fleetgw run` is the real command refusing to start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from actors.journal import Journal, JournalKeyError, load_keyring, open_readonly
from actors.journal.keys import create_key_file, prepare_keyring, rotate_key_file
from messages.journal import (
    START,
    BatchId,
    ConsumerCommit,
    Position,
    QuarantinedInput,
)
from messages.readings import ReadingBatch, encode_values
from tests.journal import TS0
from tools.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
NOW = TS0 + 10**12
#: Values no ciphertext could contain by chance: found in the file means stored in clear.
SECRET_TEXT = "lat-51.477928-SECRET"
SECRET_RAW = b"RAW-INPUT-NEVER-IN-CLEAR"
SECRET_STATE = '{"window": "router-window-STATE-SECRET"}'


def batch(marker: str, n: int = 3, device: str = "veh-1") -> ReadingBatch:
    return ReadingBatch(
        sensor_id="gps0", device_ids=(device,) * n, ts=tuple(TS0 + i for i in range(n)),
        kinds=("gps",) * n,
        payloads=tuple(encode_values({"note": f"{marker}-{i}", "lat": 51.477928, "i": i})
                       for i in range(n)))


def open_journal(path: str, key_file: str | None) -> Journal:
    return Journal(path, synchronous="NORMAL", clock_ns=lambda: NOW,
                   keyring=load_keyring(key_file) if key_file else None)


def file_bytes(path: str) -> bytes:
    """The journal as a thief copies it: the database and its WAL."""
    return b"".join(Path(p).read_bytes() for p in (path, path + "-wal")
                    if os.path.exists(p))


def digest(path: str) -> str:
    return hashlib.sha256(file_bytes(path)).hexdigest()


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "journal.db")


@pytest.fixture
def key(tmp_path: Path) -> str:
    k = str(tmp_path / "journal.key")
    create_key_file(k)
    return k


def sealed_journal(path: str, key: str, batches: int = 1) -> None:
    with open_journal(path, key) as j:
        for b in range(batches):
            j.append(BatchId("gps0", 1, b + 1), batch(SECRET_TEXT + str(b)))


# ---- the key file -------------------------------------------------------------------------------


def test_a_new_key_file_is_0600_with_key_id_1_and_rotation_adds_the_next(tmp_path: Path) -> None:
    k = str(tmp_path / "k")
    ring = create_key_file(k)
    assert ring.ids == [1] and ring.active_id == 1
    assert os.stat(k).st_mode & 0o777 == 0o600
    first = ring.fingerprint(1)
    rotated = rotate_key_file(k)
    assert rotated.ids == [1, 2] and rotated.active_id == 2
    assert rotated.fingerprint(1) == first and rotated.fingerprint(2) != first
    assert os.stat(k).st_mode & 0o777 == 0o600
    with pytest.raises(JournalKeyError, match="already exists"):
        create_key_file(k)  # never overwrites a key


@pytest.mark.parametrize(("content", "mode", "expected"), [
    (None, 0o600, "does not exist"),
    ("1 " + "ab" * 32 + "\n", 0o644, r"accessible to group or others \(mode 0644\).*chmod 600"),
    ("1 " + "ab" * 31 + "\n", 0o600, "line 1 is not `<id> <64 hex digits>`"),
    ("# c\n1 " + "ab" * 32 + "\n1 " + "cd" * 32 + "\n", 0o600, "line 3: key id 1 appears twice"),
    ("0 " + "ab" * 32 + "\n", 0o600, "key id 0 is reserved"),
    ("# only a comment\n", 0o600, "holds no key"),
])
def test_a_bad_key_file_is_refused_with_why_and_never_its_content(
    tmp_path: Path, content: str | None, mode: int, expected: str
) -> None:
    k = tmp_path / "journal.key"
    if content is not None:
        k.write_text(content)
        k.chmod(mode)
    with pytest.raises(JournalKeyError, match=expected) as err:
        load_keyring(str(k))
    assert "ab" * 8 not in str(err.value) and "cd" * 8 not in str(err.value)


# ---- at rest --------------------------------------------------------------------------------------


def test_a_stolen_journal_holds_no_values_inputs_or_consumer_state(path: str, key: str) -> None:
    with open_journal(path, key) as j:
        j.append(BatchId("gps0", 1, 1), batch(SECRET_TEXT), 0,
                 (QuarantinedInput.of("nmea:udp", "bad checksum", SECRET_RAW, TS0),))
        assert j.commit_consumer(ConsumerCommit("router", 1, START, Position(3),
                                                state=SECRET_STATE)).cursor == Position(3)
        raw = file_bytes(path)  # while open: the WAL holds the commits
    for secret in (SECRET_TEXT.encode(), b"51.477928", SECRET_RAW, SECRET_STATE.encode()):
        assert secret not in raw and secret not in file_bytes(path)
    # With the key everything reads back exactly; the metadata the indexes need is in clear.
    with open_readonly(path, key) as reader:
        records = reader.read(START, 10)
        assert [r.values["note"] for r in records] == [f"{SECRET_TEXT}-{i}" for i in range(3)]
        assert reader.quarantined()[0].raw == SECRET_RAW
        assert reader.consumer_state("router") == (Position(3), SECRET_STATE)
    assert b"veh-1" in file_bytes(path)


def test_without_the_key_payloads_are_refused_but_stats_backlog_and_verify_work(
    path: str, key: str
) -> None:
    sealed_journal(path, key)
    with open_readonly(path) as reader:
        with pytest.raises(JournalKeyError, match="record veh-1/1 is sealed with key id 1"):
            reader.read(START, 10)
        assert reader.stats().records == 3
        assert reader.backlog()[0].records == 3  # unrouted
        report = reader.verify()
        assert report.ok and report.sealed_by_key == ((1, 3),) and report.payloads_opened == 0


def test_verify_with_the_key_authenticates_every_payload_and_finds_a_damaged_one(
    path: str, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sealed_journal(path, key)
    assert cli(["journal", "verify", "--db", path, "--key-file", key]) == 0
    assert "all 3 opened and authentic" in capsys.readouterr().out
    conn = apsw.Connection(path)  # one flipped bit on the card
    (sealed,) = conn.execute("SELECT payload FROM records WHERE seq = 2").fetchone()
    damaged = sealed[:30] + bytes([sealed[30] ^ 0x01]) + sealed[31:]
    conn.execute("UPDATE records SET payload = ? WHERE seq = 2", (damaged,))
    conn.close()
    assert cli(["journal", "verify", "--db", path]) == 0  # I2 holds; payloads not opened
    assert "not opened: give --key-file" in capsys.readouterr().out
    assert cli(["journal", "verify", "--db", path, "--key-file", key]) == 1
    out = capsys.readouterr().out
    assert "record veh-1/2 does not open with key id 1" in out and "damaged" in out


# ---- refusals -----------------------------------------------------------------------------------


def test_a_wrong_key_is_refused_before_anything_is_written(
    path: str, key: str, tmp_path: Path
) -> None:
    sealed_journal(path, key)
    other = str(tmp_path / "other.key")
    create_key_file(other)  # the same id 1, another key
    before = digest(path)
    with pytest.raises(JournalKeyError, match="key id 1 in .* is not the key .* was sealed with"):
        open_journal(path, other)
    with pytest.raises(JournalKeyError, match="copied from another gateway"):
        prepare_keyring(other, path)
    assert digest(path) == before
    with open_readonly(path, key) as reader:  # the right key still reads everything
        assert len(reader.read(START, 10)) == 3


def test_a_missing_key_is_refused_and_never_replaced_by_a_new_one(
    path: str, key: str, tmp_path: Path
) -> None:
    sealed_journal(path, key)
    os.rename(key, key + ".away")
    with pytest.raises(JournalKeyError, match="does not exist.*restore the key file"):
        prepare_keyring(key, path)
    assert not os.path.exists(key)  # no new key was made for a sealed journal
    with pytest.raises(JournalKeyError, match="no \\[journal\\] key_file is configured"):
        prepare_keyring("", path)
    with pytest.raises(JournalKeyError, match="no \\[journal\\] key_file is configured"):
        open_journal(path, None)  # never silently back to writing in clear


def test_a_new_journal_gets_its_key_file_made_on_first_start(tmp_path: Path) -> None:
    key = str(tmp_path / "keys" / "journal.key")
    os.makedirs(os.path.dirname(key))
    ring, line = prepare_keyring(key, str(tmp_path / "journal.db"))
    assert ring is not None and ring.ids == [1] and line.startswith("created ")
    assert os.stat(key).st_mode & 0o777 == 0o600
    ring2, line2 = prepare_keyring(key, str(tmp_path / "journal.db"))
    assert ring2 is not None and ring2.fingerprint(1) == ring.fingerprint(1)
    assert not line2.startswith("created")


def test_a_rotated_key_seals_new_records_and_history_stays_readable(
    path: str, key: str
) -> None:
    sealed_journal(path, key)
    rotate_key_file(key)
    with open_journal(path, key) as j:
        j.append(BatchId("gps0", 2, 1), batch("after-rotation", 2))
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    assert [k for (k,) in conn.execute("SELECT key_id FROM records ORDER BY pos")] == [
        1, 1, 1, 2, 2]
    conn.close()
    with open_readonly(path, key) as reader:
        notes = [r.values["note"] for r in reader.read(START, 10)]
        report = reader.verify()
    assert notes == [f"{SECRET_TEXT}0-{i}" for i in range(3)] + [
        "after-rotation-0", "after-rotation-1"]
    assert report.ok and report.sealed_by_key == ((1, 3), (2, 2)) and report.payloads_opened == 5
    # Key 1 still seals three records: dropping it from the file is refused.
    ring = load_keyring(key)
    Path(key).write_text(f"2 {ring._keys[2].hex()}\n")
    with pytest.raises(JournalKeyError, match="3 records .* sealed with key id 1"):
        open_journal(path, key)
    with pytest.raises(JournalKeyError, match="3 records .* sealed with key id 1"):
        prepare_keyring(key, path)


def test_a_key_that_only_a_consumer_state_still_needs_is_not_retired(
    path: str, key: str
) -> None:
    with open_journal(path, key) as j:  # the model runner's state, say: idle since
        assert j.commit_consumer(ConsumerCommit("idle", 1, START, START, state=SECRET_STATE)
                                 ).cursor == START
    ring = rotate_key_file(key)
    Path(key).write_text(f"2 {ring._keys[2].hex()}\n")
    with pytest.raises(JournalKeyError, match=r"1 records \(quarantined inputs and consumer "
                                              r"states counted\) .* sealed with key id 1"):
        open_journal(path, key)
    with open_readonly(path) as reader:
        assert reader.sealed_counts() == {1: 1}
        assert reader.verify().sealed_by_key == ((1, 1),)


def test_a_key_no_record_needs_can_be_retired(path: str, key: str) -> None:
    with open_journal(path, key):
        pass  # key 1 registered, nothing sealed with it
    ring = rotate_key_file(key)
    Path(key).write_text(f"2 {ring._keys[2].hex()}\n")
    with open_journal(path, key) as j:
        assert j.retired_key_ids == [1]
        j.append(BatchId("gps0", 1, 1), batch("x", 1))


def test_a_journal_in_clear_gains_encryption_and_keeps_its_old_records(
    path: str, key: str
) -> None:
    with open_journal(path, None) as j:
        j.append(BatchId("gps0", 1, 1), batch("clear", 2))
    with open_journal(path, key) as j:
        j.append(BatchId("gps0", 1, 2), batch("sealed", 2))
    with open_readonly(path, key) as reader:
        assert [r.values["note"] for r in reader.read(START, 10)] == [
            "clear-0", "clear-1", "sealed-0", "sealed-1"]
        assert reader.verify().sealed_by_key == ((1, 2),)
    assert b"clear-0" in file_bytes(path) and b"sealed-0" not in file_bytes(path)


# ---- `fleetgw run` on a journal copied to another machine ----------------------------------------

GATEWAY = """
[gateway]
device_id = "veh-1"
admin_port = {port}

[journal]
key_file = "{key}"

[model]
enabled = false

[metrics]
enabled = false

[[sensors]]
id = "gps0"
type = "sim"
kind = "gps"
rate_hz = 1
"""


def run_gateway(data_dir: Path, key: str, port: int) -> subprocess.CompletedProcess[str]:
    config = data_dir.parent / "gateway.toml"
    config.write_text(GATEWAY.format(port=port, key=key))
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", "run", "--config", str(config), "--data-dir",
         str(data_dir), "--duration", "30"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("second_machine_key", ["none", "its_own"])
def test_fleetgw_run_refuses_a_journal_copied_to_another_machine_without_its_key(
    tmp_path: Path, key: str, path: str, second_machine_key: str
) -> None:
    sealed_journal(path, key)
    other = tmp_path / "other-machine" / "data"
    other.mkdir(parents=True)
    shutil.copy(path, other / "journal.db")
    other_key = str(tmp_path / "other-machine" / "journal.key")
    if second_machine_key == "its_own":
        create_key_file(other_key)
    before = digest(str(other / "journal.db"))
    from tests.system.harness import free_port

    done = run_gateway(other, other_key, free_port())
    assert done.returncode == 2, done.stdout + done.stderr
    expected = ("restore the key file" if second_machine_key == "none"
                else "copied from another gateway")
    assert "refusing to start" in done.stderr and expected in done.stderr
    assert digest(str(other / "journal.db")) == before  # nothing written, nothing lost
    assert os.path.exists(other_key) == (second_machine_key == "its_own")
    # With the journal's own key it starts, and everything is still there.
    shutil.copy(key, other_key)
    with open_readonly(str(other / "journal.db"), other_key) as reader:
        assert len(reader.read(START, 10)) == 3


def test_bench_seal_prints_sealed_beside_clear_and_raw_apsw(
    capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    assert cli(["bench", "seal", "--records", "1200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sealed_appends_per_s"] > 0 and result["raw_apsw_rows_per_s"] > 0
    assert result["ratio_sealed_to_clear"] == pytest.approx(
        result["sealed_appends_per_s"] / result["clear_appends_per_s"], rel=0.01)
    # Sealing adds its nonce and MAC (40 bytes) to every record on disk, nothing more.
    extra = result["disk_bytes_per_record_sealed"] - result["disk_bytes_per_record_clear"]
    assert 30 <= extra <= 60
