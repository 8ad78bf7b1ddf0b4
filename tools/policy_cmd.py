"""`fleetgw policy check FILE [--explain RECORD_JSON]`: validate a routing policy, and show
which rule a record takes and why.

Where this sits: beside the data path, for operators writing a policy before it reaches a
vehicle — it loads the file the way the router will (`config.policy.load_policy`, no journal,
no actors) and, given a record in a Reading's external form
(``{"device_id", "sensor_id", "ts", "kind", "values"}``), prints the rules tried in order, the
one that matched, its lane and what the router does in that lane.
Exit status: 0 valid, 2 invalid policy or record (the problems on stderr).
The lead wires this into argparse (tools/cli.py).
"""

from __future__ import annotations

import json
import sys

from actors.router.engine import PolicyEngine
from config.policy import Policy, PolicyError, load_policy
from messages.errors import MessageValidationError
from messages.readings import Reading

EXIT_OK = 0
EXIT_INVALID = 2


def format_summary(policy: Policy) -> str:
    """One line per rule: index, name, lane, what it matches, its options."""
    lines = [f"ok: {policy.source}: {len(policy.rules)} rules, default lane {policy.default.lane}"]
    for rule in (*policy.rules, policy.default):
        match = []
        if rule.sensors:
            match.append("sensor " + "|".join(rule.sensors))
        if rule.kinds:
            match.append("kind " + "|".join(rule.kinds))
        if rule.when is not None:
            match.append(f"when {rule.when}")
        if not rule.is_default and not match:
            match.append("every record")
        options = [k for k in ("sample", "dedup", "aggregate") if getattr(rule, k) is not None]
        if rule.ttl_s is not None:
            options.insert(0, f"ttl {rule.ttl_s:g}s")
        where = "default" if rule.is_default else f"{rule.index:>2} {rule.name}"
        lines.append(f"  {where:<28} {rule.lane:<9} {'; '.join(match):<48} {', '.join(options)}"
                     .rstrip())
    return "\n".join(lines)


def check_command(path: str, explain: str | None) -> int:
    """Validate the policy at ``path``; 0 when valid (a summary printed, or with ``explain``
    the route of that record), 2 when the policy or the record is invalid."""
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        print(f"fleetgw policy check: {len(exc.problems)} problem(s)", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return EXIT_INVALID
    if explain is None:
        print(format_summary(policy))
        return EXIT_OK
    try:
        reading = Reading.from_external(json.loads(explain))
    except json.JSONDecodeError as exc:
        print(f"fleetgw policy check: --explain: not valid JSON: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except MessageValidationError as exc:
        print(f"fleetgw policy check: --explain: {exc} (expected an object with device_id, "
              f"sensor_id, ts (ns since the epoch), kind and values)", file=sys.stderr)
        return EXIT_INVALID
    print(PolicyEngine(policy).explain(reading))
    return EXIT_OK
