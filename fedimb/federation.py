"""The simulated federation of a config: data, who holds what, and the global model.

Built once per process and cached (a Ray actor, the server, the in-process engine all
call :func:`get_federation` with the same config and get the same object back): the
dataset is decoded once (and cached on disk by :mod:`fedimb.data`), the partition is a
pure function of the labels and the seed, and each client's tensors are moved to the
training device the first time the client trains.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from fedimb.config import Config, class_keep_fractions, declares, snake_to_kebab
from fedimb.data import datasets
from fedimb.data.augment import default_augment
from fedimb.data.partition import class_counts, keep_fractions, long_tail
from fedimb.data.partition import partition as split_clients
from fedimb.data.subsample import SUBSAMPLE_KEYS, subsample
from fedimb.losses import COSINE_HEAD_LOSSES, COSINE_SCALE, initial_bias
from fedimb.models import build_model, class_head, reads_tokens
from fedimb.registry import callable_params

# Flat config keys that decide the data and the partition (the federation's cache key).
DATA_KEYS = (
    "dataset",
    "data-root",
    "num-clients",
    "seed",
    "data-seed",
    "long-tail.ratio",
    "long-tail.profile",
    "long-tail.keep",
    "text.vocab-size",
    "text.max-len",
    *SUBSAMPLE_KEYS,  # the training subsample (fedimb.data.subsample)
)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when there is a GPU, else CPU.

    cuDNN autotuning is not set here but around each training step, by the
    ``cudnn-benchmark`` key (``TrainSettings.cudnn_benchmark``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device = {name!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return device


def seeded_rng(seed: int, purpose: int) -> np.random.Generator:
    """An independent stream per purpose (1 = long tail, 2 = partition, ...)."""
    return np.random.default_rng(np.random.SeedSequence([seed, purpose]))


@dataclasses.dataclass
class Federation:
    """Everything a client or the server needs to know about the data of a run."""

    dataset: datasets.Dataset
    train_index: np.ndarray
    """Indices of the training samples in use (after the optional global long tail)."""
    parts: list[np.ndarray]
    """``parts[i]``: indices into ``dataset.x_train`` of client i's samples."""
    counts: np.ndarray
    """``counts[i, j]``: client i's number of samples of class j."""
    device: torch.device
    _client_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(
        default_factory=dict, repr=False
    )
    _test_cache: tuple[torch.Tensor, torch.Tensor] | None = dataclasses.field(
        default=None, repr=False
    )

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def global_counts(self) -> np.ndarray:
        """Training samples per class over all clients (for many/medium/few-shot groups)."""
        return self.counts.sum(axis=0)

    def client_labels(self, pid: int) -> np.ndarray:
        """Client ``pid``'s labels (a numpy view of the training labels)."""
        return self._labels[self.parts[pid]]

    @functools.cached_property
    def _labels(self) -> np.ndarray:
        return self.dataset.y_train.numpy()

    def client_tensors(self, pid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``pid``'s samples and labels, resident on the training device."""
        if pid not in self._client_cache:
            idx = torch.as_tensor(self.parts[pid])
            self._client_cache[pid] = (
                self.dataset.x_train[idx].to(self.device),
                self.dataset.y_train[idx].to(self.device),
            )
        return self._client_cache[pid]

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The balanced test split, resident on the training device."""
        if self._test_cache is None:
            self._test_cache = (
                self.dataset.x_test.to(self.device),
                self.dataset.y_test.to(self.device),
            )
        return self._test_cache


def data_seed(config: Config) -> int:
    """The seed of the long tail's subset and the partition: ``data-seed``, or ``seed``."""
    return config["seed"] if config["data-seed"] < 0 else config["data-seed"]


def load_data(config: Config) -> datasets.Dataset:
    """The config's dataset, with the ``[text]`` keys that its loader takes."""
    name = config["dataset"]
    params, _ = callable_params(datasets.DATASETS.get(name), skip=2)
    text = {k: config[f"text.{snake_to_kebab(k)}"] for k in ("vocab_size", "max_len")}
    return datasets.load_dataset(
        name, config["data-root"] or None, **{k: v for k, v in text.items() if k in params}
    )


def imbalanced_subset(config: Config, labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """Indices of the training samples in use: all, or the ``[long-tail]`` subset (a
    profile's ratio, or per-class keep fractions), drawn with the data seed."""
    rng = seeded_rng(data_seed(config), 1)
    fractions = class_keep_fractions(config)
    if fractions:
        if len(fractions) != len(classes):
            raise ValueError(
                f"long-tail.keep = {config['long-tail.keep']!r}: {len(fractions)} fraction(s) "
                f"for {len(classes)} classes ({', '.join(classes)}); give one per class"
            )
        return keep_fractions(labels, fractions, rng)
    if config["long-tail.ratio"] > 1:
        return long_tail(labels, config["long-tail.ratio"], rng, config["long-tail.profile"])
    return np.arange(len(labels))


def build_federation(config: Config, device: torch.device | None = None) -> Federation:
    """Load the dataset and partition it among ``num-clients`` clients (no caching)."""
    data = load_data(config)
    if data.num_classes < 2:  # nothing to classify; the partition would fail obscurely
        raise ValueError(
            f"dataset {config['dataset']!r} has {data.num_classes} class(es) "
            f"({', '.join(map(str, data.classes)) or 'none'}): at least two are needed"
        )
    labels = data.y_train.numpy()
    keep = subsample(
        labels,
        imbalanced_subset(config, labels, data.classes),
        seeded_rng(data_seed(config), 5),
        fraction=config["subsample.fraction"],
        per_class_cap=config["subsample.per-class-cap"],
    )
    kwargs = config.partition.kwargs()
    try:
        local_parts = split_clients(
            config.partition.name,
            labels[keep],
            config["num-clients"],
            seeded_rng(data_seed(config), 2),
            **kwargs,
        )
    except Exception as exc:
        if not config.raised_by("partition", exc):
            raise
        # Name the config keys (kebab-case), the split and the data it was asked of (and
        # the type of a plug-in's own error).
        what = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        text = config.partition.in_config_words("partition", what)
        raise ValueError(
            f"[partition] {config.partition.name} of {config['dataset']} ({len(keep)} samples, "
            f"{data.num_classes} classes) among {config['num-clients']} clients: {text}"
        ) from exc
    parts = [keep[p] for p in local_parts]
    counts = class_counts(labels, parts, data.num_classes)
    return Federation(data, keep, parts, counts, device or resolve_device(config["device"]))


_FEDERATIONS: dict[str, Federation] = {}
# id(config) -> (config, its federation's key): the clients ask once per message with the
# same Config object, and its fingerprint flattens the whole config. The config is held,
# so its id cannot be reused while cached.
_KEYS: dict[int, tuple[Config, str]] = {}


def federation_key(config: Config) -> str:
    """The cache key of ``config``'s federation: its data, device and partition keys."""
    cached = _KEYS.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1]
    keys = [*DATA_KEYS, "device"] + [k for k in config.to_flat() if k.startswith("partition.")]
    key = config.fingerprint(keys)
    if len(_KEYS) >= 16:
        _KEYS.pop(next(iter(_KEYS)))
    _KEYS[id(config)] = (config, key)
    return key


def get_federation(config: Config) -> Federation:
    """The process-wide federation of ``config`` (built on first use, a few kept)."""
    key = federation_key(config)
    if key not in _FEDERATIONS:
        if len(_FEDERATIONS) >= 4:  # a sweep moves on: drop the oldest
            _FEDERATIONS.pop(next(iter(_FEDERATIONS)))
        _FEDERATIONS[key] = build_federation(config)
    return _FEDERATIONS[key]


def init_model(config: Config, fed: Federation) -> nn.Module:
    """The global model's architecture with its seeded initial weights (on CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        model = build_model(
            config.model.name,
            fed.dataset.input_shape,
            fed.num_classes,
            **model_kwargs(config),
            **data_arguments(config, fed),
        )
    bias = initial_bias(config.loss.name, fed.num_classes, **config.loss.kwargs())
    if bias is not None:
        set_class_biases(model, fed.num_classes, bias)
    return model


def data_arguments(config: Config, fed: Federation) -> dict[str, Any]:
    """What the model takes from the data beyond its shape: a text model's vocabulary."""
    if not fed.dataset.is_tokens:
        return {}
    if not reads_tokens(config.model.name):
        raise ValueError(
            f"model.name = {config.model.name!r} cannot read dataset {config['dataset']!r}, "
            "which is token ids (text); use a text model: fasttext or bilstm"
        )
    return {"vocab_size": fed.dataset.vocab_size}


def set_class_biases(model: nn.Module, num_classes: int, value: float) -> None:
    """Set the biases of the model's classifier (a cosine head has none: nothing to set)."""
    head = class_head(model)
    if isinstance(head, nn.Linear) and head.out_features == num_classes and head.bias is not None:
        with torch.no_grad():
            head.bias.fill_(value)


def model_kwargs(config: Config) -> dict[str, Any]:
    """The model's parameters; LDAM turns the cosine head on unless the config says otherwise."""
    kwargs = config.model.kwargs()
    if (
        config.loss.name in COSINE_HEAD_LOSSES
        and "cosine_head" not in kwargs
        and declares("model", config.model.name, "cosine-head")
    ):
        kwargs["cosine_head"] = True  # LDAM's margins assume cosine logits
    return kwargs


def loss_kwargs(config: Config) -> dict[str, Any]:
    """The loss's parameters; on a cosine head its logit scale ``s`` (a plug-in's too, if
    it has one) is ``COSINE_SCALE`` unless the config sets it (cosine logits alone lie in
    [-1, 1])."""
    kwargs = config.loss.kwargs()
    cosine = model_kwargs(config).get("cosine_head", False)
    if cosine and kwargs.get("s") is None and declares("loss", config.loss.name, "s"):
        kwargs["s"] = COSINE_SCALE
    return kwargs


def use_augmentation(config: Config, fed: Federation) -> bool:
    """``augment = auto`` turns CIFAR-style augmentation on for 32x32 images."""
    setting: Any = config["augment"]
    if setting == "auto":
        return bool(default_augment(fed.dataset.name, fed.dataset.input_shape))
    return setting == "on"
