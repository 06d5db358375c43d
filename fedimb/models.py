"""Models, by name: ``build_model(name, input_shape, num_classes, **params)``.

- ``mlp``: one hidden layer, for digits and feature data.
- ``cnn``: the 2-conv CNN of McMahan et al. (2017), for 28x28/32x32 images (any size works).
- ``simple-cnn``: NIID-Bench's small LeNet-style CNN (Li et al. 2022), for 32x32 images.
- ``pfl-cnn``: pfl-research's CIFAR-10 benchmark CNN (2 convolutions, dropout), to run
  their benchmark's workload beside theirs (``benchmarks/bench_pfl.py``).
- ``resnet32``: the CIFAR ResNet-32 of He et al. as used by Cao et al. (LDAM-DRW), with
  GroupNorm by default (vectorisable, and recommended under label skew; Hsieh et al. 2020)
  or BatchNorm (``norm="batch"``, trained one client at a time).
- ``fasttext``: text; the mean of word embeddings into the classifier (Joulin et al.
  2017), fast on a CPU and vectorisable.
- ``bilstm``: text; a two-layer bidirectional LSTM (Cao et al.'s IMDB model), for GPUs
  (trained one client at a time).

Text models read token ids (0 = padding) and receive the dataset's ``vocab_size`` from
fedimb, not from the config.

Every model takes ``cosine_head``: a cosine-normalised linear classifier (unit-norm rows
and features), which LDAM assumes. A user model plugs in as ``"pkg.mod:factory"`` called
as ``factory(input_shape, num_classes, **params)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedimb.registry import Registry, callable_params

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def list_models() -> list[str]:
    """Registered model names."""
    return MODELS.names()


# Arguments fedimb passes from the data, not from the config.
DATA_ARGUMENTS = ("input_shape", "num_classes", "vocab_size")


def model_params(name: str) -> dict[str, object]:
    """Keyword parameters (with defaults) a registered model accepts from the config."""
    params, _ = callable_params(MODELS.get(name))
    return {k: v for k, v in params.items() if k not in DATA_ARGUMENTS}


def reads_tokens(name: str) -> bool:
    """Whether model ``name`` (registered or a plug-in) takes token ids (``vocab_size``)."""
    return "vocab_size" in callable_params(MODELS.get(name))[0]


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **params) -> nn.Module:
    """Build a model by registered name or import path."""
    factory = MODELS.get(name)
    model = factory(tuple(input_shape), num_classes, **params)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model {name!r} returned a {type(model).__name__}; a model factory must return "
            "a torch.nn.Module"
        )
    return model


class CosineLinear(nn.Module):
    """Linear layer on unit-norm features with unit-norm class rows: logits are cosines.

    LDAM's scale ``s`` then sets the logit range, as in Cao et al.'s ``NormedLinear``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


