"""Choosing modules: target selection, the output layer, and where a target's tensors are read.

A *selector* is one of:
  * a string: a module path (``"encoder.layer.0.attention.self.query"``), a dotted suffix
    (``"query"``, ``"self.query"``), or a regular expression matched against the full path
    (``r"encoder\\.layer\\.[0-5]\\.attention\\.self\\.(query|value)"``);
  * a module type (``nn.Linear``), matching instances;
  * a callable ``(path, module) -> bool``.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import TargetError

if TYPE_CHECKING:
    from torch.autograd.graph import Node

Selector = str | type | Callable[[str, nn.Module], bool]
Selection = Selector | Sequence[Selector] | None

__all__ = ["OutputLayers", "Selection", "Selector", "attributes_read", "calls_forward", "find_blocks",
           "find_output_layer", "forward_source", "host_of", "is_projection", "is_under", "matches", "nearest_names",
           "output_layers", "pattern_problem", "select_modules", "select_parameters", "tied_aliases"]


def _as_list(selection: Selection) -> list[Selector]:
    if selection is None:
        return []
    if isinstance(selection, (str, type)) or callable(selection):
        return [selection]
    return list(selection)


# the regular-expression parser of the re module (private, stable since Python 3.0)
if sys.version_info >= (3, 11):
    from re import _parser as _sre
else:
    import sre_parse as _sre

MAX_PATTERN = 500  # characters
MAX_OPEN_REPEATS = 4  # unbounded repeats (*, +, {n,}) in one pattern: a polynomial of at most this degree


def pattern_problem(pattern: str) -> str | None:
    """Why matching ``pattern`` against a module path could take more than bounded time (catastrophic
    backtracking), or None (also for a string that is no regular expression at all). Refused: nested repeats (``(a+)+``), repeated alternations (``(a|a)*``),
    back-references, more than :data:`MAX_OPEN_REPEATS` unbounded repeats, over :data:`MAX_PATTERN`
    characters. Module selectors never need these; a pattern from a file may be hostile."""
    if not isinstance(pattern, str):
        return f"it is a {type(pattern).__name__}, not a string"
    if len(pattern) > MAX_PATTERN:
        return f"it is {len(pattern)} characters long (at most {MAX_PATTERN})"
    try:
        parsed = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return None  # never runs as a regular expression (a selector is then a name or suffix only)
    open_repeats = 0

    def walk(items: Any, in_repeat: bool) -> str | None:
        nonlocal open_repeats
        for op, arg in items:
            name = str(op)
            why = None
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = arg
                unbounded = high is _sre.MAXREPEAT or high > 16
                if in_repeat and unbounded:
                    return "it repeats a repeated group (nested quantifiers backtrack exponentially)"
                open_repeats += unbounded
                why = walk(sub, in_repeat or unbounded)
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "it uses a back-reference"
            elif name == "BRANCH":
                if in_repeat:
                    return "it repeats an alternation (ambiguous alternatives backtrack exponentially)"
                why = next((w for branch in arg[1] if (w := walk(branch, in_repeat))), None)
            elif name in ("SUBPATTERN", "ASSERT", "ASSERT_NOT", "ATOMIC_GROUP"):
                why = walk(arg[-1], in_repeat)
            if why:
                return why
        return None

    why = walk(parsed, False)
    if why is None and open_repeats > MAX_OPEN_REPEATS:
        why = f"it has {open_repeats} unbounded repeats (at most {MAX_OPEN_REPEATS})"
    return why


def matches(selector: Selector, path: str, module: nn.Module | None = None) -> bool:
    """Whether one selector (name, dotted suffix, full-match regex, type or callable) picks ``path``."""
    return (isinstance(selector, str) and _by_name(selector, path)) or _by_pattern(selector, path, module)


def _by_name(selector: str, path: str) -> bool:
    return path == selector or path.endswith("." + selector)


def _by_pattern(selector: Selector, path: str, module: nn.Module | None) -> bool:
    if isinstance(selector, str):
        try:
            return re.fullmatch(selector, path) is not None
        except re.error:
            return False
    if isinstance(selector, type):
        return isinstance(module, selector)
    if callable(selector):
        picks: Callable[[str, Any], object] = selector  # given None where matches() was called without a module
        return bool(picks(path, module))
    raise TargetError(
        f"bad target selector {selector!r} ({type(selector).__name__}); expected a module name, "
        "a dotted suffix, a regex string, a module type, or a callable (path, module) -> bool"
    )


def is_under(path: str, prefixes: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or inside one of them."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def nearest_names(model: nn.Module, wanted: str, n: int = 5) -> list[str]:
    """Module paths and leaf names of ``model`` closest to ``wanted`` (for error messages); empty
    when none is close."""
    paths = [p for p, _ in model.named_modules() if p]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    close = difflib.get_close_matches(wanted, leaves, n, 0.6) + difflib.get_close_matches(wanted, paths, n, 0.6)
    low = wanted.lower()
    close += [leaf for leaf in leaves if len(low) >= 3 and (low in leaf.lower() or (len(leaf) >= 3 and leaf.lower() in low))]
    return list(dict.fromkeys(close))[:n]


def _common_names(model: nn.Module, n: int = 10) -> list[str]:
    """The most frequent leaf names of ``model``'s modules (what selectors usually name)."""
    counts: dict[str, int] = {}
    for p, _ in model.named_modules():
        if p:
            leaf = p.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k))[:n]


