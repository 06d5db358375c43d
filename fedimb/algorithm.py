"""An algorithm's client half: what a client adds to its job, found from the strategy.

An algorithm is a server strategy plus, where the method has one, a client half (a
:class:`ClientHalf`), declared in one file. The generic trainers know no algorithm:
they ask the half for this round's :class:`ClientTerms` (read from the train
instruction and the client's persistent state), add ``half.gradient(...)`` to every
parameter's gradient before the optimizer step, and let the half write the client's
new state and the extra parts of its reply (:meth:`ClientHalf.finish`).

``gradient`` is a pure function of tensors, so the same code serves one client
(:func:`fedimb.train.train_client`) and a stacked batch of clients
(:mod:`fedimb.batched`, ``[C, ...]`` stacks, per-client scalars shaped ``[C, 1, ...]``
to broadcast), exactly as the losses are batched.

How a client finds the half: the message's config names the strategy (a registered name
or ``"pkg.mod:Class"``); its class (not an instance) is looked up and the first class
of its MRO with a ``client_half`` attribute, or one a half was attached to with
:func:`attach_client_half` (for a class one does not own, e.g. Flower's), gives it. A
strategy without one trains plain local SGD.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import RecordDict

if TYPE_CHECKING:
    from fedimb.train import TrainResult, TrainSettings

# Per-client inputs of ``ClientHalf.gradient``: a scalar, or one tensor per parameter name.
Inputs = Mapping[str, "float | Mapping[str, torch.Tensor]"]


@dataclasses.dataclass(frozen=True)
class ClientTerms:
    """What a client half adds to one client's job this round.

    ``grad``: the inputs of ``half.gradient``, stacked across clients by the vectorised
    trainer (empty: no gradient term); ``keep``: anything else ``half.finish`` needs
    (not stacked).
    """

    half: ClientHalf
    grad: Inputs = dataclasses.field(default_factory=dict)
    keep: Any = None

    def for_param(self, name: str) -> dict[str, Any]:
        """``grad`` as ``half.gradient`` reads it for parameter ``name``."""
        return {k: v[name] if isinstance(v, Mapping) else v for k, v in self.grad.items()}


@dataclasses.dataclass
class HalfReply:
    """What a client half adds to a train reply: records (e.g. an ``ArrayRecord``) and
    metrics (merged into the reply's ``"metrics"``: Flower's strategies expect one)."""

    records: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float | int] = dataclasses.field(default_factory=dict)


class ClientHalf:
    """The client side of an algorithm; subclass it and override what the method needs.

    Attributes
    ----------
    keeps_state : bool
        Whether the half keeps records in the client's ``context.state`` across rounds
        (checkpointed by the server; a resume without them restarts them from zero).
    """

    keeps_state: ClassVar[bool] = False

    def prepare(
        self,
        instruction: RecordDict,
        state: RecordDict,
        global_params: Mapping[str, torch.Tensor],
        settings: TrainSettings,
    ) -> ClientTerms | None:
        """This round's terms of one client (None: it adds nothing this round).

        ``instruction``: the train message's content (``"config"`` holds what the
        strategy added); ``state``: the client's ``context.state``; ``global_params``:
        the global model's parameters on the training device.
        """
        return None

    def gradient(
        self, param: torch.Tensor, global_param: torch.Tensor, inputs: Mapping[str, Any]
    ) -> torch.Tensor:
        """The term added to ``param``'s gradient (pure: no in-place changes).

        For one client ``param`` has the parameter's shape; for a batch it is stacked
        ``[C, ...]``, per-parameter inputs too, and scalar inputs shaped ``[C, 1, ...]``;
        ``global_param`` is never stacked (it broadcasts).
        """
        raise NotImplementedError(f"{type(self).__name__} sends gradient inputs but no gradient")

    def finish(
        self,
        terms: ClientTerms,
        global_params: Mapping[str, torch.Tensor],
        result: TrainResult,
        settings: TrainSettings,
        state: RecordDict,
    ) -> HalfReply:
        """After training: write the client's new records into ``state`` and return
        what its reply adds (``result.state``: its trained model)."""
        return HalfReply()

    def can_batch(self, terms: Sequence[ClientTerms]) -> str | None:
        """None if these clients' terms can be trained as one batch, else why not."""
        return None


_ATTACHED: dict[type, ClientHalf] = {}


def attach_client_half(cls: type, half: ClientHalf) -> None:
    """Give strategy class ``cls`` (and its subclasses) the client half ``half``,
    for a class whose source one does not own (e.g. one of Flower's own strategies)."""
    _ATTACHED[cls] = half


def client_half_of(cls: type) -> ClientHalf | None:
    """The client half of strategy class ``cls``: its own or its nearest base's."""
    for klass in cls.__mro__:
        half = vars(klass).get("client_half") or _ATTACHED.get(klass)
        if half is not None:
            if not isinstance(half, ClientHalf):
                raise TypeError(
                    f"{klass.__name__}.client_half is {half!r}; it must be a "
                    "fedimb.algorithm.ClientHalf instance"
                )
            return half
    return None
