"""Lightning checkpoints that hold the adapters, not the frozen backbone (``pip install peftkit[lightning]``).

A LightningModule that holds a wrapped model trains as it is, but each checkpoint holds the whole
backbone. Mix :class:`AdapterCheckpoints` in first, and checkpoints hold everything else (the
adapters, the modules trained whole, the module's own layers, optimizer and loop states) while the
backbone's tensors are left out; resuming (``trainer.fit(ckpt_path=...)``) and
``load_from_checkpoint`` take them from the module being restored, after checking that its backbone
has the same tensor names, shapes and values (a sum and a sum of squares per tensor, recorded when
the checkpoint was written)::

    class Classifier(peftkit.lightning.AdapterCheckpoints, lightning.LightningModule):
        def __init__(self, backbone):
            super().__init__()
            self.model = peftkit.wrap(backbone, "lora", r=8)
        ...

    trainer = lightning.Trainer(max_epochs=3)
    trainer.fit(Classifier(resnet18()), loader)            # checkpoints: adapters only
    trainer.fit(Classifier(resnet18()), loader, ckpt_path="last.ckpt")
    module = Classifier.load_from_checkpoint(path, backbone=resnet18())
    peftkit.save(module.model, "task.safetensors")         # the adapter file that ships

A module that already overrides ``on_save_checkpoint``/``on_load_checkpoint`` calls
:func:`strip_backbone` and :func:`restore_backbone` from them instead. Nothing here imports
``lightning``, so it works with ``pytorch_lightning`` too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .model import AdaptedModel

__all__ = ["CHECKPOINT_KEY", "AdapterCheckpoints", "backbone_keys", "restore_backbone", "strip_backbone"]

CHECKPOINT_KEY = "peftkit_backbone"  # the left-out keys and their shapes, in the checkpoint


def backbone_keys(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` entries that are tensors of a wrapped model's frozen backbone, under
    any name (the wrapped model's ``base_model.*``, and a backbone the module also holds itself).

    Raises:
        ConfigError: the module holds no AdaptedModel.
    """
    frozen: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, AdaptedModel):
            if sub.merged_adapters:
                raise ConfigError(f"adapters {', '.join(sub.merged_adapters)} are merged into the backbone, which a "
                                  "checkpoint leaves out; unmerge() before checkpointing")
            base = sub.base_model
            frozen.update(id(t) for t in (*base.parameters(), *base.buffers()))
    if not frozen:
        raise ConfigError(f"{type(module).__name__} holds no model wrapped by peftkit (an AdaptedModel from "
                          "peftkit.wrap or peftkit.load), so there is no backbone to leave out of its checkpoints")
    return {k: t for k, t in module.state_dict(keep_vars=True).items() if id(t) in frozen}


def strip_backbone(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Leave the frozen backbone's tensors out of a Lightning ``checkpoint`` (in place), recording
    their names, shapes and a signature of their values so that :func:`restore_backbone` can check
    the module it restores into."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ConfigError("the checkpoint holds no 'state_dict'; strip_backbone is called from on_save_checkpoint")
    left_out = {k: {"shape": list(t.shape), "sums": _sums(t)} for k, t in backbone_keys(module).items() if k in state}
    for k in left_out:
        del state[k]
    checkpoint[CHECKPOINT_KEY] = left_out


def _sums(t: torch.Tensor) -> list[float]:
    """A cheap signature of a tensor's values: its sum and sum of squares (float64)."""
    with torch.no_grad():
        d = t.detach().double()
        return [float(d.sum()), float(d.square().sum())]


def _same_values(a: list[float], b: list[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def restore_backbone(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Put the module's own backbone tensors back into a ``checkpoint`` written with
    :func:`strip_backbone` (in place), so that Lightning's strict loading finds every key and loads
    the backbone onto itself unchanged. A checkpoint written without it is left as it is.

    Raises:
        ConfigError: the module's backbone lacks tensors the checkpoint left out, or has them in
            other shapes or with other values (the checkpoint was written for another backbone); the
            checkpoint and the module are unchanged.
    """
    left_out = checkpoint.get(CHECKPOINT_KEY)
    if left_out is None:
        return
    state = checkpoint.get("state_dict")
    if not isinstance(left_out, dict) or not isinstance(state, dict):
        raise ConfigError(f"the checkpoint's {CHECKPOINT_KEY!r} or 'state_dict' entry is malformed")
    if not all(isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("sums"), list)
               and len(v["sums"]) == 2 for v in left_out.values()):
        raise ConfigError(f"the checkpoint's {CHECKPOINT_KEY!r} entry is malformed")
    own = backbone_keys(module)
    missing = [k for k in left_out if k not in own]
    shapes = [k for k in left_out if k in own and list(own[k].shape) != list(left_out[k]["shape"])]
    extra = [k for k in own if k not in left_out and k not in state]
    values = [k for k in left_out if k in own and k not in shapes and not _same_values(_sums(own[k]), left_out[k]["sums"])]
    if missing or shapes or extra or values:
        parts = [f"{what} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}" for what, keys in
                 (("lacks", missing), ("has other shapes for", shapes), ("has tensors it did not record:", extra),
                  ("has other values in", values)) if keys]
        raise ConfigError(f"this checkpoint was written for another backbone: the module's backbone "
                          f"{'; '.join(parts)}. Build the module on the backbone (the weights too) it was trained with.")
    for k in left_out:
        state[k] = own[k].detach()


class AdapterCheckpoints:
    """Mixin for a ``LightningModule`` holding a wrapped model: its checkpoints leave the frozen
    backbone out (see the module docstring). List it before ``LightningModule``."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning hook: drop the backbone's tensors from the checkpoint."""
        assert isinstance(self, nn.Module), "AdapterCheckpoints is mixed into a LightningModule"
        super_hook = getattr(super(), "on_save_checkpoint", None)
        if super_hook is not None:
            super_hook(checkpoint)
        strip_backbone(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Lightning hook: take the backbone's tensors from this module before the checkpoint loads."""
        assert isinstance(self, nn.Module), "AdapterCheckpoints is mixed into a LightningModule"
        super_hook = getattr(super(), "on_load_checkpoint", None)
        if super_hook is not None:
            super_hook(checkpoint)
        restore_backbone(self, checkpoint)
