"""The supervision tree as data: child specs and supervisor flags, checked by a pure `validate`.

Where this sits: `supervisors.tree` turns a gateway config into a `SupervisorSpec`; the
`Supervisor` actor (supervisors.supervisor) starts and restarts children exactly as the spec
says. Nothing here starts anything, so the CLI and tests can check a tree cheaply (OTP's
``init/1`` + ``check_childspecs``).
"""

from __future__ import annotations

import enum
import importlib
from typing import Any

import attrs


class Restart(enum.Enum):
    """When a child that exited is restarted (OTP restart types)."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after an abnormal exit
    TEMPORARY = "temporary"  # never


class Strategy(enum.Enum):
    """Which siblings restart with a failed child."""

    ONE_FOR_ONE = "one_for_one"  # only the failed child
    REST_FOR_ONE = "rest_for_one"  # the failed child and those started after it
    ONE_FOR_ALL = "one_for_all"  # every child


@attrs.frozen
class ChildSpec:
    """One child of a supervisor.

    ``actor_class`` is a dotted path (``actors.journal.actor.JournalWriter``) so specs pickle
    and validate without importing actor code. ``settings`` is what the child receives in
    `ChildInit` (a `SupervisorSpec` for a child supervisor). ``heartbeat_timeout_s``: seconds
    without a heartbeat answer before the child is SIGKILLed and restarted.
    """

    name: str
    actor_class: str
    restart: Restart = Restart.PERMANENT
    shutdown_timeout_s: float = 5.0
    heartbeat_timeout_s: float = 5.0
    settings: Any = None
    #: Niceness the child adds to its scheduling priority (0..19): background consumers
    #: yield the CPU to the latency-critical journal path.
    nice: int = 0

    @property
    def is_supervisor(self) -> bool:
        return isinstance(self.settings, SupervisorSpec)


@attrs.frozen
class SupervisorFlags:
    """How a supervisor reacts to its children's exits.

    Intensity: more than ``intensity`` restarts within ``period_s`` seconds and the supervisor
    gives up (stops its children and exits abnormally: escalation to its parent). A child that
    exits again within ``backoff_reset_s`` of its start is restarted after a delay doubling from
    ``backoff_initial_s`` up to ``backoff_max_s``; one that ran longer restarts at once.
    """

    strategy: Strategy = Strategy.ONE_FOR_ONE
    intensity: int = 10
    period_s: float = 30.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    backoff_reset_s: float = 10.0
    heartbeat_interval_s: float = 0.5


@attrs.frozen
class SupervisorSpec:
    """A supervisor: its flags and its children in start order (stopped in reverse)."""

    flags: SupervisorFlags
    children: tuple[ChildSpec, ...]

    def child(self, name: str) -> ChildSpec:
        for spec in self.children:
            if spec.name == name:
                return spec
        raise KeyError(name)


def resolve_class(path: str) -> type:
    """Import ``package.module.Class``; raises ImportError/AttributeError with the path."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ImportError(f"actor class {path!r} must be a dotted path module.Class")
    return getattr(importlib.import_module(module), name)


def validate(spec: SupervisorSpec, where: str = "root") -> list[str]:
    """Problems with a tree, as 'where: what' lines; empty when it is usable. No I/O beyond
    importing the named actor classes."""
    problems: list[str] = []
    f = spec.flags
    if f.intensity < 1:
        problems.append(f"{where}: intensity must be >= 1 (got {f.intensity})")
    for field in ("period_s", "backoff_initial_s", "backoff_max_s", "heartbeat_interval_s"):
        if getattr(f, field) <= 0:
            problems.append(f"{where}: {field} must be > 0 (got {getattr(f, field)})")
    if f.backoff_max_s < f.backoff_initial_s:
        problems.append(f"{where}: backoff_max_s must be >= backoff_initial_s")
    seen: set[str] = set()
    for child in spec.children:
        here = f"{where}/{child.name}"
        if child.name in seen:
            problems.append(f"{here}: child names must be unique within a supervisor")
        seen.add(child.name)
        if not 0 <= child.nice <= 19:
            problems.append(f"{here}: nice must be in 0..19 (got {child.nice})")
        if child.shutdown_timeout_s <= 0 or child.heartbeat_timeout_s <= 0:
            problems.append(f"{here}: shutdown and heartbeat timeouts must be > 0")
        if child.heartbeat_timeout_s <= f.heartbeat_interval_s:
            problems.append(
                f"{here}: heartbeat_timeout_s ({child.heartbeat_timeout_s}) must exceed the "
                f"heartbeat interval ({f.heartbeat_interval_s})"
            )
        try:
            resolve_class(child.actor_class)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{here}: cannot load actor class {child.actor_class!r}: {exc}")
        if child.is_supervisor:
            problems.extend(validate(child.settings, here))
    return problems
