"""Fisher information of parameters, from per-sample gradients, and the top-k masks FISH trains.

``F_i ~ E[(d loss / d theta_i)^2]`` over samples (Sung et al. 2021, "Training Neural Networks with
Fixed Sparse Masks"). Per-sample gradients come from ``torch.func`` (``vmap(grad(...))`` around
``functional_call``, in chunks sized to a memory budget) or from one backward per sample, whichever
measures faster on the first samples; the loop also serves models vmap cannot take. The model runs
in eval mode, so BatchNorm statistics and dropout cannot make a sample's gradient depend on its batch.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import sharding as dist
from .errors import ConfigError
from .quantized import is_quantized

__all__ = ["candidate_names", "default_loss", "fisher_information", "fisher_mask", "select_top"]

LossFn = Callable[[Any, Any], torch.Tensor]
_T = TypeVar("_T")


def _map(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def _restorer(store: dict[str, _T]) -> Callable[[], None]:
    """What puts back the values ``store`` (a module's ``_parameters`` or ``_buffers``) holds now."""
    kept = list(store.items())

    def restore() -> None:
        for k, t in kept:
            if store.get(k) is not t:
                store[k] = t

    return restore


def _rows(start: int | None, stop: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``t[start:stop]`` for each tensor ``t`` (with :func:`_map`)."""
    return lambda t: t[start:stop]


def _size(batch: Any) -> int:
    found: list[int] = []
    _map(batch, lambda t: found.append(t.shape[0]))
    if not found:
        raise ConfigError("a batch holds no tensor; data must yield tensors, (x, y) tuples or dicts of tensors")
    return found[0]


def _logits(out: Any) -> torch.Tensor:
    logits: torch.Tensor = out.logits if hasattr(out, "logits") else out
    return logits


def _call(model: Any, x: Any) -> Any:
    """``model(x)``; ``model(*x)`` for a tuple or list of inputs, ``model(**x)`` for a dict of them."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (list, tuple)):
        return model(*x)
    return model(x)


def default_loss(model: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy for ``(x, y)`` batches (``model(x)`` gives logits; ``x`` may be a tuple of the
    model's inputs, or a dict of keyword inputs); for dict batches (Hugging Face style), the ``loss``
    the model returns given ``labels``."""
    if isinstance(batch, Mapping):
        out = model(**batch)
        if getattr(out, "loss", None) is None:
            raise ConfigError("the model returned no .loss for a dict batch; include 'labels' or pass loss_fn")
        loss: torch.Tensor = out.loss
        return loss
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ConfigError("the default loss takes (x, y) batches; pass loss_fn(model, batch) -> loss for others")
    return F.cross_entropy(_logits(_call(model, batch[0])), batch[1])


def _with_sampled_labels(model: nn.Module, batch: Any, gen: torch.Generator) -> Any:
    """The expected Fisher: labels drawn from the model's own predictive distribution."""
    with torch.no_grad():
        if isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            probs = F.softmax(_logits(model(**inputs)).float(), dim=-1)
            return {**inputs, "labels": torch.multinomial(probs, 1, generator=gen).squeeze(1)}
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = F.softmax(_logits(_call(model, x)).float(), dim=-1)
        return (x, torch.multinomial(probs, 1, generator=gen).squeeze(1))


class _Functional:
    """Calls the model with given tensors (for torch.func); other attributes fall through."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self._model, self._tensors = model, tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self._model, self._tensors, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _vmap_grads(model: nn.Module, loss_fn: LossFn, params: dict[str, torch.Tensor],
                consts: dict[str, torch.Tensor], chunk: Any) -> dict[str, torch.Tensor]:
    def loss_one(p: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        one = _map(sample, lambda t: t.unsqueeze(0))
        return loss_fn(_Functional(model, {**consts, **p}), one)

    grads: dict[str, torch.Tensor] = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0))(params, chunk)
    return grads


def _loop_grads(model: nn.Module, loss_fn: LossFn, params: dict[str, torch.Tensor], chunk: Any,
                totals: dict[str, torch.Tensor]) -> None:
    for i in range(_size(chunk)):
        one = _map(chunk, _rows(i, i + 1))
        grads = torch.autograd.grad(loss_fn(model, one), list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                totals[n] += g.detach().float().pow(2)


# fisher_information(vectorize=...) -> how per-sample gradients are computed
_WAYS: dict[bool | str, str] = {True: "vmap", False: "loop", "vmap": "vmap", "loop": "loop", "auto": "auto"}

_PROBE = 4  # samples timed per way by vectorize="auto", after one warm-up sample each


def _pick_faster(part: Any, vmap_part: Callable[[Any], None], loop_part: Callable[[Any], None],
                 bar: tqdm) -> tuple[str, Any]:
    """Time vmap and the loop on the first samples of ``part`` (every sample still counts once).

    Returns the faster way and what is left of ``part`` (``None`` when the probe used all of it;
    the next part then also goes the chosen way). One warm-up sample per way first: the first call
    of either pays one-off costs (tracing, kernel selection) that would decide the race otherwise.
    """
    n = _size(part)
    if n < 2 * (_PROBE + 1):  # too few samples to measure: vmap, which falls back to the loop
        return "vmap", part
    pieces = [_map(part, _rows(a, b)) for a, b in
              ((0, 1), (1, 1 + _PROBE), (1 + _PROBE, 2 + _PROBE), (2 + _PROBE, 2 + 2 * _PROBE))]
    seconds = {}
    for way, run, (warm, timed) in (("vmap", vmap_part, pieces[:2]), ("loop", loop_part, pieces[2:])):
        for piece in (warm, timed):
            start = time.perf_counter()
            try:
                run(piece)
            except Exception:  # vmap cannot take this model (it adds nothing then): the loop does it
                loop_part(piece)
                start = -math.inf
            seconds[way] = time.perf_counter() - start  # the timed piece's, as it runs second
        bar.update(1 + _PROBE)
    rest = 2 * (_PROBE + 1)
    how = "vmap" if seconds["vmap"] < seconds["loop"] else "loop"
    return how, (_map(part, lambda t: t[rest:]) if n > rest else None)


def _computed_weights(model: nn.Module) -> set[str]:
    """Parameters a layer's weight is computed from on each call (a parametrization's originals, the
    old weight_norm's ``weight_g``/``weight_v``): the layers that read them are never called as modules,
    or read them before any adapter could, so a delta on them would never apply."""
    out = set()
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if type(m).__name__ == "ParametrizationList":
            out |= {prefix + n for n, _ in m.named_parameters()}
        for hook in m._forward_pre_hooks.values():
            if type(hook).__name__ == "WeightNorm":
                out |= {prefix + hook.name + "_g", prefix + hook.name + "_v"}
    return out


def candidate_names(model: nn.Module, candidates: Sequence[str] | Callable[[str, torch.Tensor], bool] | None) -> list[str]:
    """Floating-point parameter names selected by ``candidates`` (names, suffixes, full-match regexes,
    or a callable ``(name, tensor) -> bool``); all of them when ``candidates`` is None."""
    computed = _computed_weights(model)
    names = [n for n, p in model.named_parameters() if p.is_floating_point() and n not in computed]
    if candidates is None:
        return names
    if callable(candidates):
        chosen = [n for n in names if candidates(n, model.get_parameter(n))]
    else:
        def hit(sel: str, n: str) -> bool:
            try:
                return n == sel or n.endswith("." + sel) or re.fullmatch(sel, n) is not None
            except re.error:
                return n == sel or n.endswith("." + sel)

        chosen = [n for n in names if any(hit(s, n) for s in candidates)]
    if not chosen:
        raise ConfigError(f"candidates={candidates!r} match no floating-point parameter; e.g. {names[:3]}")
    return chosen


def fisher_information(model: nn.Module, data: Iterable[Any], loss_fn: LossFn | None = None, *, samples: int = 256,
                       fisher: str = "empirical", names: Sequence[str] | None = None, vectorize: bool | str = "auto",
                       memory: int = 1 << 30, seed: int = 0, progress: bool = True,
                       distributed: bool = True) -> dict[str, torch.Tensor]:
    """The diagonal Fisher information of ``model``'s parameters, averaged over ``samples`` samples.

    Args:
        model: The network (left in its original mode afterwards; computed in eval mode).
        data: Any iterable of batches: ``(x, y)`` tuples, dicts of tensors, or tensors.
        loss_fn: ``loss_fn(model, batch) -> loss`` (mean over the batch); default :func:`default_loss`.
        samples: How many samples to use (fewer if ``data`` runs out).
        fisher: ``"empirical"`` (true labels) or ``"expected"`` (labels drawn from the model's own
            predictive distribution; needs a classifier whose output, or ``.logits``, are logits).
        names: Parameter names to compute it for (default: every floating-point parameter).
        vectorize: Per-sample gradients with ``torch.func.vmap`` (``True``), one backward per sample
            (``False``), or ``"auto"``: time both on the first samples and use the faster. Neither
            wins everywhere: on CPU the loop is 2x faster on resnet18 and on an MLP, vmap 2-2.6x
            faster on a small ViT and on MobileNetV3 (benchmarks/). Models vmap cannot take (such
            as transformers' BERT) use the loop, with a warning when ``True`` was asked for.
        memory: Bytes of per-sample gradients held at once (sets the chunk size).
        seed: Seed of the label sampling for the expected Fisher.
        progress: Show a tqdm progress bar on stderr when it is a terminal (on rank 0 only, when
            distributed).
        distributed: Under ``torch.distributed``, sum the statistics over the ranks of the default
            process group (each rank passes its own part of the data and uses up to ``samples`` of
            it), so every rank gets the same Fisher information and selects the same mask.

    Returns:
        ``{name: tensor shaped like the parameter}`` (float32).
    """
    if fisher not in ("empirical", "expected"):
        raise ConfigError(f"fisher={fisher!r} is invalid; expected 'empirical' (true labels) or 'expected' (sampled)")
    if not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples={samples!r} is invalid; expected a positive count such as 256")
    loss_fn = loss_fn or default_loss
    wanted = list(names) if names is not None else candidate_names(model, None)
    all_params = dict(model.named_parameters())
    params = {n: all_params[n].detach() for n in wanted}
    # a quantized tensor stays the module's own: detached, a bitsandbytes weight would lose its quantization state
    consts = {**{n: p.detach() for n, p in all_params.items() if n not in params and not is_quantized(p)},
              **dict(model.named_buffers())}
    per_sample = 4 * sum(p.numel() for p in params.values())
    chunk = max(1, min(64, memory // max(per_sample, 1)))
    totals = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    flags = {n: all_params[n].requires_grad for n in params}
    modes = [(m, m.training) for m in model.modules()]  # each module's own mode (some may be in eval already)
    # tqdm hides the bar where stderr is not a terminal (logs, CI); progress=False hides it everywhere
    bar = tqdm(total=samples, desc="Fisher information", unit="samples", disable=None if progress and dist.rank() == 0 else True)
    seen = 0

    def vmap_part(part: Any) -> None:
        grads = _vmap_grads(model, loss_fn, params, consts, part)
        for n, g in grads.items():
            totals[n] += g.detach().float().pow(2).sum(0)

    def loop_part(part: Any) -> None:
        for n in params:
            all_params[n].requires_grad_(True)
        _loop_grads(model, loss_fn, {n: all_params[n] for n in params}, part, totals)

    def accumulate(part: Any, how: str) -> str:
        """Add one part's squared per-sample gradients; returns how to do the next part."""
        if how == "auto":
            how, part = _pick_faster(part, vmap_part, loop_part, bar)
            if part is None:
                return how
        if how == "vmap":
            try:
                vmap_part(part)
                bar.update(_size(part))
                return how
            except Exception as exc:  # vmap cannot take every model; say which, once, if vmap was asked for
                if vectorize is True:
                    warnings.warn(f"per-sample gradients could not be vectorised for {type(model).__name__} "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); using a per-sample "
                                  "loop instead", RuntimeWarning, stacklevel=3)
        loop_part(part)
        bar.update(_size(part))
        return "loop"

    how = _WAYS.get(vectorize)
    if how is None:
        raise ConfigError(f"vectorize={vectorize!r} is invalid; expected 'auto', True (torch.func.vmap) or False "
                          "(a per-sample loop)")
    if how != "loop" and len(list(model.named_modules(remove_duplicate=False))) != len(list(model.named_modules())):
        # a module reachable under two names: torch.func.functional_call leaves a wrapper in its place
        # (torch 2.14), so the loop does it
        how = "loop"
    held = [restore for m in model.modules() for restore in (_restorer(m._parameters), _restorer(m._buffers))]
    model.eval()
    try:
        for batch in data:
            take = min(_size(batch), samples - seen)
            batch = _map(batch, _rows(None, take))
            if fisher == "expected":
                batch = _with_sampled_labels(model, batch, gen)
            for start in range(0, take, chunk):
                part = _map(batch, _rows(start, start + chunk))
                how = accumulate(part, how)
            seen += take
            if seen >= samples:
                break
    finally:
        for restore in held:  # the model's own tensors, whatever torch.func did
            restore()
        for m, mode in modes:  # parents first: each call resets the children, which come next
            m.train(mode)
        for n, flag in flags.items():
            all_params[n].requires_grad_(flag)
        bar.close()
    if distributed and dist.world_size() > 1:
        count = torch.tensor([float(seen)], dtype=torch.float64, device=next(iter(totals.values())).device)
        dist.all_reduce_sum([count, *totals.values()])
        seen = int(count.item())
    if seen == 0:
        raise ConfigError("data yielded no samples for the Fisher information")
    return {n: t / seen for n, t in totals.items()}


def select_top(scores: Mapping[str, torch.Tensor], k: int, scope: str = "global") -> dict[str, torch.Tensor]:
    """Exactly ``k`` entries with the largest scores: one top-k over every tensor (``"global"``), or
    per-tensor quotas proportional to size (``"tensor"``). Returns sorted flat indices per tensor."""
    if scope not in ("global", "tensor"):
        raise ConfigError(f"scope={scope!r} is invalid; expected 'global' or 'tensor' (a quota per tensor)")
    sizes = {n: s.numel() for n, s in scores.items()}
    total = sum(sizes.values())
    if not 1 <= k <= total:
        raise ConfigError(f"cannot keep {k} of {total} entries; choose keep so that 1 <= keep * {total} <= {total}")
    if scope == "global":
        flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
        top = torch.topk(flat, k, sorted=False).indices.sort().values
        out, offset = {}, 0
        for n, size in sizes.items():
            lo, hi = torch.searchsorted(top, torch.tensor([offset, offset + size]))
            if hi > lo:
                out[n] = top[lo:hi] - offset
            offset += size
        return out
    shares = {n: k * size / total for n, size in sizes.items()}
    quota = {n: int(v) for n, v in shares.items()}
    for n in sorted(shares, key=lambda n: shares[n] - quota[n], reverse=True)[: k - sum(quota.values())]:
        quota[n] += 1  # largest remainders, so the quotas add up to exactly k
    return {n: torch.topk(scores[n].reshape(-1).float(), q, sorted=False).indices.sort().values
            for n, q in quota.items() if q}


def fisher_mask(model: nn.Module, data: Iterable[Any], loss_fn: LossFn | None = None, *, keep: float = 0.005,
                samples: int = 256, fisher: str = "empirical", scope: str = "global",
                candidates: Sequence[str] | Callable[[str, torch.Tensor], bool] | None = None,
                trained_parameters: int = 0, **options: Any) -> dict[str, torch.Tensor]:
    """The FISH mask: the ``keep`` fraction of parameters with the largest Fisher information.

    Args:
        model: The backbone.
        data: Any iterable of batches (see :func:`fisher_information`).
        loss_fn: ``loss_fn(model, batch) -> loss``; default: cross-entropy on ``(x, y)`` batches.
        keep: Fraction of the candidate parameters to select (the budget), e.g. 0.005.
        samples: Samples to estimate the Fisher from.
        fisher: ``"empirical"`` or ``"expected"``.
        scope: ``"global"`` (one top-k over all candidates) or ``"tensor"`` (a quota per tensor).
        candidates: Parameter names, suffixes or regexes (or a callable ``(name, tensor) -> bool``)
            that may be selected; default: every floating-point parameter.
        trained_parameters: Parameters trained fully anyway (a new head): the budget is
            ``keep * (candidates + trained_parameters)``, of which these come first.
        **options: Passed to :func:`fisher_information` (``vectorize``, ``memory``, ``progress``, ``seed``).

    Returns:
        ``{parameter name: sorted flat indices}``, exactly ``round(keep * (n + trained_parameters))
        - trained_parameters`` entries in all, ``n`` being the number of candidate parameters.
    """
    if not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"keep={keep!r} is invalid; expected a fraction in (0, 1], e.g. 0.005")
    names = candidate_names(model, candidates)
    total = sum(model.get_parameter(n).numel() for n in names) + trained_parameters
    k = round(keep * total) - trained_parameters
    if k < 1:
        raise ConfigError(f"keep={keep} of {total:,} parameters is {round(keep * total):,}, no more than the "
                          f"{trained_parameters:,} trained fully by head/train modules; raise keep")
    scores = fisher_information(model, data, loss_fn, samples=samples, fisher=fisher, names=names, **options)
    return select_top(scores, k, scope)
