"""PyTorch inference fast paths, and how an adapted backbone keeps computing what the backbone does.

``nn.TransformerEncoderLayer`` skips its fused kernel whenever a forward hook sits on it or on one of
its children, so the children's forwards, and peftkit's hooks, run. ``nn.TransformerEncoder`` in
eval mode with a padding mask packs its input into a nested tensor: padded positions are never
computed and come back as zeros. It decides so from its first layer's weights and its input alone,
so when an adapter *trains* inside one of its layers (autograd on, adapter parameters requiring
grad) the nested tensor would reach a ``MultiheadAttention`` that cannot take it with autograd. For
those calls :class:`NestedEncoderGuard` turns the packing off and gives the padded positions the
value the packed path gives them (zero, before the encoder's final norm), so the adapted model still
computes exactly what the backbone computes there. Every other call runs untouched, fast paths
included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .transaction import Journal

__all__ = ["NestedEncoderGuard", "packing_encoders"]


def packing_encoders(model: nn.Module) -> list[tuple[str, nn.TransformerEncoder]]:
    """The ``nn.TransformerEncoder`` modules of ``model`` (each may pack padded inputs)."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, nn.TransformerEncoder)]


def _call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(src, mask, src_key_padding_mask)`` of a ``TransformerEncoder.forward`` call."""
    names = ("src", "mask", "src_key_padding_mask")
    call = dict(zip(names, args, strict=False))
    call.update({k: v for k, v in kwargs.items() if k in names})
    return call.get("src"), call.get("mask"), call.get("src_key_padding_mask")


def _would_pack(encoder: nn.TransformerEncoder, src: Any, mask: Any, padding: Any) -> bool:
    """Whether the frozen backbone's encoder would pack this call into a nested tensor (PyTorch's own
    conditions, for frozen weights and an input that does not require grad)."""
    if not (torch.backends.mha.get_fastpath_enabled() and getattr(encoder, "use_nested_tensor", False)
            and isinstance(src, torch.Tensor) and isinstance(padding, torch.Tensor)):
        return False
    devices = ("cpu", "cuda", "xpu", torch.utils.backend_registration._privateuse1_backend_name)
    if (encoder.layers[0].training or src.dim() != 3 or mask is not None or src.is_nested
            or torch.is_autocast_enabled() or src.device.type not in devices):
        return False
    return not getattr(encoder, "mask_check", True) or bool(
        torch._nested_tensor_from_mask_left_aligned(src, padding.logical_not()))


class NestedEncoderGuard:
    """Hooks on one ``nn.TransformerEncoder`` that keep its packed (nested-tensor) semantics on calls
    where adapters train inside it, or where a mixed-adapter batch runs through it (see the module docstring).

    Args:
        encoder: The encoder.
        trains_inside: Whether the packed path cannot serve this call: an adapter trains inside the
            encoder (autograd is on), or acts on some rows only (a mixed-adapter batch).
    """

    def __init__(self, encoder: nn.TransformerEncoder, trains_inside: Callable[[], bool]) -> None:
        self.encoder = encoder
        self.trains_inside = trains_inside
        # per call: the padded positions to zero (if any), and the undo of what the call switched off
        self._frames: list[tuple[torch.Tensor | None, Journal]] = []
        self._handles = [encoder.register_forward_pre_hook(self._pre, with_kwargs=True),
                         encoder.register_forward_hook(self._post, always_call=True)]
        if encoder.norm is not None:  # the packed path zeroes padded positions before the final norm
            self._handles.append(encoder.norm.register_forward_pre_hook(self._before_norm))

    def remove(self) -> None:
        """Take the guard's hooks off the encoder (and its norm)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def unwind(self) -> None:
        """Undo what an interrupted call left (see :meth:`peftkit.attach.Slot.unwind`)."""
        while self._frames:
            self._frames.pop()[1].undo()

    def _pre(self, encoder: nn.TransformerEncoder, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        src, mask, padding = _call(args, kwargs)
        pads, switched = None, Journal()
        if _would_pack(self.encoder, src, mask, padding) and self.trains_inside():
            pads = padding if padding.dtype == torch.bool else padding != 0  # (batch, length)
            switched.set_attribute(encoder, "use_nested_tensor", False)  # undone after the call (also when it raises)
        self._frames.append((pads, switched))

    def _zero_pads(self, x: torch.Tensor) -> torch.Tensor:
        pads = self._frames[-1][0] if self._frames else None
        return x if pads is None else x.masked_fill(pads.unsqueeze(-1), 0.0)

    def _before_norm(self, norm: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        return (self._zero_pads(args[0]), *args[1:])

    def _post(self, encoder: nn.TransformerEncoder, args: tuple[Any, ...], output: Any) -> Any:
        if not self._frames:
            return None
        pads, switched = self._frames[-1]
        switched.undo()
        if pads is not None and self.encoder.norm is None and isinstance(output, torch.Tensor):
            output = self._zero_pads(output)
        self._frames.pop()
        return output
