"""Tensors that may live on several processes: ranks, DTensors (FSDP2 shards), parallel wrappers.

The low-level helpers the core needs for I/O on distributed models; :mod:`peftkit.distributed`
builds the user-facing ``shard()`` on them and re-exports the public ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "all_reduce_sum", "assign", "full_tensor", "initialized", "is_dtensor", "is_sharded", "original_class", "rank",
    "unwrap_parallel", "world_size",
]


def initialized() -> bool:
    """Whether a default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    """Processes in the default process group (1 when not distributed)."""
    return torch.distributed.get_world_size() if initialized() else 1


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor (e.g. an FSDP2-sharded parameter)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective call), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def assign(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor ``full`` into ``dst`` in place: for a DTensor (a sharded parameter), only
    this rank's part, sliced locally (every rank holds ``full``, so nothing is communicated)."""
    if not is_dtensor(dst):
        dst.copy_(full)
        return
    from torch.distributed.tensor import distribute_tensor

    placed = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.to_local().copy_(placed.to_local())


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (sharded with FSDP2 or tensor parallelism)."""
    return any(is_dtensor(p) for p in model.parameters())


def unwrap_parallel(model: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` (or DataParallel) wrapper; else ``model``."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, parallel) else model


def original_class(module: nn.Module) -> type:
    """A module's own class, not the subclass ``fully_shard`` swaps in (``FSDPLinear`` -> ``Linear``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor in place over the default process group (no-op when not distributed). Every
    rank must call it with the same tensors, in the same order."""
    if world_size() == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t)
