"""The plugin manager: finds methods through the ``peftkit`` entry-point group, lazily.

Built-in methods are entry points of the ``peftkit`` distribution itself, exactly like a
third-party plugin's. ``PEFTKIT_LOAD_PLUGINS`` (a comma list of entry-point names) restricts the
third-party plugins that load; set but empty, only the built-ins load.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownMethodError
from .method import Method, retired_hooks

T = TypeVar("T")

__all__ = ["BUILTIN_DISTRIBUTION", "ENTRY_POINT_GROUP", "MethodInfo", "Registration", "collect", "failed_plugins", "get_method", "load_plugins", "method_infos", "pm"]

ENTRY_POINT_GROUP = "peftkit"
BUILTIN_DISTRIBUTION = "peftkit"

pm = pluggy.PluginManager("peftkit")
pm.add_hookspecs(hookspecs)

_loaded = False
_failed: dict[str, str] = {}  # entry-point name -> why it failed to load
_origin: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)


@dataclass(frozen=True)
class MethodInfo:
    """What ``peftkit.methods()`` tells about one method.

    Attributes:
        name: The method's name, as passed to ``peftkit.wrap``.
        plugin: The plugin (entry-point name) that registers it.
        distribution: The installed distribution that provides the plugin.
        version: That distribution's version.
        doc: The first line of the method's docstring.
        cls: The Method subclass.
    """

    name: str
    plugin: str
    distribution: str
    version: str
    doc: str
    cls: type[Method[Any]]


def _is_builtin(ep: metadata.EntryPoint) -> bool:
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.name.lower().replace("_", "-") == BUILTIN_DISTRIBUTION


def load_plugins() -> None:
    """Import and register every plugin of the ``peftkit`` entry-point group (once).

    A plugin that fails to import is reported in a warning with its name and skipped, so one broken
    plugin does not break the others; :func:`failed_plugins` lists them.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    allowed_env = os.environ.get("PEFTKIT_LOAD_PLUGINS")
    allowed = None if allowed_env is None else {s.strip() for s in allowed_env.split(",") if s.strip()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and not _is_builtin(ep) and ep.name not in allowed:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = getattr(ep, "dist", None)
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except (Exception, SystemExit) as exc:  # a broken plugin must not break the others (nor exit)
            _fail(ep.name, f"failed to load ({ep.value}): {type(exc).__name__}: {exc}")
            continue
        _origin[ep.name] = (dist.name, dist.version) if dist is not None else (ep.name, "unknown")
        unknown = [impl.function.__name__ for name, caller in pm.hook.__dict__.items()
                   if not name.startswith("_") and not caller.has_spec()
                   for impl in caller.get_hookimpls() if impl.plugin_name == ep.name and not impl.optionalhook]
        if unknown:  # a typo in a hook's name: the plugin could never work; say so, every time it would load
            pm.unregister(name=ep.name)
            _fail(ep.name, f"implements {', '.join(unknown)}, which is not a peftkit hook (peftkit.hookspecs has "
                           f"{', '.join(_HOOKS)}); check the function's name")


_HOOKS = sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "peftkit_spec"))


def _fail(plugin: str, why: str) -> None:
    """Record a broken plugin (reported once, with its name; the others go on working)."""
    _failed[plugin] = why
    warnings.warn(f"peftkit plugin {plugin!r} was skipped: {why}", RuntimeWarning, stacklevel=3)


def failed_plugins() -> dict[str, str]:
    """Entry-point names of plugins that failed to load, with the reason."""
    load_plugins()
    return dict(_failed)


@dataclass(frozen=True)
class Registration:
    """One class registered through a ``register_*`` hook, with where it came from."""

    cls: type[Any]
    plugin: str
    distribution: str
    version: str


# hook -> (the registered plugins when collected, what they registered): hooks are called again
# only when a plugin is registered or unregistered, not on every lookup
_collected: dict[str, tuple[tuple[tuple[str, object], ...], dict[str, Registration]]] = {}


def _registered() -> tuple[tuple[str, object], ...]:
    """The plugins that count now, as (name, plugin object) pairs (the objects, so that a plugin
    registered again under an old name is not mistaken for the old one)."""
    return tuple(sorted(((n, p) for n, p in pm.list_name_plugin() if n is not None and n not in _failed),
                        key=lambda pair: pair[0]))


