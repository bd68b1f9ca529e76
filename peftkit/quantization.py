"""``peftkit.quantize``: store a frozen backbone's Linear weights in 4 bits (NF4) or 8 bits, for QLoRA.

Two backends, each an optional extra:

- ``torchao`` (``pip install "peftkit[torchao]"``): the weight becomes a tensor subclass in place
  (``NF4Tensor`` with double-quantized scales, about 4.13 bits per weight; ``Int8Tensor``, one scale
  per row). A plain ``nn.Linear`` given NF4 becomes a :class:`~peftkit.nf4.NF4Linear` (the same
  module, its class swapped), which dequantizes a chunk at a time: torchao's ``F.linear`` holds about
  12 bytes per weight of the layer at once, this 2 (bf16); other layers stay as they are.
- ``bitsandbytes`` (``pip install "peftkit[bitsandbytes]"``): the layer becomes a bitsandbytes
  ``Linear4bit`` (NF4, double quantization) or ``Linear8bitLt``, as transformers'
  ``BitsAndBytesConfig`` loads them.

Then ``peftkit.wrap(model, "lora")`` as usual: adapters apply beside the quantized layers (in output
space) and train in full precision; the quantized tensors are never written.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .attach import slots_in
from .errors import ConfigError, TargetError
from .model import AdaptedModel
from .nf4 import NF4Linear
from .quantized import is_quantized
from .targets import host_of, matches, output_layers, tied_aliases

__all__ = ["SCHEMES", "QuantizationReport", "quantize", "set_mmap_threshold"]

SCHEMES = ("nf4", "int8")
BACKENDS = {"torchao": "torchao", "bitsandbytes": "bitsandbytes"}  # backend -> the extra (and module) it needs
NF4_BLOCK = 64 * 256  # torchao's NF4: 64 weights per scale, 256 scales per second-level scale


@dataclass
class QuantizationReport:
    """What :func:`quantize` did: also at ``model.peftkit_quantization``.

    Attributes:
        scheme: ``"nf4"`` or ``"int8"``.
        backend: ``"torchao"`` or ``"bitsandbytes"``.
        quantized: The paths of the Linear layers quantized.
        skipped: Path -> why a Linear layer was left in float.
        bytes_before: The quantized layers' weight bytes before.
        bytes_after: Their bytes after (quantized data and scales).
    """

    scheme: str
    backend: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        ratio = f", {self.bytes_after / self.bytes_before:.2f}x their weight bytes" if self.bytes_before else ""
        lines = [f"{self.scheme} ({self.backend}): {len(self.quantized)} Linear layers quantized{ratio}"]
        lines += [f"  kept in float: {p}: {why}" for p, why in self.skipped.items()]
        return "\n".join(lines)


def _backend(name: str | None) -> tuple[str, Any]:
    """The backend to use and its module, or a :class:`ConfigError` naming the extra to install."""
    if name is not None and name not in BACKENDS:
        raise ConfigError(f"backend={name!r} is invalid; expected one of {', '.join(map(repr, BACKENDS))} (or None: "
                          "torchao where installed, else bitsandbytes)")
    for candidate in [name] if name else list(BACKENDS):
        try:
            return candidate, importlib.import_module(BACKENDS[candidate])
        except ImportError:
            continue
    wanted = name or "torchao or bitsandbytes"
    raise ConfigError(f"quantize needs {wanted}, which is not installed: pip install \"peftkit[{name or 'torchao'}]\""
                      + ("" if name else " (or peftkit[bitsandbytes])"))


def _why_not(model: nn.Module, path: str, module: nn.Linear, scheme: str, backend: str,
             outputs: set[str]) -> str | None:
    """Why the Linear at ``path`` stays in float (None: it can be quantized)."""
    w = module._parameters.get("weight")
    if not isinstance(w, torch.Tensor) or id(w) != id(getattr(module, "weight", None)):
        return "its weight is not its own tensor (a parametrization)"
    if is_quantized(w):
        return "already quantized"
    if not w.is_floating_point():
        return f"its weight is {w.dtype}, not a float"
    if host_of(model, path)[1]:
        return "its parent reads its weight directly (e.g. attention's out_proj)"
    if tied_aliases(model, path):
        return "its weight is tied to another module's (e.g. an embedding)"
    if path in outputs:
        return "an output layer (quantizing what makes the predictions costs the most accuracy; keep_output_layer=False)"
    if scheme == "nf4" and backend == "torchao" and w.numel() % NF4_BLOCK:
        return f"{w.numel():,} weights, not a multiple of {NF4_BLOCK:,} (torchao's NF4 blocks)"
    if backend == "bitsandbytes" and type(module) is not nn.Linear:
        return f"a {type(module).__name__}; bitsandbytes replaces plain nn.Linear layers only"
    return None


def quantize(model: nn.Module, scheme: str = "nf4", targets: Sequence[str] | None = None, *,
             backend: str | None = None, keep_output_layer: bool = True) -> nn.Module:
    """Quantize the Linear weights of a backbone in place, for QLoRA; returns the model.

    Example::

        model = peftkit.quantize(model, "nf4")      # before wrap
        print(model.peftkit_quantization)            # what was quantized, what was kept and why
        m = peftkit.wrap(model, "lora", r=8)         # adapters train in full precision beside NF4 layers

    Args:
        model: The backbone (not yet wrapped).
        scheme: ``"nf4"`` (4-bit NormalFloat with double-quantized scales) or ``"int8"``.
        targets: Module paths or patterns (as ``wrap``'s ``targets=``) of the Linear layers to
            quantize; each must be quantizable. Default: every Linear that the backend can take,
            except the output layer (see ``keep_output_layer``) and layers whose weight is tied or
            read by a parent; the report says which were kept and why.
        backend: ``"torchao"`` or ``"bitsandbytes"``; default torchao where installed.
        keep_output_layer: Leave the output layer in float (the default, as QLoRA does).

    Returns:
        ``model``, with ``model.peftkit_quantization`` a :class:`QuantizationReport`.

    Raises:
        ConfigError: a bad scheme or backend, a backend not installed (the error names the extra),
            a wrapped model, or nothing to quantize.
        TargetError: a layer named in ``targets`` that is not a Linear or cannot be quantized.
        Nothing is changed when it raises, and an error while quantizing puts back what was done.
    """
    _quantize(model, scheme, targets, backend, keep_output_layer)
    _release_freed_memory()  # after _quantize's references to the float layers are gone
    return model


def _quantize(model: nn.Module, scheme: str, targets: Sequence[str] | None, backend: str | None,
              keep_output_layer: bool) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme={scheme!r} is invalid; expected one of {', '.join(map(repr, SCHEMES))}")
    if isinstance(model, AdaptedModel) or slots_in(model):
        raise ConfigError("quantize the backbone before wrapping it: peftkit.quantize(model, ...), then peftkit.wrap(...)"
                          " (quantizing under attached adapters would change the backbone they were made for)")
    if not isinstance(keep_output_layer, bool):
        raise ConfigError(f"keep_output_layer={keep_output_layer!r} is invalid; expected True or False")
    name, lib = _backend(backend)
    outputs = set(output_layers(model).all) if keep_output_layer else set()
    linears: list[tuple[str, nn.Linear]] = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    report = QuantizationReport(scheme, name)
    chosen: list[tuple[str, nn.Linear]] = []
    if targets is not None:
        if isinstance(targets, str) or not isinstance(targets, Sequence):
            raise ConfigError(f"targets={targets!r} is invalid; expected a list of module paths or patterns")
        for t in targets:
            hits = [(p, m) for p, m in linears if matches(t, p, m)]
            if not hits:
                raise TargetError(f"targets: {t!r} matches no Linear layer of {type(model).__name__}")
            for p, m in hits:
                why = _why_not(model, p, m, scheme, name, set())
                if why:
                    raise TargetError(f"targets: {p!r} cannot be quantized: {why}")
                if all(p != q for q, _ in chosen):
                    chosen.append((p, m))
    else:
        for p, m in linears:
            why = _why_not(model, p, m, scheme, name, outputs)
            if why:
                report.skipped[p] = why
            else:
                chosen.append((p, m))
    if not chosen:
        raise ConfigError(f"quantize found no Linear layer to quantize in {type(model).__name__}"
                          + (": " + "; ".join(f"{p}: {w}" for p, w in list(report.skipped.items())[:3])
                             if report.skipped else ""))
    undo: list[Callable[[], None]] = []  # each puts back one thing done
    try:
        for p, m in chosen:
            w = m.weight
            report.bytes_before += w.numel() * w.element_size()
            if name == "torchao":
                new = _torchao_weight(lib, w.detach(), scheme)
                undo.append(functools.partial(m._parameters.__setitem__, "weight", m._parameters["weight"]))
                m._parameters["weight"] = nn.Parameter(new, requires_grad=False)
                if scheme == "nf4" and type(m) is nn.Linear:  # a subclass keeps its own forward (and torchao's F.linear)
                    undo.append(functools.partial(setattr, m, "__class__", nn.Linear))
                    m.__class__ = NF4Linear
                report.bytes_after += _torchao_bytes(new)
            else:
                parent_path, _, leaf = p.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                layer = _bnb_layer(lib, m, scheme)
                undo.append(functools.partial(parent._modules.__setitem__, leaf, m))
                parent._modules[leaf] = layer
                report.bytes_after += _bnb_bytes(layer)
            report.quantized.append(p)
    except BaseException:
        for put_back in reversed(undo):
            put_back()
        raise
    model.__dict__["peftkit_quantization"] = report  # a plain attribute, as transformers keeps its quantization config


def set_mmap_threshold(size: int = 65536) -> bool:
    """Have glibc map every block of ``size`` bytes or more on its own, so that it goes back to the
    system as soon as it is freed: what ``MALLOC_MMAP_THRESHOLD_=65536`` does from the start of a
    process, for when its environment is not yours to set (a notebook, a launcher).

    Training on quantized weights on a CPU needs it: every quantized layer dequantizes its weight on
    every call, and glibc's heap (whose threshold rises to 32 MB as large blocks are freed) keeps
    those blocks resident between the activations. Measured with the environment variable
    (``benchmarks/qlora.py``): at TinyLlama-1.1B's shapes, torchao NF4's peak above the imported
    runtime fell from 0.53x bf16's to 0.42x; on a 0.44 B model, bitsandbytes' from 0.82x to 0.48x;
    with this call, on 8 decoder layers of the 0.44 B model (torchao, before :class:`~peftkit.nf4.NF4Linear`),
    from 559 to 297 MB. It costs an ``mmap`` and ``munmap`` per large block: a 105 s step there
    against 101 s.

    This is process-wide, and lasts: it changes how every later allocation of the process is made,
    not peftkit's alone. Call it once, before building the model.

    Args:
        size: The threshold in bytes (glibc takes 0 to 32 MiB).

    Returns:
        Whether it took effect: ``False`` off Linux, or with a C library other than glibc.

    Raises:
        ConfigError: ``size`` is not a whole number of bytes in 0..32 MiB.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 32 * 2**20:
        raise ConfigError(f"size={size!r} is invalid; expected bytes from 0 to {32 * 2**20} (32 MiB), e.g. 65536")
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, size))


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _glibc() -> Any | None:
    """glibc, for its malloc tunables; ``None`` off Linux or with another C library (musl has no
    ``mallopt`` or ``malloc_trim``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        _ = libc.mallopt, libc.malloc_trim  # both or neither
    except (OSError, AttributeError):
        return None
    return libc


def _release_freed_memory() -> None:
    """Give the memory of the float weights, and of the backends' temporaries, back to the system.

    glibc's malloc keeps freed blocks below its mmap threshold (which rises to 32 MB as large
    blocks are freed) inside the process: quantizing 64 MB of float32 Linear weights with torchao left
    45-437 MB more resident than before it (depending on the heap's layout), and 54 MB less once
    ``malloc_trim`` returned the free pages.
    Elsewhere (another libc, another OS) this does nothing."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _torchao_weight(lib: Any, w: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme == "nf4":
        nf4: torch.Tensor = lib.quantization.to_nf4(w.contiguous())
        return nf4
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)  # torchao quantizes modules
    lin.weight = nn.Parameter(w.clone(), requires_grad=False)
    lib.quantization.quantize_(lin, lib.quantization.Int8WeightOnlyConfig())
    out: torch.Tensor = lin.weight.detach()
    return out


def _torchao_bytes(t: torch.Tensor) -> int:
    cls: Any = type(t)  # torchao's tensor subclasses list their inner tensors
    inner, _ = cls.__tensor_flatten__(t)
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in inner)


def _bnb_layer(bnb: Any, m: nn.Linear, scheme: str) -> nn.Module:
    w = m.weight
    bias = m.bias is not None
    layer: nn.Module
    if scheme == "nf4":
        layer = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=bias, compute_dtype=w.dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(w.detach().clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if m.bias is not None:
        layer.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    layer = layer.to(w.device)  # bitsandbytes quantizes on the move to a device
    layer.train(m.training)
    return layer


def _bnb_bytes(layer: nn.Module) -> int:
    w: Any = layer.weight
    n = w.numel() * w.element_size()
    state = getattr(w, "quant_state", None)
    if state is not None:
        n += state.absmax.numel() * state.absmax.element_size()
        if state.state2 is not None:
            n += state.state2.absmax.numel() * state.state2.absmax.element_size()
    scb = getattr(w, "SCB", None)
    return int(n + (scb.numel() * scb.element_size() if isinstance(scb, torch.Tensor) else 0))
