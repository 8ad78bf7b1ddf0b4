"""The registry: only signed, intact, self-tested models are installed and served; the
`fleetgw model` commands say what they did or why not, with the documented exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

from actors.model_runner.registry import ModelRegistry, RegistryError
from actors.model_runner.selftest import CRASH_HOOK_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def lab(tmp_path, make_model):
    """Two models, 1.0.0 and 2.0.0, signed by the lab key; and the lab's trusted keys."""
    v1, keys = make_model(tmp_path / "lab", "1.0.0")
    v2, _ = make_model(tmp_path / "lab", "2.0.0")
    return v1, v2, keys


@pytest.fixture
def registry(tmp_path, lab):
    return ModelRegistry(tmp_path / "data" / "models", lab[2])


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def refusal(call, *args) -> str:
    with pytest.raises(RegistryError) as info:
        call(*args)
    return str(info.value)


def test_install_activate_rollback_switch_the_pointer_and_keep_the_history(registry, lab):
    v1, v2, _ = lab
    assert registry.active() is None
    report = registry.install(v1)
    assert (report.version, report.already_installed, report.selftest.ok) == ("1.0.0", False,
                                                                              True)
    registry.install(v2)
    assert registry.active_version() is None  # installing never activates
    registry.activate("1.0.0")
    model = registry.activate("2.0.0")
    root = registry.root
    assert (root / "active").read_text() == "2.0.0\n"
    assert json.loads((root / "history.json").read_text()) == ["1.0.0", "2.0.0"]
    assert registry.active() == model
    assert model.path == root / "versions" / "2.0.0"
    assert sorted(p.name for p in root.iterdir()) == [".lock", "active", "history.json",
                                                      "versions"]
    assert registry.rollback() == "1.0.0"
    assert registry.active_version() == "1.0.0"
    assert registry.history() == ["1.0.0"]
    assert "nothing to roll back to: 1.0.0 is active" in refusal(registry.rollback)
    assert registry.active_version() == "1.0.0"


def test_installing_the_identical_model_again_is_a_noop(registry, lab):
    registry.install(lab[0])
    again = registry.install(lab[0])
    assert again.already_installed and again.selftest is None
    assert registry.installed() == ["1.0.0"]


def test_another_model_under_an_installed_version_is_refused(registry, lab, make_model,
                                                             tmp_path):
    registry.install(lab[0])
    other, _ = make_model(tmp_path / "lab", "1.0.0", seed=2)
    message = refusal(registry.install, other)
    assert "version 1.0.0 is installed with a different manifest sha256" in message
    assert "fleetgw model train --version V" in message


def test_corrupted_weights_are_refused_at_install(registry, lab):
    flip_byte(lab[0] / "model.bin")
    message = refusal(registry.install, lab[0])
    assert f"refused to install {lab[0]}: {lab[0] / 'model.bin'}: sha256" in message
    assert "(corrupted or replaced)" in message
    assert registry.installed() == []


