"""Methods for tests/test_method_suite.py (the checks the conformance kit leaves out; every method also
has a ``MethodSuite`` in tests/test_conformance.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodCase:
    """One method under test.

    Attributes:
        method: Registered method name.
        options: Options for a default (identity-at-init) adapter.
        random_options: Options giving a non-identity adapter (non-zero deltas), for merge/save tests.
        models: Tiny model names the method applies to.
        mergeable: Whether merge() must work with random_options.
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    random_options: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] = ("mlp", "cnn", "transformer")
    mergeable: bool = True
    needs_data: bool = False  # the method estimates something from data (FISH): the suite passes data=

    def __str__(self) -> str:
        return self.method


METHOD_CASES = [
    MethodCase("lora", {"r": 4}, {"r": 4, "init": False}),
    MethodCase("lora", {"r": 2, "bias": "all", "rslora": True}, {"r": 2, "bias": "all", "init": False}),
    MethodCase("serial_adapter", {"bottleneck": 4}, {"bottleneck": 4, "init": "houlsby", "scale": 50.0}, mergeable=False),
    MethodCase("parallel_adapter", {"reduction": 2, "scale": "learned"},
               {"reduction": 2, "init": "houlsby", "scale": 50.0, "activation": "gelu", "layer_norm": True}, mergeable=False),
    MethodCase("parallel_adapter", {"bottleneck": 3, "activation": "identity"},
               {"bottleneck": 3, "activation": "identity", "init": "houlsby", "scale": 50.0},
               models=("mlp",)),  # folds into Linear targets (grouped convs and attention do not fold)
    MethodCase("last_layer", {}, {"unfreeze": 1}),
    MethodCase("fish", {"keep": 0.25, "samples": 8}, {"keep": 0.25, "samples": 8}, needs_data=True),
    MethodCase("fish", {"keep": 0.3, "samples": 8, "scope": "tensor", "fisher": "expected"},
               {"keep": 0.3, "samples": 8, "scope": "tensor"}, needs_data=True),
    MethodCase("ia3", {}, {"init": 1.5}),  # the third-party example plugin, installed from examples/
]
