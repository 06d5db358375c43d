"""Text datasets as fixed-length token-id tensors: IMDB reviews (Maas et al. 2011).

Tokenisation is deliberately simple and documented, so that a reader can reproduce it:
lower-case, ``<br />`` tags removed, words matched by :data:`WORD` (letters and digits,
with an inner apostrophe kept: ``don't`` is one word). The vocabulary is the
``vocab_size - 2`` most frequent training words (ties broken alphabetically); id 0 is
padding and id 1 an out-of-vocabulary word. Each review keeps its first ``max_len``
tokens and is padded with 0 to that length.
"""

from __future__ import annotations

import collections
import csv
import gzip
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from fedimb.data.datasets import (
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    cached_dataset,
    tree_fingerprint,
)

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
PAD, UNKNOWN = 0, 1
IMDB_FILES = ("train.csv.gz", "test.csv.gz")
IMDB_CLASSES = ("neg", "pos")  # alphabetical, as an image folder's classes
DEFAULT_IMDB_ROOT = Path("../shared/data/imdb")


def tokenize(text: str) -> list[str]:
    """Words of ``text`` by the module's rule (lower-case, ``<br />`` removed)."""
    return WORD.findall(text.lower().replace("<br />", " "))


def build_vocab(documents: Iterable[Sequence[str]], vocab_size: int) -> dict[str, int]:
    """Word -> id for the ``vocab_size - 2`` most frequent words (ids from 2)."""
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3 (padding, unknown, one word), got {vocab_size}")
    counts = collections.Counter(w for doc in documents for w in doc)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 2]
    return {word: i + 2 for i, (word, _) in enumerate(ranked)}


def encode(documents: Sequence[Sequence[str]], vocab: dict[str, int], max_len: int) -> torch.Tensor:
    """int32 ``[N, max_len]`` ids: each document's first ``max_len`` words, 0-padded."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = torch.zeros((len(documents), max_len), dtype=torch.int32)
    for i, doc in enumerate(documents):
        ids = [vocab.get(w, UNKNOWN) for w in doc[:max_len]]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return out


def token_dataset(
    name: str,
    train: tuple[Sequence[Sequence[str]], Sequence[int]],
    test: tuple[Sequence[Sequence[str]], Sequence[int]],
    classes: Sequence[str],
    vocab_size: int,
    max_len: int,
) -> Dataset:
    """A :class:`Dataset` of token ids from tokenised ``(documents, labels)`` splits, with
    the vocabulary built on the training documents."""
    vocab = build_vocab(train[0], vocab_size)
    return Dataset(
        name=name,
        x_train=encode(train[0], vocab, max_len),
        y_train=torch.as_tensor(list(train[1]), dtype=torch.int64),
        x_test=encode(test[0], vocab, max_len),
        y_test=torch.as_tensor(list(test[1]), dtype=torch.int64),
        classes=list(classes),
        mean=(0.0,),
        std=(1.0,),
        max_value=1.0,
        vocab_size=vocab_size,
    )


def _read_reviews(path: Path) -> tuple[list[list[str]], list[int]]:
    """Tokenised reviews and labels (index in ``IMDB_CLASSES``) of one csv.gz split."""
    documents, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"label", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"imdb: {path} has no column(s) {sorted(missing)}")
        for row in reader:
            if row["label"] not in IMDB_CLASSES:
                raise ValueError(
                    f"imdb: {path} line {reader.line_num}: label {row['label']!r}, "
                    f"expected one of {IMDB_CLASSES}"
                )
            documents.append(tokenize(row["text"]))
            labels.append(IMDB_CLASSES.index(row["label"]))
    return documents, labels


@DATASETS.register("imdb")
def _load_imdb(
    root: Path | None, cache_dir: Path, *, vocab_size: int = 20000, max_len: int = 400
) -> Dataset:
    """IMDB reviews (Maas et al. 2011) from ``root/train.csv.gz`` and ``root/test.csv.gz``
    (columns ``label`` in neg/pos and ``text``), as token ids (see the module docstring)."""
    given = root if root is not None else DEFAULT_IMDB_ROOT
    root = given.resolve()
    files = [root / f for f in IMDB_FILES]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        relative = "" if given.is_absolute() else f" (a relative data-root is from {Path.cwd()})"
        raise DatasetNotFoundError(
            f"dataset 'imdb' not found: {root} has no {' or '.join(absent)}{relative}; "
            "expected train.csv.gz and test.csv.gz with columns label (neg/pos) and text"
        )

    def fingerprint() -> str:
        return tree_fingerprint([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])

    def build() -> Dataset:
        train, test = (_read_reviews(f) for f in files)
        return token_dataset("imdb", train, test, IMDB_CLASSES, vocab_size, max_len)

    params = {"vocab_size": vocab_size, "max_len": max_len}
    return cached_dataset(cache_dir, "imdb", root, params, fingerprint, build)
