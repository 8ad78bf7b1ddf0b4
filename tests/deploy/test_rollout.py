"""The rollout integration files (deploy/ROLLOUT.md): the Ansible play stages and gates as the
document says, and the Mender state scripts are valid POSIX sh (shellcheck when it is
installed; CI installs it: FLEETGW_REQUIRE_SHELLCHECK). The health gate script itself runs
against a real gateway in tests/system/test_health.py.

The journal's part of a rollback runs for real here: the record script and the rollback script
(which the Ansible play runs too) against copies of the previous schema's fixture journal,
migrated by this release's writer, with this release's `fleetgw`. Only `systemctl` is a stub
(no systemd in the test environment): it records what the script asks of it.
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

from actors.journal import Journal
from actors.journal.actor import take_writer_lock
from actors.journal.keys import create_key_file
from actors.journal.schema import SCHEMA_VERSION
from messages.journal import BatchId
from messages.readings import Reading, ReadingBatch, decode_values

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MENDER_SCRIPTS = sorted((DEPLOY / "mender").iterdir())
RECORD = DEPLOY / "mender" / "ArtifactInstall_Enter_00_record_schema"
ROLLBACK = DEPLOY / "mender" / "ArtifactRollback_Enter_00_journal"
#: What the release before this one left on disk (tests/fixtures/README.md).
PREVIOUS = SCHEMA_VERSION - 1
PREVIOUS_FIXTURE = ROOT / "tests" / "fixtures" / f"journal_v{PREVIOUS}.db"
FLEETGW = shutil.which("fleetgw", path=str(Path(sys.executable).parent)) or shutil.which("fleetgw")
#: The journal files belong to the service user; the scripts run as root (when we are root,
#: the journal is handed to "nobody" to see that they leave it that way).
OWNER = 65534 if os.geteuid() == 0 else os.geteuid()


def play() -> dict:
    yaml = pytest.importorskip("yaml")
    (only,) = yaml.safe_load((DEPLOY / "ansible" / "rollout.yml").read_text())
    return only


def tasks_named(tasks: list[dict]) -> dict[str, dict]:
    return {task["name"]: task for task in tasks}


def test_the_play_goes_canary_then_ten_percent_then_all_and_stops_at_one_failure():
    rollout = play()
    assert rollout["serial"] == [1, "10%", "100%"]
    assert rollout["max_fail_percentage"] == 0
    assert rollout["become"] is True


def test_the_play_gates_on_fleetgw_health_and_a_failed_gateway_is_rolled_back_then_failed():
    rollout = play()
    (upgrade,) = [t for t in rollout["tasks"] if "block" in t]
    block, rescue = tasks_named(upgrade["block"]), upgrade["rescue"]
    gate = block["Gate - healthy within the wait"]["ansible.builtin.command"]
    assert "--wait {{ fleetgw_health_wait_s }}" in gate
    command = rollout["vars"]["fleetgw_health_command"]
    assert "bin/fleetgw health --json" in command and "--expect-version" in command
    assert "--require-sync" in command
    assert "Soak" in block and "Gate - no actor restarted during the soak" in block
    names = [t["name"] for t in rescue]
    assert "ansible.builtin.fail" in rescue[-1]  # rescued, yet counted as failed
    stop = names.index("Stop the gateway (the journal must have no writer while it is taken "
                       "back)")
    (down,) = [t for t in rescue if t["name"].startswith("Take the journal back")]
    assert stop < names.index(down["name"]) < names.index("Point current back at the "
                                                           "previous release")


def test_the_play_records_the_schema_first_and_the_rescue_takes_the_journal_back():
    """Same scripts as Mender: recorded with the running release before anything changes; taken
    back with the NEW release's fleetgw; `current` moves back only if that worked."""
    rollout = play()
    tasks = rollout["tasks"]
    (upgrade,) = [t for t in tasks if "block" in t]
    (record,) = [t for t in tasks if t.get("name", "").startswith("Record the journal schema")]
    assert tasks.index(record) < tasks.index(upgrade)
    assert record["ansible.builtin.script"].endswith("/" + RECORD.name)
    assert record["environment"]["FLEETGW"] == "{{ fleetgw_previous.stdout }}/bin/fleetgw"
    assert "failed_when" not in record  # an unreadable journal: this gateway is not upgraded
    rescue = tasks_named(upgrade["rescue"])
    (down,) = [t for n, t in rescue.items() if n.startswith("Take the journal back")]
    assert down["ansible.builtin.script"].endswith("/" + ROLLBACK.name)
    assert down["environment"]["FLEETGW"] == "{{ fleetgw_release_dir }}/bin/fleetgw"
    assert down["environment"]["FLEETGW_FAIL_STATUS"] == "1"
    assert down["when"] == "fleetgw_new_release_ran | default(false)"
    assert rescue["Point current back at the previous release"]["when"] == (
        "fleetgw_journal_ready | bool")
    block = tasks_named(upgrade["block"])
    names = list(block)
    assert names.index("Note that the new release may now migrate the journal") < names.index(
        "Restart the gateway on the new release")
    assert (rollout["vars"]["fleetgw_state_scripts"] == "{{ playbook_dir }}/../mender"
            and (DEPLOY / "ansible" / ".." / "mender" / RECORD.name).is_file())


