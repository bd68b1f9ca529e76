"""Exceptions raised by peftkit.

Every error is a :class:`PeftkitError` (itself a :class:`ValueError`), so callers can catch one
type. Messages say what was wrong, what was expected and how to fix it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AdapterFileError",
    "BackboneMismatchError",
    "ConfigError",
    "DivergenceWarning",
    "MergeError",
    "PeftkitError",
    "PluginError",
    "QuantizationWarning",
    "TargetError",
    "UnknownAdapterError",
    "UnknownMethodError",
    "shown",
]


class PeftkitError(ValueError):
    """Base class of every peftkit error."""


class UnknownMethodError(PeftkitError):
    """No installed plugin provides the requested method."""


class UnknownAdapterError(PeftkitError):
    """An adapter name that the AdaptedModel does not hold (or already holds, when adding)."""


class TargetError(PeftkitError):
    """A target selection that matches nothing, or a module the method cannot adapt."""


class ConfigError(PeftkitError):
    """A method option with a bad name, type or value."""


class AdapterFileError(PeftkitError):
    """An adapter file that is unreadable, corrupt, or inconsistent with its own metadata."""


class BackboneMismatchError(PeftkitError):
    """An adapter file made for another backbone (architecture, shapes, dtypes or weights)."""


class PluginError(PeftkitError):
    """A plugin that fails to load, registers something invalid, or clashes with another."""


class MergeError(PeftkitError):
    """A merge that cannot be done exactly or would corrupt the base weights."""


class DivergenceWarning(UserWarning):
    """Training that has left the range it comes back from (e.g. DANN's features growing without
    bound while they fool the discriminator). Escalate it to stop such a run at once:
    ``warnings.simplefilter("error", peftkit.errors.DivergenceWarning)``."""


class QuantizationWarning(UserWarning):
    """An adapter loaded onto a backbone quantized otherwise than the one it was trained on (e.g. a
    QLoRA adapter onto the float model: allowed, the usual way to ship one; outputs differ from
    training's by the quantization error)."""


def shown(value: Any, limit: int = 80) -> str:
    """A value from a file, safe to print: quoted, control characters escaped, cut to ``limit``."""
    text = repr(value) if isinstance(value, str) else repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "…" + text[-1]
