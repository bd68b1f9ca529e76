"""Serial and parallel bottleneck adapters against hand-written references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import peftkit
from peftkit.errors import ConfigError, MergeError, TargetError


def _adapter(m: peftkit.AdaptedModel, path: str):
    s = m.peft_adapters["default"]
    return s.adapters[s.paths.index(path)]


def _randomise(m: peftkit.AdaptedModel) -> None:
    with torch.no_grad():
        for p in m.peft_adapters.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh", "identity"])
def test_serial_linear_formula(activation: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    h = lin(x).detach()
    m = peftkit.wrap(nn.Sequential(lin), "serial_adapter", targets=["0"], bottleneck=2, activation=activation, scale=0.5)
    _randomise(m)
    a = _adapter(m, "0")
    f = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda t: t}[activation]
    expected = h + 0.5 * F.linear(f(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    torch.testing.assert_close(m(x), expected)


def test_parallel_linear_formula_and_exact_fold() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    h = lin(x).detach()
    m = peftkit.wrap(nn.Sequential(lin), "parallel_adapter", targets=["0"], bottleneck=2, activation="identity", scale=2.0)
    _randomise(m)
    a = _adapter(m, "0")
    expected = h + 2.0 * F.linear(F.linear(x, a.down.weight, a.down.bias), a.up.weight, a.up.bias)
    torch.testing.assert_close(m(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected)  # weight-space form
        m.merge()
        torch.testing.assert_close(m(x), expected)


def test_layer_norm_and_learned_scale() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    x = torch.randn(3, 6)
    h = lin(x).detach()
    m = peftkit.wrap(nn.Sequential(lin), "serial_adapter", targets=["0"], bottleneck=3, layer_norm=True, scale="learned")
    _randomise(m)
    a = _adapter(m, "0")
    z = F.layer_norm(h, (6,), a.norm.weight, a.norm.bias)
    expected = h + a.learned_scale * a.up(F.relu(a.down(z)))
    torch.testing.assert_close(m(x), expected)
    m(x).sum().backward()
    assert a.learned_scale.grad is not None


def test_learned_scale_on_a_packing_transformer_encoder() -> None:
    """nn.TransformerEncoder's inference fast path packs padded batches into nested tensors, which a
    (1,)-shaped learned scale cannot multiply."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2).eval()
    x, pad = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        expected = enc(x, src_key_padding_mask=pad)
    m = peftkit.wrap(enc, "parallel_adapter", reduction=4, scale="learned").eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x, src_key_padding_mask=pad), expected)


@pytest.mark.parametrize("stride", [1, 2])
def test_parallel_conv_beside_a_3x3_conv(stride: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=False)
    x = torch.randn(2, 4, 7, 7)
    h = conv(x).detach()
    m = peftkit.wrap(nn.Sequential(conv), "parallel_adapter", targets=["0"], bottleneck=3, activation="identity")
    _randomise(m)
    a = _adapter(m, "0")
    assert a.down.bias is None and a.down.stride == (stride, stride)
    expected = h + F.conv2d(F.conv2d(x, a.down.weight, stride=stride), a.up.weight)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        m.merge()  # the 1x1 path is the centre tap of the 3x3 kernel
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_serial_conv_formula() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    h = conv(x).detach()
    m = peftkit.wrap(nn.Sequential(conv), "serial_adapter", targets=["0"], bottleneck=2)
    _randomise(m)
    a = _adapter(m, "0")
    expected = h + F.conv2d(F.relu(F.conv2d(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_tuple_outputs_adapt_the_first_element() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    q = torch.randn(2, 3, 8)
    out, weights = (t.detach() for t in mha(q, q, q))
    m = peftkit.wrap(mha, "parallel_adapter", targets=[nn.MultiheadAttention], bottleneck=2)
    _randomise(m)
    a = m.peft_adapters["default"].adapters[0]
    new_out, new_weights = m(q, q, q)
    torch.testing.assert_close(new_out, out + a.up(F.relu(a.down(q))))
    torch.testing.assert_close(new_weights, weights)


def test_non_linear_adapter_cannot_merge_but_unwraps() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    m = peftkit.wrap(net, "parallel_adapter", bottleneck=2)
    with pytest.raises(MergeError, match="cannot be merged"):
        m.merge()
    with pytest.raises(MergeError):
        m.unwrap(merge=True)
    assert m.unwrap(merge=False) is net


@pytest.mark.parametrize("builder", [torchvision.models.resnet18, torchvision.models.resnet50])
def test_resnets_out_of_the_box(builder, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = builder(num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = net.eval()(x)
    m = peftkit.wrap(net, "parallel_adapter")
    paths = m.peft_adapters["default"].paths
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(net, f"layer{i}")))]
    assert paths == blocks  # one per residual block, the downsampling ones (stride 2, more channels) included
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), base, rtol=0, atol=0)
    _randomise(m)
    m.train()
    m(x).sum().backward()
    m.eval()
    with torch.no_grad():
        y = m(x)
    loaded = peftkit.load(builder(num_classes=5), peftkit.save(m, tmp_path / "r.safetensors"))
    loaded.base_model.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), y, rtol=0, atol=0)


