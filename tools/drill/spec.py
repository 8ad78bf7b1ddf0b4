"""The drill file's format: its sections as frozen classes, each key with its rule.

Where this sits: the first step of `fleetgw drill run`. `loader.load_drill` structures the
TOML into these classes (strict types, unknown keys refused: `config.loader.structure_strict`)
and then checks them against the gateway they name; every problem names the file, the key and
what is wrong (`DrillError`, exit 2), so a drill never dies half-way through for a typo. The
format (TOML; drills/ has examples):

``[drill]``: ``name``, ``description``, ``duration_s`` (faults and load run this long),
``short_duration_s`` (the same with ``--short``; faults after it are not run), ``seed`` (jitter
and random targets), ``settle_s`` (after the timeline, how long to wait for acknowledged MQTT
messages to reach the journal before the gateway stops), ``drain_timeout_s`` (the drain run
after the gateway stopped).

``[gateway]``: ``config`` = a gateway TOML path relative to the drill file, or an inline
``[gateway.config]`` table (default: config/demo.toml); ``disk_mb`` (the data dir on a real
tmpfs of that size), ``clock`` (a wall clock the drill can jump), ``devices`` (more device ids
to provision), ``receiver`` (a central receiver behind a link proxy; default true).

``[load]`` (optional): `MqttLoad` QoS 1 publishes to the MQTT sensor ``sensor`` of the
gateway's own broker: ``topic`` (default: one matching the sensor's first filter),
``rate_hz``, ``src`` (the messages' src field).

``[[faults]]``: ``kind``, ``at_s`` (seconds after the gateway ran), repeats with ``every_s``
and ``count`` or ``until_s`` (without either: until the end), ``jitter_s`` (a seeded random
delay up to that, per occurrence), ``target`` (an actor name, ``"random"`` = any actor of the
live tree but the root, or a list to choose from with the seeded RNG; floods: a sensor id) and
per kind (`KIND_KEYS`):

- ``kill``: ``signal`` (default SIGKILL);
- ``pause``: SIGSTOP, then SIGCONT after ``ends_after_s`` (default 3);
- ``inject``: ``fault`` = exception | exit | segfault | hang | slow, ``seconds`` (slow);
- ``power_cut``: every gateway process SIGKILLed, booted again after ``ends_after_s`` (1);
- ``link``: ``fault`` = a `LinkProxy` fault (cut, blackhole, latency, bandwidth,
  reset_mid_body, hold_answers...) with ``params`` (its arguments); the link is restored
  (every link fault ends) after ``ends_after_s`` (default: at the end of the drill);
- ``disk_full``: the small disk filled, freed after ``ends_after_s`` (default: at the end);
- ``clock_jump``: the gateway's wall clock stepped by ``jump_s``;
- ``corrupt_model``: the active model's weights corrupted and the model runner restarted;
- ``flood``: ``inputs`` malformed inputs to the sensor ``target`` (MQTT, NMEA/CAN over UDP).

``[invariants]``: ``check`` = the invariants of DESIGN.md to check ("I1".."I9");
``max_commit_pause_s`` (I6), ``commit_pause_settle_s`` (I6: how long after a fault of the
journal, the whole gateway, the sensors supervisor, the disk or the clock a pause is still
excused),
``max_recover_s`` (adds a "recovery" check: every actor hit ran again within it).
"""

from __future__ import annotations

import inspect
import signal
from typing import Any

import attrs

from config.fields import FieldProblem, _ident, _non_negative, _positive
from messages.supervision import FAULT_KINDS

INVARIANTS = tuple(f"I{n}" for n in range(1, 10))
FAULT_TYPES = ("kill", "pause", "inject", "power_cut", "link", "disk_full", "clock_jump",
               "corrupt_model", "flood")
#: Keys each fault kind takes besides the timing keys (kind, at_s, every_s, until_s, count,
#: jitter_s); `REQUIRED_KEYS` of them must be given.
KIND_KEYS = {
    "kill": ("target", "signal"),
    "pause": ("target", "ends_after_s"),
    "inject": ("target", "fault", "seconds"),
    "power_cut": ("ends_after_s",),
    "link": ("fault", "params", "ends_after_s"),
    "disk_full": ("ends_after_s",),
    "clock_jump": ("jump_s",),
    "corrupt_model": (),
    "flood": ("target", "inputs"),
}
REQUIRED_KEYS = {"kill": ("target",), "pause": ("target",), "inject": ("target", "fault"),
                 "link": ("fault",), "clock_jump": ("jump_s",), "flood": ("target",)}
#: Seconds until a fault ends when ``ends_after_s`` is not given (kinds not here: at the end).
DEFAULT_ENDS_AFTER_S = {"pause": 3.0, "power_cut": 1.0}
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT", "SIGABRT", "SIGSEGV")
#: Malformed inputs per flood when ``inputs`` is not given.
DEFAULT_FLOOD_INPUTS = 1000
#: ``target = "random"``: any actor of the tree but the root (killing the root is a power cut).
RANDOM = "random"
ROOT_ACTOR = "gateway"


