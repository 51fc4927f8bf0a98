"""The plugin registry: pluggy hooks, the built-ins and third-party entry points.

Built-ins (:mod:`vsd.plugins.builtins`) are registered through the same hooks as third-party
plugins, which are modules named in the ``vsd`` entry-point group of any installed distribution.

Environment switches:
    VSD_PLUGINS=name1,name2   autoload only these entry points (entry-point or distribution names)
    VSD_DISABLE_PLUGIN_AUTOLOAD=1   autoload no third-party plugins (built-ins still load)
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .hookspecs import PROJECT, SLOTS

ENV_ALLOW = "VSD_PLUGINS"
ENV_DISABLE = "VSD_DISABLE_PLUGIN_AUTOLOAD"
ENTRY_POINT_GROUP = "vsd"
BUILTINS = "vsd.plugins.builtins"
"""The built-ins' module, loaded by name like an entry point: core imports no plugin code."""


@dataclass
class PluginInfo:
    """One registered plugin class."""

    slot: str
    name: str
    cls: type
    provider: str  # distribution name ("vsd" for built-ins)
    version: str


@dataclass
class LoadFailure:
    """A plugin module that could not be loaded or whose hook failed."""

    provider: str
    version: str
    entry_point: str
    error: str


@dataclass
class _Source:
    provider: str
    version: str
    entry_point: str


def _base_classes() -> dict[str, type]:
    from .contracts import Aggregator, Encoder, Renderer, Representation, ViewsetDataset

    return {
        "encoder": Encoder,
        "aggregator": Aggregator,
        "representation": Representation,
        "renderer": Renderer,
        "dataset": ViewsetDataset,
    }


def _allowed(ep: md.EntryPoint) -> bool:
    if os.environ.get(ENV_DISABLE, "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    allow = os.environ.get(ENV_ALLOW)
    if allow is None:
        return True
    names = {a.strip() for a in allow.split(",") if a.strip()}
    dist = ep.dist.name if ep.dist is not None else ""
    return ep.name in names or dist in names


@dataclass
class Registry:
    """All plugins by slot and name, plus what failed to load."""

    plugins: dict[str, dict[str, PluginInfo]] = field(default_factory=lambda: {s: {} for s in SLOTS})
    duplicates: dict[tuple[str, str], list[PluginInfo]] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)
    manager: pluggy.PluginManager | None = None

    @classmethod
    def load(cls, autoload: bool = True, extra: list[tuple[Any, str]] | None = None) -> "Registry":
        """Build the registry: built-ins, then (if ``autoload``) entry points, then ``extra``
        ``(module_or_object, provider_name)`` pairs (used by tests to register in-process plugins).
        """
        builtins = importlib.import_module(BUILTINS)
        reg = cls(manager=pluggy.PluginManager(PROJECT))
        reg.manager.add_hookspecs(hookspecs)
        sources: dict[int, _Source] = {}
        reg._register(builtins, _Source("vsd", _version("vsd"), "builtins"), sources)
        if autoload:
            for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                if _allowed(ep):
                    reg._load_entry_point(ep, sources)
        for obj, provider in extra or []:
            reg._register(obj, _Source(provider, _version(provider), provider), sources)
        reg._collect(sources)
        return reg

    def _load_entry_point(self, ep: md.EntryPoint, sources: dict[int, _Source]) -> None:
        dist = ep.dist.name if ep.dist is not None else "?"
        src = _Source(dist, ep.dist.version if ep.dist is not None else "?", ep.name)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not stop the others
            self.failures.append(LoadFailure(dist, src.version, ep.name, f"{type(exc).__name__}: {exc}"))
            return
        self._register(module, src, sources)

    def _register(self, obj: Any, src: _Source, sources: dict[int, _Source]) -> None:
        if self.manager.is_registered(obj):
            return  # one module named twice (e.g. an entry point for the built-ins): load it once
        try:
            self.manager.register(obj, name=f"{src.provider}:{src.entry_point}")
        except (pluggy.PluginValidationError, ValueError) as exc:
            self.failures.append(LoadFailure(src.provider, src.version, src.entry_point, str(exc)))
            return
        sources[id(obj)] = src

    def _collect(self, sources: dict[int, _Source]) -> None:
        bases = _base_classes()
        for slot, hook_name in SLOTS.items():
            hook = getattr(self.manager.hook, hook_name)
            for impl in reversed(hook.get_hookimpls()):  # registration order
                src = sources[id(impl.plugin)]
                try:
                    result = impl.function()
                except Exception as exc:
                    self.failures.append(
                        LoadFailure(src.provider, src.version, src.entry_point, f"hook {hook_name} raised {type(exc).__name__}: {exc}")
                    )
                    continue
                for name, plugin_cls in self._checked(result, slot, hook_name, src, bases[slot]):
                    self._add(PluginInfo(slot, name, plugin_cls, src.provider, src.version))

    def _checked(self, result, slot, hook_name, src, base):
        if not isinstance(result, dict):
            self.failures.append(
                LoadFailure(src.provider, src.version, src.entry_point, f"hook {hook_name} must return a dict of name -> class, got {type(result).__name__}")
            )
            return []
        good = []
        for name, plugin_cls in result.items():
            if not (isinstance(plugin_cls, type) and issubclass(plugin_cls, base)):
                self.failures.append(
                    LoadFailure(src.provider, src.version, src.entry_point, f"hook {hook_name}: {name!r} is not a subclass of {base.__module__}.{base.__name__}")
                )
            else:
                good.append((name, plugin_cls))
        return good

    def _add(self, info: PluginInfo) -> None:
        slot_plugins = self.plugins[info.slot]
        key = (info.slot, info.name)
        if key in self.duplicates:
            self.duplicates[key].append(info)
        elif info.name in slot_plugins:
            self.duplicates[key] = [slot_plugins.pop(info.name), info]
        else:
            slot_plugins[info.name] = info

    # ---- lookup ---------------------------------------------------------------------------
    def names(self, slot: str) -> list[str]:
        return sorted(self.plugins[slot])

    def available(self, slot: str) -> str:
        """"a (provider), b (provider)" for messages."""
        return ", ".join(f"{n} ({i.provider})" for n, i in sorted(self.plugins[slot].items())) or "none"

    def get(self, slot: str, name: str) -> PluginInfo:
        """The plugin registered as ``name`` in ``slot``; a PluginError saying what exists otherwise."""
        if slot not in self.plugins:
            raise PluginError(f"unknown plugin slot {slot!r}; slots are: {', '.join(SLOTS)}")
        if (slot, name) in self.duplicates:
            who = " and ".join(f"{i.provider} {i.version} ({i.cls.__module__}.{i.cls.__qualname__})" for i in self.duplicates[(slot, name)])
            raise PluginError(f"the {slot} name {name!r} is registered twice, by {who}; uninstall one or restrict autoloading with {ENV_ALLOW}")
        try:
            return self.plugins[slot][name]
        except KeyError:
            raise PluginError(f"unknown {slot} {name!r}; available: {self.available(slot)}") from None

    def all(self) -> list[PluginInfo]:
        return [i for slot in SLOTS for i in sorted(self.plugins[slot].values(), key=lambda i: i.name)]


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry.load()
    return _REGISTRY


def reset_registry() -> None:
    global _REGISTRY
    _REGISTRY = None