def _adaptable(model: nn.Module, can_adapt: Callable[[nn.Module], bool]) -> str:
    """``Type (first path), ...`` for the module types a method can adapt in ``model``."""
    found: dict[str, str] = {}
    for p, m in model.named_modules():
        if p and type(m).__name__ not in found and can_adapt(m):
            found[type(m).__name__] = p
    return ", ".join(f"{t} (e.g. {p})" for t, p in list(found.items())[:6]) or "none"


def select_modules(
    model: nn.Module,
    targets: Selection,
    exclude: Selection = None,
    *,
    can_adapt: Callable[[nn.Module], bool] = lambda m: True,
    what: str = "targets",
    method: str = "this method",
    parameters: bool = False,
) -> list[str]:
    """Paths of the modules that ``targets`` selects, minus ``exclude`` and everything under it.

    A module selected by its name or suffix must be adaptable (else an error); modules that only a
    pattern (regex, type, callable) selects are kept when ``can_adapt`` accepts them. With
    ``parameters`` (the method adapts named parameters), refusing a module names its parameters.

    Raises:
        TargetError: the selection matches nothing (the message lists the nearest names), matches
            only modules the method cannot adapt (the message says what it can adapt here), or
            names a module that cannot be adapted.
    """
    selectors = _as_list(targets)
    excluded_sel = _as_list(exclude)
    modules = list(model.named_modules())  # the root ("") too: wrap(nn.MultiheadAttention(...)) is fine
    excluded = [p for p, m in modules if any(
        (isinstance(s, str) and _by_name(s, p)) or _by_pattern(s, p, m) for s in excluded_sel)]
    chosen: list[str] = []
    refused: list[str] = []
    unfit: list[str] = []  # matched by a pattern, but not adaptable
    for path, module in modules:
        if is_under(path, excluded):
            continue
        named = any(isinstance(s, str) and _by_name(s, path) for s in selectors)
        if named:
            (chosen if can_adapt(module) else refused).append(path)
        elif any(_by_pattern(s, path, module) for s in selectors):
            (chosen if can_adapt(module) else unfit).append(path)
    if refused:
        kinds = ", ".join(f"{p} ({type(model.get_submodule(p)).__name__})" for p in refused[:5])
        inner = [p for p, m in modules if any(is_under(p, [r]) and p != r for r in refused) and can_adapt(m)]
        hint = (f" Select the layers inside them instead (by suffix, regex or type), e.g. {', '.join(inner[:3])}."
                if inner else f" Nothing inside them can be adapted either; in {type(model).__name__}, {method} can "
                              f"adapt: {_adaptable(model, can_adapt)}.")
        named_params = [f"{r}.{n}" if r else n for r in refused for n, t in model.get_submodule(r).named_parameters()
                        if t.dim() >= 2] if parameters else []
        if named_params:
            hint += (f" Or name the parameters they read, which {method} adapts: "
                     f"{', '.join(named_params[:3])}{' …' if len(named_params) > 3 else ''}.")
        raise TargetError(f"{what} {selectors!r} name modules {method} cannot adapt: {kinds}.{hint}")
    if not chosen:
        if unfit:
            kinds = ", ".join(f"{p} ({type(model.get_submodule(p)).__name__})" for p in unfit[:5])
            inner = [p for p, m in modules if any(is_under(p, [u]) and p != u for u in unfit) and can_adapt(m)]
            hint = (f"select the layers inside them, e.g. {', '.join(inner[:3])}" if inner else
                    f"in {type(model).__name__} it can adapt: {_adaptable(model, can_adapt)}")
            raise TargetError(f"{what} {selectors!r} match {len(unfit)} module(s), {kinds}, none of which {method} can "
                              f"adapt; {hint}.")
        wanted = next((s for s in selectors if isinstance(s, str)), "")
        owner, _, leaf = wanted.rpartition(".")
        if owner in dict(modules) and leaf in dict(modules)[owner]._parameters:
            instead = f"select {owner!r} instead" if owner else "select the modules that use it instead"
            raise TargetError(f"{what} {selectors!r}: {wanted!r} is a parameter, and {method} selects modules; "
                              f"{instead}.")
        leaves = [n for n, _ in model.named_parameters() if n.rpartition(".")[2] == wanted and n != wanted]
        if leaves:
            raise TargetError(f"{what} {selectors!r}: {wanted!r} is the leaf name of parameters "
                              f"{', '.join(leaves[:3])}{' …' if len(leaves) > 3 else ''}; name them in full, or by a "
                              f"dotted suffix, e.g. {'.'.join(leaves[0].split('.')[-2:])!r} (for a method that adapts "
                              "parameters), or select their modules.")
        near = nearest_names(model, wanted) if wanted else []
        hint = (f" Nearest module names: {', '.join(near)}." if near else
                f" No module name is close to {wanted!r}; the most common names in it are: "
                f"{', '.join(_common_names(model))}." if wanted else "")
        raise TargetError(f"{what} {selectors!r} (exclude={excluded_sel!r}) match no module of {type(model).__name__}.{hint}")
    return chosen


