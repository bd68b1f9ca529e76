"""Mixed-adapter batches: which rows of a batch each adapter serves, and taking and putting those
rows in a module call's inputs and outputs.

``model(x, adapter_names=["a", "__base__", "b", ...])`` runs the backbone once on the whole batch;
each adapted module then applies each adapter to that adapter's rows only (see
:class:`peftkit.attach.Slot`). A module sees the batch in the first dimension of its inputs and
outputs (every Linear, convolution and norm of a CNN or a batch-first transformer does); a tensor of
one row is shared by every row (broadcast); any other first dimension cannot be split by row and is
refused with the module's name. Recurrent layers keep the batch where their ``batch_first`` says, and
in the second dimension of their hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ConfigError

__all__ = ["BASE", "PLAIN", "Routing", "batch_dims", "batch_second", "put_rows", "routing", "row_error", "take_rows"]

BASE = "__base__"  # a row that runs the backbone alone (PEFT's name for it)
# what a module call may hold for peftkit to cut it by rows, or call it again: tensors and plain values,
# not stateful objects (a key/value cache a second call would update again)
PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.Tensor)


@dataclass
class Routing:
    """One mixed call: the batch's size and which rows each adapter serves.

    Attributes:
        size: Rows in the batch (the length of ``adapter_names``).
        names: The distinct adapter names, :data:`BASE` excluded, in order of first appearance.
        index: (size,) long, on the CPU: each row's position in ``names``; -1 for a base row.
    """

    size: int
    names: tuple[str, ...]
    index: torch.Tensor
    _on: dict[tuple[str | None, torch.device], torch.Tensor] = field(default_factory=dict, repr=False)

    def rows(self, name: str, device: torch.device) -> torch.Tensor:
        """The rows (long, ascending) that adapter ``name`` serves, on ``device``."""
        key = (name, device)
        if key not in self._on:
            self._on[key] = torch.nonzero(self.index == self.names.index(name)).flatten().to(device)
        return self._on[key]

    def index_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`index` on ``device``."""
        key = (None, device)
        if key not in self._on:
            self._on[key] = self.index.to(device)
        return self._on[key]


