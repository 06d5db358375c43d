"""Name -> factory registries with a dotted import path for user plug-ins.

Modelled on torchvision's model registry: ``@REGISTRY.register("name")`` adds a
factory, ``REGISTRY.get(name)`` returns it, and an unknown or duplicate name raises
an error that lists the valid names. A name of the form ``"pkg.module:attr"`` is
imported instead of looked up, so users plug in their own code without touching ours.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name, a duplicate registration or a bad import path."""


def import_object(path: str) -> Any:
    """Import ``"pkg.module:attr"`` (or ``"pkg.module.attr"``) and return the attribute.

    Raises
    ------
    RegistryError
        If the module cannot be imported or has no such attribute.
    """
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RegistryError(f"bad import path {path!r}: expected 'package.module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        # Missing itself (not a module it imports): most often a folder not on the path.
        hint = (
            "; is its folder on PYTHONPATH (PYTHONPATH=. for the current folder)?"
            if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.split(".")[0]
            else ""
        )
        raise RegistryError(
            f"cannot import module {module_name!r} from {path!r}: {exc}{hint}"
        ) from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise RegistryError(
            f"module {module_name!r} has no attribute {attr!r} (from {path!r})"
            + _closest_attribute(module, module_name, attr)
        ) from exc
    return obj


def _closest_attribute(module: Any, module_name: str, attr: str) -> str:
    """'; did you mean ...?' for a misspelt (or miscased) public name of ``module``."""
    names = [n for n in dir(module) if not n.startswith("_")]
    by_case = {n.lower(): n for n in names}
    close = [by_case[attr.lower()]] if attr.lower() in by_case else []
    close = close or difflib.get_close_matches(attr, names, n=1)
    return f"; did you mean '{module_name}:{close[0]}'?" if close else ""


#: Marks a parameter without a default.
REQUIRED = inspect.Parameter.empty


def callable_params(obj: Any, skip: int = 0) -> tuple[dict[str, Any], bool]:
    """Defaults of a factory's keyword parameters after its first ``skip`` (``REQUIRED``
    where it has none), and whether it takes ``**kwargs``."""
    params = list(inspect.signature(obj).parameters.values())
    defaults = {
        p.name: p.default
        for p in params[skip:]
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    return defaults, any(p.kind is p.VAR_KEYWORD for p in params)


def is_import_path(name: str) -> bool:
    """Return True if ``name`` looks like ``"pkg.module:attr"``."""
    return ":" in name


class Registry(Generic[T]):
    """A named collection of factories of one kind (losses, models, datasets, ...).

    Parameters
    ----------
    kind : str
        What the registry holds, used in error messages ("loss", "model", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; a duplicate name raises."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        """Registered names in the order they were registered."""
        return iter(list(self._items))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        """Return the factory registered as ``name``, or import it if it is a path.

        Raises
        ------
        RegistryError
            For an unknown name (listing the valid ones and a close match) or a bad
            import path.
        """
        if name in self._items:
            return self._items[name]
        if is_import_path(name):
            return import_object(name)
        raise RegistryError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        """The error text for an unknown ``name``: valid names and a did-you-mean."""
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"unknown {self.kind} {name!r}{hint}; valid: {', '.join(self.names())}, "
            f"or an import path 'package.module:attribute'"
        )
