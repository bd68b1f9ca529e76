"""LoRA (Hu et al. 2021): ``W -> W + s * B @ A`` with ``A`` (r x in) and ``B`` (out x r).

``r * (in + out)`` trainable values instead of ``in * out``. ``s = alpha / r`` (``alpha / sqrt(r)``
with rslora). Targets: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (a k x k conv in -> r, then a 1 x 1 conv
r -> out, group-wise for grouped convs), ``nn.Embedding``, ``nn.MultiheadAttention`` (its packed
in-projection and its ``out_proj``), Hugging Face ``Conv1D`` (weight stored transposed), and
``nn.LSTM``/``nn.GRU``/``nn.RNN`` (every input, hidden and projection weight of every layer and
direction; the adapted weights are substituted for the module's own, so it runs its own kernels).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.combination import Combination, low_rank_factors, merge_deltas
from peftkit.errors import ConfigError, TargetError
from peftkit.method import Delta, LowRankDelta, add_delta, detach_delta
from peftkit.quantized import dequantize, logical_dtype, logical_shape
from peftkit.targets import matches, output_layers, pattern_problem

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LoraConfig:
    """Options of the ``lora`` method."""

    r: int = 8  # rank of the update
    alpha: float = 8.0  # scale = alpha / r (alpha / sqrt(r) with rslora)
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    dropout: float = 0.0  # dropout on the adapter's input (output-space form; MHA and recurrent targets ignore it)
    # "kaiming": A kaiming-uniform, B zero | "gaussian": A ~ N(0, 1/r), B zero | False: random | from the weight
    # (Linear and ungrouped conv targets): "pissa" (principal singular vectors, Meng et al. 2024),
    # "pissa_niter_K" (the same by a randomized SVD with K subspace iterations, for large layers),
    # "olora" (QR, Büyükakyüz 2024); the starting factors stay in the adapter (the backbone never
    # changes) and the file is an ordinary LoRA of rank 2r
    init: str | bool = "kaiming"
    bias: str = "none"  # "none" | "lora_only": train a bias delta on each target | "all": on every bias in the model
    fan_in_fan_out: bool = False  # target weights stored (in, out), as in Hugging Face Conv1D (detected automatically)
    dora: bool = False  # DoRA (Liu et al. 2024): a learned magnitude per output times the normalised W + s B A
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module name/suffix/regex -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module name/suffix/regex -> alpha

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, want: str) -> ConfigError:
            return ConfigError(f"lora option {name}={value!r} is invalid; expected {want}")

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise bad("r", self.r, "a positive integer rank such as 8")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha < math.inf:
            raise bad("alpha", self.alpha, "a positive finite number such as 16")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", self.dropout, "a probability in [0, 1)")
        if self.init not in ("kaiming", "gaussian", True, False, "pissa", "olora") and _niter(self.init) is None:
            raise bad("init", self.init, "'kaiming', 'gaussian', 'pissa', 'pissa_niter_K' (K in 1..99), 'olora', "
                                         "True or False")
        if self.dora and _data_init(self.init):
            raise bad("init", self.init, "'kaiming' or 'gaussian' with dora=True (PiSSA/OLoRA with DoRA is not built)")
        if self.bias not in ("none", "lora_only", "all"):
            raise bad("bias", self.bias, "'none', 'lora_only' or 'all'")
        if not isinstance(self.dora, bool):
            raise bad("dora", self.dora, "True or False")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise bad(name, pattern, "a dict of module name/suffix/regex -> value")
            for k in pattern:
                why = pattern_problem(k) if isinstance(k, str) else "it is not a string"
                if why:
                    raise bad(f"{name} key", k, f"a module name, suffix or simple regex: {why}")
        for k, v in self.rank_pattern.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(f"rank_pattern[{k!r}]", v, "a positive integer rank")
        for k, a in self.alpha_pattern.items():
            if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0 < a < math.inf:
                raise bad(f"alpha_pattern[{k!r}]", a, "a positive finite number")


def _niter(init: object) -> int | None:
    """K of ``init="pissa_niter_K"``, else None."""
    match = re.fullmatch(r"pissa_niter_([1-9][0-9]?)", init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def _data_init(init: object) -> bool:
    """Whether ``init`` takes the factors from the target's weight (PiSSA, OLoRA)."""
    return init in ("pissa", "olora") or _niter(init) is not None


