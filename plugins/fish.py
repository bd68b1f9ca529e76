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

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from torch import nn

import peftkit
from peftkit.attach import TensorStamp
from peftkit.combination import Combination, merge_deltas
from peftkit.errors import ConfigError, TargetError
from peftkit.fisher import candidate_names, fisher_mask
from peftkit.method import Delta, SparseDelta
from peftkit.quantized import is_quantized

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

    def __init__(self, module: nn.Module, counts: dict[str, int], lengths: dict[str, int]) -> None:
        """Room for ``counts[name]`` selected entries of each parameter ``name`` of ``module``, whose
        positions take ``lengths[name]`` gap codes; positions and values are filled in afterwards
        (from the plan when wrapping, from the file when loading)."""
        super().__init__()
        if set(counts) != set(lengths):
            raise ValueError("counts and lengths name different parameters")
        self.names = list(counts)
        self._decoded: dict[str, tuple[TensorStamp, torch.Tensor]] = {}
        for name in self.names:
            base = module.get_parameter(name)
            self.register_buffer(f"{name}_index", torch.zeros(lengths[name], dtype=torch.int16, device=base.device))
            self.register_parameter(f"{name}_delta", nn.Parameter(torch.zeros(counts[name], device=base.device,
                                                                              dtype=base.dtype)))

    def positions(self, name: str) -> torch.Tensor:
        """Flat positions of the selected entries of parameter ``name`` (decoded again whenever the
        codes change: edited in place, moved to another device, or replaced)."""
        codes = getattr(self, f"{name}_index")
        if codes.is_meta:  # no values to decode: positions of the right count (shape inference on meta)
            return torch.empty(getattr(self, f"{name}_delta").shape, dtype=torch.int64, device="meta")
        if torch._C._functorch.peek_interpreter_stack() is not None:  # inside a torch.func transform (another
            return decode_gaps(codes).to(codes.device)  # FISH adapter's Fisher estimate): its tensors must not be kept
        cached = self._decoded.get(name)
        if cached is None or not cached[0].matches(codes):
            cached = (TensorStamp(codes), decode_gaps(codes).to(codes.device))
            self._decoded[name] = cached
        return cached[1]

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

    def delta(self, module: nn.Module) -> dict[str, Delta]:
        return {n: SparseDelta(self.positions(n), getattr(self, f"{n}_delta")) for n in self.names}


