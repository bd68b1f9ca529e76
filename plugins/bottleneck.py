"""Bottleneck adapters: small down-project / nonlinearity / up-project modules beside a layer.

* ``serial_adapter`` (Houlsby et al. 2019; Pfeiffer et al. 2021): ``h <- h + s * up(f(down(h)))``
  on the target's output ``h``.
* ``parallel_adapter`` (He et al. 2022, "Towards a Unified View of PETL"):
  ``h <- h + s * up(f(down(x)))`` with ``x`` the target's input.

On a ``Conv2d`` target the projections are 1 x 1 convolutions over channels (Rebuffi et al. 2017,
2018); the parallel one strides like the conv it sits beside, so shapes match. Targets returning a
tuple (``nn.MultiheadAttention``, many transformers blocks) have their first element adapted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import peftkit
from peftkit.errors import ConfigError, TargetError
from peftkit.targets import find_output_layer

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}
_ATTENTION_NAMES = ("self_attention", "self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "ffn", "feed_forward", "mlp_block")


@dataclass(frozen=True)
class BottleneckConfig:
    """Options of ``serial_adapter`` and ``parallel_adapter``."""

    bottleneck: int | None = None  # hidden size of the adapter; default: features // reduction
    reduction: int = 16  # used when bottleneck is None: hidden = max(1, features // reduction)
    activation: str = "relu"  # relu | gelu | silu | tanh | identity
    scale: float | str = 1.0  # s, a float, or "learned" (a trainable scalar starting at 1)
    dropout: float = 0.0  # dropout inside the adapter, after the activation
    init: str = "zero"  # "zero": up-projection zero (identity at init) | "houlsby": trunc. normal std 1e-2
    layer_norm: bool = False  # normalise the adapter's input before the down-projection
    placement: str = "houlsby"  # default transformer targets: "houlsby" (attention + FFN) | "pfeiffer" (FFN)

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r} is invalid; expected {want}")

        if self.bottleneck is not None and (not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool) or self.bottleneck < 1):
            raise bad("bottleneck", "a positive integer such as 64, or None to use reduction")
        if not isinstance(self.reduction, int) or isinstance(self.reduction, bool) or self.reduction < 1:
            raise bad("reduction", "a positive integer such as 16")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"one of {', '.join(ACTIVATIONS)}")
        if self.scale != "learned" and (not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool)):
            raise bad("scale", "a number such as 1.0, or 'learned'")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "a probability in [0, 1)")
        if self.init not in ("zero", "houlsby"):
            raise bad("init", "'zero' or 'houlsby'")
        if not isinstance(self.layer_norm, bool):
            raise bad("layer_norm", "True or False")
        if self.placement not in ("houlsby", "pfeiffer"):
            raise bad("placement", "'houlsby' or 'pfeiffer'")


def features(module: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a target: channels for convs, the last dim otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], module.normalized_shape[-1]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[0].in_features, linears[-1].out_features
    raise TargetError(f"cannot tell the feature size of {type(module).__name__}; target a Linear, Conv2d, "
                      "MultiheadAttention, LayerNorm, or a block containing Linear layers")


class BottleneckAdapter(peftkit.Adapter):
    """``s * up(dropout(f(down(norm(z)))))``, added to the target's output; ``z`` is the output
    (serial) or the input (parallel)."""

    def __init__(self, module: nn.Module, parallel: bool, c: BottleneckConfig) -> None:
        super().__init__()
        d_in, d_out = features(module)
        if not parallel:
            d_in = d_out
        hidden = c.bottleneck or max(1, d_out // c.reduction)
        self.parallel = parallel
        self.spatial = isinstance(module, nn.Conv2d)
        like = next(module.parameters())
        kw = {"device": like.device, "dtype": like.dtype}
        bias = not self.spatial or module.bias is not None  # conv adapters follow the conv (BN follows it)
        if self.spatial:
            stride = module.stride if parallel else 1
            if parallel and any(p != d * (k - 1) // 2 or k % 2 == 0 for p, d, k in
                                zip(_pair(module.padding), module.dilation, module.kernel_size, strict=True)):
                raise TargetError(f"parallel_adapter needs a 'same'-padded conv (odd kernel, padding = dilation*(k-1)/2) "
                                  f"so a 1x1 conv beside it gives the same output size; got {module}")
            self.down = nn.Conv2d(d_in, hidden, 1, stride=stride, bias=bias, **kw)
            self.up = nn.Conv2d(hidden, d_out, 1, bias=bias, **kw)
            self.norm = nn.GroupNorm(1, d_in, **kw) if c.layer_norm else nn.Identity()
        else:
            self.down = nn.Linear(d_in, hidden, bias=bias, **kw)
            self.up = nn.Linear(hidden, d_out, bias=bias, **kw)
            self.norm = nn.LayerNorm(d_in, **kw) if c.layer_norm else nn.Identity()
        self.act = ACTIVATIONS[c.activation]()
        self.dropout = nn.Dropout(c.dropout) if c.dropout else nn.Identity()
        # shape (1,), not a scalar: FSDP2 shards parameters on dim 0 and refuses 0-dim ones
        self.learned_scale = nn.Parameter(torch.ones(1, **kw)) if c.scale == "learned" else None
        self.fixed_scale = 1.0 if c.scale == "learned" else float(c.scale)
        self._foldable = (parallel and c.activation == "identity" and not c.layer_norm
                          and (isinstance(module, nn.Linear) or (self.spatial and module.groups == 1)))
        with torch.no_grad():
            if c.init == "houlsby":
                for lin in (self.down, self.up):
                    nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
            else:
                nn.init.zeros_(self.up.weight)
                if self.up.bias is not None:
                    nn.init.zeros_(self.up.bias)

    @property
    def scale(self) -> torch.Tensor | float:
        return self.learned_scale if self.learned_scale is not None else self.fixed_scale

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(self.norm(z)))))

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        z = (args[0] if args else next(iter(kwargs.values()))) if self.parallel else h
        h = h + self.residual(z)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    @property
    def has_delta(self) -> bool:
        # Only a parallel adapter with an identity activation and no norm is linear in x, so only it
        # folds into a Linear/Conv target: W += s * U @ D (a 1x1 path is the centre tap of a k x k kernel).
        return self._foldable

    def delta(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        if not self._foldable:
            return None
        s = self.scale
        u = self.up.weight.reshape(self.up.weight.shape[0], -1)  # (out, hidden)
        d = self.down.weight.reshape(self.down.weight.shape[0], -1)  # (hidden, in)
        w = s * (u @ d)  # (out, in)
        if self.spatial:
            kernel = torch.zeros_like(module.weight)
            centre = tuple(k // 2 for k in module.kernel_size)
            kernel[(slice(None), slice(None), *centre)] = w
            w = kernel
        deltas = {"weight": w}
        if self.up.bias is not None:
            deltas["bias"] = s * (u @ self.down.bias + self.up.bias)
        return deltas


def _pair(padding: Any) -> tuple[int, int]:
    if isinstance(padding, str):
        return (-1, -1)  # "same"/"valid" strings: let the check refuse
    return tuple(padding)  # type: ignore[return-value]


def default_targets(model: nn.Module, placement: str) -> list[str]:
    """After the attention output and the feed-forward block of each transformer layer (Houlsby),
    only the feed-forward one (Pfeiffer); else every 3x3 conv; else every hidden Linear."""
    modules = dict(model.named_modules())
    attention: list[str] = []
    ffn: list[str] = []
    for path, m in modules.items():
        prefix = f"{path}." if path else ""
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            attention.append(prefix + "self_attn")
            ffn.append(prefix + "linear2")
            continue
        children = dict(m.named_children())
        if "attention" in children and "output" in children and f"{prefix}output.dense" in modules:
            # a BERT-style layer: attention.output.dense and output.dense are the two projections
            # that feed a residual add (adapters go before that add, as in Houlsby et al.)
            out = f"{prefix}attention.output.dense"
            attention.append(out if out in modules else prefix + "attention")
            ffn.append(f"{prefix}output.dense")
            continue
        att = next((n for n in _ATTENTION_NAMES if n in children), None)
        mlp = next((n for n in _MLP_NAMES if n in children), None)
        if att and mlp and not any(path.startswith(p + ".") for p in attention):
            attention.append(prefix + att)
            ffn.append(prefix + mlp)
    if ffn:
        chosen = set(ffn if placement == "pfeiffer" else attention + ffn)
        return [p for p in modules if p in chosen]
    convs = [p for p, m in modules.items() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    if convs:
        return convs
    head = find_output_layer(model)
    return [p for p, m in modules.items() if isinstance(m, nn.Linear) and p != head]


class _Bottleneck(peftkit.Method):
    Config = BottleneckConfig
    parallel = False

    def default_targets(self, model: nn.Module) -> list[str]:
        return default_targets(model, self.config.placement)

    def can_adapt(self, module: nn.Module) -> bool:
        try:
            features(module)
        except TargetError:
            return False
        return not isinstance(module, nn.Conv2d) or not self.parallel or module.padding != "valid"

    def build(self, path: str, module: nn.Module) -> peftkit.Adapter:
        if self.parallel and isinstance(module, (nn.Conv1d, nn.Conv3d)):
            raise TargetError(f"{self.name} supports Conv2d among convolutions; {path!r} is a {type(module).__name__}")
        return BottleneckAdapter(module, self.parallel, self.config)


class SerialAdapter(_Bottleneck):
    """Serial bottleneck adapter (Houlsby 2019): h + s*up(f(down(h))) after each target."""

    name = "serial_adapter"


class ParallelAdapter(_Bottleneck):
    """Parallel bottleneck adapter (He et al. 2022): h + s*up(f(down(x))) beside each target."""

    name = "parallel_adapter"
    parallel = True


@peftkit.hookimpl
def register_methods(register: Any) -> None:
    register(SerialAdapter)
    register(ParallelAdapter)


__all__ = ["BottleneckAdapter", "BottleneckConfig", "ParallelAdapter", "SerialAdapter"]
