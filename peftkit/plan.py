"""Selection -> plan: what one adapter is made of, decided before anything is built.

An :class:`AdapterPlan` comes from one of two places and is built by one code path
(:func:`peftkit.build.build`):

* :func:`make_plan`, from ``wrap``'s arguments: the user's ``targets``/``exclude``/``train``/``head``
  choices, the method's :meth:`~peftkit.Method.default_targets` and :meth:`~peftkit.Method.plan`;
* an adapter file's targets table (:mod:`peftkit.files`), which stores every plan field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, PeftkitError, PluginError, TargetError
from .heads import HeadSpec, head_parameters, head_widths, normal_head
from .method import Method, Plan, PlanContext
from .plugins import MethodInfo, get_method
from .targets import Selection, is_under, output_layers, select_modules, select_parameters

__all__ = ["AdapterPlan", "make_plan", "plan_for"]


@dataclass(frozen=True)
class AdapterPlan:
    """Everything needed to build one adapter for a model.

    Attributes:
        method: The configured method.
        info: Its registration (plugin, distribution, version).
        targets: Target path -> the method's spec for it (saved in the file).
        train: Paths of modules trained whole (copies saved whole), fresh output layers included.
        fresh: Train path -> number of outputs, for a fresh output layer (``head=N``).
        heads: (path of the output layer, {head name: outputs}) for multi-task heads, or None.
        values: Target path -> initial values of adapter tensors decided when planning (wrap only).
    """

    method: Method[Any]
    info: MethodInfo
    targets: dict[str, dict[str, Any]]
    train: list[str] = field(default_factory=list)
    fresh: dict[str, int] = field(default_factory=dict)
    heads: tuple[str, dict[str, HeadSpec]] | None = None
    values: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def configured(method: str | Method[Any], options: dict[str, Any]) -> tuple[Method[Any], MethodInfo]:
    """The method instance for ``method`` (a registered name, or an instance) and its registration.

    Raises:
        UnknownMethodError: no plugin provides it.
        ConfigError: options given twice, an unknown option, or a bad value.
    """
    info = get_method(method.name if isinstance(method, Method) else method)
    if isinstance(method, Method):
        if options:
            raise ConfigError("pass options either in the Method instance or as keywords, not both")
        return method, info
    return info.cls.configure(**options), info


def _check_head_counts(head: Any, heads: Any) -> None:
    if head is not None and heads is not None:
        raise ConfigError("pass either head=N (one new output layer) or heads={name: N, ...} (several), not both")
    if heads is not None and not isinstance(heads, dict):
        raise ConfigError(f"heads={heads!r} is invalid; expected a dict of name -> outputs, e.g. {{'count': 5}}")
    if head is not None and not (isinstance(head, int) and not isinstance(head, bool) and head >= 1):
        # a fresh output layer takes the old one's place tensor for tensor: an MLP needs heads={name: widths}
        raise ConfigError(f"head={head!r} is invalid; expected the number of outputs, e.g. head=2 (for an MLP head, "
                          "pass heads={'out': [256, 2]}: the model then returns {'out': ...})")
    for name, spec in (heads or {}).items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"heads has the name {name!r}; name each head with a non-empty string, e.g. 'count'")
        head_widths(spec, f"heads[{name!r}]")


def _outermost(model: nn.Module, paths: list[str]) -> list[str]:
    """``paths`` without duplicates or paths inside another, in module order."""
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    unique = list(dict.fromkeys(paths))
    return sorted((p for p in unique if not is_under(p, [q for q in unique if q != p])), key=order.__getitem__)


def make_plan(model: nn.Module, method: str | Method[Any], *, targets: Selection = None, exclude: Selection = None,
              train: Selection = None, head: int | None = None, heads: dict[str, HeadSpec] | None = None,
              example_input: Any = None, **options: Any) -> AdapterPlan:
    """Plan an adapter of ``method`` for ``model`` from ``wrap``'s arguments, without touching ``model``.

    In order: the method and its options; the output layer (for ``head``/``heads``); the modules
    trained whole; the targets (the user's, or the method's defaults, minus ``exclude`` and the
    trained modules); then the method's own :meth:`~peftkit.Method.plan`.

    Raises:
        UnknownMethodError, ConfigError, TargetError: see :func:`peftkit.wrap`.
    """
    m, info = configured(method, options)
    _check_head_counts(head, heads)
    replaced = head is not None or heads is not None
    outputs = output_layers(model, example_input)
    output = outputs.require(model, "head=N" if head is not None else "heads={...}") if replaced else outputs.path
    train_paths = select_modules(model, train, what="train") if train is not None else []
    if head is not None and output is not None:
        train_paths.append(output)
    train_paths = _outermost(model, train_paths)
    avoid = train_paths + ([output] if replaced and output else [])
    fresh = {output: head} if head is not None and output is not None else {}
    trained = sum(p.numel() for t in train_paths if t not in fresh for p in model.get_submodule(t).parameters())
    for spec in ([head] if head is not None else []) + list((heads or {}).values()):
        trained += head_parameters(model.get_submodule(output or ""), spec)
    parameters, targets = _parameters(model, m, targets, exclude, avoid)
    paths = _targets(model, m, targets, exclude, avoid) if targets or not parameters else []
    context = PlanContext(model=model, targets=paths, explicit=targets is not None, train=list(avoid),
                          trained_parameters=trained, output_layer=output, replaced=replaced, parameters=parameters)
    decided = _planned(m, context)
    chosen = set(paths)
    # what the method adds by itself steps around trained modules; an explicit overlap is an error (build)
    planned = {p: dict(spec) for p, spec in decided.targets.items() if p in chosen or not is_under(p, avoid)}
    return AdapterPlan(m, info, planned, _outermost(model, train_paths + list(decided.train)), fresh,
                       (output, {k: normal_head(v) for k, v in heads.items()}) if heads is not None and output is not None
                       else None,
                       {p: dict(v) for p, v in decided.values.items() if p in planned})


def plan_for(model: nn.Module, method: Method[Any], targets: list[str], train: list[str] | None = None,
             parameters: dict[str, list[str]] | None = None) -> AdapterPlan:
    """The plan of ``method`` for exactly these target paths and trained modules (and, for a method
    that adapts parameters, ``parameters``: owner path -> parameter names), as when the user names
    them (for a format plugin importing another library's adapter): the method's
    :meth:`~peftkit.Method.plan` still has the last word, but nothing is selected by pattern.

    Raises:
        UnknownMethodError: ``method`` is not registered.
        TargetError, PluginError: as :func:`make_plan`.
    """
    m, info = configured(method, {})
    train = _outermost(model, list(train or []))
    paths = [p for p in targets if not is_under(p, train)]
    context = PlanContext(model=model, targets=paths, explicit=True, train=train, trained_parameters=0,
                          output_layer=None, replaced=False, parameters=dict(parameters or {}))
    decided = _planned(m, context)
    planned = {p: dict(spec) for p, spec in decided.targets.items() if not is_under(p, train)}
    return AdapterPlan(m, info, planned, _outermost(model, train + list(decided.train)),
                       values={p: dict(v) for p, v in decided.values.items() if p in planned})


def _planned(m: Method[Any], context: PlanContext) -> Plan:
    """The method's plan, checked: a :class:`Plan` naming modules the model has, whose specs can be
    saved in a file (for :func:`make_plan` and :func:`plan_for` alike)."""
    try:
        decided = m.plan(context)
    except PeftkitError:
        raise
    except Exception as exc:  # the plugin's own failure (or one in code it calls, e.g. a user's loss_fn)
        raise PluginError(f"method {m.name!r} raised {type(exc).__name__} while planning: {str(exc)[:300]}") from exc
    if not isinstance(decided, Plan):
        raise PluginError(f"method {m.name!r}: plan() returned {type(decided).__name__}; it must return a peftkit.method.Plan")
    missing = [p for p in [*decided.targets, *decided.train] if not _exists(context.model, p)]
    if missing:
        raise PluginError(f"method {m.name!r}: plan() names modules the model does not have: {missing[:3]}")
    for path, spec in decided.targets.items():
        try:
            json.dumps(spec, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise PluginError(f"method {m.name!r}: the spec planned for {path!r} cannot be saved in a file ({exc}); a "
                              "spec holds JSON values (numbers, strings, lists, dicts), and tensors go in Plan.values") from None
    return decided


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _parameters(model: nn.Module, m: Method[Any], targets: Selection,
                exclude: Selection, avoid: list[str]) -> tuple[dict[str, list[str]], Selection]:
    """The parameters ``targets`` name (for a method that adapts parameters), and the selection left
    for modules (None when the user gave no targets; [] when they named parameters only)."""
    if targets is None or not m.adapts_parameters:
        return {}, targets
    parameters, rest = select_parameters(model, targets, exclude)
    inside = [o for o in parameters if avoid and is_under(o, avoid)]
    if inside:
        raise TargetError(f"targets name parameters of {', '.join(repr(o) for o in inside[:3])}, which are trained "
                          "whole (train=, head=) already; leave them out of one or the other")
    return parameters, rest


def _targets(model: nn.Module, m: Method[Any], targets: Selection, exclude: Selection, avoid: list[str]) -> list[str]:
    """The selected target paths: the user's, or the method's defaults (minus ``exclude`` and ``avoid``)."""
    if not m.adapts_targets:
        if targets is not None:
            raise ConfigError(f"method {m.name!r} trains whole modules and takes no targets; use train=[...]")
        return []
    # a rule of its own on top of declared types: say whose rule refused a module of an adapted type
    custom = bool(m.adapts) and type(m).can_adapt is not Method.can_adapt
    if targets is not None:
        return select_modules(model, targets, exclude, can_adapt=m.can_adapt, parameters=m.adapts_parameters,
                              method=f"{m.name!r} ({type(m).__name__}.can_adapt)" if custom else repr(m.name))
    excluded = select_modules(model, exclude, what="exclude") if exclude is not None else []
    paths = [p for p in m.default_targets(model) if not is_under(p, excluded + avoid)]
    if not paths:
        if type(m).default_targets is Method.default_targets:
            accepted = f" that {type(m).__name__}.can_adapt accepts" if custom else ""
            doc = f"every {', '.join(t.__name__ for t in m.adapts)}{accepted}, except the output layer"
        else:
            doc = " ".join((type(m).default_targets.__doc__ or "").split()).split(". ")[0].rstrip(".")
        defaults = f" (its defaults: {doc[0].lower() + doc[1:]})" if doc else ""
        raise TargetError(f"method {m.name!r} found no default targets in {type(model).__name__}{defaults}; "
                          "pass targets=[...]")
    return paths
