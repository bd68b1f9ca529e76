"""FISH: Fisher-masked sparse updates (Sung et al. 2021, arXiv 2111.09839).

Estimate each parameter's Fisher information from squared per-sample gradients, keep the top
``keep`` fraction (about 0.5%), and train only those entries. peftkit's take:

* the trainable state is just the selected values (``k`` numbers per tensor), never the backbone:
  AdamW's weight decay can only move selected entries, and every other entry of every backbone
  tensor stays bitwise what it was (the reference masks gradients after backward, and its weight
  decay still moves the masked-out entries);
* the deltas act in weight space (``W.index_add(idx, values)``): one copy of each touched tensor
  per forward, no dense optimizer state;
* the file stores, per tensor, the positions as 16-bit gaps (2 bytes per entry against 4 for an
  fp32 value) and the values, plus a content hash of the base values they apply to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import peftkit
from peftkit.attach import TensorStamp
from peftkit.errors import ConfigError, TargetError
from peftkit.fisher import candidate_names, fisher_mask
from peftkit.method import SparseDelta

_RUNTIME = {"runtime": True}
_SKIP = 0  # a gap code meaning "advance 65535 positions, select nothing"
_SPAN = 65535


def encode_gaps(index: torch.Tensor) -> torch.Tensor:
    """Sorted flat positions -> int16 gap codes (1..65535 select; 0 skips 65535 positions)."""
    gaps = torch.diff(index, prepend=index.new_tensor([-1]))  # >= 1
    skips = (gaps - 1) // _SPAN  # how many "skip" codes precede each gap
    last = gaps - skips * _SPAN  # 1..65535
    counts = skips + 1
    codes = torch.zeros(int(counts.sum()), dtype=torch.int64)
    ends = torch.cumsum(counts, 0) - 1
    codes[ends] = last
    return (codes - 32768).to(torch.int16)


def decode_gaps(codes: torch.Tensor) -> torch.Tensor:
    """int16 gap codes -> sorted flat positions (int64)."""
    g = codes.to(torch.int64) + 32768
    steps = torch.where(g == _SKIP, torch.full_like(g, _SPAN), g)
    positions = torch.cumsum(steps, 0) - 1
    return positions[g != _SKIP]


@dataclass(frozen=True)
class FishConfig:
    """Options of the ``fish`` method."""

    keep: float = 0.005  # fraction of the candidate parameters trained (head=/train count inside it)
    samples: int = 256  # samples for the Fisher estimate
    fisher: str = "empirical"  # "empirical" (true labels) | "expected" (labels sampled from the model)
    scope: str = "global"  # "global": one top-k over all candidates | "tensor": a quota per tensor
    candidates: list[str] | None = None  # parameter names/suffixes/regexes that may be selected (default: all)
    mask: Any = field(default=None, metadata=_RUNTIME, compare=False, repr=False)  # from peftkit.fisher_mask
    data: Iterable[Any] | None = field(default=None, metadata=_RUNTIME, compare=False, repr=False)
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = field(default=None, metadata=_RUNTIME, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.keep, (int, float)) or isinstance(self.keep, bool) or not 0 < self.keep <= 1:
            raise ConfigError(f"fish option keep={self.keep!r} is invalid; expected a fraction in (0, 1], e.g. 0.005")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise ConfigError(f"fish option samples={self.samples!r} is invalid; expected a positive count such as 256")
        if self.fisher not in ("empirical", "expected"):
            raise ConfigError(f"fish option fisher={self.fisher!r} is invalid; expected 'empirical' or 'expected'")
        if self.scope not in ("global", "tensor"):
            raise ConfigError(f"fish option scope={self.scope!r} is invalid; expected 'global' or 'tensor'")
        if self.candidates is not None and (isinstance(self.candidates, str) or not all(isinstance(c, str) for c in self.candidates)):
            raise ConfigError(f"fish option candidates={self.candidates!r} is invalid; expected a list of parameter "
                              "names, suffixes or regexes")


class FishDelta(peftkit.Adapter):
    """Sparse deltas on a module's own parameters: for each, positions (as gap codes) and values."""

    def __init__(self, module: nn.Module, positions: dict[str, torch.Tensor | None], lengths: dict[str, int] | None = None,
                 counts: dict[str, int] | None = None) -> None:
        super().__init__()
        self.names = list(positions)
        self._decoded: dict[str, tuple[TensorStamp, torch.Tensor]] = {}
        for name, idx in positions.items():
            base = module.get_parameter(name)
            if idx is None:  # rebuilt for loading: shapes from the file's spec, values filled next
                codes = torch.zeros(lengths[name], dtype=torch.int16)  # type: ignore[index]
                k = counts[name]  # type: ignore[index]
            else:
                codes, k = encode_gaps(idx.cpu()), idx.numel()
            self.register_buffer(f"{name}_index", codes.to(base.device))
            self.register_parameter(f"{name}_delta", nn.Parameter(torch.zeros(k, device=base.device, dtype=base.dtype)))

    def positions(self, name: str) -> torch.Tensor:
        """Flat positions of the selected entries of parameter ``name`` (decoded again whenever the
        codes change: edited in place, moved to another device, or replaced)."""
        codes = getattr(self, f"{name}_index")
        if codes.is_meta:  # no values to decode: positions of the right count (shape inference on meta)
            return torch.empty(getattr(self, f"{name}_delta").shape, dtype=torch.int64, device="meta")
        cached = self._decoded.get(name)
        if cached is None or not cached[0].matches(codes):
            cached = (TensorStamp(codes), decode_gaps(codes).to(codes.device))
            self._decoded[name] = cached
        return cached[1]

    def spec(self) -> dict[str, Any]:
        return {"counts": {n: getattr(self, f"{n}_delta").numel() for n in self.names},
                "lengths": {n: getattr(self, f"{n}_index").numel() for n in self.names}}

    def validate(self, module: nn.Module) -> None:
        for n in self.names:
            codes = getattr(self, f"{n}_index")
            positions = decode_gaps(codes)  # strictly increasing by construction (every gap is >= 1)
            size = module.get_parameter(n).numel()
            count = getattr(self, f"{n}_delta").numel()
            if positions.numel() != count:
                raise ValueError(f"{n}: its position codes select {positions.numel()} entries and it holds {count} values")
            if count and int(positions[-1]) >= size:
                raise ValueError(f"{n}: a position ({int(positions[-1])}) lies past the end of the {size}-entry tensor")

    def delta(self, module: nn.Module) -> dict[str, SparseDelta]:
        return {n: SparseDelta(self.positions(n), getattr(self, f"{n}_delta")) for n in self.names}