def collect(hook: str, base: type[T], kind: str) -> dict[str, Registration]:
    """Call every plugin's ``hook`` (``register_methods``, ``register_formats``) through the plugin
    manager, one plugin at a time, and gather what each registers: name -> :class:`Registration`.

    A plugin whose hook raises is reported and skipped (what it registered is dropped); the others
    keep working.

    Args:
        hook: The hook's name.
        base: The class each registered class must subclass.
        kind: What is registered, for messages (``"method"``).

    Raises:
        PluginError: two plugins register the same name, or a plugin registers something that is
            not a ``base`` subclass or has no ``name``.
    """
    load_plugins()
    cached = _collected.get(hook)
    if cached is not None and cached[0] == _registered():
        return dict(cached[1])
    found: dict[str, Registration] = {}
    for impl in getattr(pm.hook, hook).get_hookimpls():
        plugin = impl.plugin_name
        if plugin in _failed:
            continue
        dist, version = _origin.get(plugin, (plugin, getattr(impl.plugin, "__version__", "unknown")))
        before = dict(found)
        register = _registrar(found, base, kind, Registration(type(None), plugin, dist, version))
        others = [p for p in pm.get_plugins() if p is not impl.plugin]
        try:  # through the manager, so a plugin may accept fewer arguments than the spec has
            pm.subset_hook_caller(hook, remove_plugins=others)(register=register)
        except PluginError:
            raise  # a clash or an invalid registration: the plugins' configuration is wrong
        except (Exception, SystemExit) as exc:  # the plugin's own bug: drop what it registered, keep the rest
            found.clear()
            found.update(before)
            _fail(plugin, f"its {hook} hook raised {type(exc).__name__}: {exc}")
    found = dict(sorted(found.items()))
    _collected[hook] = (_registered(), found)
    return dict(found)


def _registrar(found: dict[str, Registration], base: type, kind: str, origin: Registration) -> Callable[[type], None]:
    """The ``register`` callback handed to one plugin's hook."""

    def register(cls: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"plugin {origin.plugin!r} registered {cls!r}, which is not a peftkit.{base.__name__} "
                              "subclass; register(...) takes the class itself")
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {origin.plugin!r} registered {cls.__name__} without a `name`")
        other = found.get(name)
        if other is not None and other.cls is not cls:
            raise PluginError(
                f"two plugins register the {kind} {name!r}: {other.plugin!r} ({other.distribution}) and "
                f"{origin.plugin!r} ({origin.distribution}). Uninstall one, or restrict plugins with PEFTKIT_LOAD_PLUGINS.")
        found[name] = Registration(cls, origin.plugin, origin.distribution, origin.version)

    return register


def method_infos() -> dict[str, MethodInfo]:
    """Collect every registered method by calling each plugin's ``register_methods`` hook.

    Raises:
        PluginError: two plugins register a method of the same name, or a plugin registers
            something that is not a ``peftkit.Method`` subclass.
    """
    found = collect("register_methods", Method, "method")
    for r in found.values():
        why = retired_hooks(r.cls) if r.plugin not in _failed else None
        if why is not None:  # written for the first protocol: it could only half work
            _fail(r.plugin, why)
    infos = {}
    for name, r in found.items():
        if r.plugin in _failed:
            continue
        doc = (r.cls.__doc__ or "").strip().splitlines()
        infos[name] = MethodInfo(name, r.plugin, r.distribution, r.version, doc[0] if doc else "", r.cls)
    return infos


def get_method(name: str) -> MethodInfo:
    """The registered method called ``name``.

    Raises:
        UnknownMethodError: no loaded plugin provides it; the message lists those that exist.
    """
    infos = method_infos()
    if name in infos:
        return infos[name]
    msg = f"unknown method {name!r}; available: {', '.join(infos) or '(none)'}."
    if not infos:
        msg += " No plugin is registered: is peftkit installed (`pip install -e .`)?"
    if _failed:
        msg += f" Plugins that failed to load: {', '.join(sorted(_failed))}."
    raise UnknownMethodError(msg)
