"""I9: importing and running OpenVINO the fleetgw way forks nothing and opens no socket.

Each check runs in a fresh interpreter with an audit hook that records — and refuses — any
fork, process spawn or socket. The control imports OpenVINO plainly and must be caught (its
telemetry thread forks a child that sends a DNS query): the hook refuses that fork, so the
control itself sends nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tools.gateway_process import ROOT

PROBE = r"""
import json, sys, threading, time
caught = []
def hook(event, args):
    if event in ("os.fork", "os.forkpty", "os.posix_spawn", "subprocess.Popen", "os.system") \
            or event.startswith("socket."):
        caught.append(event)
        raise RuntimeError(f"audit: {event} refused")
sys.addaudithook(hook)
if sys.argv[1] == "fleetgw":
    from actors.model_runner.openvino_env import import_openvino
    ov = import_openvino()
    import numpy as np
    import openvino.opset13 as ops
    x = ops.parameter([-1, 4], np.float32, name="x")
    model = ov.Model([ops.relu(x)], [x], "probe")
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1})
    compiled.create_infer_request().infer({0: np.ones((1, 4), np.float32)})
    threads = [t.name for t in threading.enumerate()]
else:
    import openvino
    deadline = time.monotonic() + 30
    while not caught and time.monotonic() < deadline:  # the telemetry thread forks soon
        time.sleep(0.02)
    threads = [t.name for t in threading.enumerate()]
print(json.dumps({"caught": caught, "threads": threads}))
"""


def probe(mode: str, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "OPENVINO_TELEMETRY_OPT_OUT")}
    env["HOME"] = str(tmp_path)  # no opt-out file from an earlier run
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_openvino_through_fleetgw_forks_nothing_and_opens_no_socket(tmp_path):
    result = probe("fleetgw", tmp_path)
    assert result["caught"] == []
    assert result["threads"] == ["MainThread"]  # no telemetry sender waiting to run
    assert not (tmp_path / "intel").exists()


def test_control_plain_import_is_caught_trying_to_phone_home(tmp_path):
    result = probe("plain", tmp_path)
    assert "os.fork" in result["caught"]
