"""What a round's train messages told the clients, recorded as sent (issue #24): a
strategy may change the config from round to round."""

from __future__ import annotations

import contextlib
from typing import Any

from flwr.app import Message

from fedimb.client import config_from_message
from fedimb.config import Config, ConfigError, lr_in_round


class SentConfigs:
    """What a round's train messages told the clients, for ``metrics.jsonl``.

    ``lr``: the learning rate the clients train with, as they compute it from the config
    they were sent (a strategy may change it from round to round); ``sent_<key>``: each
    numeric entry of the run's config that the strategy changed in what it sent (``-``
    and ``.`` in the key as ``_``). Where the round's clients were sent different
    values, the mean over them.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.run_values = {k: v for k, v in config.to_flat().items() if _is_number(v)}
        self.by_round: dict[int, dict[str, float]] = {}

    def record(self, server_round: int, messages: list[Message]) -> None:
        """Keep what ``messages`` (one round's train messages) carry."""
        values: dict[str, list[float]] = {}
        seen: dict[int, dict[str, float]] = {}  # by record: a strategy shares one, mostly
        for msg in messages:
            record = msg.content["config"]
            if id(record) not in seen:
                seen[id(record)] = self._settings(msg)
            for key, value in seen[id(record)].items():
                values.setdefault(key, []).append(value)
        self.by_round[server_round] = {k: _mean(v) for k, v in values.items()}

    def _settings(self, msg: Message) -> dict[str, float]:
        record = msg.content["config"]
        out = {
            "sent_" + key.replace("-", "_").replace(".", "_"): float(record[key])
            for key, value in self.run_values.items()
            if key in record and _is_number(record[key]) and record[key] != value
        }
        with contextlib.suppress(ConfigError, KeyError, TypeError, ValueError):
            # As the client computes it (an entry it cannot read fails it there, not here).
            out["lr"] = lr_in_round(config_from_message(msg), int(record["server-round"]))
        return out

    def row(self, server_round: int) -> dict[str, float]:
        """The round's columns; the run config's lr when no train message was read."""
        sent = self.by_round.get(server_round, {})
        return {"lr": lr_in_round(self.config, server_round), **sent}


def _mean(values: list[float]) -> float:
    """Their mean; the value itself when all are equal (a sum would round it)."""
    return values[0] if len(set(values)) == 1 else sum(values) / len(values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
