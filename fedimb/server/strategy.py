"""The configured strategy, and fedimb's duties hooked into its own methods.

fedimb calls the strategy's own ``start()``; :class:`StrategyHooks` makes its
``configure_*`` / ``aggregate_*`` keep round numbers on resume, seed the client sample,
keep what the strategy reports and name its errors, whatever that ``start()`` does.
"""

from __future__ import annotations

import copyreg
import logging
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

import strategies
from fedimb.config import Config
from fedimb.records import record_of
from fedimb.server.errors import StartSkipsEvaluation, StrategyFailed, described, is_fedimbs

log = logging.getLogger(__name__)


def build_strategy(config: Config, param_keys: list[str]) -> Strategy:
    """The configured strategy, sampling ``fraction-train`` of the clients each round.

    A strategy that takes ``param_keys`` (SCAFFOLD) and was not given them gets the
    model's parameter names: our clients send a control delta for parameters only, not
    for float buffers such as BatchNorm's running statistics.
    """
    kwargs = config.strategy_kwargs()
    if "param_keys" in strategies.strategy_params(config.strategy.name):
        kwargs.setdefault("param_keys", param_keys)
    return strategies.make_strategy(config.strategy.name, **kwargs)


def own_class(strategy: Strategy) -> type[Strategy]:
    """The strategy's own class, under the one :meth:`StrategyHooks.attach` made."""
    cls = type(strategy)
    return cls.__bases__[0] if "fedimb_hooks" in cls.__dict__ else cls


class StrategyHooks:
    """fedimb's duties at a strategy's hook methods, whatever its ``start()`` does.

    :meth:`attach` gives the strategy a subclass of its own class whose
    ``configure_*`` / ``aggregate_*`` add fedimb's part and then run the strategy's own:
    its ``start()`` (Flower's, or the user's, which may call ``super().start()``) calls
    ``self.configure_train(...)`` and so goes through them. They add:

    - round numbers shifted by ``offset`` (the checkpointed round; 0 for a fresh run), so
      a resumed run's rounds keep their numbers;
    - a seeded client sample: the grid seeds Python's ``random`` from (``seed``, round,
      stage) just before the strategy samples (see :class:`fedimb.server.nodes.NodeOrder`);
    - what ``aggregate_train`` reports of its own and what ``aggregate_evaluate`` returns
      (federated evaluation), kept by round for ``metrics.jsonl``;
    - the strategy's errors as one line (:class:`StrategyFailed`);
    - a check that ``start()`` called ``evaluate_fn`` before round 1, where fedimb's
      evaluation, metrics, checkpoints and progress run.

    The subclass pickles as the strategy's own class, so checkpoints hold no trace of it.
    """

    def __init__(self, name: str, offset: int, *, seed: int) -> None:
        self.name, self.offset, self.seed = name, offset, seed
        self.federated: dict[int, MetricRecord] = {}
        self.strategy_metrics: dict[int, dict[str, float]] = {}
        self.kept_model_said = False
        self.evaluate_called = False  # set by the run's evaluate_fn
        self.round = offset  # the latest round a hook was called for

    def attach(self, strategy: Strategy) -> Strategy:
        """Route ``strategy``'s hooks through these duties (in place); return it."""
        own = own_class(strategy)
        namespace = {
            "__slots__": (),  # the same layout as its own class: __class__ can change
            "__module__": own.__module__,
            "__qualname__": own.__qualname__,
            "__reduce_ex__": _reduce_as_own_class,
            "fedimb_hooks": self,
            **{hook.__name__.removeprefix("_hooked_"): hook for hook in _HOOKS},
        }
        strategy.__class__ = type(own)(own.__name__, (own,), namespace)
        return strategy

    def failed(self, where: str, exc: Exception) -> StrategyFailed:
        """The one-line error for ``exc``, raised by the strategy's ``where``."""
        when = (
            f"in round {self.round}"
            if self.round > self.offset
            else f"before round {self.round + 1}"
        )
        return StrategyFailed(f"strategy {self.name!r} failed {when} ({where}): {described(exc)}")

    def call(self, strategy: Strategy, hook: str, local_round: int, *args: Any) -> Any:
        """The strategy's own ``hook`` for the run's round of Flower's ``local_round``."""
        self.round = local_round + self.offset
        try:
            result = getattr(own_class(strategy), hook)(strategy, self.round, *args)
            # A generator's errors would otherwise surface later, inside the grid.
            return list(result) if hook.startswith("configure") else result
        except Exception as exc:
            if is_fedimbs(exc):
                raise
            raise self.failed(hook, exc) from exc

    def seed_sample(self, grid: Grid, local_round: int, stage: str) -> None:
        """Seed the next sample from the grid the strategy was handed (if it can)."""
        if hasattr(grid, "seed_next_sample"):
            grid.seed_next_sample(f"fedimb-sample:{self.seed}:{local_round + self.offset}:{stage}")

    def check_started(self, local_round: int) -> None:
        """Refuse to run round 1 when ``start()`` skipped ``evaluate_fn(0, arrays)``."""
        if local_round == 1 and not self.evaluate_called:
            raise StartSkipsEvaluation(
                f"strategy {self.name!r}: its start() reached round {1 + self.offset} without "
                "calling evaluate_fn(0, arrays), so fedimb cannot evaluate the global model, "
                "write metrics.jsonl, checkpoint or show progress (each runs in evaluate_fn, "
                "the seam Flower's start() calls before round 1 and after each round); pass "
                "evaluate_fn on to super().start(), or call it as Strategy.start does"
            )

    def kept_model(self, arrays: ArrayRecord | None, replies: list[Message]) -> None:
        """Say once a run that the strategy kept the model although clients replied."""
        if arrays is None and replies and not self.kept_model_said:
            self.kept_model_said = True  # once a run: a strategy may do so by design
            log.warning(
                "round %d: the strategy returned no global model from %d replies, so the "
                "model stays as it was (said once)",
                self.round,
                len(replies),
            )