class DrillError(Exception):
    """The drill file cannot be run: ``problems`` lists each as 'key: what is wrong'."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def link_faults() -> dict[str, inspect.Signature]:
    """The link faults `Rig.link_fault` can call (`LinkProxy`'s public fault methods) and
    their parameters."""
    from tools.link_proxy import LinkProxy

    return {name: inspect.signature(fn) for name, fn in inspect.getmembers(LinkProxy,
                                                                            inspect.isfunction)
            if not name.startswith("_") and name not in ("restore", "close")}


def _optional_non_negative(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _non_negative(inst, attr, value)


def _optional_positive(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if value is not None:
        _positive(inst, attr, value)


@attrs.frozen
class DrillSection:
    """[drill]: what the drill is and how long it runs."""

    name: str = attrs.field(validator=_ident)
    #: Seconds the load and the faults run (from the moment every actor ran).
    duration_s: float = attrs.field(validator=_positive)
    description: str = ""
    #: Seconds of the ``--short`` run (CI); unset: as long as ``duration_s``.
    short_duration_s: float | None = attrs.field(default=None, validator=_optional_positive)
    seed: int = 0
    #: Seconds the drain run (no sensors) may take to sync everything at the end.
    drain_timeout_s: float = attrs.field(default=180.0, validator=_positive)
    #: After the timeline: seconds to wait at most for what the broker acknowledged (load
    #: messages, malformed MQTT floods) to reach the journal before the gateway stops (the
    #: wait ends early once everything is there or nothing new arrives).
    settle_s: float = attrs.field(default=20.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.short_duration_s is not None and self.short_duration_s > self.duration_s:
            raise FieldProblem("short_duration_s", f"must be <= duration_s ({self.duration_s:g}"
                                                   f"; got {self.short_duration_s:g})")


@attrs.frozen
class GatewaySection:
    """[gateway] without its ``config`` (read separately: a path or a table)."""

    #: MiB of the tmpfs the data dir is put on (a real full disk); unset: none.
    disk_mb: int | None = attrs.field(default=None, validator=_optional_positive)
    #: Run the gateway under a wall clock the drill can jump (libfaketime).
    clock: bool = False
    #: Device ids to provision besides those the config names.
    devices: tuple[str, ...] = ()
    #: A central receiver behind a link proxy (the uplink syncs to it).
    receiver: bool = True


@attrs.frozen
class LoadSection:
    """[load]: acknowledged MQTT publishes to one MQTT sensor of the gateway."""

    sensor: str
    #: Topic to publish to; empty: one matching the sensor's first topic filter.
    topic: str = ""
    rate_hz: float = attrs.field(default=50.0, validator=_positive)
    #: The ``src`` field of each message (`journaled_numbers` counts by it).
    src: str = "load"


@attrs.frozen
class FaultSection:
    """[[faults]]: one entry of the timeline (module docstring: the keys per kind)."""

    kind: str = attrs.field()
    at_s: float = attrs.field(validator=_non_negative)
    every_s: float | None = attrs.field(default=None, validator=_optional_positive)
    until_s: float | None = attrs.field(default=None, validator=_optional_non_negative)
    count: int | None = attrs.field(default=None, validator=_optional_positive)
    jitter_s: float = attrs.field(default=0.0, validator=_non_negative)
    target: tuple[str, ...] | None = None
    signal: str | None = None
    fault: str | None = None
    seconds: float | None = attrs.field(default=None, validator=_optional_positive)
    params: dict[str, Any] | None = None
    ends_after_s: float | None = attrs.field(default=None, validator=_optional_positive)
    jump_s: float | None = None
    inputs: int | None = attrs.field(default=None, validator=_optional_positive)

    @kind.validator
    def _check_kind(self, attr: attrs.Attribute, value: str) -> None:
        if value not in FAULT_TYPES:
            raise FieldProblem("kind", f"must be one of {', '.join(FAULT_TYPES)} "
                                       f"(got {value!r})")

    def __attrs_post_init__(self) -> None:
        allowed = KIND_KEYS[self.kind]
        for key in ("target", "signal", "fault", "seconds", "params", "ends_after_s",
                    "jump_s", "inputs"):
            if getattr(self, key) is not None and key not in allowed:
                kinds = [k for k, keys in KIND_KEYS.items() if key in keys]
                raise FieldProblem(key, f"is only for kind {' or '.join(kinds)} (this fault is "
                                        f"kind {self.kind})")
        for key in REQUIRED_KEYS.get(self.kind, ()):
            if getattr(self, key) is None:
                raise FieldProblem(key, f"is required for kind {self.kind}")
        if self.target is not None and not self.target:
            raise FieldProblem("target", "must name an actor (or \"random\", or a list)")
        if self.count is not None and self.count > 1 and self.every_s is None:
            raise FieldProblem("count", "needs every_s (the interval between repeats)")
        if self.until_s is not None:
            if self.every_s is None:
                raise FieldProblem("until_s", "needs every_s (the interval between repeats)")
            if self.until_s < self.at_s:
                raise FieldProblem("until_s", f"must be >= at_s ({self.at_s:g}; got "
                                              f"{self.until_s:g})")
            if self.count is not None:
                raise FieldProblem("until_s", "and count both bound the repeats: give one")
        if self.kind == "kill" and self.signal not in (None, *SIGNALS):
            raise FieldProblem("signal", f"must be one of {', '.join(SIGNALS)} (got "
                                         f"{self.signal!r}; SIGSTOP: use kind pause)")
        if self.kind == "inject":
            if self.fault not in FAULT_KINDS:
                raise FieldProblem("fault", f"must be one of {', '.join(FAULT_KINDS)} for kind "
                                            f"inject (got {self.fault!r})")
            if self.seconds is not None and self.fault != "slow":
                raise FieldProblem("seconds", "is only for fault = \"slow\"")
        if self.kind == "link":
            self._check_link()

    def _check_link(self) -> None:
        faults = link_faults()
        if self.fault not in faults:
            raise FieldProblem("fault", f"must be a link fault: one of {', '.join(faults)} "
                                        f"(got {self.fault!r})")
        parameters = {name: p for name, p in faults[self.fault].parameters.items()
                      if name != "self"}
        given = self.params or {}
        for name, value in given.items():
            if name not in parameters:
                raise FieldProblem(f"params.{name}", f"is not a parameter of link fault "
                                   f"{self.fault} (it takes: {', '.join(parameters) or 'none'})")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FieldProblem(f"params.{name}", f"must be a number (got {value!r})")
        for name, p in parameters.items():
            if p.default is inspect.Parameter.empty and name not in given:
                raise FieldProblem("params", f"must give {name} for link fault {self.fault}")

    @property
    def targets(self) -> tuple[str, ...]:
        return self.target or ()

    @property
    def ends_after(self) -> float | None:
        """Seconds until the fault ends (its own step), or None: at the end of the drill."""
        return self.ends_after_s if self.ends_after_s is not None else \
            DEFAULT_ENDS_AFTER_S.get(self.kind)

    def describe(self) -> str:
        """What the fault does, in a few words (for the report)."""
        if self.kind == "kill":
            return self.signal or "SIGKILL"
        if self.kind == "inject":
            return self.fault + (f" for {self.seconds:g}s" if self.seconds else "")
        if self.kind == "link":
            params = " ".join(f"{k}={v}" for k, v in (self.params or {}).items())
            return f"{self.fault} {params}".strip()
        if self.kind == "flood":
            return f"{self.inputs or DEFAULT_FLOOD_INPUTS} malformed inputs"
        if self.kind == "clock_jump":
            return f"wall clock {self.jump_s:+g}s"
        return self.kind.replace("_", " ")

    @property
    def fixed_target(self) -> str:
        """What a fault without a ``target`` key acts on (the report's target column)."""
        return {"power_cut": ROOT_ACTOR, "link": "link", "disk_full": "disk",
                "clock_jump": "clock", "corrupt_model": "model"}.get(self.kind, "")


@attrs.frozen
class InvariantsSection:
    """[invariants]: which invariants to check, and their thresholds."""

    check: tuple[str, ...] = attrs.field()
    #: I6: the longest pause between journal commits allowed (outside excused windows).
    max_commit_pause_s: float = attrs.field(default=3.0, validator=_positive)
    #: I6: seconds after a fault of the journal, the gateway, the sensors supervisor, the
    #: disk or the clock ended during which a commit pause is excused.
    commit_pause_settle_s: float = attrs.field(default=3.0, validator=_non_negative)
    #: Every actor a fault hit must run again within this many seconds ("recovery" check);
    #: unset: recovery times are reported, not checked.
    max_recover_s: float | None = attrs.field(default=None, validator=_optional_positive)

    @check.validator
    def _check_check(self, attr: attrs.Attribute, value: tuple[str, ...]) -> None:
        if not value:
            raise FieldProblem("check", f"must list at least one of {', '.join(INVARIANTS)}")
        for name in value:
            if name not in INVARIANTS:
                raise FieldProblem("check", f"must list invariants from {', '.join(INVARIANTS)} "
                                            f"(got {name!r})")
        if len(set(value)) != len(value):
            raise FieldProblem("check", f"lists an invariant twice (got {list(value)})")


@attrs.frozen
class DrillFile:
    """The file's sections, each validated on its own."""

    drill: DrillSection
    invariants: InvariantsSection
    gateway: GatewaySection = attrs.field(factory=GatewaySection)
    load: LoadSection | None = None
    faults: tuple[FaultSection, ...] = ()


def signal_of(fault: FaultSection) -> signal.Signals:
    return signal.Signals[fault.signal or "SIGKILL"]


def flood_sensor(target: str) -> str:
    """The sensor id of a flood target ("gnss0" or "sensor:gnss0")."""
    return target.removeprefix("sensor:")
