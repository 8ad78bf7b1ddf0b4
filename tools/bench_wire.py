"""`fleetgw bench wire`: bytes a reading on the uplink's wire, beside the seed design's format.

Where this sits: outside the gateway, beside the other benches. It simulates a drive of the
demo vehicle (config/demo.toml: imu 50 Hz, gps 1 Hz, engine 10 Hz) with the gateway's own
simulator, as journal records of one device (seq 1.. in time order), cut into the uplink's
batches of up to 5000 records. Per batch it measures:

- ours: `actors.uplink.wire.encode`, sealed as the uplink sends it (`envelope.seal`: zstd
  level 9 and the signed header), counting the compressed body plus the base64 header and the
  hex signature;
- the baseline: the seed design's JSONEachRow rows ``{device_id, event_ts, seq, payload,
  model_version}``, gzip level 6 (no signature: the baseline is given that for free), and the
  same rows with zstd level 9 as a second reference.

It checks that every batch decodes to exactly the records encoded, and times `encode` and
`decode` (the best of a few passes: the figure this machine sustains, not its noise).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import time
from collections.abc import Sequence

import nacl.signing

from actors.sensors.sim import SimulatedSource
from actors.uplink.envelope import compress, seal
from actors.uplink.wire import WireRecord, decode, encode
from config.loader import default_config_path, load_config
from messages.readings import encode_values
from tools.bench import print_result

#: The uplink's batch: up to this many records of one device.
BATCH_RECORDS = 5000
#: The drive starts at a fixed instant (2026-05-28T20:26:40Z): same drive, same figures.
START_NS = 1_780_000_000 * 10**9
MODEL_VERSION = "2026.11.1"
GZIP_LEVEL = 6
#: Timing passes over all batches; the fastest counts.
TIMING_PASSES = 3
#: The most a wire reading may cost beside the baseline's.
RATIO_BAR = 0.33


def simulate_drive(seconds: float) -> tuple[str, list[WireRecord]]:
    """(device_id, records) of ``seconds`` of driving by the demo config's simulated sensors:
    one device, seq 1.. in time order (sensors in config order at equal times)."""
    config = load_config(default_config_path())
    end_ns = START_NS + round(seconds * 1e9) - 1
    readings = []
    for order, sensor in enumerate(config.sensors):
        source = SimulatedSource.from_settings(sensor, config.device_of(sensor), START_NS)
        readings += [(r.ts, order, r) for r in source.due(end_ns, source.backlog(end_ns))]
    readings.sort(key=lambda item: item[:2])
    devices = {r.device_id for _, _, r in readings}
    if len(devices) != 1:
        raise ValueError(f"the demo config should simulate one device (got {sorted(devices)})")
    records = [WireRecord(seq, r.sensor_id, r.ts, r.kind, encode_values(r.values))
               for seq, (_, _, r) in enumerate(readings, 1)]
    return devices.pop(), records


def baseline_rows(device_id: str, records: Sequence[WireRecord]) -> bytes:
    """The seed design's JSONEachRow body: event_ts ISO-8601 with ms, payload a JSON string."""
    lines = []
    for r in records:
        when = dt.datetime.fromtimestamp(r.ts // 10**9, dt.UTC)
        lines.append(json.dumps({
            "device_id": device_id,
            "event_ts": f"{when:%Y-%m-%dT%H:%M:%S}.{r.ts // 10**6 % 1000:03d}Z",
            "seq": r.seq, "payload": r.payload, "model_version": MODEL_VERSION,
        }, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


def sealed_size(raw: bytes, device_id: str, batch: Sequence[WireRecord],
                key: nacl.signing.SigningKey) -> int:
    """Bytes the uplink sends for a batch encoded as ``raw``: the compressed body (zstd level
    9), the base64 header and the hex signature (HTTP framing aside)."""
    sealed = seal(raw, key, gateway_id="bench-gw", device_id=device_id, generation="0" * 32,
                  lane="P2", seq_lo=batch[0].seq, seq_hi=batch[-1].seq, count=len(batch))
    return len(sealed.body) + len(sealed.header_b64) + len(sealed.signature_hex)


def _best_rate(records: int, run) -> float:
    """Records a second of ``run()`` (all batches), the fastest of TIMING_PASSES."""
    best = float("inf")
    for _ in range(TIMING_PASSES):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return records / best


def run_bench(seconds: float) -> dict:
    device_id, records = simulate_drive(seconds)
    batches = [records[i:i + BATCH_RECORDS] for i in range(0, len(records), BATCH_RECORDS)]
    key = nacl.signing.SigningKey.generate()  # throwaway: only the signature's size counts
    ours = baseline = baseline_zstd = 0
    raws = [encode(device_id, batch) for batch in batches]
    lossless = all(decode(raw) == (device_id, batch)
                   for raw, batch in zip(raws, batches, strict=True))
    for raw, batch in zip(raws, batches, strict=True):
        ours += sealed_size(raw, device_id, batch, key)
        rows = baseline_rows(device_id, batch)
        baseline += len(gzip.compress(rows, compresslevel=GZIP_LEVEL, mtime=0))
        baseline_zstd += len(compress(rows))
    n = len(records)
    return {
        "bytes_per_reading": round(ours / n, 3),
        "baseline_bytes_per_reading": round(baseline / n, 3),
        "ratio": round(ours / baseline, 4),
        "ratio_bar": RATIO_BAR,
        "json_zstd_bytes_per_reading": round(baseline_zstd / n, 3),
        "readings": n,
        "batches": len(batches),
        "encode_records_per_s": round(_best_rate(n, lambda: [encode(device_id, b)
                                                             for b in batches])),
        "decode_records_per_s": round(_best_rate(n, lambda: [decode(raw) for raw in raws])),
        "lossless": lossless,
    }


def bench_wire_command(seconds: float, as_json: bool) -> int:
    """Print the figures; exit status 1 if a batch did not round-trip exactly."""
    result = run_bench(seconds)
    print_result(result, as_json)
    return 0 if result["lossless"] else 1
