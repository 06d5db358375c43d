"""Flower server strategies: stock ones, ours (SCAFFOLD, FedNova, FedDyn, FedAwS), plug-ins.

``make_strategy(name, **params)`` builds one by registered name or by import path
``"package.module:Class"``; see ``strategies.registry``.
"""

from strategies.registry import (
    REQUIRED,
    STRATEGIES,
    follows_client_momentum,
    list_strategies,
    make_strategy,
    resolve_strategy,
    strategy_params,
    strategy_signature,
    trains_as_fedavg,
)

__all__ = [
    "REQUIRED",
    "STRATEGIES",
    "follows_client_momentum",
    "list_strategies",
    "make_strategy",
    "resolve_strategy",
    "strategy_params",
    "strategy_signature",
    "trains_as_fedavg",
]
