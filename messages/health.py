"""The health conversation: `fleetgw health` asks the running gateway whether it is fit to serve.

Where this sits: outside the data path, for rollouts (deploy/ROLLOUT.md). The health command
attaches like the inspector and sends `HealthRequest` to the gateway root, which answers with
its live tree and what its config says the tree must hold (`HealthReport`). It then sends
`SelfTestModel` to the root, which forwards it to the model runner with the asker's address
in ``reply_to``; the runner answers `ModelSelfTested` directly (the root answers itself when
no model runner runs).
"""

from __future__ import annotations

from typing import Any

import attrs

from messages.supervision import ActorNode


@attrs.frozen(slots=True)
class HealthRequest:
    """Query from `fleetgw health` to the gateway root."""

    request_id: int


@attrs.frozen(slots=True)
class HealthReport:
    """Answer to `HealthRequest`: the live tree, and the facts of the running gateway's config
    that judging it needs."""

    request_id: int
    root: ActorNode
    #: Every actor the config's tree has (supervisors.tree.actor_names), root excluded.
    expected: tuple[str, ...]
    #: The fleetgw release the gateway runs (its package version when it started).
    version: str
    #: The gateway's data dir, absolute, as the run process sees it.
    data_dir: str
    journal_budget_bytes: int
    heartbeat_interval_s: float
    uplink_configured: bool
    model_configured: bool


@attrs.frozen(slots=True)
class SelfTestModel:
    """Command: run the serving model's self-test vectors now and answer `ModelSelfTested`
    to ``reply_to`` (set by the root when it forwards; None: to the sender)."""

    request_id: int
    reply_to: Any = None


@attrs.frozen(slots=True)
class ModelSelfTested:
    """Fact: the serving model's self-test outcome. ``ok`` false with ``detail`` saying why
    (a failed vector, no model serving, no model runner running). ``latency_ms``: the test's
    wall time inside the runner; ``vectors``: how many self-test vectors ran."""

    request_id: int
    ok: bool
    version: str = ""
    latency_ms: float | None = None
    vectors: int = 0
    detail: str = ""
