"""Fixtures shared across test packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clickhouse_server import clickhouse, clickhouse_db, start_clickhouse  # noqa: F401
from tests.mosquitto import (  # noqa: F401
    fixture_mosquitto,
    fixture_mosquitto_installed,
    fixture_start_mosquitto,
)


@pytest.fixture
def chdb_backend(tmp_path) -> Iterator:
    """The central side's embedded ClickHouse in ``tmp_path``, with the schema created."""
    from central.backend import ChdbBackend

    backend = ChdbBackend(tmp_path / "central.chdb")
    backend.ensure_schema()
    yield backend
    backend.close()
