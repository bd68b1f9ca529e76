"""Plan -> build: the adapter modules of one :class:`~peftkit.plan.AdapterPlan`, not yet attached.

:func:`build` is the one place adapters are made, for ``wrap`` and for loading alike; with
``on_meta`` it is a dry run on meta-device twins of the modules (shapes and dtypes, no memory),
which loading uses to check a file's tables before allocating anything it declares.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import AdapterFileError, PeftkitError, PluginError, TargetError
from .heads import MultiHead, fresh_layer
from .method import Adapter, Delta, LowRankDelta, Method, SparseDelta
from .plan import AdapterPlan
from .quantized import logical_dtype, logical_shape, quantization_of
from .targets import calls_forward, host_of, is_under

__all__ = ["AdapterSet", "Prepared", "build", "delta_names", "float_stand_in", "meta_twin", "output_only",
           "quantized_tensors"]


class AdapterSet(nn.Module):
    """The trainable modules of one named adapter: the method's per-target adapters (with the spec
    each was built from), whole-module copies (``train`` modules, and fresh output layers for
    ``head=N``), and optional multi-task heads."""

    def __init__(self, plan: AdapterPlan, adapters: Sequence[Adapter], copies: Sequence[nn.Module],
                 heads: MultiHead | None = None) -> None:
        super().__init__()
        self.paths = list(plan.targets)
        self.specs = {p: dict(s) for p, s in plan.targets.items()}
        self.adapters = nn.ModuleList(adapters)
        self.train_paths = list(plan.train)
        self.copies = nn.ModuleList(copies)
        self.fresh = dict(plan.fresh)  # train path -> outputs, for new output layers (head=N)
        self.heads_path = plan.heads[0] if plan.heads else None
        self.heads = heads

    def items(self) -> Iterator[tuple[str, Adapter]]:
        """(target path, the method's adapter) pairs."""
        adapters: list[Adapter] = [a for a in self.adapters if isinstance(a, Adapter)]
        return zip(self.paths, adapters, strict=True)

    def train_items(self) -> Iterator[tuple[str, nn.Module]]:
        """(module path, trained copy) pairs, fresh output layers included."""
        return zip(self.train_paths, list(self.copies), strict=True)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Everything an adapter file stores for this adapter, keyed by backbone path."""
        out: dict[str, torch.Tensor] = {}
        parts: list[tuple[str, nn.Module]] = [*self.items(), *self.train_items()]
        if self.heads is not None and self.heads_path is not None:
            parts.append((self.heads_path, self.heads))
        for path, module in parts:
            for key, t in (module.file_state() if isinstance(module, Adapter) else module.state_dict()).items():
                full = f"{path}.{key}" if path else key
                if full in out:
                    raise PluginError(f"two adapter tensors share the file key {full!r}; rename one")
                out[full] = t
        return out


@dataclass
class Prepared:
    """An adapter built and validated but not yet attached (so a refusal changes nothing).

    Attributes:
        plan: What it was built from.
        modules: The built modules.
        cache: Facts already checked (from a file's header), reused by a later hot swap.
    """

    plan: AdapterPlan
    modules: AdapterSet
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> Method[Any]:
        """The configured method."""
        return self.plan.method


def _takes_spec(method: Method[Any]) -> bool:
    """Whether ``method.build`` takes the spec (a plugin written for ``build(path, module)`` does not)."""
    params = list(inspect.signature(method.build).parameters.values())
    return len(params) >= 3 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def build(model: nn.Module, plan: AdapterPlan, *, on_meta: bool = False, dry_run: bool = True,
          source: str | None = None) -> Prepared:
    """Build the adapters of ``plan`` for ``model``: one per target (from the target's spec), a copy
    of each ``train`` module (or a fresh output layer), multi-task heads; then the plan's values.

    Args:
        model: The backbone (unchanged).
        plan: From :func:`peftkit.plan.make_plan` or from an adapter file.
        on_meta: Build from meta-device twins of the modules: a dry run giving the shapes and
            dtypes a file must hold, allocating nothing. It also checks each adapter's weight-space
            form against its module: every delta names a tensor the module holds, of its size.
        dry_run: Before a real build, do that dry run (off where the caller has just done it).
        source: The file the plan comes from: a failure of the method's ``build`` is then the
            file's (an :class:`AdapterFileError` naming it), not the plugin's.

    Raises:
        TargetError: a target inside a trained or replaced module, or a transform-only adapter on a
            module that never runs its own forward.
        PluginError: the method's ``build`` raised or returned something other than an Adapter, a
            delta does not fit its module, or the plan's values do not fit the adapter built.
        AdapterFileError: with ``source``, the method cannot build from the file's specs.
    """
    if not on_meta and dry_run:
        build(model, plan, on_meta=True, source=source)
    m = plan.method
    train_paths = plan.train
    for p in plan.targets:
        if (is_under(p, train_paths) or any(is_under(t, [p]) for t in train_paths)
                or (plan.heads and is_under(p, [plan.heads[0]]))):
            raise TargetError(f"module {p!r} is both a target and (inside) a trained or replaced module; "
                              "a trained module is saved whole, so drop it from one of the lists")

    def module_at(path: str) -> nn.Module:
        return meta_twin(model.get_submodule(path)) if on_meta else model.get_submodule(path)

    with torch.device("meta") if on_meta else contextlib.nullcontext():
        takes_spec = _takes_spec(m)
        make: Callable[..., object] = m.build  # also a plugin's build(path, module); what it returns is checked below
        adapters: list[Adapter] = []
        for p, spec in plan.targets.items():
            module = module_at(p)
            try:
                adapter = make(p, module, spec) if takes_spec else make(p, module)
            except PeftkitError:
                raise
            except Exception as exc:  # the plugin's own failure, or a spec from a file it cannot take
                why = f"{type(exc).__name__}: {str(exc)[:200]}"
                if source is not None:
                    raise AdapterFileError(f"{source} has target specs method {m.name!r} cannot build from: {why}") from None
                raise PluginError(f"method {m.name!r} could not build the adapter for {p!r} "
                                  f"({type(module).__name__}): {why}") from exc
            if not isinstance(adapter, Adapter):
                raise PluginError(f"method {m.name!r} built {type(adapter).__name__} for {p!r}; build() must return a peftkit.Adapter")
            if any("spec" in vars(k) for k in type(adapter).__mro__ if k is not Adapter):
                raise PluginError(f"method {m.name!r}: {type(adapter).__name__}.spec() is no longer called; return what "
                                  "it held from Method.plan() as the target's spec (see docs/plugins.md)")
            _check_runs(model, m, p, adapter)
            if not on_meta:
                _check_quantized(model, m, p, module, adapter)
            if on_meta and adapter.has_delta:
                _check_deltas(m, p, module, adapter)
            if p in plan.values and not on_meta:
                _fill(m, p, adapter, plan.values[p])
            adapters.append(adapter)
        copies = []
        for p in train_paths:
            if p not in plan.fresh and not on_meta:
                _refuse_quantized_copy(model.get_submodule(p), p)
            c = fresh_layer(module_at(p), plan.fresh[p]) if p in plan.fresh else copy.deepcopy(module_at(p))
            for prm in c.parameters():
                prm.requires_grad_(True)
            copies.append(c)
        heads = MultiHead(module_at(plan.heads[0]), plan.heads[1]) if plan.heads else None
    return Prepared(plan, AdapterSet(plan, adapters, copies, heads))


def quantized_tensors(module: nn.Module) -> dict[str, str]:
    """name -> quantization of each quantized tensor of ``module`` (its children's included)."""
    return {n: q for n, t in module.named_parameters() if (q := quantization_of(t)) is not None}


def delta_names(adapter: Adapter, module: nn.Module) -> list[str]:
    """The names of the tensors of ``module`` that ``adapter``'s delta would change, asked of a float
    stand-in where ``module`` holds quantized tensors: a plugin's ``delta`` computes with the weight
    (IA3's ``scale * weight``), which a quantized tensor cannot take part in."""
    with torch.no_grad():
        return list(adapter.delta(float_stand_in(module) if quantized_tensors(module) else module) or {})


def float_stand_in(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose quantized tensors (its children's too) are zeros of the float
    shape and dtype they stand for, expanded from one element (no memory); the other tensors are its own."""
    return _twin(module, lambda owner, k, t: nn.Parameter(
        torch.zeros((), dtype=logical_dtype(owner, t), device=t.device).expand(logical_shape(owner, k, t)),
        requires_grad=False) if quantization_of(t) else t)


def output_only(model: nn.Module, path: str, adapter: Adapter) -> bool:
    """Whether the adapter on ``path`` applies in output space only: its target holds quantized tensors,
    which cannot take ``W + delta`` (see :func:`_check_quantized`, which refused the other cases)."""
    return adapter.has_transform and not host_of(model, path)[1] and bool(quantized_tensors(model.get_submodule(path)))


def _check_quantized(model: nn.Module, m: Method[Any], path: str, module: nn.Module, adapter: Adapter) -> None:
    """Refuse an adapter that could only apply by adding to a quantized tensor of its target (the
    rounding would swallow the delta, and the backbone would change): one with no output-space form,
    one whose target its parent reads directly, one that stands in for its target's forward."""
    quantized = quantized_tensors(module)
    if not quantized:
        return
    prefix = host_of(model, path)[1]
    if adapter.has_transform and not prefix:
        return
    try:
        names = delta_names(adapter, module)
    except Exception:  # noqa: BLE001 (a delta that cannot be computed even on the float stand-in: refuse)
        names = list(quantized)
    hit = [n for n in names if n in quantized]
    if not hit and not adapter.has_stand_in:
        return  # e.g. a bias delta beside a quantized weight
    name = hit[0] if hit else next(iter(quantized))
    how = ("its parent reads the weight directly, so the adapter could only add to it" if prefix else
           "the adapter only applies by adding to the weight itself (W + delta)")
    raise TargetError(
        f"method {m.name!r} cannot adapt {path!r}: {path}.{name} is quantized ({quantized[name]}) and {how}, which a "
        "quantized tensor cannot take. Leave it out of targets (exclude=[...]), use a method with an output-space "
        "form (lora, serial_adapter, parallel_adapter), or keep that layer in float (peftkit.quantize(..., targets=[...])).")


def _refuse_quantized_copy(module: nn.Module, path: str) -> None:
    quantized = quantized_tensors(module)
    if quantized:
        name, kind = next(iter(quantized.items()))
        raise TargetError(f"train=[{path!r}] trains a copy of that module, but {path}.{name} is quantized ({kind}); "
                          "keep it in float (peftkit.quantize(..., targets=[...]) without it), or replace it with a "
                          "fresh head (head=N / heads={...})")


def _check_deltas(m: Method[Any], path: str, module: nn.Module, adapter: Adapter) -> None:
    """Refuse, on the dry run, a weight-space form that names a tensor the module does not hold (or
    holds as None, such as a Linear's bias=False) or that is not of that tensor's size: otherwise it
    would fail only later, at the first inference or merge."""
    try:
        with torch.no_grad():
            deltas = adapter.delta(module)
    except Exception:  # noqa: BLE001 (a delta needing real values, e.g. data-dependent ops, cannot be checked here)
        return
    if deltas is None:
        return
    for name, d in deltas.items():
        owner, _, leaf = name.rpartition(".")
        try:
            holder = module.get_submodule(owner) if owner else module
        except AttributeError:
            holder = None
        base = None if holder is None else holder._parameters.get(leaf, holder._buffers.get(leaf))
        if base is None:
            held = [n for n, _ in [*module.named_parameters(), *module.named_buffers()]]
            empty = " (it is None there)" if holder is not None and leaf in {*holder._parameters, *holder._buffers} else ""
            raise PluginError(f"method {m.name!r}: the adapter for {path!r} returns a delta for {name!r}, which "
                              f"{type(module).__name__} at {path!r} does not hold{empty}; it holds: "
                              f"{', '.join(held) or 'no tensors'}. A delta can go only to a tensor the module has "
                              "(check it in can_adapt or build).")
        if not _fits(d, base):
            raise PluginError(f"method {m.name!r}: the adapter for {path!r} returns a delta for {name!r} that does "
                              f"not fit that tensor's shape {list(base.shape)}")


def _fits(d: Delta, base: torch.Tensor) -> bool:
    """Whether a delta can be added to ``base``: a dense one broadcasting to its shape, a low-rank one
    of its size, a sparse one with as many positions as values."""
    if isinstance(d, SparseDelta):
        return d.index.dim() == 1 and d.index.shape == d.values.shape
    if isinstance(d, LowRankDelta):
        return d.left.dim() == 2 and d.right.dim() == 2 and d.left.shape[0] * d.right.shape[1] == base.numel()
    # broadcasting to base's shape: aligned from the right, each dimension 1 or base's
    return d.dim() <= base.dim() and all(a in (1, b) for a, b in zip(reversed(d.shape), reversed(base.shape), strict=False))


def _check_runs(model: nn.Module, m: Method[Any], path: str, adapter: Adapter) -> None:
    """Refuse a transform-only adapter on a module whose parent reads its weights directly (dead)."""
    host, prefix = host_of(model, path)
    if prefix and not adapter.has_delta:
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        if not calls_forward(parent, path.rsplit(".", 1)[-1]):
            raise TargetError(
                f"{path!r} never runs its own forward: {type(model.get_submodule(host)).__name__} at {host!r} "
                f"reads its weights directly, and method {m.name!r} only transforms outputs, so the adapter "
                f"would be dead. Target {host!r} instead.")


def _fill(m: Method[Any], path: str, adapter: Adapter, values: dict[str, torch.Tensor]) -> None:
    """Copy planned initial values into a freshly built adapter (keys and shapes must match)."""
    state = adapter.state_dict(keep_vars=True)
    for key, value in values.items():
        if key not in state or tuple(state[key].shape) != tuple(value.shape):
            have = tuple(state[key].shape) if key in state else "no such tensor"
            raise PluginError(f"method {m.name!r} planned a value for {path}.{key} of shape {tuple(value.shape)}, "
                              f"but the adapter it built has {have}")
        with torch.no_grad():
            state[key].copy_(value)


def meta_twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose tensors, and its children's, are on the meta device: an
    adapter built for it allocates nothing (see :func:`build`)."""
    return _twin(module, lambda owner, k, t: nn.Parameter(  # a quantized tensor's twin: the float shape and dtype
        torch.empty(logical_shape(owner, k, t), dtype=logical_dtype(owner, t), device="meta"),
        requires_grad=t.requires_grad), lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"))


def _twin(module: nn.Module, parameter: Callable[[nn.Module, str, torch.Tensor], torch.Tensor],
          buffer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """A shallow copy of ``module`` and its children, each parameter replaced by ``parameter(owner,
    name, tensor)`` and each buffer by ``buffer(tensor)`` (kept where ``buffer`` is None)."""
    twin = object.__new__(type(module))  # not copy.copy: a parametrized module refuses to be pickled or copied
    twin.__dict__.update(module.__dict__)
    twin.__dict__["_parameters"] = {k: None if t is None else parameter(module, k, t)
                                    for k, t in module._parameters.items()}
    if buffer is not None:
        twin.__dict__["_buffers"] = {k: None if t is None else buffer(t) for k, t in module._buffers.items()}
    twin.__dict__["_modules"] = {k: None if c is None else _twin(c, parameter, buffer) for k, c in module._modules.items()}
    return twin
