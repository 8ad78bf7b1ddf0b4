"""Importing OpenVINO without letting it phone home (I9).

`import openvino` (2026.x) forks a child that sends a DNS query for Google Analytics and writes
``~/intel/openvino_ga_cid`` (FIELD_NOTES.md). Putting ``None`` in ``sys.modules`` under
``openvino_telemetry`` before the first import makes that import fail inside OpenVINO, which
then runs without telemetry: zero forks, zero sockets. Every fleetgw module that needs
OpenVINO gets it from `import_openvino`; nothing imports ``openvino`` directly.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType


def disable_telemetry() -> None:
    """Block OpenVINO's telemetry module (before `openvino` is imported, or it is too late)."""
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")


def import_openvino() -> ModuleType:
    """The ``openvino`` module, imported with telemetry disabled."""
    disable_telemetry()
    import openvino

    return openvino


def import_opset() -> ModuleType:
    """``openvino.opset13`` (the graph-building API), telemetry disabled."""
    import_openvino()
    import openvino.opset13 as opset

    return opset
