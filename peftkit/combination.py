"""Weighted combinations of adapters (``AdaptedModel.combine``): the task-arithmetic formulas on
dense weight deltas, which a method's :meth:`~peftkit.Method.combine` uses to build one adapter of its
own kind from several.

Each adapter's change to one tensor is a *task vector* ``d_i`` (its whole delta, scale included);
with weights ``w_i`` (negative ones negate a task):

- ``linear`` (and ``cat``): ``sum_i w_i d_i``;
- ``svd``: the same sum, cut to its best rank-``rank`` approximation (by the method);
- ``ties`` (Yadav et al. 2023): keep each ``d_i``'s ``density`` share of largest magnitudes,
  weight them, elect each entry's sign from the sum, and average the weighted values that agree
  with it: ``sum_i t_i [sign t_i = s] / max(1, #{i: t_i != 0, sign t_i = s})`` with ``t_i = w_i
  trim(d_i)`` and ``s = sign(sum_i t_i)`` (+1 where the sum is 0);
- ``dare_linear`` (Yu et al. 2024): drop each entry of each ``d_i`` with probability ``1 - density``
  and rescale the kept ones by ``1 / density``, then ``sum_i w_i dare(d_i)``;
- ``dare_ties``: DARE's random drop and rescale in place of TIES's trim, then TIES's sign election
  and disjoint mean.

These are PEFT's definitions (``add_weighted_adapter``), applied to each adapter's whole delta.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["HOWS", "Combination", "check_how", "dare", "low_rank_factors", "merge_deltas", "trim"]

HOWS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


@dataclasses.dataclass(frozen=True)
class Combination:
    """What a method's :meth:`~peftkit.Method.combine` returns: the options of the combined adapter
    (for :meth:`~peftkit.AdaptedModel.add_adapter`) and its tensors' values, per target path."""

    options: dict[str, Any]
    values: dict[str, dict[str, torch.Tensor]]


def check_how(how: Any, density: Any, rank: Any, seed: Any = 0) -> None:
    """Refuse an unknown ``how`` or a bad ``density``, ``rank`` or ``seed``, naming the fix."""
    if how not in HOWS:
        raise ConfigError(f"how={how!r} is not a combination; use one of {', '.join(HOWS)}")
    if (not isinstance(density, (int, float)) or isinstance(density, bool) or not math.isfinite(density)
            or not 0 < density <= 1):
        raise ConfigError(f"density={density!r} is invalid; expected the share of each delta to keep, in (0, 1], "
                          "e.g. 0.5")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank={rank!r} is invalid; expected a positive integer, or None for the method's default")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed={seed!r} is invalid; expected an integer in [0, 2**63)")


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``density`` share of largest-magnitude entries set to zero (TIES)."""
    k = int(density * delta.numel())
    if k >= delta.numel():
        return delta.clone()
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    if k > 0:
        mask[delta.abs().flatten().topk(k).indices] = True
    return delta * mask.view(delta.shape)


def dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """``delta`` with each entry kept with probability ``density`` and rescaled by ``1 / density`` (DARE)."""
    if density >= 1:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, device=generator.device) < density
    return delta * keep.to(delta.device) / density


def merge_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float], how: str, density: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The combined delta of one tensor (see the module docstring), in float32 or wider."""
    ds = [d.to(torch.promote_types(d.dtype, torch.float32)) for d in deltas]
    if how in ("linear", "cat", "svd"):
        return sum((w * d for w, d in zip(weights, ds, strict=True)), torch.zeros_like(ds[0]))
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if how == "dare_linear":
        return sum((w * dare(d, density, g) for w, d in zip(weights, ds, strict=True)), torch.zeros_like(ds[0]))
    if how not in ("ties", "dare_ties"):
        raise ConfigError(f"how={how!r} is not a combination; use one of {', '.join(HOWS)}")
    pruned = [trim(d, density) if how == "ties" else dare(d, density, g) for d in ds]
    t = torch.stack([w * p for w, p in zip(weights, pruned, strict=True)])
    sign = torch.where(t.sum(0) >= 0, 1.0, -1.0).to(t.dtype)  # PEFT's election: a tie is positive
    agree = (torch.sign(t) == sign) & (t != 0)
    return (t * agree).sum(0) / agree.sum(0).clamp(min=1)


def low_rank_factors(delta2d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left (rows, rank), right (rank, cols))`` with ``left @ right`` the best rank-``rank``
    approximation of ``delta2d`` (truncated SVD, the singular values split evenly); zero-padded when
    ``rank`` exceeds the matrix's smaller side."""
    u, s, vh = torch.linalg.svd(delta2d, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    left = delta2d.new_zeros(delta2d.shape[0], rank)
    right = delta2d.new_zeros(rank, delta2d.shape[1])
    left[:, :k] = u[:, :k] * root
    right[:k] = root[:, None] * vh[:k]
    return left, right
