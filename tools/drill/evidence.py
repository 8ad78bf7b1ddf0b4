"""What a drill gathered: the rig's results plus what the checks need beyond them.

Where this sits: between `runner` (which gathers) and `checks` (which judge). `Evidence`
bundles `RigResults` with the load's ledger, the journal's consumer facts (I4, I7), the
sockets seen (I9), the floods sent (I8), the readings each sensor had acknowledged and the
recovery of each actor a fault hit (`recoveries`, from the harness's read-back). The
derivations from the live tree's samples and the fault events (`sensor_acked`,
`excused_windows`) are pure functions here, so the
checks are testable with hand-made figures; `read_journal_facts` is the one read of the
journal after the rig finished.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from tools.harness.results import Recovery, RigResults
from tools.harness.rig import Sample, walk

#: Fault event targets (`FaultEvent.target`) whose fault stops commits for a good reason:
#: the journal itself, the whole gateway (power cut), every sensor (their supervisor), the
#: disk and the clock. I6 excuses pauses overlapping these faults.
COMMIT_STOPPING_TARGETS = frozenset({"journal", "gateway", "sensors", "disk", "clock"})



@attrs.define
class LoadLedger:
    """The MQTT load: what was published, what the broker acknowledged (PUBACK), what never
    got an answer (its connection round was cut), and how often each number was journaled."""

    sensor: str
    topic: str
    published: int
    acked: frozenset[int]
    unknown: frozenset[int]
    journaled: dict[int, int]

    def missing(self) -> list[int]:
        """Acknowledged numbers the journal does not hold (I1 violations), in order."""
        return sorted(n for n in self.acked if n not in self.journaled)

    def duplicated(self) -> int:
        """Numbers the journal holds more than once."""
        return sum(1 for times in self.journaled.values() if times > 1)

    def to_json(self) -> dict[str, Any]:
        return {"sensor": self.sensor, "topic": self.topic, "published": self.published,
                "acked": len(self.acked), "unknown": len(self.unknown),
                "journaled": sum(1 for n in self.acked if n in self.journaled),
                "missing": len(self.missing()), "journal_duplicates": self.duplicated()}


@attrs.define
class JournalFacts:
    """Read from the journal after the drain run."""

    #: records per sensor id (the router's aggregates not counted)
    records_per_sensor: dict[str, int] = attrs.field(factory=dict)
    #: the router's durable cursor (a position), None if it never committed
    router_cursor: int | None = None
    #: records at or below the router's cursor (still in the journal)
    records_below_cursor: int = 0
    #: of those, records without a lane: cursor moved without the router's outputs (I4)
    unrouted_below_cursor: int = 0
    #: P1 seqs evicted above their device's P1 watermark: unsynced P1 evicted (I7)
    unsynced_p1_evicted: int = 0


@attrs.define
class SocketWatch:
    """I9, watched: the gateway's sockets sampled while it ran."""

    samples: int = 0
    #: sockets seen listening (TCP LISTEN, bound UDP) on loopback, distinct (address, kind)
    loopback: list[str] = attrs.field(factory=list)
    #: listening beyond loopback, not asked for by the config: {pid, process, address, kind}
    exposed: list[dict[str, Any]] = attrs.field(factory=list)
    #: listening beyond loopback because the config asks for it (e.g. CAN over multicast UDP)
    configured: list[str] = attrs.field(factory=list)
    #: connections to addresses beyond loopback (phoning home): {pid, process, remote}
    outbound: list[dict[str, Any]] = attrs.field(factory=list)


