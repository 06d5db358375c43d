"""The on-disk cache of decoded datasets, keyed by source fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedimb.data.datasets.core import Dataset

CACHE_FORMAT = 1  # bump when the cached layout changes, so old files are not read


def tree_fingerprint(files: Sequence[tuple[str, int, int]]) -> str:
    """sha256 of sorted ``(relative path, size, mtime_ns)`` triples."""
    h = hashlib.sha256()
    for rel, size, mtime in sorted(files):
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def stat_tree(top: Path) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every regular file under ``top``."""
    out = []
    for dirpath, _, filenames in os.walk(top):
        for fname in filenames:
            st = os.stat(os.path.join(dirpath, fname))
            out.append(
                (os.path.relpath(os.path.join(dirpath, fname), top), st.st_size, st.st_mtime_ns)
            )
    return out


def _cache_file(cache_dir: Path, name: str, root: Path, params: dict[str, Any], fp: str) -> Path:
    """``<name>-<hash(name, root, params)>-<fingerprint>.pt``: one source, one prefix."""
    ident = json.dumps([CACHE_FORMAT, name, str(root), params], sort_keys=True, default=str)
    prefix = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return cache_dir / f"{name}-{prefix}-{fp[:16]}.pt"


def _read_cache(path: Path) -> Dataset | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return Dataset(**blob)
    except Exception as exc:  # a truncated or foreign file: rebuild rather than fail
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None


def _write_cache(path: Path, ds: Dataset) -> None:
    """Save atomically (temp file + os.replace) and drop stale versions of this source."""
    blob = {
        "name": ds.name,
        "x_train": ds.x_train,
        "y_train": ds.y_train,
        "x_test": ds.x_test,
        "y_test": ds.y_test,
        "classes": list(ds.classes),
        "mean": tuple(ds.mean),
        "std": tuple(ds.std),
        "max_value": ds.max_value,
        "vocab_size": ds.vocab_size,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(blob, fh)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is ordinary user data
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:  # a read-only cache should not stop the run
        warnings.warn(f"could not write dataset cache {path}: {exc}", stacklevel=3)
        return
    stem = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)


def cached_dataset(
    cache_dir: Path,
    name: str,
    root: Path,
    params: dict[str, Any],
    fingerprint: Callable[[], str | None],
    build: Callable[[], Dataset],
) -> Dataset:
    """Return the cached dataset for the current source fingerprint, or build and cache it.

    ``fingerprint`` returns None when the source is not there yet (before a download); it
    is then called again after ``build``.
    """
    fp = fingerprint()
    if fp is not None:
        hit = _read_cache(_cache_file(cache_dir, name, root, params, fp))
        if hit is not None:
            return hit
    ds = build()
    fp = fingerprint()
    if fp is not None:
        _write_cache(_cache_file(cache_dir, name, root, params, fp), ds)
    return ds