def test_each_release_is_installed_beside_the_others_with_its_own_config():
    """The play installs PACKAGING.md's layout, and the unit's config is a symlink into
    `current`: moving `current` back in the rescue brings back the config the previous release
    accepts (it refuses keys it does not know)."""
    rollout = play()
    tasks, v = rollout["tasks"], rollout["vars"]
    assert v["fleetgw_release_dir"] == "{{ fleetgw_root }}/releases/{{ fleetgw_version }}"
    assert v["fleetgw_current"] == "{{ fleetgw_root }}/current"
    assert v["fleetgw_config_link"] == "/etc/fleetgw/fleetgw.toml"
    (upgrade,) = [t for t in tasks if "block" in t]
    link = tasks_named(tasks)["Point the unit's config at the current release's"]
    assert tasks.index(link) < tasks.index(upgrade)
    assert link["ansible.builtin.file"] == {"src": "{{ fleetgw_current }}/fleetgw.toml",
                                            "dest": "{{ fleetgw_config_link }}",
                                            "state": "link", "force": True}
    keep = tasks_named(tasks)["Keep the running release's config with it"]["ansible.builtin.copy"]
    assert keep["dest"] == "{{ fleetgw_previous.stdout }}/fleetgw.toml"
    assert keep["force"] is False  # the previous release's own config is never overwritten
    block = upgrade["block"]
    names = [t["name"] for t in block]
    pip = tasks_named(block)["Install it in place into the release's own venv"]
    assert pip["ansible.builtin.pip"]["name"] == "{{ fleetgw_release_dir }}/app"
    assert pip["ansible.builtin.pip"]["editable"] is True
    assert pip["ansible.builtin.pip"]["virtualenv"] == "{{ fleetgw_release_dir }}"
    configs = [t for t in block if t.get("name", "").endswith(("config from the template",
                                                               "config over to the new release"))]
    assert len(configs) == 2
    switch = names.index("Point current at the new release")
    for task in configs:
        module = task.get("ansible.builtin.template") or task["ansible.builtin.copy"]
        assert module["dest"] == "{{ fleetgw_release_dir }}/fleetgw.toml"
        assert block.index(task) < switch
    back = tasks_named(upgrade["rescue"])["Point current back at the previous release"]
    assert back["ansible.builtin.file"]["src"] == "{{ fleetgw_previous.stdout }}"
    assert back["ansible.builtin.file"]["dest"] == "{{ fleetgw_current }}"