def _factors_from_weight(w: torch.Tensor, r: int, scale: float, init: str | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, cols), B (rows, r))`` from a 2-D weight: with ``s * B @ A`` its r principal singular
    components (PiSSA: ``A = sqrt(S/s) V^T``, ``B = U sqrt(S/s)``) or its first r QR directions
    (OLoRA: ``A = R[:r]``, ``B = Q[:, :r]``), as PEFT computes them."""
    rows, cols = w.shape
    if r > min(rows, cols):
        raise TargetError(f"lora init={init!r} needs r <= {min(rows, cols)} (the smaller side of a {rows} x {cols} "
                          "weight); lower r for this layer (rank_pattern) or leave it out of targets")
    if w.is_meta:  # the dry run only checks shapes
        return w.new_empty(r, cols), w.new_empty(rows, r)
    x = w.detach().float()
    if init == "olora":
        q, rr = torch.linalg.qr(x)
        a, b = rr[:r], q[:, :r]
    else:
        niter = _niter(init)
        if niter is None:
            u, s, vh = torch.linalg.svd(x, full_matrices=False)
        else:
            u, s, v = torch.svd_lowrank(x, q=r, niter=niter)
            vh = v.T
        root = (s[:r] / scale).sqrt()
        a, b = root[:, None] * vh[:r], u[:, :r] * root
    return a.to(w.dtype).contiguous(), b.to(w.dtype).contiguous()


def _own_weight(module: nn.Module) -> bool:
    """Whether the layer holds its weight as a tensor of its own (not one that a parametrization or
    a weight_norm hook computes on each call, which LoRA's delta cannot be added to)."""
    if isinstance(module, nn.RNNBase):
        return all(isinstance(module._parameters.get(n), torch.Tensor) for n in _recurrent_weights(module))
    names = ("in_proj_weight", "q_proj_weight") if isinstance(module, nn.MultiheadAttention) else ("weight",)
    return any(isinstance(module._parameters.get(n), torch.Tensor) for n in names)


def _recurrent_weights(module: nn.RNNBase) -> list[str]:
    """An LSTM/GRU/RNN's weight matrices: ``weight_ih_l{k}``, ``weight_hh_l{k}`` and, with
    ``proj_size``, ``weight_hr_l{k}``, each also ``_reverse`` when bidirectional."""
    return [n for n in module._flat_weights_names if n.startswith("weight_")]


def _conv(module: nn.Module) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
    """A ConvLoRA's target, typed as the convolution build() checked it is."""
    assert isinstance(module, _CONVS), f"lora's ConvLoRA is on a {type(module).__name__}"
    return module


def _mha(module: nn.Module) -> nn.MultiheadAttention:
    """A MultiheadAttentionLoRA's target, typed as the attention build() checked it is."""
    assert isinstance(module, nn.MultiheadAttention), f"lora's MultiheadAttentionLoRA is on a {type(module).__name__}"
    return module


def _is_hf_conv1d(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, torch.Tensor) and w.dim() == 2


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The module's tensor ``name`` (e.g. a Linear's or Conv1D's ``weight``), typed as one."""
    t = getattr(module, name)
    assert isinstance(t, torch.Tensor), f"{type(module).__name__}.{name} is a {type(t).__name__}, not a tensor"
    return t


def _init_pair(owner: nn.Module, a_shape: tuple[int, ...], b_shape: tuple[int, ...], like: torch.Tensor,
               init: str | bool, embedding: bool = False) -> None:
    A = owner.lora_A = nn.Parameter(torch.empty(a_shape, device=like.device, dtype=like.dtype))
    B = owner.lora_B = nn.Parameter(torch.empty(b_shape, device=like.device, dtype=like.dtype))
    with torch.no_grad():
        if embedding and init is not False:  # rows are looked up, so keep B random and A zero (as PEFT does)
            nn.init.zeros_(A)
            nn.init.normal_(B)
        else:
            _init_2d(A, B, init)


def _init_2d(A: torch.Tensor, B: torch.Tensor, init: str | bool) -> None:
    """Initialise one (r, in) / (out, r) pair in place (A may have trailing kernel dims)."""
    if init is False:  # random: the adapter is not the identity (tests)
        nn.init.normal_(A, std=1.0 / math.sqrt(A.shape[1]))
        nn.init.normal_(B, std=0.1)
        return
    if init == "gaussian":
        nn.init.normal_(A, std=1.0 / A.shape[0])
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


def _add_low_rank(output: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """``output + scale * h @ B.T`` as one ``addmm``: the product, the scaling and the sum in one pass
    over the full-size output, forward and backward (a separate product, ``*`` and ``+`` cost three;
    measured in benchmarks/: about 10% of a MiniLM all-Linear training step)."""
    if output.dtype != h.dtype or output.dtype != B.dtype:  # e.g. an fp32 adapter on a bf16 output
        return output + scale * F.linear(h, B).to(output.dtype)
    width = output.shape[-1]
    out = torch.addmm(output.reshape(-1, width), h.reshape(-1, h.shape[-1]), B.t(), alpha=scale)
    return out.view(output.shape)


def _norms(v: torch.Tensor, k: int, transposed: bool) -> torch.Tensor:
    """L2 norm of each slice of ``v`` indexed by its first ``k`` dims (its last when ``transposed``),
    over the remaining dims: the per-output norms DoRA divides by."""
    dims = (0,) if transposed else tuple(range(k, v.dim()))  # transposed: HF Conv1D's (in, out); (num, dim) embeddings
    n: torch.Tensor = torch.linalg.vector_norm(v, dim=dims)
    return n


def _broadcast(g: torch.Tensor, like: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Per-output factors ``g`` shaped to multiply ``like`` (the weight) slice by slice."""
    return g if transposed else g.reshape(*g.shape, *[1] * (like.dim() - g.dim()))


def dora_magnitude(base: torch.Tensor, delta: Delta, k: int = 1, transposed: bool = False) -> torch.Tensor:
    """DoRA's initial magnitude: the norms of ``W + delta`` (the base's own norms when ``B = 0``)."""
    with torch.no_grad():
        return _norms(add_delta(base, delta), k, transposed)


def dora_delta(base: torch.Tensor, delta: Delta, magnitude: torch.Tensor,
               transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA's weight change ``m * V / ||V|| - W`` with ``V = W + delta``, and the factors
    ``g = m / ||V||``; the norm is treated as a constant (no gradient), as the paper's section 4.3
    recommends and PEFT does."""
    v = add_delta(base, delta)
    with torch.no_grad():
        n = _norms(v, magnitude.dim(), transposed)
    g = magnitude.to(v.dtype) / n
    return v * _broadcast(g, v, transposed) - base, g


class _DoraGradient(torch.autograd.Function):
    """The fold form of DoRA on a Linear (see :class:`_LowRankGradient`): the layer ran with
    ``W' = g * (W + s B A)``, ``g = m / ||W + s B A||`` per output, folded in without autograd. Left:
    ``dm = sum_t dy (y - b) / m``, and LoRA's ``dA``, ``dB`` with ``dy`` scaled by ``g``. ``y - b``
    is kept as a copy, since the caller may change the layer's output in place."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                magnitude: torch.Tensor, bias: torch.Tensor | None, scale: float, g: torch.Tensor,
                offset: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            xa = x2.to(A.dtype) @ A.t()  # (tokens, r)
        y = output.detach().reshape(-1, output.shape[-1])
        unbiased = (y - offset if offset is not None else y.clone()) if ctx.needs_input_grad[4] else None
        ctx.save_for_backward(x2, xa, B, magnitude, g, unbiased)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xa, B, magnitude, g, unbiased = ctx.saved_tensors
        grad = grad.contiguous()
        g2 = grad.view(-1, grad.shape[-1]).to(B.dtype)
        grad_a = grad_b = grad_m = grad_bias = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            scaled = g2 * g.to(g2.dtype)  # the low-rank path is multiplied by g
            if ctx.needs_input_grad[2]:
                grad_a = torch.mm((scaled @ B).t(), x2.to(B.dtype)).mul_(ctx.scale)
            if ctx.needs_input_grad[3]:
                grad_b = torch.mm(xa.t(), scaled).t().mul_(ctx.scale)
        if unbiased is not None:
            grad_m = (g2 * unbiased.to(g2.dtype)).sum(0) / magnitude
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = g2.sum(0)
        return grad, None, grad_a, grad_b, grad_m, grad_bias, None, None, None


class _LowRankGradient(torch.autograd.Function):
    """Identity on a Linear's output whose backward yields the LoRA factors' gradients.

    The Linear ran with ``W + s*B@A`` folded in without autograd, so its output and its input
    gradient already include the adapter; only ``dA = s (g B)^T x``, ``dB = s (x A^T)^T g`` (and the
    bias delta's ``sum g``) are left: three skinny products instead of a full weight gradient, or of
    the output-space form's extra full-size passes (benchmarks/: 1.11x instead of 1.2-1.4x the
    frozen layer's step).
    """

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                bias: torch.Tensor | None, scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # the caller's input (a view), saved as it is
        with torch.autocast(x.device.type, enabled=False):  # the factors' dtype, also under autocast
            xa = x2.to(A.dtype) @ A.t()  # (tokens, r)
        ctx.save_for_backward(x2, xa, B)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return output.detach()  # an alias, not the input as-is: autograd would treat that as a view, refusing in-place ops

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xa, B = ctx.saved_tensors
        # A permuted gradient (e.g. a value projection's, back from attention) is copied once, here,
        # and handed on contiguous: the Linear's own backward would otherwise copy it a second time.
        g = g.contiguous()
        g2 = g.view(-1, g.shape[-1]).to(B.dtype)
        grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_a = torch.mm((g2 @ B).t(), x2.to(B.dtype)).mul_(ctx.scale)  # (r, in)
        if ctx.needs_input_grad[3]:
            grad_b = torch.mm(xa.t(), g2).t().mul_(ctx.scale)  # (out, r); xa^T g reads g row-major
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = g2.sum(0)
        return g, None, grad_a, grad_b, grad_bias, None


def _conv_factor_grads(g: torch.Tensor, x: torch.Tensor, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       conv: tuple[list[int], list[int], list[int], int], scale: float, need_a: bool,
                       need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dA, dB)`` of ``s * conv1x1(conv(x, A), B)`` from its output gradient ``g`` (``h = conv(x, A)``):
    a 1 x 1 weight gradient for B, and a weight gradient with r output channels for A."""
    stride, padding, dilation, groups = conv
    nd = A.dim() - 2
    one, zero = [1] * nd, [0] * nd
    g_h, grad_b, _ = torch.ops.aten.convolution_backward(g, h, B, None, one, zero, one, False, zero, groups,
                                                         [True, need_b, False])
    grad_a = None
    if need_a:
        grad_a = torch.ops.aten.convolution_backward(
            g_h, x.to(A.dtype), A, None, stride, padding, dilation, False, zero, groups, [False, True, False])[1]
        grad_a = grad_a.mul_(scale)
    return grad_a, (grad_b.mul_(scale) if grad_b is not None else None)


class _ConvLowRankGradient(torch.autograd.Function):
    """The convolution counterpart of :class:`_LowRankGradient`: with ``h = conv(x, A)`` (r channels)
    and ``gB`` the output gradient projected to r channels, ``dB = s * sum(g h)`` (a 1 x 1 weight
    gradient) and ``dA = s * conv_weight_grad(x, gB)`` (a weight gradient with r output channels)."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                bias: torch.Tensor | None, scale: float, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> torch.Tensor:
        nd = A.dim() - 2
        with torch.autocast(x.device.type, enabled=False):  # the factors' dtype, also under autocast
            h = _CONV_FN[nd](x.to(A.dtype), A, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.save_for_backward(x, h, A, B)  # x as the caller passed it
        ctx.scale, ctx.has_bias = scale, bias is not None
        ctx.conv = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        return output.detach()  # see _LowRankGradient

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, A, B = ctx.saved_tensors
        g2 = g.to(B.dtype)
        grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_a, grad_b = _conv_factor_grads(g2, x, h, A, B, ctx.conv, ctx.scale, ctx.needs_input_grad[2],
                                                ctx.needs_input_grad[3])
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = g2.sum([0, *range(2, g2.dim())])
        return g, None, grad_a, grad_b, grad_bias, None, None


class _DoraConvGradient(torch.autograd.Function):
    """:class:`_DoraGradient` for convolutions: the conv ran with ``W' = g * (W + s dW)`` folded in;
    left are ``dm = sum dy (y - b) / m`` over batch and space, and :class:`_ConvLowRankGradient`'s
    ``dA``, ``dB`` with ``dy`` scaled by ``g`` per output channel."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                magnitude: torch.Tensor, bias: torch.Tensor | None, scale: float, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d,
                g: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        nd = A.dim() - 2
        shape = (1, -1, *[1] * nd)
        with torch.autocast(x.device.type, enabled=False):
            h = _CONV_FN[nd](x.to(A.dtype), A, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        y = output.detach()
        unbiased = ((y - offset.view(shape) if offset is not None else y.clone())
                    if ctx.needs_input_grad[4] else None)  # a copy: the caller may change the output in place
        ctx.save_for_backward(x, h, A, B, magnitude, g, unbiased)
        ctx.scale, ctx.has_bias, ctx.shape = scale, bias is not None, shape
        ctx.conv = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, A, B, magnitude, g, unbiased = ctx.saved_tensors
        g2 = grad.to(B.dtype)
        reduce = [0, *range(2, g2.dim())]
        grad_a = grad_b = grad_m = grad_bias = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:  # the low-rank path is multiplied by g
            grad_a, grad_b = _conv_factor_grads(g2 * g.to(g2.dtype).view(ctx.shape), x, h, A, B, ctx.conv, ctx.scale,
                                                ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        if unbiased is not None:
            grad_m = (g2 * unbiased.to(g2.dtype)).sum(reduce) / magnitude
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = g2.sum(reduce)
        return grad, None, grad_a, grad_b, grad_m, grad_bias, None, None, None, None


class _LoRAAdapter(peftkit.Adapter):
    """What every LoRA adapter shares: its ``lora_B`` factors are the output side (LoRA+); with a
    PiSSA/OLoRA start, frozen copies of the starting factors (``lora_A0``, ``lora_B0``) so that the
    adapter's change is ``s (B A - B0 A0)``, zero at the start, on the unchanged backbone."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def output_side_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.rpartition(".")[2] == "lora_B"]

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's input after its dropout, which acts while training (autograd on) only: without
        autograd an adapter applies in weight space, where there is none, and a mixed batch's rows
        must give the same (a model in training mode called under no_grad, as a server may)."""
        dropout = getattr(self, "dropout", None)
        return dropout(x) if isinstance(dropout, nn.Module) and torch.is_grad_enabled() else x

    def _start_from_weight(self, w2d: torch.Tensor, scale: float, init: str | bool) -> None:
        """Set A and B from the (rows, cols) weight (PiSSA, OLoRA) and keep frozen copies of them."""
        a, b = _factors_from_weight(w2d, self.lora_A.shape[0], scale, init)
        with torch.no_grad():
            self.lora_A.copy_(a.reshape(self.lora_A.shape))
            self.lora_B.copy_(b.reshape(self.lora_B.shape))
        # not in state_dict(): the file holds the factors together (file_state), an ordinary LoRA
        self.register_buffer("lora_A0", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("lora_B0", self.lora_B.detach().clone(), persistent=False)

    def shipped_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the adapter's whole change: ``[A; A0]`` and ``[B, -B0]`` after a PiSSA/OLoRA start."""
        a0, b0 = getattr(self, "lora_A0", None), getattr(self, "lora_B0", None)
        if a0 is None or b0 is None:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, a0]), torch.cat([self.lora_B, -b0], 1)

    def file_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.state_dict())
        if getattr(self, "lora_A0", None) is not None:  # an ordinary LoRA of rank 2r, same change
            a, b = self.shipped_factors()
            state["lora_A"], state["lora_B"] = a.detach(), b.detach()
        return state


class LowRank(nn.Module):
    """A low-rank delta for one 2-D weight (out x in), optionally with a bias delta."""

    lora_A: nn.Parameter  # (r, in), set by _init_pair
    lora_B: nn.Parameter  # (out, r)

    def __init__(self, in_f: int, out_f: int, r: int, scale: float, like: torch.Tensor, init: str | bool,
                 bias: bool, dora_of: torch.Tensor | None = None) -> None:
        super().__init__()
        _init_pair(self, (r, in_f), (out_f, r), like, init)
        self.scale = scale
        self.lora_bias = nn.Parameter(torch.zeros(out_f, device=like.device, dtype=like.dtype)) if bias else None
        # DoRA on the weight ``dora_of``: a magnitude per output
        self.lora_magnitude = nn.Parameter(dora_magnitude(dora_of, self.weight_delta())) if dora_of is not None else None

    def weight_delta(self) -> LowRankDelta:
        return LowRankDelta(self.lora_B, self.lora_A, self.scale)  # (out, in)

    def delta_for(self, base: torch.Tensor) -> Delta:
        """The change to ``base``: ``s B A``, or with DoRA ``m * (W + s B A) / ||W + s B A|| - W``."""
        if self.lora_magnitude is None:
            return self.weight_delta()
        return dora_delta(base, self.weight_delta(), self.lora_magnitude)[0]


class LinearLoRA(_LoRAAdapter):
    """LoRA on a Linear (or transposed Conv1D) layer; with DoRA, also a magnitude per output."""

    lora_A: nn.Parameter  # (r, in), set by _init_pair
    lora_B: nn.Parameter  # (out, r)

    def __init__(self, module: nn.Module, r: int, scale: float, dropout: float, init: str | bool, bias: bool,
                 transposed: bool, dora: bool = False) -> None:
        super().__init__()
        raw = _tensor(module, "weight")
        # a quantized weight is dequantized (the float one it stands for) only where its values are read
        w = dequantize(raw, module) if _data_init(init) or dora else None
        like = w if w is not None else torch.empty(0, device=raw.device, dtype=logical_dtype(module, raw))
        shape = w.shape if w is not None else logical_shape(module, "weight", raw)
        in_f, out_f = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
        _init_pair(self, (r, in_f), (out_f, r), like, init)
        self.scale = scale
        self.transposed = transposed
        if w is not None and _data_init(init):
            self._start_from_weight(w.T if transposed else w, scale, init)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        has_bias = bias and getattr(module, "bias", None) is not None
        self.lora_bias = nn.Parameter(torch.zeros(out_f, device=like.device, dtype=like.dtype)) if has_bias else None
        self.lora_magnitude = (nn.Parameter(dora_magnitude(w, self._low_rank(), transposed=transposed))
                               if w is not None and dora else None)  # (out,): ||W + s B A|| per output at init, so DoRA starts as LoRA
        self._folded_scale: torch.Tensor | None = None  # DoRA's g from delta(), for fold_gradient on the same call

    def _low_rank(self) -> LowRankDelta:
        A, B = self.shipped_factors()  # the weight is (out, in), or (in, out) when transposed
        return LowRankDelta(A.T, B.T, self.scale) if self.transposed else LowRankDelta(B, A, self.scale)

    def _dora_scale(self, module: nn.Module) -> torch.Tensor:
        """DoRA's ``g = m / ||W + s B A||`` per output, the norm without gradient."""
        assert self.lora_magnitude is not None
        with torch.no_grad():
            w = dequantize(_tensor(module, "weight"), module)
            n = _norms(add_delta(w, detach_delta(self._low_rank())), 1, self.transposed)
        return self.lora_magnitude / n

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs["input"]
        A, B = self.shipped_factors()
        xa = F.linear(self.dropped(x), A)  # (..., r)
        out = _add_low_rank(output, xa, B, self.scale)
        if self.lora_magnitude is not None:  # g * (x W^T + s x A^T B^T) + b, from the layer's own output
            g = self._dora_scale(module).to(out.dtype)
            b = getattr(module, "bias", None)
            out = out * g if b is None else torch.addcmul(b * (1 - g), out, g)
        return out + self.lora_bias if self.lora_bias is not None else out

    @classmethod
    def transform_rows(cls, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any,
                       adapters: Sequence[peftkit.Adapter], index: torch.Tensor) -> Any:
        """Every row's own LoRA in two batched products (BGMV, as Punica and S-LoRA serve LoRA): the
        factors are stacked (zero-padded to the largest rank, the scale folded into B, zeros for rows
        without an adapter) and gathered per row; the cost is one LoRA over the batch, whatever the
        number of adapters. DoRA's per-output scale and the bias deltas are gathered the same way."""
        x = args[0] if args else kwargs.get("input")
        drops = {a.dropout.p if isinstance(a.dropout, nn.Dropout) else 0.0 for a in adapters if isinstance(a, LinearLoRA)}
        if (not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or x.dim() < 2 or len(drops) != 1
                or not all(isinstance(a, LinearLoRA) for a in adapters)):
            return NotImplemented
        loras = [a for a in adapters if isinstance(a, LinearLoRA)]
        factors = [a.shipped_factors() for a in loras]
        rank = max(A.shape[0] for A, _ in factors)
        dtype = output.dtype
        # (n + 1, rank, in) and (n + 1, out, rank): the last slot, all zeros, serves index -1
        As = torch.stack([*(F.pad(A.to(dtype), (0, 0, 0, rank - A.shape[0])) for A, _ in factors),
                          factors[0][0].new_zeros((rank, x.shape[-1]), dtype=dtype)])
        Bs = torch.stack([*(F.pad(B.to(dtype) * a.scale, (0, rank - B.shape[1])) for a, (_, B) in zip(loras, factors, strict=True)),
                          factors[0][1].new_zeros((output.shape[-1], rank), dtype=dtype)])
        at = torch.where(index < 0, len(loras), index)
        rows = x.shape[0]
        h = torch.bmm(loras[0].dropped(x).to(dtype).reshape(rows, -1, x.shape[-1]), As[at].transpose(1, 2))
        # the product added in the same pass over the output (a separate add costs a fifth of a MiniLM forward)
        out = torch.baddbmm(output.reshape(rows, -1, output.shape[-1]), h, Bs[at].transpose(1, 2)).view(output.shape)
        per_row = (rows,) + (1,) * (output.dim() - 2) + (output.shape[-1],)  # broadcasts over the middle dims
        if any(a.lora_magnitude is not None for a in loras):
            ones = output.new_ones(output.shape[-1])
            g = torch.stack([*(a._dora_scale(module).to(dtype) if a.lora_magnitude is not None else ones for a in loras),
                             ones])[at].view(per_row)
            b = getattr(module, "bias", None)
            out = out * g if b is None else torch.addcmul(b.to(dtype) * (1 - g), out, g)
        if any(a.lora_bias is not None for a in loras):
            zeros = output.new_zeros(output.shape[-1])
            out = out + torch.stack([*(a.lora_bias.to(dtype) if a.lora_bias is not None else zeros for a in loras),
                                     zeros])[at].view(per_row)
        return out

    def folds_in_training(self, module: nn.Module, args: tuple[Any, ...] = (),
                          kwargs: dict[str, Any] | None = None) -> bool:
        if not isinstance(self.dropout, nn.Identity):  # dropout on the adapter's input has no weight form
            return False
        x = args[0] if args else (kwargs or {}).get("input")
        if not isinstance(x, torch.Tensor):
            return True
        # The fold adds r*in*out multiply-adds to form W + s*B@A and keeps that weight for the
        # backward; the output form costs about r*(in + out) per token more than the fold and keeps
        # only (tokens, r). Fold only for calls with at least in*out/(in + out) tokens: then it is the
        # cheaper form, and the folded weight is no larger than the call's input and output
        # activations. Fewer tokens (LLM fine-tuning in small batches, QLoRA) would otherwise hold a
        # copy of every adapted weight until the backward: 0.7 GB on a 0.44 B Llama (benchmarks/).
        out_f, in_f = self.lora_B.shape[0], self.lora_A.shape[1]
        tokens = x.numel() // max(in_f, 1)
        return tokens * (in_f + out_f) >= in_f * out_f

    def fold_gradient(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs["input"]
        if self.lora_magnitude is None:
            return _LowRankGradient.apply(output, x, self.lora_A, self.lora_B, self.lora_bias, self.scale)
        # DoRA scales the weight only: the bias the layer added is its bias now (bias deltas substituted
        # in); g is the one its folded weight used, from delta(): the layer's weight is that folded
        # weight now, not W
        bias = getattr(module, "bias", None)
        offset = bias.detach() if isinstance(bias, torch.Tensor) else None
        assert self._folded_scale is not None, "fold_gradient follows delta() on the same call"
        g, self._folded_scale = self._folded_scale, None
        return _DoraGradient.apply(output, x, self.lora_A, self.lora_B, self.lora_magnitude, self.lora_bias,
                                   self.scale, g, offset)

    def delta(self, module: nn.Module) -> dict[str, Delta]:
        d: Delta = self._low_rank()
        if self.lora_magnitude is not None:
            d, g = dora_delta(dequantize(_tensor(module, "weight"), module), d, self.lora_magnitude,
                              self.transposed)
            self._folded_scale = g.detach()
        deltas: dict[str, Delta] = {"weight": d}
        if self.lora_bias is not None:
            deltas["bias"] = self.lora_bias
        return deltas


class ConvLoRA(_LoRAAdapter):
    """LoRA on a Conv1d/2d/3d: a k x k conv in -> r then a 1 x 1 conv r -> out, both per group."""

    lora_A: nn.Parameter  # (r, in/groups, *kernel), set by _init_pair
    lora_B: nn.Parameter  # (out, r/groups, 1, ...)

    def __init__(self, module: nn.Conv1d | nn.Conv2d | nn.Conv3d, r: int, scale: float, dropout: float,
                 init: str | bool, bias: bool, dora: bool = False) -> None:
        super().__init__()
        g = module.groups
        self.rank = g * math.ceil(r / g)  # at least one rank per group, so the delta keeps the group structure
        nd = len(module.kernel_size)
        w = module.weight
        _init_pair(self, (self.rank, module.in_channels // g, *module.kernel_size),
                   (module.out_channels, self.rank // g, *([1] * nd)), w, init)
        self.scale = scale
        if _data_init(init):
            if g > 1:
                raise TargetError(f"lora init={init!r} starts from a weight's decomposition, which a grouped "
                                  "convolution's block structure does not keep; leave grouped convs out of targets")
            self._start_from_weight(w.reshape(w.shape[0], -1), scale, init)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        has_bias = bias and module.bias is not None
        self.lora_bias = nn.Parameter(torch.zeros(module.out_channels, device=w.device, dtype=w.dtype)) if has_bias else None
        self.lora_magnitude = nn.Parameter(dora_magnitude(w, self._low_rank(module))) if dora else None  # (out,)
        self._folded_scale: torch.Tensor | None = None  # DoRA's g from delta(), for fold_gradient on the same call

    def _low_rank(self, module: nn.Module) -> Delta:
        conv = _conv(module)
        g = conv.groups
        out_c = self.lora_B.shape[0]
        if g == 1:
            A, B = self.shipped_factors()
            return LowRankDelta(B.reshape(out_c, -1), A.reshape(A.shape[0], -1), self.scale)
        a = self.lora_A.reshape(g, self.rank // g, -1)  # (g, r/g, in/g * k...)
        b = self.lora_B.reshape(g, out_c // g, self.rank // g)  # (g, out/g, r/g)
        return self.scale * torch.bmm(b, a).reshape(conv.weight.shape)  # (out, in/g, k...)

    @property
    def train_in_weight_space(self) -> bool:
        # W + s*B@A costs one weight gradient; the two extra convolutions over full-size activations
        # of the output-space form cost as much or more on CPU (benchmarks/: 108 vs 176 ms a step on
        # the demo's ResNet, a tie on resnet18 at 224 px). Dropout needs the activations.
        return isinstance(self.dropout, nn.Identity)

    def folds_in_training(self, module: nn.Module, args: tuple[Any, ...] = (),
                          kwargs: dict[str, Any] | None = None) -> bool:
        # The fold's r-channel convolutions beat a full weight gradient on k x k convs over 64 or
        # more input channels (resnet18's 3 x 3 layers, batch 32: 1.1-1.2x the frozen layer's step
        # instead of 1.4-1.7x; a tie at 64). A weight gradient stays cheaper on 1 x 1 convs, on
        # 3-channel stems and on 16-32 channels (the demo's ResNet: 10.0 vs 7.1 ms a layer), where
        # r-channel convolutions run at a fraction of the kernels' speed (measured on CPU).
        conv = _conv(module)
        return (isinstance(self.dropout, nn.Identity) and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str) and math.prod(conv.kernel_size) > 1
                and conv.in_channels // conv.groups >= 64)

    def fold_gradient(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs["input"]
        conv = _conv(module)
        if self.lora_magnitude is None:
            return _ConvLowRankGradient.apply(output, x, self.lora_A, self.lora_B, self.lora_bias, self.scale, conv)
        offset = conv.bias.detach() if conv.bias is not None else None  # its bias now: bias deltas substituted in
        assert self._folded_scale is not None, "fold_gradient follows delta() on the same call"
        g, self._folded_scale = self._folded_scale, None  # from delta(): the conv's weight is the folded one now
        return _DoraConvGradient.apply(output, x, self.lora_A, self.lora_B, self.lora_magnitude, self.lora_bias,
                                       self.scale, conv, g, offset)

    @classmethod
    def transform_rows(cls, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any,
                       adapters: Sequence[peftkit.Adapter], index: torch.Tensor) -> Any:
        """Every row's own LoRA at once: one grouped convolution over the rows with an adapter of
        this class (row ``i`` is group ``i``, convolved with its adapter's ``A``, zero-padded to the
        largest rank) and one batched product with each row's ``B`` added into the output. Ungrouped
        convolutions with zero padding; plain LoRA (DoRA and bias deltas run per adapter). On
        resnet18 at batch 32 with 8 adapters: 1.18x the one-adapter call, against 1.34x per adapter."""
        x = args[0] if args else kwargs.get("input")
        conv = _conv(module)
        convs = [a for a in adapters if isinstance(a, ConvLoRA)]
        drops = {a.dropout.p if isinstance(a.dropout, nn.Dropout) else 0.0 for a in convs}
        if (len(convs) != len(adapters) or len(drops) != 1 or conv.groups != 1 or conv.padding_mode != "zeros"
                or not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or x.dim() != output.dim()
                or any(a.lora_magnitude is not None or a.lora_bias is not None for a in convs)):
            return NotImplemented
        factors = [a.shipped_factors() for a in convs]
        rank = max(A.shape[0] for A, _ in factors)
        dtype = output.dtype
        zero_a = factors[0][0].new_zeros((rank, *factors[0][0].shape[1:]), dtype=dtype)
        As = torch.stack([torch.cat([A.to(dtype), zero_a[:rank - A.shape[0]]]) for A, _ in factors])  # (n, rank, in, k...)
        Bs = torch.stack([F.pad(B.to(dtype).reshape(B.shape[0], -1) * a.scale, (0, rank - B.shape[1]))
                          for a, (_, B) in zip(convs, factors, strict=True)])  # (n, out, rank)
        nd = x.dim() - 2
        sel = torch.nonzero(index >= 0).flatten()  # the rows with an adapter of this class: only those convolve
        every = sel.numel() == x.shape[0]
        at, xs = (index, x) if every else (index[sel], x.index_select(0, sel))
        rows = xs.shape[0]
        weight = As[at].reshape(rows * rank, *As.shape[2:])  # (rows * rank, in, k...)
        h = _CONV_FN[nd](convs[0].dropped(xs).to(dtype).reshape(1, -1, *x.shape[2:]), weight, None, conv.stride,
                         conv.padding, conv.dilation, rows)  # (1, rows * rank, *spatial_out)
        if every:  # the product added in the same pass over the output
            return torch.baddbmm(output.reshape(rows, output.shape[1], -1), Bs[at], h.reshape(rows, rank, -1)
                                 ).view(output.shape)
        delta = torch.bmm(Bs[at], h.reshape(rows, rank, -1)).view(rows, *output.shape[1:])
        return output.index_add(0, sel, delta)

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs["input"]
        conv = _conv(module)
        A, B = self.shipped_factors()
        h = conv._conv_forward(self.dropped(x), A, None)  # (N, r, *spatial_out), same stride/padding
        h = _CONV_FN[A.dim() - 2](h, B, groups=conv.groups)  # (N, out, *spatial_out)
        out = output + self.scale * h
        if self.lora_magnitude is not None:  # g * (conv(x, W) + s * lora(x)) + b, from the layer's own output
            with torch.no_grad():
                n = _norms(add_delta(conv.weight, detach_delta(self._low_rank(conv))), 1, False)
            g = (self.lora_magnitude / n).to(out.dtype).view(-1, *([1] * (out.dim() - 2)))
            b = conv.bias
            out = out * g if b is None else torch.addcmul(b.view_as(g) * (1 - g), out, g)
        if self.lora_bias is not None:
            out = out + self.lora_bias.view(-1, *([1] * (out.dim() - 2)))
        return out

    def delta(self, module: nn.Module) -> dict[str, Delta]:
        d = self._low_rank(module)
        if self.lora_magnitude is not None:
            d, g = dora_delta(_conv(module).weight, d, self.lora_magnitude)
            self._folded_scale = g.detach()
        deltas: dict[str, Delta] = {"weight": d}
        if self.lora_bias is not None:
            deltas["bias"] = self.lora_bias
        return deltas


class EmbeddingLoRA(_LoRAAdapter):
    """LoRA on an Embedding: rows of ``A.T`` (num x r) are looked up, then projected by ``B``."""

    lora_A: nn.Parameter  # (r, num), set by _init_pair
    lora_B: nn.Parameter  # (dim, r)

    def __init__(self, module: nn.Embedding, r: int, scale: float, init: str | bool, dora: bool = False) -> None:
        super().__init__()
        _init_pair(self, (r, module.num_embeddings), (module.embedding_dim, r), module.weight, init, embedding=True)
        self.scale = scale
        # DoRA: a magnitude per embedding dimension, the norm over the vocabulary (as PEFT)
        self.lora_magnitude = (nn.Parameter(dora_magnitude(module.weight, self._low_rank(), transposed=True))
                               if dora else None)  # (dim,)

    def _low_rank(self) -> LowRankDelta:
        return LowRankDelta(self.lora_A.T, self.lora_B.T, self.scale)  # (num, dim)

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        idx = args[0] if args else kwargs["input"]
        assert isinstance(module, nn.Embedding), f"lora's EmbeddingLoRA is on a {type(module).__name__}"  # by build()
        h = F.embedding(idx, self.lora_A.T, padding_idx=module.padding_idx)  # (..., r)
        out = _add_low_rank(output, h, self.lora_B, self.scale)  # (..., dim)
        if self.lora_magnitude is not None:
            with torch.no_grad():
                n = _norms(add_delta(module.weight, detach_delta(self._low_rank())), 1, True)
            out = out * (self.lora_magnitude / n).to(out.dtype)
        return out

    def delta(self, module: nn.Module) -> dict[str, Delta]:
        if self.lora_magnitude is not None:
            assert isinstance(module, nn.Embedding)
            return {"weight": dora_delta(module.weight, self._low_rank(), self.lora_magnitude, transposed=True)[0]}
        return {"weight": self._low_rank()}


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
_MHA_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
                 "is_causal": False}


def _mha_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """nn.MultiheadAttention.forward's arguments by name."""
    call = dict(_MHA_DEFAULTS)
    call.update(zip(_MHA_ARGS, args, strict=False))  # stands_in refuses extra positionals
    call.update(kwargs)
    return call


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not allowed to attend) as an additive float mask, as the module makes it."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _folded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, part: LowRank,
                   rows: slice = slice(None)) -> torch.Tensor:
    """``F.linear`` with ``part``'s delta folded into the weight, carrying its fold gradient; ``rows``:
    the block of the (packed) weight that this projection uses."""
    whole = rows == slice(None)
    B = part.lora_B if whole else part.lora_B[rows]  # a view: its gradient lands in lora_B's rows
    lora_bias = part.lora_bias if whole or part.lora_bias is None else part.lora_bias[rows]
    w = add_delta(weight if whole else weight[rows], LowRankDelta(B.detach(), part.lora_A.detach(), part.scale))
    if bias is not None and not whole:
        bias = bias[rows]
    if lora_bias is not None:
        bias = lora_bias.detach() if bias is None else bias + lora_bias.detach()
    out = F.linear(x, w, bias)
    folded: torch.Tensor = _LowRankGradient.apply(out, x, part.lora_A, B, lora_bias, part.scale)
    return folded


class MultiheadAttentionLoRA(_LoRAAdapter):
    """LoRA on nn.MultiheadAttention: on its packed (or separate) in-projection and its out_proj.

    The module reads these weights directly, inside one functional call, so outside training this
    adapter works in weight space. While training, with the packed projection, it stands in for
    the module's forward (:meth:`stand_in`): the same attention, with both projections folded
    and LoRA's fold gradient, instead of two full weight gradients.
    """

    in_proj: LowRank  # the packed in-projection's (else q_proj, k_proj and v_proj)
    q_proj: LowRank
    k_proj: LowRank
    v_proj: LowRank

    def __init__(self, module: nn.MultiheadAttention, r: int, scale: float, init: str | bool, bias: bool,
                 dora: bool = False) -> None:
        super().__init__()
        E = module.embed_dim
        like = module.out_proj.weight

        def of(name: str) -> torch.Tensor | None:  # the weight a DoRA magnitude is measured on
            return module.get_parameter(name) if dora else None

        if module._qkv_same_embed_dim:
            self.in_proj = LowRank(E, 3 * E, r, scale, like, init, bias and module.in_proj_bias is not None,
                                   of("in_proj_weight"))
        else:
            self.q_proj = LowRank(E, E, r, scale, like, init, False, of("q_proj_weight"))
            self.k_proj = LowRank(module.kdim, E, r, scale, like, init, False, of("k_proj_weight"))
            self.v_proj = LowRank(module.vdim, E, r, scale, like, init, False, of("v_proj_weight"))
        self.out_proj = LowRank(E, E, r, scale, like, init, bias and module.out_proj.bias is not None,
                                of("out_proj.weight"))
        self.dora = dora

    def delta(self, module: nn.Module) -> dict[str, Delta]:
        deltas: dict[str, Delta] = {}
        for name, tensor in (("in_proj", "in_proj_weight"), ("q_proj", "q_proj_weight"),
                             ("k_proj", "k_proj_weight"), ("v_proj", "v_proj_weight"), ("out_proj", "out_proj.weight")):
            part = getattr(self, name, None)
            if part is None:
                continue
            deltas[tensor] = part.delta_for(module.get_parameter(tensor))
            if part.lora_bias is not None:
                deltas["in_proj_bias" if name == "in_proj" else "out_proj.bias"] = part.lora_bias
        return deltas

    def stands_in(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Batched attention with the packed projection (self-attention, or cross-attention with
        ``key`` and ``value`` from one batch) and no ``bias_k``/``add_zero_attn``; bool or float
        masks of the shapes the module accepts. Any other call runs the module itself, which also
        raises its own errors for bad inputs."""
        m = _mha(module)
        if self.dora or not hasattr(self, "in_proj") or m.bias_k is not None or m.add_zero_attn:
            return False  # DoRA trains in weight space
        if len(args) > len(_MHA_ARGS) or set(kwargs) - set(_MHA_ARGS):
            return False
        c = _mha_call(args, kwargs)
        q, k, v = c["query"], c["key"], c["value"]
        if not all(isinstance(t, torch.Tensor) and t.dim() == 3 and not t.is_nested and t.shape[-1] == m.embed_dim
                   for t in (q, k, v)):
            return False
        batch = 0 if m.batch_first else 1
        n, length, source = q.shape[batch], q.shape[1 - batch], k.shape[1 - batch]
        if k.shape != v.shape or k.shape[batch] != n:
            return False
        am, kpm = c["attn_mask"], c["key_padding_mask"]
        if c["is_causal"] and am is None:
            return False  # the module's own error
        ok_dtype = all(t is None or t.dtype == torch.bool or t.dtype == q.dtype for t in (am, kpm))
        ok_am = am is None or tuple(am.shape) in ((length, source), (n * m.num_heads, length, source))
        ok_kpm = kpm is None or tuple(kpm.shape) == (n, source)
        return ok_dtype and ok_am and ok_kpm

    def stand_in(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What ``F.multi_head_attention_forward`` computes, with LoRA folded into both projections
        (see :class:`_LowRankGradient`): one packed in-projection for self-attention, else one per
        distinct input, on its rows of the packed weight."""
        m = _mha(module)
        c = _mha_call(args, kwargs)
        x, key, value = c["query"], c["key"], c["value"]
        heads, E = m.num_heads, m.embed_dim
        D = E // heads
        batch = 0 if m.batch_first else 1
        n, length, source = x.shape[batch], x.shape[1 - batch], key.shape[1 - batch]
        w, b = m.in_proj_weight, m.in_proj_bias
        assert w is not None, "stands_in() takes the packed in-projection only"
        # torch.unflatten(t, ...): what t.unflatten(...) runs (Tensor.unflatten has no annotations)
        if x is key is value:
            qkv = _folded_linear(x, w, b, self.in_proj)
            q, k, v = torch.unflatten(qkv, -1, (3, heads, D)).unbind(-3)
        elif key is value:
            q = torch.unflatten(_folded_linear(x, w, b, self.in_proj, slice(0, E)), -1, (heads, D))
            kv = _folded_linear(key, w, b, self.in_proj, slice(E, 3 * E))
            k, v = torch.unflatten(kv, -1, (2, heads, D)).unbind(-3)
        else:
            q, k, v = (torch.unflatten(_folded_linear(t, w, b, self.in_proj, slice(i * E, (i + 1) * E)), -1, (heads, D))
                       for i, t in enumerate((x, key, value)))
        order = (0, 2, 1, 3) if m.batch_first else (1, 2, 0, 3)  # -> (n, heads, length, D)
        q, k, v = q.permute(order), k.permute(order), v.permute(order)

        need_weights, is_causal = c["need_weights"], c["is_causal"]
        am, kpm = _additive_mask(c["attn_mask"], x.dtype), _additive_mask(c["key_padding_mask"], x.dtype)
        if is_causal and kpm is None and not need_weights:
            am = None  # the hint alone, as the module passes it to SDPA
        else:
            is_causal = False
        if am is not None:
            am = am.view(n, heads, length, source) if am.dim() == 3 else am
        if kpm is not None:
            kpm = kpm.view(n, 1, 1, source)
            am = kpm if am is None else am + kpm
        p = m.dropout if m.training else 0.0

        weights = None
        if need_weights:
            scores = torch.matmul(q * math.sqrt(1.0 / D), k.transpose(-2, -1))
            weights = torch.softmax(scores if am is None else scores + am, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            attn = torch.matmul(weights, v)
            if c["average_attn_weights"]:
                weights = weights.mean(dim=1)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, am, p, is_causal)
        attn = attn.transpose(1, 2) if m.batch_first else attn.permute(2, 0, 1, 3)
        out = _folded_linear(attn.reshape(*attn.shape[:2], E), m.out_proj.weight, m.out_proj.bias, self.out_proj)
        return out, weights


class RecurrentLoRA(_LoRAAdapter):
    """LoRA on an LSTM/GRU/RNN: one low-rank delta per weight matrix (``weight_ih_l0``,
    ``weight_hh_l0_reverse``, ``weight_hr_l1``, ...), each (gates x hidden, in).

    Weight space only: the core substitutes ``W + s * B @ A`` for the module's weights for the
    duration of its forward, so the module runs its own fused (cuDNN, MKL-DNN) kernels. With
    ``bias``, each input weight's delta carries a delta on the matching ``bias_ih``.
    """

    def __init__(self, module: nn.RNNBase, r: int, scale: float, init: str | bool, bias: bool,
                 dora: bool = False) -> None:
        super().__init__()
        self.parts = nn.ModuleDict()
        for name in _recurrent_weights(module):
            w = _tensor(module, name)
            bias_name = name.replace("weight_ih", "bias_ih")
            with_bias = bias and name.startswith("weight_ih") and isinstance(getattr(module, bias_name, None), torch.Tensor)
            self.parts[name] = LowRank(w.shape[1], w.shape[0], r, scale, w, init, with_bias, w if dora else None)

    def delta(self, module: nn.Module) -> dict[str, Delta]:
        deltas: dict[str, Delta] = {}
        for name, part in self.parts.items():
            assert isinstance(part, LowRank)
            deltas[name] = part.delta_for(_tensor(module, name))
            if part.lora_bias is not None:
                deltas[name.replace("weight_ih", "bias_ih")] = part.lora_bias
        return deltas


class _Pair(nn.Module):
    """One parameter's factors, set by _init_pair."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_magnitude: nn.Parameter | None


class ParameterLoRA(_LoRAAdapter):
    """LoRA on parameters a module reads itself (``targets=["pos_embed", "experts.w1"]``), for custom
    layers whose forward uses ``self.weight`` directly, learned embeddings and stacked experts.

    By shape: (rows, cols) gets ``B @ A``; (n, rows, cols), e.g. mixture-of-experts weights, gets one
    ``B[i] @ A[i]`` per leading index (``A`` (n, r, cols), ``B`` (n, rows, r)); four or more dims
    are taken as (dim 0, the rest), as for a convolution's weight. Weight space only: the core
    substitutes the adapted tensor for the module's own while the module runs.
    """

    def __init__(self, module: nn.Module, names: list[str], r: int, scale: float, init: str | bool,
                 dora: bool = False) -> None:
        super().__init__()
        self.scale = scale
        self.parts = nn.ModuleDict()
        self.dims: dict[str, int] = {}  # each parameter's number of dims
        for name in names:
            t = module._parameters.get(name)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{type(module).__name__} holds no parameter {name!r} of its own")  # a file's spec
            if t.dim() < 2:
                raise TargetError(f"lora cannot adapt parameter {name!r} of shape {tuple(t.shape)}: a low-rank delta "
                                  "needs 2 or more dims. Train it whole (train=[its module]) or with bias='all'.")
            part = _Pair()
            self.dims[name] = t.dim()
            if t.dim() == 3:  # one low-rank delta per leading index (expert)
                n, rows, cols = t.shape
                _init_pair(part, (n, r, cols), (n, rows, r), t, init)
                with torch.no_grad():
                    for i in range(n):  # each expert's pair initialised as a 2-D layer's (its own fan-in)
                        _init_2d(part.lora_A[i], part.lora_B[i], init)
            else:
                _init_pair(part, (r, math.prod(t.shape[1:])), (t.shape[0], r), t, init)
            # DoRA: a magnitude per row ((n, rows) for experts), the norm over the rest
            part.lora_magnitude = (nn.Parameter(dora_magnitude(t, self._low_rank(part), k=2 if t.dim() == 3 else 1))
                                   if dora else None)
            self.parts[name] = part

    def delta(self, module: nn.Module) -> dict[str, Delta]:
        deltas: dict[str, Delta] = {}
        for name, part in self.parts.items():
            assert isinstance(part, _Pair)
            d = self._low_rank(part)
            if part.lora_magnitude is not None:
                d = dora_delta(module.get_parameter(name), d, part.lora_magnitude)[0]
            deltas[name] = d
        return deltas

    def _low_rank(self, part: _Pair) -> Delta:
        A, B = part.lora_A, part.lora_B
        if A.dim() == 3:
            return torch.bmm(B, A).mul(self.scale)  # (n, rows, cols)
        return LowRankDelta(B, A, self.scale)  # shaped like the parameter by add_delta


class BiasDelta(peftkit.Adapter):
    """A trainable delta on a module's bias only (``bias="all"`` on modules that are not targets)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.lora_bias = nn.Parameter(torch.zeros_like(_tensor(module, "bias"), requires_grad=False))

    def delta(self, module: nn.Module) -> dict[str, Delta]:
        return {"bias": self.lora_bias}


def _as_low_rank(adapter: peftkit.Adapter, module: nn.Module) -> LowRankDelta:
    """A Linear, ungrouped conv or Embedding LoRA's whole change as ``scale * left @ right``."""
    d = adapter._low_rank(module) if isinstance(adapter, ConvLoRA) else adapter._low_rank()  # type: ignore[operator]
    assert isinstance(d, LowRankDelta)
    return d


def _from_low_rank(like: _LoRAAdapter, left: torch.Tensor, right: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``lora_A``/``lora_B`` values (``like``'s kind and layout, rank ``left.shape[1]``) whose
    change at scale 1 is ``left @ right``: the inverse of each kind's ``_low_rank``."""
    r = left.shape[1]
    A, B = like.lora_A, like.lora_B
    if isinstance(like, LinearLoRA) and like.transposed or isinstance(like, EmbeddingLoRA):
        a, b = left.T, right.T  # the weight is (in, out): left = A^T, right = B^T
    else:
        a, b = right.reshape(r, *A.shape[1:]), left.reshape(B.shape[0], r, *B.shape[2:])
    return {"lora_A": a.to(A.dtype).contiguous(), "lora_B": b.to(B.dtype).contiguous()}


class LoRA(peftkit.Method[LoraConfig]):
    """Low-rank adaptation: W + (alpha/r) B A on Linear, Conv, Embedding, attention and LSTM/GRU/RNN layers."""

    name = "lora"
    Config = LoraConfig
    learning_rate = 1e-3
    adapts_parameters = True  # targets=["pos_embed", "experts.w1"]: ParameterLoRA

    def can_adapt(self, module: nn.Module) -> bool:
        if isinstance(module, _CONVS):
            return True
        return isinstance(module, (nn.Linear, nn.Embedding, nn.MultiheadAttention, nn.RNNBase)) or _is_hf_conv1d(module)

    def default_targets(self, model: nn.Module) -> list[str]:
        """Every Linear/Conv layer (and MultiheadAttention, LSTM, GRU, RNN) except the output layer(s);
        depthwise convs are skipped (a per-channel k x k filter has no low-rank structure to exploit)."""
        heads = output_layers(model).all  # the output layer, or every layer producing an output
        paths = []
        for path, m in model.named_modules():
            if not path or path in heads:
                continue
            if isinstance(m, _CONVS) and m.groups > 1 and m.in_channels == m.groups:
                continue
            if (isinstance(m, (nn.Linear, *_CONVS, nn.MultiheadAttention, nn.RNNBase)) or _is_hf_conv1d(m)) and _own_weight(m):
                paths.append(path)
        return paths

    def plan(self, context: peftkit.PlanContext) -> peftkit.Plan:
        """The selected targets, except an attention module's ``out_proj`` (its adapter covers it);
        with ``bias="all"``, also a bias-only delta on every other module with a bias."""
        model, paths = context.model, context.targets
        mha = {p for p in paths if isinstance(model.get_submodule(p), nn.MultiheadAttention)}
        kept = [p for p in paths if not (p.endswith(".out_proj") and p[: -len(".out_proj")] in mha)]
        specs: dict[str, dict[str, Any]] = {p: {} for p in kept}
        both = [o for o in context.parameters if o in specs]
        if both:
            raise TargetError(f"lora: targets select module {both[0]!r} and also parameters of it "
                              f"({', '.join(context.parameters[both[0]])}); select one or the other")
        specs.update({owner: {"parameters": list(names)} for owner, names in context.parameters.items()})
        if self.config.bias == "all":
            covered = set(kept) | {f"{p}.out_proj" for p in mha}
            specs.update({p: {"bias_only": True} for p, m in model.named_modules()
                          if p and p not in covered and isinstance(getattr(m, "bias", None), nn.Parameter)})
        return peftkit.Plan(specs)

    def file_method(self) -> peftkit.Method[Any]:
        """After a PiSSA/OLoRA start the file is an ordinary LoRA of rank 2r with the same scale
        (``[A; A0]``, ``[B, -B0]``): it loads on the untouched backbone with the same outputs."""
        c = self.config
        if not _data_init(c.init):
            return self
        factor = math.sqrt(2) if c.rslora else 2.0  # alpha' / r' (or / sqrt(r')) equals alpha / r
        return type(self)(replace(c, r=2 * c.r, alpha=c.alpha * factor, init="kaiming",
                                  rank_pattern={k: 2 * v for k, v in c.rank_pattern.items()},
                                  alpha_pattern={k: v * factor for k, v in c.alpha_pattern.items()}))

    def combine(self, how: str, parts: Mapping[str, Sequence[tuple[float, peftkit.Adapter]]],
                modules: Mapping[str, nn.Module], *, rank: int | None, density: float,
                generator: torch.Generator) -> Combination:
        """LoRA from LoRAs: ``linear`` and ``cat`` concatenate the factors (``[A_1; A_2]``,
        ``[w_1 s_1 B_1, w_2 s_2 B_2]``: the exact weighted sum, rank the sum of the ranks);
        ``svd``, ``ties`` and ``dare_*`` form each target's combined delta densely and keep its best
        rank-``rank`` approximation (default: the largest rank combined). Every target gets the
        largest rank of the result (zero-padded) and scale 1. On Linear (and Hugging Face Conv1D),
        ungrouped convolution and Embedding targets; plain LoRA (DoRA's magnitudes and bias deltas do
        not add up)."""
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path, members in parts.items():
            for _, a in members:
                if not isinstance(a, (LinearLoRA, ConvLoRA, EmbeddingLoRA)) or (
                        isinstance(a, ConvLoRA) and _conv(modules[path]).groups != 1):
                    raise ConfigError(f"lora cannot combine its adapters on {path!r} ({type(modules[path]).__name__}): "
                                      "combine works on Linear, ungrouped convolution and Embedding targets")
                if a.lora_magnitude is not None or getattr(a, "lora_bias", None) is not None:
                    raise ConfigError(f"lora cannot combine DoRA adapters or bias deltas (on {path!r}): their "
                                      "magnitudes and biases do not add up; combine plain LoRA adapters")
            lows = [(w, _as_low_rank(a, modules[path])) for w, a in members]
            if how in ("linear", "cat"):
                factors[path] = (torch.cat([(w * d.scale) * d.left.float() for w, d in lows], 1),
                                 torch.cat([d.right.float() for _, d in lows], 0))
            else:
                dense = merge_deltas([d.dense() for _, d in lows], [w for w, _ in lows], how, density, generator)
                wanted = rank or max(d.left.shape[1] for _, d in lows)
                factors[path] = low_rank_factors(dense, min(wanted, *dense.shape))  # no rank past the matrix's
        r = max(left.shape[1] for left, _ in factors.values())
        values = {}
        for path, (left, right) in factors.items():
            like = parts[path][0][1]
            assert isinstance(like, _LoRAAdapter)  # checked above
            pad = r - left.shape[1]
            left, right = F.pad(left, (0, pad)), F.pad(right, (0, 0, 0, pad))
            values[path] = _from_low_rank(like, left, right)
        # a Linear LoRA in (in, out) layout on a module that is not Hugging Face's Conv1D came from fan_in_fan_out
        flipped = any(isinstance(a, LinearLoRA) and a.transposed and not _is_hf_conv1d(modules[p])
                      for p, members in parts.items() for _, a in members)
        return Combination({"r": r, "alpha": float(r), "fan_in_fan_out": flipped}, values)

    def _pick(self, pattern: dict[str, Any], path: str, default: Any) -> Any:
        for key, value in pattern.items():
            if matches(key, path):
                return value
        return default

    def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
        c = self.config
        if _data_init(c.init) and not spec.get("bias_only") and not (
                isinstance(module, (nn.Linear, *_CONVS)) or _is_hf_conv1d(module)) or (
                _data_init(c.init) and "parameters" in spec):
            raise TargetError(f"lora init={c.init!r} starts Linear and convolution layers from their weights; "
                              f"{path!r} is a {type(module).__name__}: leave it out of targets (exclude=[...])")
        if "parameters" in spec:
            names = spec["parameters"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"spec 'parameters' must be a non-empty list of parameter names, got {names!r}")
            r = self._pick(c.rank_pattern, path, c.r)
            alpha = self._pick(c.alpha_pattern, path, c.alpha)
            return ParameterLoRA(module, names, r, alpha / math.sqrt(r) if c.rslora else alpha / r,
                                 "kaiming" if c.init is True else c.init, c.dora)
        if spec.get("bias_only"):
            if not isinstance(getattr(module, "bias", None), torch.Tensor):
                raise TargetError(f"lora cannot train a bias delta on {path!r}: it has no bias")
            return BiasDelta(module)
        if not _own_weight(module):
            raise TargetError(
                f"lora cannot adapt {path!r}: its weight is computed from other tensors on every call (a "
                "parametrization such as weight_norm), so there is no weight tensor to add the delta to. Leave it "
                "out of targets (exclude=[...]), or remove the parametrization first.")
        r = self._pick(c.rank_pattern, path, c.r)
        alpha = self._pick(c.alpha_pattern, path, c.alpha)
        scale = alpha / math.sqrt(r) if c.rslora else alpha / r
        init = "kaiming" if c.init is True else c.init
        bias = c.bias != "none"
        if isinstance(module, nn.MultiheadAttention):
            return MultiheadAttentionLoRA(module, r, scale, init, bias, c.dora)
        if isinstance(module, nn.RNNBase):
            return RecurrentLoRA(module, r, scale, init, bias, c.dora)
        if isinstance(module, _CONVS):
            return ConvLoRA(module, r, scale, c.dropout, init, bias, c.dora)
        if isinstance(module, nn.Embedding):
            return EmbeddingLoRA(module, r, scale, init, c.dora)
        if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
            transposed = _is_hf_conv1d(module) or (c.fan_in_fan_out and not isinstance(module, nn.Linear))
            return LinearLoRA(module, r, scale, c.dropout, init, bias, transposed, c.dora)
        raise TargetError(
            f"lora cannot adapt {path!r} ({type(module).__name__}); it adapts Linear, Conv1d/2d/3d, Embedding, "
            "MultiheadAttention, LSTM/GRU/RNN and Hugging Face Conv1D layers"
        )


@peftkit.hookimpl
def register_methods(register: Any) -> None:
    register(LoRA)


__all__ = ["BiasDelta", "ConvLoRA", "EmbeddingLoRA", "LinearLoRA", "LoRA", "LoraConfig", "LowRank", "MultiheadAttentionLoRA"]