def select_parameters(model: nn.Module, targets: Selection,
                      exclude: Selection = None) -> tuple[dict[str, list[str]], list[Selector]]:
    """Split ``targets`` into the parameters they name and the module selectors left.

    A string that matches no module path but names parameters (a full name such as ``"pos_embed"``
    or ``"blocks.3.experts.w1"``, or a dotted suffix of names such as ``"experts.w1"``) selects those
    parameters; everything else stays a module selector.

    Returns:
        (owner module path -> names of the selected parameters held directly by it, in module
        order; the selectors left for :func:`select_modules`).
    """
    modules = dict(model.named_modules())
    excluded_sel = _as_list(exclude)
    excluded = [p for p, m in modules.items() if any(
        (isinstance(s, str) and _by_name(s, p)) or _by_pattern(s, p, m) for s in excluded_sel)]
    params = [n for n, _ in model.named_parameters()]
    owners: dict[str, list[str]] = {}
    rest: list[Selector] = []
    for selector in _as_list(targets):
        if not isinstance(selector, str) or any(_by_name(selector, p) for p in modules):
            rest.append(selector)
            continue
        # a bare leaf name ("weight") would pick every module's: a suffix needs a dot, a full name does not
        named = [n for n in params if n == selector or ("." in selector and n.endswith("." + selector))]
        if not named:
            rest.append(selector)
            continue
        for name in named:
            owner, _, leaf = name.rpartition(".")
            if not is_under(owner, excluded) and leaf not in owners.setdefault(owner, []):
                owners[owner].append(leaf)
    order = {p: i for i, p in enumerate(modules)}
    return {o: owners[o] for o in sorted(owners, key=order.__getitem__) if owners[o]}, rest


