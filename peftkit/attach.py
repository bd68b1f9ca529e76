"""The runtime: forward hooks that apply adapters beside a backbone without changing its modules.

One :class:`Slot` per *host* module (the module whose forward reads the adapted tensors). Before the
host runs, weight-space contributions are substituted for its tensors (``W + delta``, or a ``train``
module's own copies); after it runs, output-space transforms are applied and the original tensors
are put back (also when the forward raises). The backbone's module tree, classes and
``state_dict()`` keys never change. A host one of whose adapters can stand in for its forward
(:meth:`~peftkit.Adapter.stand_in`) also gets an instance-level ``forward`` that defers to the
class's own except on the calls the adapter takes; it is removed with the hooks.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ConfigError, TargetError
from .method import Adapter, add_delta, detach_delta, scale_delta
from .rows import PLAIN, Routing, put_rows, row_error, take_rows
from .targets import host_of
from .transaction import Journal

__all__ = ["AdapterEntry", "CopyEntry", "Entry", "Form", "Frame", "RuntimeState", "Slot", "TensorStamp", "acting_host", "release", "replacement_tensors", "slots_in", "stamps_match", "tensor_slot"]


@dataclass
class RuntimeState:
    """What every slot of one AdaptedModel consults on each call."""

    active: list[str] = field(default_factory=list)
    disabled: bool = False
    merged: set[str] = field(default_factory=set)
    routing: Routing | None = None  # a mixed-adapter batch: which rows each adapter serves
    weights: dict[str, float] | None = None  # peftkit.Average: each active adapter's change weighted
    parallel: tuple[str, ...] | None = None  # peftkit.Parallel: one output per branch
    # False after a training forward with adapter_names: a recomputation during its backward (gradient
    # checkpointing) would run without the rows' adapters, so the hooks refuse it
    replayable: bool = True

    def live(self, name: str, persistent: bool = False) -> bool:
        """Whether an adapter applies now (a persistent entry, e.g. multi-task heads, also when merged)."""
        return not self.disabled and name in self.active and (persistent or name not in self.merged)

    @contextlib.contextmanager
    def scope(self, active: list[str] | None = None, routing: Routing | None = None,
              disabled: bool | None = None, mixed: bool = False) -> Iterator[None]:
        """For one call: these active adapters, this routing (none: every row alike), this switch.
        ``mixed``: the call has ``adapter_names`` (with autograd on, its backward cannot recompute)."""
        if torch.is_grad_enabled():
            self.replayable = not mixed
        before = self.active, self.routing, self.disabled, self.weights, self.parallel
        if active is not None:  # these adapters, plainly: no composition
            self.active, self.weights, self.parallel = active, None, None
        self.routing = routing
        self.disabled = self.disabled if disabled is None else disabled
        try:
            yield
        finally:
            self.active, self.routing, self.disabled, self.weights, self.parallel = before


class Form(enum.Enum):
    """How an adapter applies to its target on one call (see :meth:`AdapterEntry.form`)."""

    DELTA = "delta"  # weight space, differentiable: the target runs with W + delta
    FOLD = "fold"  # weight space without autograd, plus the adapter's fold_gradient on the output
    TRANSFORM = "transform"  # output space: the adapter's transform after the target's forward


@dataclass
class AdapterEntry:
    """One adapter's attachment to a host.

    Attributes:
        adapter_name: The AdaptedModel's name for the adapter this entry belongs to.
        target: The target module (the host itself, or a child the host reads directly).
        adapter: The Adapter module.
        prefix: Prefix of the target's tensor names as seen from the host (``""`` or ``"out_proj."``).
        mapping: Host tensor name -> the tensor's name in the target, for an entry on a module that
            shares a tensor with the target (tied weights); default: all the target's tensors, by
            their own names.
        persistent: Applies even while its adapter is merged (it has no weight-space form).
        output_only: The target's weight is quantized: the adapter applies in output space only (a
            quantized tensor cannot take ``W + delta``).
    """

    adapter_name: str
    target: nn.Module
    adapter: Adapter
    prefix: str = ""
    mapping: dict[str, str] | None = None
    persistent: bool = False
    output_only: bool = False

    def form(self, grad: bool, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Form:
        """How this adapter applies now (``args``/``kwargs``: the target's call, where known).
        Inference prefers the delta (no extra activations). Training prefers the fold where the
        adapter offers it for this call (the target's own kernels then carry the adapter, and no
        weight gradient is computed), else the output form (autograd through a low-rank path is
        cheaper than through a full weight). A target read directly by its host can only use the
        delta."""
        a = self.adapter
        if self.output_only:
            return Form.TRANSFORM
        if self.prefix or self.mapping is not None:  # the host reads the target's tensors: weight space only
            return Form.DELTA
        training = self.trains(grad)
        if training and a.has_delta and a.folds_in_training(self.target, args, kwargs or {}):
            return Form.FOLD
        if not a.has_transform:
            return Form.DELTA
        if not a.has_delta:
            return Form.TRANSFORM
        if a.train_in_weight_space:
            return Form.DELTA
        return Form.TRANSFORM if training else Form.DELTA

    def trains(self, grad: bool) -> bool:
        """Whether the adapter trains on this call: autograd on and some parameter of it trainable."""
        return grad and any(p.requires_grad for p in self.adapter.parameters())

    @property
    def can_stand_in(self) -> bool:
        """Whether the adapter offers :meth:`~peftkit.Adapter.stand_in` on a target that is its own host."""
        return not self.prefix and self.mapping is None and self.adapter.has_stand_in

    def stands_in(self, grad: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this adapter computes the host's whole output for this call (training only)."""
        return self.can_stand_in and not self.output_only and self.trains(grad) and self.adapter.stands_in(self.target, args, kwargs)


@dataclass
class CopyEntry:
    """A ``train`` module's trained copy, whose tensors replace the host's.

    Attributes:
        adapter_name: The AdaptedModel's name for the adapter this entry belongs to.
        target: The module trained whole (the host itself, or for tied weights the module it shares a
            tensor with).
        copy: The trained copy.
        mapping: Host tensor name -> the tensor's name in the copy, for a module sharing a tensor
            with the trained one (tied weights); default: all the copy's tensors, by their own names.
    """

    adapter_name: str
    target: nn.Module
    copy: nn.Module
    mapping: dict[str, str] | None = None
    persistent: bool = False  # a copy always has a weight-space form, so merging replaces it

    def trains(self, grad: bool) -> bool:
        """Whether the copy trains on this call: autograd on and some parameter of it trainable."""
        return grad and any(p.requires_grad for p in self.copy.parameters())


Entry = AdapterEntry | CopyEntry


@dataclass
class Frame:
    """One call of a host: the tensors substituted for it, and the entry standing in for its forward."""

    substituted: Journal = field(default_factory=Journal)
    after: list[tuple[AdapterEntry, Form]] = field(default_factory=list)  # entries applied after the forward, and how
    stand_in: AdapterEntry | None = None
    taken: bool = False  # the stand-in ran (once: a nested call of the same host runs normally)


def tensor_slot(module: nn.Module, name: str) -> tuple[dict[str, Any], str]:
    """The dict (``_parameters`` or ``_buffers``) holding tensor ``name`` (dotted) and its key."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        return owner._parameters, leaf
    if leaf in owner._buffers:
        return owner._buffers, leaf
    raise TargetError(f"{type(module).__name__} holds no tensor {name!r} of its own (a parametrization or a hook may "
                      "compute it on each call), so an adapter cannot put a delta there; leave this module out of targets")


def acting_host(model: nn.Module, path: str, adapter: Adapter) -> tuple[str, str]:
    """Where the adapter for the module at ``path`` acts, and the prefix of that module's tensor names
    as seen from there: the ancestor reading the target's tensors directly (weight space), except for
    a transform-only adapter whose target still runs its own forward."""
    host, prefix = host_of(model, path)
    return (path, "") if prefix and not adapter.has_delta else (host, prefix)


def replacement_tensors(copy: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of a ``train`` copy, by name."""
    yield from copy.named_parameters()
    yield from ((n, b) for n, b in copy.named_buffers() if b is not None)


class TensorStamp:
    """What a cache computed from a tensor must still match: the same tensor object, unchanged in
    place (its version counter), with the same storage, dtype, device and shape. ``.to()``,
    ``.half()`` and ``param.data = ...`` swap the storage without bumping the version counter, so the
    storage is compared too; a detached alias keeps the old storage alive, so its address cannot be
    reused by a new one while the stamp exists."""

    __slots__ = ("alias", "tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.alias = tensor.detach()
        self.version = tensor._version

    def matches(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is still the stamped tensor, unchanged (see the class docstring)."""
        a = self.alias
        return (tensor is self.tensor and tensor._version == self.version and tensor.dtype == a.dtype
                and tensor.device == a.device and tensor.shape == a.shape and tensor.data_ptr() == a.data_ptr())


def stamps_match(stamps: list[TensorStamp], tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor still matches its stamp (same count, same order)."""
    return len(stamps) == len(tensors) and all(s.matches(t) for s, t in zip(stamps, tensors, strict=True))


def slots_in(module: nn.Module) -> list[tuple[str, Slot]]:
    """Every peftkit slot hooked anywhere in ``module`` (``(path, slot)``): non-empty when an
    AdaptedModel (alive, or not yet collected) is attached to it or to part of it."""
    found = []
    for path, m in module.named_modules(remove_duplicate=False):
        for hook in m._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Slot):
                found.append((path, owner))
    return found


def release(slots: dict[str, Slot]) -> None:
    """Remove every slot's hooks (and instance forwards) from its host; ``slots`` is emptied."""
    for slot in slots.values():
        slot.remove()
    slots.clear()


class Slot:
    """The hooks on one host module and the entries they apply."""

    def __init__(self, host: nn.Module, state: RuntimeState, path: str = "", batch_second: bool = False) -> None:
        self.host = host
        self.state = state
        self.path = path
        self.batch_second = batch_second  # the host, a module in it or one around it is batch_first=False
        self.entries: list[Entry] = []
        self.fired = False
        self.cache = True  # keep no-grad substitutions (W + delta) until an adapter or base tensor changes
        self._cached: tuple[list[int], list[TensorStamp], dict[str, torch.Tensor], dict[str, TensorStamp]] | None = None
        self._frames: list[Frame] = []  # a stack: a host may be called again inside its own forward
        self._inner_forward: Any = None  # an instance-level forward that was there before ours (accelerate's)
        self._forward_installed = False
        self._handles = [
            host.register_forward_pre_hook(self._pre, with_kwargs=True),
            host.register_forward_hook(self._post, with_kwargs=True),
            host.register_forward_hook(self._restore, always_call=True),
        ]

    def add(self, entry: Entry) -> None:
        """Attach one more entry; an adapter that can stand in for the host's forward gets the hook for it."""
        self.entries.append(entry)
        if isinstance(entry, AdapterEntry) and entry.can_stand_in:
            self._install_forward()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._forward_installed:
            if self.host.__dict__.get("forward") == self._forward:  # nobody wrapped it after us
                if self._inner_forward is None:
                    del self.host.__dict__["forward"]
                else:
                    self.host.forward = self._inner_forward
            self._forward_installed = False

    def _install_forward(self) -> None:
        # The one thing a hook cannot do is skip the host's forward: an instance attribute can. A
        # bound method (not a closure) so that deepcopy and pickle copy the slot with the module.
        if self._forward_installed:
            return
        self._inner_forward = self.host.__dict__.get("forward")
        self.host.forward = self._forward
        self._forward_installed = True

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        frame = self._frames[-1] if self._frames else None
        if frame is not None and frame.stand_in is not None and not frame.taken:
            frame.taken = True
            return frame.stand_in.adapter.stand_in(frame.stand_in.target, args, kwargs)
        if self._inner_forward is not None:
            return self._inner_forward(*args, **kwargs)
        return type(self.host).forward(self.host, *args, **kwargs)

    def substitutions(self, entries: list[Entry], grad: bool,
                      forms: list[Form | None] | None = None) -> dict[str, torch.Tensor]:
        """Tensor name (relative to the host) -> the tensor to use in its place, for this call
        (``forms``: each adapter entry's :meth:`AdapterEntry.form`, when the caller has them)."""
        subs: dict[str, torch.Tensor] = {}
        for i, e in enumerate(entries):
            if isinstance(e, CopyEntry):
                tensors = dict(replacement_tensors(e.copy))
                subs.update(tensors if e.mapping is None else {h: tensors[c] for h, c in e.mapping.items()})
                continue
            form = forms[i] if forms is not None and forms[i] is not None else self._form(e, grad)
            if form is Form.TRANSFORM:
                continue
            with torch.set_grad_enabled(grad and form is Form.DELTA):
                deltas = e.adapter.delta(e.target)
            weight = self.state.weights.get(e.adapter_name, 1.0) if self.state.weights else 1.0
            for name, d in (deltas or {}).items():
                d = d if weight == 1.0 else scale_delta(d, weight)
                keys = [e.prefix + name] if e.mapping is None else [h for h, t in e.mapping.items() if t == name]
                for key in keys:
                    base = subs[key] if key in subs else _get(self.host, key)
                    # a folded delta carries no autograd (fold_gradient does), but a trainable base still does
                    subs[key] = add_delta(base, detach_delta(d) if form is Form.FOLD else d)
        return subs

    def clear_cache(self) -> None:
        self._cached = None

    @staticmethod
    def _sources(entries: list[Entry]) -> list[torch.Tensor]:
        """Every adapter and ``train``-copy tensor the substitutions are computed from."""
        out: list[torch.Tensor] = []
        for e in entries:
            module = e.adapter if isinstance(e, AdapterEntry) else e.copy
            out.extend(module.parameters())
            out.extend(b for b in module.buffers() if b is not None)
        return out

    def _cached_substitutions(self, entries: list[Entry]) -> dict[str, torch.Tensor]:
        # Inference: fold the deltas in once (W + s*B@A) and reuse them until something changes (an
        # adapter or base tensor edited in place, moved or cast, the set of entries); the unmerged
        # model then runs as fast as the merged one.
        sources = self._sources(entries)
        if self._cached is not None:
            ids, source_stamps, subs, base_stamps = self._cached
            if (ids == [id(e) for e in entries] and stamps_match(source_stamps, sources)
                    and all(stamp.matches(_get(self.host, k)) for k, stamp in base_stamps.items())):
                return subs
        subs = self.substitutions(entries, grad=False)
        self._cached = ([id(e) for e in entries], [TensorStamp(t) for t in sources], subs,
                        {k: TensorStamp(_get(self.host, k)) for k in subs})
        return subs

    def trains_now(self) -> bool:
        """Whether an entry applied now has trainable parameters (an adapter, or a ``train`` copy)."""
        return any(e.trains(True) for e in self._live())

    def unwind(self) -> None:
        """Put back every tensor still substituted: after a forward that was interrupted where PyTorch
        runs no hooks (``KeyboardInterrupt``). A no-op after a normal call."""
        while self._frames:
            self._frames.pop().substituted.undo()

    def _live(self) -> list[Entry]:
        """The entries that apply now, in the order of the active adapters (a Stack's order)."""
        live = [e for e in self.entries if self.state.live(e.adapter_name, e.persistent)]
        if len({e.adapter_name for e in live}) > 1:
            order = {n: i for i, n in enumerate(self.state.active)}
            live.sort(key=lambda e: order.get(e.adapter_name, len(order)))  # stable: an adapter's own order stays
        return live

    def _form(self, e: AdapterEntry, grad: bool, args: tuple[Any, ...] = (),
              kwargs: dict[str, Any] | None = None) -> Form:
        """:meth:`AdapterEntry.form`, except under :class:`peftkit.Average`: each adapter's change is
        then weighted, in output space where it has that form (no fold: its gradient is unweighted)."""
        if not self.state.weights:
            return e.form(grad, args, kwargs)
        return Form.TRANSFORM if e.adapter.has_transform and not e.prefix and e.mapping is None else Form.DELTA

    def _pre(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fired = True
        if not self.state.replayable and self.state.routing is None and torch._C._current_graph_task_id() != -1:
            raise ConfigError(
                f"{self.path or type(host).__name__!r} runs again during the backward pass of a call with "
                "adapter_names (gradient checkpointing recomputes it), where the rows' adapters are not known any "
                "more. Turn gradient checkpointing off to train a mixed batch, or train each adapter's rows as "
                "their own batch")
        frame = Frame()
        self._frames.append(frame)
        if self.state.routing is not None:  # a mixed batch: the host runs as it is, _mixed adds the adapters
            return
        entries = self._live()
        if not entries:
            return
        grad = torch.is_grad_enabled()
        if self._forward_installed and host.__dict__.get("forward") == self._forward and not self.state.weights:
            frame.stand_in = next((e for e in entries if isinstance(e, AdapterEntry) and e.stands_in(grad, args, kwargs)),
                                  None)
            entries = [e for e in entries if e is not frame.stand_in]  # it applies its own delta
        # once per call, for both hooks
        forms = [self._form(e, grad, args, kwargs) if isinstance(e, AdapterEntry) else None for e in entries]
        subs = self._cached_substitutions(entries) if self.cache and not grad else self.substitutions(entries, grad, forms)
        frame.after = [(e, f) for e, f in zip(entries, forms, strict=True)
                       if isinstance(e, AdapterEntry) and f in (Form.TRANSFORM, Form.FOLD)]
        for name, tensor in subs.items():
            frame.substituted.put(*tensor_slot(host, name), tensor)

    def _post(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if self.state.routing is not None:
            return self._mixed(self.state.routing, host, args, kwargs, output)
        if self.state.weights and self._frames:  # Average: every adapter's change, from the same output, weighted
            changes = [(self.state.weights.get(e.adapter_name, 1.0), e.adapter.transform(e.target, args, kwargs, output))
                       for e, form in self._frames[-1].after if form is Form.TRANSFORM]
            return _weighted_changes(output, changes)
        for e, form in self._frames[-1].after if self._frames else ():
            if form is Form.TRANSFORM:
                output = e.adapter.transform(e.target, args, kwargs, output)
            else:
                output = e.adapter.fold_gradient(e.target, args, kwargs, output)
        return output

    def _restore(self, host: nn.Module, args: Any, output: Any) -> None:
        if self._frames:
            self._frames.pop().substituted.undo()

    def _mixed(self, routing: Routing, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               output: Any) -> Any:
        """A mixed-adapter batch: the host ran once on every row; each adapter now acts on its own
        rows. Output-space adapters transform those rows (all adapters of one class in one batched
        computation where the class offers :meth:`~peftkit.Adapter.transform_rows`); an adapter that
        can only act on weights (a sparse delta, a ``train`` copy, a packed attention weight) runs the
        host again on its rows alone, as a call with that adapter active would."""
        groups: dict[str, list[Entry]] = {}
        for e in self.entries:
            if e.adapter_name in routing.names and (e.persistent or e.adapter_name not in self.state.merged):
                groups.setdefault(e.adapter_name, []).append(e)
        if not groups:
            return output
        where = f"the module {self.path or type(host).__name__!r} ({type(host).__name__})"
        if self.batch_second:
            raise row_error(where, "its batch in the second dimension (batch_first=False, in it or around it)",
                            routing.size)
        device = _device_of(output, args, kwargs)
        batched: dict[type[Adapter], list[tuple[str, AdapterEntry]]] = {}
        rerun: list[str] = []
        transform: list[str] = []
        for name, entries in groups.items():
            if not all(isinstance(e, AdapterEntry) and e.adapter.has_transform and not e.prefix and e.mapping is None
                       for e in entries):
                rerun.append(name)
            elif len(entries) == 1 and isinstance(entries[0], AdapterEntry) and entries[0].adapter.has_transform_rows:
                batched.setdefault(type(entries[0].adapter), []).append((name, entries[0]))
            else:
                transform.append(name)
        pieces: list[tuple[torch.Tensor, Any]] = []
        if batched:  # the batched forms index rows themselves: check the call holds one per row first
            take_rows((args, kwargs), None, routing.size, where, host)
            take_rows((output,), None, routing.size, where, host)
        for cls, members in batched.items():
            lut = torch.full((len(routing.names) + 1,), -1, dtype=torch.long)  # routing position -> members', -1 last
            for j, (name, _) in enumerate(members):
                lut[routing.names.index(name)] = j
            index = lut.to(device)[routing.index_on(device)]
            done = cls.transform_rows(host, args, kwargs, output, [e.adapter for _, e in members], index)
            if done is NotImplemented:
                transform += [name for name, _ in members]
            else:
                output = done
        for name in transform:
            rows = routing.rows(name, device)
            sub_args, sub_kwargs = take_rows((args, kwargs), rows, routing.size, where, host)
            (sub,) = take_rows((output,), rows, routing.size, where, host)
            for e in groups[name]:
                assert isinstance(e, AdapterEntry)
                sub = e.adapter.transform(e.target, sub_args, sub_kwargs, sub)
            pieces.append((rows, sub))
        if rerun:
            _check_rerunnable((args, kwargs), where, rerun)
        for name in rerun:
            rows = routing.rows(name, device)
            sub_args, sub_kwargs = take_rows((args, kwargs), rows, routing.size, where, host)
            with self.state.scope(active=[name], routing=None):
                pieces.append((rows, host(*sub_args, **sub_kwargs)))
        return put_rows(output, pieces, routing.size, where, host)


def _check_rerunnable(call: Any, where: str, names: list[str]) -> None:
    """Refuse to run a host again on some rows when its call holds a stateful object (a key/value
    cache, which the second call would update again)."""
    odd = sorted({type(v).__name__ for v in pytree.tree_leaves(call) if not isinstance(v, PLAIN)})
    if odd:
        raise ConfigError(
            f"{where} would run again on the rows of {names} (whose adapters act on its weights), but its call holds "
            f"{', '.join(odd)}, which a second call would update again (a key/value cache). Pass use_cache=False "
            "with adapter_names, or run those adapters' rows as their own batch")


def _weighted_changes(output: Any, changes: list[tuple[float, Any]]) -> Any:
    """``output + sum_i w_i (t_i - output)`` over every floating-point tensor of the outputs."""
    if not changes:
        return output
    leaves, spec = pytree.tree_flatten(output)
    transformed = [pytree.tree_flatten(t)[0] for _, t in changes]
    out = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            for (w, _), t in zip(changes, transformed, strict=True):
                leaf = leaf + w * (t[i] - leaves[i])
        out.append(leaf)
    return pytree.tree_unflatten(out, spec)


def _device_of(*trees: Any) -> torch.device:
    """The device of the first tensor found in ``trees`` (a call's output, args, kwargs)."""
    for tree in trees:
        for leaf in pytree.tree_leaves(tree):
            if isinstance(leaf, torch.Tensor):
                return leaf.device
    return torch.device("cpu")


def _get(module: nn.Module, name: str) -> torch.Tensor:
    store, key = tensor_slot(module, name)
    tensor: torch.Tensor = store[key]
    return tensor