class Fish(peftkit.Method):
    """FISH: train only the ~0.5% of parameters with the largest Fisher information, as sparse deltas."""

    name = "fish"
    Config = FishConfig
    hash_base_values = True  # deltas are for these exact base values
    follows_ties = True  # it trains entries of parameters: a tied parameter changes wherever it is used

    def setup(self, model: nn.Module, trained: Sequence[str], trained_parameters: int) -> None:
        c = self.config
        if c.mask is not None:
            self.mask = {n: torch.as_tensor(i, dtype=torch.int64).reshape(-1).sort().values for n, i in c.mask.items()}
            known = dict(model.named_parameters())
            bad = [n for n in self.mask if n not in known]
            if bad:
                raise ConfigError(f"mask names parameters the model does not have: {bad[:3]}")
            return
        if c.data is None:
            raise ConfigError("fish needs mask=peftkit.fisher_mask(...) or data=... (an iterable of batches) to "
                              "estimate the Fisher information from")
        # modules trained whole (or replaced by a new head) are not candidates; their parameters
        # count inside the budget, as in the reference implementation
        names = set(candidate_names(model, c.candidates))
        owned = {n for n in names if any(n.startswith(t + ".") for t in trained if t)}
        self.mask = fisher_mask(model, c.data, c.loss_fn, keep=c.keep, samples=c.samples, fisher=c.fisher,
                                scope=c.scope, candidates=lambda n, _: n in names and n not in owned,
                                trained_parameters=trained_parameters)

    def _owned(self, path: str) -> dict[str, torch.Tensor]:
        prefix = f"{path}." if path else ""
        return {n[len(prefix):]: i for n, i in getattr(self, "mask", {}).items()
                if n.startswith(prefix) and "." not in n[len(prefix):] and i.numel()}

    def default_targets(self, model: nn.Module) -> list[str]:
        owners = {n.rpartition(".")[0] for n, i in self.mask.items() if i.numel()}
        return [p for p, _ in model.named_modules() if p in owners]

    def can_adapt(self, module: nn.Module) -> bool:
        return True

    def build(self, path: str, module: nn.Module) -> peftkit.Adapter:
        owned = self._owned(path)
        if not owned:
            raise TargetError(f"the FISH mask selects no parameter of {path!r}; leave targets unset to use the mask")
        return FishDelta(module, owned)

    def rebuild(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
        return FishDelta(module, dict.fromkeys(spec["counts"]), spec["lengths"], spec["counts"])




@peftkit.hookimpl
def register_methods(register: Any) -> None:
    register(Fish)
