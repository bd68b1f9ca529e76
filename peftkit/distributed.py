"""Data-parallel training of adapted models: DistributedDataParallel, FSDP2, and what I/O needs.

DDP needs nothing from peftkit: ``DistributedDataParallel(peftkit.wrap(...))`` all-reduces only
the trainable (adapter) gradients, because the frozen backbone never gets any. FSDP2 needs one
call, :func:`shard`: peftkit's adapters live beside the backbone (in ``peft_adapters``), not inside
the blocks they adapt, so a plain per-block ``fully_shard`` would leave them in the root group,
gathered for the whole forward and reduced in one late collective. :func:`shard` puts each
adapter into the FSDP2 group of the block that runs it.

:func:`peftkit.save` and :func:`peftkit.load` understand both: under FSDP2 every rank calls
``save``, full adapter tensors are gathered and rank 0 alone writes (the same bytes a
single-process run writes); :meth:`AdaptedModel.hotswap` on a sharded model gives every rank its
shard of the file's tensors. The Fisher information of FISH is summed over ranks, so every rank
selects the same mask.

Example (launch with ``torchrun --nproc_per_node 2 train.py``)::

    dist.init_process_group("gloo")            # "nccl" on GPUs; nothing else changes
    m = peftkit.wrap(model, "lora", r=8)
    peftkit.distributed.shard(m)                # or DistributedDataParallel(m)
    ...train...
    peftkit.save(m, "task.safetensors")         # every rank calls it; rank 0 writes
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .attach import acting_host
from .errors import ConfigError, MergeError, PluginError
from .model import AdaptedModel
from .quantized import quantization_of
from .sharding import (
    all_reduce_sum,
    assign,
    full_tensor,
    initialized,
    is_dtensor,
    is_sharded,
    original_class,
    rank,
    unwrap_parallel,
    world_size,
)
from .targets import Selection, find_blocks, is_under, select_modules

__all__ = [
    "all_reduce_sum", "assign", "full_tensor", "is_dtensor", "is_sharded", "original_class", "rank", "shard",
    "unwrap_parallel", "world_size",
]


_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def _called_blocks(base: nn.Module, paths: list[str]) -> list[str]:
    """``paths`` with every ModuleList/ModuleDict replaced by its items: a container is never called
    itself, so FSDP2's hooks on it would never gather its parameters."""
    out: list[str] = []
    for p in paths:
        module = base.get_submodule(p)
        if isinstance(module, _CONTAINERS):
            out += _called_blocks(base, [f"{p}.{n}" if p else n for n in module._modules])
        else:
            out.append(p)
    return out


