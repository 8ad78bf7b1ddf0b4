"""A drill's timeline: every occurrence of every fault, and the end of each that ends.

Where this sits: between the drill file (`spec.FaultSection`) and the runner, which plays the
`Step`s in order at their times. Pure: the same file and seed give the same timeline (jitter
from a seeded RNG); ``--short`` only cuts it at the short duration.
"""

from __future__ import annotations

import random

import attrs

from tools.drill.spec import FaultSection


@attrs.frozen
class Step:
    """One thing to do at ``at_s`` seconds after the drill began: fault ``index`` of the file
    (its ``occurrence``-th repeat), or, with ``end``, the end of that fault (resume, restore,
    free, restart)."""

    at_s: float
    index: int
    occurrence: int
    fault: FaultSection
    end: bool = False


def occurrence_times(fault: FaultSection, duration_s: float) -> list[float]:
    """When ``fault`` happens, before jitter: at_s, then every every_s up to count times or
    until until_s (both unset: until the end), all before ``duration_s``."""
    if fault.every_s is None:
        return [fault.at_s] if fault.at_s < duration_s else []
    until = fault.until_s if fault.until_s is not None else duration_s
    times, k = [], 0
    while fault.count is None or k < fault.count:
        t = fault.at_s + k * fault.every_s
        if t > until or t >= duration_s:
            break
        times.append(round(t, 6))
        k += 1
    return times


def expand(faults: tuple[FaultSection, ...], duration_s: float, seed: int) -> list[Step]:
    """The timeline: every occurrence of every fault (with its seeded jitter) before
    ``duration_s``, and the end of each fault that ends (at the latest at ``duration_s``),
    in time order (an end before a start at the same moment)."""
    rng = random.Random(seed)
    steps: list[Step] = []
    for index, fault in enumerate(faults):
        for occurrence, planned in enumerate(occurrence_times(fault, duration_s)):
            at = planned + (rng.uniform(0.0, fault.jitter_s) if fault.jitter_s else 0.0)
            if at >= duration_s:
                continue
            at = round(at, 3)
            steps.append(Step(at, index, occurrence, fault))
            if fault.ends_after is not None:
                steps.append(Step(round(min(at + fault.ends_after, duration_s), 3), index,
                                  occurrence, fault, end=True))
    return sorted(steps, key=lambda s: (s.at_s, not s.end, s.index, s.occurrence))
