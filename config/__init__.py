"""Configuration: schema (`config.schema`), TOML loading with clear errors (`config.loader`),
and the shipped configs (`demo.toml`, the embedded default)."""

from config.loader import ConfigError, load_config, parse_config
from config.schema import GatewayConfig

__all__ = ["ConfigError", "GatewayConfig", "load_config", "parse_config"]
