"""peftkit-ia3: a third-party peftkit plugin providing the IA3 method.

IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning") learns one scale per output feature of each target layer: ``y -> l * y``,
with ``l`` initialised to ones so the adapted model starts equal to the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import peftkit
from peftkit.errors import ConfigError, TargetError
from peftkit.method import Delta
from peftkit.quantized import float_dtype, logical_shape

__version__ = "0.1.0"


@dataclass(frozen=True)
class IA3Config:
    """Options of the ``ia3`` method."""

    init: float = 1.0  # initial value of every scale; 1.0 makes the adapter the identity

    def __post_init__(self) -> None:
        if not isinstance(self.init, (int, float)) or isinstance(self.init, bool):
            raise ConfigError(f"ia3 option init={self.init!r} is invalid; expected a number such as 1.0")


class IA3Scale(peftkit.Adapter):
    """A learned scale per output feature (per channel for convolutions)."""

    def __init__(self, module: nn.Linear | nn.Conv2d, init: float) -> None:
        super().__init__()
        w = module.weight  # on a quantized backbone: the float shape and dtype it stands for
        self.ia3_l = nn.Parameter(torch.full((logical_shape(module, "weight", w)[0],), float(init), device=w.device,
                                             dtype=float_dtype(module)))

    def _shaped(self, ndim: int, channel_dim: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[channel_dim] = -1
        return self.ia3_l.view(shape)

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        # in the layer's dtype: float32 scales on a bf16 backbone must not turn its activations float32
        return output * self._shaped(output.dim(), channel_dim).to(output.dtype)

    def delta(self, module: nn.Module) -> dict[str, Delta]:
        assert isinstance(module, (nn.Linear, nn.Conv2d))  # what IA3.build() adapts
        scale = self._shaped(module.weight.dim(), 0) - 1  # (out, 1, ...)
        deltas: dict[str, Delta] = {"weight": scale * module.weight}
        if module.bias is not None:
            deltas["bias"] = (self.ia3_l - 1) * module.bias
        return deltas


class IA3(peftkit.Method[IA3Config]):
    """IA3: learned per-feature scaling of each target layer's output."""

    name = "ia3"
    Config = IA3Config

    adapts = (nn.Linear, nn.Conv2d)  # default targets: every one of these except the output layer

    def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
        if not isinstance(module, (nn.Linear, nn.Conv2d)):  # a file written for other layers
            raise TargetError(f"ia3 adapts Linear and Conv2d layers; {path!r} is a {type(module).__name__}")
        return IA3Scale(module, self.config.init)


@peftkit.hookimpl
def register_methods(register: Any) -> None:
    register(IA3)
