"""Invariants every method must keep, on every tiny model it applies to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyModel, assert_bitwise_equal, snapshot
from method_cases import METHOD_CASES, MethodCase
from safetensors import safe_open

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


def _perturb(m: peftkit.AdaptedModel, name: str = "default") -> None:
    """Move every trainable tensor of an adapter off its initial value, whatever the method."""
    with torch.no_grad():
        for p in m.peft_adapters[name].parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_identity_at_init(case: MethodCase, tiny: TinyModel) -> None:
    base = tiny.fresh().eval()
    x = tiny.input()
    expected = _out(base, x)
    m = peftkit.wrap(base, case.method, **_opts(case, tiny)).eval()
    # float tolerance, not bitwise: an output-space adapter inside nn.TransformerEncoderLayer turns
    # off its fused inference kernel, which rounds differently (~1e-8)
    torch.testing.assert_close(_out(m, x), expected)
    torch.testing.assert_close(m(x), expected)  # with autograd: the output-space form


def test_training_changes_only_adapter_and_train_modules(case: MethodCase, tiny: TinyModel) -> None:
    base = tiny.fresh()
    before = snapshot(base)
    x = tiny.input()
    m = peftkit.wrap(base, case.method, train=[tiny.head], **_opts(case, tiny)).train()
    trainable = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("peft_adapters.") for n in trainable)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = m(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_bitwise_equal(snapshot(base), before)  # every base parameter and buffer (BN statistics too)
    changed = {n for n, p in m.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])}
    assert any(".copies." in n for n in changed), "the `train` module did not train"
    if len(m.peft_adapters["default"].adapters):
        assert any(".adapters." in n for n in changed), "the adapter did not train"


def test_merge_equals_unmerged_and_unmerge_restores(case: MethodCase, tiny: TinyModel) -> None:
    base = tiny.fresh().eval()
    before = snapshot(base)
    x = tiny.input()
    m = peftkit.wrap(base, case.method, **_opts(case, tiny, random=True)).eval()
    _perturb(m)
    unmerged = _out(m, x)
    unmerged_grad_form = m(x).detach()
    assert not torch.allclose(unmerged, _out(tiny.fresh().eval(), x)), "random adapter should change the output"
    torch.testing.assert_close(unmerged_grad_form, unmerged, rtol=1e-4, atol=1e-5)
    if not case.mergeable:
        with pytest.raises(peftkit.errors.MergeError):
            m.merge()
        return
    m.merge()
    m.merge()  # idempotent
    torch.testing.assert_close(_out(m, x), unmerged, rtol=1e-5, atol=1e-6)
    m.unmerge()
    m.unmerge()
    assert_bitwise_equal(snapshot(base), before)
    torch.testing.assert_close(_out(m, x), unmerged, rtol=1e-5, atol=1e-6)


def test_unwrap_without_merge_returns_the_original(case: MethodCase, tiny: TinyModel) -> None:
    base = tiny.fresh()
    before = snapshot(base)
    keys = list(base.state_dict())
    flags = [p.requires_grad for p in base.parameters()]
    m = peftkit.wrap(base, case.method, **_opts(case, tiny, random=True))
    assert list(base.state_dict()) == keys  # the backbone's own keys never change
    back = m.unwrap(merge=False)
    assert back is base
    assert_bitwise_equal(snapshot(back), before)
    assert [p.requires_grad for p in back.parameters()] == flags
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in back.modules())


def test_unwrap_with_merge_bakes_the_adapter_in(case: MethodCase, tiny: TinyModel) -> None:
    if not case.mergeable:
        pytest.skip("not mergeable")
    x = tiny.input()
    m = peftkit.wrap(tiny.fresh().eval(), case.method, **_opts(case, tiny, random=True)).eval()
    _perturb(m)
    expected = _out(m, x)
    plain = m.unwrap(merge=True)
    assert not any(mod._forward_hooks for mod in plain.modules())
    torch.testing.assert_close(_out(plain, x), expected, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_on_a_fresh_backbone(case: MethodCase, tiny: TinyModel, tmp_path: Path) -> None:
    x = tiny.input()
    m = peftkit.wrap(tiny.fresh(), case.method, train=[tiny.head], **_opts(case, tiny, random=True)).eval()
    _perturb(m)
    expected = _out(m, x)
    path = peftkit.save(m, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == set(m.peft_adapters["default"].file_tensors())  # adapter + train tensors only
    base_keys = set(tiny.fresh().state_dict())
    trained = m.peft_adapters["default"].train_paths
    assert tiny.head in trained
    assert keys & base_keys == {k for k in base_keys if any(k.startswith(p + ".") for p in trained)}  # trained modules only
    loaded = peftkit.load(tiny.fresh(), path).eval()
    torch.testing.assert_close(_out(loaded, x), expected, rtol=0, atol=0)
    assert loaded.active_adapters == ["default"]


def test_two_adapters_switch_disable_and_delete(case: MethodCase, tiny: TinyModel, tmp_path: Path) -> None:
    x = tiny.input()
    base_out = _out(tiny.fresh().eval(), x)
    torch.manual_seed(1)
    m = peftkit.wrap(tiny.fresh(), case.method, **_opts(case, tiny, random=True)).eval()
    _perturb(m)
    out_a = _out(m, x)
    torch.manual_seed(2)
    m.add_adapter("b", case.method, **_opts(case, tiny, random=True))
    _perturb(m, "b")
    assert m.active_adapters == ["default"]
    torch.testing.assert_close(_out(m, x), out_a, rtol=0, atol=0)  # inactive: no effect
    m.set_adapter("b")
    out_b = _out(m, x)
    assert not torch.allclose(out_a, out_b)
    assert all(p.requires_grad == (".b." in n) for n, p in m.peft_adapters.named_parameters(prefix="peft_adapters."))
    with m.disable_adapters():
        torch.testing.assert_close(_out(m, x), base_out, rtol=0, atol=0)
    path = peftkit.save(m, tmp_path / "b.safetensors", adapter="b")
    m.delete_adapter("b")
    assert m.active_adapters == [] and m.adapter_names == ["default"]
    torch.testing.assert_close(_out(m, x), base_out, rtol=0, atol=0)
    m.set_adapter("default")
    torch.testing.assert_close(_out(m, x), out_a, rtol=0, atol=0)
    assert m.load_adapter(path, name="c") == "c"
    m.set_adapter("c")
    torch.testing.assert_close(_out(m, x), out_b, rtol=0, atol=0)


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
