"""Bottleneck adapters: small down-project / nonlinearity / up-project modules beside a layer or block.

* ``serial_adapter`` (Houlsby et al. 2019; Pfeiffer et al. 2021): ``h <- h + s * up(f(down(h)))``
  on the target's output ``h``.
* ``parallel_adapter`` (He et al. 2022, "Towards a Unified View of PETL"):
  ``h <- h + s * up(f(down(x)))`` with ``x`` the target's input.

A target is a layer (Linear, Hugging Face Conv1D, Conv1d/2d/3d, MultiheadAttention, LayerNorm,
LSTM/GRU/RNN) or a block (an attention module, an MLP, a residual block): a block's feature sizes
are those of its first and last projection. Convolutions, and blocks that start with one, keep their features in dim 1
(channels first): there the projections are 1 x 1 convolutions over channels (Rebuffi et al.
2017, 2018), and a parallel adapter strides like the block it sits beside, so shapes match.
Elsewhere features are the last dim. Targets returning a tuple (``nn.MultiheadAttention``, many
transformers blocks) have their first element adapted.

Default targets follow the architecture's blocks: in each transformer layer, after the attention
and after the feed-forward block (Houlsby; ``placement="pfeiffer"`` keeps the feed-forward one);
in a CNN, one per residual block; after each LSTM/GRU/RNN; else every k x k convolution, else every
hidden Linear.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.errors import ConfigError, TargetError
from peftkit.method import Delta
from peftkit.quantized import float_dtype
from peftkit.targets import forward_source, is_projection, output_layers

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}
_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVS: dict[int, type[nn.Conv1d] | type[nn.Conv2d] | type[nn.Conv3d]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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
        if self.scale != "learned" and (not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool)
                                        or not math.isfinite(self.scale)):
            raise bad("scale", "a finite number such as 1.0, or 'learned'")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "a probability in [0, 1)")
        if self.init not in ("zero", "houlsby"):
            raise bad("init", "'zero' or 'houlsby'")
        if not isinstance(self.layer_norm, bool):
            raise bad("layer_norm", "True or False")
        if self.placement not in ("houlsby", "pfeiffer"):
            raise bad("placement", "'houlsby' or 'pfeiffer'")


def _projections(module: nn.Module) -> list[nn.Module]:
    """The module's projection layers (itself if it is one), in registration order."""
    return [m for m in module.modules() if is_projection(m)]


def _sizes(layer: nn.Module) -> tuple[int, int]:
    """(input, output) features of one projection."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return layer.in_channels, layer.out_channels
    w = layer.weight
    assert isinstance(w, torch.Tensor), f"{type(layer).__name__}.weight is a {type(w).__name__}"  # a projection's
    if type(layer).__name__ == "Conv1D":  # Hugging Face: weight (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def features(module: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a target: channels for convs, the last dim otherwise; for
    a block, the input of its first projection and the output of its last."""
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], module.normalized_shape[-1]
    if isinstance(module, nn.RNNBase):  # its output is (output, state): the output's last dim
        out = module.proj_size or module.hidden_size
        return module.input_size, out * (2 if module.bidirectional else 1)
    layers = _projections(module)
    if layers:
        return _sizes(layers[0])[0], _sizes(layers[-1])[1]
    raise TargetError(f"cannot tell the feature size of {type(module).__name__}: it holds no Linear or convolution; "
                      "target a Linear, Conv1d/2d/3d, Hugging Face Conv1D, MultiheadAttention or LayerNorm, or a block "
                      "made of them")


def spatial_dims(module: nn.Module) -> int:
    """How many spatial dims follow the channels (dim 1) in the target's output: 1-3 for convolutions
    and blocks that start with one, 0 where features are the last dim."""
    if isinstance(module, (nn.MultiheadAttention, nn.LayerNorm, nn.RNNBase)):
        return 0
    layers = _projections(module)
    first = layers[0] if layers else None
    for n, conv in _CONVS.items():
        if isinstance(first, conv):
            return n
    return 0


