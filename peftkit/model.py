"""AdaptedModel: named adapters beside a frozen backbone, and ``wrap``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import math
import numbers
import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import container, sharding
from .attach import (
    AdapterEntry,
    CopyEntry,
    Entry,
    RuntimeState,
    Slot,
    acting_host,
    release,
    replacement_tensors,
    slots_in,
    tensor_slot,
)
from .build import AdapterSet, Prepared, build, delta_names, output_only, quantized_tensors
from .combination import check_how
from .composition import Average, Parallel, Stack
from .errors import AdapterFileError, ConfigError, MergeError, TargetError, UnknownAdapterError
from .fastpaths import NestedEncoderGuard, packing_encoders
from .files import read_adapter, read_swap
from .heads import HeadSpec
from .method import Delta, Method, SparseDelta, add_delta
from .nf4 import NF4Linear
from .plan import AdapterPlan, make_plan
from .plugins import MethodInfo
from .quantized import dequantize, float_class, is_quantized, quantization_of
from .rows import BASE, PLAIN, batch_second, routing
from .targets import Selection, is_under, output_layers, tied_aliases
from .transaction import Journal, deferred_interrupts, finish

__all__ = ["AdaptedModel", "HeldAdapter", "attach", "check_name", "ensure_unwrapped", "wrap"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


@dataclass
class HeldAdapter:
    """One adapter an :class:`AdaptedModel` holds (see :meth:`AdaptedModel.get_adapter`).

    Attributes:
        name: Its name in the model.
        plan: What it was built from (method, targets with their specs, trained modules, heads).
        modules: Its modules (``AdaptedModel.peft_adapters[name]``).
        merge_undo: How to undo its merge (empty while it is not merged).
        checked: Facts about the backbone already checked for it, reused by a hot swap.
    """

    name: str
    plan: AdapterPlan
    modules: AdapterSet
    merge_undo: Journal = field(default_factory=Journal)
    checked: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> Method[Any]:
        """The configured method."""
        return self.plan.method

    @property
    def info(self) -> MethodInfo:
        """The method's registration (plugin, distribution, version)."""
        return self.plan.info


