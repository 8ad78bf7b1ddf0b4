"""Sampling: keep at most one record every ``every_s`` per stream while a condition holds.

Where this sits on the data path: step 4, the first step after matching for a rule with
``sample`` (e.g. GPS once every 30 s while the vehicle stands: ``while = "speed_kmh < 1"``).
A record for which ``while`` does not hold (including one missing the value) is kept and does
not count as a sample, so the first record after the vehicle stops is always kept. Records
dropped here go no further (not deduplicated, not aggregated).

The state (per stream: the ts of the last sampled record) is a JSON-able dict that the router
persists with its cursor (I4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from actors.router.verdict import (
    FIRST,
    NOT_SAMPLED,
    SAMPLED,
    SAMPLED_OUT,
    STATE_VERSION,
    Keyed,
    StreamKey,
    Verdict,
    check_state_version,
)
from config.policy import Rule

_KEEP_NOT_SAMPLED = Verdict(True, NOT_SAMPLED, "the sampling condition does not hold")
_KEEP_FIRST = Verdict(True, FIRST, "first sample of its stream")
_KEEP_SAMPLED = Verdict(True, SAMPLED, "every_s or more since the last sample")


class Sampler:
    """Keep/drop decisions for rules with ``sample``, per stream (device, sensor, rule)."""

    def __init__(self) -> None:
        self._last_ts: dict[StreamKey, int] = {}

    def __len__(self) -> int:
        return len(self._last_ts)

    def offer(self, record: Keyed, rule: Rule, values: Mapping[str, Any]) -> Verdict:
        """Decide on ``record`` under ``rule.sample``; a kept sample restarts the interval.

        A record closer than ``every_s`` to the last sample in either direction (ts may step
        back when batches were resent) is dropped."""
        spec = rule.sample
        assert spec is not None, f"{rule.where} has no sample"
        if spec.while_ is not None and not spec.while_(values):
            return _KEEP_NOT_SAMPLED
        key = (record.device_id, record.sensor_id, rule.name)
        ts = record.ts
        last = self._last_ts.get(key)
        if last is not None and abs(ts - last) < spec.every_ns:
            return Verdict(False, SAMPLED_OUT, f"{abs(ts - last) / 1e9:g} s since the last "
                                               f"sample < every {spec.every_s:g} s")
        self._last_ts[key] = ts
        return _KEEP_FIRST if last is None else _KEEP_SAMPLED

    def to_state(self) -> dict[str, Any]:
        """JSON-able state: per stream the ts of the last sampled record."""
        return {
            "version": STATE_VERSION,
            "streams": [
                {"device_id": d, "sensor_id": s, "rule": r, "ts": ts}
                for (d, s, r), ts in sorted(self._last_ts.items())
            ],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Sampler:
        """The sampler `to_state` described. Raises ValueError for another version."""
        check_state_version(state, "sampler")
        sampler = cls()
        for s in state["streams"]:
            sampler._last_ts[(s["device_id"], s["sensor_id"], s["rule"])] = s["ts"]
        return sampler
