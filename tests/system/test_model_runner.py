"""The model runner in a running gateway: crash loops never touch journaling (I6), every
window is inferred exactly once across restarts (I4), and models switch without a restart —
or are refused while the old one keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import apsw
import pytest

from actors.model_runner.features import WINDOW_NS
from actors.model_runner.manifest import DEFAULT_TRUSTED_KEYS, MANIFEST
from tests.system.harness import ROOT, wait_for

pytestmark = pytest.mark.system

FULL_RATE = [
    {"id": "imu0", "kind": "imu", "rate_hz": 400, "seed": 1, "batch_max_age_s": 0.05},
    {"id": "gps0", "kind": "gps", "rate_hz": 5, "seed": 2, "batch_max_age_s": 0.05},
    {"id": "engine0", "kind": "engine", "rate_hz": 100, "seed": 3, "batch_max_age_s": 0.05},
]
MODEL = {"poll_s": 0.2, "grace_s": 1.0}


def model_node(gw) -> dict:
    return gw.node("model")


def journal_sample(gw) -> dict:
    return gw.node("journal")["figures"]


def window_records(path: str, device: str = "veh-001") -> list[tuple[int, str, dict]]:
    db = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    rows = db.execute(
        "SELECT ts, kind, payload FROM records WHERE sensor_id = 'model' AND device_id = ? "
        "AND kind IN ('inference', 'inference-error') ORDER BY ts", (device,)).fetchall()
    db.close()
    return [(ts, kind, json.loads(p)) for ts, kind, p in rows]


def test_model_runner_crash_loop_leaves_journaling_alone_and_skips_no_window(make_gateway):
    gw = make_gateway(sensors=FULL_RATE, model=MODEL).start()
    wait_for(lambda: model_node(gw)["figures"].get("inferences", 0) > 3, 90,
             "the model runner to infer")
    baseline = [journal_sample(gw) for _ in range(4)]
    during = []
    for fault in ("sigkill", "segfault", "hang", "sigkill", "segfault", "hang"):
        node = model_node(gw)
        pid = node["pid"]
        if fault == "sigkill":
            os.kill(pid, signal.SIGKILL)
        else:
            gw.inject("model", fault)
        wait_for(lambda pid=pid: model_node(gw)["pid"] not in (None, pid), 60,
                 f"the model runner to be restarted after {fault}")
        during.append(journal_sample(gw))
        wait_for(lambda: model_node(gw)["state"] == "running"
                 and model_node(gw)["figures"].get("commits", 0) > 0, 60,
                 "the model runner to commit again")
        during.append(journal_sample(gw))
    # I6: commits never paused beyond their normal interval, and their rate held.
    gaps = [s["last_commit_age_s"] for s in baseline + during]
    assert max(gaps) < 2.0, gaps
    rate_before = sum(s["commits_per_s"] for s in baseline) / len(baseline)
    rate_during = sum(s["commits_per_s"] for s in during) / len(during)
    assert rate_during > 0.5 * rate_before, (rate_before, rate_during)
    # Let the runner catch up, stop in order, then read what it wrote.
    wait_for(lambda: model_node(gw)["figures"]["backlog"] < 2000, 120, "the runner to catch up")
    assert gw.terminate() == 0
    windows = window_records(gw.journal_path)
    starts = [ts for ts, _k, _v in windows]
    assert len(starts) == len(set(starts)), "a window was inferred twice"
    assert starts == list(range(starts[0], starts[-1] + 1, WINDOW_NS)), "a window was skipped"
    assert len(starts) > 10
    errors = [v["reason"] for _ts, kind, v in windows if kind == "inference-error"]
    assert len(errors) <= 1, errors  # at most the first, partial window
    inferred = [v for _ts, kind, v in windows if kind == "inference"]
    assert {v["model_version"] for v in inferred} == {shipped_version()}
    assert all(len(v["input_sha256"]) == 64 and v["latency_us"] >= 0 for v in inferred)


def shipped_version() -> str:
    with open(os.path.join(ROOT, "models", "DEFAULT")) as fh:
        return fh.read().strip()


def model_cli(gw, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", "model", *args, "--data-dir", gw.data_dir,
         "--trusted-keys", gw.trusted_keys],
        cwd=ROOT, capture_output=True, text=True, timeout=180)


def resigned_copy(src: str, dest: str, version: str, key_path: str) -> str:
    """The shipped model under another version, signed by a test key (a "new" model)."""
    from actors.model_runner.manifest import load_signing_key, write_signed

    shutil.copytree(src, dest)
    with open(os.path.join(dest, MANIFEST)) as fh:
        manifest = json.load(fh)
    manifest["version"] = version
    write_signed(dest, manifest, load_signing_key(key_path))
    return dest


def test_activated_model_is_served_without_restart_and_a_bad_one_is_refused(make_gateway,
                                                                          tmp_path):
    from actors.model_runner.manifest import generate_key

    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(DEFAULT_TRUSTED_KEYS / "fleetgw-release.pub", keys)
    generate_key(tmp_path / "test.key")
    shutil.copy(tmp_path / "test.key.pub", keys / "test.pub")
    gw = make_gateway(model={**MODEL, "trusted_keys": str(keys)})
    gw.trusted_keys = str(keys)
    gw.start()
    first = shipped_version()
    wait_for(lambda: model_node(gw)["figures"]["model"] == first, 90, "the shipped model")
    runner_pid = model_node(gw)["pid"]

    # A new model: installed (verified, self-tested in a child), activated, then served.
    shipped = os.path.join(ROOT, "models", first)
    newer = resigned_copy(shipped, str(tmp_path / "m2"), "2099.1.1", str(tmp_path / "test.key"))
    for step in (("install", newer), ("activate", "2099.1.1")):
        result = model_cli(gw, *step)
        assert result.returncode == 0, result.stderr
    wait_for(lambda: model_node(gw)["figures"]["model"] == "2099.1.1", 60, "the switch")
    assert model_node(gw)["pid"] == runner_pid, "switching must not restart the runner"
    served_from = time.time_ns()

    # A model corrupted after install is refused at activation: the pointer stays.
    bad = resigned_copy(shipped, str(tmp_path / "m3"), "2099.2.1", str(tmp_path / "test.key"))
    assert model_cli(gw, "install", bad).returncode == 0
    weights = os.path.join(gw.data_dir, "models", "versions", "2099.2.1", "model.bin")
    with open(weights, "r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    refused = model_cli(gw, "activate", "2099.2.1")
    assert refused.returncode == 1 and "sha256" in refused.stderr
    # ... and if the pointer names it anyway (a tampered registry), the runner refuses it and
    # keeps serving the model it has.
    pointer = os.path.join(gw.data_dir, "models", "active")
    with open(pointer + ".tmp", "w") as fh:
        fh.write("2099.2.1\n")
    os.replace(pointer + ".tmp", pointer)
    wait_for(lambda: model_node(gw)["figures"]["refused"] == 1, 60, "the runner to refuse it")
    assert model_node(gw)["figures"]["model"] == "2099.1.1"
    assert "model 2099.2.1 refused" in gw.gateway_log()
    wait_for(lambda: any(ts > served_from and v["model_version"] == "2099.1.1"
                         for ts, k, v in window_records(gw.journal_path) if k == "inference"),
             60, "inferences by the new model")
    assert gw.terminate() == 0