class AdaptedModel(nn.Module):
    """A frozen backbone with named adapters. Call it exactly like the backbone.

    Build one with :func:`peftkit.wrap` or :func:`peftkit.load`. The backbone's module tree,
    classes and ``state_dict()`` keys stay as they were; adapters act through forward hooks.
    Active adapters are trainable, inactive ones frozen; the backbone's parameters and buffers
    never change (normalisation layers run on their stored statistics) unless you ``merge()``.
    """

    def __init__(self, model: nn.Module) -> None:
        ensure_unwrapped(model)
        super().__init__()
        self.base_model = model
        self.peft_adapters = nn.ModuleDict()
        # the backbone's mode, not nn.Module's default (training): a wrapped eval() model reports eval
        self.training = self.peft_adapters.training = model.training
        self._records: dict[str, HeldAdapter] = {}
        self._state = RuntimeState()
        self._slots: dict[str, Slot] = {}
        self._unchecked: dict[str, list[str]] = {}  # "adapter/path" -> hosts, checked on the next training call
        self._detached = False
        self._orig_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        self._orig_training = {n: m.training for n, m in model.named_modules(remove_duplicate=False)}
        self._frozen_norms: list[nn.Module] = []
        self._guards = [(path, NestedEncoderGuard(enc, _TrainsInside(self._slots, path))) for path, enc in packing_encoders(model)]
        # one forward at a time, and no adapter change during one (README, "What is thread-safe")
        self.__dict__["_lock"] = threading.RLock()
        for p in model.parameters():
            p.requires_grad_(False)
        self._watch()
        self._present_signature()

    def _present_signature(self) -> None:
        # Tools that read forward's signature (transformers' Trainer dropping the dataset columns the
        # model does not take, Lightning, torch.export) must see the backbone's arguments, not
        # (*args, **kwargs): an instance-level forward carries them. It holds the model weakly, so
        # that dropping the AdaptedModel still releases the backbone at once.
        try:
            signature = inspect.signature(self.base_model.forward)
        except (TypeError, ValueError):  # a forward without a readable signature: keep the class's
            return
        self.__dict__["forward"] = _Forward(self, signature)

    def _watch(self) -> None:
        # An AdaptedModel that goes away without unwrap() takes its hooks with it: the backbone is then
        # plain again (its values as they are, its requires_grad and training flags as they were).
        self.__dict__["_finalizer"] = weakref.finalize(
            self, _release_backbone, self._slots, self._guards, self.base_model, self._orig_grad, self._orig_training)
        self._finalizer.atexit = False

    # nn.Module's __getstate__, __setstate__ and _apply carry no annotations: their types are given here
    def __getstate__(self) -> dict[str, Any]:
        parent: Callable[[], dict[str, Any]] | None = getattr(super(), "__getstate__", None)
        state = dict(parent() if parent is not None else self.__dict__)
        state.pop("_finalizer", None)
        state.pop("_lock", None)
        state.pop("forward", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        parent: Callable[[dict[str, Any]], None] = super().__setstate__
        parent(state)
        self.__dict__["_lock"] = threading.RLock()
        if not self.__dict__.get("_detached"):
            self._watch()
        self._present_signature()

    # -- attribute access falls through to the backbone (e.g. a transformers model's .config) -------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_model")
            if base is None or name.startswith("_"):
                raise
            found = getattr(base, name)
            if name == "generate" and callable(found):  # transformers' generation loop, with adapter_names too
                return functools.partial(self._generate, found)
            return found

    def _generate(self, generate: Callable[..., Any], *args: Any, adapter_names: Any = None, **kwargs: Any) -> Any:
        """The backbone's ``generate``; with ``adapter_names``, every step of it is a mixed batch (each
        row continues with its own adapter, the backbone runs once per step)."""
        with self._lock:
            if adapter_names is None:
                return generate(*args, **kwargs)
            with self._mixed_batch(adapter_names, args, kwargs):
                return generate(*args, **kwargs)

    # -- calling -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the backbone with the active adapters applied; same signature and outputs.

        ``adapter_names=[...]`` (one adapter name per row of the batch, ``"__base__"`` for a row
        without adapters) runs a mixed-adapter batch instead: the backbone runs once on every row,
        and each adapter acts on its own rows only; each row's output equals running it alone with
        its adapter active. Adapters train in a mixed batch when they are active
        (``set_adapter([...])``), each from its own rows.

        Safe to call from several threads: calls run one at a time, and an adapter change made
        meanwhile (``hotswap``, ``set_adapter``, ``merge``, ...) waits for the running call, so a call
        sees one adapter state from start to end, never a mix."""
        with self._lock:
            if "adapter_names" in kwargs and not self._backbone_takes("adapter_names"):
                names = kwargs.pop("adapter_names")
                if names is not None:
                    with self._mixed_batch(names, args, kwargs):
                        return self._forward(*args, **kwargs)
            if torch.is_grad_enabled():  # a backward of this call may recompute layers (gradient checkpointing)
                self._state.replayable = True
            if self._state.parallel is not None and not self._state.disabled:
                return self._parallel(self._state.parallel, args, kwargs)
            return self._forward(*args, **kwargs)

    def _parallel(self, branches: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """:class:`peftkit.Parallel`: each branch's output, by name. The modules that hold no branch's
        adapter run once: each remembers its output for inputs it has seen (the same tensors,
        unchanged since), so later branches reuse it until their adapters make the inputs differ."""
        impure = {""}
        for host, slot in self._slots.items():
            if any(e.adapter_name in branches for e in slot.entries):
                parts = host.split(".")
                impure.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        shared = [m for p, m in self.base_model.named_modules() if p not in impure and p.rpartition(".")[0] in impure]
        memos = [_Memo(m) for m in shared]
        try:
            out = {}
            for b in branches:
                with self._state.scope(active=[b]):
                    out[b] = self._forward(*args, **kwargs)
            return out
        finally:
            for memo in memos:
                memo.remove()

    def _backbone_takes(self, name: str) -> bool:
        try:
            return name in inspect.signature(self.base_model.forward).parameters
        except (TypeError, ValueError):
            return False

    def _mixed_batch(self, names: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        """The runtime state for one call with ``adapter_names``: checked, before anything runs."""
        self._check_attached()
        r = routing(names, self.adapter_names)
        if self._state.merged:
            raise MergeError(f"adapter_names needs unmerged adapters: {sorted(self._state.merged)} are merged into the "
                             "weights, so every row would get them; unmerge() first")
        if self._state.disabled:
            raise ConfigError("adapter_names was given inside disable_adapters(), which runs the backbone alone; "
                              "call the model outside it (or use '__base__' for the rows without adapters)")
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if tensors and r.size not in tensors[0].shape:  # no dimension of the input could be the batch
            raise ConfigError(f"adapter_names has {r.size} names for an input of shape {tuple(tensors[0].shape)}; give "
                              "one name per row of the batch")
        if r.size > 1:
            _check_rows_unambiguous(r.size, tensors)
        if torch.is_grad_enabled() and _checkpointing(self.base_model):
            raise ConfigError("adapter_names with gradient checkpointing on: the backward pass recomputes the layers "
                              "without the rows' adapters. Turn it off (gradient_checkpointing_disable()) to train a "
                              "mixed batch, or train each adapter's rows as their own batch")
        if not r.names:  # every row without adapters
            return self._state.scope(disabled=True, mixed=True)
        if len(r.names) == 1 and bool((r.index == 0).all()):  # one adapter for every row: an ordinary call
            return self._state.scope(active=list(r.names), mixed=True)
        return self._state.scope(routing=r, mixed=True)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        self._check_attached()
        self._hold_frozen_norms()
        check = bool(self._unchecked) and self.training and torch.is_grad_enabled()
        if check:
            for hosts in self._unchecked.values():
                for h in hosts:
                    self._slots[h].fired = False
        try:
            out = self.base_model(*args, **kwargs)
        finally:  # an interrupted forward (Ctrl-C skips PyTorch's always-called hooks) leaves nothing substituted
            for slot in self._slots.values():
                slot.unwind()
            for _, guard in self._guards:
                guard.unwind()
        if check:
            dead = sorted(key.partition("/")[2] for key, hosts in self._unchecked.items()
                          if not any(self._slots[h].fired for h in hosts if h in self._slots))
            self._unchecked.clear()
            if dead:
                warnings.warn(
                    f"adapted modules never ran during a training forward pass, so their adapters get no "
                    f"gradient: {', '.join(dead[:8])}{' …' if len(dead) > 8 else ''}. Their parent modules "
                    "probably read their weights directly; target the parents instead.",
                    RuntimeWarning, stacklevel=2)
        return out

    def forward_with_features(self, *args: Any, layer: str | None = None, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        """Run the model once; return its output and the features that enter its output layer.

        The features are what domain-adaptation losses (:func:`peftkit.coral_loss`,
        :func:`peftkit.mmd_loss`) and discriminators work on; they keep their graph, so a loss on
        them trains the adapters. Call it with the model's own arguments.

        Args:
            *args: The model's positional arguments.
            layer: Take the *output* of this module instead (a path in the backbone, e.g.
                ``"layer4"``, or ``"encoder.layer.5"``). Default: the *input* of the output layer
                (the one ``head=``/``heads=`` replaced, else the one peftkit finds).
            **kwargs: The model's keyword arguments.

        Raises:
            TargetError: no output layer can be told (pass ``layer=``), or no module ``layer``.
            ConfigError: the layer did not run exactly once in this call (its features would be
                ambiguous or absent).
        """
        with self._lock:
            path, take_input = (layer, False) if layer is not None else (self._output_layer(), True)
            try:
                module = self.base_model.get_submodule(path)
            except AttributeError:
                raise TargetError(f"layer={path!r} names no module of this model; e.g. "
                                  f"{', '.join(p for p, _ in list(self.base_model.named_modules())[1:4])}") from None
            seen: list[torch.Tensor] = []

            def keep(found: Any) -> None:
                if isinstance(found, tuple) and found:  # an RNN's (output, state), a pre-hook's args
                    found = found[0]
                if not isinstance(found, torch.Tensor):
                    raise ConfigError(f"{path!r} {'takes' if take_input else 'returns'} a {type(found).__name__}, "
                                      "not a tensor; pass layer= a module that returns one")
                seen.append(found)

            handle = (module.register_forward_pre_hook(lambda _m, a: keep(a)) if take_input
                      else module.register_forward_hook(lambda _m, _a, out: keep(out)))
            try:
                out = self._forward(*args, **kwargs)
            finally:
                handle.remove()
        if len(seen) != 1:
            raise ConfigError(f"{path!r} ran {len(seen)} times in this call, so its features are "
                              f"{'absent' if not seen else 'ambiguous'}; pass layer= a module that runs once")
        return out, seen[0]

    def _output_layer(self) -> str:
        """The output layer's path: where the active adapter's heads or fresh head are, else the one found."""
        for name in self._state.active:
            plan = self._records[name].plan
            if plan.heads is not None:
                return plan.heads[0]
            if plan.fresh:
                return next(iter(plan.fresh))
        return output_layers(self.base_model).require(self.base_model, "forward_with_features (or pass layer=)")

    def head(self, name: str, adapter: str | None = None) -> nn.Module:
        """The head called ``name`` of an adapter wrapped with ``heads=`` (e.g. a domain discriminator,
        to call on features of your own).

        Raises:
            ConfigError: the adapter has no heads, or none called ``name``.
        """
        heads = self.get_adapter(adapter).modules.heads
        if heads is None:
            raise ConfigError(f"adapter {self.get_adapter(adapter).name!r} has no heads; wrap with heads={{...}}")
        return heads.head(name)

    def _apply(self, fn: Any, recurse: bool = True) -> AdaptedModel:
        # .to(), .half(), .cuda(), ...: the folded weights were computed from the old tensors
        parent: Callable[[Any, bool], AdaptedModel] = super()._apply  # returns self
        out = parent(fn, recurse)
        self.clear_cache()
        return out

    def train(self, mode: bool = True) -> AdaptedModel:
        """Set training mode; frozen normalisation layers stay in eval mode (stored statistics)."""
        super().train(mode)
        if mode:  # training recomputes substitutions with autograd: free the inference cache
            self.clear_cache()
        self._hold_frozen_norms()
        return self

    def _hold_frozen_norms(self) -> None:
        for m in self._frozen_norms:
            if m.training:
                m.eval()

    def _refresh(self) -> None:
        """Recompute what depends on the adapter set: the norm layers to hold in eval mode (not the
        ones inside an active adapter's `train` modules), and drop cached folded weights."""
        trained = [p for n in self._state.active if n in self._records
                   for p in self._records[n].modules.train_paths]
        self._frozen_norms = [m for path, m in self.base_model.named_modules()
                              if isinstance(m, nn.modules.batchnorm._NormBase) and not is_under(path, trained)]
        self.clear_cache()
        for slot in self._slots.values():
            slot.cache = self.cache_weights
        # DistributedDataParallel broadcasts every buffer when it starts; an adapter's integer
        # buffers (FISH's int16 positions) are fixed and equal on every rank, and gloo cannot
        # broadcast int16, so DDP is told to leave them alone.
        self.__dict__["_ddp_params_and_buffers_to_ignore"] = [
            f"peft_adapters.{n}" for n, b in self.peft_adapters.named_buffers() if not b.is_floating_point()]

    @property
    def cache_weights(self) -> bool:
        """Whether inference (no autograd) reuses the folded weights ``W + delta`` until an adapter
        changes (default True: as fast as merged, at the memory of one copy of the adapted weights)."""
        cache: bool = self.__dict__.get("_cache_weights", True)
        return cache

    @cache_weights.setter
    def cache_weights(self, value: bool) -> None:
        self.__dict__["_cache_weights"] = bool(value)
        self._refresh()

    # -- adapters ------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        """Names of the adapters applied in the forward pass, in order."""
        return list(self._state.active)

    @property
    def composition(self) -> Stack | Average | Parallel | None:
        """The composition given to :meth:`set_adapter`, or None for a plain list of adapters."""
        if self._state.weights is not None:
            return Average(self._state.weights)
        return Parallel(*self._state.parallel) if self._state.parallel is not None else None

    @property
    def adapter_names(self) -> list[str]:
        """Names of every adapter held, active or not."""
        return list(self._records)

    def add_adapter(self, name: str, method: str | Method[Any], *, targets: Selection = None, exclude: Selection = None,
                    train: Selection = None, head: int | None = None, heads: dict[str, HeadSpec] | None = None,
                    example_input: Any = None, **options: Any) -> None:
        """Add a new adapter (inactive until :meth:`set_adapter`).

        Args:
            name: Its name (letters, digits, ``_``, ``-``).
            method: A registered method name (see :func:`peftkit.methods`).
            targets: Modules to adapt (see :mod:`peftkit.targets`); the method's default if None.
            exclude: Modules (and everything under them) never to adapt.
            train: Modules to train fully and save whole in the adapter file.
            head: Replace the output layer by a fresh one with this many outputs (trained, saved).
            heads: Several named fresh heads on the output layer's input: ``{"count": 5, "size": 3}``
                (a list of widths makes an MLP head, e.g. a domain discriminator ``[256, 1]``); the
                model then returns a dict of their outputs.
            example_input: An input to trace one forward pass with, to find the output layer.
            **options: The method's own options, e.g. ``r=8`` for LoRA.
        """
        self._check_attached()
        self._check_unsharded("add an adapter")
        self._check_new_name(name)
        plan = make_plan(self.base_model, method, targets=targets, exclude=exclude, train=train, head=head,
                         heads=heads, example_input=example_input, **options)
        self.install(name, build(self.base_model, plan))

    def _check_new_name(self, name: str) -> None:
        check_name(name)
        if name in self._records:
            raise UnknownAdapterError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or pick another name")

    def load_adapter(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Load an adapter file as a new, inactive adapter (validated first; a refusal changes nothing).

        Returns:
            The adapter's name: ``name``, or the name stored in the file.
        """
        self._check_attached()
        self._check_unsharded("load an adapter")
        if name is not None:
            self._check_new_name(name)
        header, prepared = read_adapter(self.base_model, path)  # the name and the tensors from one snapshot
        name = name or check_name(header.adapter, header.path)
        self.install(name, prepared)
        return name

    def hotswap(self, path: str | os.PathLike[str], adapter: str | None = None) -> str:
        """Replace an existing adapter's tensors by a compatible file's, in place (a hot swap).

        Nothing is rebuilt or re-attached: the same modules and parameters (so an optimizer, a
        ``torch.compile`` graph or FSDP2 groups built on them stay valid) take the file's values. The
        file must hold the same method with the same options on the same targets: for example another
        task's adapter trained with the same recipe. On an FSDP2-sharded model every rank reads the file
        and keeps its own shard (no communication); under DDP, swap on every rank. A forward running
        meanwhile sees the old adapter or the new one, never a mix; a refused or interrupted swap
        leaves every value as it was.

        Args:
            path: The ``.safetensors`` adapter file.
            adapter: The adapter to overwrite; default: the only adapter, or the only active one.

        Returns:
            The name of the adapter swapped.

        Raises:
            AdapterFileError: the file does not fit this adapter (another method, other options, other
                targets or tensor shapes); use :meth:`load_adapter` for those.
            BackboneMismatchError: the file was made for other base weights.
            ConfigError: the adapter is merged.
        """
        with self._lock:
            held = self.get_adapter(adapter)
            if held.name in self._state.merged:
                raise ConfigError(f"adapter {held.name!r} is merged; unmerge() before hot swapping its weights")
            values, validate = read_swap(self.base_model, held.name, held.method, held.modules, held.checked, path)
            self._assign(held, values, validate)
            return held.name

    def _assign(self, held: HeldAdapter, values: dict[str, torch.Tensor], validate: Any = None) -> None:
        """Give adapter ``held`` these values (whole tensors; each rank keeps its shard), all or none."""
        expected = held.modules.file_tensors()
        with torch.no_grad(), deferred_interrupts():
            before = {k: sharding.full_tensor(t.detach()).clone() for k, t in expected.items()}
            try:
                for k, dst in expected.items():
                    sharding.assign(dst, values[k])
                if validate is not None:
                    validate()
            except BaseException:  # refused, or interrupted: the adapter keeps its values, all of them
                finish([functools.partial(sharding.assign, dst, before[k]) for k, dst in expected.items()])
                raise
            finally:
                self.clear_cache()

    def reset_adapter(self, name: str | None = None) -> str:
        """Initialise an adapter's tensors again, as :func:`wrap` did: the method's initialisation,
        copies of the current ``train`` modules, fresh heads. The path for a model wrapped on the
        ``meta`` device: after ``to_empty()`` and loading the base weights, its adapters hold no
        values until reset (or loaded with :meth:`hotswap`). Works on sharded models.

        Args:
            name: The adapter; default: the only adapter, or the only active one.

        Returns:
            The adapter's name.

        An adapter loaded from a file is rebuilt from the plan the file stored; its buffers (fixed
        facts such as FISH's positions) keep the file's values.

        Raises:
            ConfigError: the adapter is merged, or cannot be built again.
        """
        with self._lock:
            held = self.get_adapter(name)
            if held.name in self._state.merged:
                raise ConfigError(f"adapter {held.name!r} is merged; unmerge() before resetting it")
            try:
                fresh = build(self.base_model, held.plan).modules
            except (TargetError, AttributeError, KeyError, ValueError) as exc:
                raise ConfigError(f"adapter {held.name!r} cannot be initialised again ({exc}); load its file again "
                                  "(hotswap or load_adapter)") from exc
            values = fresh.file_tensors()
            # an adapter's buffers are fixed facts, not trained values (FISH's positions): those the
            # plan does not hold (an adapter loaded from a file) stay as they are
            kept = {f"{path}.{k}" if path else k for path, a in held.modules.items() for k, _ in a.named_buffers()
                    if k not in held.plan.values.get(path, {})}
            current = held.modules.file_tensors()
            self._assign(held, {k: sharding.full_tensor(current[k] if k in kept else v) for k, v in values.items()})
            return held.name

    def clear_cache(self) -> None:
        """Forget the folded weights (``W + delta``) inference reuses. They follow every change PyTorch
        tracks (in-place edits, ``param.data = ...``, casts, moves, ``load_state_dict``); writes through
        ``param.data`` (``w.data.copy_(...)``) bypass PyTorch's version counter, so call this after them."""

        for slot in self._slots.values():
            slot.clear_cache()

    def install(self, name: str, prepared: Prepared) -> None:
        """Attach a prepared adapter under ``name`` (used by add_adapter and by loading): all or nothing."""
        with self._lock, deferred_interrupts():
            self._check_unsharded("add an adapter")
            self._check_new_name(name)
            try:
                self._install(name, prepared)
            except BaseException:
                self._detach_adapter(name)
                raise

    def _install(self, name: str, prepared: Prepared) -> None:
        base = self.base_model
        mods = prepared.modules
        entries: list[tuple[str, str, Entry]] = []  # (host, what it adapts, entry)
        for path, adapter in mods.items():
            host, prefix = acting_host(base, path, adapter)
            target = base.get_submodule(path)
            entries.append((host, path, AdapterEntry(name, target, adapter, prefix,
                                                      output_only=output_only(base, path, adapter))))
            if prepared.method.follows_ties and not prefix:  # a parameter's delta applies wherever it is read
                for other, tname, cname in tied_aliases(base, path):
                    entries.append((other, path, AdapterEntry(name, target, adapter, mapping={tname: cname})))
        for path, c in mods.train_items():
            entries.append((path, path, CopyEntry(name, base.get_submodule(path), c)))
            if path not in mods.fresh:  # a tensor tied to another module's (lm_head ~ embedding) stays tied
                for other, tname, cname in tied_aliases(base, path):
                    entries.append((other, path, CopyEntry(name, base.get_submodule(other), c, mapping={tname: cname})))
        if mods.heads is not None and mods.heads_path is not None:
            entries.append((mods.heads_path, mods.heads_path,
                            AdapterEntry(name, base.get_submodule(mods.heads_path), mods.heads, persistent=True)))
        for host, adapted, entry in entries:
            if host not in self._slots:
                self._slots[host] = Slot(base.get_submodule(host), self._state, host, _batch_second_at(base, host))
            # alive when any module reading its tensors runs (T5 never calls `shared`, only its aliases)
            self._unchecked.setdefault(f"{name}/{adapted}", []).append(host)
            self._slots[host].add(entry)
        mods.train(self.training)  # the model's mode (the backbone's until train()/eval()): dropout, trained copies' norms
        self.peft_adapters[name] = mods
        self._records[name] = HeldAdapter(name, prepared.plan, mods, checked=dict(prepared.cache))
        for p in mods.parameters():
            p.requires_grad_(False)
        self._refresh()

    def set_adapter(self, names: str | Sequence[str] | Average) -> None:
        """Make ``names`` the active adapters (applied in that order); they become trainable and the
        others frozen.

        ``names`` may also be a composition (:mod:`peftkit.composition`): ``peftkit.Stack("lang",
        "task")`` (in this order, as a list), ``peftkit.Average({"a": .5, "b": .5})`` (each adapter's
        change weighted at every layer) or ``peftkit.Parallel("a", "b")`` (each call returns
        ``{"a": output_a, "b": output_b}``, the modules no branch adapts run once)."""
        with self._lock, deferred_interrupts():
            self._check_attached()
            wanted = names.names if isinstance(names, Average) else [names] if isinstance(names, str) else list(names)
            for n in wanted:
                self.get_adapter(n)
            if self._state.merged - set(wanted) or (self._state.merged and isinstance(names, (Average, Parallel))):
                raise MergeError(f"adapters {sorted(self._state.merged)} are merged; unmerge() before changing the active set")
            if isinstance(names, Average):
                copies = [n for n in wanted if self._records[n].modules.train_paths]
                if copies:
                    raise ConfigError(f"peftkit.Average cannot weight adapters {copies}: they train whole modules (train=, "
                                      "head=), which replace a module's weights rather than change them")
            self._state.active = wanted
            self._state.weights = dict(names.weights) if isinstance(names, Average) else None
            self._state.parallel = tuple(names) if isinstance(names, Parallel) else None
            finish([functools.partial(p.requires_grad_, n in wanted)
                    for n, rec in self._records.items() for p in rec.modules.parameters()])
            self._refresh()
            self._hold_frozen_norms()

    def combine(self, weights: Mapping[str, float], name: str, how: str = "linear", *, rank: int | None = None,
                density: float = 1.0, seed: int = 0) -> str:
        """Add a new adapter (inactive) that is a weighted combination of adapters of one method.

        Every ``how`` combines each adapter's whole change to each tensor (its delta, scale
        included); see :mod:`peftkit.combination` for the formulas, which are PEFT's. The result is
        an ordinary adapter of the same method: it trains, saves, loads, merges and exports like
        any other, and the adapters it came from stay as they were.

        Args:
            weights: Adapter name -> weight; negative weights subtract a task (task negation).
            name: The new adapter's name.
            how: ``"linear"`` (the weighted sum, exact), ``"cat"`` (for LoRA the same exact sum, by
                concatenating the factors: rank = the sum of the ranks), ``"svd"`` (the weighted sum
                cut to ``rank``), ``"ties"``, ``"dare_linear"``, ``"dare_ties"``.
            rank: The rank of the result for ``svd``, ``ties`` and ``dare_*`` (default: the method's,
                for LoRA the largest rank combined).
            density: The share of each delta that ``ties`` keeps (largest magnitudes) and ``dare_*``
                keeps at random (the kept values rescaled by ``1 / density``).
            seed: Seeds ``dare_*``'s random drops (the same seed gives the same adapter).

        Returns:
            ``name``.
        """
        with self._lock:
            self._check_attached()
            self._check_unsharded("combine adapters")
            self._check_new_name(name)
            check_how(how, density, rank, seed)
            if not isinstance(weights, Mapping) or not weights:
                raise ConfigError(f"weights={weights!r} is invalid; expected adapter name -> weight, e.g. "
                                  "{'a': 0.7, 'b': 0.3}")
            for n, w in weights.items():
                self.get_adapter(n)
                if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w):
                    raise ConfigError(f"weights[{n!r}]={w!r} is invalid; expected a finite number (negative subtracts)")
            held = [self._records[n] for n in weights]
            methods = {h.method.name for h in held}
            if len(methods) > 1:
                raise ConfigError(f"combine needs adapters of one method; these are {sorted(methods)}")
            whole = [h.name for h in held if h.modules.train_paths or h.modules.heads is not None]
            if whole:
                raise ConfigError(f"adapters {whole} train whole modules or heads (train=, head=, heads=), which have "
                                  "no delta to combine; combine adapters without them")
            parts: dict[str, list[tuple[float, Any]]] = {}
            for w, h in zip(weights.values(), held, strict=True):
                for path, adapter in h.modules.items():
                    parts.setdefault(path, []).append((float(w), adapter))
            modules = {p: self.base_model.get_submodule(p) for p in parts}
            with torch.no_grad():
                combined = held[0].method.combine(how, parts, modules, rank=rank, density=float(density),
                                                  generator=torch.Generator().manual_seed(seed))
            wanted = set(combined.values)
            plan = make_plan(self.base_model, held[0].method.name, targets=lambda path, _: path in wanted,
                             **combined.options)
            if set(plan.targets) != wanted:
                raise ConfigError(f"method {held[0].method.name!r} combined adapters on {sorted(wanted)[:3]}... but "
                                  f"plans {sorted(plan.targets)[:3]}...; a bug in its combine()")
            plan = dataclasses.replace(plan, values={p: {**plan.values.get(p, {}), **combined.values[p]} for p in wanted})
            self.install(name, build(self.base_model, plan))
            return name

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter (unmerging it first if merged) and its hooks."""
        with self._lock, deferred_interrupts():
            self._check_attached()
            self._check_unsharded("delete an adapter")
            self.get_adapter(name)
            if name in self._state.merged:
                self._unmerge([name])
            self._detach_adapter(name)

    def _detach_adapter(self, name: str) -> None:
        """Take adapter ``name``'s entries off every host, and forget it (to the end, whatever is raised:
        also the undo of a half-done install)."""
        def entries_off(host: str) -> None:
            slot = self._slots[host]
            slot.entries = [e for e in slot.entries if e.adapter_name != name]
            if not slot.entries:
                slot.remove()
                del self._slots[host]

        def forget() -> None:
            self._unchecked = {k: v for k, v in self._unchecked.items() if not k.startswith(f"{name}/")}
            self._records.pop(name, None)
            if name in self.peft_adapters:
                del self.peft_adapters[name]
            self._state.active = [n for n in self._state.active if n != name]

        finish([*(functools.partial(entries_off, h) for h in list(self._slots)), forget, self._refresh])

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Context in which the model gives exactly the backbone's outputs (other threads' calls wait
        until it ends: the switch is the model's, not the thread's)."""
        with self._lock:
            if self._state.merged:
                raise MergeError("adapters are merged into the weights; unmerge() before disable_adapters()")
            before = self._state.disabled
            self._state.disabled = True
            try:
                yield
            finally:
                self._state.disabled = before

    def get_adapter(self, name: str | None = None) -> HeldAdapter:
        """The adapter called ``name``: its plan, modules and method.

        Args:
            name: The adapter; default: the only adapter, or the only active one.

        Raises:
            UnknownAdapterError: no adapter of that name.
            ConfigError: no name given, and the model holds several adapters, several active.
        """
        if name is None:
            names = self.adapter_names if len(self._records) == 1 else self.active_adapters
            if len(names) != 1:
                raise ConfigError(f"this model holds adapters {self.adapter_names}; say which one with adapter=NAME")
            name = names[0]
        if name not in self._records:
            raise UnknownAdapterError(f"no adapter named {name!r}; this model holds: {', '.join(self._records) or '(none)'}")
        return self._records[name]

    @property
    def sharded(self) -> bool:
        """Whether the model is sharded (FSDP2, :func:`peftkit.distributed.shard`): its adapter set
        is then fixed, and only :meth:`hotswap` changes adapter values."""
        return sharding.is_sharded(self)

    # -- merging -------------------------------------------------------------------------------
    def _deltas(self, name: str) -> Iterator[tuple[str, torch.Tensor, Delta]]:
        """(the tensor's name in the backbone, base tensor, delta) for each weight-space contribution
        of an adapter."""
        rec = self._records[name]
        for path, adapter in rec.modules.items():
            target = self.base_model.get_submodule(path)
            deltas = adapter.delta(target) if adapter.has_delta else None
            if deltas is None:
                raise MergeError(
                    f"adapter {name!r} ({rec.method.name}) at {path!r} cannot be written as a weight delta, "
                    "so it cannot be merged. Keep it unmerged, or use unwrap(merge=False)."
                )
            for tname, d in deltas.items():
                store, key = tensor_slot(target, tname)
                yield _join(path, tname), store[key], d

    def _applied_at(self, name: str) -> dict[str, set[tuple[int, str]]]:
        """The tensor's name -> every (module, tensor name) slot in which adapter ``name`` applies its
        delta unmerged: the target's, and for deltas that follow tied weights, their aliases'."""
        rec, base = self._records[name], self.base_model
        applied: dict[str, set[tuple[int, str]]] = {}
        for path in rec.modules.paths:
            target = base.get_submodule(path)
            for tname, _ in [*target.named_parameters(), *target.named_buffers()]:
                owner, _, leaf = tname.rpartition(".")
                applied[_join(path, tname)] = {(id(target.get_submodule(owner)), leaf)}
            if rec.method.follows_ties:
                for other, tname, cname in tied_aliases(base, path):
                    applied.setdefault(_join(path, cname), set()).add((id(base.get_submodule(other)), tname))
        return applied

    def merge(self) -> None:
        """Fold the active adapters into the backbone's weights (idempotent).

        All or nothing: nothing changes unless every active adapter can merge and the merged weights
        are finite, and an exception or a Ctrl-C while merging undoes what was done. The original
        values of the changed tensors are kept so that :meth:`unmerge` restores them bit for bit.

        Raises:
            MergeError: an adapter that has no weight-space form, a delta on a tensor other modules
                share (tied weights), or a merge giving NaN/inf.
        """
        with self._lock:
            self._merge()

    def _merge(self) -> None:
        self._check_attached()
        self._check_unsharded("merge")
        names = [n for n in self._state.active if n not in self._state.merged]
        if not names or self._state.disabled:
            return
        self._merge_names(names)
        self._refresh()

    # a decorator rather than a with-block: a KeyboardInterrupt at a with-block's exit skips __exit__
    # (CPython), which would leave autograd off for the whole process
    @torch.no_grad()
    def _merge_names(self, names: list[str]) -> None:
        self._refuse_quantized(names)
        self._check_mergeable(names)
        # every delta against the unmerged weights, before any change: a delta may read the weights
        # (DoRA normalises W + delta), and run unmerged each adapter's is taken against them
        deltas = {n: list(self._deltas(n)) for n in names}
        started: list[str] = []
        with deferred_interrupts():
            try:
                for n in names:
                    started.append(n)
                    self._merge_one(self._records[n], deltas[n])
                    self._state.merged.add(n)
            except BaseException:  # all or nothing: undo what was done
                self._restore(started)
                raise

    def _quantized_deltas(self, names: list[str]) -> list[tuple[str, nn.Module, str]]:
        """(the tensor's name, the module holding it, its name there) for each quantized tensor an
        adapter of ``names`` would merge into."""
        out = []
        for n in names:
            for path, adapter in self._records[n].modules.items():
                target = self.base_model.get_submodule(path)
                if not quantized_tensors(target) or not adapter.has_delta:
                    continue
                for tname in delta_names(adapter, target):
                    owner, _, leaf = tname.rpartition(".")
                    module = target.get_submodule(owner) if owner else target
                    if is_quantized(module._parameters.get(leaf)):
                        out.append((_join(path, tname), module, leaf))
        return out

    def _refuse_quantized(self, names: list[str]) -> None:
        found = self._quantized_deltas(names)
        if found:
            what, module, leaf = found[0]
            raise MergeError(
                f"cannot merge into {what}: it is quantized ({quantization_of(module._parameters[leaf])}), and adding a "
                "delta to quantized weights rounds most of it away (nor could unmerge restore them). Nothing was merged. "
                "Keep the adapter unmerged (it runs beside the quantized layer), or use unwrap(merge=True) for a float "
                "model with the adapter merged (the adapted layers dequantized; peftkit.quantize it again if you wish).")

    def _check_mergeable(self, names: list[str]) -> None:
        """Refuse, before anything changes, a merge that would change a tensor other modules share
        (tied weights) or put NaN/inf into the backbone."""
        if self._state.weights is not None or self._state.parallel is not None:
            raise MergeError(f"the active adapters are composed ({self.composition!r}), which merging them as they are "
                             "would not keep; merge a weighted combination made with combine(...), or set_adapter a "
                             "plain list first")
        readers = _readers(self.base_model)
        for n in names:
            applied = self._applied_at(n)
            for what, base, d in self._deltas(n):
                others = [r for slot, r in readers.get(id(base), {}).items() if slot not in applied.get(what, set())]
                if others:
                    raise MergeError(
                        f"adapter {n!r} cannot be merged: its delta on {what} would also change "
                        f"{', '.join(others[:3])}, which share{'s' if len(others) == 1 else ''} that tensor (tied "
                        "weights), while unmerged only the adapted module sees it. Nothing was merged. Keep the "
                        "adapter unmerged (inference folds it into a copy of the weight, as fast as merged), or "
                        "untie the weights before wrapping.")
                if not _finite_after(base, d):
                    raise MergeError(f"merging adapter {n!r} would put NaN/inf into {what}; nothing was merged")
            for path, c in self._records[n].modules.train_items():
                for tn, t in replacement_tensors(c):
                    if not container.finite(t):
                        raise MergeError(f"trained module {path}.{tn} of adapter {n!r} holds NaN/inf; nothing was merged")

    def _merge_one(self, held: HeldAdapter, deltas: list[tuple[str, torch.Tensor, Delta]]) -> None:
        """Fold one adapter's ``deltas`` in; every change goes through its journal, which records the undo first."""
        journal = held.merge_undo
        for _, base, d in deltas:
            if isinstance(d, SparseDelta):  # back up (and change) only the touched entries
                journal.keep(base, d.index)
                base.view(-1).index_add_(0, d.index, d.values.detach().to(base.dtype))
            else:
                journal.keep(base)
                base.copy_(add_delta(base, d.detach() if isinstance(d, torch.Tensor) else d))
        mods = held.modules
        for path, c in mods.train_items():
            module = self.base_model.get_submodule(path)
            # found before the tensors are put in: a tensor tied to another module's (lm_head ~ embedding) stays tied
            aliases = [] if path in mods.fresh else tied_aliases(self.base_model, path)
            new_tensors = {}
            for tn, t in replacement_tensors(c):
                store, key = tensor_slot(module, tn)
                new = t.detach().clone()
                new_tensors[tn] = nn.Parameter(new, requires_grad=False) if isinstance(store[key], nn.Parameter) else new
                journal.put(store, key, new_tensors[tn])
            if path in mods.fresh:  # a new output layer: keep the module's own sizes right
                for attr in ("out_features", "out_channels"):
                    if hasattr(module, attr):
                        journal.set_attribute(module, attr, mods.fresh[path])
            for other, tname, cname in aliases:  # tied tensors get the same merged tensor
                store, key = tensor_slot(self.base_model.get_submodule(other), tname)
                journal.put(store, key, new_tensors[cname])

    def unmerge(self) -> None:
        """Restore the backbone's tensors as they were before :meth:`merge` (idempotent, exact; an
        interrupt cannot stop it half-way)."""
        with self._lock:
            self._check_attached()
            self._unmerge(sorted(self._state.merged))

    def _unmerge(self, names: list[str]) -> None:
        self._restore_held(names)
        self._refresh()

    @torch.no_grad()  # a decorator: see _merge_names
    def _restore_held(self, names: list[str]) -> None:
        with deferred_interrupts():
            self._restore(names)

    def _restore(self, names: list[str]) -> None:
        """Undo the merge of ``names`` (newest first), to the end whatever is raised meanwhile, and
        mark them unmerged."""
        finish([functools.partial(self._undo_merge, n) for n in reversed(names)])

    def _undo_merge(self, name: str) -> None:
        try:
            self._records[name].merge_undo.undo()
        finally:
            self._state.merged.discard(name)

    @property
    def merged(self) -> bool:
        """Whether any adapter is currently merged into the backbone."""
        return bool(self._state.merged)

    @property
    def merged_adapters(self) -> list[str]:
        """Names of the adapters currently merged into the backbone."""
        return sorted(self._state.merged)

    def unwrap(self, merge: bool = False) -> nn.Module:
        """Detach every adapter and return the plain backbone.

        Args:
            merge: Fold the active adapters into the weights first (else the backbone comes back
                exactly as it was given to ``wrap``).

        Raises:
            MergeError: ``merge=True`` and an active adapter cannot be merged (nothing changes).
        """
        with self._lock, deferred_interrupts():
            return self._unwrap(merge)

    def _unwrap(self, merge: bool) -> nn.Module:
        self._check_attached()
        if merge:
            multi = [n for n in self._state.active if self._records[n].modules.heads is not None]
            if multi:
                raise MergeError(f"adapter {multi[0]!r} has multi-task heads, which return a dict and cannot be folded "
                                 "into the backbone; keep the AdaptedModel, or use unwrap(merge=False)")
            restore = self._dequantize_for_merge()
            try:
                self._merge()
            except BaseException:
                for store, key, original in reversed(restore):
                    store[key] = original
                raise
            for held in self._records.values():  # nothing to unmerge once unwrapped: free the copies
                held.merge_undo.forget()
        else:
            self.unmerge()
        self._finalizer.detach()
        base = self.base_model
        _release_backbone(self._slots, self._guards, base, self._orig_grad, self._orig_training, merged=merge)
        self._detached = True
        if merge:
            _plain_linears(base)
        return base

    @torch.no_grad()
    def _dequantize_for_merge(self) -> list[tuple[dict[str, Any], str, Any]]:
        """Put the float weight in place of each quantized one an active adapter merges into (for
        ``unwrap(merge=True)``); returns what puts the quantized ones back."""
        if self._state.disabled:
            return []
        names = [n for n in self._state.active if n not in self._state.merged]
        undo: list[tuple[dict[str, Any], str, Any]] = []
        for _, module, leaf in self._quantized_deltas(names):
            q = module._parameters[leaf]
            assert q is not None  # _quantized_deltas found a quantized tensor there
            undo.append((module._parameters, leaf, q))
            module._parameters[leaf] = nn.Parameter(dequantize(q, module).clone(), requires_grad=False)
        return undo

    def _check_unsharded(self, what: str) -> None:
        if self.sharded:
            raise ConfigError(f"cannot {what} on a model sharded with peftkit.distributed.shard(): add, load and delete "
                              "adapters before sharding; to swap an adapter's weights on a sharded model use hotswap()")

    def _check_attached(self) -> None:
        if self.__dict__.get("_detached"):
            raise ConfigError("this AdaptedModel was unwrapped; wrap the backbone again to use adapters")

    # -- reporting -----------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """Number of parameters that require gradients (the active adapters')."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def summary(self) -> str:
        """A short table: adapters, methods, targets, trainable and total parameters."""
        base_n = sum(p.numel() for p in self.base_model.parameters())
        rows = [("adapter", "method", "active", "targets", "train", "parameters")]
        for n, rec in self._records.items():
            count = sum(p.numel() for p in rec.modules.parameters())
            flag = "merged" if n in self._state.merged else ("yes" if n in self._state.active else "no")
            rows.append((n, rec.method.name, flag, str(len(rec.modules.paths)), str(len(rec.modules.train_paths)), f"{count:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"AdaptedModel({type(self.base_model).__name__})"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
        trainable = self.trainable_parameters()
        total = base_n + sum(p.numel() for p in self.peft_adapters.parameters())
        pct = 100.0 * trainable / total if total else math.nan
        lines.append(f"  trainable {trainable:,} of {total:,} parameters ({pct:.3f}%)")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"active={self._state.active}, merged={sorted(self._state.merged)}"


def check_name(name: Any, source: Any = None) -> str:
    """``name`` if it is a valid adapter name (letters, digits, ``_`` and ``-``, at most 100).

    Raises:
        ConfigError: an invalid name given by the caller.
        AdapterFileError: an invalid name stored in the file ``source`` (pass ``name=`` to choose one).
    """
    if isinstance(name, str) and len(name) <= 100 and _NAME.fullmatch(name) and name != BASE:
        return name
    if source is not None:
        raise AdapterFileError(f"{str(source)!r} names its adapter {str(name)[:60]!r}, which is not a valid adapter "
                               "name; pass name=... to load it under another")
    raise ConfigError(f"adapter name {name!r} is not valid; use letters, digits, '_' and '-' ({BASE!r} is "
                      "adapter_names' word for no adapter)")


def attach(model: nn.Module, name: str, prepared: Prepared) -> AdaptedModel:
    """Wrap ``model`` with a prepared adapter, active: all or nothing (a failure, or an interrupt,
    leaves ``model`` exactly as it was: no hooks, its flags restored)."""
    check_name(name)
    adapted = AdaptedModel(model)
    try:
        adapted.install(name, prepared)
        adapted.set_adapter(name)
    except BaseException:
        adapted._finalizer.detach()
        _release_backbone(adapted._slots, adapted._guards, model, adapted._orig_grad, adapted._orig_training)
        raise
    return adapted


def ensure_unwrapped(model: nn.Module) -> None:
    """Refuse a backbone that an AdaptedModel is attached to: two sets of hooks on one backbone would
    each put back what the other substituted, leaving adapted values in the backbone's weights.

    Raises:
        ConfigError: ``model`` is an AdaptedModel, or one is attached to it (or to part of it).
    """
    _release_pending()
    if isinstance(model, AdaptedModel):
        raise ConfigError("this model is already an AdaptedModel; add another adapter with add_adapter() or "
                          "load_adapter(), or unwrap() it first")
    found = slots_in(model)
    if found:
        gc.collect()  # an AdaptedModel that is gone but not yet collected releases the backbone now
        found = slots_in(model)
    if found:
        where = f" (at {found[0][0]!r})" if found[0][0] else ""
        raise ConfigError(
            f"this {type(model).__name__} is already wrapped: an AdaptedModel's adapters are attached to it{where}. "
            "Wrapping or loading onto it again would stack two sets of hooks on one backbone. Add adapters to that "
            "AdaptedModel instead (m.add_adapter(...), m.load_adapter(file)), or call its unwrap() first. (A "
            "copy.deepcopy of a wrapped backbone carries the hooks too: copy the backbone before wrapping it, or "
            "copy the AdaptedModel.)")


class _Forward:
    """An AdaptedModel's ``forward`` bound to it weakly, with the backbone's signature (see
    ``AdaptedModel._present_signature``)."""

    __slots__ = ("__signature__", "model")

    def __init__(self, model: AdaptedModel, signature: inspect.Signature) -> None:
        self.model = weakref.ref(model)
        self.__signature__ = signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model()
        if model is None:
            raise ReferenceError("the AdaptedModel this forward belonged to is gone")
        return type(model).forward(model, *args, **kwargs)


def _checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model has gradient (activation) checkpointing on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames the flag
        return bool(getattr(model, "is_activation_checkpointing", None) or getattr(model, "is_gradient_checkpointing", False))


def _batch_second_at(model: nn.Module, path: str) -> bool:
    """Whether the module at ``path``, a module inside it or one around it keeps the batch second."""
    parts = path.split(".") if path else []
    around = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts))]
    return any(batch_second(m) for m in [*around, *model.get_submodule(path).modules()])


def _check_rows_unambiguous(size: int, tensors: list[torch.Tensor]) -> None:
    """Refuse a mixed batch whose row count equals a sequence length of the input: modules that run
    on the positions alone (T5's position bias, a shared attention mask) then see a tensor whose first
    dimension looks like the batch, and would be split by row. Token ids and (batch, length, width)
    inputs are checked; images are not (their channels never lead a tensor inside the model)."""
    for t in tensors:
        sequence = not t.is_floating_point() or t.dim() == 3
        if t.dim() >= 2 and t.shape[0] == size and sequence and size in t.shape[1:]:
            raise ConfigError(
                f"adapter_names has {size} names and the input (shape {tuple(t.shape)}) has a sequence of {size} "
                "positions: inside the model a tensor over the positions (a position bias, an attention mask) cannot "
                "be told from one over the rows. Add a '__base__' row (a copy of any input row) or pad the sequence")


class _Memo:
    """A module's forward that returns its earlier output when called again with the same inputs
    (the same tensor objects, none changed in place since, nor the output) and the same grad mode;
    installed for one :class:`peftkit.Parallel` call. Inputs that are not tensors or plain values
    (a cache object) are never matched."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inner = module.__dict__.get("forward")  # an instance-level forward that was there (accelerate's)
        self.seen: dict[tuple[Any, ...], tuple[list[Any], list[int], Any, list[int]]] = {}
        module.forward = self

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            if self.inner is None:
                del self.module.__dict__["forward"]
            else:
                self.module.forward = self.inner
        self.seen.clear()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key: tuple[Any, ...] | None = None
        if all(isinstance(v, PLAIN) for v in leaves):
            key = (torch.is_grad_enabled(), str(spec), *(("t", id(v)) if isinstance(v, torch.Tensor) else v for v in leaves))
            hit = self.seen.get(key)
            if hit is not None:
                ins, in_versions, out, out_versions = hit
                outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
                if ([t._version for t in ins] == in_versions and [t._version for t in outs] == out_versions):
                    return out
        out = self.inner(*args, **kwargs) if self.inner is not None else type(self.module).forward(self.module, *args, **kwargs)
        if key is not None:
            ins = [v for v in leaves if isinstance(v, torch.Tensor)]  # kept alive: their ids stay theirs
            outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.seen[key] = (ins, [t._version for t in ins], out, [t._version for t in outs])
        return out


class _TrainsInside:
    """Whether an adapter trains on this call inside the module at ``path`` (autograd on), or acts on
    some rows only (a mixed-adapter batch, which needs every row's padded positions): for a fast-path
    guard. Holds the model's slot table, not the model, so that the backbone never keeps its wrapper
    alive."""

    def __init__(self, slots: dict[str, Slot], path: str) -> None:
        self.slots = slots
        self.path = path

    def __call__(self) -> bool:
        inside = [slot for host, slot in self.slots.items() if not self.path or is_under(host, [self.path])]
        if any(slot.state.routing is not None for slot in inside[:1]):  # one state for the whole model
            return True
        return torch.is_grad_enabled() and any(slot.trains_now() for slot in inside)


_PENDING_RELEASES: list[Callable[[], None]] = []  # backbones whose AdaptedModel was collected inside a transform


def _release_pending() -> None:
    while _PENDING_RELEASES and torch._C._functorch.peek_interpreter_stack() is None:
        _PENDING_RELEASES.pop()()


def _release_backbone(slots: dict[str, Slot], guards: list[tuple[str, NestedEncoderGuard]], base: nn.Module,
                      grads: dict[str, bool], training: dict[str, bool], merged: bool = False) -> None:
    """Take every hook off the backbone and give back its ``requires_grad`` and training flags
    (``unwrap()``, or the AdaptedModel being garbage-collected). Tensors new since wrapping (a merged
    fresh head) are trainable after a merge, frozen otherwise. Collected inside a ``torch.func``
    transform (a Fisher estimate's vmap), where ``requires_grad_`` is refused, it waits for the next
    wrap or load."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        _PENDING_RELEASES.append(functools.partial(_release_backbone, slots, guards, base, grads, training, merged))
        return
    release(slots)
    for _, guard in guards:
        guard.remove()
    guards.clear()
    for n, p in base.named_parameters(remove_duplicate=False):
        p.requires_grad_(grads.get(n, merged))
    for n, m in base.named_modules(remove_duplicate=False):
        m.training = training.get(n, m.training)


def _plain_linears(model: nn.Module) -> None:
    """Turn each quantized Linear (bitsandbytes', peftkit's ``NF4Linear``) whose weight is float again
    (merged by ``unwrap(merge=True)``) into an ``nn.Linear`` holding the same tensors: a bitsandbytes
    forward would expect a quantized weight, and the model returned is a float one."""
    for path, m in list(model.named_modules()):
        if float_class(type(m)) is nn.Linear and type(m) is not nn.Linear and (
                type(m).__module__.startswith("bitsandbytes") or type(m) is NF4Linear):
            w = m._parameters.get("weight")
            if isinstance(w, nn.Parameter) and not is_quantized(w) and w.is_floating_point():
                assert isinstance(m, nn.Linear)  # float_class says so
                cls = type(m)
                if cls is NF4Linear:  # the nn.Linear that peftkit.quantize made it from: the same module again
                    m.__class__ = nn.Linear
                    continue
                plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                plain._parameters["weight"], plain._parameters["bias"] = w, m._parameters.get("bias")
                plain.train(m.training)
                parent, _, leaf = path.rpartition(".")
                model.get_submodule(parent)._modules[leaf] = plain


def _join(path: str, name: str) -> str:
    """A tensor's full name: ``path.name``, or ``name`` on the root module."""
    return f"{path}.{name}" if path else name


def _readers(model: nn.Module) -> dict[int, dict[tuple[Any, str], str]]:
    """id(tensor) -> {(module, tensor name) slot: a name for messages}, for every slot that reads it:
    the same tensor registered in two modules (tied weights), or another tensor sharing its storage,
    changes when it is changed in place. A module reachable under two names is one slot."""
    by_tensor: dict[int, dict[tuple[Any, str], str]] = {}
    by_storage: dict[tuple[str, int], set[int]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for n, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is None:
                continue
            by_tensor.setdefault(id(t), {}).setdefault((id(m), n), _join(path, n))
            if t.device.type != "meta" and t.numel() and not is_quantized(t):  # a quantized one is never merged into
                by_storage.setdefault((str(t.device), t.untyped_storage().data_ptr()), set()).add(id(t))
    for ids in by_storage.values():
        if len(ids) > 1:  # distinct tensors on one storage: each one's readers read the others' too
            together = {slot: name for i in sorted(ids) for slot, name in by_tensor[i].items()}
            for i in ids:
                by_tensor[i] = {**together, **by_tensor[i]}
    return by_tensor


def _finite_after(base: torch.Tensor, d: Delta) -> bool:
    if isinstance(d, SparseDelta):
        return bool(torch.isfinite(base.reshape(-1)[d.index] + d.values.to(base.dtype)).all())
    return bool(torch.isfinite(add_delta(base, d)).all())


def wrap(model: nn.Module, method: str, *, name: str = "default", targets: Selection = None,
         exclude: Selection = None, train: Selection = None, head: int | None = None,
         heads: dict[str, HeadSpec] | None = None, example_input: Any = None, **options: Any) -> AdaptedModel:
    """Wrap ``model`` with a new adapter of ``method``; the backbone is frozen.

    Args:
        model: Any ``torch.nn.Module``.
        method: A registered method name, e.g. ``"lora"`` (see :func:`peftkit.methods`).
        name: The adapter's name.
        targets: Which modules to adapt: names, dotted suffixes, a regex, module types or a
            callable ``(path, module) -> bool``; the method's default when None.
        exclude: Modules never to adapt (with everything under them).
        train: Modules trained fully and saved whole in the adapter file.
        head: Replace the output layer by a fresh one with this many outputs, trained and saved.
        heads: Several named fresh heads on the shared trunk, ``{"count": 5, "size": 3}``, each a
            count or the widths of a small MLP, hidden layers first (``{"label": 10, "domain":
            [256, 1]}``: Linear to 256, ReLU, Linear to 1); the model then returns ``{name: output}``.
        example_input: An input (tensor or tuple) to trace one forward pass with when the output
            layer cannot be told from the module order.
        **options: The method's own options (e.g. ``r=8, alpha=16`` for LoRA).

    Returns:
        An :class:`AdaptedModel` whose ``name`` adapter is active and trainable.

    Raises:
        UnknownMethodError: no plugin provides ``method`` (the message lists those that exist).
        TargetError: the selection matches nothing (the message lists the nearest module names).
        ConfigError: an unknown option or a bad value.

    Example::

        m = peftkit.wrap(torchvision.models.resnet18(), "lora", r=8)
        m.summary()
    """
    ensure_unwrapped(model)  # before any work (FISH's Fisher estimate, say)
    check_name(name)
    plan = make_plan(model, method, targets=targets, exclude=exclude, train=train, head=head, heads=heads,
                     example_input=example_input, **options)
    return attach(model, name, build(model, plan))
