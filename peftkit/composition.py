"""Composition blocks for :meth:`peftkit.AdaptedModel.set_adapter` (AdapterHub's names):

- :class:`Stack` ``("lang", "task")``: the adapters applied in this order, each on the output of the
  one before at every layer they share (serial bottleneck adapters, as in MAD-X); additive ones
  (LoRA, FISH) simply add up.
- :class:`Average` ``({"a": .5, "b": .5})``: at every adapted layer, each adapter's change to the
  layer's output (or weight) weighted: ``y + sum_i w_i (t_i(y) - y)``, which for weights summing to 1
  is the weighted mean of the adapters' outputs.
- :class:`Parallel` ``("a", "b")``: one call returns ``{"a": output_a, "b": output_b}``, each branch
  with its own adapter (and head); the modules no branch adapts, called on the same inputs, run
  once for all branches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["Average", "Composition", "Parallel", "Stack"]


def _names(kind: str, names: tuple[Any, ...]) -> tuple[str, ...]:
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"peftkit.{kind}({', '.join(map(repr, names))}) is invalid; expected adapter names, "
                          f"e.g. peftkit.{kind}('a', 'b')")
    if len(set(names)) != len(names):
        raise ConfigError(f"peftkit.{kind} names an adapter twice: {list(names)}")
    return names


class Stack(tuple[str, ...]):
    """Adapters applied one after the other, in this order: ``Stack("lang", "task")``."""

    def __new__(cls, *names: str) -> Stack:
        return super().__new__(cls, _names("Stack", names))

    def __repr__(self) -> str:
        return f"Stack({', '.join(map(repr, self))})"


class Parallel(tuple[str, ...]):
    """Branches computed in one call, one output per branch: ``Parallel("a", "b")``."""

    def __new__(cls, *names: str) -> Parallel:
        return super().__new__(cls, _names("Parallel", names))

    def __repr__(self) -> str:
        return f"Parallel({', '.join(map(repr, self))})"


class Average:
    """Adapters' changes weighted at every layer: ``Average({"a": 0.5, "b": 0.5})``."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not isinstance(weights, Mapping) or not weights:
            raise ConfigError(f"peftkit.Average({weights!r}) is invalid; expected adapter name -> weight, e.g. "
                              "peftkit.Average({'a': 0.5, 'b': 0.5})")
        for n, w in weights.items():
            if not isinstance(n, str) or not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                raise ConfigError(f"peftkit.Average: {n!r}: {w!r} is invalid; expected an adapter name and a finite "
                                  "weight")
        self.weights = {n: float(w) for n, w in weights.items()}

    @property
    def names(self) -> list[str]:
        """The averaged adapters, in the order given."""
        return list(self.weights)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Average) and other.weights == self.weights

    def __hash__(self) -> int:
        return hash(tuple(self.weights.items()))

    def __repr__(self) -> str:
        return f"Average({self.weights!r})"


Composition = Stack | Parallel | Average
