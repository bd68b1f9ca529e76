"""Shared tiny models and fixtures. Everything is seeded and small enough for a 2-core CPU."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `make test` runs two pytest-xdist workers on the machine's two cores: one thread each (two would
# oversubscribe the cores); a plain `pytest` run uses both
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

SEED = 0


class TinyCNN(nn.Module):
    """Convs (one grouped), BatchNorm, pooling and a Linear head."""

    def __init__(self, n_out: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Embedding, one nn.TransformerEncoderLayer (MultiheadAttention inside), mean pooling, head."""

    def __init__(self, vocab: int = 20, d: int = 16, n_out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, n_out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(ids)).mean(dim=1))


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@dataclass(frozen=True)
class TinyModel:
    """A backbone builder (seeded, so two calls give identical weights), an input and a head name."""

    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]
    head: str

    def fresh(self) -> nn.Module:
        torch.manual_seed(SEED)
        return self.build()

    def input(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(SEED + 1)
        return self.make_input(g)  # type: ignore[call-arg]


TINY_MODELS = [
    TinyModel("mlp", tiny_mlp, lambda g: torch.randn(5, 8, generator=g), "4"),
    TinyModel("cnn", TinyCNN, lambda g: torch.randn(2, 3, 8, 8, generator=g), "fc"),
    TinyModel("transformer", TinyTransformer, lambda g: torch.randint(0, 20, (2, 5), generator=g), "head"),
]


@pytest.fixture(params=TINY_MODELS, ids=lambda t: t.name)
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    return request.param


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} changed"


@pytest.fixture
def register_plugin() -> Iterator[Callable[[Any, str], None]]:
    """Register in-process plugins for one test and always unregister them afterwards."""
    from peftkit.plugins import pm

    names: list[str] = []

    def register(plugin: Any, name: str) -> None:
        pm.register(plugin, name=name)
        names.append(name)

    try:
        yield register
    finally:
        for n in dict.fromkeys(names):
            if pm.get_plugin(n) is not None:
                pm.unregister(name=n)