@attrs.define
class Evidence:
    """Everything the checks judge."""

    results: RigResults
    journal: JournalFacts
    #: readings each sensor had acknowledged by the journal (summed over its incarnations, as
    #: last seen in the tree): a lower bound of what the journal promised to keep
    sensor_acked: dict[str, int]
    recoveries: list[Recovery]
    #: (start, end, why) rig seconds where commit pauses are excused (I6)
    excused: list[tuple[float, float, str]]
    sockets: SocketWatch
    #: flooded sensor id -> (sensor type, malformed inputs sent; MQTT: acknowledged)
    floods: dict[str, tuple[str, int]] = attrs.field(factory=dict)
    #: actor name -> faults the drill applied to it (kill, pause, inject, flood)
    hits: dict[str, int] = attrs.field(factory=dict)
    load: LoadLedger | None = None
    #: I3: how many times the rig looked for other writers of journal.db
    writer_checks: int = 0
    #: what the link proxy carried (connections, bytes_up, bytes_down, resets); empty: none
    link: dict[str, int] = attrs.field(factory=dict)

    @property
    def evicted(self) -> int:
        """Records the journal evicted (I7), any reason."""
        from actors.journal.journal import EVICTION_ORDER

        return sum(n for key, n in self.results.drops.items()
                   if key.split("/")[0] in EVICTION_ORDER)


def shifted(results: RigResults, t0: float) -> RigResults:
    """``results`` with its times (fault events, commit age samples) in seconds since ``t0``
    (rig seconds) instead of since the rig was made."""
    def at(value: float | None) -> float | None:
        return None if value is None else round(value - t0, 3)

    events = [{**e, "at_s": at(e["at_s"]), "ended_s": at(e.get("ended_s"))}
              for e in results.events]
    ages = [(round(t - t0, 3), age) for t, age in results.commit_ages]
    foreign = [{**f, "at_s": at(f["at_s"])} if "at_s" in f else f
               for f in results.foreign_writers]
    return attrs.evolve(results, events=events, commit_ages=ages, foreign_writers=foreign)


def sensor_acked(samples: Iterable[Sample]) -> dict[str, int]:
    """Readings the journal acknowledged to each sensor (by sensor id): for each incarnation
    (pid) the highest ``acked_readings`` it showed, summed."""
    best: dict[tuple[str, int], int] = {}
    for sample in samples:
        for node in walk(sample.tree):
            name, acked = node["name"], (node.get("figures") or {}).get("acked_readings")
            if name.startswith("sensor:") and node.get("pid") and acked is not None:
                key = (name.removeprefix("sensor:"), node["pid"])
                best[key] = max(best.get(key, 0), int(acked))
    totals: dict[str, int] = {}
    for (sensor, _), acked in best.items():
        totals[sensor] = totals.get(sensor, 0) + acked
    return totals


def excused_windows(events: Sequence[dict[str, Any]], found: Sequence[Recovery],
                    settle_s: float) -> list[tuple[float, float, str]]:
    """Where I6 excuses commit pauses: from each fault of a `COMMIT_STOPPING_TARGETS` target
    until it ended (or its target ran again) plus ``settle_s``."""
    recovered = {(r.target, r.at_s): r.recovered_s for r in found}
    windows = []
    for event in events:
        target, at = event["target"], event["at_s"]
        if target not in COMMIT_STOPPING_TARGETS:
            continue
        end = event.get("ended_s")
        took = recovered.get((target, at))
        if took is not None:
            end = max(end or at, at + took)
        if end is None:  # never ended (a disk never freed, a journal never back): to the end
            end = float("inf")
        windows.append((at, end + settle_s, f"{event['kind']} of {target}"))
    return windows


def read_journal_facts(journal_path: str) -> JournalFacts:
    """The journal's consumer facts, read after the rig finished."""
    import apsw

    from actors.journal.reader import JournalReader

    with JournalReader(journal_path) as reader:
        per_sensor = reader.records_per_sensor()
        cursor = reader.cursor("router")
    conn = apsw.Connection(journal_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        below, unrouted = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE lane IS NULL) FROM records "
            "WHERE pos <= ?", (cursor.value,)).fetchone()
        # Evicted runs of P1 above the device's P1 watermark: unsynced P1 gone (I7).
        unsynced_p1 = conn.execute(
            "SELECT coalesce(sum(e.seq_hi - max(e.seq_lo - 1, coalesce(w.seq, 0))), 0) "
            "FROM evicted e LEFT JOIN watermarks w ON w.device_id = e.device_id "
            "AND w.lane = 'P1' WHERE e.lane = 'P1' AND e.seq_hi > coalesce(w.seq, 0)"
        ).fetchone()[0]
    finally:
        conn.close()
    return JournalFacts(per_sensor, cursor.value if cursor.value else None, below, unrouted,
                        unsynced_p1)
