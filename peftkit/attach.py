"""The runtime: forward hooks that apply adapters beside a backbone without changing its modules.

One :class:`Slot` per *host* module (the module whose forward reads the adapted tensors). Before the
host runs, weight-space contributions are substituted for its tensors (``W + delta``, or a ``train``
module's own copies); after it runs, output-space transforms are applied and the original tensors
are put back (also when the forward raises). The backbone's module tree, classes and
``state_dict()`` keys never change.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .method import Adapter, add_delta, detach_delta


@dataclass
class RuntimeState:
    """What every slot of one AdaptedModel consults on each call."""

    active: list[str] = field(default_factory=list)
    disabled: bool = False
    merged: set[str] = field(default_factory=set)

    def live(self, name: str, persistent: bool = False) -> bool:
        """Whether an adapter applies now (a persistent entry, e.g. multi-task heads, also when merged)."""
        return not self.disabled and name in self.active and (persistent or name not in self.merged)


@dataclass
class Entry:
    """One adapter's (or one ``train`` copy's) attachment to a host.

    Attributes:
        adapter_name: The AdaptedModel's name for the adapter this entry belongs to.
        target: The target module (the host itself, or a child the host reads directly).
        prefix: Prefix of the target's tensor names as seen from the host (``""`` or ``"out_proj."``).
        adapter: The Adapter module, for an adapter entry.
        replacement: For a ``train`` entry, the trained copy whose tensors replace the host's.
        mapping: With ``replacement``: host tensor name -> copy tensor name, when only some tensors
            are replaced (a tensor tied to a trained module's); default: all, by their own names.
        persistent: Applies even while its adapter is merged (it has no weight-space form).
    """

    adapter_name: str
    target: nn.Module
    prefix: str = ""
    adapter: Adapter | None = None
    replacement: nn.Module | None = None
    mapping: dict[str, str] | None = None
    persistent: bool = False

    def form(self, grad: bool) -> str:
        """How this adapter applies now: ``"delta"`` (weight space, differentiable), ``"fold"`` (weight
        space without autograd, plus the adapter's :meth:`~peftkit.Adapter.fold_gradient`) or
        ``"transform"`` (output space). Inference prefers the delta (no extra activations). Training
        prefers the fold where the adapter offers it (the target's own kernels then carry the
        adapter, and no weight gradient is computed), else the output form (autograd through a
        low-rank path is cheaper than through a full weight). A target read directly by its host can
        only use the delta."""
        a = self.adapter
        assert a is not None
        if self.prefix:
            return "delta"
        training = grad and any(p.requires_grad for p in a.parameters())
        if training and a.has_delta and a.folds_in_training(self.target):
            return "fold"
        if not a.has_transform:
            return "delta"
        if not a.has_delta:
            return "transform"
        if a.train_in_weight_space:
            return "delta"
        return "transform" if training else "delta"


def tensor_slot(module: nn.Module, name: str) -> tuple[dict[str, Any], str]:
    """The dict (``_parameters`` or ``_buffers``) holding tensor ``name`` (dotted) and its key."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        return owner._parameters, leaf
    if leaf in owner._buffers:
        return owner._buffers, leaf
    raise KeyError(f"{type(module).__name__} has no tensor {name!r}")


def replacement_tensors(copy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of a ``train`` copy, by name."""
    yield from copy.named_parameters()
    yield from ((n, b) for n, b in copy.named_buffers() if b is not None)


class Slot:
    """The hooks on one host module and the entries they apply."""

    def __init__(self, host: nn.Module, state: RuntimeState) -> None:
        self.host = host
        self.state = state
        self.entries: list[Entry] = []
        self.fired = False
        self.cache = True  # keep no-grad substitutions (W + delta) until an adapter or base tensor changes
        self._cached: tuple[tuple[Any, ...], dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, int]]] | None = None
        self._saved: list[list[tuple[dict[str, Any], str, Any]]] = []
        self._handles = [
            host.register_forward_pre_hook(self._pre, with_kwargs=True),
            host.register_forward_hook(self._post, with_kwargs=True),
            host.register_forward_hook(self._restore, always_call=True),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def substitutions(self, entries: list[Entry], grad: bool) -> dict[str, torch.Tensor]:
        """Tensor name (relative to the host) -> the tensor to use in its place, for this call."""
        subs: dict[str, torch.Tensor] = {}
        for e in entries:
            if e.replacement is not None:
                tensors = dict(replacement_tensors(e.replacement))
                subs.update(tensors if e.mapping is None else {h: tensors[c] for h, c in e.mapping.items()})
            elif (form := e.form(grad)) != "transform":
                with torch.set_grad_enabled(grad and form == "delta"):
                    deltas = e.adapter.delta(e.target)  # type: ignore[union-attr]
                for name, d in (deltas or {}).items():
                    key = e.prefix + name
                    base = subs[key] if key in subs else _get(self.host, key)
                    # a folded delta carries no autograd (fold_gradient does), but a trainable base still does
                    subs[key] = add_delta(base, detach_delta(d) if form == "fold" else d)
        return subs

    def clear_cache(self) -> None:
        self._cached = None

    @staticmethod
    def _stamp(entries: list[Entry]) -> tuple[Any, ...]:
        """Identity and version of every tensor the substitutions are computed from."""
        parts: list[Any] = []
        for e in entries:
            module = e.adapter if e.adapter is not None else e.replacement
            parts.append(id(e))
            parts.extend((id(t), t._version) for t in module.parameters())  # type: ignore[union-attr]
            parts.extend((id(t), t._version) for t in module.buffers())  # type: ignore[union-attr]
        return tuple(parts)

    def _cached_substitutions(self, entries: list[Entry]) -> dict[str, torch.Tensor]:
        # Inference: fold the deltas in once (W + s*B@A) and reuse them until something changes;
        # the unmerged model then runs as fast as the merged one.
        stamp = self._stamp(entries)
        if self._cached is not None and self._cached[0] == stamp and all(
                _get(self.host, k) is base and base._version == v for k, (base, v) in self._cached[2].items()):
            return self._cached[1]
        subs = self.substitutions(entries, grad=False)
        bases = {k: (_get(self.host, k), _get(self.host, k)._version) for k in subs}
        self._cached = (stamp, subs, bases)
        return subs

    def _live(self) -> list[Entry]:
        return [e for e in self.entries if self.state.live(e.adapter_name, e.persistent)]

    def _pre(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fired = True
        entries = self._live()
        if not entries:
            self._saved.append([])
            return
        grad = torch.is_grad_enabled()
        subs = self._cached_substitutions(entries) if self.cache and not grad else self.substitutions(entries, grad)
        saved = []
        for name, tensor in subs.items():
            store, key = tensor_slot(host, name)
            saved.append((store, key, store[key]))
            store[key] = tensor
        self._saved.append(saved)

    def _post(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        grad = torch.is_grad_enabled()
        for e in self._live():
            if e.adapter is None:
                continue
            form = e.form(grad)
            if form == "transform":
                output = e.adapter.transform(e.target, args, kwargs, output)
            elif form == "fold":
                output = e.adapter.fold_gradient(e.target, args, kwargs, output)
        return output

    def _restore(self, host: nn.Module, args: Any, output: Any) -> None:
        if self._saved:
            for store, key, original in reversed(self._saved.pop()):
                store[key] = original


def _get(module: nn.Module, name: str) -> torch.Tensor:
    store, key = tensor_slot(module, name)
    return store[key]
