"""Field rules shared by the config classes: the error they raise and the common validators.

Where this sits: every settings class under config/ validates its fields with these (no I/O);
`config.loader` turns a `FieldProblem` into "key: problem" lines naming the file and key.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs


class FieldProblem(ValueError):
    """A field's value breaks its rule; ``field`` names it, the message says value and rule."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field} {problem}")


def _positive(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or value <= 0:
        raise FieldProblem(attr.name, f"must be > 0 (got {value!r})")


def _non_negative(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or value < 0:
        raise FieldProblem(attr.name, f"must be >= 0 (got {value!r})")


def _one_of(choices: tuple[str, ...]):
    def check(inst: Any, attr: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise FieldProblem(attr.name, f"must be one of {', '.join(choices)} (got {value!r})")

    return check


def _port(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not 1024 <= value <= 65535:
        raise FieldProblem(attr.name, f"must be a TCP port in 1024..65535 (got {value!r})")


def _address(inst: Any, attr: attrs.Attribute, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise FieldProblem(attr.name, f"must be an IP address such as 127.0.0.1 or ::1 "
                                      f"(got {value!r})") from None


def _ident(inst: Any, attr: attrs.Attribute, value: Any) -> None:
    from messages.readings import IDENT_RE

    if not IDENT_RE.match(value):
        raise FieldProblem(
            attr.name, f"must be 1-128 characters from [A-Za-z0-9_.:-/] (got {value!r})"
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, "localhost", an IPv6 address with a %scope, or a v4-mapped
    IPv6 address) is a loopback address; a name other than localhost is not."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback
