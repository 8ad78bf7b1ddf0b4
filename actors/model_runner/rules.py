"""Deterministic safety rules: the clearly defined events, checked on every reading.

Where this sits on the data path: step 5, beside the model. The model runner checks every imu
and engine reading against `SAFETY_RULES` as it reads it (a rule needs no window); a hit
becomes a safety-event record that the example policy routes to P1. The model covers what
these thresholds cannot (cornering, rpm/speed mismatch, stuck sensors, the unforeseen).

- harsh_braking: deceleration beyond 0.45 g (ax, forward positive, below -0.45 g)
- impact: acceleration beyond 2.5 g, gravity removed (|(ax, ay, az - g)|)
- overheating: coolant above 105 degC
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

G = 9.80665


@attrs.frozen(slots=True)
class RuleHit:
    """A reading that broke a rule: which rule (an anomaly type), the measured value and the
    threshold it crossed (same unit)."""

    rule: str
    value: float
    threshold: float


def _number(values: Mapping[str, Any], name: str) -> float | None:
    x = values.get(name)
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


HARSH_BRAKING_MS2 = -0.45 * G
IMPACT_MS2 = 2.5 * G
OVERHEATING_C = 105.0


def check_imu(values: Mapping[str, Any]) -> list[RuleHit]:
    hits = []
    ax, ay, az = (_number(values, n) for n in ("ax", "ay", "az"))
    if ax is not None and ax < HARSH_BRAKING_MS2:
        hits.append(RuleHit("harsh_braking", ax, HARSH_BRAKING_MS2))
    if ax is not None and ay is not None and az is not None:
        magnitude = math.sqrt(ax * ax + ay * ay + (az - G) * (az - G))
        if magnitude > IMPACT_MS2:
            hits.append(RuleHit("impact", magnitude, IMPACT_MS2))
    return hits


def check_engine(values: Mapping[str, Any]) -> list[RuleHit]:
    coolant = _number(values, "coolant_c")
    if coolant is not None and coolant > OVERHEATING_C:
        return [RuleHit("overheating", coolant, OVERHEATING_C)]
    return []


#: kind -> the rule check of its readings.
SAFETY_RULES = {"imu": check_imu, "engine": check_engine}
#: When one window breaks several rules, the most severe names it (evaluation, labels).
SEVERITY = ("impact", "harsh_braking", "overheating")


def check(kind: str, values: Mapping[str, Any]) -> list[RuleHit]:
    """The rules ``values`` (a reading of ``kind``) breaks; [] for kinds without rules."""
    rule = SAFETY_RULES.get(kind)
    return rule(values) if rule is not None else []