def classifier(in_features: int, num_classes: int, cosine_head: bool) -> nn.Module:
    """The last layer: plain linear or cosine-normalised."""
    return (
        CosineLinear(in_features, num_classes)
        if cosine_head
        else nn.Linear(in_features, num_classes)
    )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        # Groups of up to 8 channels, the usual choice for small CIFAR ResNets.
        return nn.GroupNorm(max(1, channels // 8) if channels >= 8 else 1, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm = {kind!r}: expected 'group', 'batch' or 'none'")


@MODELS.register("mlp")
def mlp(
    input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 64, cosine_head: bool = False
) -> nn.Module:
    """Flatten -> Linear(hidden) -> ReLU -> classifier."""
    if hidden < 1:
        raise ValueError(f"model.hidden = {hidden}: must be >= 1")
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        classifier(hidden, num_classes, cosine_head),
    )


@MODELS.register("cnn")
def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    width: int = 32,
    hidden: int = 512,
    cosine_head: bool = False,
) -> nn.Module:
    """McMahan et al.'s CNN: 2x (5x5 conv, ReLU, 2x2 max-pool), FC(hidden), ReLU, classifier."""
    if len(input_shape) != 3:
        raise ValueError(f"model 'cnn' needs image input (C, H, W), got shape {input_shape}")
    channels, height, width_px = input_shape
    flat = 2 * width * (height // 4) * (width_px // 4)
    return nn.Sequential(
        nn.Conv2d(channels, width, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        classifier(hidden, num_classes, cosine_head),
    )


@MODELS.register("simple-cnn")
def simple_cnn(
    input_shape: tuple[int, ...], num_classes: int, *, cosine_head: bool = False
) -> nn.Module:
    """NIID-Bench's ``simple-cnn`` (Li et al. 2022; LeNet-5 style): 5x5 conv (6), ReLU,
    2x2 max-pool, 5x5 conv (16), ReLU, 2x2 max-pool, FC 120, ReLU, FC 84, ReLU, classifier."""
    if len(input_shape) != 3:
        raise ValueError(f"model 'simple-cnn' needs image input (C, H, W), got shape {input_shape}")
    channels, height, width = input_shape
    if min(height, width) < 16:
        raise ValueError(f"model 'simple-cnn' needs images of at least 16x16, got {input_shape}")

    def side(n: int) -> int:  # after two unpadded 5x5 convolutions, each pooled by 2
        return ((n - 4) // 2 - 4) // 2

    flat = 16 * side(height) * side(width)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        classifier(84, num_classes, cosine_head),
    )


@MODELS.register("pfl-cnn")
def pfl_cnn(
    input_shape: tuple[int, ...], num_classes: int, *, cosine_head: bool = False
) -> nn.Module:
    """pfl-research's CIFAR-10 benchmark CNN (``simple_cnn``): 3x3 conv (32), ReLU, 3x3
    conv (64), ReLU, 2x2 max-pool, dropout 0.25, FC 128, ReLU, dropout 0.5, classifier;
    Glorot-uniform weights, as theirs."""
    if len(input_shape) != 3:
        raise ValueError(f"model 'pfl-cnn' needs image input (C, H, W), got shape {input_shape}")
    channels, height, width = input_shape
    if min(height, width) < 6:
        raise ValueError(f"model 'pfl-cnn' needs images of at least 6x6, got {input_shape}")
    model = nn.Sequential(
        nn.Conv2d(channels, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(64 * ((height - 4) // 2) * ((width - 4) // 2), 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        classifier(128, num_classes, cosine_head),
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | CosineLinear):
            nn.init.xavier_uniform_(m.weight)
    return model


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            # Option A of He et al. (parameter-free): subsample and zero-pad channels.
            pad = c_out - c_in
            self.shortcut = _PadShortcut(stride, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PadShortcut(nn.Module):
    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of n blocks, 16/32/64 channels."""

    def __init__(
        self, in_channels: int, num_classes: int, blocks: int, norm: str, cosine_head: bool
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = _norm(norm, 16)
        layers, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(_BasicBlock(c_in, c_out, stride if i == 0 else 1, norm))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = classifier(64, num_classes, cosine_head)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn(self.conv(x))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@MODELS.register("resnet32")
def resnet32(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    norm: str = "group",
    cosine_head: bool = False,
) -> nn.Module:
    """ResNet-32 (5 blocks per stage) as in Cao et al. 2019, GroupNorm by default."""
    if len(input_shape) != 3:
        raise ValueError(f"model 'resnet32' needs image input (C, H, W), got shape {input_shape}")
    _norm(norm, 16)  # validate early
    return ResNetCifar(input_shape[0], num_classes, 5, norm, cosine_head)


def _check_tokens(name: str, input_shape: tuple[int, ...], vocab_size: int) -> None:
    if vocab_size < 1 or len(input_shape) != 1:
        raise ValueError(
            f"model {name!r} reads token ids ([N, length] with a vocabulary); use a text "
            f"dataset such as 'imdb' (got input shape {input_shape})"
        )


def _masked_mean(values: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence of ``values`` ``[N, L, D]`` where ``tokens`` is not padding."""
    mask = (tokens != 0).to(values.dtype)
    # A batched matrix product: no [N, L, D] temporary (3x faster than a masked sum).
    total = torch.bmm(mask.unsqueeze(1), values).squeeze(1)
    return total / mask.sum(1, keepdim=True).clamp_min(1.0)


class BagOfEmbeddings(nn.Module):
    """Mean of the words' embeddings (padding left out) into the classifier."""

    def __init__(self, vocab_size: int, dim: int, num_classes: int, cosine_head: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        # fastText's small uniform start: the mean of ~200 unit-variance random vectors
        # would be noise that the (1/length-scaled) word gradients take epochs to beat.
        nn.init.uniform_(self.embedding.weight, -1.0 / dim, 1.0 / dim)
        self.fc = classifier(dim, num_classes, cosine_head)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(_masked_mean(self.embedding(tokens), tokens))


@MODELS.register("fasttext")
def fasttext(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    vocab_size: int = 0,
    dim: int = 32,
    cosine_head: bool = False,
) -> nn.Module:
    """fastText's classifier (Joulin et al. 2017): mean word embedding, then linear."""
    _check_tokens("fasttext", input_shape, vocab_size)
    if dim < 1:
        raise ValueError(f"model.dim = {dim}: must be >= 1")
    return BagOfEmbeddings(vocab_size, dim, num_classes, cosine_head)


class BiLSTM(nn.Module):
    """Embedding, a bidirectional LSTM, the mean of its outputs over the words, classifier."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        hidden: int,
        layers: int,
        num_classes: int,
        cosine_head: bool,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, hidden, layers, batch_first=True, bidirectional=True)
        self.fc = classifier(2 * hidden, num_classes, cosine_head)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embedding(tokens))
        return self.fc(_masked_mean(out, tokens))


@MODELS.register("bilstm")
def bilstm(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    vocab_size: int = 0,
    dim: int = 128,
    hidden: int = 128,
    layers: int = 2,
    cosine_head: bool = False,
) -> nn.Module:
    """Cao et al.'s IMDB model: a two-layer bidirectional LSTM over word embeddings."""
    _check_tokens("bilstm", input_shape, vocab_size)
    for key, value in (("dim", dim), ("hidden", hidden), ("layers", layers)):
        if value < 1:
            raise ValueError(f"model.{key} = {value}: must be >= 1")
    return BiLSTM(vocab_size, dim, hidden, layers, num_classes, cosine_head)


def class_head(model: nn.Module) -> nn.Module:
    """The model's last layer, its classifier: ``fc`` of the ResNets, the last module of the
    Sequential models, else (a plug-in) the last module that holds parameters."""
    if isinstance(model, nn.Sequential):
        return model[-1]
    head = getattr(model, "fc", None)
    if isinstance(head, nn.Module):
        return head
    return [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None][-1]


def vectorise_blocker(model: nn.Module) -> str | None:
    """Why the model cannot be trained for many clients at once with ``torch.func.vmap``
    (None if it can).

    BatchNorm updates running statistics in place during training, and recurrent layers
    run fused kernels, neither of which vmap over stacked parameters can express; such
    models are trained one client at a time.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "the model has BatchNorm (use GroupNorm; for resnet32, model.norm = 'group')"
        if isinstance(m, nn.RNNBase):
            return f"the model has a recurrent layer ({type(m).__name__})"
    return None


def is_vectorisable(model: nn.Module) -> bool:
    """True if the model can be trained for many clients at once (:func:`vectorise_blocker`)."""
    return vectorise_blocker(model) is None
