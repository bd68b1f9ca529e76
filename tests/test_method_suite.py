"""What the conformance kit (``peftkit.testing``, run on every method by tests/test_conformance.py)
does not cover: a method together with core features it does not exercise (``head=N``), and checks
that look inside PyTorch modules (hooks), which the kit, limited to peftkit's public API, cannot make."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyModel
from method_cases import METHOD_CASES, MethodCase

import peftkit


@pytest.fixture(params=METHOD_CASES, ids=lambda c: f"{c.method}{'-' + '-'.join(f'{k}={v}' for k, v in c.options.items()) if c.options else ''}")
def case(request: pytest.FixtureRequest, tiny: TinyModel) -> MethodCase:
    if tiny.name not in request.param.models:
        pytest.skip(f"{request.param.method} does not apply to {tiny.name}")
    return request.param


def _opts(case: MethodCase, tiny: TinyModel, random: bool = False) -> dict:
    """The case's options, plus a batch of labelled data for methods that estimate from data."""
    opts = dict(case.random_options if random else case.options)
    if case.needs_data:
        x = tiny.input()
        opts.update(data=[(x, torch.arange(x.shape[0]) % 3)], loss_fn=None)
    return opts


def _out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_unwrap_leaves_no_hooks(case: MethodCase, tiny: TinyModel) -> None:
    base = tiny.fresh()
    m = peftkit.wrap(base, case.method, **_opts(case, tiny, random=True))
    m(tiny.input())
    back = m.unwrap(merge=False)
    assert back is base
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in back.modules())
    assert all("forward" not in vars(mod) for mod in back.modules())  # no stand-in left on an instance


def test_new_head_trains_saves_and_loads(case: MethodCase, tiny: TinyModel, tmp_path: Path) -> None:
    x = tiny.input()
    m = peftkit.wrap(tiny.fresh(), case.method, head=3, **_opts(case, tiny))
    assert m(x).shape[-1] == 3
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m(x).pow(2).mean().backward()
    opt.step()
    m.eval()
    expected = _out(m, x)
    path = peftkit.save(m, tmp_path / "h.safetensors")
    assert peftkit.read_header(path).targets[tiny.head]["role"] == "head"
    torch.testing.assert_close(_out(peftkit.load(tiny.fresh(), path).eval(), x), expected, rtol=0, atol=0)
    if case.mergeable:
        plain = m.unwrap(merge=True).eval()  # unwrap restores the backbone's own (training) mode
        torch.testing.assert_close(_out(plain, x), expected, rtol=1e-5, atol=1e-6)
        head = plain.get_submodule(tiny.head)
        assert head.weight.shape[0] == 3 and getattr(head, "out_features", 3) == 3