@pytest.mark.parametrize(("name", "reason"), [
    ("model.xml", "Start-end tags mismatch"),
    ("model.bin", "Incorrect weights in bin file!"),
])
def test_truncated_ir_signed_anyway_is_refused_by_the_selftest_child(registry, lab, resign,
                                                                     name, reason):
    path = lab[0] / name
    os.truncate(path, path.stat().st_size // 2)
    resign(lab[0], lab[2])
    message = refusal(registry.install, lab[0])
    assert "refused to install 1.0.0" in message and "self-test failed" in message
    assert "OpenVINO could not read or compile it" in message and reason in message
    assert registry.installed() == [] and not (registry.root / "installing").exists()


def test_an_edited_manifest_fails_its_signature(registry, lab):
    manifest = lab[0] / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"threshold": 1.5', '"threshold": 9.5'))
    assert "bad signature on manifest.json" in refusal(registry.install, lab[0])


def test_a_model_signed_by_an_untrusted_key_is_refused(registry, make_model, tmp_path):
    stranger, _ = make_model(tmp_path / "stranger", "1.0.0")
    assert "which is not trusted" in refusal(registry.install, stranger)


def test_a_model_failing_its_own_selftest_is_refused_at_install(registry, make_model,
                                                                tmp_path):
    broken, _ = make_model(tmp_path / "lab", "3.0.0", break_selftest=True)
    message = refusal(registry.install, broken)
    assert "self-test failed: vector 'calm': score is" in message
    assert registry.installed() == []


def test_a_crashing_selftest_child_refuses_the_install(registry, lab, monkeypatch):
    monkeypatch.setenv(CRASH_HOOK_ENV, "segv")
    assert "self-test child died with SIGSEGV" in refusal(registry.install, lab[0])
    assert registry.installed() == []


def test_a_version_corrupted_after_install_is_refused_and_the_active_one_stays(registry, lab):
    registry.install(lab[0])
    registry.install(lab[1])
    registry.activate("1.0.0")
    flip_byte(registry.root / "versions" / "2.0.0" / "model.bin")
    message = refusal(registry.activate, "2.0.0")
    assert message.startswith("refused to activate 2.0.0: ")
    assert "1.0.0 stays active" in message and "fleetgw model install PATH" in message
    assert registry.active_version() == "1.0.0"
    assert registry.history() == ["1.0.0"]


def test_a_damaged_installed_copy_is_replaced_by_installing_it_again(registry, lab):
    registry.install(lab[0])
    flip_byte(registry.root / "versions" / "1.0.0" / "model.bin")
    assert not registry.install(lab[0]).already_installed
    assert registry.activate("1.0.0").version == "1.0.0"


def test_active_reverifies_on_each_call(registry, lab):
    registry.install(lab[0])
    registry.activate("1.0.0")
    flip_byte(registry.root / "versions" / "1.0.0" / "model.xml")
    message = refusal(registry.active)
    assert message.startswith("the active model 1.0.0 does not verify: ")
    assert "fleetgw model rollback" in message


def test_unknown_versions_are_refused_naming_the_installed_ones(registry, lab):
    registry.install(lab[0])
    with pytest.raises(RegistryError) as info:
        registry.activate("9.9.9")
    assert info.value.bad_input
    assert "version '9.9.9' is not installed" in str(info.value)
    assert "(installed: 1.0.0)" in str(info.value)


def test_list_and_verify_report_each_version(registry, lab):
    registry.install(lab[0])
    registry.install(lab[1])
    registry.activate("2.0.0")
    flip_byte(registry.root / "versions" / "1.0.0" / "model.bin")
    first, second = registry.list()
    assert (first.version, first.ok, first.active, first.threshold) == ("1.0.0", False, False,
                                                                        None)
    assert "does not match the manifest" in first.problem
    assert (second.version, second.ok, second.active, second.threshold) == ("2.0.0", True,
                                                                            True, 1.5)
    assert [(r.version, r.ok) for r in registry.verify()] == [("1.0.0", False), ("2.0.0", True)]


def test_ensure_default_installs_and_activates_only_when_nothing_is_active(registry, lab):
    assert registry.ensure_default(lab[0]) == "1.0.0"
    assert registry.history() == ["1.0.0"]
    registry.install(lab[1])
    registry.activate("2.0.0")
    assert registry.ensure_default(lab[0]) == "2.0.0"
    assert registry.active_version() == "2.0.0"


def test_concurrent_installs_both_succeed_under_the_lock(tmp_path, lab):
    root = tmp_path / "data" / "models"
    errors = []

    def install(src):
        try:
            ModelRegistry(root, lab[2]).install(src)
        except RegistryError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=install, args=(src,)) for src in lab[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ModelRegistry(root, lab[2]).installed() == ["1.0.0", "2.0.0"]
    assert not (root / "installing").exists()


# ---- the command line -------------------------------------------------------------------
def fleetgw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", "model", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_installs_activates_lists_and_refuses_with_the_documented_status(tmp_path, lab):
    v1, _, keys = lab
    common = ["--registry", str(tmp_path / "reg"), "--trusted-keys", str(keys)]
    install = fleetgw("install", str(v1), *common)
    assert install.returncode == 0, install.stderr
    assert "installed 1.0.0" in install.stdout and "fleetgw model activate 1.0.0" in install.stdout
    unknown = fleetgw("activate", "7.0.0", *common)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("fleetgw model activate: version '7.0.0' is not installed")
    assert "(installed: 1.0.0)" in unknown.stderr and unknown.stderr.count("\n") == 1
    activate = fleetgw("activate", "1.0.0", *common)
    assert activate.returncode == 0 and "active: 1.0.0 (was none;" in activate.stdout
    listed = json.loads(fleetgw("list", "--json", *common).stdout)
    assert [(m["version"], m["active"], m["ok"]) for m in listed] == [("1.0.0", True, True)]
    table = fleetgw("list", *common).stdout.splitlines()
    assert table[1].split()[:4] == ["*", "1.0.0", "ok", "1.5"]
    assert table[1].endswith("recall impact 0.80; false positives 0.0010")
    verify = fleetgw("verify", *common)
    assert verify.returncode == 0 and verify.stdout.startswith("ok 1.0.0: signature, hashes")
    rollback = fleetgw("rollback", *common)
    assert rollback.returncode == 1
    assert rollback.stderr.startswith("fleetgw model rollback: nothing to roll back to")


def test_cli_refuses_bad_models_and_bad_input(tmp_path, lab):
    v1, _, keys = lab
    common = ["--registry", str(tmp_path / "reg"), "--trusted-keys", str(keys)]
    flip_byte(v1 / "model.bin")
    corrupted = fleetgw("install", str(v1), *common)
    assert corrupted.returncode == 1 and corrupted.stderr.count("\n") == 1
    assert "sha256" in corrupted.stderr and "corrupted or replaced" in corrupted.stderr
    failed = fleetgw("verify", "--path", str(v1), *common)
    assert failed.returncode == 1 and failed.stderr.startswith(f"FAILED {v1}:")
    missing = fleetgw("install", str(tmp_path / "nowhere"), *common)
    assert missing.returncode == 2 and "not a directory" in missing.stderr
    no_keys = fleetgw("list", "--registry", str(tmp_path / "reg"),
                      "--trusted-keys", str(tmp_path / "empty"))
    assert no_keys.returncode == 2 and "no trusted keys in" in no_keys.stderr


def test_cli_keygen_writes_a_key_pair_once(tmp_path):
    key = tmp_path / "signer.key"
    made = fleetgw("keygen", str(key))
    assert made.returncode == 0, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(Path(f"{key}.pub").read_text().strip()) == 64
    again = fleetgw("keygen", str(key))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_cli_train_hands_its_options_to_the_trainer(tmp_path, monkeypatch):
    from tools.cli import main

    calls = []
    trainer = types.ModuleType("tools.training.train")
    trainer.run_training_subprocess = lambda *args: calls.append(args) or 0
    monkeypatch.setitem(sys.modules, "tools.training.train", trainer)
    status = main(["model", "train", "--out", str(tmp_path / "m"), "--signing-key", "k.key",
                   "--version", "2026.12.1", "--seed", "7", "--quick"])
    assert status == 0
    assert calls == [(str(tmp_path / "m"), "k.key", "2026.12.1", 7, True)]
