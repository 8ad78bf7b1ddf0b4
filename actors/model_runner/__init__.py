"""The model runner: deterministic safety rules and OpenVINO inference on device windows.

Where this sits on the data path (DESIGN.md step 5): a journal consumer with a durable cursor,
beside the router. It reads imu and engine records after its cursor, checks each against the
safety rules (harsh braking, impact, overheating: a hit is a safety event at once), builds
2-second windows per device, turns each closed window into 64 features and runs the registry's
active OpenVINO model on it. Every window gets exactly one ``inference`` record (model version
and sha256, score, confidence, label, input sha256, latency) or ``inference-error`` record
(the reason); anomalies become ``safety-event`` records, which the example policy routes to
P1. Outputs, state and cursor commit together (I4).

- `features`: the window features (feature set ``fleetgw.window.v1``), shared with training
- `windows`: `WindowBuilder`, per-device tumbling windows with lateness and clock steps
- `rules`: the deterministic safety rules
- `openvino_env`: importing OpenVINO with its telemetry blocked (I9)
- `inference`: `InferenceSession` (compile settings, input validation)
- `manifest`: signed manifests (Ed25519) and file hashes
- `registry`: installed models, the active pointer, install / activate / rollback
- `selftest`: a model's self-test, in a child process or in-process
- `runner`: `ModelRunner`, the logic; `actor`: `ModelRunnerActor`, its shell

Training (offline) lives in tools/training and uses `features` and `inference` too.
"""
