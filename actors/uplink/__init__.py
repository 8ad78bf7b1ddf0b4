"""The uplink: delayed sync of journal lanes to the central ClickHouse (data path step 6).

The modules:
- `envelope`: the signed batch — identity + body sha256 signed with Ed25519, zstd/gzip, and
  the checks the receiver runs before anything is decompressed or stored;
- `wire`: ``fleetgw.cols/1``, the column-wise, delta-encoded, lossless body (`varint`: its
  integer columns);
- `link`: token buckets per link class with P1's reserved budget, sync windows, metered-link
  rules, decorrelated-jitter backoff and the verdict of each failure;
- `planner`: batch boundaries per (device, lane) in lane priority, bounded by the router's
  cursor, persisted as consumer state before the first send and rebuilt byte-identically;
- `client`: the pycurl POST (keep-alive, timeouts, mTLS) that never raises for the network;
- `uplink`: `Uplink`: what to send next or why to wait, and what an answer means
  (acknowledged: advance the watermark; retry; split; later);
- `keys`: each device's signing key (`fleetgw provision device`);
- `actor`: `UplinkActor`, the shell in the tree (state commits, POST channels, builder thread,
  watermarks, model updates);
- `direct`: direct mode, INSERTs straight into a ClickHouse server;
- `model_update`: newer signed models from the receiver into the model registry.
"""
