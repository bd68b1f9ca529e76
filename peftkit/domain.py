"""Domain adaptation without target labels: gradient reversal (DANN), CORAL, MMD, and Daumé's
feature augmentation for when the target has a few labels.

The adapters are what adapts: the losses act on the features entering the output layer
(:meth:`peftkit.AdaptedModel.forward_with_features`), the backbone stays frozen, and the adapter
file (a DANN discriminator head included) is what ships. :class:`DomainAdaptation` puts one
step of each method together for a training loop of your own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DivergenceWarning
from .model import AdaptedModel

__all__ = ["DomainAdaptation", "GradientReversal", "augment_features", "coral_loss", "dann_coefficient",
           "grad_reverse", "mmd_loss"]

DEFAULT_KERNELS = (0.125, 0.25, 0.5, 1.0, 2.0)  # bandwidths, as multiples of the mean squared distance
# Features this many times their first step's scale (root mean square) have diverged. In the domain
# bench (seed 0, LoRA and last_layer) runs that trained stayed within 12x: DANN on the stars and on
# MNIST -> digits at weights 0.1-1, CORAL and MMD on all three shifts (within 1.9x). LoRA + DANN on
# MNIST -> digits at weight 1 passed 1e6x within 100 steps and never came back.
DIVERGED_SCALE = 100.0


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity on the way forward; on the way back, the gradient times ``-coeff`` (Ganin &
    Lempitsky 2015). Put between features and a domain discriminator: the discriminator learns to
    tell the domains apart while the features learn to make it fail."""
    if not isinstance(coeff, (int, float)) or isinstance(coeff, bool) or not math.isfinite(coeff) or coeff < 0:
        raise ConfigError(f"grad_reverse coeff={coeff!r} is invalid; expected a finite number >= 0, e.g. 1.0")
    out: torch.Tensor = _ReverseGradient.apply(x, float(coeff))
    return out


def dann_coefficient(progress: float, gamma: float = 10.0, max_coeff: float = 1.0) -> float:
    """Ganin & Lempitsky's warm-up of the reversal: ``max_coeff * (2 / (1 + exp(-gamma * p)) - 1)``
    for training progress ``p`` in [0, 1]: 0 at the start (the discriminator's early, noisy
    gradients do not reach the features), near ``max_coeff`` from about a third of the way."""
    p = min(max(float(progress), 0.0), 1.0)
    return max_coeff * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


