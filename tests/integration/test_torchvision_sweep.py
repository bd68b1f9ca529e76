"""Default LoRA on every torchvision classification family: wrap, forward/backward, merge, file round trip.

One model per family, its smallest member: the others are built from the same modules at other widths
and depths. (The whole list, vit_h_14 and regnet_y_128gf at 630 M parameters included, took most of
the suite's 13 GB peak memory and a third of its time, and tested nothing the small ones do not.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

import peftkit

MODELS = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
          "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
          "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t",
          "swin_v2_t", "vit_b_32"]
LEFT_OUT = {
    "vgg": "plain convolutions and Linears, as in alexnet; its smallest member holds 133 M parameters (2 GB here)",
    "wide": "resnet50's Bottleneck blocks at twice the width",
}


def _family(name: str) -> str:
    return name.split("_")[0].rstrip("0123456789")


def test_every_family_is_covered() -> None:
    """A torchvision release that adds a family adds a name here (each family: its smallest model)."""
    families = {_family(name) for name in torchvision.models.list_models(module=torchvision.models)}
    assert families == {_family(name) for name in MODELS} | set(LEFT_OUT)


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