def routing(adapter_names: Any, held: Sequence[str]) -> Routing:
    """The :class:`Routing` of ``adapter_names`` (one name per row), checked against the adapters held."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise ConfigError(f"adapter_names={adapter_names!r} is invalid; expected a list with one adapter name per "
                          f"row of the batch ({BASE!r} for a row without adapters), e.g. ['a', 'b', {BASE!r}]")
    bad = sorted({repr(n) for n in adapter_names if not isinstance(n, str) or (n != BASE and n not in held)})
    if bad:
        raise ConfigError(f"adapter_names names {', '.join(bad[:5])}, which this model does not hold; it holds "
                          f"{list(held)} (and {BASE!r} runs a row without adapters)")
    names = tuple(dict.fromkeys(n for n in adapter_names if n != BASE))
    position = {n: i for i, n in enumerate(names)}
    index = torch.tensor([position.get(n, -1) for n in adapter_names], dtype=torch.long)
    return Routing(len(adapter_names), names, index)


def batch_dims(module: nn.Module) -> tuple[int, int]:
    """Where ``module`` keeps the batch: (in its first tensor, input or output; in every other one).
    0 and 0, except for recurrent layers, whose hidden states are (layers, batch, width) and whose
    sequence is batch-first or not."""
    if isinstance(module, nn.RNNBase):
        return (0 if module.batch_first else 1), 1
    return 0, 0


def batch_second(module: nn.Module) -> bool:
    """Whether ``module`` holds its batch in the second dimension (``batch_first=False``): PyTorch's
    attention and transformer layers by default. Recurrent layers are not counted (handled by
    :func:`batch_dims`)."""
    if isinstance(module, nn.RNNBase):
        return False
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return any(batch_second(layer) for layer in module.layers)
    if isinstance(module, nn.Transformer):
        return batch_second(module.encoder) or batch_second(module.decoder)
    return getattr(module, "batch_first", True) is False


def take_rows(call: Any, rows: torch.Tensor | None, size: int, where: str, module: nn.Module) -> Any:
    """``call`` (a module call's ``(args, kwargs)``, or ``(output,)``) with every tensor of ``size``
    rows cut to ``rows`` (rows in the dimension :func:`batch_dims` says); a tensor of one row is kept
    (it broadcasts). Refused, naming ``where``, when a tensor has another number of rows, or none has
    ``size`` rows (the module does not run per row). ``rows=None`` only checks."""
    first, rest = batch_dims(module)
    seen = 0
    found = False

    def take(t: Any) -> Any:
        nonlocal seen, found
        if not isinstance(t, torch.Tensor):
            return t
        dim = first if seen == 0 else rest
        seen += 1
        if t.dim() <= dim or (t.shape[dim] == 1 and size != 1):
            return t
        if t.shape[dim] != size:
            raise row_error(where, f"a tensor of shape {tuple(t.shape)}", size)
        found = True
        return t if rows is None else t.index_select(dim, rows)

    taken = pytree.tree_map(take, call)
    if not found:
        raise row_error(where, "no tensor of one row per row of the batch", size)
    return taken


def row_error(where: str, what: str, size: int) -> ConfigError:
    """The refusal of a module (``where``) whose call cannot be cut by rows (``what`` it held)."""
    return ConfigError(
        f"{where} was called with {what} in a batch of {size} rows (adapter_names has one name per row): a "
        "mixed-adapter batch needs every adapted module to see the batch in the first dimension of its inputs "
        "and outputs. Run each adapter's rows as their own batch (set_adapter), or leave this module out of targets")


def put_rows(output: Any, pieces: list[tuple[torch.Tensor, Any]], size: int, where: str, module: nn.Module) -> Any:
    """``output`` with the rows of each ``(rows, sub_output)`` piece replaced by ``sub_output``'s,
    in one indexed copy per tensor (whatever the number of pieces)."""
    if not pieces:
        return output
    leaves, spec = pytree.tree_flatten(output)
    subs = []
    for _, sub in pieces:
        sub_leaves, sub_spec = pytree.tree_flatten(sub)
        if sub_spec != spec:
            raise ConfigError(f"{where} returns outputs of another structure for some rows' adapter than for the "
                              "others' (a head per adapter that returns a dict, say), so one batch cannot hold them; "
                              "run those adapters' rows as their own batches")
        subs.append(sub_leaves)
    rows = torch.cat([r for r, _ in pieces])
    first, rest = batch_dims(module)
    out = []
    seen = 0
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            out.append(leaf)
            continue
        dim = first if seen == 0 else rest
        seen += 1
        parts = [s[i] for s in subs]
        if leaf.dim() > dim and leaf.shape[dim] == 1 != size and all(
                isinstance(p, torch.Tensor) and p.shape == leaf.shape and torch.equal(p, leaf) for p in parts):
            out.append(leaf)  # shared by every row (T5's position bias) and no adapter changed it
            continue
        if leaf.dim() <= dim or leaf.shape[dim] != size:
            raise row_error(where, f"an output of shape {tuple(leaf.shape)}", size)
        if any(not isinstance(p, torch.Tensor) or p.shape[:dim] + p.shape[dim + 1:] != leaf.shape[:dim] + leaf.shape[dim + 1:]
               for p in parts):
            shapes = sorted({tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__ for p in parts})
            raise ConfigError(f"{where} gives outputs of shape {tuple(leaf.shape)} for the whole batch and {shapes} for "
                              "some adapters' rows (heads with different numbers of outputs, say), so one batch cannot "
                              "hold them; run those adapters' rows as their own batches")
        out.append(leaf.index_copy(dim, rows, torch.cat(parts, dim).to(leaf.dtype)))
    return pytree.tree_unflatten(out, spec)
