"""``peftkit.nf4``: NF4 dequantized a chunk at a time, bitwise torchao's values; ``NF4Linear``, the layer
``peftkit.quantize`` makes of a plain ``nn.Linear``, computing what torchao's ``F.linear`` computes."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit import nf4
from peftkit.errors import ConfigError
from peftkit.nf4 import NF4Linear, dequantize_nf4, is_nf4, nf4_linear
from peftkit.quantized import dequantize, float_class

torchao = pytest.importorskip("torchao")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def nf4_weight(shape: tuple[int, int], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torchao.quantization.to_nf4((torch.randn(shape, generator=g) * 0.02).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 128), (256, 192), (64, 768), (1040, 2048)],
                         ids=["one-scale-block", "rows-not-a-power-of-two", "blocks-across-rows", "3-chunks"])
def test_dequantize_nf4_is_bitwise_torchaos_dequantization(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    w = nf4_weight(shape, dtype)
    out = dequantize_nf4(w)
    expected = w.get_original_weight().to(dtype)
    assert out.dtype == dtype and out.shape == shape and not out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_nf4(w, torch.float32), expected.float(), rtol=0, atol=0)
    torch.testing.assert_close(dequantize(w), expected, rtol=0, atol=0)  # what the rest of peftkit reads
    for other in DTYPES:  # rounded once, straight into the result: as the whole tensor's .to() rounds
        torch.testing.assert_close(dequantize_nf4(w, other), w.get_original_weight().to(other), rtol=0, atol=0)


@pytest.mark.parametrize("block", [32, 96, 128])
def test_other_block_sizes_torchao_makes_are_read_too(block: int) -> None:
    """A block size that does not divide the chunk (96): chunks of whole blocks and bytes."""
    w = torchao.quantization.to_nf4(torch.randn(64, 3 * 4096, generator=torch.Generator().manual_seed(0)), block, 256)
    expected = w.get_original_weight()
    torch.testing.assert_close(dequantize_nf4(w), expected, rtol=0, atol=0)
    net = nn.Sequential(nn.Linear(3 * 4096, 64), nn.ReLU(), nn.Linear(64, 2))
    net[0].weight = nn.Parameter(w, requires_grad=False)  # quantized by torchao directly
    m = peftkit.wrap(net, "lora", r=2, targets=["0"], dora=True)  # DoRA reads the dequantized weight's norms
    m(torch.randn(3, 3 * 4096)).sum().backward()
    merged = m.unwrap(merge=True)
    assert type(merged[0]) is nn.Linear and not is_nf4(merged[0].weight)


def test_chunks_smaller_than_the_weight_give_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    w = nf4_weight((256, 256))
    whole = dequantize_nf4(w)
    monkeypatch.setattr(nf4, "CHUNK", 16384)  # 4 chunks, each a whole number of 64-weight blocks
    torch.testing.assert_close(dequantize_nf4(w), whole, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [torch.zeros(128, 128), "weight", None], ids=["float", "str", "none"])
def test_dequantize_nf4_refuses_what_is_not_an_nf4_tensor(bad: Any) -> None:
    assert not is_nf4(bad)
    with pytest.raises(ConfigError, match="w=.*NF4Tensor"):
        dequantize_nf4(bad)


def test_a_transposed_nf4_tensor_is_refused_by_name() -> None:
    w = nf4_weight((128, 256))
    assert is_nf4(w) and not is_nf4(w.t())
    with pytest.raises(ConfigError, match="w=a transposed NF4Tensor"):
        dequantize_nf4(w.t())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_nf4_linear_is_f_linear_over_the_dequantized_weight_forward_and_backward(dtype: torch.dtype,
                                                                                   bias: bool) -> None:
    w = nf4_weight((256, 128), dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 128, generator=g).to(dtype).requires_grad_()
    b = torch.randn(256, generator=g).to(dtype).requires_grad_() if bias else None
    dense = w.get_original_weight().to(dtype)
    y = nf4_linear(x, w, b)
    expected = F.linear(x, dense, b)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    grad = torch.randn(y.shape, generator=g).to(dtype)
    inputs = (x, b) if b is not None else (x,)
    torch.testing.assert_close(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(expected, inputs, grad),
                               rtol=0, atol=0)
    assert w.grad is None
    if not bias:  # torchao's own F.linear (its bias is added apart, rounded twice in half precision)
        torch.testing.assert_close(y, F.linear(x, w), rtol=0, atol=0)


@pytest.mark.parametrize(("weight", "x"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                          (torch.float16, torch.float32)])
def test_a_bias_of_another_dtype_than_the_input_promotes_as_torchao_does(weight: torch.dtype, x: torch.dtype) -> None:
    layer = nn.Linear(128, 256).to(weight)
    reference = copy.deepcopy(layer)
    peftkit.quantize(nn.Sequential(layer, nn.Linear(256, 2)), "nf4", backend="torchao")
    reference.weight = nn.Parameter(layer.weight, requires_grad=False)  # torchao's own F.linear
    assert type(layer) is NF4Linear
    inp = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).to(x).requires_grad_()
    y, expected = layer(inp), reference(inp)
    assert y.dtype == expected.dtype == torch.promote_types(weight, x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), [inp, layer.bias]),
                               torch.autograd.grad(expected.sum(), [inp, reference.bias]), rtol=0, atol=0)


def test_under_autocast_the_weight_is_dequantized_once_to_autocasts_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    model = peftkit.quantize(plain_net(), "nf4", backend="torchao")
    reference = copy.deepcopy(model)
    for name in ("0", "2"):
        ref = getattr(reference, name)
        ref.__class__ = nn.Linear
        ref.weight = nn.Parameter(dequantize(ref.weight), requires_grad=False)  # float32, cast by autocast
    asked: list[torch.dtype | None] = []
    real = nf4.dequantize_nf4
    monkeypatch.setattr(nf4, "dequantize_nf4", lambda w, dtype=None: asked.append(dtype) or real(w, dtype))
    x = torch.randn(4, 128).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        expected = reference(x)
    assert y.dtype == torch.bfloat16 and asked == [torch.bfloat16] * 2
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y.float().sum(), x), torch.autograd.grad(expected.float().sum(), x),
                               rtol=0, atol=0)
    assert asked == [torch.bfloat16] * 4  # the backward's two, in the gradient's dtype


def test_nf4_linear_compiles_without_a_graph_break() -> None:
    model = peftkit.quantize(plain_net(), "nf4", backend="torchao")
    x = torch.randn(4, 128, requires_grad=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert x.grad is not None


def test_nf4_linear_without_gradients_and_with_a_frozen_input() -> None:
    w = nf4_weight((128, 128))
    x = torch.randn(4, 128)
    with torch.no_grad():
        y = nf4_linear(x, w)
    torch.testing.assert_close(y, F.linear(x, w), rtol=0, atol=0)
    assert nf4_linear(x, w).grad_fn is None  # nothing requires a gradient: no graph either


def plain_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 4))


class OwnLinear(nn.Linear):
    """A user's Linear subclass with a forward of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_quantize_makes_plain_linears_nf4_linears_in_place_and_leaves_others_alone() -> None:
    model = plain_net()
    model[2] = OwnLinear(256, 128)
    first = model[0]
    x = torch.randn(3, 128)
    peftkit.quantize(model, "nf4", backend="torchao")
    assert model[0] is first and type(first) is NF4Linear and isinstance(first, nn.Linear)
    assert type(model[2]) is OwnLinear and is_nf4(model[2].weight)  # its own forward, torchao's F.linear
    assert type(model[4]) is nn.Linear  # the output layer, kept in float
    assert float_class(NF4Linear) is nn.Linear
    assert "NF4Linear(in_features=128, out_features=256" in repr(model)
    int8 = peftkit.quantize(plain_net(), "int8", backend="torchao")
    assert type(int8[0]) is nn.Linear  # torchao's int8 keeps its own path
    twin = copy.deepcopy(model)
    assert type(twin[0]) is NF4Linear
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_nf4_linear_computes_what_the_plain_linear_over_torchaos_nf4_computes() -> None:
    model = peftkit.quantize(plain_net(), "nf4", backend="torchao")
    same = copy.deepcopy(model)
    for m in same.modules():
        if type(m) is NF4Linear:
            m.__class__ = nn.Linear  # torchao's F.linear
    x = torch.randn(6, 128)
    torch.testing.assert_close(model(x), same(x), rtol=1e-6, atol=1e-6)


def test_training_on_an_nf4_llama_never_dequantizes_a_whole_layer_through_torchao(
        monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    peftkit.quantize(model, "nf4")
    nf4_layers = [p for p, mod in model.named_modules() if type(mod) is NF4Linear]
    assert len(nf4_layers) == 2 * 7 - 4  # k/v projections (128 x 64) are not whole NF4 blocks
    m = peftkit.wrap(model, "lora", r=4, dora=True)
    cls = type(model.model.layers[0].mlp.up_proj.weight)

    def whole(*_: Any) -> None:
        raise AssertionError("torchao dequantized a whole layer")

    monkeypatch.setattr(cls, "get_original_weight", whole)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        m(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(type(model.get_submodule(p)) is NF4Linear for p in nf4_layers)
