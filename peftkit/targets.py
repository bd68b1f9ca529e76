"""Choosing modules: target selection, the output layer, and where a target's tensors are read.

A *selector* is one of:
  * a string: a module path (``"encoder.layer.0.attention.self.query"``), a dotted suffix
    (``"query"``, ``"self.query"``), or a regular expression matched against the full path
    (``r"encoder\\.layer\\.[0-5]\\.attention\\.self\\.(query|value)"``);
  * a module type (``nn.Linear``), matching instances;
  * a callable ``(path, module) -> bool``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from .errors import TargetError

Selector = str | type | Callable[[str, nn.Module], bool]
Selection = Selector | Sequence[Selector] | None

__all__ = ["Selection", "Selector", "find_blocks", "find_output_layer", "host_of", "is_under", "matches",
           "select_modules", "tied_aliases"]


def _as_list(selection: Selection) -> list[Selector]:
    if selection is None:
        return []
    if isinstance(selection, (str, type)) or callable(selection):
        return [selection]  # type: ignore[list-item]
    return list(selection)


def matches(selector: Selector, path: str, module: nn.Module | None = None) -> bool:
    """Whether one selector (name, dotted suffix, full-match regex, type or callable) picks ``path``."""
    return (isinstance(selector, str) and _by_name(selector, path)) or _by_pattern(selector, path, module)  # type: ignore[arg-type]


def _by_name(selector: str, path: str) -> bool:
    return path == selector or path.endswith("." + selector)


def _by_pattern(selector: Selector, path: str, module: nn.Module) -> bool:
    if isinstance(selector, str):
        try:
            return re.fullmatch(selector, path) is not None
        except re.error:
            return False
    if isinstance(selector, type):
        return isinstance(module, selector)
    if callable(selector):
        return bool(selector(path, module))
    raise TargetError(
        f"bad target selector {selector!r} ({type(selector).__name__}); expected a module name, "
        "a dotted suffix, a regex string, a module type, or a callable (path, module) -> bool"
    )


def is_under(path: str, prefixes: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``prefixes`` or inside one of them."""
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def nearest_names(model: nn.Module, wanted: str, n: int = 5) -> list[str]:
    """Module paths (and leaf names) of ``model`` closest to ``wanted``, for error messages."""
    paths = [p for p, _ in model.named_modules() if p]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    close = difflib.get_close_matches(wanted, leaves, n, 0.5) + difflib.get_close_matches(wanted, paths, n, 0.5)
    return list(dict.fromkeys(close))[:n] or paths[:n]


def select_modules(
    model: nn.Module,
    targets: Selection,
    exclude: Selection = None,
    *,
    can_adapt: Callable[[nn.Module], bool] = lambda m: True,
    what: str = "targets",
) -> list[str]:
    """Paths of the modules that ``targets`` selects, minus ``exclude`` and everything under it.

    A module selected by its name or suffix must be adaptable (else an error); modules that only a
    pattern (regex, type, callable) selects are kept when ``can_adapt`` accepts them.

    Raises:
        TargetError: the selection matches nothing (the message lists the nearest names), or names
            a module that cannot be adapted.
    """
    selectors = _as_list(targets)
    excluded_sel = _as_list(exclude)
    modules = list(model.named_modules())  # the root ("") too: wrap(nn.MultiheadAttention(...)) is fine
    excluded = [p for p, m in modules if any(
        (isinstance(s, str) and _by_name(s, p)) or _by_pattern(s, p, m) for s in excluded_sel)]
    chosen: list[str] = []
    refused: list[str] = []
    for path, module in modules:
        if is_under(path, excluded):
            continue
        named = any(isinstance(s, str) and _by_name(s, path) for s in selectors)
        if named:
            (chosen if can_adapt(module) else refused).append(path)
        elif any(_by_pattern(s, path, module) for s in selectors) and can_adapt(module):
            chosen.append(path)
    if refused:
        kinds = ", ".join(f"{p} ({type(model.get_submodule(p)).__name__})" for p in refused[:5])
        raise TargetError(
            f"{what} {selectors!r} name modules this method cannot adapt: {kinds}. "
            "Select the layers inside them instead (by suffix, regex or type)."
        )
    if not chosen:
        wanted = next((s for s in selectors if isinstance(s, str)), "")
        hint = f" Nearest module names: {', '.join(nearest_names(model, wanted))}." if wanted else ""
        raise TargetError(f"{what} {selectors!r} (exclude={excluded_sel!r}) match no module of {type(model).__name__}.{hint}")
    return chosen


def _leaf_with_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def find_output_layer(model: nn.Module, example_input: Any = None) -> str | None:
    """The path of the model's output layer: the last parametrised module producing its output.

    With ``example_input`` (a tensor, or a tuple of positional inputs) one forward pass is traced
    with hooks: the last parametrised module whose output is (part of) the model's output wins,
    else the last one that ran. Without it, the last parametrised leaf in registration order.
    """
    candidates = [(p, m) for p, m in model.named_modules() if p and _leaf_with_params(m)]
    if not candidates:
        return None
    if example_input is None:
        return candidates[-1][0]
    import torch

    ran: list[tuple[str, Any]] = []  # keep outputs alive: a freed tensor's id() can be reused
    handles = [m.register_forward_hook(lambda mod, a, out, _p=p: ran.append((_p, out)))
               for p, m in candidates]
    try:
        with torch.no_grad():
            inputs = example_input if isinstance(example_input, tuple) else (example_input,)
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    produced = {id(t) for t in _flatten(out)}
    for path, value in reversed(ran):
        if id(value) in produced:
            return path
    return ran[-1][0] if ran else candidates[-1][0]


def find_blocks(model: nn.Module) -> list[str]:
    """The blocks of the backbone's main stage, input side first: the parametrised children of the
    module that has the most of them among those holding at least a quarter of the parameters
    (ResNet: ``conv1 … layer4, fc``; ViT: ``encoder.layers.*``; BERT: ``encoder.layer.*``)."""
    total = sum(p.numel() for p in model.parameters()) or 1
    best: tuple[str, list[str]] = ("", [])
    for path, module in model.named_modules():
        kids = [n for n, c in module.named_children() if any(True for _ in c.parameters())]
        covered = sum(p.numel() for n in kids for p in module.get_submodule(n).parameters())
        if len(kids) > len(best[1]) and covered >= total / 4:
            best = (path, kids)
    prefix = f"{best[0]}." if best[0] else ""
    return [prefix + n for n in best[1]]


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


@functools.cache
def _forward_source(cls: type) -> str:
    """Source of the class and its bases up to nn.Module: forward may delegate to helper methods
    (nn.TransformerEncoderLayer's ``_sa_block``)."""
    parts = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        try:
            parts.append(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
    return "\n".join(parts)


def reads_directly(ancestor: nn.Module, rel: str) -> bool:
    """Whether ``ancestor``'s code reads the tensors of its submodule ``rel`` itself (e.g.
    ``F.linear(x, self.qkv.weight)``) instead of (only) calling that submodule."""
    return _source_reads(type(ancestor), rel)


def calls_forward(ancestor: nn.Module, rel: str) -> bool:
    """Whether ``ancestor``'s code calls its submodule ``rel`` (so its hooks run)."""
    return _source_calls(type(ancestor), rel)


# Per (class, child path): a model repeats a few block classes many times, and loading an adapter
# asks the same questions for every block.
@functools.cache
def _source_reads(cls: type, rel: str) -> bool:
    return re.search(rf"self\.{re.escape(rel)}\.[A-Za-z_]\w*(?!\w|\s*\()", _forward_source(cls)) is not None


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