class Fish(peftkit.Method[FishConfig]):
    """FISH: train only the ~0.5% of parameters with the largest Fisher information, as sparse deltas."""

    name = "fish"
    Config = FishConfig
    hash_base_values = True  # deltas are for these exact base values
    follows_ties = True  # it trains entries of parameters: a tied parameter changes wherever it is used
    learning_rate = 5e-4  # it trains entries of the pretrained weights themselves, as fine-tuning does

    def plan(self, context: peftkit.PlanContext) -> peftkit.Plan:
        """The parameters' entries to train: the given ``mask``, or the top ``keep`` fraction by
        Fisher information estimated from ``data``. Targets: the modules owning selected entries (of
        the user's ``targets``, when given); each target's spec holds its counts, its values the
        selected positions."""
        mask = self._mask(context)
        owned: dict[str, dict[str, torch.Tensor]] = {}
        for n, idx in mask.items():
            if idx.numel():
                owner, _, leaf = n.rpartition(".")
                owned.setdefault(owner, {})[leaf] = idx
        if context.explicit:
            empty = [p for p in context.targets if p not in owned]
            if empty:
                raise TargetError(f"the FISH mask selects no parameter of {empty[0]!r}; leave targets unset to use the mask")
        paths = [p for p in context.targets if p in owned]
        specs: dict[str, dict[str, Any]] = {}
        values: dict[str, dict[str, torch.Tensor]] = {}
        for p in paths:
            codes = {leaf: encode_gaps(idx.cpu()) for leaf, idx in owned[p].items()}
            specs[p] = {"counts": {leaf: idx.numel() for leaf, idx in owned[p].items()},
                        "lengths": {leaf: code.numel() for leaf, code in codes.items()}}
            values[p] = {f"{leaf}_index": code for leaf, code in codes.items()}
        return peftkit.Plan(specs, values=values)

    def combine(self, how: str, parts: Mapping[str, Sequence[tuple[float, peftkit.Adapter]]],
                modules: Mapping[str, nn.Module], *, rank: int | None, density: float,
                generator: torch.Generator) -> Combination:
        """FISH from FISH: each parameter's deltas formed densely and combined (``rank`` does not
        apply: sparse deltas have none); the result selects the union of the adapters' positions,
        the only entries any combination can move."""
        del rank  # a sparse delta is not rank-limited: svd is the exact sum here
        mask: dict[str, torch.Tensor] = {}
        values: dict[str, dict[str, torch.Tensor]] = {}
        for path, members in parts.items():
            module = modules[path]
            names = list(dict.fromkeys(n for _, a in members if isinstance(a, FishDelta) for n in a.names))
            values[path] = {}
            for n in names:
                base = module.get_parameter(n)
                dense, weights, union = [], [], torch.zeros(base.numel(), dtype=torch.bool)
                for w, a in members:
                    assert isinstance(a, FishDelta)
                    if n in a.names:
                        d = torch.zeros(base.numel(), dtype=torch.float32)
                        positions = a.positions(n).cpu()
                        d[positions] = getattr(a, f"{n}_delta").detach().float().cpu()
                        union[positions] = True
                        dense.append(d.view(base.shape))
                        weights.append(w)
                combined = merge_deltas(dense, weights, how, density, generator).flatten()
                positions = torch.nonzero(union).flatten()
                mask[f"{path}.{n}" if path else n] = positions
                values[path][f"{n}_index"] = encode_gaps(positions)
                values[path][f"{n}_delta"] = combined[positions].to(base.dtype)
        return Combination({"mask": mask}, values)

    def _mask(self, context: peftkit.PlanContext) -> dict[str, torch.Tensor]:
        """Parameter name -> sorted flat positions to train."""
        c, model = self.config, context.model
        if c.mask is not None:
            mask = {n: torch.as_tensor(i, dtype=torch.int64).reshape(-1).sort().values for n, i in c.mask.items()}
            known = dict(model.named_parameters())
            bad = [n for n in mask if n not in known]
            if bad:
                raise ConfigError(f"mask names parameters the model does not have: {bad[:3]}")
            outside = [n for n, i in mask.items() if i.numel() and not 0 <= int(i[0]) <= int(i[-1]) < known[n].numel()]
            if outside:
                raise ConfigError(f"mask selects positions outside {outside[0]} ({known[outside[0]].numel()} entries); "
                                  "give flat positions in [0, numel)")
            quantized = [n for n in mask if is_quantized(known[n]) and mask[n].numel()]
            if quantized:
                raise TargetError(f"mask selects entries of {quantized[0]}, which is quantized: a sparse delta cannot be "
                                  "added to quantized weights. Keep that layer in float, or leave it out of the mask")
            return mask
        if c.data is None:
            raise ConfigError("fish needs mask=peftkit.fisher_mask(...) or data=... (an iterable of batches) to "
                              "estimate the Fisher information from")
        # only the targets' own parameters are candidates: modules trained whole (or replaced by a
        # new head) are not, and their parameters count inside the budget, as in the reference
        targets = set(context.targets)
        params = dict(model.named_parameters())
        names = {n for n in candidate_names(model, c.candidates) if n.rpartition(".")[0] in targets}
        quantized = sorted(n for n in names if is_quantized(params[n]))  # a sparse delta cannot be added to them
        names -= set(quantized)
        if not names and quantized:
            raise TargetError(f"fish: every candidate parameter of the targets is quantized ({quantized[0]}, ...), "
                              "and a sparse delta cannot be added to quantized weights; use lora on a quantized "
                              "backbone, or keep the layers FISH should adapt in float (peftkit.quantize(..., targets=))")
        if not names:
            shown_targets = ", ".join(sorted(targets)[:3]) + (" …" if len(targets) > 3 else "")
            raise ConfigError(f"fish: the targets ({shown_targets}) hold no candidate parameters of their own; FISH "
                              "picks entries of the parameters its targets hold directly, so select the layers inside "
                              r"a block (a regex such as 'layer4\..*'), or leave targets out")
        return fisher_mask(model, c.data, c.loss_fn, keep=c.keep, samples=c.samples, fisher=c.fisher,
                           scope=c.scope, candidates=lambda n, _: n in names,
                           trained_parameters=context.trained_parameters)

    def default_targets(self, model: nn.Module) -> list[str]:
        """Every module holding parameters of its own (the Fisher information then picks the entries)."""
        return [p for p, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]

    def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
        counts, lengths = spec.get("counts"), spec.get("lengths")
        if not (_counts(counts) and _counts(lengths)):
            raise ValueError(f"fish spec for {path!r} needs 'counts' and 'lengths' (parameter name -> count)")
        return FishDelta(module, counts, lengths)


def _counts(value: Any) -> TypeGuard[dict[str, int]]:
    """Whether ``value`` is a dict of parameter name -> count (>= 0)."""
    return isinstance(value, dict) and all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items())


@peftkit.hookimpl
def register_methods(register: Any) -> None:
    register(Fish)
