"""What a method plugin implements: a :class:`Method` (config + per-target builder) and the
:class:`Adapter` modules it builds.

An adapter contributes to its target module in one or both of two forms, and the core picks the
cheaper one per call (a third, training-only form combines them: see :meth:`Adapter.fold_gradient`):

* **transform** (output space): ``output -> transform(module, args, kwargs, output)``, applied after
  the target's forward. Serial/parallel adapters; LoRA computed on activations while training.
* **delta** (weight space): ``{param_name: delta}`` added to the target's own tensors for the
  duration of its forward. LoRA as ``s * B @ A`` without autograd, sparse FISH deltas, LoRA on
  ``nn.MultiheadAttention`` whose packed weights the module reads directly.

Whatever has a delta merges exactly into the base weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from .combination import Combination
from .errors import ConfigError, TargetError
from .targets import output_layers

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from typing_extensions import Self

__all__ = [
    "Adapter", "Delta", "LowRankDelta", "Method", "Plan", "PlanContext", "SparseDelta", "add_delta", "detach_delta",
    "retired_hooks", "scale_delta",
]

# A method's config type (its Config dataclass): class LoRA(Method[LoraConfig])
ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


@dataclasses.dataclass(frozen=True)
class SparseDelta:
    """A weight delta on a few entries: ``values`` added at flat positions ``index`` of the tensor.

    Returned by :meth:`Adapter.delta` for sparse methods (FISH): the core then copies the base tensor
    once and adds ``values`` at ``index``, so every other entry stays bitwise equal to the base.
    """

    index: torch.Tensor  # (k,) int64 flat positions
    values: torch.Tensor  # (k,) values, differentiable


@dataclasses.dataclass(frozen=True)
class LowRankDelta:
    """A weight delta ``scale * left @ right`` (``left`` rows x r, ``right`` r x the rest), shaped
    like the base tensor it is added to (e.g. a conv weight (out, in, k, k) with ``right`` r x in*k*k).

    Returned by :meth:`Adapter.delta` for low-rank methods (LoRA): the core then forms
    ``W + s * left @ right`` with one ``addmm``, in one pass over the weight forward and backward,
    instead of a product, a scaling and a sum over full-size weights.
    """

    left: torch.Tensor  # (rows, r)
    right: torch.Tensor  # (r, cols)
    scale: float = 1.0

    def dense(self, shape: Sequence[int] | None = None) -> torch.Tensor:
        """The delta as a tensor: (rows, cols), or ``shape`` (the base tensor's)."""
        d = torch.mm(self.left, self.right).mul_(self.scale)
        return d if shape is None else d.view(tuple(shape))


Delta = torch.Tensor | SparseDelta | LowRankDelta


def add_delta(base: torch.Tensor, delta: Delta) -> torch.Tensor:
    """``base + delta`` out of place, for a dense, sparse or low-rank delta (differentiable in ``delta``)."""
    if isinstance(delta, SparseDelta):
        return base.reshape(-1).index_add(0, delta.index, delta.values.to(base.dtype)).view_as(base)
    if isinstance(delta, LowRankDelta):
        rows = delta.left.shape[0]
        left, right = delta.left.to(base.dtype), delta.right.to(base.dtype)
        return torch.addmm(base.reshape(rows, -1), left, right, alpha=delta.scale).view(base.shape)
    return base + delta.to(base.dtype)


def scale_delta(delta: Delta, weight: float) -> Delta:
    """``weight * delta`` in the delta's own form (differentiable)."""
    if isinstance(delta, SparseDelta):
        return SparseDelta(delta.index, delta.values * weight)
    if isinstance(delta, LowRankDelta):
        return LowRankDelta(delta.left, delta.right, delta.scale * weight)
    return delta * weight


def detach_delta(delta: Delta) -> Delta:
    """The same delta without autograd history."""
    if isinstance(delta, SparseDelta):
        return SparseDelta(delta.index, delta.values.detach())
    if isinstance(delta, LowRankDelta):
        return LowRankDelta(delta.left.detach(), delta.right.detach(), delta.scale)
    return delta.detach()


class Adapter(nn.Module):
    """One target module's adapter. Subclasses override :meth:`transform`, :meth:`delta`, or both.

    Everything in the adapter's ``state_dict()`` is what the adapter file stores for this target.
    """

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Return the target's output with this adapter applied (output-space form).

        Args:
            module: The target module (frozen).
            args: Positional inputs the target was called with.
            kwargs: Keyword inputs the target was called with.
            output: What the target returned.
        """
        raise NotImplementedError

    def delta(self, module: nn.Module) -> dict[str, Delta] | None:
        """Weight-space form: tensors (dense, :class:`SparseDelta` or :class:`LowRankDelta`) to add to the target's own
        parameters, keyed by their names relative to the target (e.g. ``"weight"``,
        ``"out_proj.weight"``); ``None`` when this adapter cannot be written as a weight delta (then
        it cannot be merged)."""
        return None

    @property
    def train_in_weight_space(self) -> bool:
        """Use the weight-space form also while training (default: output space). Worth it where the
        output-space path costs more than a weight gradient, e.g. LoRA on convolutions over large
        activations (measured in benchmarks/)."""
        return False

    def fold_gradient(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Training form "fold without autograd" (optional): the target runs with ``W + delta``
        computed under ``torch.no_grad()``, so its output and its input gradient already include the
        adapter. This returns ``output`` unchanged in value but carrying the gradients of the
        adapter's own parameters, computed cheaply from the target's input and output gradient (LoRA:
        ``dA = s (g B)^T x``, ``dB = s g^T (x A^T)``). It skips the full weight gradient that
        autograd through ``W + delta`` would compute, and the extra full-size passes of the
        output-space form. Used while training when :meth:`folds_in_training` says so.

        Args:
            module: The target module (frozen).
            args: Positional inputs the target was called with.
            kwargs: Keyword inputs the target was called with.
            output: What the target returned (computed with the folded weight).
        """
        raise NotImplementedError

    def folds_in_training(self, module: nn.Module, args: tuple[Any, ...] = (),
                          kwargs: dict[str, Any] | None = None) -> bool:
        """Whether :meth:`fold_gradient` applies to ``module`` on this call (default: when it is
        implemented). The fold keeps the folded weight for the backward pass, so an adapter may
        decline it for calls whose activations are small next to the weight.

        Args:
            module: The target module (frozen).
            args: Positional inputs of the call (empty where the call is not known).
            kwargs: Keyword inputs of the call.
        """
        return type(self).fold_gradient is not Adapter.fold_gradient

    def stand_in(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Training form "stand-in" (optional): compute the target's whole output with this adapter
        applied, in place of the target's own forward. For a target that reads the adapted weights
        where no hook reaches their input and output gradient (``nn.MultiheadAttention`` runs its
        projections inside one functional call), so that the weight-space form would cost a full
        weight gradient. Called instead of the target's ``forward`` while training, on the calls
        :meth:`stands_in` accepts; the target's tensors already carry the other adapters'
        substitutions, and this adapter adds its own delta.

        Args:
            module: The target module (frozen); always its own host.
            args: Positional inputs the target was called with.
            kwargs: Keyword inputs the target was called with.
        """
        raise NotImplementedError

    def stands_in(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether :meth:`stand_in` takes this call (e.g. only the input layouts it implements; the
        others run the target's own forward with the weight-space form). Default: every call."""
        return True

    @classmethod
    def transform_rows(cls, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any,
                       adapters: Sequence[Adapter], index: torch.Tensor) -> Any:
        """Mixed-adapter batches (optional): ``output`` with ``adapters[index[i]]``'s :meth:`transform`
        applied to row ``i`` of the batch, and rows whose ``index`` is -1 left as they are, in one
        batched computation (LoRA: each row's factors gathered, two batched products), so the cost
        does not grow with the number of adapters. ``adapters`` are of this class, on one target;
        return ``NotImplemented`` for a combination it does not batch, and the core runs
        :meth:`transform` on each adapter's rows instead (the default).

        Args:
            module: The target module (frozen), which ran once on the whole batch.
            args: Positional inputs the target was called with (the whole batch).
            kwargs: Keyword inputs the target was called with.
            output: What the target returned (the whole batch; rows in the first dimension).
            adapters: The adapters in this batch, each on its own rows.
            index: (rows,) long, on the output's device: each row's position in ``adapters``, or -1.
        """
        return NotImplemented

    def file_state(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file stores for this adapter (default: its ``state_dict()``). An
        adapter whose trained form differs from the form it ships in overrides this together with
        :meth:`Method.file_method` (LoRA's PiSSA/OLoRA initialisation keeps a frozen copy of its
        starting factors and ships as an ordinary LoRA of twice the rank)."""
        return dict(self.state_dict())

    def output_side_parameters(self) -> list[nn.Parameter]:
        """Parameters on the output side of a factorised update, initialised at zero (LoRA's ``B``):
        LoRA+ (Hayou et al. 2024) trains them at a higher learning rate than the input side
        (:func:`peftkit.param_groups` with ``lora_plus_ratio``). Default: none."""
        return []

    def validate(self, module: nn.Module) -> None:
        """Check values just loaded from a file, before the adapter is attached (optional): raise
        ``ValueError`` saying what does not fit ``module`` (e.g. FISH's positions past the end of
        their tensor), and the load is refused. Shapes and dtypes are checked by the core already."""

    @property
    def has_transform(self) -> bool:
        """Whether this adapter implements the output-space form."""
        return type(self).transform is not Adapter.transform

    @property
    def has_stand_in(self) -> bool:
        """Whether this adapter implements the stand-in form (:meth:`stand_in`)."""
        return type(self).stand_in is not Adapter.stand_in

    @property
    def has_transform_rows(self) -> bool:
        """Whether this adapter's class batches mixed-adapter rows (:meth:`transform_rows`)."""
        own: Any = getattr(type(self).transform_rows, "__func__", None)  # a classmethod: compare the functions
        return own is not getattr(Adapter.transform_rows, "__func__", None)

    @property
    def has_delta(self) -> bool:
        """Whether this adapter has a weight-space form (override when only some instances do)."""
        return type(self).delta is not Adapter.delta


@dataclasses.dataclass(frozen=True)
class PlanContext:
    """What :meth:`Method.plan` is given: the model and the choices already made for it.

    Attributes:
        model: The backbone (frozen, unchanged).
        targets: The selected target paths: the user's ``targets`` (filtered with
            :meth:`Method.can_adapt`), or :meth:`Method.default_targets`, minus ``exclude`` and
            the modules trained whole or replaced.
        explicit: Whether the user chose ``targets`` (False: the method's defaults).
        train: Paths of the modules trained whole or replaced (``train``, ``head``, ``heads``).
        trained_parameters: How many parameters those train (a method with a parameter budget
            counts them inside it, as FISH does).
        output_layer: Path of the model's output layer, if one was found.
        replaced: Whether ``head=``/``heads=`` replace the output layer.
        parameters: Parameters the user's ``targets`` name (``"pos_embed"``, ``"experts.w1"``):
            owner module path -> the names of its selected parameters. Only for a method with
            ``adapts_parameters``; such a method plans them as targets of their owners.
    """

    model: nn.Module
    targets: list[str]
    explicit: bool
    train: list[str]
    trained_parameters: int
    output_layer: str | None
    replaced: bool
    parameters: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a method decides for one model: returned by :meth:`Method.plan`.

    Attributes:
        targets: Target path -> spec: JSON-serialisable facts :meth:`Method.build` needs for that
            target beyond the config (e.g. LoRA's ``{"bias_only": True}``, FISH's counts). The
            specs are saved in the adapter file and given back to ``build`` when it is loaded, so
            wrapping and loading build through one path.
        train: Modules the method itself trains whole (copied, saved whole), besides the user's.
        values: Target path -> initial values of that adapter's tensors (``state_dict`` keys), for
            values that come from planning rather than from ``build`` (FISH's selected positions).
            Used when wrapping only; a loaded file supplies every value.
    """

    targets: dict[str, dict[str, Any]]
    train: list[str] = dataclasses.field(default_factory=list)
    values: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


class Method(Generic[ConfigT]):
    """Base class of a PEFT method. A plugin registers subclasses through ``register_methods``.

    A subclass sets ``name`` and ``Config`` and implements :meth:`build`; that is all a method
    needs (see ``docs/plugins.md``). One instance serves one adapter: ``self.config`` holds its
    validated config, and no hook stores anything on the instance for another to read (what one
    step decides is returned, in a :class:`Plan`). A subclass names its config type as the type
    parameter, ``class LoRA(peftkit.Method[LoraConfig])``, so that ``self.config`` is typed.

    Hooks, in the order they run when wrapping (loading a file calls :meth:`build` only, with the
    specs the file saved):

    1. :meth:`default_targets` (when the user gives no ``targets``) and :meth:`can_adapt` (to
       filter the user's ``targets``);
    2. :meth:`plan` (optional): the last word on the targets and each target's spec;
    3. :meth:`build`, once per target.

    Class attributes:
        name: The method's registered name, e.g. ``"lora"``.
        Config: The frozen config dataclass (its ``__post_init__`` validates it and raises
            :class:`~peftkit.errors.ConfigError`); every field JSON-serialisable except those
            declared ``field(metadata={"runtime": True})`` (data, callables), which are not saved.
        adapts: Module types :meth:`build` accepts (``can_adapt`` and ``default_targets`` use it).
        hash_base_values: Whether saved deltas depend on the exact base values (so the file's
            fingerprint includes a content hash of the targeted base tensors).
        adapts_targets: False for a method that only trains whole modules (its :class:`Plan`'s
            ``train``) and so takes no ``targets``.
        follows_ties: Whether the deltas belong to parameters rather than to the modules using
            them (FISH): a delta on a tensor that other modules share (tied weights) then applies
            in all of them, as training the parameter itself would. Otherwise (LoRA, as in PEFT) it
            applies in the targeted module only.
        adapts_parameters: Whether ``targets`` may name parameters as well as modules (LoRA on a
            custom layer's ``weight`` or a learned ``pos_embed``); they reach :meth:`plan` in
            :attr:`PlanContext.parameters`.
        learning_rate: An AdamW learning rate that usually works for this method's parameters
            (``peftkit train`` uses it when no ``--lr`` is given); None: no advice (1e-3 is used).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[Any]] = type(None)
    adapts: ClassVar[tuple[type[nn.Module], ...]] = ()
    hash_base_values: ClassVar[bool] = False
    adapts_targets: ClassVar[bool] = True
    follows_ties: ClassVar[bool] = False
    adapts_parameters: ClassVar[bool] = False
    learning_rate: ClassVar[float | None] = None

    def __init__(self, config: ConfigT) -> None:
        self.config: ConfigT = config

    # -- configuration -------------------------------------------------------------------------
    @classmethod
    def configure(cls, **options: Any) -> Self:
        """Build an instance from keyword options, validating names and values.

        Raises:
            ConfigError: an option the method does not have, or a bad value.
        """
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(options) - fields)
        if unknown:
            hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, fields, 1)) else repr(u)
                     for u in unknown]
            raise ConfigError(
                f"method {cls.name!r} has no option {', '.join(hints)}; its options are: "
                f"{', '.join(sorted(fields))} (plus wrap's own: targets, exclude, train, head, heads, name, example_input)."
            )
        try:
            config = cls.Config(**options)
        except TypeError as exc:
            raise ConfigError(f"bad options for method {cls.name!r}: {exc}") from exc
        return cls(config)

    def config_json(self) -> str:
        """The config as JSON (stored in adapter files). Fields declared with
        ``field(metadata={"runtime": True})`` (data, callables, masks) are inputs, not config, and
        are left out."""
        saved = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)
                 if not f.metadata.get("runtime")}
        return json.dumps(saved, separators=(",", ":"), sort_keys=True)

    def file_method(self) -> Method[Any]:
        """The configured method an adapter file records, whose :meth:`build` rebuilds the tensors
        :meth:`Adapter.file_state` writes (default: this method). A file must load on the untouched
        backbone with the same outputs; see :meth:`Adapter.file_state`."""
        return self

    @classmethod
    def from_json(cls, text: str) -> Self:
        """Rebuild an instance from :meth:`config_json` output."""
        return cls.configure(**json.loads(text))

    # -- the hooks -----------------------------------------------------------------------------
    def can_adapt(self, module: nn.Module) -> bool:
        """Whether :meth:`build` accepts this module (filters the user's ``targets`` patterns).
        Default: an instance of one of :attr:`adapts`, or any module when that is empty."""
        return not self.adapts or isinstance(module, self.adapts)

    def default_targets(self, model: nn.Module) -> list[str]:
        """Module paths to adapt when the user gives no ``targets``. Default: every module of a type
        in :attr:`adapts` (that :meth:`can_adapt` accepts), except the model's output layer(s)."""
        if not self.adapts:
            raise TargetError(f"method {self.name!r} has no default targets; pass targets=[...]")
        heads = output_layers(model).all
        return [p for p, m in model.named_modules() if p and p not in heads and self.can_adapt(m)]

    def plan(self, context: PlanContext) -> Plan:
        """The last word on what to build, given the selected targets (optional). Runs once when
        wrapping, never when loading. Default: every selected target, with an empty spec.

        Override to add or drop targets (LoRA adds bias-only targets for ``bias="all"``), to work
        out facts from the model (FISH estimates the Fisher information here), or to train whole
        modules (``last_layer``). Everything :meth:`build` needs beyond the config goes into the
        returned specs, which the adapter file keeps."""
        return Plan({p: {} for p in context.targets})

    def combine(self, how: str, parts: Mapping[str, Sequence[tuple[float, Adapter]]], modules: Mapping[str, nn.Module],
                *, rank: int | None, density: float, generator: torch.Generator) -> Combination:
        """One adapter of this method from a weighted combination of several (optional; used by
        :meth:`peftkit.AdaptedModel.combine`). Called on the first adapter's configured method,
        without autograd.

        Args:
            how: One of :data:`peftkit.combination.HOWS` (already checked); the formulas on dense
                deltas are :func:`peftkit.combination.merge_deltas`.
            parts: Target path -> ``(weight, adapter)`` for each combined adapter with a target
                there (an adapter without one contributes nothing there).
            modules: Target path -> the backbone's module.
            rank: The rank asked for (``svd``, ``ties``, ``dare_*``), or None for the method's default.
            density: The share of each delta ``ties`` keeps and ``dare_*`` keeps on average.
            generator: Seeded, for ``dare_*``'s random drops.

        Returns:
            The combined adapter's options and values (a :class:`peftkit.combination.Combination`).
            Raise :class:`~peftkit.errors.ConfigError` for a combination the method cannot express.
        """
        raise ConfigError(f"method {self.name!r} cannot combine adapters: its plugin does not implement "
                          "Method.combine (the built-in lora does)")

    def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> Adapter:
        """Build the adapter for the target module at ``path``, on its device and dtype.

        Called when wrapping (``spec`` from :meth:`plan`) and when loading (``spec`` from the file:
        treat it as untrusted and raise ``ValueError`` or a :mod:`peftkit.errors` exception for bad
        values). Its tensors are then filled from the plan's values or the file's. A method whose
        ``build`` takes only ``(path, module)`` is called that way.
        """
        raise NotImplementedError


# hooks of the first plugin protocol, and what replaced them: a plugin still implementing one would
# silently lose that behaviour, so it is refused by name
_RETIRED = {
    "setup": "plan(context): work that needs the model (context.model, context.train, context.trained_parameters)",
    "expand_targets": "plan(context): return Plan({path: spec, ...}) with the targets to build",
    "trained_modules": "plan(context): return Plan(targets, train=[...])",
    "rebuild": "build(path, module, spec): the same call for wrapping and loading, spec from the plan or the file",
}


def retired_hooks(cls: type[Method[Any]]) -> str | None:
    """Why ``cls`` cannot work with this peftkit, if it implements hooks of the first plugin protocol
    (which peftkit no longer calls): a sentence naming each and its replacement; None if it does not."""
    retired = [h for h in _RETIRED if any(h in vars(k) for k in cls.__mro__ if k is not Method and k is not object)]
    if not retired:
        return None
    return (f"method {cls.name!r} ({cls.__module__}) implements {', '.join(h + '()' for h in retired)}, which peftkit "
            "no longer calls; use " + "; ".join(_RETIRED[h] for h in retired) + ". See docs/plugins.md.")
