"""Last-layer fine-tuning ("feature extraction"), the standard transfer-learning recipe.

Freeze the pretrained network and train only its output layer: the existing one, or a fresh one
with ``head=N`` outputs. With more target data, ``unfreeze=k`` also trains the last ``k`` blocks of
the backbone's main stage. Trained modules are saved whole (BatchNorm statistics included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import peftkit
from peftkit.errors import ConfigError
from peftkit.targets import find_blocks, is_under, output_layers


@dataclass(frozen=True)
class LastLayerConfig:
    """Options of the ``last_layer`` method."""

    unfreeze: int = 0  # also train the last k blocks of the main stage (input side excluded)

    def __post_init__(self) -> None:
        if not isinstance(self.unfreeze, int) or isinstance(self.unfreeze, bool) or self.unfreeze < 0:
            raise ConfigError(f"last_layer option unfreeze={self.unfreeze!r} is invalid; expected a block count >= 0")


class LastLayer(peftkit.Method[LastLayerConfig]):
    """Train only the output layer (or a fresh head=N), optionally the last `unfreeze` blocks."""

    name = "last_layer"
    Config = LastLayerConfig
    adapts_targets = False
    learning_rate = 3e-3  # a linear layer on frozen features takes a larger step

    def plan(self, context: peftkit.PlanContext) -> peftkit.Plan:
        """The output layer (unless ``head=``/``heads=`` replace it) and the last ``unfreeze`` blocks."""
        model, output_layer = context.model, context.output_layer
        if output_layer is None:
            output_layer = output_layers(model).require(model, "last_layer")
        chosen = [] if context.replaced else [output_layer]
        if self.config.unfreeze:
            blocks = [b for b in find_blocks(model) if not (is_under(output_layer, [b]) or is_under(b, [output_layer]))]
            if self.config.unfreeze > len(blocks):
                raise ConfigError(f"unfreeze={self.config.unfreeze} but the main stage has only {len(blocks)} blocks "
                                  f"before the output layer: {', '.join(blocks)}")
            chosen += blocks[-self.config.unfreeze:]
        return peftkit.Plan(targets={}, train=chosen)


@peftkit.hookimpl
def register_methods(register: Any) -> None:
    register(LastLayer)
