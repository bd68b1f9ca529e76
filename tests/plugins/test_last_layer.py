"""Last-layer fine-tuning: the output layer, unfreeze=k, tied weights, BatchNorm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from conftest import assert_bitwise_equal, snapshot
from torch import nn

import peftkit
from peftkit.errors import ConfigError


def test_resnet_new_head_only_the_head_trains(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    before = snapshot(net)
    m = peftkit.wrap(net, "last_layer", head=2)
    assert m.peft_adapters["default"].train_paths == ["fc"] and not m.peft_adapters["default"].paths
    assert m.trainable_parameters() == 512 * 2 + 2
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    m.train()
    for _ in range(3):  # one "epoch" of a few batches
        loss = nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_bitwise_equal(snapshot(net), before)  # BatchNorm running statistics included
    path = peftkit.save(m, tmp_path / "head.safetensors")
    assert set(peftkit.read_header(path).tensors) == {"fc.weight", "fc.bias"}


def test_without_head_trains_the_existing_output_layer() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    m = peftkit.wrap(net, "last_layer")
    assert m.peft_adapters["default"].train_paths == ["2"]
    assert m.trainable_parameters() == 8 * 3 + 3


def test_unfreeze_blocks_on_resnet_and_vit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    m = peftkit.wrap(net, "last_layer", head=2, unfreeze=2)
    assert m.peft_adapters["default"].train_paths == ["layer3", "layer4", "fc"]
    m.train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    copies = m.peft_adapters["default"].copies
    assert copies[1].get_submodule("0.bn1").num_batches_tracked.item() == 1  # an unfrozen block's BN trains
    assert net.layer4[0].bn1.num_batches_tracked.item() == 0
    keys = set(peftkit.read_header(peftkit.save(m, tmp_path / "u.safetensors")).tensors)
    assert "layer4.0.bn1.running_mean" in keys and not any(k.startswith("layer2") for k in keys)
    vit = torchvision.models.vit_b_16(image_size=32)
    paths = peftkit.wrap(vit, "last_layer", unfreeze=1).peft_adapters["default"].train_paths
    assert paths == ["encoder.layers.encoder_layer_11", "heads.head"]
    with pytest.raises(ConfigError, match="only 6 blocks"):
        peftkit.wrap(torchvision.models.resnet18(), "last_layer", unfreeze=7)


def test_blocks_are_stages_or_layers_not_a_blocks_own_layers() -> None:
    """unfreeze=k counts repeated blocks: a residual network's stages, a transformer's layers. A
    network whose stages sit in a Sequential (the demo's SmallResNet) unfreezes its last stage, not
    the convs and norms inside its last residual block; a long middle stage (ConvNeXt's third) does
    not outweigh the stages around it."""
    from peftkit.demo import SmallResNet
    from peftkit.targets import find_blocks

    assert find_blocks(SmallResNet()) == [f"layers.{i}" for i in range(4)]
    paths = peftkit.wrap(SmallResNet(), "last_layer", unfreeze=1).peft_adapters["default"].train_paths
    assert paths == ["layers.3", "fc"]
    convnext = torchvision.models.convnext_tiny()
    assert find_blocks(convnext)[-2:] == ["features.6", "features.7"]  # stage 3 of 9 blocks sits in features.5
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 3)
    assert find_blocks(nn.Sequential(nn.Embedding(50, 16), encoder, nn.Linear(16, 2))) == [
        "1.layers.0", "1.layers.1", "1.layers.2"]
    assert find_blocks(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))) == ["0", "2"]  # no blocks: its layers


def test_tied_output_layer_stays_tied_and_is_saved_once(tmp_path: Path) -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight  # tied

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm_head(torch.tanh(self.body(self.embed(ids))))

    torch.manual_seed(0)
    lm = TinyLM()
    ids = torch.tensor([[1, 2, 3]])
    m = peftkit.wrap(lm, "last_layer")
    assert m.peft_adapters["default"].train_paths == ["lm_head"]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m(ids).logsumexp(-1).sum().backward()
    opt.step()
    w = m.peft_adapters["default"].copies[0].weight.detach()
    assert not torch.equal(w, lm.embed.weight)
    with torch.no_grad():  # the embedding uses the trained, tied weight too
        torch.testing.assert_close(m(ids), torch.tanh(lm.body(w[ids])) @ w.T)
    path = peftkit.save(m, tmp_path / "tied.safetensors")
    assert set(peftkit.read_header(path).tensors) == {"lm_head.weight"}  # saved once
    m.eval()
    with torch.no_grad():
        expected = m(ids)
    torch.manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(peftkit.load(TinyLM(), path).eval()(ids), expected, rtol=0, atol=0)
    plain = m.unwrap(merge=True)
    assert plain.lm_head.weight is plain.embed.weight  # merging keeps the tie
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), expected, rtol=0, atol=0)


def test_output_layer_found_by_tracing_when_names_do_not_say() -> None:
    class HeadFirst(nn.Module):  # the head is registered before the body
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(8, 2)
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.body(x))

    net = HeadFirst()
    x = torch.randn(2, 4)
    assert peftkit.find_output_layer(net, example_input=x) == "out"
    m = peftkit.wrap(net, "last_layer", head=5, example_input=x)
    assert m(x).shape == (2, 5)


def test_bad_unfreeze() -> None:
    with pytest.raises(ConfigError, match="unfreeze"):
        peftkit.wrap(nn.Sequential(nn.Linear(2, 2)), "last_layer", unfreeze=-1)
    with pytest.raises(ConfigError, match="takes no targets"):
        peftkit.wrap(nn.Sequential(nn.Linear(2, 2)), "last_layer", targets=["0"])
