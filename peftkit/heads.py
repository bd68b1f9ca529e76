"""Output heads: a fresh output layer (``head=N``), several named heads on one trunk (``heads=``),
and the losses that go with them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, TargetError
from .method import Adapter

__all__ = ["MultiHead", "fresh_layer", "multitask_loss", "pinball_loss"]


def fresh_layer(layer: nn.Module, outputs: int) -> nn.Module:
    """A newly initialised copy of an output layer with ``outputs`` outputs (Linear or Conv)."""
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < 1:
        raise ConfigError(f"head={outputs!r} is invalid; expected the number of outputs, e.g. head=2")
    w = layer.weight if isinstance(getattr(layer, "weight", None), torch.Tensor) else None
    kw = {"device": w.device, "dtype": w.dtype} if w is not None else {}
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, outputs, bias=layer.bias is not None, **kw)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        # the layer's own class, given its own settings back (its stubs type them as tuples of any length)
        conv: Callable[..., nn.Module] = type(layer)
        return conv(layer.in_channels, outputs, layer.kernel_size, layer.stride, layer.padding,
                    layer.dilation, 1, layer.bias is not None, layer.padding_mode, **kw)
    raise TargetError(f"head= needs a Linear or Conv output layer, found {type(layer).__name__}; "
                      "replace the layer yourself and use train=[...]")


class MultiHead(Adapter):
    """Named heads on the output layer's input: the model returns ``{name: head(features)}``."""

    def __init__(self, layer: nn.Module, heads: Mapping[str, int]) -> None:
        super().__init__()
        if not heads or not isinstance(heads, Mapping):
            raise ConfigError(f"heads={heads!r} is invalid; expected a dict of name -> outputs, e.g. {{'count': 5}}")
        self.heads = nn.ModuleDict({name: fresh_layer(layer, n) for name, n in heads.items()})

    def outputs(self) -> dict[str, int]:
        """Each head's number of outputs, by name."""
        return {name: _outputs(h) for name, h in self.heads.items()}

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        return {name: head(x) for name, head in self.heads.items()}


def _outputs(layer: nn.Module) -> int:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor), f"a head's weight is a {type(weight).__name__}"  # fresh_layer made it
    return int(weight.shape[0])


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    """Quantile (pinball) loss, averaged over the batch and the quantiles.

    Args:
        pred: (B, Q) predicted quantiles.
        target: (B,) or (B, 1) observed values.
        quantiles: the Q quantile levels in (0, 1), e.g. ``(0.1, 0.5, 0.9)``.

    Returns:
        ``mean(max(q * e, (q - 1) * e))`` with ``e = target - pred``.
    """
    q = torch.as_tensor(quantiles, dtype=pred.dtype, device=pred.device)
    if pred.dim() != 2 or pred.shape[1] != q.numel():
        raise ConfigError(f"pinball_loss: pred has shape {tuple(pred.shape)}, expected (batch, {q.numel()}) for "
                          f"{q.numel()} quantiles")
    if not torch.all((q > 0) & (q < 1)):
        raise ConfigError(f"pinball_loss: quantiles must lie in (0, 1), got {list(quantiles)}")
    e = target.reshape(-1, 1).to(pred.dtype) - pred  # (B, Q)
    return torch.maximum(q * e, (q - 1) * e).mean()


def multitask_loss(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                   losses: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                   weights: Mapping[str, float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Combine per-head losses: ``sum(weights[h] * losses[h](outputs[h], targets[h]))``.

    Returns:
        The weighted total and the unweighted per-head losses (detached, for logging).
    """
    missing = [h for h in outputs if h not in losses or h not in targets]
    if missing:
        raise ConfigError(f"multitask_loss: no loss or target for heads {missing}; give one per head in {list(outputs)}")
    weights = weights or {}
    parts = {h: losses[h](outputs[h], targets[h]) for h in outputs}
    total = sum(weights.get(h, 1.0) * v for h, v in parts.items())
    detached = {h: v.detach() for h, v in parts.items()}
    if not isinstance(total, torch.Tensor):  # no outputs at all: sum() of nothing is the int 0
        raise ConfigError("multitask_loss: no outputs to combine; give each head's output, e.g. {'count': logits}")
    return total, detached
