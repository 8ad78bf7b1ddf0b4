"""Upgrades: a journal written by an earlier fleetgw opens, migrates and carries on under this one.

The fixtures (tests/fixtures/journal_vN.db) were written by the code of earlier commits, through
that code's own API (tests/fixtures/make_journal_fixture.py; tests/fixtures/README.md names the
commits): a short drive with routed lanes, evictions, consumer cursors with state, watermarks,
a pending uplink batch, quarantine and source marks (v5). Each comes with
journal_vN.expected.json: everything it held as the old code read it back.

Here the CURRENT writer opens a copy (whatever `SCHEMA_VERSION` is now) and everything must
still be there, read through the current reader: records byte for byte, counters, cursors and
their states, watermarks, evicted runs, drops, batch ids, quarantine; verify finds nothing;
appends continue each device's seqs. Before the migration a read-only open refuses
(SchemaTooOld) without touching the file, and a migration that fails on a full disk leaves the
journal at its version. Last, a real `fleetgw run` on the previous schema's fixture migrates it,
keeps journaling after the old last seq and syncs the old unsynced records to a real receiver.

When the schema moves on to vN+1, add a journal_vN fixture (the README says how):
`test_the_previous_schema_has_a_fixture` fails until there is one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
from pathlib import Path

import apsw
import pytest

from actors.journal import Journal, JournalError, JournalReader, SchemaTooOld
from actors.journal.schema import SCHEMA_VERSION
from messages.journal import START, BatchId, Position, SeqRange
from messages.readings import Reading, ReadingBatch, decode_values
from tools.journal_cmd import EXIT_NO_JOURNAL, EXIT_OK, stats_command, verify_command

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures"
POLICY = FIXTURE_DIR / "journal_policy.toml"


def version_of(fixture: Path) -> int:
    return int(re.fullmatch(r"journal_v(\d+)\.db", fixture.name).group(1))


FIXTURES = sorted(FIXTURE_DIR.glob("journal_v*.db"), key=version_of)
#: Fixtures of a schema older than this code's: opening them migrates.
OLDER = [f for f in FIXTURES if version_of(f) < SCHEMA_VERSION]
#: The previous schema's fixture: what the release before this one left on disk.
PREVIOUS = next((f for f in FIXTURES if version_of(f) == SCHEMA_VERSION - 1), None)


def fixture_id(fixture: Path) -> str:
    return fixture.stem


@functools.cache
def expected(fixture: Path) -> dict:
    return json.loads(fixture.with_name(fixture.stem + ".expected.json").read_text())


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def copy_fixture(fixture: Path, directory: Path, journal_mode: str = "wal") -> str:
    """A copy of ``fixture`` as DIRECTORY/journal.db. The fixtures are in WAL mode, as a
    stopped gateway leaves its journal; "delete" turns the copy's header to rollback mode
    (the header only: its schema version and rows stay the old code's)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = str(directory / "journal.db")
    shutil.copyfile(fixture, path)
    if journal_mode != "wal":
        conn = apsw.Connection(path)
        try:
            assert conn.pragma("journal_mode", journal_mode) == journal_mode
        finally:
            conn.close()
    return path


def raw_rows(path: str, sql: str) -> list[list]:
    """Rows straight from the file (no journal code in between)."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [list(row) for row in conn.execute(sql)]
    finally:
        conn.close()


def user_version(path: str) -> int:
    return raw_rows(path, "PRAGMA user_version")[0][0]


def record_rows(reader: JournalReader, limit: int = 1_000_000) -> list[list]:
    return [[r.pos.value, r.device_id, r.seq, r.sensor_id, r.ts, r.kind, r.payload]
            for r in reader.read(START, limit)]


def shaped_like(new, old):
    """``new`` cut to the keys ``old`` has, at every level of nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: shaped_like(new[k], v) if k in new else None for k, v in old.items()}
    return new


