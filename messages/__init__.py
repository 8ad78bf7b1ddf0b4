"""Every message the actors exchange: frozen, slotted attrs values, the protocol in one place.

- `messages.readings`: `Reading`, `ReadingBatch` (what sensors produce)
- `messages.journal`: append / consumer-commit / watermark conversation with the journal
- `messages.supervision`: init, heartbeat, peers, stop, topology
- `messages.gateway`: the run process and the root supervisor
- `messages.health`: `fleetgw health` asking the root and the model runner (rollout gate)
"""

from messages.errors import MessageValidationError
from messages.readings import Reading, ReadingBatch

__all__ = ["MessageValidationError", "Reading", "ReadingBatch"]
