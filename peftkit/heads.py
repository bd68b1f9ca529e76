"""Output heads: a fresh output layer (``head=N``), several named heads on one trunk (``heads=``),
and the losses that go with them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, TargetError
from .method import Adapter
from .quantized import logical_dtype

__all__ = ["MAX_HEAD_LAYERS", "HeadSpec", "MultiHead", "fresh_head", "fresh_layer", "head_parameters", "head_widths",
           "is_head_spec", "multitask_loss", "normal_head", "pinball_loss"]

# A head: its number of outputs (a fresh copy of the output layer), or the widths of a small MLP on the
# output layer's input, hidden layers first (``[256, 2]``: project to 256, ReLU, then 2 outputs).
HeadSpec = int | Sequence[int]
MAX_HEAD_LAYERS = 8


def fresh_layer(layer: nn.Module, outputs: int) -> nn.Module:
    """A newly initialised copy of an output layer with ``outputs`` outputs (Linear or Conv)."""
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < 1:
        raise ConfigError(f"head={outputs!r} is invalid; expected the number of outputs, e.g. head=2")
    weight = getattr(layer, "weight", None)
    w = weight if isinstance(weight, torch.Tensor) else None
    kw = {"device": w.device, "dtype": logical_dtype(layer, w)} if w is not None else {}  # float, also for a quantized layer
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, outputs, bias=layer.bias is not None, **kw)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        # the layer's own class, given its own settings back (its stubs type them as tuples of any length)
        conv: Callable[..., nn.Module] = type(layer)
        return conv(layer.in_channels, outputs, layer.kernel_size, layer.stride, layer.padding,
                    layer.dilation, 1, layer.bias is not None, layer.padding_mode, **kw)
    raise TargetError(f"head= needs a Linear or Conv output layer, found {type(layer).__name__}; "
                      "replace the layer yourself and use train=[...]")


def head_widths(spec: Any, name: str = "head") -> list[int]:
    """A head's layer widths (its number of outputs last), or a :class:`ConfigError` naming ``name``."""
    def count(n: Any) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    if count(spec):
        return [spec]
    if (isinstance(spec, Sequence) and not isinstance(spec, str) and 1 <= len(spec) <= MAX_HEAD_LAYERS
            and all(count(n) for n in spec)):
        return list(spec)
    raise ConfigError(f"{name}={spec!r} is invalid; expected the number of outputs (e.g. 2), or the widths of an MLP "
                      f"head, hidden layers first, at most {MAX_HEAD_LAYERS} (e.g. [256, 2])")


def is_head_spec(spec: Any) -> bool:
    """Whether ``spec`` is a valid head: what a file's heads table is checked with."""
    try:
        head_widths(spec)
    except ConfigError:
        return False
    return True


def normal_head(spec: Any, name: str = "head") -> int | list[int]:
    """``spec`` as files store it: a count (also for ``[n]``: one layer), or a list of widths."""
    widths = head_widths(spec, name)
    return widths[0] if len(widths) == 1 else widths


def fresh_head(layer: nn.Module, spec: HeadSpec, name: str = "head") -> nn.Module:
    """A new head in place of the output layer ``layer``: a fresh copy of it with ``spec`` outputs, or an
    MLP (``spec`` a list of widths) whose first layer is a fresh copy of ``layer`` and whose later layers
    are Linear (1x1 convolutions after a convolution), with a ReLU between layers."""
    widths = head_widths(spec, name)
    first = fresh_layer(layer, widths[0])
    if len(widths) == 1:
        return first
    w = first.weight
    assert isinstance(w, torch.Tensor), type(w).__name__  # fresh_layer makes Linear or Conv layers
    convs: dict[type[nn.Module], Callable[..., nn.Module]] = {nn.Conv1d: nn.Conv1d, nn.Conv2d: nn.Conv2d,
                                                               nn.Conv3d: nn.Conv3d}
    conv = convs.get(type(first))
    layers = [first]
    for a, b in zip(widths, widths[1:], strict=False):  # after a convolution, 1x1 ones: features stay per position
        layers += [nn.ReLU(), nn.Linear(a, b, device=w.device, dtype=w.dtype) if conv is None
                   else conv(a, b, 1, device=w.device, dtype=w.dtype)]
    return nn.Sequential(*layers)


def head_parameters(layer: nn.Module, spec: HeadSpec) -> int:
    """How many parameters :func:`fresh_head` would give ``layer``'s replacement (nothing is built)."""
    widths = head_widths(spec)
    weight = layer.weight
    assert isinstance(weight, torch.Tensor), type(weight).__name__  # the output layer is a projection
    first = weight[0].numel() * widths[0] + (widths[0] if getattr(layer, "bias", None) is not None else 0)
    return first + sum(a * b + b for a, b in zip(widths, widths[1:], strict=False))


class MultiHead(Adapter):
    """Named heads on the output layer's input: the model returns ``{name: head(features)}``."""

    def __init__(self, layer: nn.Module, heads: Mapping[str, HeadSpec]) -> None:
        super().__init__()
        if not heads or not isinstance(heads, Mapping):
            raise ConfigError(f"heads={heads!r} is invalid; expected a dict of name -> outputs, e.g. {{'count': 5}}")
        self.specs = {name: head_widths(spec, f"heads[{name!r}]") for name, spec in heads.items()}
        self.heads = nn.ModuleDict({name: fresh_head(layer, spec, f"heads[{name!r}]") for name, spec in heads.items()})

    def outputs(self) -> dict[str, int | list[int]]:
        """Each head's spec, by name: its number of outputs, or an MLP head's widths."""
        return {name: normal_head(w) for name, w in self.specs.items()}

    def head(self, name: str) -> nn.Module:
        """The head called ``name`` (a :class:`ConfigError` listing the heads when there is none)."""
        if name not in self.heads:
            raise ConfigError(f"no head named {name!r}; the heads are {', '.join(map(repr, self.heads))}")
        return self.heads[name]

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        return {name: head(x) for name, head in self.heads.items()}


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
