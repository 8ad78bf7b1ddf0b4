"""`fleetgw bench model`: the model runner's cost and the shipped model's quality, each beside
its reference measured in the same run.

Where this sits: outside the gateway. Four measurements:

1. latency per window: `InferenceSession.infer` (input validation + OpenVINO, as the runner
   calls it) on held-out windows, beside a bare OpenVINO infer request on the same compiled
   IR and rows (the floor);
2. records/s and windows/s through `ModelRunner.process` (JSON decode, rules, windows,
   features, inference, output records) on simulated vehicles' journal records, beside
   decoding those records' JSON alone;
3. the model runner's memory in a real `fleetgw run` (the actor process, USS and RSS), beside
   the router's in the same gateway (a consumer without OpenVINO);
4. precision and recall per anomaly type on a held-out seeded test set (a seed the model was
   not trained on) — the shipped system (rules + model) as `per_type`, beside `rules_only`
   and `model_only`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np
import psutil

from actors.journal.reader import Record
from actors.model_runner.actor import shipped_model_dir
from actors.model_runner.inference import InferenceSession, as_input
from actors.model_runner.manifest import (
    MODEL_XML,
    model_sha256,
    trusted_keys,
    verify_model_dir,
)
from actors.model_runner.openvino_env import import_openvino
from actors.model_runner.runner import ModelRunner, ServingModel
from actors.sensors.sim import SimulatedSource
from messages.journal import Position
from messages.readings import decode_values, encode_values
from tools.bench import _tree, _walk, print_result, start_gateway

#: The held-out test set's seed (training used tools.training.dataset.DEFAULT_SEED).
BENCH_SEED = 7
T0 = 1_900_000_000 * 10**9


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def latency(session: InferenceSession, model_dir: str, compile_config: dict,
            rows: np.ndarray) -> dict:
    """Per-window latency through the session, and through a bare infer request."""
    ov = import_openvino()
    bare = ov.Core().compile_model(os.path.join(model_dir, MODEL_XML), "CPU",
                                   compile_config).create_infer_request()
    ours, raw = [], []
    for row in rows:
        x = row.reshape(1, -1)
        t0 = time.perf_counter()
        session.infer(x)
        t1 = time.perf_counter()
        bare.infer({0: x})
        t2 = time.perf_counter()
        ours.append((t1 - t0) * 1e6)
        raw.append((t2 - t1) * 1e6)
    return {
        "latency_us_p50": round(statistics.median(ours), 1),
        "latency_us_p99": round(_percentile(ours, 0.99), 1),
        "bare_openvino_us_p50": round(statistics.median(raw), 1),
        "bare_openvino_us_p99": round(_percentile(raw, 0.99), 1),
        "latency_ratio_p50": round(statistics.median(ours) / statistics.median(raw), 2),
        "latency_windows": len(rows),
    }


def vehicle_records(vehicles: int, seconds: float) -> list[Record]:
    """Journal records of simulated vehicles (imu 50 Hz, engine 10 Hz), in 0.2 s batches per
    sensor, interleaved as a journal holds them."""
    sources = []
    for v in range(vehicles):
        device = f"bench-{v:03d}"
        sources += [SimulatedSource("imu", 50, device, "imu0", 2 * v + 1, T0),
                    SimulatedSource("engine", 10, device, "engine0", 2 * v + 2, T0)]
    out: list[Record] = []
    step = 200_000_000
    for now in range(T0 + step, T0 + int(seconds * 1e9) + 1, step):
        for source in sources:
            for r in source.due(now, 10**6):
                pos = len(out) + 1
                out.append(Record(Position(pos), r.device_id, pos, r.sensor_id, r.ts, r.kind,
                                  encode_values(r.values)))
    return out


def runner_rate(model: ServingModel, vehicles: int, seconds: float) -> dict:
    """Records and windows/s through `ModelRunner.process`, beside decoding the same records'
    JSON values alone (what any consumer that reads values pays, the floor here)."""
    records = vehicle_records(vehicles, seconds)
    t0 = time.perf_counter()
    for record in records:
        decode_values(record.payload)
    decode_per_s = len(records) / (time.perf_counter() - t0)
    runner = ModelRunner(model, grace_ns=1_000_000_000)
    t0 = time.perf_counter()
    runner.process(records)
    elapsed = time.perf_counter() - t0
    windows = runner.counts["inferences"] + runner.counts["inference_errors"]
    return {
        "runner_records_per_s": round(len(records) / elapsed),
        "json_decode_records_per_s": round(decode_per_s),
        "runner_records_ratio": round(len(records) / elapsed / decode_per_s, 3),
        "runner_windows_per_s": round(windows / elapsed),
        "runner_windows": windows,
        "runner_records": len(records),
    }


def _config(port: int) -> str:
    return "\n".join([
        "[gateway]", 'device_id = "bench-001"', f"admin_port = {port}", "status_interval_s = 0",
        "[model]", "poll_s = 0.2", "grace_s = 1.0",
        "[[sensors]]", 'id = "imu0"', 'kind = "imu"', "rate_hz = 50", "seed = 1",
        "[[sensors]]", 'id = "engine0"', 'kind = "engine"', "rate_hz = 10", "seed = 3",
    ]) + "\n"


def actor_memory(port: int, timeout_s: float = 120) -> dict:
    """USS/RSS (MB) of the model runner and the router of a real gateway that infers."""
    workdir = tempfile.mkdtemp(prefix="fleetgw-bench-model-")
    gw = start_gateway(workdir, "gw", _config(port), port)
    try:
        deadline = time.monotonic() + timeout_s
        nodes: dict = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.SubprocessError, ValueError, KeyError):
                nodes = {n["name"]: n for n in _walk(_tree(port))}
                if nodes["model"]["figures"].get("inferences", 0) >= 3:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError("the gateway's model runner did not infer in time")
        out = {}
        for name in ("model", "router"):
            info = psutil.Process(nodes[name]["pid"]).memory_full_info()
            out[f"{name}_rss_mb"] = round(info.rss / 2**20, 1)
            out[f"{name}_uss_mb"] = round(info.uss / 2**20, 1)
        return out
    finally:
        gw.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run_bench(model_dir: str, seed: int, vehicles: int, seconds: float, port: int) -> dict:
    from tools.training.dataset import make_split
    from tools.training.evaluate import evaluate_model

    manifest = verify_model_dir(model_dir, trusted_keys())
    session = InferenceSession(os.path.join(model_dir, MODEL_XML), manifest["compile"])
    model = ServingModel.from_manifest(session, manifest, model_sha256(manifest))
    split = make_split("test", seed)
    rows = np.concatenate([as_input(x) for x in split.X.tolist()])
    result: dict = {"model_version": model.version, "test_seed": seed}
    result.update(latency(session, model_dir, manifest["compile"], rows))
    result.update(runner_rate(model, vehicles, seconds))
    result.update(actor_memory(port))
    quality = evaluate_model(model_dir, seed=seed)
    result["per_type"] = quality["per_type"]
    result["rules_only"] = quality["rules_only"]
    result["model_only"] = quality["model_only"]
    result["false_positive_rate"] = quality.get("false_positive_rate")
    result["cpus"] = os.cpu_count()
    return result


def bench_model_command(model_dir: str | None, seed: int, vehicles: int, seconds: float,
                        port: int, as_json: bool) -> int:
    print_result(run_bench(model_dir or shipped_model_dir(), seed, vehicles, seconds, port),
                 as_json)
    return 0
