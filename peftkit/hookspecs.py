"""Pluggy hook specifications: the extension points a peftkit plugin can implement.

A plugin is any module or object with functions marked ``@peftkit.hookimpl``; it is found through
the ``peftkit`` entry-point group (see ``docs/plugins.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("peftkit")
hookimpl = pluggy.HookimplMarker("peftkit")

__all__ = ["hookimpl", "hookspec", "register_formats", "register_methods"]


@hookspec
def register_methods(register: Callable[[type[Any]], None]) -> None:
    """Register PEFT methods: call ``register(MethodSubclass)`` once for each method provided."""


@hookspec
def register_formats(register: Callable[[type[Any]], None]) -> None:
    """Register adapter file formats: call ``register(FormatSubclass)`` once for each format provided."""
