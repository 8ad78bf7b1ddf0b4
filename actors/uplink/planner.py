"""Batch planning: which records of which lane go next, with boundaries fixed before any send.

Where this sits on the data path: step 6, between the journal's lanes and the POST. The
`BatchPlanner` looks at what the router has routed (never beyond its cursor), lane by lane in
priority order (P1, P2, P3; EPHEMERAL is never synced), and cuts each device's unsynced records
into a `PlannedBatch` — ``(device, generation, lane, seq_lo..seq_hi, count)``. The uplink
persists the pending batches in its consumer state (`pending_to_state`, a state-only
ConsumerCommit of consumer "uplink") BEFORE the first send of each, so after any crash it
rebuilds (`build`) and resends exactly the same batch: same identity, same bytes, same dedup
token, so central stores it once (I5).

Eviction (I7) may take P2/P3 records of a pending batch before it is acknowledged (unsynced P1
never). `build` then sends what is left under the same identity (``count`` shrinks). Central
keeps the first version of an identity it stored; if the full version had already arrived, the
smaller one is answered 409 (conflict), which the uplink treats as acknowledged: the records
are central already. When nothing of a batch is left, `build` returns None: the batch is done
and nothing is sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import nacl.signing

from actors.journal.reader import JournalReader
from actors.uplink import envelope, wire

#: Lanes the uplink syncs, in priority order (EPHEMERAL stays local).
SYNCED_LANES = ("P1", "P2", "P3")
#: The consumer whose cursor bounds planning: records beyond it may still be unrouted.
ROUTER = "router"
#: Wire bytes a record costs beyond its payload text, at most (seq, ts and shape columns,
#: the text's length prefix); used to keep a batch under the receiver's raw-size limit.
RECORD_OVERHEAD_BYTES = 32
#: Pending batches per (device, lane) the planner keeps ahead of the acknowledgements.
DEFAULT_DEPTH = 1
STATE_VERSION = 1


@attrs.frozen(slots=True)
class PlannedBatch:
    """A batch's fixed identity: ``count`` records of ``device_id`` in ``lane`` with seqs in
    ``seq_lo..seq_hi`` (other lanes' seqs lie in between), of journal ``generation``."""

    device_id: str
    generation: str
    lane: str
    seq_lo: int
    seq_hi: int
    count: int

    @property
    def key(self) -> tuple[str, str]:
        """(device_id, lane): batches of one key are sent and acknowledged in seq order."""
        return self.device_id, self.lane

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlannedBatch:
        return cls(**data)


def pending_to_state(pending: Iterable[PlannedBatch]) -> str:
    """The uplink's consumer state: its pending batches as JSON text."""
    return json.dumps({"version": STATE_VERSION, "pending": [b.to_json() for b in pending]},
                      sort_keys=True, separators=(",", ":"))


def pending_from_state(state: str | None) -> list[PlannedBatch]:
    """Inverse of `pending_to_state` (None, a consumer that never committed: no batches)."""
    if state is None:
        return []
    data = json.loads(state)
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"uplink state version {data.get('version')!r} is not "
                         f"{STATE_VERSION} (written by another fleetgw?)")
    return [PlannedBatch.from_json(b) for b in data["pending"]]


class BatchPlanner:
    """Cuts lanes into batches of at most ``max_records`` records (per lane: a 413 halves it,
    see `split`) and about ``max_raw_bytes`` of wire body."""

    def __init__(self, max_records: int, max_raw_bytes: int) -> None:
        if max_records <= 0 or max_records > wire.MAX_RECORDS:
            raise ValueError(f"max_records must be in 1..{wire.MAX_RECORDS} (got {max_records})")
        if max_raw_bytes <= RECORD_OVERHEAD_BYTES:
            raise ValueError(f"max_raw_bytes must be > {RECORD_OVERHEAD_BYTES} "
                             f"(got {max_raw_bytes})")
        self.max_raw_bytes = max_raw_bytes
        self.max_records = dict.fromkeys(SYNCED_LANES, max_records)

    def split(self, lane: str, count: int) -> int:
        """Halve ``lane``'s batch size below a batch of ``count`` records the receiver found
        too large (413), so its re-plan is smaller; returns the new size (at least 1)."""
        self.max_records[lane] = max(1, min(self.max_records[lane], count) // 2)
        return self.max_records[lane]

    def next_batches(self, reader: JournalReader, lanes: Sequence[str] = SYNCED_LANES,
                     pending: Sequence[PlannedBatch] = (),
                     depth: int = DEFAULT_DEPTH) -> list[PlannedBatch]:
        """New batches, lanes in the given priority order, devices in id order: per device
        with a backlog, the records after max(watermark, highest pending ``seq_hi``) up to the
        router's cursor. A (device, lane) already holding ``depth`` pending batches waits."""
        if not_synced := [lane for lane in lanes if lane not in SYNCED_LANES]:
            raise ValueError(f"lanes {not_synced} are never synced (only {SYNCED_LANES})")
        upto = reader.cursor(ROUTER)
        marks = reader.watermarks()
        ahead: dict[tuple[str, str], list[PlannedBatch]] = {}
        for batch in pending:
            ahead.setdefault(batch.key, []).append(batch)
        planned = []
        for lane in lanes:
            for device_id in reader.lane_devices(lane, upto):
                queued = ahead.get((device_id, lane), [])
                if len(queued) >= depth:
                    continue
                after = max([marks.get(device_id, {}).get(lane, 0)]
                            + [b.seq_hi for b in queued])
                seqs = self._fit(reader.lane_sizes(lane, device_id, after, upto,
                                                   self.max_records[lane]))
                if seqs:
                    planned.append(PlannedBatch(device_id, reader.generation, lane,
                                                seqs[0], seqs[-1], len(seqs)))
        return planned

    def _fit(self, sizes: list[tuple[int, int]]) -> list[int]:
        """The seqs of the longest prefix within ``max_raw_bytes`` (at least one record)."""
        total = 0
        for i, (_, nbytes) in enumerate(sizes):
            total += nbytes + RECORD_OVERHEAD_BYTES
            if total > self.max_raw_bytes and i > 0:
                return [seq for seq, _ in sizes[:i]]
        return [seq for seq, _ in sizes]

    @staticmethod
    def build(reader: JournalReader, batch: PlannedBatch, signing_key: nacl.signing.SigningKey,
              gateway_id: str) -> envelope.SignedBatch | None:
        """The signed batch of ``batch``: byte for byte the same on every rebuild while its
        records are unchanged; what is left of it, same identity, after eviction took some;
        None when nothing is left (or the journal is another generation now): done."""
        if batch.generation != reader.generation:
            return None
        records = reader.read_lane_range(batch.lane, batch.device_id, batch.seq_lo,
                                         batch.seq_hi)
        if not records:
            return None
        raw = wire.encode(batch.device_id, [wire.WireRecord.from_record(r) for r in records])
        return envelope.seal(raw, signing_key, gateway_id=gateway_id,
                             device_id=batch.device_id, generation=batch.generation,
                             lane=batch.lane, seq_lo=batch.seq_lo, seq_hi=batch.seq_hi,
                             count=len(records))