@pytest.mark.parametrize("script", MENDER_SCRIPTS, ids=lambda p: p.name)
def test_mender_state_scripts_are_executable_posix_sh(script):
    assert script.name.split("_")[0] in ("ArtifactInstall", "ArtifactCommit", "ArtifactRollback")
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/bin/sh\n")
    done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if shutil.which("shellcheck") is None:
        if os.environ.get("FLEETGW_REQUIRE_SHELLCHECK"):
            pytest.fail("shellcheck is required (FLEETGW_REQUIRE_SHELLCHECK) but missing")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    done = subprocess.run(["shellcheck", "--shell=sh", str(script)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout


# ---- the journal across a rollback, for real ---------------------------------------------------


def raw(path: Path, sql: str) -> list[tuple]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [tuple(row) for row in conn.execute(sql)]
    finally:
        conn.close()


def schema_of(path: Path) -> tuple[int, list[tuple]]:
    """user_version and every schema object's SQL (whitespace folded)."""
    objects = raw(path, "SELECT type, name, sql FROM sqlite_schema ORDER BY type, name")
    return raw(path, "PRAGMA user_version")[0][0], [
        (t, n, " ".join((sql or "").split())) for t, n, sql in objects]


def records(path: Path) -> list[tuple]:
    return raw(path, "SELECT pos, device_id, seq, sensor_id, ts, kind, payload FROM records "
                     "ORDER BY pos")


class Device:
    """A data dir, key dir and stub systemctl, and the two journal scripts run on them."""

    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.data.mkdir()
        self.db = self.data / "journal.db"
        self.mark = self.data / "rollback-schema"
        self.key = root / "journal.key"
        self.calls = root / "systemctl.calls"
        self.bin = root / "bin"
        self.bin.mkdir()
        stub = self.bin / "systemctl"
        stub.write_text(f'#!/bin/sh\necho "$*" >> {self.calls}\n')
        stub.chmod(0o755)

    def run(self, script: Path, **env: str) -> subprocess.CompletedProcess:
        assert FLEETGW, "the fleetgw command of this checkout is not installed"
        full = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "FLEETGW": FLEETGW,
                "FLEETGW_DATA_DIR": str(self.data), "FLEETGW_KEY_FILE": str(self.key), **env}
        return subprocess.run([str(script)], env=full, capture_output=True, text=True,
                              timeout=120)

    def systemctl(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def owners(self) -> set[int]:
        return {p.stat().st_uid for p in self.data.glob("journal.db*")}

    def hand_to_service_user(self) -> None:
        for path in self.data.glob("journal.db*"):
            os.chown(path, OWNER, OWNER)


@pytest.fixture
def device(tmp_path) -> Device:
    return Device(tmp_path)


@pytest.fixture
def upgraded(device) -> Device:
    """The previous release's journal with its schema recorded, then migrated by this release's
    writer, which sealed one more reading with its key (a gateway after the upgrade)."""
    if not PREVIOUS_FIXTURE.exists():
        pytest.skip(f"no journal_v{PREVIOUS} fixture")
    shutil.copyfile(PREVIOUS_FIXTURE, device.db)
    device.mark.write_text(f"{PREVIOUS}\n")
    ring = create_key_file(str(device.key))
    device_id, last_seq = raw(device.db, "SELECT device_id, last_seq FROM devices "
                                         "ORDER BY device_id LIMIT 1")[0]
    ts = max(r[4] for r in records(device.db)) + 10**9
    with Journal(str(device.db), keyring=ring) as journal:
        journal.append(BatchId("upgrade0", 1, 1), ReadingBatch.from_readings(
            [Reading(device_id, "upgrade0", ts, "secret", {"pin": "4711", "x": 1.5})]))
    assert raw(device.db, "SELECT count(*) FROM records WHERE key_id IS NOT NULL") == [(1,)]
    device.hand_to_service_user()
    device.sealed_seq = (device_id, last_seq + 1)
    return device


def test_the_record_script_writes_the_running_releases_schema_or_refuses_the_upgrade(device):
    device.mark.write_text("4\n")  # left from an earlier upgrade
    done = device.run(RECORD)
    assert done.returncode == 0, done.stderr
    assert not device.mark.exists() and "no journal" in done.stderr  # first install

    device.db.write_bytes(b"not a journal at all" * 100)
    done = device.run(RECORD)
    assert done.returncode == 1 and not device.mark.exists(), done.stderr
    assert "not installing" in done.stderr
    done = device.run(RECORD, FLEETGW_ROLLBACK_SCHEMA_OPTIONAL="1")
    assert done.returncode == 0 and not device.mark.exists(), done.stderr

    device.db.unlink()
    with Journal(str(device.db)):  # the running release's journal (this release's here)
        pass
    device.hand_to_service_user()
    done = device.run(RECORD)
    assert done.returncode == 0, done.stderr
    assert device.mark.read_text() == f"{SCHEMA_VERSION}\n"
    assert device.owners() == {OWNER}  # the -wal/-shm its read made are the owner's
    assert device.systemctl() == []  # the running gateway is left alone


def test_the_rollback_script_takes_the_journal_back_with_every_record(upgraded, tmp_path):
    before = records(upgraded.db)
    last_seqs = raw(upgraded.db, "SELECT device_id, last_seq FROM devices ORDER BY 1")
    done = upgraded.run(ROLLBACK)
    assert done.returncode == 0, done.stderr
    assert f"taken from schema v{SCHEMA_VERSION} back to v{PREVIOUS}" in done.stderr
    assert upgraded.systemctl() == ["stop fleetgw.service"]  # no writer while it changes
    # The previous release's own schema, object for object: it opens the file as its own.
    pristine = tmp_path / "previous.db"  # a copy: even a read-only open leaves -wal/-shm
    shutil.copyfile(PREVIOUS_FIXTURE, pristine)
    assert schema_of(upgraded.db) == schema_of(pristine)
    after = records(upgraded.db)
    assert after[:-1] == before[:-1] and after[-1][:6] == before[-1][:6]
    assert after[-1][1:3] == upgraded.sealed_seq
    assert decode_values(after[-1][6]) == {"pin": "4711", "x": 1.5}  # in clear: v5 has no key
    assert raw(upgraded.db, "SELECT device_id, last_seq FROM devices ORDER BY 1") == last_seqs
    assert upgraded.owners() == {OWNER}  # the writer-lock it took is the service user's

    again = upgraded.run(ROLLBACK)
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    assert records(upgraded.db) == after


def test_a_journal_that_cannot_be_taken_back_is_left_as_it_was(upgraded):
    state = (schema_of(upgraded.db), records(upgraded.db),
             hashlib.sha256(upgraded.db.read_bytes()).hexdigest())
    no_key = str(upgraded.key) + ".missing"
    done = upgraded.run(ROLLBACK, FLEETGW_KEY_FILE=no_key, FLEETGW_FAIL_STATUS="1")  # Ansible
    assert done.returncode == 1
    assert "--key-file" in done.stderr and "NOT ready" in done.stderr
    done = upgraded.run(ROLLBACK, FLEETGW_KEY_FILE=no_key)  # Mender: the rollback goes on
    assert done.returncode == 0 and "NOT ready" in done.stderr

    lock = take_writer_lock(str(upgraded.db))  # a gateway that did not stop
    try:
        done = upgraded.run(ROLLBACK, FLEETGW_FAIL_STATUS="1")
    finally:
        os.close(lock)
    assert done.returncode == 1 and "another journal writer" in done.stderr, done.stderr
    assert (schema_of(upgraded.db), records(upgraded.db),
            hashlib.sha256(upgraded.db.read_bytes()).hexdigest()) == state


def test_without_a_recorded_schema_the_rollback_script_leaves_everything_alone(upgraded):
    upgraded.mark.unlink()
    done = upgraded.run(ROLLBACK)
    assert done.returncode == 0 and "journal left as it is" in done.stderr
    assert upgraded.systemctl() == []
    assert schema_of(upgraded.db)[0] == SCHEMA_VERSION
