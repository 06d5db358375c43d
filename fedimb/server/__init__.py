"""The server side of a run: the strategy, its grid, the round's duties, checkpoints.

:func:`run_server` is what the ServerApp's ``main`` calls, under any engine. It calls
the strategy's own ``start()`` (Flower's, or a user's override) and adds fedimb's duties
at seams that work whatever that ``start()`` does:

- ``grid.py``: a :class:`GuardedGrid` around the engine's Grid; train replies that are
  errors, non-finite or late are dropped before the strategy sees them (``replies.py``),
  with the node order behind seeded samples (``nodes.py``), the clients' persistent
  state (``client_state.py``), Ray's polling and stop signal (``polling.py``) and what
  the train messages carried (``sent.py``);
- ``strategy.py``: the strategy's hook methods keep round numbers on resume, seed the
  client sample, keep what it reports and name its errors (``errors.py``);
- ``callbacks.py``: the ``evaluate_fn`` Flower calls before round 1 and after each round
  runs the round's callbacks: check and evaluate the global model, record the
  ``metrics.jsonl`` row, checkpoint (``checkpoint.py``), move the progress bar.
"""

from fedimb.server.checkpoint import (
    checkpoint_config,
    checkpoint_round,
    load_checkpoint,
    save_checkpoint,
)
from fedimb.server.errors import (
    RUN_FAILURES,
    BadGlobalModel,
    NonFiniteModel,
    SimulationEnded,
    StartSkipsEvaluation,
    StrategyFailed,
    TooManyFailures,
    TrainingDiverged,
    root_cause,
)
from fedimb.server.grid import GuardedGrid
from fedimb.server.polling import ServerStop
from fedimb.server.run import RoundHook, run_server
from fedimb.server.sent import SentConfigs
from fedimb.server.strategy import StrategyHooks, build_strategy, own_class

__all__ = [
    "RUN_FAILURES",
    "BadGlobalModel",
    "GuardedGrid",
    "NonFiniteModel",
    "RoundHook",
    "SentConfigs",
    "ServerStop",
    "SimulationEnded",
    "StartSkipsEvaluation",
    "StrategyFailed",
    "StrategyHooks",
    "TooManyFailures",
    "TrainingDiverged",
    "build_strategy",
    "checkpoint_config",
    "checkpoint_round",
    "load_checkpoint",
    "own_class",
    "root_cause",
    "run_server",
    "save_checkpoint",
]