def test_default_targets_on_vit_and_pfeiffer() -> None:
    vit = torchvision.models.vit_b_16(image_size=32, num_classes=3)
    houlsby = peftkit.wrap(vit, "serial_adapter").peft_adapters["default"].paths
    assert houlsby[:2] == ["encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_0.mlp"]
    assert len(houlsby) == 24
    vit = torchvision.models.vit_b_16(image_size=32, num_classes=3)
    pfeiffer = peftkit.wrap(vit, "serial_adapter", placement="pfeiffer").peft_adapters["default"].paths
    assert len(pfeiffer) == 12 and all(p.endswith(".mlp") for p in pfeiffer)
    m = peftkit.wrap(vit, "parallel_adapter", name="p")
    m(torch.randn(1, 3, 32, 32)).sum().backward()


def test_default_targets_on_an_mlp() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert peftkit.wrap(net, "serial_adapter").peft_adapters["default"].paths == ["0", "2"]


def test_valid_padded_conv_is_refused_for_parallel() -> None:
    with pytest.raises(TargetError, match="same"):
        peftkit.wrap(nn.Sequential(nn.Conv2d(3, 4, 3)), "parallel_adapter", targets=["0"])


@pytest.mark.parametrize("bad", [{"bottleneck": 0}, {"reduction": 0}, {"activation": "swish"}, {"scale": "big"},
                                 {"init": "normal"}, {"placement": "middle"}, {"dropout": 2.0}])
def test_bad_options(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        peftkit.wrap(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "serial_adapter", **bad)


class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(4, 8, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.rnn(x)[0])
        return out


def _layer_kinds() -> dict[str, tuple[nn.Module, torch.Tensor, list[str]]]:
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D
    return {
        "conv1d": (nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1)),
                   torch.randn(2, 4, 10), ["0", "2"]),
        "conv3d": (nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1)),
                   torch.randn(2, 3, 4, 6, 6), ["0", "2"]),
        "hf_conv1d": (nn.Sequential(conv1d(8, 4), nn.ReLU(), conv1d(8, 8)), torch.randn(2, 5, 4), ["0", "2"]),
        **{k.__name__: (_Recurrent(k), torch.randn(2, 5, 4), ["rnn"]) for k in (nn.LSTM, nn.GRU, nn.RNN)},
    }


@pytest.mark.parametrize("kind", ["conv1d", "conv3d", "hf_conv1d", "LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("method", ["serial_adapter", "parallel_adapter"])
def test_every_layer_kind_identity_gradients_and_file(kind: str, method: str, tmp_path: Path) -> None:
    """Serial and parallel adapters on HF Conv1D, Conv1d, Conv3d and recurrent layers (on their
    sequence output): identity at init, a gradient for every adapter tensor, a file that loads."""
    torch.manual_seed(0)
    net, x, targets = _layer_kinds()[kind]
    with torch.no_grad():
        base = net(x)
    m = peftkit.wrap(net, method, targets=targets, bottleneck=4, activation="tanh")  # no dead units
    assert m.peft_adapters["default"].paths == targets
    with torch.no_grad():
        with m.disable_adapters():
            frozen = m(x)  # a frozen RNN may pick another kernel than a trainable one: float noise
        torch.testing.assert_close(frozen, base)
        torch.testing.assert_close(m(x), frozen, rtol=0, atol=0)
    _randomise(m)
    out = m(x)
    assert out.shape == base.shape and not torch.allclose(out, base)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.peft_adapters.parameters())
    m.eval()
    with torch.no_grad():
        want = m(x)
    path = peftkit.save(m, tmp_path / "a.safetensors")
    m.unwrap()
    again = peftkit.load(net, path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