def make_keyring(directory: Path):
    """A new journal key ring when this fleetgw seals payloads (None before that)."""
    if "keyring" not in inspect.signature(Journal).parameters:
        return None
    from actors.journal.keys import create_key_file

    return create_key_file(str(directory / "journal.key"))


def test_the_previous_schema_has_a_fixture():
    """An upgrade from the release before must always be tested: a new schema version needs
    a fixture of the one before it, written by the code of that version."""
    assert PREVIOUS is not None, (
        f"no tests/fixtures/journal_v{SCHEMA_VERSION - 1}.db: write one with the last commit "
        f"of schema v{SCHEMA_VERSION - 1} (tests/fixtures/README.md)")
    for fixture in FIXTURES:
        assert version_of(fixture) <= SCHEMA_VERSION, f"{fixture.name} is newer than this code"
        # From the header (user_version at offset 60): opening the fixture in place with
        # SQLite would leave -wal and -shm files beside it in the source tree.
        header = fixture.read_bytes()[:100]
        assert int.from_bytes(header[60:64], "big") == expected(fixture)["schema_version"] \
            == version_of(fixture)
        assert fixture.stat().st_size < 300_000
        assert not Path(f"{fixture}-wal").exists() and not Path(f"{fixture}-shm").exists()


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
@pytest.mark.parametrize("fixture", FIXTURES, ids=fixture_id)
def test_an_old_journal_migrates_and_keeps_everything(fixture, journal_mode, tmp_path, capsys):
    exp = expected(fixture)
    path = copy_fixture(fixture, tmp_path, journal_mode)
    with Journal(path) as journal:
        assert journal.migrated_from == exp["schema_version"]
        assert journal.generation == exp["generation"]  # the same journal, not a new one (I2)
        assert journal.last_position().value == exp["last_position"]
    assert user_version(path) == SCHEMA_VERSION

    with JournalReader(path) as reader:
        assert reader.generation == exp["generation"]
        rows = record_rows(reader)
        assert rows == exp["records"]  # every record, byte for byte, in position order
        for row, record in zip(exp["records"], reader.read(START, len(rows)), strict=True):
            assert record.values == decode_values(row[6])
        assert reader.last_position().value == exp["last_position"]
        assert reader.watermarks() == exp["watermarks"]
        for consumer, cursor in exp["cursors"].items():
            pos, state = reader.consumer_state(consumer)
            assert (pos.value, state) == (cursor["pos"], cursor["state"]), consumer
        stats = reader.stats().to_json()
        report = reader.verify()
    assert {d: s["last_seq"] for d, s in stats["devices"].items()} == exp["devices"]
    old = exp["stats"]
    for key in ("records", "last_position", "devices", "drops", "quarantine"):
        if key in old:  # what the old stats said (fields added since are not compared)
            assert shaped_like(stats[key], old[key]) == old[key], key
    if "lanes" in old:  # the previous release routed: every lane holds what it held
        assert {k: (v["records"], v["bytes"]) for k, v in stats["lanes"].items()} == \
            {k: (v["records"], v["bytes"]) for k, v in old["lanes"].items()}
    else:  # an older one did not: every record is unrouted now
        assert stats["lanes"]["unrouted"]["records"] == len(rows)

    # I2 and integrity, as `fleetgw journal verify` checks them.
    assert report.problems == ()
    assert (report.devices_checked, report.records_checked, report.evicted_checked) == (
        exp["verify"]["devices_checked"], exp["verify"]["records_checked"],
        exp["verify"]["evicted_checked"])
    assert verify_command(path) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"ok: {path}: integrity ok")

    # What the reader API does not show, straight from the tables.
    if "routing" in exp:
        assert raw_rows(path, "SELECT pos, lane, rule, drop_reason, expires_ns, aggregated "
                              "FROM records ORDER BY pos") == exp["routing"]
        assert raw_rows(path, "SELECT device_id, seq_lo, seq_hi, reason, lane FROM evicted "
                              "ORDER BY device_id, seq_lo") == exp["evicted"]
        assert raw_rows(path, "SELECT reason, lane, records, bytes FROM drops "
                              "ORDER BY reason, lane") == exp["drops"]
    else:
        assert raw_rows(path, "SELECT count(*) FROM records WHERE lane IS NOT NULL") == [[0]]
    assert raw_rows(path, "SELECT sensor_id, incarnation, batch_no, first_pos, last_pos, ranges "
                          "FROM batches ORDER BY 1, 2, 3") == exp["batches"]
    assert raw_rows(path, "SELECT sensor_id, incarnation, floor FROM resend_floors "
                          "ORDER BY 1, 2") == exp["resend_floors"]
    with JournalReader(path) as reader:
        quarantined = [[q.id, q.sensor_id, q.source, q.reason, q.raw.hex(), q.raw_len,
                        q.received_ns] for q in reader.quarantined(limit=1000)]
        marks = {s: reader.source_marks(s) for s in {m[0] for m in exp.get("source_marks", [])}}
    assert quarantined == exp.get("quarantine", [])
    assert marks == {s: {k: v for s2, k, v in exp["source_marks"] if s2 == s} for s in marks}
    if "quarantine_totals" in exp:
        assert raw_rows(path, "SELECT sensor_id, quarantined, trimmed, last_reason "
                              "FROM quarantine_totals ORDER BY 1") == exp["quarantine_totals"]


