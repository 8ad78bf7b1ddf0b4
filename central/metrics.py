"""The receiver's own Prometheus metrics: batches and rows ingested, duplicates absorbed,
refusals by reason, and how late the data arrives.

Where this sits: central, beside `central.receiver`. `Receiver.accept` reports every outcome
here (stored, duplicate, refused); ``GET /metrics`` on the receiver's server serves
`ReceiverMetrics.exposition` in the Prometheus text format. Each `ReceiverMetrics` owns its
own CollectorRegistry (never the process-wide default), so several receivers in one process
keep separate counts.

Labels are bounded: lanes (P1-P3), outcomes, record tables and the refusal codes in
`REFUSALS` — never a device id or free text. A stored batch costs one vectorised pass over its
records' event times (`ReceiverMetrics.stored`); duplicates are not counted as rows, bytes
are counted for every accepted body (stored or duplicate).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from central.config import DEFAULT_LATE_AFTER_S
from central.schema import RECORD_TABLES, Record
from messages.journal import LANES

PREFIX = "fleetgw_receiver_"
#: The content type of `ReceiverMetrics.exposition`.
CONTENT_TYPE = CONTENT_TYPE_LATEST
SYNCED_LANES = tuple(lane for lane in LANES if lane != "EPHEMERAL")
STORED, DUPLICATE = "stored", "duplicate"
#: Why a batch was refused; the ``reason`` label of ``fleetgw_receiver_refused_total``.
REFUSALS = {
    "bad_header": "the signed header is missing, malformed or inconsistent (400)",
    "unsupported_encoding": "wire encoding or compression this receiver does not take (415)",
    "unknown_device": "the device is not registered with this receiver (403)",
    "bad_signature": "the signature does not verify with the device's key (401)",
    "bad_body": "the body does not match the header: digest, compression, decoding, "
                "records (400)",
    "too_large": "the body, compressed or not, exceeds the receiver's limit (413)",
    "length_required": "no usable Content-Length (411)",
    "conflict": "a batch with this identity is stored with another body (409)",
    "device_key": "the device's key file on this receiver is unusable (500)",
    "storage": "storage failed or is unreachable (503)",
    "internal": "a defect in the receiver (500)",
}
#: Upper bounds of the ingest delay histogram's buckets, seconds: 1 s to 7 days.
DELAY_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                   21600.0, 43200.0, 86400.0, 172800.0, 604800.0)


class _DelayHistogram(Collector):
    """``fleetgw_receiver_ingest_delay_seconds``: a histogram that takes a batch's delays in
    one call (prometheus_client's Histogram observes one value at a time, ~1 µs each)."""

    name = PREFIX + "ingest_delay_seconds"

    def __init__(self) -> None:
        self._bounds = np.array(DELAY_BUCKETS_S)
        self._counts = np.zeros(len(DELAY_BUCKETS_S) + 1, np.int64)  # the last: +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, delays_s: np.ndarray) -> None:
        """Count each delay in the first bucket whose bound it does not exceed."""
        counts = np.bincount(np.searchsorted(self._bounds, delays_s, side="left"),
                             minlength=len(self._counts))
        total = float(delays_s.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        bounds = [floatToGoString(b) for b in DELAY_BUCKETS_S] + ["+Inf"]
        yield HistogramMetricFamily(
            self.name, "Ingest time minus event time of each stored row, seconds (an event "
                       "time ahead of the receiver's clock counts as 0)",
            buckets=list(zip(bounds, cumulative, strict=True)), sum_value=total)


class ReceiverMetrics:
    """The receiver's counters in their own registry. ``late_after_s``: a stored row whose
    event time is more than this behind its ingest time counts as late (> 0; the config's
    `ReceiverSettings.late_after_s`, validated there)."""

    def __init__(self, late_after_s: float = DEFAULT_LATE_AFTER_S) -> None:
        self.late_after_s = late_after_s
        self.registry = CollectorRegistry()
        r = self.registry
        batches = Counter(PREFIX + "batches", "Batches accepted, by lane and outcome (stored, "
                          "or duplicate: already stored, absorbed)", ("lane", "outcome"),
                          registry=r)
        rows = Counter(PREFIX + "rows", "Rows stored, by table (duplicates not counted)",
                       ("table",), registry=r)
        refused = Counter(PREFIX + "refused", "Batches refused, by reason: "
                          + "; ".join(f"{k}: {v}" for k, v in REFUSALS.items()),
                          ("reason",), registry=r)
        # every label value exists from the start: rate() and absent() work before the first
        self._batches = {(lane, outcome): batches.labels(lane, outcome)
                         for lane in SYNCED_LANES for outcome in (STORED, DUPLICATE)}
        self._rows = {table: rows.labels(table) for table in RECORD_TABLES}
        self._refused = {code: refused.labels(code) for code in REFUSALS}
        self._duplicate_rows = Counter(PREFIX + "duplicate_rows", "Rows in batches absorbed "
                                       "as duplicates (not stored again)", registry=r)
        self._bytes = Counter(PREFIX + "bytes", "Request body bytes of accepted batches "
                              "(stored or duplicate), as sent (compressed)", registry=r)
        self._late_rows = Counter(PREFIX + "late_rows", "Rows stored whose event time is more "
                                  f"than late_after_s ({late_after_s:g} s) behind their "
                                  "ingest time", registry=r)
        self._last_batch = Gauge(PREFIX + "last_batch_timestamp_seconds", "When the newest "
                                 "stored batch was received, Unix time (0: none yet)",
                                 registry=r)
        self._devices_seen = Gauge(PREFIX + "devices_seen", "Distinct devices with an "
                                   "accepted batch since the receiver started", registry=r)
        self._delays = _DelayHistogram()
        r.register(self._delays)
        ProcessCollector(registry=r)  # process_*: the receiver's memory, CPU, open files
        self._devices: set[str] = set()
        self._newest = 0.0
        self._lock = threading.Lock()

    def stored(self, device_id: str, lane: str, rows_by_table: Mapping[str, Sequence[Record]],
               body_bytes: int, received_at: dt.datetime) -> None:
        """A batch stored: its rows by table, their delays, its bytes."""
        self._batches[lane, STORED].inc()
        self._bytes.inc(body_bytes)
        received_ns = int(received_at.timestamp() * 1e9)
        n = 0
        for table, records in rows_by_table.items():
            self._rows[table].inc(len(records))
            n += len(records)
        if n:
            event_ns = np.fromiter((r.ts for records in rows_by_table.values()
                                    for r in records), np.int64, n)
            delays_s = np.maximum(received_ns - event_ns, 0) / 1e9
            self._delays.observe_many(delays_s)
            self._late_rows.inc(int(np.count_nonzero(delays_s > self.late_after_s)))
        with self._lock:
            self._seen(device_id)
            self._newest = max(self._newest, received_at.timestamp())
            self._last_batch.set(self._newest)

    def duplicate(self, device_id: str, lane: str, rows: int, body_bytes: int) -> None:
        """A batch already stored, acknowledged again: nothing stored."""
        self._batches[lane, DUPLICATE].inc()
        self._duplicate_rows.inc(rows)
        self._bytes.inc(body_bytes)
        with self._lock:
            self._seen(device_id)

    def refused(self, code: str) -> None:
        """A batch refused; ``code`` is one of `REFUSALS` (KeyError otherwise: a defect)."""
        self._refused[code].inc()

    def _seen(self, device_id: str) -> None:
        """Called under the lock; only for verified batches, so the set stays as small as
        the registered fleet."""
        if device_id not in self._devices:
            self._devices.add(device_id)
            self._devices_seen.set(len(self._devices))

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