class GradientReversal(nn.Module):
    """:func:`grad_reverse` as a layer, with the warm-up schedule of :func:`dann_coefficient`.

    Args:
        coeff: The largest coefficient (``max_coeff``).
        warmup_steps: Steps over which the coefficient rises from 0 (``None``: ``coeff`` from the start).
            Call :meth:`step` once per training step.
        gamma: How fast it rises.
    """

    def __init__(self, coeff: float = 1.0, *, warmup_steps: int | None = None, gamma: float = 10.0) -> None:
        super().__init__()
        grad_reverse(torch.zeros(()), coeff)  # validates coeff
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma <= 0:
            raise ConfigError(f"gamma={gamma!r} is invalid; expected a finite number > 0 (how fast the warm-up rises), "
                              "e.g. 10.0")
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool)
                                         or warmup_steps < 1):
            raise ConfigError(f"warmup_steps={warmup_steps!r} is invalid; expected a step count >= 1, or None")
        self.max_coeff, self.warmup_steps, self.gamma, self.steps = float(coeff), warmup_steps, float(gamma), 0

    @property
    def coeff(self) -> float:
        """The coefficient now."""
        if self.warmup_steps is None:
            return self.max_coeff
        return dann_coefficient(self.steps / self.warmup_steps, self.gamma, self.max_coeff)

    def step(self) -> None:
        """Advance the warm-up by one training step."""
        self.steps += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` unchanged; its gradient times ``-coeff`` (the coefficient now)."""
        return grad_reverse(x, self.coeff)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff:.4g}, max_coeff={self.max_coeff}, warmup_steps={self.warmup_steps}"


def _pair(fs: torch.Tensor, ft: torch.Tensor, what: str) -> None:
    if not (isinstance(fs, torch.Tensor) and isinstance(ft, torch.Tensor)):
        raise ConfigError(f"{what} takes two tensors of features, got {type(fs).__name__} and {type(ft).__name__}")
    if fs.dim() != 2 or ft.dim() != 2 or fs.shape[1] != ft.shape[1]:
        raise ConfigError(f"{what} takes (batch, features) tensors of the same width, got {tuple(fs.shape)} and "
                          f"{tuple(ft.shape)}; pool or flatten convolutional features first")
    if len(fs) < 2 or len(ft) < 2:
        raise ConfigError(f"{what} needs at least 2 rows per domain, got {len(fs)} and {len(ft)}")


def coral_loss(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko 2016): ``||C_s - C_t||_F^2 / (4 d^2)``, the distance between the
    covariances of source and target features (``d`` features, unbiased covariances).

    Args:
        fs: Source features, ``(n_s, d)``.
        ft: Target features, ``(n_t, d)``.
    """
    _pair(fs, ft, "coral_loss")
    d = fs.shape[1]

    def cov(f: torch.Tensor) -> torch.Tensor:
        centred = f - f.mean(0, keepdim=True)
        return centred.T @ centred / (len(f) - 1)

    return (cov(fs.float()) - cov(ft.float())).pow(2).sum() / (4 * d * d)


def _kernel_multipliers(kernels: Sequence[float]) -> list[float]:
    if (isinstance(kernels, (str, bytes)) or not isinstance(kernels, Sequence) or not kernels
            or not all(isinstance(k, (int, float)) and not isinstance(k, bool) and math.isfinite(k) and k > 0
                       for k in kernels)):
        raise ConfigError(f"kernels={kernels!r} is invalid; expected positive bandwidth multipliers, e.g. "
                          f"{DEFAULT_KERNELS}")
    return [float(k) for k in kernels]


def mmd_loss(fs: torch.Tensor, ft: torch.Tensor, kernels: Sequence[float] = DEFAULT_KERNELS, *,
             linear: bool = False) -> torch.Tensor:
    """Multi-kernel maximum mean discrepancy (MMD², Gretton et al. 2012; the DAN loss of Long et al.
    2015) between source and target features, with a sum of Gaussian kernels.

    Each kernel is ``exp(-||x - y||^2 / (2 k m))`` for a multiplier ``k`` in ``kernels`` and ``m``
    the mean squared distance between the pairs compared (taken without gradient: the bandwidth
    follows the features, it is not trained).

    Args:
        fs: Source features, ``(n_s, d)``.
        ft: Target features, ``(n_t, d)``.
        kernels: The bandwidth multipliers.
        linear: The linear-time estimator (Gretton et al. 2012, §6): ``n/2`` disjoint pairs of rows,
            ``k(s, s') + k(t, t') - k(s, t') - k(s', t)`` averaged; unbiased but noisier. Needs
            ``n_s == n_t``; an odd last row is left out. Default: the quadratic (biased, V-statistic)
            estimator ``mean K_ss + mean K_tt - 2 mean K_st``, zero for identical samples.
    """
    _pair(fs, ft, "mmd_loss")
    multipliers = _kernel_multipliers(kernels)
    fs, ft = fs.float(), ft.float()
    def gaussians(sq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.exp(-sq / (2 * m * scale)) for m in multipliers]).sum(0)

    if linear:
        if len(fs) != len(ft):
            raise ConfigError(f"mmd_loss(linear=True) pairs rows, so it needs as many source rows as target rows, "
                              f"got {len(fs)} and {len(ft)}")
        half = len(fs) // 2
        s1, s2, t1, t2 = fs[0:2 * half:2], fs[1:2 * half:2], ft[0:2 * half:2], ft[1:2 * half:2]
        sq = torch.stack([(a - b).pow(2).sum(1) for a, b in ((s1, s2), (t1, t2), (s1, t2), (s2, t1))])
        k = gaussians(sq, sq.mean().detach().clamp_min(1e-12))
        return (k[0] + k[1] - k[2] - k[3]).mean()
    both = torch.cat([fs, ft])
    sq = torch.cdist(both, both).pow(2)
    n, ns = len(both), len(fs)
    k = gaussians(sq, (sq.sum() / (n * n - n)).detach().clamp_min(1e-12))
    return k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean()


def augment_features(features: torch.Tensor, target: bool | torch.Tensor) -> torch.Tensor:
    """Daumé's "frustratingly easy" feature augmentation (2007): ``[f, f, 0]`` for source rows and
    ``[f, 0, f]`` for target rows, so that a classifier on the result learns a shared part and one
    part per domain. For a target with some labels: train a head of ``3 d`` inputs on both domains'
    augmented features, then predict target rows as target.

    Args:
        features: ``(batch, d)``.
        target: Whether the rows are target rows: one bool for all, or a ``(batch,)`` bool tensor.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ConfigError(f"augment_features takes (batch, features), got {getattr(features, 'shape', type(features))}")
    is_target = torch.as_tensor(target, device=features.device).bool()
    if is_target.dim() == 0:
        is_target = is_target.expand(len(features))
    if is_target.shape != (len(features),):
        raise ConfigError(f"augment_features: target has shape {tuple(is_target.shape)}, expected one flag or "
                          f"({len(features)},)")
    t = is_target[:, None].to(features.dtype)
    return torch.cat([features, features * (1 - t), features * t], dim=1)


def _cat(a: Any, b: Any) -> Any:
    """Source and target inputs as one batch (tensors, tuples/lists or dicts of tensors)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping) and isinstance(b, Mapping) and set(a) == set(b):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(_cat(x, y) for x, y in zip(a, b, strict=True))
    raise ConfigError("source and target inputs must have the same structure (tensors, tuples or dicts of tensors); "
                      f"got {type(a).__name__} and {type(b).__name__}")


def _rows(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return len(x)
    if isinstance(x, Mapping):
        return _rows(next(iter(x.values())))
    return _rows(x[0])


class DomainAdaptation:
    """One unsupervised adaptation step at a time, for your own training loop::

        m = peftkit.wrap(model, "lora", r=8, heads={"label": 10, "domain": [256, 1]})  # heads for DANN
        da = peftkit.DomainAdaptation(m, "dann", total_steps=1000)
        for (xs, ys), xt in zip(source_batches, target_batches):
            loss, logs = da.loss(xs, ys, xt)   # one forward over both batches
            opt.zero_grad(); loss.backward(); opt.step()

    ``loss`` is the task loss on the labelled source rows plus ``weight`` times the adaptation loss
    between source and target features (the features entering the output layer, or ``layer``'s
    output): ``"coral"`` (:func:`coral_loss`), ``"mmd"`` (:func:`mmd_loss`) or ``"dann"`` (a domain
    discriminator on reversed gradients; the discriminator is a head of the adapter, so it trains
    with it and saves with it). Each call is one step of the DANN warm-up.

    Args:
        model: A wrapped model. For ``"dann"``, wrapped with ``heads=`` holding the label head and
            the discriminator (``{"label": 10, "domain": [256, 1]}``: 1 output, or 2 for cross-entropy).
        method: ``"dann"``, ``"coral"`` or ``"mmd"``.
        weight: The adaptation loss's weight.
        label_head: With ``heads=``: the head whose output the task loss takes (default: the one
            head that is not ``domain_head``).
        domain_head: The discriminator's head name (``"dann"``; default ``"domain"``).
        total_steps: Steps of the DANN warm-up (the reversal coefficient rises from 0 to 1 over
            them, :func:`dann_coefficient`); ``None``: 1 from the start.
        layer: Take features from this module's output instead (see ``forward_with_features``).
        task_loss: ``task_loss(logits, labels)``; default cross-entropy.
        kernels, linear: :func:`mmd_loss`'s options.
        pool: A function turning the features into ``(batch, features)`` rows before CORAL or MMD
            (or before the discriminator), for layers whose output has more dimensions: e.g.
            ``lambda f: f.flatten(2).mean(2)`` for convolutional maps, ``lambda f: f.mean(1)`` for
            ``(batch, sequence, hidden)``. Without it, such features are refused (which dimension to
            average is the model's business). A discriminator head on a convolutional output layer
            takes the maps as they are and judges every position.
    """

    METHODS = ("dann", "coral", "mmd")

    def __init__(self, model: AdaptedModel, method: str = "dann", weight: float = 1.0, *,
                 label_head: str | None = None, domain_head: str = "domain", total_steps: int | None = None,
                 layer: str | None = None, task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 kernels: Sequence[float] = DEFAULT_KERNELS, linear: bool = False,
                 pool: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if not isinstance(model, AdaptedModel):
            raise ConfigError(f"DomainAdaptation takes a wrapped model (peftkit.wrap), got {type(model).__name__}")
        if method not in self.METHODS:
            raise ConfigError(f"method={method!r} is invalid; expected one of {', '.join(map(repr, self.METHODS))}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"weight={weight!r} is invalid; expected a finite number >= 0, e.g. 1.0")
        self.model, self.method, self.weight, self.layer = model, method, float(weight), layer
        self.task_loss = task_loss or F.cross_entropy
        self.kernels, self.linear = _kernel_multipliers(kernels), bool(linear)
        if pool is not None and not callable(pool):
            raise ConfigError(f"pool={pool!r} is invalid; expected a function of the features, e.g. lambda f: f.mean(1)")
        self.pool = pool
        self.reversal = GradientReversal(1.0, warmup_steps=total_steps)
        self._step = 0
        self._first_scale: float | None = None  # the features' RMS at the first step, what feature_scale divides by
        self._warned = False
        heads = model.get_adapter().modules.heads
        names = list(heads.heads) if heads is not None else []
        self.domain_head = domain_head if method == "dann" else None
        if method == "dann":
            if domain_head not in names:
                raise ConfigError(f"method='dann' needs a discriminator head {domain_head!r}: wrap with heads="
                                  f"{{'label': N, {domain_head!r}: [256, 1]}}" + (f" (the heads are {names})" if names else ""))
            assert heads is not None
            if heads.specs[domain_head][-1] not in (1, 2):
                raise ConfigError(f"the discriminator head {domain_head!r} has {heads.specs[domain_head][-1]} outputs; "
                                  "give it 1 (a logit) or 2 (two classes), e.g. [256, 1]")
        others = [n for n in names if n != domain_head]  # a discriminator head is never the task's
        if label_head is not None and label_head == self.domain_head:
            raise ConfigError(f"label_head={label_head!r} is the discriminator; name the task's head, one of {others}")
        if label_head is None:
            if len(others) > 1:
                raise ConfigError(f"the model has heads {others}; say which one the task loss takes with label_head=")
            label_head = others[0] if others else None
        elif label_head not in names:
            raise ConfigError(f"label_head={label_head!r} is not a head of this model; the heads are {names}")
        self.label_head = label_head

    def _logits(self, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):  # a transformers ModelOutput (a dict too)
            out = out.logits
        if self.label_head is not None:
            if not isinstance(out, Mapping) or self.label_head not in out:
                raise ConfigError(f"the model's output holds no head {self.label_head!r} (got {type(out).__name__}); "
                                  "pass label_head= one of the heads it returns")
            out = out[self.label_head]
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"the model's output ({type(out).__name__}) holds no logits tensor for the task loss "
                              "(a tensor, .logits, or a head's output); pass label_head=")
        return out

    def _discriminate(self, features: torch.Tensor, n_s: int) -> tuple[torch.Tensor, float]:
        """The discriminator's loss on reversed features (every position of per-position features
        counts as a row of its domain), and its accuracy."""
        assert self.domain_head is not None
        head = self.model.head(self.domain_head)
        first = next(m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)))
        conv = not isinstance(first, nn.Linear)
        if conv:  # (batch, channels, *spatial), as many dims as the convolution's weight
            width = features.shape[1] if features.dim() == first.weight.dim() else None
            want = first.in_channels
        else:
            width = features.shape[-1] if features.dim() >= 2 else None
            want = first.in_features
        if width != want:
            where = f"layer {self.layer!r}" if self.layer else "the output layer"
            raise ConfigError(f"the discriminator {self.domain_head!r} takes {want} features per "
                              f"{'position, as (batch, channels, ...)' if conv else 'row'}, and {where} gives features "
                              f"of shape {tuple(features.shape)}; use the default features (no layer=), a layer of that "
                              "width, or pool= to reshape them")
        scores = head(self.reversal(features))
        if conv:
            scores = scores.movedim(1, -1)
        scores = scores.reshape(len(features), -1, scores.shape[-1])  # (rows, positions, 1 or 2)
        domain = torch.zeros(scores.shape[:2], dtype=torch.long, device=scores.device)
        domain[n_s:] = 1
        if scores.shape[-1] == 1:
            loss = F.binary_cross_entropy_with_logits(scores.squeeze(-1), domain.to(scores.dtype))
            guess = (scores.squeeze(-1) > 0).long()
        else:
            loss = F.cross_entropy(scores.reshape(-1, 2), domain.reshape(-1))
            guess = scores.argmax(-1)
        return loss, float((guess == domain).float().mean())

    def loss(self, source: Any, labels: torch.Tensor, target: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one adaptation step, from a labelled source batch and an unlabelled target batch.

        Args:
            source: The source inputs (a tensor, or a tuple/dict of the model's inputs).
            labels: The source labels.
            target: The target inputs, structured like ``source`` (no labels).

        Returns:
            The total loss (call ``backward`` on it) and floats for logging: ``task``,
            ``adaptation``, ``feature_scale`` (the features' root mean square against the first
            step's: it passing 100, or a loss that is not finite, raises one
            :class:`~peftkit.errors.DivergenceWarning`), and for DANN ``coeff`` and ``domain_accuracy``.
        """
        n_s, n_t = _rows(source), _rows(target)
        if n_s < 1 or n_t < 1:
            raise ConfigError(f"an adaptation step needs rows of both domains, got {n_s} source and {n_t} target rows")
        if isinstance(labels, torch.Tensor) and labels.dim() > 0 and len(labels) != n_s:
            raise ConfigError(f"labels has {len(labels)} rows for {n_s} source rows; give one label per source row")
        try:
            both = _cat(source, target)
        except RuntimeError as exc:  # e.g. images of other sizes, texts padded to other lengths
            raise ConfigError("source and target rows must match in every dimension but the batch (pad texts to one "
                              f"length, resize images to one size): {str(exc).splitlines()[0]}") from None
        if isinstance(both, Mapping):
            out, features = self.model.forward_with_features(**both, layer=self.layer)
        elif isinstance(both, (list, tuple)):
            out, features = self.model.forward_with_features(*both, layer=self.layer)
        else:
            out, features = self.model.forward_with_features(both, layer=self.layer)
        task = self.task_loss(self._logits(out)[:n_s], labels)
        logs: dict[str, float] = {"task": float(task.detach())}
        if self.pool is not None:
            features = self.pool(features)
        if self.method == "dann":
            assert self.domain_head is not None
            logs["coeff"] = self.reversal.coeff
            adaptation, logs["domain_accuracy"] = self._discriminate(features, n_s)
            self.reversal.step()
        else:
            if features.dim() != 2:
                raise ConfigError(
                    f"the features {'of ' + repr(self.layer) if self.layer else 'entering the output layer'} have shape "
                    f"{tuple(features.shape)}; {self.method} compares (batch, features) rows: pass pool= a function "
                    "that makes them so, e.g. pool=lambda f: f.flatten(2).mean(2) for (batch, channels, height, width) "
                    "or pool=lambda f: f.mean(1) for (batch, sequence, hidden)")
            fs, ft = features[:n_s], features[n_s:]
            adaptation = coral_loss(fs, ft) if self.method == "coral" else mmd_loss(fs, ft, self.kernels,
                                                                                   linear=self.linear)
        logs["adaptation"] = float(adaptation.detach())
        logs["feature_scale"] = self._watch(features, logs)
        self._step += 1
        return task + self.weight * adaptation, logs

    def _watch(self, features: torch.Tensor, logs: dict[str, float]) -> float:
        """The features' scale against the first step's; one :class:`DivergenceWarning` when it, or
        a loss, has run away (a task loss that climbs while DANN's domain accuracy sits at 50% looks
        like success on its own)."""
        rms = float(features.detach().float().pow(2).mean().sqrt())
        if self._first_scale is None and math.isfinite(rms) and rms > 0:
            self._first_scale = rms
        scale = rms / self._first_scale if self._first_scale else 1.0
        bad = [k for k in ("task", "adaptation") if not math.isfinite(logs[k])]
        if not self._warned and (bad or not math.isfinite(rms) or scale > DIVERGED_SCALE):
            self._warned = True
            what = (f"the {bad[0]} loss is not finite" if bad else "the features are not finite" if not math.isfinite(rms)
                    else f"the features are {scale:.3g}x their scale at the first step")
            fix = ("lower weight= (0.1 trained on MNIST -> digits, where 1.0 diverged), give the reversal a "
                   "longer warm-up (total_steps=), or try method='mmd'" if self.method == "dann"
                   else "lower weight= or the learning rate")
            warnings.warn(f"{self.method} is diverging at step {self._step + 1}: {what} (task loss "
                          f"{logs['task']:.3g}, adaptation loss {logs['adaptation']:.3g}); {fix}. In the domain bench "
                          "no run came back from here: stop and restart with other settings", DivergenceWarning,
                          stacklevel=3)
        return scale