@pytest.mark.parametrize("fixture", FIXTURES, ids=fixture_id)
def test_after_the_upgrade_appends_continue_each_device_and_old_batch_ids_are_known(
        fixture, tmp_path):
    exp = expected(fixture)
    path = copy_fixture(fixture, tmp_path)
    devices = exp["devices"]
    ts = max(r[4] for r in exp["records"]) + 10**9
    with Journal(path) as journal:
        # A sensor's resend of a batch the old journal committed: answered from its record,
        # nothing stored twice (the batch ids survived the migration).
        sensor, incarnation, batch_no, first, last, ranges = exp["batches"][-1]
        again = ReadingBatch.from_readings([Reading(d, sensor, ts, "imu", {"ax": 0.0})
                                            for d, _, _ in json.loads(ranges)])
        reply = journal.append(BatchId(sensor, incarnation, batch_no), again)
        assert reply.duplicate
        assert reply.ranges == tuple(SeqRange(*r) for r in json.loads(ranges))
        assert (reply.first.value, reply.last.value) == (first, last)
        # Below a resend floor the old journal kept: a duplicate too.
        sensor, incarnation, floor = exp["resend_floors"][0]
        reply = journal.append(BatchId(sensor, incarnation, floor - 1), ReadingBatch.from_readings(
            [Reading(next(iter(devices)), sensor, ts, "imu", {"ax": 0.0})]))
        assert reply.duplicate and reply.ranges == ()
        assert journal.last_position().value == exp["last_position"]

        # New readings of every old device and of a new one, in one batch and then another.
        order = [*sorted(devices), "veh-new"]
        for n in (1, 2):
            batch = ReadingBatch.from_readings(
                Reading(d, "upgrade0", ts + n * 10**6 + i, "upgrade", {"n": n, "ok": True})
                for i, d in enumerate(order * 2))
            reply = journal.append(BatchId("upgrade0", 42, n), batch)
            assert type(reply).__name__ == "Appended", reply
            assert not reply.duplicate
            assert reply.first.value == exp["last_position"] + 1 + (n - 1) * len(batch)
            assert set(reply.ranges) == {
                SeqRange(d, devices.get(d, 0) + 2 * n - 1, devices.get(d, 0) + 2 * n)
                for d in order}
        # A consumer carries on from its migrated cursor.
        cursor, _ = journal.consumer_state("router")
        assert cursor.value == exp["cursors"].get("router", {"pos": 0})["pos"]
        from messages.journal import ConsumerCommit

        reply = journal.commit_consumer(ConsumerCommit("router", 7, cursor, cursor))
        assert type(reply).__name__ == "ConsumerCommitted", reply
        new_last = journal.last_position().value
        assert journal.verify().problems == ()

    with Journal(path) as journal:  # a second start: nothing left to migrate
        assert journal.migrated_from == SCHEMA_VERSION
        assert journal.last_position().value == new_last
    with JournalReader(path) as reader:
        rows = record_rows(reader)
        assert rows[:len(exp["records"])] == exp["records"]
        new = rows[len(exp["records"]):]
        assert [r[1:4] for r in new] == [
            [d, devices.get(d, 0) + k, "upgrade0"] for k in (1, 2, 3, 4) for d in order]
        # No seq of an old device was given twice: per device, seqs strictly increase.
        seen: dict[str, int] = {}
        for _, device, seq, *_ in rows:
            assert seq > seen.get(device, 0)
            seen[device] = seq
        assert reader.verify().problems == ()


