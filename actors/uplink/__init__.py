"""The uplink: delayed sync of journal lanes to the central ClickHouse (data path step 6).

Built so far (issue 5, in progress):
- `envelope`: the signed batch — identity + body sha256 signed with Ed25519, zstd/gzip, and
  the checks the receiver runs before anything is decompressed or stored;
- `wire`: ``fleetgw.cols/1``, the column-wise, delta-encoded, lossless body (`varint`: its
  integer columns);
- `link`: token buckets per link class with P1's reserved budget, sync windows, metered-link
  rules, decorrelated-jitter backoff and the verdict of each failure.

Next: the Uplink actor (lane cursors, batch boundaries persisted before the first send,
pycurl with mTLS, watermarks back to the journal), provisioning and model updates over the air.
"""
