"""NF4 Linear layers that dequantize their weight piece by piece.

torchao's ``NF4Tensor`` dequantizes a whole weight at once on every ``F.linear`` (forward and
backward): two ``int64`` index tensors of the weight's element count, two gathered halves, their
scaled copies and the interleaved result, about 12 bytes per weight at the same time. For a
5632 x 2048 MLP weight that is 140 MB at the peak of a training step whose backbone holds 6 MB of
it. :func:`dequantize_nf4` writes the same values (bitwise) straight into one float tensor, a
megabyte-sized chunk at a time through a 256-entry table of byte -> (high, low) NF4 value pairs,
so that the float weight (2 bytes per weight in bf16) is all that a layer adds at its peak.

:class:`NF4Linear` is the ``nn.Linear`` that :func:`peftkit.quantize` makes of each layer it
quantizes with torchao's NF4: the same parameters (an ``NF4Tensor`` weight), a forward that goes
through :func:`dequantize_nf4` in both directions. It computes exactly what the ``nn.Linear`` with
torchao's ``F.linear`` computes, and it stands for an ``nn.Linear`` in adapter files.

Nothing here imports torchao: an NF4 tensor is known by its class and attributes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["NF4Linear", "dequantize_nf4", "is_nf4"]

CHUNK = 1 << 20  # weights dequantized at a time (2 MB of bf16): a multiple of every NF4 block size


def is_nf4(t: object) -> bool:
    """Whether ``t`` is a torchao ``NF4Tensor`` that :func:`dequantize_nf4` can read (row-major)."""
    return (isinstance(t, torch.Tensor) and type(t).__name__ == "NF4Tensor"
            and type(t).__module__.startswith("torchao") and t.dim() == 2 and t.is_contiguous())


def _attr(t: torch.Tensor, name: str) -> Any:
    return getattr(t, name)


def _scalers(w: torch.Tensor) -> torch.Tensor:
    """One scale per block of ``block_size`` weights, undoing the double quantization (torchao's
    ``NF4Tensor.dequantize_scalers``, operation for operation, so that the values are bitwise its)."""
    q, factor, size = _attr(w, "quantized_scalers"), _attr(w, "quantization_factor"), _attr(w, "scaler_block_size")
    scaled = (q.view(-1, size) / factor.unsqueeze(-1)).flatten().to(w.dtype)
    out: torch.Tensor = scaled + _attr(w, "scaler_mean")
    return out


def dequantize_nf4(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float tensor an ``NF4Tensor`` stands for: bitwise what its ``get_original_weight()``
    returns (cast to ``dtype``, default its own), built a chunk at a time, without autograd.

    Args:
        w: A row-major torchao ``NF4Tensor`` (see :func:`is_nf4`).
        dtype: The float dtype of the result.
    """
    if not is_nf4(w):
        what = "a transposed NF4Tensor" if type(w).__name__ == "NF4Tensor" else type(w).__name__
        raise ConfigError(f"w={what} is invalid; expected a row-major torchao NF4Tensor (torchao.quantization.to_nf4)")
    data, nf4, block = _attr(w, "quantized_data"), _attr(w, "nf4"), _attr(w, "block_size")
    n = w.numel()
    if CHUNK % block or n % block:
        raise ConfigError(f"w is an NF4Tensor of {n} weights in blocks of {block}, which dequantize_nf4 cannot "
                          f"chunk: expected a block size dividing {CHUNK} (torchao's default is 64)")
    with torch.no_grad():
        scalers = _scalers(w)
        byte = torch.arange(256, device=data.device)
        pairs = torch.stack([nf4[byte >> 4], nf4[byte & 0b1111]], dim=-1)  # byte -> (first, second) weight
        # the product's dtype is what torchao's would be (its table times its scales), before the cast
        out = torch.empty(n, dtype=torch.result_type(pairs, scalers), device=data.device)
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            values = pairs[data[start // 2: stop // 2].long()].view(-1, block)
            torch.mul(values, scalers[start // block: stop // block].unsqueeze(-1), out=out[start:stop].view(-1, block))
        return out.view(w.shape).to(dtype or w.dtype)


class _LinearNF4(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with ``W`` an NF4 weight that never trains: dequantized again for the
    input's gradient instead of being kept between forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # a frozen parameter: holding it keeps nothing else alive
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize_nf4(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        grad_x = grad @ dequantize_nf4(ctx.weight, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` over an NF4 weight (see :class:`NF4Linear`); any other weight goes to ``F.linear``."""
    if not is_nf4(weight) or weight.requires_grad:
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return F.linear(x, dequantize_nf4(weight, x.dtype), bias)
    out: torch.Tensor = _LinearNF4.apply(x, weight, bias)
    return out


class NF4Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is a torchao ``NF4Tensor``, dequantized a chunk at a time on each
    call (see the module docstring); with a float weight (after a merge) it is an ``nn.Linear``.

    :func:`peftkit.quantize` turns plain ``nn.Linear`` layers into these in place (the same module
    object, parameters and hooks); adapter files record them as ``Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)
