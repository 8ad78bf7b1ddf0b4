"""Verdicts and stream keys: the shared vocabulary of the router's stateful steps.

Where this sits on the data path: step 4 — after the engine picked a rule, the sampler and the
deduplicator each give a `Verdict` on the record (keep, or drop with a reason that metrics count,
I7: every dropped record is counted by reason). Their state, and the aggregator's, is kept per
*stream*: one device's one sensor under one rule (`StreamKey`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs

#: Version of the JSON-able state the stateful steps write (`to_state`); bump on any change.
STATE_VERSION = 1

#: (device_id, sensor_id, rule name): records of one stream are compared with each other only.
StreamKey = tuple[str, str, str]

# Reason codes (stable: metrics and logs use them).
FIRST = "first"  #: keep: the stream's first record
WINDOW = "window"  #: keep: the last kept record is at least a window away
CHANGED = "changed"  #: keep: a compared field differs from the last kept record
MOVED = "moved"  #: keep: the position moved at least min_distance_m
NO_POSITION = "no-position"  #: keep: a position is missing, so nearness cannot be shown
NOT_SAMPLED = "while-false"  #: keep: the sampling condition does not hold
SAMPLED = "sampled"  #: keep: at least every_s since the last sampled record
KEPT = "kept"  #: keep: the rule has no step that could drop it
DUPLICATE = "duplicate"  #: drop: identical to the last kept record within the window
NEAR = "near"  #: drop: identical, and moved less than min_distance_m within the window
SAMPLED_OUT = "sampled-out"  #: drop: less than every_s since the last sampled record


@attrs.frozen(slots=True)
class Verdict:
    """Keep or drop one record; ``reason`` is a stable code, ``detail`` says it for people."""

    keep: bool
    reason: str
    detail: str = ""


KEEP = Verdict(True, KEPT)


class Keyed(Protocol):
    """What the stateful steps read of a record (a journal `Record` fits)."""

    @property
    def device_id(self) -> str: ...
    @property
    def sensor_id(self) -> str: ...
    @property
    def ts(self) -> int: ...


def check_state_version(state: Mapping[str, Any], what: str) -> None:
    """Refuse state written in another format (ValueError naming it)."""
    version = state.get("version") if isinstance(state, Mapping) else None
    if version != STATE_VERSION:
        raise ValueError(f"{what} state version {version!r} is not {STATE_VERSION} "
                         f"(written by another fleetgw version)")