@pytest.mark.skipif(not OLDER, reason="no fixture older than this schema")
@pytest.mark.parametrize("fixture", OLDER, ids=fixture_id)
def test_before_the_migration_a_read_only_open_refuses_and_changes_nothing(
        fixture, tmp_path, capsys):
    path = copy_fixture(fixture, tmp_path)
    before = sha256(path)
    version = version_of(fixture)
    with pytest.raises(SchemaTooOld) as refused:
        JournalReader(path)
    assert (refused.value.found, refused.value.known) == (version, SCHEMA_VERSION)
    message = str(refused.value)
    assert message == (f"{path} has journal schema version {version}, older than this "
                       f"fleetgw's ({SCHEMA_VERSION}); `fleetgw run` migrates it on start")
    # The operator's commands say the same, and change nothing either.
    assert verify_command(path) == EXIT_NO_JOURNAL
    assert stats_command(path, as_json=True) == EXIT_NO_JOURNAL
    err = capsys.readouterr().err
    assert f"fleetgw journal verify: {message}" in err
    assert f"fleetgw journal stats: {message}" in err
    assert sha256(path) == before
    assert user_version(path) == version
    # SQLite's read-only open of a WAL journal may leave its (empty) -wal and -shm: nothing else.
    assert set(os.listdir(tmp_path)) <= {"journal.db", "journal.db-wal", "journal.db-shm"}
    wal = tmp_path / "journal.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    # And the writer still migrates it afterwards.
    with Journal(path) as journal:
        assert journal.migrated_from == version


@pytest.fixture
def small_disk(tmp_path):
    from tools.harness.disk import DiskError, SmallDisk

    try:
        disk = SmallDisk(tmp_path / "disk", 2)
    except DiskError as exc:
        pytest.skip(str(exc))
    try:
        yield disk
    finally:
        with contextlib.suppress(Exception):
            disk.free()
        disk.unmount()


#: Free bytes left on the full disk: room for SQLite's 32 KiB shared-memory file (the WAL
#: index), and less than two WAL frames, so the migration's commit finds the disk full.
FULL_DISK_LEAVE_BYTES = 9 * 4096


def migrate_on_a_full_disk(fixture: Path, disk) -> tuple[str, BaseException]:
    path = copy_fixture(fixture, Path(disk.directory))
    disk.fill(leave_bytes=FULL_DISK_LEAVE_BYTES)
    before = sha256(path)
    with pytest.raises((JournalError, apsw.Error)) as failed:
        Journal(path)
    assert sha256(path) == before
    return path, failed.value


@pytest.mark.skipif(PREVIOUS is None or version_of(PREVIOUS) >= SCHEMA_VERSION,
                    reason="no fixture older than this schema")
