"""Transfer-learning recipes that work with every method: layer-wise learning rates and the KL
"anchoring" regulariser."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .method import Adapter
from .model import AdaptedModel
from .targets import find_blocks, find_output_layer, is_under

__all__ = ["anchored_loss", "param_groups"]


def _depths(base: nn.Module) -> tuple[str | None, list[str], list[str]]:
    output = find_output_layer(base)
    blocks = [b for b in find_blocks(base) if not (output and (is_under(output, [b]) or is_under(b, [output])))]
    return output, blocks, [p for p, _ in base.named_modules()]


def param_groups(model: AdaptedModel, lr: float = 1e-3, decay: float = 0.8, *, lora_plus_ratio: float | None = None,
                 **group_options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups with learning rates that diminish towards the input.

    Depth is counted in blocks of the backbone's main stage (:func:`peftkit.targets.find_blocks`)
    from the output: the output layer and what comes after the last block get depth 0 and ``lr``,
    the last block depth 1 and ``lr * decay``, ..., modules before the first block the largest
    depth. Every trainable parameter of the active adapters lands in exactly one group.

    Args:
        model: An AdaptedModel (any method).
        lr: Learning rate at the output.
        decay: Factor per block towards the input, in (0, 1].
        lora_plus_ratio: LoRA+ (Hayou et al. 2024): the adapters' output-side parameters (LoRA's
            ``B``, :meth:`~peftkit.Adapter.output_side_parameters`) train at this many times their
            depth's learning rate, in groups of their own (``"lora_plus": True``); the paper
            recommends 16. None: no such groups.
        **group_options: Extra keys for every group (e.g. ``weight_decay=0.01``).

    Returns:
        Groups sorted by depth: ``{"params", "lr", "depth", "modules", "lora_plus"}`` plus ``group_options``.
    """
    if not isinstance(model, AdaptedModel):
        raise ConfigError(f"param_groups takes an AdaptedModel (from peftkit.wrap), got {type(model).__name__}")
    if not 0 < decay <= 1:
        raise ConfigError(f"decay={decay!r} is invalid; expected a factor in (0, 1], e.g. 0.8")
    if lora_plus_ratio is not None and (isinstance(lora_plus_ratio, bool) or not isinstance(lora_plus_ratio, (int, float))
                                        or not 0 < lora_plus_ratio < float("inf")):
        raise ConfigError(f"lora_plus_ratio={lora_plus_ratio!r} is invalid; expected a positive factor, e.g. 16 "
                          "(or None for no LoRA+ groups)")
    base = model.base_model
    output, blocks, order = _depths(base)
    last_block_end = max((i for i, p in enumerate(order) if blocks and is_under(p, [blocks[-1]])), default=-1)

    def depth(path: str) -> int:
        if output is not None and is_under(path, [output]):
            return 0
        for i, b in enumerate(blocks):
            if is_under(path, [b]):
                return len(blocks) - i
        return 0 if order.index(path) > last_block_end else len(blocks) + 1

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name in model.active_adapters:
        mods = model.get_adapter(name).modules  # the AdapterSet in model.peft_adapters[name]
        owned: list[tuple[str, nn.Module]] = [*mods.items(), *mods.train_items()]
        if mods.heads is not None and mods.heads_path is not None:
            owned.append((mods.heads_path, mods.heads))
        for path, module in owned:
            fast = ({id(p) for p in module.output_side_parameters()}
                    if lora_plus_ratio is not None and isinstance(module, Adapter) else set())
            d = depth(path)
            for plus in (False, True):
                params = [p for p in module.parameters() if p.requires_grad and (id(p) in fast) == plus]
                if not params:
                    continue
                rate = lr * decay**d * (lora_plus_ratio if plus and lora_plus_ratio is not None else 1.0)
                g = groups.setdefault((d, plus), {"params": [], "lr": rate, "depth": d, "modules": [],
                                                  "lora_plus": plus, **group_options})
                g["params"].extend(params)
                g["modules"].append(path)
    seen = [id(p) for g in groups.values() for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter landed in two groups"
    return [groups[k] for k in sorted(groups)]


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _logits(out: Any, head: str | None) -> torch.Tensor:
    if isinstance(out, Mapping) and head is not None:
        out = out[head]
    elif isinstance(out, Mapping) and "logits" not in out:
        raise ConfigError(f"the model returns several outputs {list(out)}; say which is anchored with head=NAME")
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    result = logits if logits is not None else out
    if not isinstance(result, torch.Tensor):
        raise ConfigError(f"anchored_loss needs logits; the model returned {type(out).__name__}")
    return result


def anchored_loss(model: AdaptedModel, inputs: Any, task_loss: torch.Tensor, alpha: float = 0.5, *,
                  logits: torch.Tensor | None = None, head: str | None = None, temperature: float = 1.0) -> torch.Tensor:
    """``(1 - alpha) * task_loss + alpha * KL(p_base || p_adapted)`` (Phan et al. 2020).

    ``p_base`` comes from the same model with its adapters disabled, under ``no_grad``: no second
    copy of the backbone is held, and no gradient flows through the base branch.

    Args:
        model: An AdaptedModel (any method) whose outputs are class logits (or have ``.logits``).
        inputs: What the model is called with: a tensor, a tuple of positional inputs, or a dict
            of keyword inputs.
        task_loss: The task loss of the adapted model on these inputs.
        alpha: Weight of the anchor, in [0, 1].
        logits: The adapted model's logits on ``inputs`` if already computed (saves a forward).
        head: With multi-task heads, the name of the head to anchor.
        temperature: Softmax temperature for both distributions.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha!r} is invalid; expected a weight in [0, 1]")
    adapted = logits if logits is not None else _logits(_call(model, inputs), head)
    with torch.no_grad(), model.disable_adapters():
        base = _logits(_call(model, inputs), head)
    if base.shape != adapted.shape:
        raise ConfigError(f"the adapted outputs {tuple(adapted.shape)} and the base outputs {tuple(base.shape)} differ "
                          "in shape (a new head?): anchoring needs the base model's own output space")
    c = adapted.shape[-1]
    log_q = F.log_softmax(adapted.reshape(-1, c) / temperature, dim=-1)
    log_p = F.log_softmax(base.reshape(-1, c) / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # KL(p_base || p_adapted)
    return (1 - alpha) * task_loss + alpha * kl
