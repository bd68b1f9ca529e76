"""param_groups, anchored_loss, multi-task heads and their losses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import TinyCNN
from torch import nn

import peftkit
from peftkit.errors import ConfigError, MergeError


def test_param_groups_depth_order_on_resnet18() -> None:
    m = peftkit.wrap(torchvision.models.resnet18(), "lora", r=2, head=10)
    groups = peftkit.param_groups(m, lr=1.0, decay=0.5, weight_decay=0.01)
    by_module = {path: g["depth"] for g in groups for path in g["modules"]}
    assert by_module["fc"] == 0
    assert by_module["layer4.1.conv2"] == 1 and by_module["layer4.0.downsample.0"] == 1
    assert by_module["layer3.0.conv1"] == 2 and by_module["layer1.1.conv2"] == 4 and by_module["conv1"] == 6
    assert [g["lr"] for g in groups] == [0.5**g["depth"] for g in groups]
    assert all(g["weight_decay"] == 0.01 for g in groups)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == sum(1 for p in m.parameters() if p.requires_grad)
    torch.optim.AdamW(groups)  # usable as is


def test_param_groups_with_unfrozen_blocks() -> None:
    m = peftkit.wrap(torchvision.models.resnet18(), "last_layer", head=2, unfreeze=2)
    groups = peftkit.param_groups(m, lr=1e-3, decay=0.8)
    assert [(g["modules"], g["depth"]) for g in groups] == [(["fc"], 0), (["layer4"], 1), (["layer3"], 2)]


def test_lora_plus_gives_b_its_own_groups_at_ratio_times_the_rate() -> None:
    m = peftkit.wrap(torchvision.models.resnet18(), "lora", r=2, head=10)
    plain = peftkit.param_groups(m, lr=1.0, decay=0.5)
    groups = peftkit.param_groups(m, lr=1.0, decay=0.5, lora_plus_ratio=16)
    names = {id(p): n for n, p in m.named_parameters()}
    for g in groups:
        assert all(names[id(p)].endswith("lora_B") == g["lora_plus"] for p in g["params"])
        assert g["lr"] == 0.5 ** g["depth"] * (16 if g["lora_plus"] else 1)
    # the fresh head (no B) stays in its depth's plain group; every trainable parameter lands once
    assert [g["modules"] for g in groups if g["depth"] == 0] == [["fc"]]
    params = [id(p) for g in groups for p in g["params"]]
    assert sorted(params) == sorted(id(p) for g in plain for p in g["params"])
    assert len(params) == len(set(params))
    assert all(not g["lora_plus"] for g in plain) and len(groups) == 2 * len(plain) - 1
    # methods without an output side (adapters, last layer) get no extra groups
    ad = peftkit.wrap(torchvision.models.resnet18(), "serial_adapter", head=10)
    assert not any(g["lora_plus"] for g in peftkit.param_groups(ad, lora_plus_ratio=16))
    for bad in (0, -1, float("inf"), True, "16"):
        with pytest.raises(ConfigError, match="lora_plus_ratio"):
            peftkit.param_groups(m, lora_plus_ratio=bad)  # type: ignore[arg-type]


def test_lora_plus_covers_every_lora_layer_kind() -> None:
    net = nn.Sequential(nn.Embedding(10, 8), nn.LSTM(8, 8, batch_first=True))
    m = peftkit.wrap(net, "lora", targets=["0", "1"], r=2)
    fast = [p for g in peftkit.param_groups(m, lora_plus_ratio=4) if g["lora_plus"] for p in g["params"]]
    names = {id(p): n for n, p in m.named_parameters()}
    assert sorted(names[id(p)] for p in fast) == sorted(n for n in names.values() if n.endswith("lora_B"))
    assert len(fast) == 1 + 2  # the embedding's B, the LSTM's two weight matrices' Bs


def test_anchored_loss_matches_hand_value_and_has_no_base_gradient() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        p_base = F.softmax(net(x), dim=-1)
    m = peftkit.wrap(net, "lora", r=2, init=False)
    logits = m(x)
    task = F.cross_entropy(logits, y)
    loss = peftkit.anchored_loss(m, x, task, alpha=0.3)
    q = F.softmax(logits, dim=-1)
    kl = (p_base * (p_base.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(loss, 0.7 * task + 0.3 * kl)
    loss.backward()
    assert all(p.grad is None for p in net.parameters())  # nothing flows into the base branch
    assert all(p.grad is not None for p in m.peft_adapters.parameters())
    same = peftkit.anchored_loss(m, x, task.detach(), alpha=0.3, logits=logits.detach())
    torch.testing.assert_close(same, loss.detach())


def test_anchored_loss_is_zero_at_identity_and_refuses_a_new_head() -> None:
    net = TinyCNN()
    x = torch.randn(2, 3, 8, 8)
    m = peftkit.wrap(net, "lora", r=2)
    torch.testing.assert_close(peftkit.anchored_loss(m, x, torch.tensor(0.0), alpha=1.0), torch.tensor(0.0), atol=1e-7, rtol=0)
    with pytest.raises(ConfigError, match="alpha"):
        peftkit.anchored_loss(m, x, torch.tensor(0.0), alpha=1.5)
    new_head = peftkit.wrap(TinyCNN(), "lora", head=7)
    with pytest.raises(ConfigError, match="output space"):
        peftkit.anchored_loss(new_head, x, torch.tensor(0.0))


def test_multitask_heads_return_a_dict_and_round_trip(tmp_path: Path) -> None:
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    m = peftkit.wrap(TinyCNN(), "lora", r=2, heads={"count": 5, "size": 3})
    out = m(x)
    assert set(out) == {"count", "size"} and out["count"].shape == (4, 5) and out["size"].shape == (4, 3)
    targets = {"count": torch.tensor([0, 1, 2, 3]), "size": torch.rand(4)}
    losses = {"count": F.cross_entropy, "size": lambda p, t: peftkit.pinball_loss(p, t, (0.1, 0.5, 0.9))}
    total, parts = peftkit.multitask_loss(out, targets, losses, weights={"size": 2.0})
    torch.testing.assert_close(total, parts["count"] + 2.0 * parts["size"])
    total.backward()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    m.eval()
    with torch.no_grad():
        expected = m(x)
        m.merge()  # the LoRA deltas fold in, the heads stay
        merged = m(x)
        m.unmerge()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)
    path = peftkit.save(m, tmp_path / "mt.safetensors")
    header = peftkit.read_header(path)
    assert header.targets["fc"]["role"] == "heads" and "fc.heads.count.weight" in header.tensors
    torch.manual_seed(0)
    with torch.no_grad():
        loaded = peftkit.load(TinyCNN(), path).eval()(x)
    for k in expected:
        torch.testing.assert_close(loaded[k], expected[k], rtol=0, atol=0)
    with pytest.raises(MergeError, match="multi-task heads"):
        m.unwrap(merge=True)


def test_mlp_heads_are_built_counted_saved_and_loaded(tmp_path: Path) -> None:
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    m = peftkit.wrap(TinyCNN(), "lora", r=2, heads={"label": 5, "domain": (16, 8, 1)})
    domain = m.get_adapter().modules.heads.head("domain")
    assert [type(layer) for layer in domain] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [layer.out_features for layer in domain if isinstance(layer, nn.Linear)] == [16, 8, 1]
    out = m(x)
    assert out["label"].shape == (4, 5) and out["domain"].shape == (4, 1)
    # trainable_parameters counts what the plan promised: LoRA, a Linear(8, 5) and 8*16+16 + 16*8+8 + 8*1+1
    lora = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and "lora_" in n)
    assert m.trainable_parameters() == lora + 45 + 144 + 136 + 9
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    m.eval()
    with torch.no_grad():
        expected = m(x)
    path = peftkit.save(m, tmp_path / "mlp.safetensors")
    assert peftkit.read_header(path).targets["fc"]["spec"]["heads"] == {"label": 5, "domain": [16, 8, 1]}
    torch.manual_seed(0)
    with torch.no_grad():
        loaded = peftkit.load(TinyCNN(), path).eval()(x)
    for k in expected:
        torch.testing.assert_close(loaded[k], expected[k], rtol=0, atol=0)


def test_an_mlp_head_on_a_convolutional_output_layer_uses_1x1_convolutions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))  # per-pixel classes
    m = peftkit.wrap(model, "last_layer", heads={"out": [5, 3]})
    head = m.get_adapter().modules.heads.head("out")
    assert [type(layer) for layer in head] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert head[2].kernel_size == (1, 1) and m(torch.randn(2, 3, 6, 6))["out"].shape == (2, 3, 6, 6)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "10", [], [4, 0], [4, True], [1] * 9, {"a": 1}])
def test_bad_head_specs_are_named_and_change_nothing(bad: object) -> None:
    model = TinyCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="head=.*expected the number of outputs"):
        peftkit.wrap(model, "lora", r=2, head=bad)
    with pytest.raises(ConfigError, match="heads\\['d'\\]"):
        peftkit.wrap(model, "lora", r=2, heads={"label": 2, "d": bad})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model._forward_hooks


def test_pinball_loss_hand_value() -> None:
    pred = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    target = torch.tensor([2.0, 1.0])
    # e = target - pred = [[1, 0], [-2, 1]]; q = (0.2, 0.8): max(q e, (q-1) e)
    expected = torch.tensor([[0.2, 0.0], [1.6, 0.8]]).mean()
    torch.testing.assert_close(peftkit.pinball_loss(pred, target, (0.2, 0.8)), expected)
    with pytest.raises(ConfigError, match="quantiles"):
        peftkit.pinball_loss(pred, target, (0.2, 1.0))
    with pytest.raises(ConfigError, match="expected"):
        peftkit.pinball_loss(pred, target, (0.5,))