def test_a_migration_that_fails_on_a_full_disk_leaves_the_journal_at_its_version(small_disk):
    fixture = PREVIOUS
    path, _ = migrate_on_a_full_disk(fixture, small_disk)
    small_disk.free()
    assert user_version(path) == version_of(fixture)
    with Journal(path) as journal:  # space again: the next start migrates
        assert journal.migrated_from == version_of(fixture)
        assert journal.verify().problems == ()
    with JournalReader(path) as reader:
        assert record_rows(reader) == expected(fixture)["records"]


@pytest.mark.skipif(PREVIOUS is None or version_of(PREVIOUS) >= SCHEMA_VERSION,
                    reason="no fixture older than this schema")
def test_a_migration_that_fails_on_a_full_disk_says_so_clearly(small_disk):
    fixture = PREVIOUS
    path, error = migrate_on_a_full_disk(fixture, small_disk)
    assert isinstance(error, JournalError), repr(error)
    assert str(error).startswith(f"migrating {path} from schema v{version_of(fixture)} to "
                                 f"v{SCHEMA_VERSION} failed")
    assert str(error).endswith(f"the journal was left unchanged at v{version_of(fixture)}")


@pytest.mark.skipif(PREVIOUS is None, reason="no previous-schema fixture")
def test_old_records_in_clear_stay_readable_when_new_ones_are_sealed(tmp_path):
    """Upgrading and turning encryption on at once (what the release with it does): the old
    rows stay as they were and readable, with the key ring or without; new rows are sealed."""
    keyring = make_keyring(tmp_path)
    if keyring is None:
        pytest.skip("this fleetgw does not seal payloads")
    exp = expected(PREVIOUS)
    path = copy_fixture(PREVIOUS, tmp_path)
    device = sorted(exp["devices"])[0]
    ts = max(r[4] for r in exp["records"]) + 10**9
    with Journal(path, keyring=keyring) as journal:
        reply = journal.append(BatchId("upgrade0", 1, 1), ReadingBatch.from_readings(
            [Reading(device, "upgrade0", ts, "secret", {"pin": "4711", "x": 1.5})]))
        assert reply.ranges == (SeqRange(device, exp["devices"][device] + 1,
                                         exp["devices"][device] + 1),)
    old = len(exp["records"])
    with JournalReader(path, keyring) as reader:
        rows = record_rows(reader)
        assert rows[:old] == exp["records"]
        assert decode_values(rows[old][6]) == {"pin": "4711", "x": 1.5}
        assert reader.verify().problems == ()
    with JournalReader(path) as reader:  # no key: the records in clear still read
        assert record_rows(reader, old) == exp["records"]
    types = raw_rows(path, "SELECT typeof(payload), count(*) FROM records GROUP BY 1 ORDER BY 1")
    assert types == [["blob", 1], ["text", old]]
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("journal.db*"))
    assert b'"pin":"4711"' not in on_disk and b'"ax":' in on_disk


def journal_settings_have(key: str) -> bool:
    import attrs

    from config.schema import JournalSettings

    return key in attrs.fields_dict(JournalSettings)


