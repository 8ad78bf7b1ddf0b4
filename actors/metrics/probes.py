"""Reading what a snapshot needs besides the tree: the journal file (read-only) and the host.

Where this sits: `actors.metrics.sampler.SnapshotSampler` calls these in its worker thread,
never in an actor's own thread (a big backlog or a slow SD card must not delay heartbeats).
Only the journal actor writes journal.db (I3): `JournalProbe` opens it read-only, like any
consumer, and a journal not created yet, or unreadable for a moment, is "no facts", not an error.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import time
from collections.abc import Callable

import apsw

from actors.journal.reader import JournalReader, LaneBacklog
from actors.journal.schema import JournalError
from actors.metrics.snapshot import HostFacts, JournalFacts
from config.metrics import NO_CPU_TEMP

#: The lane backlog's query runs at most this fraction of the time: it is re-run after
#: max(refresh, its last duration / BACKLOG_DUTY) seconds. Measured on x86 (idle): 0.35 s for
#: 880k waiting records (1M journal); a Pi is several times slower.
BACKLOG_DUTY = 0.05
#: Thermal zone types of a CPU package sensor, preferred in this order.
CPU_ZONE_TYPES = ("cpu-thermal", "x86_pkg_temp")
THERMAL_DIR = "/sys/class/thermal"


class JournalProbe:
    """The journal's facts for snapshots, from its own read-only connection (opened on first
    use, reopened after an error). Not thread-safe: one thread uses it."""

    def __init__(self, path: str, min_interval_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self.min_interval_s = min_interval_s
        self.clock, self.wall_ns = clock, wall_ns
        self.reader: JournalReader | None = None
        #: The last backlog measured: (lanes, wall clock ns, seconds the query took).
        self.backlog: tuple[tuple[LaneBacklog, ...], int, float] | None = None
        self.backlog_due = float("-inf")
        #: Why the last read found nothing ("" when it did).
        self.problem = ""

    def read(self) -> JournalFacts | None:
        """The journal's facts now, with the backlog re-measured when due; None when the
        journal cannot be read (``problem`` says why)."""
        try:
            if self.reader is None:
                self.reader = JournalReader(self.path)
            if self.backlog is None or self.clock() >= self.backlog_due:
                self.measure_backlog(self.reader)
            assert self.backlog is not None
            facts = JournalFacts(self.reader.last_position().value, self.reader.usage_bytes(),
                                 self.reader.drops(), *self.backlog)
        except (JournalError, apsw.Error, OSError) as exc:
            self.problem = f"cannot read the journal: {exc}"
            self.close()
            return None
        self.problem = ""
        return facts

    def measure_backlog(self, reader: JournalReader) -> None:
        started = self.clock()
        lanes = reader.backlog()
        took = self.clock() - started
        self.backlog = (lanes, self.wall_ns(), took)
        self.backlog_due = started + max(self.min_interval_s, took / BACKLOG_DUTY)

    def close(self) -> None:
        if self.reader is not None:
            reader, self.reader = self.reader, None
            with contextlib.suppress(apsw.Error):
                reader.close()


def _zone_number(zone: str) -> int:
    suffix = zone.rsplit("thermal_zone", 1)[1]
    return int(suffix) if suffix.isdigit() else 1 << 30


def _zone_type(zone: str) -> str:
    try:
        with open(os.path.join(zone, "type")) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def find_cpu_temp_path(thermal_dir: str = THERMAL_DIR) -> str:
    """The CPU's temperature file: that of the first thermal zone whose type is in
    `CPU_ZONE_TYPES` (in that order), else the first zone's; "" when there is none."""
    zones = sorted((z for z in glob.glob(os.path.join(thermal_dir, "thermal_zone*"))
                    if os.path.isfile(os.path.join(z, "temp"))), key=_zone_number)
    types = {zone: _zone_type(zone) for zone in zones}
    chosen = next((z for wanted in CPU_ZONE_TYPES for z in zones if types[z] == wanted),
                  zones[0] if zones else None)
    return os.path.join(chosen, "temp") if chosen else ""


def resolve_cpu_temp_path(setting: str, thermal_dir: str = THERMAL_DIR) -> str:
    """``[metrics] cpu_temp_path`` as a file to read ("" when none): "" auto-detects, "none"
    turns it off, anything else is the file."""
    if setting == NO_CPU_TEMP:
        return ""
    return setting or find_cpu_temp_path(thermal_dir)


def read_cpu_temp_c(path: str) -> float | None:
    """Degrees Celsius from a sysfs temperature file (millidegrees); None when unreadable."""
    if not path:
        return None
    try:
        with open(path) as fh:
            return int(fh.read().strip()) / 1000.0
    except (OSError, ValueError):
        return None


def read_host(data_dir: str, cpu_temp_path: str) -> HostFacts:
    """The host's facts: the filesystem holding ``data_dir``, the temperature in
    ``cpu_temp_path`` ("" for none) and the load averages. What cannot be read is None."""
    try:
        disk = shutil.disk_usage(data_dir)
        total, used, free = disk.total, disk.used, disk.free
    except OSError:
        total = used = free = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return HostFacts(total, used, free, read_cpu_temp_c(cpu_temp_path), load)