class BottleneckAdapter(peftkit.Adapter):
    """``s * up(dropout(f(down(norm(z)))))``, added to the target's output; ``z`` is the output
    (serial) or the input (parallel)."""

    def __init__(self, module: nn.Module, parallel: bool, c: BottleneckConfig) -> None:
        super().__init__()
        d_in, d_out = features(module)
        if not parallel:
            d_in = d_out
        self.d_in, self.d_out = d_in, d_out
        hidden = c.bottleneck or max(1, d_out // c.reduction)
        self.parallel = parallel
        self.dims = spatial_dims(module)
        self.spatial = self.dims > 0
        like = next(module.parameters())
        device, dtype = like.device, float_dtype(module)  # a quantized layer's: the float dtype it stands for
        target_conv = module if isinstance(module, _CONV_TYPES) else None
        conv_layer = target_conv is not None
        bias = target_conv is None or target_conv.bias is not None  # conv adapters follow the conv (BN follows it)
        self.down: _Conv | nn.Linear
        self.up: _Conv | nn.Linear
        self.norm: nn.GroupNorm | nn.LayerNorm | nn.Identity
        if self.spatial:
            if parallel and target_conv is not None and not _same_padded(target_conv):
                raise TargetError(f"parallel_adapter needs a 'same'-padded conv (odd kernel, padding = dilation*(k-1)/2) "
                                  f"so a 1x1 conv beside it gives the same output size; got {module}")
            # the conv class of the target's dims, given the target's own stride (typed there as a tuple of any length)
            conv: Callable[..., _Conv] = _CONVS[self.dims]
            # beside a block: strided at call time
            stride = target_conv.stride if parallel and target_conv is not None else 1
            self.down = conv(d_in, hidden, 1, stride=stride, bias=bias, device=device, dtype=dtype)
            self.up = conv(hidden, d_out, 1, bias=bias, device=device, dtype=dtype)
            self.norm = nn.GroupNorm(1, d_in, device=device, dtype=dtype) if c.layer_norm else nn.Identity()
        else:
            self.down = nn.Linear(d_in, hidden, bias=bias, device=device, dtype=dtype)
            self.up = nn.Linear(hidden, d_out, bias=bias, device=device, dtype=dtype)
            self.norm = nn.LayerNorm(d_in, device=device, dtype=dtype) if c.layer_norm else nn.Identity()
        self.act = ACTIVATIONS[c.activation]()
        self.dropout = nn.Dropout(c.dropout) if c.dropout else nn.Identity()
        # shape (1,), not a scalar: FSDP2 shards parameters on dim 0 and refuses 0-dim parameters
        self.learned_scale = nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if c.scale == "learned" else None
        self.fixed_scale = 1.0 if c.scale == "learned" else float(c.scale)
        self._strided_at_call = parallel and self.spatial and not conv_layer
        # a linear parallel branch is a weight delta, when the target has a bias to take the branch's
        # (a Linear without one keeps the branch's biases: they have nowhere to go, so it runs as a branch)
        self._foldable = (parallel and c.activation == "identity" and not c.layer_norm
                          and (isinstance(module, nn.Linear) or (target_conv is not None and target_conv.groups == 1))
                          and (not bias or isinstance(getattr(module, "bias", None), torch.Tensor)))
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
        # 0-dim: a (1,)-shaped tensor cannot multiply the nested tensors of nn.TransformerEncoder's packed path
        return self.learned_scale.reshape(()) if self.learned_scale is not None else self.fixed_scale

    def _check(self, t: Any, want: int, what: str, module: nn.Module) -> torch.Tensor:
        dim = 1 if self.spatial else -1
        if isinstance(t, torch.Tensor) and t.is_nested:  # nn.TransformerEncoder's packed inference path
            return t
        if not isinstance(t, torch.Tensor) or t.dim() < (self.dims + 2 if self.spatial else 1) or t.shape[dim] != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise TargetError(
                f"{type(self).__name__} on {type(module).__name__} expects its {what} to hold {want} features in dim "
                f"{dim}, and got {got}; target the layers inside it instead (a block whose first and last projections "
                "do not give its input and output sizes, e.g. one that concatenates branches)")
        return t

    def _down(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self._strided_at_call:
            down: torch.Tensor = self.down(z)
            return down
        # beside a (possibly downsampling) block: the 1x1 conv takes the stride that gives the output's size
        stride = [math.ceil(a / b) for a, b in zip(z.shape[2:], out.shape[2:], strict=True)]
        h = _CONV_FN[self.dims](z, self.down.weight, self.down.bias, stride=stride)
        if h.shape[2:] != out.shape[2:]:
            raise TargetError(f"parallel_adapter: a 1x1 convolution cannot map the input's size {tuple(z.shape[2:])} "
                              f"onto the output's {tuple(out.shape[2:])}; target a 'same'-padded layer instead")
        return h

    def residual(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        up: torch.Tensor = self.up(self.dropout(self.act(self._down(self.norm(z), out))))
        return self.scale * up

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        h = self._check(output[0] if isinstance(output, tuple) else output, self.d_out, "output", module)
        z = (args[0] if args else next(iter(kwargs.values()))) if self.parallel else h
        if self.parallel:
            z = self._check(z, self.d_in, "input", module)
        h = h + self.residual(z, h)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    @property
    def has_delta(self) -> bool:
        # Only a parallel adapter with an identity activation and no norm is linear in x, so only it
        # folds into a Linear/Conv target: W += s * U @ D (a 1x1 path is the centre tap of a k x k kernel).
        return self._foldable

    def delta(self, module: nn.Module) -> dict[str, Delta] | None:
        if not self._foldable:
            return None
        s = self.scale
        u = self.up.weight.reshape(self.up.weight.shape[0], -1)  # (out, hidden)
        d = self.down.weight.reshape(self.down.weight.shape[0], -1)  # (hidden, in)
        w = s * (u @ d)  # (out, in)
        if self.spatial:
            assert isinstance(module, _CONV_TYPES), type(module).__name__  # foldable: a Linear or a conv
            kernel = torch.zeros_like(module.weight)
            centre = tuple(k // 2 for k in module.kernel_size)
            index: tuple[slice | int, ...] = (slice(None), slice(None), *centre)
            kernel[index] = w
            w = kernel
        deltas: dict[str, Delta] = {"weight": w}
        if self.up.bias is not None:
            down_bias = self.down.bias
            assert down_bias is not None  # down and up are built with the same bias flag
            deltas["bias"] = s * (u @ down_bias + self.up.bias)
        return deltas


def _same_padded(conv: _Conv) -> bool:
    """Odd kernels with padding = dilation * (k - 1) / 2: a 1x1 conv beside it gives the same size."""
    if isinstance(conv.padding, str):
        return conv.padding == "same" and all(k % 2 == 1 for k in conv.kernel_size)
    return all(p == d * (k - 1) // 2 and k % 2 == 1
               for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size, strict=True))


# Names of the parts of a transformer layer (the last component of a module's path).
_ATTENTION_NAMES = {"self_attention", "self_attn", "attn", "attention", "SelfAttention", "mixer_attn"}
_FFN_NAMES = {"mlp", "ffn", "feed_forward", "mlp_block", "DenseReluDense", "fc2", "ff"}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_attention(name: str, module: nn.Module) -> bool:
    return name in _ATTENTION_NAMES or isinstance(module, nn.MultiheadAttention)


def _transformer_layers(modules: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """Innermost modules holding both an attention part and a feed-forward part: path -> (attention,
    feed-forward). The first attention in order is the self-attention (cross-attention comes after)."""
    parts: dict[str, dict[str, str]] = {}
    for path, m in modules.items():
        name = path.rpartition(".")[2]
        kind = "att" if _is_attention(name, m) else "ffn" if name in _FFN_NAMES else None
        if kind is None or not path:
            continue
        parent = path
        while parent:
            parent = parent.rpartition(".")[0]
            found = parts.setdefault(parent, {})
            if kind not in found and not any(path.startswith(q + ".") for q in found.values()):
                found[kind] = path
    both = {p: (f["att"], f["ffn"]) for p, f in parts.items() if "att" in f and "ffn" in f}
    return {p: v for p, v in both.items() if not any(q != p and q.startswith(f"{p}.") or (p == "" and q) for q in both)}


def _bert_layer(path: str, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
    """A BERT-style layer's two projections that feed a residual add (adapters go before that add, as
    in Houlsby et al.): ``attention.output.dense`` and ``output.dense``."""
    prefix = f"{path}." if path else ""
    if f"{prefix}attention.output.dense" in modules and f"{prefix}output.dense" in modules:
        return f"{prefix}attention.output.dense", f"{prefix}output.dense"
    return None


def _residual_blocks(modules: dict[str, nn.Module], skip: list[str]) -> list[str]:
    """A CNN's residual blocks: the items of Sequential/ModuleList containers that hold two or more
    projections (the outermost such; not containers themselves, not stages of repeated blocks, and
    not overlapping a transformer layer in ``skip``)."""
    items = {f"{p}.{n}" if p else n for p, m in modules.items() if isinstance(m, _CONTAINERS) for n in m._modules}

    def qualifies(path: str) -> bool:
        m = modules[path]
        layers = _projections(m)
        return (path in items and not isinstance(m, _CONTAINERS) and len(layers) >= 2 and spatial_dims(m) > 0
                and not _branches(m) and not _concatenates(_class(m)))

    blocks: list[str] = []
    for path in modules:
        if (not qualifies(path) or any(path.startswith(b + ".") for b in blocks)
                or any(path == s or path.startswith(s + ".") or s.startswith(path + ".") for s in skip)):
            continue
        inner = [type(modules[q]) for q in modules if q.startswith(path + ".") and qualifies(q)]
        if any(inner.count(c) >= 2 for c in set(inner)):  # a stage of repeated blocks: its blocks are the unit
            continue
        blocks.append(path)
    return blocks


def _class(module: nn.Module) -> type:
    """``type(module)`` as a plain ``type``, the key of a cache (mypy takes a ``type[X]`` for unhashable)."""
    return type(module)


@functools.cache
def _concatenates(cls: type) -> bool:
    """Whether a block's forward joins or splits channels (``torch.cat``, ``chunk``, ``split``, a
    channel shuffle): its output size is then not its last projection's (ShuffleNet, DenseNet)."""
    return re.search(r"\b(cat|concat|concatenate|chunk|split|channel_shuffle)\s*\(", forward_source(cls)) is not None


def _branches(module: nn.Module) -> bool:
    """Whether the block ends in projections side by side (e.g. SqueezeNet's Fire concatenates two):
    its output size is then not its last projection's."""
    layers = [(p, m) for p, m in module.named_modules() if is_projection(m)]
    if len(layers) < 2:
        return False
    path, last = layers[-1]
    parent = path.rpartition(".")[0]
    size = _sizes(last)[0]
    return any(p.rpartition(".")[0] == parent and _sizes(m)[0] == size and _sizes(m)[1] != size for p, m in layers[:-1])


def default_targets(model: nn.Module, placement: str, parallel: bool = False) -> list[str]:
    """After the attention and the feed-forward block of each transformer layer (Houlsby), only the
    feed-forward one (Pfeiffer); one per residual block of a CNN; after each recurrent layer; else
    every k x k convolution (not depthwise); else every hidden Linear."""
    modules = dict(model.named_modules())
    layers: list[str] = []
    attention: list[str] = []
    ffn: list[str] = []

    def add(path: str, parts: tuple[str, str]) -> None:
        if not any(path == q or path.startswith(q + ".") or q.startswith(path + ".") for q in layers):
            layers.append(path)
            attention.append(parts[0])
            ffn.append(parts[1])

    for path, m in modules.items():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            prefix = f"{path}." if path else ""
            add(path, (prefix + "self_attn", prefix + "linear2"))
        elif (bert := _bert_layer(path, modules)) is not None:
            add(path, bert)
    for path, parts in _transformer_layers(modules).items():
        add(path, parts)
    recurrent = [p for p, m in modules.items() if isinstance(m, nn.RNNBase)]  # after each LSTM/GRU/RNN
    keep = set(ffn if placement == "pfeiffer" else attention + ffn) | set(_residual_blocks(modules, layers)) | set(recurrent)
    if keep:
        return [p for p in modules if p in keep]
    convs = [p for p, m in modules.items() if isinstance(m, _CONV_TYPES)
             and math.prod(m.kernel_size) > 1 and not (m.groups > 1 and m.groups == m.in_channels)
             and (not parallel or _same_padded(m))]
    if convs:
        return convs
    heads = output_layers(model).all
    return [p for p, m in modules.items() if isinstance(m, nn.Linear) and p not in heads]


class _Bottleneck(peftkit.Method[BottleneckConfig]):
    Config = BottleneckConfig
    parallel = False
    learning_rate = 1e-3

    def default_targets(self, model: nn.Module) -> list[str]:
        """After the attention and the feed-forward block of each transformer layer, one per CNN
        residual block, after each LSTM/GRU, else every k x k conv, else every hidden Linear."""
        return default_targets(model, self.config.placement, self.parallel)

    def can_adapt(self, module: nn.Module) -> bool:
        try:
            features(module)
        except TargetError:
            return False
        return True

    def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
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
