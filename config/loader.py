"""Load a gateway config from TOML: strict types, unknown keys rejected, errors name the file
and the key, e.g. ``config/x.toml: sensors[0].rate_hz: rate_hz must be > 0 (got 0)``."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from config.schema import FieldProblem, GatewayConfig

T = TypeVar("T")


class ConfigError(Exception):
    """The config file cannot be used: ``problems`` lists each as 'key: what is wrong'."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def _strict(kind: type, names: str):
    def structure(value: Any, _type: type) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {names} (got {value!r})")
        if not isinstance(value, kind):
            raise TypeError(f"expected {names} (got {value!r})")
        return value

    return structure


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _strict(float, "a number"))
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    return conv


_CONVERTER = _converter()
_FIELD_MARK = "\x00"


def _format(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, FieldProblem):
        return f"{_FIELD_MARK}{exc.field}{_FIELD_MARK}{exc.problem}"
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown key(s) {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, KeyError):
        return f"required key {exc.args[0]!r} is missing" if exc.args else "a required key is missing"
    return str(exc)


def _key(path: str) -> str:
    return path.removeprefix("$").removeprefix(".") or "<top level>"


def structure_strict(data: dict[str, Any], cls: type[T], path: str = "<config>") -> T:
    """``data`` (decoded TOML) as a ``cls`` instance: strict types, unknown keys refused.
    Raises ConfigError listing every problem as 'key: what is wrong'."""
    try:
        return _CONVERTER.structure(data, cls)
    except ClassValidationError as exc:
        problems = []
        for line in cattrs.transform_error(exc, path="$", format_exception=_format):
            message, _, where = line.rpartition(" @ ")
            key = _key(where)
            if message.startswith(_FIELD_MARK):
                _, field, message = message.split(_FIELD_MARK, 2)
                key = field if key == "<top level>" else f"{key}.{field}"
            problems.append(f"{key}: {message}")
        raise ConfigError(path, problems) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, [str(exc)]) from None


def parse_config(data: dict[str, Any], path: str = "<config>") -> GatewayConfig:
    """Validate a decoded TOML document. Raises ConfigError."""
    return structure_strict(data, GatewayConfig, path)


def read_toml(path: str, error: Callable[[str, list[str]], Exception]) -> dict[str, Any]:
    """Decode a TOML file; a missing, unreadable or malformed file raises ``error(path,
    [problem])`` (the config's or the policy's own error type)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise error(path, ["file not found"]) from None
    except IsADirectoryError:
        raise error(path, ["is a directory, not a TOML file"]) from None
    except OSError as exc:
        raise error(path, [f"cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(path, [f"not valid TOML: {exc}"]) from None


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a TOML config file. Raises ConfigError (file, key, problem)."""
    path = str(path)
    return parse_config(read_toml(path, ConfigError), path)


def default_config_path() -> Path:
    """The embedded default: config/demo.toml shipped with the package."""
    return Path(__file__).with_name("demo.toml")
