"""Quantized base tensors, seen through their float meaning.

A backbone quantized by :func:`peftkit.quantize`, by torchao directly, or loaded by transformers with
a bitsandbytes config keeps Linear layers whose weight is not a float tensor: a torchao tensor
subclass (``NF4Tensor``, ``Int8Tensor``: logical shape and dtype, quantized storage inside) or a
bitsandbytes parameter (``Params4bit``: packed ``uint8`` of shape ``(n, 1)``; ``Int8Params``:
``int8``). Adapters never write such a tensor (they apply beside it, in output space), and files
describe it by what it stands for (``weight (out, in)`` of the float dtype it was quantized from), so
the adapter file trained on a quantized backbone is the one trained on the float backbone.

Nothing here imports torchao or bitsandbytes: a tensor is recognised by its class, and a backend is
imported only to dequantize a tensor it made (torchao's NF4 is dequantized by :mod:`peftkit.nf4`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .nf4 import NF4Linear, dequantize_nf4, is_nf4

__all__ = ["dequantize", "float_class", "float_dtype", "is_quantized", "logical_dtype", "logical_shape",
           "logical_tensors", "module_quantization", "quantization_of"]

# bitsandbytes keeps a Params4bit's quantization state as extra state_dict entries ("weight.absmax", ...)
_BNB_STATE = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map", "SCB",
              "weight_format")


def _attr(t: object, name: str) -> Any:
    """A backend tensor's own attribute (the backends are untyped here: they are not imported)."""
    return getattr(t, name)


def _bnb_class(t: object, name: str) -> bool:
    return type(t).__name__ == name and type(t).__module__.startswith("bitsandbytes")


def quantization_of(t: object) -> str | None:
    """The quantization of a tensor: ``"nf4"``/``"int8"``/``"int4"``... for torchao's tensors,
    ``"bnb-nf4"``/``"bnb-fp4"``/``"bnb-int8"`` for bitsandbytes', ``None`` for a plain tensor."""
    if not isinstance(t, torch.Tensor):
        return None
    local = getattr(t, "_local_tensor", None)  # an FSDP2-sharded (DTensor) weight: its shard's class tells
    if isinstance(local, torch.Tensor):
        t = local
    cls = type(t)
    if cls.__module__.startswith("torchao"):
        name = cls.__name__
        return name[: -len("Tensor")].lower() if name.endswith("Tensor") else name.lower()
    if _bnb_class(t, "Params4bit"):
        state = getattr(t, "quant_state", None)
        return f"bnb-{getattr(state, 'quant_type', 'nf4')}" if state is not None else None  # not yet quantized
    if _bnb_class(t, "Int8Params"):
        return "bnb-int8" if t.dtype == torch.int8 else None
    return None


def is_quantized(t: object) -> bool:
    """Whether ``t`` is a quantized tensor (see :func:`quantization_of`)."""
    return quantization_of(t) is not None


def module_quantization(module: nn.Module) -> str | None:
    """The quantization of a module's own weight (``None``: a float module)."""
    return quantization_of(module._parameters.get("weight"))


def logical_shape(module: nn.Module, name: str, t: torch.Tensor) -> torch.Size:
    """The shape ``t`` (the tensor ``name`` of ``module``) stands for."""
    if _bnb_class(t, "Params4bit") and getattr(t, "quant_state", None) is not None:
        return torch.Size(_attr(t, "quant_state").shape)
    return t.shape


def logical_dtype(module: nn.Module, t: torch.Tensor) -> torch.dtype:
    """The float dtype ``t`` stands for: a torchao tensor's own, a 4-bit bitsandbytes weight's original
    dtype, an 8-bit one's bias dtype (bitsandbytes keeps no other; float32 without a bias)."""
    if _bnb_class(t, "Params4bit") and getattr(t, "quant_state", None) is not None:
        dtype: torch.dtype = _attr(t, "quant_state").dtype
        return dtype
    if quantization_of(t) == "bnb-int8":
        bias = getattr(module, "bias", None)
        return bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else torch.float32
    return t.dtype


def logical_tensors(module: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype, str | None]]:
    """name -> (shape, dtype, quantization) of a module's tensors as the float module has them:
    bitsandbytes' extra state entries are left out, quantized weights given their logical shape."""
    out: dict[str, tuple[torch.Size, torch.dtype, str | None]] = {}
    for k, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or k in _BNB_STATE or k.startswith("weight.quant_state."):
            continue
        out[k] = (logical_shape(module, k, t), logical_dtype(module, t), quantization_of(t))
    return out


def float_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a module computes in (for an adapter's own tensors): its first parameter's, or
    the float dtype that parameter stands for when quantized; float32 for a module without any."""
    for owner in module.modules():
        for t in owner._parameters.values():
            if isinstance(t, torch.Tensor):
                return logical_dtype(owner, t)
    return torch.float32


def float_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The float class a quantized module's class stands for (a bitsandbytes ``Linear4bit``, peftkit's
    ``NF4Linear``, is a ``Linear``)."""
    if (cls.__module__.startswith("bitsandbytes") or issubclass(cls, NF4Linear)) and issubclass(cls, nn.Linear):
        return nn.Linear
    return cls


def dequantize(t: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """The float tensor a quantized ``t`` stands for (``t`` itself when it is not quantized); without
    autograd. ``module``: the layer holding ``t`` (for an 8-bit bitsandbytes weight's dtype)."""
    kind = quantization_of(t)
    if kind is None:
        return t
    if isinstance(getattr(t, "_local_tensor", None), torch.Tensor):  # FSDP2-sharded: every rank gathers it whole
        return dequantize(_attr(t, "full_tensor")(), module)
    if is_nf4(t):
        return dequantize_nf4(t)  # a chunk at a time: a fraction of get_original_weight's temporaries
    with torch.no_grad():
        if type(t).__module__.startswith("torchao"):
            # NF4Tensor.dequantize is a static helper of another signature; get_original_weight is the whole tensor
            whole = _attr(t, "get_original_weight") if hasattr(t, "get_original_weight") else _attr(t, "dequantize")
            out: torch.Tensor = whole()
            return out.to(t.dtype)
        bnb = sys.modules.get("bitsandbytes")
        assert bnb is not None, "a bitsandbytes tensor exists, so bitsandbytes is imported"
        if kind == "bnb-int8":  # the row scales: on the weight until the first forward moves them to the layer's state
            scales = getattr(t, "SCB", None)
            if scales is None and module is not None:
                scales = getattr(getattr(module, "state", None), "SCB", None)
            if scales is None:
                raise ValueError("an 8-bit bitsandbytes weight whose row scales are on its layer: pass module=")
            eight: torch.Tensor = bnb.functional.int8_vectorwise_dequant(t.data, scales)
            return eight.to(logical_dtype(module, t) if module is not None else torch.float32)
        state = _attr(t, "quant_state")
        four: torch.Tensor = bnb.functional.dequantize_4bit(t.data, state)
        return four.to(state.dtype)
