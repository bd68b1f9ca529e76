"""peftkit-ia3's tests: the conformance kit checks every method invariant, plus IA3's own options."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.errors import ConfigError
from peftkit.testing import MethodSuite, get_model


class TestIA3(MethodSuite):
    method = "ia3"
    random_options = {"init": 1.5}  # scales away from 1: a non-identity adapter for save/merge checks


@pytest.mark.parametrize("init", ["one", True, None])
def test_init_must_be_a_number(init: object) -> None:
    with pytest.raises(ConfigError, match="ia3 option init="):
        peftkit.wrap(get_model("mlp").build(), "ia3", init=init)


def test_float32_scales_on_a_bfloat16_backbone_keep_its_dtype() -> None:
    """Adapters kept in float32 (master weights for mixed precision) beside a bf16 backbone: the
    activations stay bf16, so the next layer takes them, and the scales still get gradients."""
    import torch

    kit = get_model("mlp")
    m = peftkit.wrap(kit.build().to(torch.bfloat16), "ia3", init=1.5)
    m.peft_adapters.float()
    x = kit.example()[0].to(torch.bfloat16)
    out = m(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