def _hooks(strategy: Strategy) -> StrategyHooks:
    return type(strategy).fedimb_hooks


def _hooked_configure_train(self, server_round, arrays, config, grid):
    hooks = _hooks(self)
    hooks.check_started(server_round)
    hooks.seed_sample(grid, server_round, "train")
    return hooks.call(self, "configure_train", server_round, arrays, config, grid)


def _hooked_aggregate_train(self, server_round, replies):
    hooks, replies = _hooks(self), list(replies)
    arrays, metrics = hooks.call(self, "aggregate_train", server_round, replies)
    hooks.strategy_metrics[hooks.round] = _own_metrics(metrics, replies)
    hooks.kept_model(arrays, replies)
    return arrays, metrics


def _hooked_configure_evaluate(self, server_round, arrays, config, grid):
    hooks = _hooks(self)
    hooks.seed_sample(grid, server_round, "evaluate")
    return hooks.call(self, "configure_evaluate", server_round, arrays, config, grid)


def _hooked_aggregate_evaluate(self, server_round, replies):
    hooks = _hooks(self)
    result = hooks.call(self, "aggregate_evaluate", server_round, list(replies))
    if result is not None:
        hooks.federated[hooks.round] = result
    return result


_HOOKS = (
    _hooked_configure_train,
    _hooked_aggregate_train,
    _hooked_configure_evaluate,
    _hooked_aggregate_evaluate,
)


def _reduce_as_own_class(self, protocol):
    """Pickle (checkpoints, copies) as the strategy's own class: a resumed run attaches
    its own hooks, and a pickle names no class made at run time."""
    hooked, own = type(self), own_class(self)
    self.__class__ = own  # its own class's way of pickling, whatever that is
    try:
        reduced = self.__reduce_ex__(protocol)
    finally:
        self.__class__ = hooked
    if reduced[0] is copyreg.__newobj__ and reduced[1] == (own,):
        # The default (object's) way: pickle checks that its class is the object's, so
        # the same rebuild in the way that names the class without that check.
        return (copyreg._reconstructor, (own, object, None), *reduced[2:])
    return reduced


def _own_metrics(metrics: MetricRecord | None, replies: list[Message]) -> dict[str, float]:
    """The numbers a strategy's ``aggregate_train`` reports besides its averages of the
    clients' own metrics (e.g. the norm of its update), as ``strategy_<key>`` columns."""
    clients = set()  # replies here are sound ones: each has its metrics (_reply_fault)
    for reply in replies:
        clients.update(record_of(reply.content, "metrics", MetricRecord).keys())
    return {
        "strategy_" + key.replace("-", "_"): float(value)
        for key, value in (metrics or {}).items()
        if key not in clients and isinstance(value, int | float)  # not a list
    }
