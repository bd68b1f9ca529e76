"""Other adapter file formats, through the ``register_formats`` hook (e.g. Hugging Face PEFT
directories): import onto a backbone, export from an AdaptedModel. peftkit's own format is
:mod:`peftkit.io`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from torch import nn

from .build import Prepared
from .errors import AdapterFileError, ConfigError, UnknownMethodError
from .model import AdaptedModel, attach, check_name, ensure_unwrapped
from .plugins import collect
from .sharding import unwrap_parallel

__all__ = ["Format", "export", "find_format", "format_classes", "import_adapter"]


class Format:
    """Base class of a file format plugin.

    Class attributes:
        name: The format's name, e.g. ``"peft"``.
    """

    name: ClassVar[str] = ""

    def detect(self, path: Path) -> bool:
        """Whether ``path`` (a file or a directory) is in this format."""
        raise NotImplementedError

    def read(self, model: nn.Module, path: Path) -> Prepared:
        """Validate ``path`` against ``model`` and build the adapter, without touching ``model``:
        make a :class:`~peftkit.plan.AdapterPlan` from the file and build it with
        :func:`peftkit.build.build` (a dry run with ``on_meta=True`` first checks sizes for free)."""
        raise NotImplementedError

    def write(self, model: AdaptedModel, adapter: str, path: Path) -> Path:
        """Write adapter ``adapter`` of ``model`` to ``path``; returns what was written."""
        raise NotImplementedError


def format_classes() -> dict[str, type[Format]]:
    """Every registered adapter file format class, by name (``register_formats`` hook)."""
    return {name: r.cls for name, r in collect("register_formats", Format, "format").items()}


def _format(name: str) -> Format:
    formats = format_classes()
    if name not in formats:
        raise UnknownMethodError(f"unknown adapter format {name!r}; available: {', '.join(formats) or '(none)'}")
    return formats[name]()


def find_format(path: str | os.PathLike[str]) -> Format | None:
    """The registered format that recognises ``path``, if any."""
    for cls in format_classes().values():
        fmt = cls()
        if fmt.detect(Path(path)):
            return fmt
    return None


def import_adapter(model: nn.Module, path: str | os.PathLike[str], format: str | None = None,
                   name: str = "default") -> AdaptedModel:
    """Load an adapter saved in another format onto ``model`` (a backbone or an AdaptedModel)."""
    fmt = _format(format) if format else find_format(path)
    if fmt is None:
        raise AdapterFileError(f"{str(path)!r} is in no format peftkit knows (see peftkit.formats)")
    check_name(name)
    if not isinstance(model, AdaptedModel):
        ensure_unwrapped(model)
    prepared = fmt.read(model.base_model if isinstance(model, AdaptedModel) else model, Path(path))
    if not isinstance(model, AdaptedModel):
        return attach(model, name, prepared)
    model.install(name, prepared)
    model.set_adapter(name)
    return model


def export(model: AdaptedModel, path: str | os.PathLike[str], format: str, adapter: str | None = None) -> Path:
    """Write one adapter of ``model`` to ``path`` in another format (e.g. ``format="peft"``).

    Args:
        model: The adapted model (a DistributedDataParallel wrapper around one is fine).
        path: Where to write.
        format: The format's name.
        adapter: Which adapter; default: the only adapter, or the only active one.
    """
    model = unwrap_parallel(model)
    if not isinstance(model, AdaptedModel):
        raise ConfigError(f"expected an AdaptedModel (from peftkit.wrap), got {type(model).__name__}")
    return _format(format).write(model, model.get_adapter(adapter).name, Path(path))