class _GroupMember(nn.Module):
    """The adapter modules that act inside one block, grouped with it for FSDP2.

    Adapters are applied by hooks inside the block's forward, never called themselves; FSDP2
    finishes a group (reshards it, registers its backward hooks) once every module of the group
    has run, so the block calls this member once per forward (a no-op) to mark it as run.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(modules)

    def forward(self) -> None:
        return None


def shard(model: nn.Module, blocks: Selection = None, *, mesh: Any = None, reshard_after_forward: bool = True,
          **fsdp_options: Any) -> nn.Module:
    """Shard an adapted model with FSDP2 (``torch.distributed.fsdp.fully_shard``), block by block.

    Each block becomes one FSDP2 group together with the adapters (and ``train`` copies) acting
    inside it, so an adapter is gathered with its block, and its gradients are reduce-scattered
    with its block's. Frozen backbone parameters get no gradients, so only adapter gradients are
    communicated in the backward pass. Everything else (embeddings, heads, adapters outside any
    block) forms the root group. The model is sharded in place, like ``fully_shard`` does.

    Call it after adding (or loading) every adapter and choosing the active ones, and build the
    optimizer afterwards, from ``model.parameters()`` (they are DTensors now). Folded-weight caching
    for inference is turned off (it would hold whole unsharded weights).

    Args:
        model: An :class:`~peftkit.AdaptedModel`, on the device the mesh uses.
        blocks: The modules of the backbone to shard one by one (names, suffixes, a regex, types or a
            callable, as for ``targets``; of nested matches the outermost count); default: the blocks of its main stage (BERT's
            ``encoder.layer.*``, ViT's ``encoder.layers.*``, ResNet's stages).
        mesh: The device mesh (default: every rank of the default process group).
        reshard_after_forward: Free gathered block parameters after the forward (less memory, one
            more all-gather in the backward).
        **fsdp_options: Passed to ``fully_shard`` (``mp_policy``, ``offload_policy``, ...).

    Returns:
        ``model``, now sharded.

    Raises:
        ConfigError: not an AdaptedModel, already sharded, no process group, or bad ``blocks``.
        PluginError: an adapter holds a 0-dim parameter, which FSDP2 cannot shard.
        MergeError: an adapter is merged (the backbone should be sharded unmodified).
    """
    from torch.distributed.fsdp import fully_shard

    if not isinstance(model, AdaptedModel):
        raise ConfigError(f"shard() takes an AdaptedModel (from peftkit.wrap or peftkit.load), got {type(model).__name__}")
    if model.sharded:
        raise ConfigError("this model is already sharded")
    scalars = [n for n, p in model.peft_adapters.named_parameters() if p.dim() == 0]
    if scalars:
        raise PluginError(f"FSDP2 cannot shard 0-dim parameters, and these adapter parameters are scalars: "
                          f"{', '.join(scalars[:3])}. The method's plugin should hold them with shape (1,).")
    if model.merged:
        raise MergeError("unmerge() before sharding: the backbone is sharded as it was given to wrap()")
    base = model.base_model
    # FSDP2 shards a tensor subclass only through its fsdp_pre_all_gather extension (torchao's NF4 has one)
    unshardable = [(n, q) for n, p in base.named_parameters() if (q := quantization_of(p)) is not None
                   and not hasattr(type(p), "fsdp_pre_all_gather")]
    if unshardable:
        name, kind = unshardable[0]
        raise ConfigError(f"FSDP2 cannot shard {name} ({kind}): its quantized storage has no FSDP2 all-gather (and "
                          f"{len(unshardable)} such tensors). Quantize with torchao's NF4 (peftkit.quantize(model, 'nf4',"
                          " backend='torchao')), which FSDP2 shards, or train with DDP, which works with any quantization.")
    paths = select_modules(base, blocks, what="blocks") if blocks is not None else find_blocks(base)
    paths = _called_blocks(base, paths)
    # a pattern such as "encoder.layer.*" also matches everything inside each block: keep the blocks
    paths = [p for p in paths if p and not is_under(p, [q for q in paths if q != p])
             and any(True for _ in base.get_submodule(p).parameters())]
    if not paths:
        raise ConfigError(f"no block with parameters to shard in {type(base).__name__}; pass blocks=[...]")
    if mesh is None and not initialized():
        raise ConfigError("shard() needs torch.distributed initialised: run under torchrun and call "
                          "torch.distributed.init_process_group() first (or pass mesh=)")
    # an adapter belongs to the block around the module whose forward applies it (its host)
    owned: dict[str, list[nn.Module]] = {p: [] for p in paths}
    for name in model.adapter_names:
        mods = model.get_adapter(name).modules
        acting: list[tuple[str, nn.Module]] = [(acting_host(base, p, a)[0], a) for p, a in mods.items()]
        acting += mods.train_items()
        if mods.heads is not None and mods.heads_path is not None:
            acting.append((mods.heads_path, mods.heads))
        for where, module in acting:
            block = next((b for b in paths if is_under(where, [b])), None)
            if block is not None:
                owned[block].append(module)
    grouped: set[nn.Parameter] = set()
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, **fsdp_options}
    for p in paths:
        block_module = base.get_submodule(p)
        if not owned[p]:
            fully_shard(block_module, **options)
            continue
        member = _GroupMember(owned[p])
        fully_shard([block_module, member], **options)
        block_module.register_forward_pre_hook(lambda _m, _a, member=member: member())
        grouped.update(member.parameters())
    # the root's parameters are needed again as soon as the backward starts: keep them gathered
    fully_shard(model, ignored_params=grouped, **{**options, "reshard_after_forward": False})
    model.cache_weights = False
    return model
