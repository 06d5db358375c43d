"""Every message key fedimb's clients and server exchange (an algorithm's own keys live
in its file under ``strategies/``).

A train instruction carries ``"arrays"`` (the global state_dict) and ``"config"`` (the
whole flat experiment config plus the round, and what a strategy adds); a train reply
carries ``"arrays"`` (the client's model), ``"metrics"`` (below) and the client's
persistent records under :data:`STATE_PREFIX`, which the server keeps for checkpoints
and, after a resume, sends back in a query.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, RecordDict

# Train reply metrics.
NUM_STEPS_KEY = "num-steps"  # local optimizer steps tau_i
CLASS_COUNTS_KEY = "class-counts"  # the client's training samples per class (not logged)

# A client's persistent ArrayRecords (its context.state) travel under this prefix.
STATE_PREFIX = "fedimb-state:"
# SGD's momentum buffers of a client with optimizer-state = "keep" (its context.state).
OPTIMIZER_STATE = "sgd-momentum"


def state_entries(records: Mapping[str, Any]) -> dict[str, ArrayRecord]:
    """A client's persistent ArrayRecords (by name) as message content entries."""
    return {STATE_PREFIX + k: r for k, r in records.items() if isinstance(r, ArrayRecord)}


def carried_state(content: RecordDict) -> dict[str, ArrayRecord]:
    """The persistent ArrayRecords a message carries, by their names in the state."""
    return {
        k.removeprefix(STATE_PREFIX): r
        for k, r in content.items()
        if k.startswith(STATE_PREFIX) and isinstance(r, ArrayRecord)
    }