def _leaf_with_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def is_projection(module: nn.Module) -> bool:
    """Whether a module maps features to features with a weight matrix or kernel (Linear, Conv,
    Hugging Face Conv1D, Bilinear, ...): what can be an output layer. Norms and embeddings cannot."""
    w = getattr(module, "weight", None)
    return (isinstance(w, nn.Parameter) and w.dim() >= 2
            and not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and "norm" not in type(module).__name__.lower())


def _features(module: nn.Module) -> tuple[int, int] | None:
    """(input, output) features of a projection, when it says."""
    for a, b in (("in_features", "out_features"), ("in_channels", "out_channels")):
        if isinstance(getattr(module, a, None), int) and isinstance(getattr(module, b, None), int):
            return getattr(module, a), getattr(module, b)
    w = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:  # Hugging Face: (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return None


@dataclass(frozen=True)
class OutputLayers:
    """What produces a model's output (see :func:`output_layers`).

    Attributes:
        path: The single output layer, or None.
        candidates: When there is no single one: the layers producing the outputs (may be empty).
        reason: Why there is no single output layer (a sentence for error messages), else "".
    """

    path: str | None
    candidates: tuple[str, ...] = ()
    reason: str = ""

    @property
    def all(self) -> list[str]:
        """Every layer producing an output: the output layer, or all the candidates."""
        return [self.path] if self.path is not None else list(self.candidates)

    def require(self, model: nn.Module, what: str) -> str:
        """The output layer, or a :class:`TargetError` saying why there is none and what to do instead."""
        if self.path is not None:
            return self.path
        listed = f" Candidates: {', '.join(self.candidates)}." if self.candidates else ""
        raise TargetError(
            f"{what} needs the model's single output layer, and {type(model).__name__} has none: {self.reason}.{listed} "
            "Name the modules to train with train=[...] (replace a layer yourself first to change its size), or pass "
            "example_input= so peftkit can trace what the model returns.")


def output_layers(model: nn.Module, example_input: Any = None) -> OutputLayers:
    """The model's output layer: the projection whose output is the model's output.

    Found, in this order, from: a forward pass on ``example_input`` (traced: the layers whose outputs
    reach the model's outputs through parameter-free operations only); what the model declares (a
    Hugging Face model's task head or output embeddings, a timm model's classifier); the module
    order (the last parametrised module, unless it is a norm, or one of parallel projections side by
    side, like Faster R-CNN's class and box predictors). Where several layers produce outputs (CLIP's
    two projections, a detector's two predictors), or the model ends in a normalisation layer
    (``BertModel``'s hidden states), there is no single output layer.
    """
    if example_input is not None:
        traced = _traced_outputs(model, example_input)
        if traced:
            return _judge(model, traced, "several layers produce its outputs")
    declared = _declared_outputs(model)
    if declared is not None:
        return declared
    return _ordered_outputs(model, [(p, m) for p, m in model.named_modules() if p and _leaf_with_params(m)])


def find_output_layer(model: nn.Module, example_input: Any = None) -> str | None:
    """The path of the model's single output layer, or None where there is none (see :func:`output_layers`)."""
    return output_layers(model, example_input).path


def _judge(model: nn.Module, paths: list[str], several: str) -> OutputLayers:
    if len(paths) > 1:
        return OutputLayers(None, tuple(paths), several)
    module = model.get_submodule(paths[0])
    if not is_projection(module):
        return OutputLayers(None, (), f"its output comes from {type(module).__name__} {paths[0]!r}, which is not an "
                                      "output projection (a model without a task head)")
    return OutputLayers(paths[0])


