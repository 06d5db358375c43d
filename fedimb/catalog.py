"""The registered components' names, read from their modules' source without importing
them (torch, Flower): what ``fedimb list`` prints, in a fraction of a second.

A registration is a call ``REGISTRY.register("name")`` (as a decorator or applied to an
existing object) whose name is a string literal, in a module of the kind's home below.
tests/test_catalog.py checks that these names are the real registries' names.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

# fedimb list's word -> the modules (or packages) that register that kind.
HOMES: dict[str, tuple[str, ...]] = {
    "datasets": ("fedimb.data.datasets", "fedimb.data.text"),
    "partitions": ("fedimb.data.partition",),
    "losses": ("fedimb.losses",),
    "samplers": ("fedimb.sampling",),
    "models": ("fedimb.models",),
    "strategies": ("strategies",),
}
_PACKAGE_ROOT = Path(__file__).resolve().parent


def registered_names(kind: str) -> list[str]:
    """The names registered for ``kind`` (a key of :data:`HOMES`), sorted."""
    names: set[str] = set()
    for module in HOMES[kind]:
        for path in _source_files(module):
            names |= _registrations(path)
    return sorted(names)


def _source_files(module: str) -> list[Path]:
    """The .py files of ``module``: its file, or every file of its package."""
    if module.partition(".")[0] == "fedimb":  # found here: no parent package imported
        base = _PACKAGE_ROOT.joinpath(*module.split(".")[1:])
    else:
        spec = importlib.util.find_spec(module)  # a top-level name: nothing imported
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"no module named {module!r}")
        base = Path(spec.origin)
        base = base.parent if base.name == "__init__.py" else base.with_suffix("")
    if base.is_dir():
        return sorted(base.rglob("*.py"))
    return [base.with_suffix(".py")]


@functools.cache
def _registrations(path: Path) -> frozenset[str]:
    """Names registered in one source file: ``X.register("name")`` calls, and helpers
    named ``register_<kind>("name")`` or ``_register("name", ...)``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        first = node.args[0]
        literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
        if literal and _is_registration(node.func):
            found.add(first.value)
    return frozenset(found)


def _is_registration(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "register"
    return isinstance(func, ast.Name) and (
        func.id in ("register", "_register") or func.id.startswith("register_")
    )
