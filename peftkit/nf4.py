"""NF4 Linear layers that dequantize their weight piece by piece.

torchao's ``NF4Tensor`` dequantizes a whole weight at once on every ``F.linear`` (forward and
backward): two ``int64`` index tensors of the weight's element count, two gathered halves, their
scaled copies and the interleaved result, about 12 bytes per weight at the same time. For a
5632 x 2048 MLP weight that is 140 MB at the peak of a training step whose backbone holds 6 MB of
it. :func:`dequantize_nf4` writes the same values (bitwise) straight into one float tensor, a
megabyte-sized chunk at a time through a 256-entry table of byte -> (high, low) NF4 value pairs,
so that the float weight (2 bytes per weight in bf16, in the dtype the layer computes in) and a
few megabytes of chunk temporaries are all that a layer adds at its peak.

:class:`NF4Linear` is the ``nn.Linear`` that :func:`peftkit.quantize` makes of each layer it
quantizes with torchao's NF4: the same parameters (an ``NF4Tensor`` weight), a forward that goes
through :func:`dequantize_nf4` in both directions. It computes bitwise what an ``nn.Linear`` holding
the dequantized weight computes, forward and backward; torchao's own ``F.linear`` gives the same
without a bias, and adds a bias apart (rounding twice in half precision). It stands for an
``nn.Linear`` in adapter files.

Nothing here imports torchao: an NF4 tensor is known by its class and attributes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["NF4Linear", "dequantize_nf4", "is_nf4"]

CHUNK = 1 << 20  # weights dequantized at a time (2 MB of bf16), rounded down to whole bytes and scale blocks


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
    """The float tensor an ``NF4Tensor`` stands for: bitwise what ``w.get_original_weight().to(dtype)``
    returns (``dtype`` default: its own), written a chunk at a time straight into the result, without
    autograd.

    Args:
        w: A row-major torchao ``NF4Tensor`` (see :func:`is_nf4`).
        dtype: The float dtype of the result.

    Raises:
        ConfigError: ``w`` is not a row-major ``NF4Tensor``.
    """
    if not is_nf4(w):
        what = "a transposed NF4Tensor" if type(w).__name__ == "NF4Tensor" else type(w).__name__
        raise ConfigError(f"w={what} is invalid; expected a row-major torchao NF4Tensor (torchao.quantization.to_nf4)")
    data, nf4, block = _attr(w, "quantized_data"), _attr(w, "nf4"), _attr(w, "block_size")
    n = w.numel()
    unit = math.lcm(2, block)  # a chunk holds whole bytes (two weights each) and whole scale blocks
    step = max(unit, CHUNK - CHUNK % unit)
    with torch.no_grad():
        scalers = _scalers(w)
        byte = torch.arange(256, device=data.device)
        pairs = torch.stack([nf4[byte >> 4], nf4[byte & 0b1111]], dim=-1)  # byte -> (first, second) weight
        out = torch.empty(n, dtype=dtype or w.dtype, device=data.device)
        for start in range(0, n, step):
            stop = min(start + step, n)
            values = pairs[data[start // 2: stop // 2].long()].view(-1, block)
            # computed in the table's and scales' dtype, as torchao does, then rounded once into ``out``
            torch.mul(values, scalers[start // block: stop // block].unsqueeze(-1), out=out[start:stop].view(-1, block))
        return out.view(w.shape)


def _autocast(x: torch.Tensor) -> bool:
    return x.is_floating_point() and torch.is_autocast_enabled(x.device.type)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` will compute in: autocast's where it is on (so that the weight is
    dequantized to it once, not to the input's dtype and then cast), else the input's."""
    return torch.get_autocast_dtype(x.device.type) if _autocast(x) else x.dtype


class _LinearNF4(torch.autograd.Function):
    """``F.linear(x, W, bias)`` with ``W`` an NF4 weight that never trains: dequantized again for the
    input's gradient instead of being kept between forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # held as is, not through save_for_backward: a frozen parameter, which nothing writes in place
        # (peftkit never does, and an NF4Tensor takes no in-place arithmetic), so no version check is lost
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize_nf4(weight, _compute_dtype(x)), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        grad_x = grad @ dequantize_nf4(ctx.weight, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` over an NF4 weight, dequantized a chunk at a time (see
    :class:`NF4Linear`); any other weight, or one that requires grad, goes to ``F.linear`` as it is."""
    if not is_nf4(weight) or weight.requires_grad:
        return F.linear(x, weight, bias)
    if bias is not None and bias.dtype != x.dtype and not _autocast(x):  # added apart: the dtypes promote, as torchao's do
        return nf4_linear(x, weight) + bias
    if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return F.linear(x, dequantize_nf4(weight, _compute_dtype(x)), bias)
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