def _ordered_outputs(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> OutputLayers:
    """The last parametrised layer in registration order, checked (see :func:`output_layers`)."""
    if not layers:
        return OutputLayers(None, (), "it has no parametrised layer")
    path, last = layers[-1]
    parent = path.rpartition(".")[0]
    sizes = _features(last)
    chained = isinstance(model.get_submodule(parent), nn.Sequential)  # a Sequential's layers run one after another
    if sizes is not None and is_projection(last) and not chained:  # parallel heads: projections of the same features side by side
        twins = [p for p, m in layers[:-1] if p.rpartition(".")[0] == parent and is_projection(m)
                 and (f := _features(m)) is not None and f[0] == sizes[0] and f[1] != sizes[0]]
        if twins:
            return OutputLayers(None, (*twins, path), "several projections side by side produce its outputs")
    return _judge(model, [path], "")


def _declared_outputs(model: nn.Module) -> OutputLayers | None:
    """The output layer a Hugging Face or timm model declares (None: the model declares nothing)."""
    paths = {id(m): p for p, m in model.named_modules()}
    if type(model).__module__.startswith("torchvision.models.detection"):
        return OutputLayers(None, tuple(_detection_outputs(model)), "a detection model predicts classes and boxes "
                                                                    "(and keypoints or masks) with separate layers")
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("classifier") and callable(getattr(model, "get_classifier", None)):  # timm
        names = [cfg["classifier"]] if isinstance(cfg["classifier"], str) else list(cfg["classifier"])
        found = [n for n in names if n in dict(model.named_modules())]
        layers = [n for n in found if _leaf_with_params(model.get_submodule(n))]
        if found and not layers:
            return OutputLayers(None, (), f"its classifier {found[0]!r} was removed (num_classes=0)")
        if layers:
            return _judge(model, layers, "it declares several classifiers")
    get_out = getattr(model, "get_output_embeddings", None)
    base = getattr(model, "base_model", None)
    if not (callable(get_out) and isinstance(base, nn.Module) and hasattr(model, "config")):
        return None
    try:
        embeddings = get_out()
    except (AttributeError, NotImplementedError):
        embeddings = None
    lm_head = paths.get(id(embeddings)) if isinstance(embeddings, nn.Module) else None
    if base is model:
        if lm_head:
            return OutputLayers(lm_head)
        return OutputLayers(None, (), "it is a Hugging Face base model without a task head, returning hidden states")
    base_path = paths.get(id(base), "")
    head = [(p, m) for p, m in model.named_modules() if p and _leaf_with_params(m) and not is_under(p, [base_path])]
    if not head:
        return OutputLayers(lm_head) if lm_head else None
    ordered = _ordered_outputs(model, head)
    if lm_head and ordered.path and ordered.path != lm_head:
        return OutputLayers(None, (lm_head, ordered.path), "it has several task heads")
    return ordered


_DETECTION_PREDICTORS = {"cls_score", "bbox_pred", "cls_logits", "bbox_reg", "bbox_ctrness", "kps_score_lowres",
                         "mask_fcn_logits"}


def _detection_outputs(model: nn.Module) -> list[str]:
    """The predictors of a torchvision detection model (SSD's: the last layer of each head's items)."""
    found = [p for p, m in model.named_modules() if is_projection(m) and p.rpartition(".")[2] in _DETECTION_PREDICTORS]
    for p, m in model.named_modules():
        if re.search(r"(classification|regression)_head\.module_list\.\d+$", p):
            last = [q for q, c in m.named_modules() if is_projection(c)][-1:]
            found += [f"{p}.{q}" if q else p for q in last]
    return found


def _traced_outputs(model: nn.Module, example_input: Any) -> list[str]:
    """Layers whose outputs reach the model's outputs through parameter-free operations only: each
    parametrised module's output is cut from its history and marked, so the autograd graph of the
    outputs leads back to the nearest marks and no further."""
    marks: dict[int, str] = {}

    def mark(path: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            m = torch.zeros((), dtype=value.dtype, device=value.device, requires_grad=True)
            marks[id(m)] = path
            keep.append(m)
            return value.detach() + m  # the same values, a graph that stops here
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(mark(path, v) for v in value)
        return value

    keep: list[torch.Tensor] = []
    layers = [(p, m) for p, m in model.named_modules() if p and _leaf_with_params(m)]
    handles = [m.register_forward_hook(lambda mod, a, out, _p=p: mark(_p, out)) for p, m in layers]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # the backbone stays frozen: no BatchNorm statistics move, no dropout
    try:
        with torch.enable_grad():
            if isinstance(example_input, dict):
                out = model(**example_input)
            else:
                out = model(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    order = {p: i for i, (p, _) in enumerate(layers)}
    found: set[str] = set()
    seen: set[Any] = set()
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        out = out["logits"]  # a Hugging Face output: the task's predictions, not the hidden states beside them
    stack: list[Node | None] = [t.grad_fn for t in _flatten(out)
                                if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in marks:
            found.add(marks[id(variable)])
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return sorted(found, key=order.__getitem__)


def find_blocks(model: nn.Module) -> list[str]:
    """The blocks of the backbone's main stage, input side first: the parametrised children of the
    module whose repeated blocks weigh most (ResNet: ``conv1 … layer4, fc``; ViT:
    ``encoder.layers.*``; BERT: ``encoder.layer.*``; Swin: its ``features.*`` stages).

    Blocks are composite children (modules of their own) of one class, such as residual stages or
    transformer layers; a module's weight is their count times the share of the parameters they
    hold. A block's own layers (a residual block's convs and norms) are no blocks, and one long stage
    in the middle of a network (a Swin's or ConvNeXt's third) weighs less than the stages around
    it. A model without repeated composite children (a Sequential of layers, an LSTM classifier)
    uses the module with the most parametrised children among those holding a quarter of the
    parameters."""
    total = sum(p.numel() for p in model.parameters()) or 1

    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    best: tuple[float, str, list[str]] = (0.0, "", [])
    fallback: tuple[int, str, list[str]] = (0, "", [])
    for path, module in model.named_modules():
        kids = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
        groups: dict[type, list[nn.Module]] = {}
        for _, c in kids:
            if any(True for _ in c.children()):
                groups.setdefault(type(c), []).append(c)
        weight = max((len(g) * sum(map(size, g)) / total for g in groups.values() if len(g) >= 2), default=0.0)
        if weight > best[0]:
            best = (weight, path, [n for n, _ in kids])
        if len(kids) > fallback[0] and sum(size(c) for _, c in kids) >= total / 4:
            fallback = (len(kids), path, [n for n, _ in kids])
    _, path, names = best if best[2] else fallback
    prefix = f"{path}." if path else ""
    return [prefix + n for n in names]


def tied_aliases(model: nn.Module, path: str) -> list[tuple[str, str, str]]:
    """Tensors of other modules that *are* (tied to) a tensor of the module at ``path``:
    ``(other module path, its tensor name, the tensor's name in the module at path)``."""
    mine = {id(t): n for n, t in model.get_submodule(path).named_parameters(remove_duplicate=False)}
    out = []
    for other, module in model.named_modules():
        if other == path or is_under(other, [path]) or is_under(path, [other]):
            continue
        for n, t in module.named_parameters(recurse=False):
            if id(t) in mine:
                out.append((other, n, mine[id(t)]))
    return out


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _flatten(v)]
    return [obj]


def _method(cls: type, name: str) -> Any:
    """The function behind ``cls.<name>`` (a method, static/class method or property), up to nn.Module."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            return None
        if name in klass.__dict__:
            found = klass.__dict__[name]
            found = getattr(found, "fget", None) or getattr(found, "__func__", found)
            return found if inspect.isfunction(found) else None
    return None


def forward_source(cls: type) -> str:
    """The source of a module class's ``forward`` and of the methods it calls on ``self`` (see
    :func:`host_of`); empty where the source is not available."""
    return _forward_source(cls)


@functools.cache
def _forward_source(cls: type) -> str:
    """Source of ``forward`` and of the methods it calls on ``self``, transitively, over the class's
    bases up to nn.Module (nn.TransformerEncoderLayer's forward delegates to ``_sa_block``). Other
    methods (a timm PatchEmbed's ``set_input_size``) never run in a forward pass."""
    parts: list[str] = []
    seen: set[str] = set()
    todo = ["forward"]
    while todo:
        name = todo.pop()
        fn = _method(cls, name) if name not in seen else None
        seen.add(name)
        if fn is None:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(fn))
            tree = ast.parse(source)
        except (OSError, TypeError, SyntaxError):
            continue
        parts.append(source)
        todo += [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id == "self"]
    return "\n".join(parts)


def attributes_read(ancestor: nn.Module, rel: str) -> set[str]:
    """The attributes of submodule ``rel`` that ``ancestor``'s forward reads (``self.conv1.stride``,
    ``self.proj.weight``), calls excluded (``self.proj(x)``, ``self.proj.forward(x)``)."""
    return set(_source_attributes(_class(ancestor), rel))


def _class(module: nn.Module) -> type:
    """``type(module)`` as a plain ``type``, the key of the caches below (mypy takes a ``type[X]`` for
    unhashable: it checks X's ``__hash__`` unbound)."""
    return type(module)


@functools.cache
def _source_attributes(cls: type, rel: str) -> frozenset[str]:
    return frozenset(re.findall(rf"self\.{re.escape(rel)}\.([A-Za-z_]\w*)\b(?!\s*\()", _forward_source(cls)))


def reads_directly(ancestor: nn.Module, rel: str) -> bool:
    """Whether ``ancestor``'s code reads the tensors of its submodule ``rel`` itself (e.g.
    ``F.linear(x, self.qkv.weight)``) instead of (only) calling that submodule. Looking at a tensor's
    metadata (``self.wo.weight.dtype``, ``isinstance(self.wo.weight, ...)``) or at other attributes
    (``self.conv1.stride``) is not reading it."""
    child = ancestor.get_submodule(rel)
    names = tuple(sorted({*child._parameters, *child._buffers}))
    return bool(names) and _source_reads(_class(ancestor), rel, names)


def calls_forward(ancestor: nn.Module, rel: str) -> bool:
    """Whether ``ancestor``'s code calls its submodule ``rel`` (so its hooks run)."""
    return _source_calls(_class(ancestor), rel)


_METADATA = r"dtype|shape|device|size|dim|ndim|numel|nelement|element_size|requires_grad|data_ptr|is_\w+|layout|names"


# Per (class, child path): a model repeats a few block classes many times, and loading an adapter
# asks the same questions for every block.
@functools.cache
def _source_reads(cls: type, rel: str, names: tuple[str, ...]) -> bool:
    tensor = "|".join(re.escape(n) for n in names)
    pattern = (rf"(?<!isinstance\()self\.{re.escape(rel)}\.(?:{tensor})\b"  # one of the child's own tensors ...
               rf"(?!\s*\(|\s*\.\s*(?:{_METADATA})\b)")  # ... used as a tensor, not called nor only inspected
    return re.search(pattern, _forward_source(cls)) is not None


@functools.cache
def _source_calls(cls: type, rel: str) -> bool:
    return re.search(rf"self\.{re.escape(rel)}\s*\(", _forward_source(cls)) is not None


def host_of(model: nn.Module, path: str) -> tuple[str, str]:
    """Where the tensors of the module at ``path`` are read: ``(host_path, prefix)``.

    Usually the module itself: ``(path, "")``. Some modules read a child's weights directly and never
    call its forward: ``nn.MultiheadAttention`` uses ``self.out_proj.weight``, torchvision's Swin
    passes ``self.qkv.weight`` to a function. Then the host is the outermost such ancestor and the
    prefix the child's path below it (``"out_proj."``); a weight-space adapter is substituted there.
    """
    parts = path.split(".")
    host, prefix = path, ""
    for depth in range(len(parts) - 1, -1, -1):
        anc_path = ".".join(parts[:depth])
        ancestor = model.get_submodule(anc_path) if anc_path else model
        rel = ".".join(parts[depth:])
        if reads_directly(ancestor, rel):
            host, prefix = anc_path, rel + "."
    return host, prefix
