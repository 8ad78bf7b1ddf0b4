"""Metrics: the gateway's figures for Prometheus, and for its own health readings.

Where this sits: beside the data path, watching it. Every ``[metrics] refresh_s`` the metrics
actor asks the gateway root for the live supervision tree (each actor's state, restarts and
figures, as `fleetgw topology` shows them), reads the journal read-only (records, drops, what
waits per lane) and the host (disk, CPU temperature, load), and serves the result on
``GET /metrics`` (loopback by default, I9). ``sensor:health`` takes the same snapshots and
journals them as ``gateway_health`` readings, so they reach ClickHouse.

- `snapshot`: `GatewaySnapshot`, built by `build_snapshot` from a tree and the facts below
- `probes`: `JournalProbe` (the journal, read-only) and `read_host` (disk, temperature, load)
- `sampler`: `SnapshotSampler`, an actor's way to take snapshots without blocking its thread
- `exporter`: the Prometheus collector over the latest snapshot (``fleetgw_*`` metrics)
- `endpoint`: `MetricsEndpoint`, the HTTP server thread, retried while its port is taken
- `actor`: `MetricsActor`
"""
