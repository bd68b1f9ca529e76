"""Saving and loading adapters: ``save``, ``load`` and ``hotswap``, for plain and distributed models.

The file format and its checks are in :mod:`peftkit.files`; other formats (Hugging Face PEFT) in
:mod:`peftkit.formats`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import container, sharding
from .errors import ConfigError, shown
from .files import RESERVED_PREFIX, AdapterHeader, file_metadata, is_safetensors, read_adapter, read_header
from .formats import find_format, import_adapter
from .model import AdaptedModel, attach, check_name, ensure_unwrapped

__all__ = ["AdapterHeader", "hotswap", "load", "read_header", "save"]


def _adapted(model: object) -> AdaptedModel:
    """The AdaptedModel inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    model = sharding.unwrap_parallel(model)
    if not isinstance(model, AdaptedModel):
        raise ConfigError(f"expected an AdaptedModel (from peftkit.wrap), got {type(model).__name__}")
    return model


def save(model: AdaptedModel, path: str | os.PathLike[str], adapter: str | None = None, *,
         writer: int | None = 0, metadata: Mapping[str, str] | None = None) -> Path:
    """Write one adapter's tensors and metadata to ``path`` (atomically: temp file + rename).

    Under ``torch.distributed`` only rank ``writer`` writes. On a model sharded with FSDP2 every rank
    must call ``save``: the full adapter tensors are gathered (a collective), rank ``writer``
    writes the same bytes a single process would, and all ranks wait for the file before
    returning. Unsharded models (DDP) need no collective, so calling it on rank 0 alone is fine.

    Args:
        model: The adapted model (a DistributedDataParallel wrapper around one is fine).
        path: Destination ``.safetensors`` file.
        adapter: Which adapter; default: the only adapter, or the only active one.
        writer: The rank that writes when distributed; None: every rank that calls it writes.
        metadata: Extra string entries for the file's header (what the application needs to use
            the adapter, e.g. class names); read back as :attr:`AdapterHeader.user_metadata`. Keys
            starting with ``peftkit.`` are reserved.

    Returns:
        The path written (or that rank ``writer`` wrote).
    """
    model = _adapted(model)
    extra = _user_metadata(metadata)
    entry = model.get_adapter(adapter)
    adapter = entry.name
    if adapter in model.merged_adapters:
        raise ConfigError(f"adapter {adapter!r} is merged; unmerge() before saving so the file holds its own tensors")
    base = model.base_model
    held = entry.modules.file_tensors()
    sharded = any(sharding.is_dtensor(t) for t in held.values()) or sharding.is_sharded(base)
    tensors = {k: sharding.full_tensor(t.detach()).contiguous().cpu() for k, t in held.items()}
    for k, t in tensors.items():  # checked on every rank, before any writes: nothing half-done, no rank left waiting
        container.dtype_name(t.dtype, f"adapter tensor {k!r}")
    bad = [k for k, t in tensors.items() if not container.finite(t)]
    if bad:
        raise ConfigError(f"adapter {adapter!r} holds NaN or infinite values in {', '.join(bad[:3])}; nothing was "
                          "written (a file with them would be refused when loaded). Lower the learning rate, or "
                          "load an earlier checkpoint.")
    meta = {**extra, **file_metadata(base, adapter, entry.method.file_method(), entry.info, entry.modules)}
    dest = Path(path)
    if writer is None or sharding.rank() == writer:
        container.write_atomic(dest, tensors, meta)
    if sharded and sharding.world_size() > 1:
        torch.distributed.barrier()  # the file exists on every rank's return
    return dest


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ConfigError(f"metadata must be a mapping of strings to strings, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise ConfigError(f"metadata keys must be strings; got the {type(key).__name__} {key!r}")
        if not isinstance(value, str):
            raise ConfigError(f"metadata values must be strings (JSON-encode other values); {key!r} maps to "
                              f"{type(value).__name__} {shown(value, 40)}")
        if key.startswith(RESERVED_PREFIX) or not key:
            raise ConfigError(f"metadata key {key!r} is reserved or empty; keys starting with {RESERVED_PREFIX!r} "
                              "belong to peftkit's own header")
    if sum(len(k) + len(v) for k, v in metadata.items()) > container.MAX_HEADER // 4:
        raise ConfigError(f"metadata is over {container.MAX_HEADER // 4} characters; adapter headers are bounded "
                          f"({container.MAX_HEADER} bytes) so that readers can refuse hostile files. Store large data "
                          "next to the adapter file instead.")
    return dict(metadata)


def hotswap(model: AdaptedModel, path: str | os.PathLike[str], adapter: str | None = None) -> str:
    """Replace an existing adapter's tensors by a compatible file's, in place: see
    :meth:`AdaptedModel.hotswap` (a DistributedDataParallel wrapper around the model is fine).

    Returns:
        The name of the adapter swapped.
    """
    return _adapted(model).hotswap(path, adapter)


def load(model: nn.Module, path: str | os.PathLike[str], name: str | None = None) -> AdaptedModel:
    """Load an adapter file onto ``model``: a plain backbone (wrapped anew) or an AdaptedModel.

    Everything is checked first (format, method and plugin, targets, shapes, dtypes, fingerprint);
    a refused load leaves ``model`` exactly as it was.

    On a model sharded with :func:`peftkit.distributed.shard` that already holds an adapter of
    that name, the file's tensors go into it (see :func:`hotswap`): every rank keeps its shard.

    Args:
        model: The backbone the adapter was trained on (freshly built is fine), or an AdaptedModel.
        path: The ``.safetensors`` adapter file.
        name: The adapter's name; default: the name stored in the file.

    Returns:
        The AdaptedModel with the loaded adapter active.

    Raises:
        AdapterFileError, BackboneMismatchError, UnknownMethodError: the file cannot be used here.
    """
    other_format = Path(path).is_dir() or (Path(path).is_file() and not is_safetensors(Path(path)))
    if other_format and find_format(path) is not None:  # another format (e.g. a PEFT directory)
        return import_adapter(model, path, name=name or "default")
    model = sharding.unwrap_parallel(model)
    if isinstance(model, AdaptedModel):
        target = (name or read_header(path).adapter) if model.sharded else None
        if target in model.adapter_names:
            hotswap(model, path, target)  # FSDP2: the adapter exists; each rank takes its shard
        else:
            model.load_adapter(path, name=name)
        return model
    ensure_unwrapped(model)
    if name is not None:
        check_name(name)
    header, prepared = read_adapter(model, path)
    return attach(model, name or check_name(header.adapter, header.path), prepared)
