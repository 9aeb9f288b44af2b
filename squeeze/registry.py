"""One registry type behind every extension point: methods (passes), runtimes, importances, zoo models, plan kinds.

A name is registered once (a second owner is an error naming both), looked up with an error that lists the
valid names, and enumerated for `squeeze list`, recipe validation and the contract tests. A registry with an
entry-point `group` also loads third-party plugins on its first lookup: an entry point names a module to
import (importing it registers) or an object to register under the entry point's name.

This module does not import torch: listing and validation stay light.
"""

from __future__ import annotations

import importlib.metadata
import logging
import pkgutil
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from squeeze.errors import SqueezeError, first_line

__all__ = ["Registry", "PLUGIN_GROUPS"]

T = TypeVar("T")

# The entry-point groups a plugin package can declare (pyproject `[project.entry-points."squeeze.methods"]`).
PLUGIN_GROUPS = ("squeeze.methods", "squeeze.runtimes", "squeeze.importances", "squeeze.models")

log = logging.getLogger("squeeze.plugins")


class Registry(Generic[T]):
    """Objects of one kind by name. `kind` and `plural` word the errors ("Unknown method `x`. Valid methods: ...")."""

    def __init__(self, kind: str, *, plural: str | None = None, group: str | None = None,
                 error: type[SqueezeError] = SqueezeError,
                 unknown: Callable[[str, list[str]], SqueezeError] | None = None,
                 modules: tuple[str, ...] = (), packages: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.group = group
        self._error = error
        self._unknown = unknown  # builds the unknown-name error where a registry keeps an older wording
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        # squeeze's own modules that register on import, imported on the first lookup like plugins: a module
        # that registers into this registry then need not be imported by the registry's own module (a cycle).
        self._modules = modules
        # Packages whose every module is imported the same way: a new built-in is one new file, no list to edit.
        self._packages = packages
        self._plugins_loaded = group is None and not modules and not packages

    def register(self, name: str, obj: T | None = None, owner: str | None = None):
        """`register(name, obj)`, or `@register(name)` as a decorator; returns the object unchanged."""
        if obj is None:
            return lambda o: self.register(name, o, owner)
        owner = owner or getattr(obj, "__module__", None) or type(obj).__module__
        # The same (or an equal) object again is harmless: a module imported under two names, an entry point
        # naming an object its module already registered.
        if name in self._items and self._items[name] != obj:
            raise self._error(f"The {self.kind} `{name}` is registered twice: by {self._owners[name]} and by {owner}.",
                              "Rename one of them (or uninstall one of the plugins).")
        self._items[name] = obj
        self._owners[name] = owner
        return obj

    def get(self, name: str) -> T:
        self._load_plugins()
        if name not in self._items:
            raise self._unknown_error(name)
        return self._items[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __iter__(self) -> Iterator[T]:
        """The registered objects, sorted by name."""
        return iter([self._items[n] for n in self.names()])

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._items

    def _unknown_error(self, name: str) -> SqueezeError:
        names = sorted(self._items)
        if self._unknown is not None:
            return self._unknown(name, names)
        return self._error(f"Unknown {self.kind} `{name}`.", f"Valid {self.plural}: {', '.join(names) or '(none)'}.")

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # first: a plugin that looks names up while importing must not recurse
        for module in self._modules:
            importlib.import_module(module)
        for package in self._packages:
            path = importlib.import_module(package).__path__
            for info in pkgutil.walk_packages(path, f"{package}."):
                importlib.import_module(info.name)
        if self.group:
            self.load_plugins(importlib.metadata.entry_points(group=self.group))

    def load_plugins(self, entry_points: Iterable[importlib.metadata.EntryPoint]) -> None:
        """Load each plugin; one that fails to load (or takes a name already registered) is a one-line warning,
        never a crash of squeeze: the built-ins and the other plugins still work."""
        for ep in entry_points:
            try:
                obj = ep.load()
                if not isinstance(obj, types.ModuleType):  # a module registered itself by being imported
                    self.register(ep.name, obj, owner=f"plugin `{ep.name}` ({ep.value})")
            except Exception as exc:  # any error a third-party import raises, or a name clash
                log.warning(f"plugin `{ep.name}` ({ep.value}) in {self.group} failed to load and is skipped: "
                            f"{first_line(exc)}")