@pytest.mark.system
@pytest.mark.skipif(PREVIOUS is None, reason="no previous-schema fixture")
def test_a_gateway_started_on_the_previous_releases_journal_migrates_it_and_syncs_the_backlog(
        tmp_path):
    """`fleetgw run` on DATA_DIR/journal.db as the release before left it (with encryption
    turned on at the upgrade when this fleetgw has it): it starts, migrates, journals on after
    each device's last seq, and the uplink sends what the old release had not synced — its
    pending batch, the unsynced lanes and the records it never routed — to a real receiver."""
    from tools.harness.rig import Rig

    exp = expected(PREVIOUS)
    old_last = exp["last_position"]
    config = {
        "gateway": {"device_id": "veh-001"},
        "journal": {},
        "router": {"policy": str(POLICY)},
        "model": {"bundled": "none"},  # rule events and inference errors, no model to install
        "metrics": {"health_interval_s": 0},
        # Sensors of the fixture's veh-001 (new incarnations of them) at a modest rate.
        "sensors": [{"id": "imu0", "type": "sim", "kind": "imu", "rate_hz": 5, "seed": 1},
                    {"id": "gps0", "type": "sim", "kind": "gps", "rate_hz": 1, "seed": 2}],
    }
    keyring = None
    if journal_settings_have("key_file"):
        keyring = make_keyring(tmp_path)
        config["journal"]["key_file"] = keyring.path
    rig = Rig(tmp_path / "rig", config, devices=tuple(exp["devices"]))
    path = copy_fixture(PREVIOUS, Path(rig.data_dir))
    with rig:  # starts receiver and gateway
        def new_records() -> int:
            with JournalReader(path, keyring) if keyring else JournalReader(path) as reader:
                new = [r for r in reader.read(Position(old_last), 1000)
                       if r.device_id == "veh-001" and r.sensor_id == "imu0"]
            return len(new) >= 20

        rig.wait_until(new_records, 60, "the sensors' new readings in the migrated journal")
        results = rig.finish()

    assert results.exit_status == 0
    assert results.drained, f"synced {results.synced} of {results.syncable}"
    assert results.verify_problems == []  # I2 across the upgrade
    assert results.foreign_writers == []  # I3
    # I5 per device, for the journal's (old) generation: this receiver holds exactly what was
    # synced after the upgrade — the journal's synced count less what the old release had
    # already synced (to a central that is not this one).
    synced_before: dict[str, int] = {}
    for (_, device, seq, *_), (_, lane, _, drop, _, _) in zip(
            exp["records"], exp["routing"], strict=True):
        if lane in ("P1", "P2", "P3") and drop is None \
                and seq <= exp["watermarks"].get(device, {}).get(lane, 0):
            synced_before[device] = synced_before.get(device, 0) + 1
    rows = {row["device_id"]: row for row in results.reconciliation}
    assert set(rows) >= set(exp["devices"])
    for device, row in rows.items():
        assert row["unsynced"] == 0, row
        assert row["central_final"] == row["central_unique"] == \
            row["synced"] - synced_before.get(device, 0) > 0, (row, synced_before)
    assert user_version(path) == SCHEMA_VERSION

    with JournalReader(path, keyring) if keyring else JournalReader(path) as reader:
        assert reader.generation == exp["generation"]
        rows = record_rows(reader)
        marks = reader.watermarks()
        model_cursor, _ = reader.consumer_state("model")
    assert rows[:len(exp["records"])] == exp["records"]  # the old records, untouched
    new = [r for r in rows if r[0] > old_last]
    for device in ("veh-001", "drone-7"):  # journaling went on after each device's last seq
        seqs = [r[2] for r in new if r[1] == device]
        assert not seqs or seqs[0] == exp["devices"][device] + 1, (device, seqs[:3])
    assert min(r[2] for r in new if r[1] == "veh-001") == exp["devices"]["veh-001"] + 1
    assert model_cursor.value > exp["cursors"]["model"]["pos"]  # the model runner resumed

    # Every old record was routed (the old release left a tail unrouted) ...
    assert raw_rows(path, f"SELECT count(*) FROM records WHERE pos <= {old_last} "
                          "AND lane IS NULL") == [[0]]
    # ... and every old syncable record is at or below its lane's watermark now: the pending
    # batch, the lanes' backlog and the tail alike. There was a backlog to send.
    old_marks = exp["watermarks"]
    backlog = 0
    for device, lane, seq in raw_rows(
            path, f"SELECT device_id, lane, seq FROM records WHERE pos <= {old_last} "
                  "AND lane IN ('P1', 'P2', 'P3') AND drop_reason IS NULL"):
        assert seq <= marks.get(device, {}).get(lane, 0), (device, lane, seq)
        backlog += seq > old_marks.get(device, {}).get(lane, 0)
    assert backlog > 0
