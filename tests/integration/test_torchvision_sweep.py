"""Default LoRA on every torchvision classification model: wrap, forward/backward, merge, file round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

import peftkit

MODELS = torchvision.models.list_models(module=torchvision.models)


def _config(name: str) -> tuple[dict[str, Any], int]:
    """Builder kwargs and the smallest convenient input size for a model."""
    if name.startswith("vit"):
        size = 28 if name.endswith("14") else 32
        return {"image_size": size}, size
    if name.startswith("inception"):
        return {"aux_logits": False, "init_weights": False}, 75
    if name.startswith("googlenet"):
        return {"aux_logits": False, "init_weights": False}, 64
    if name.startswith("maxvit"):
        return {}, 224  # its window partitioning needs the full size
    return {}, 64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", MODELS)
def test_default_lora(name: str, tmp_path: Path) -> None:
    kwargs, size = _config(name)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    head = peftkit.targets.find_output_layer(model)
    torch.nn.init.normal_(model.get_submodule(head).weight, std=0.02)  # ViTs start with a zero head: no gradient
    x = torch.randn(1 if size > 100 else 2, 3, size, size)
    assert head == peftkit.find_output_layer(model, example_input=x)  # module order and tracing agree
    assert model.get_submodule(head).weight.shape[0] == 10
    m = peftkit.wrap(model, "lora", r=2, init=False)
    assert m.peft_adapters["default"].paths, "no default targets"
    assert head not in m.peft_adapters["default"].paths
    m.train()
    m(x).sum().backward()
    grads = [p.grad for p in m.peft_adapters.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters())
    m.eval()
    activations = m(x).detach()  # output-space form (autograd on)
    with torch.no_grad():
        weights = m(x)  # weight-space form
        m.merge()
        merged = m(x)
        m.unmerge()
    assert _rel(weights, activations) < 1e-3
    assert _rel(merged, weights) < 1e-5
    path = peftkit.save(m, tmp_path / f"{name}.safetensors")
    backbone = m.unwrap()
    with torch.no_grad():
        reloaded = peftkit.load(backbone, path).eval()(x)
    torch.testing.assert_close(reloaded, weights, rtol=0, atol=0)
