"""LoRA against hand-written references, on every module kind it adapts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.errors import ConfigError, TargetError
from peftkit.method import add_delta

torch.manual_seed(0)


def _lora(m: peftkit.AdaptedModel, path: str = "0"):
    paths = m.peft_adapters["default"].paths
    return m.peft_adapters["default"].adapters[paths.index(path)]


def _merge_round_trip(m: peftkit.AdaptedModel, x: Any, atol: float = 1e-6) -> torch.Tensor:
    """In eval mode: merged equals unmerged (to rounding), and unmerging gives the same outputs bit
    for bit. Returns the unmerged outputs."""
    m.eval()
    with torch.no_grad():
        unmerged: torch.Tensor = m(x)
        m.merge()
        torch.testing.assert_close(m(x), unmerged, rtol=1e-5, atol=atol)
        m.unmerge()
        torch.testing.assert_close(m(x), unmerged, rtol=0, atol=0)
    return unmerged


def test_linear_formula_and_scales() -> None:
    net = nn.Sequential(nn.Linear(6, 5))
    x = torch.randn(3, 6)
    for kwargs, scale in [({"r": 2, "alpha": 6}, 3.0), ({"r": 4, "alpha": 6, "rslora": True}, 3.0)]:
        m = peftkit.wrap(net, "lora", targets=["0"], init=False, **kwargs)
        a = _lora(m)
        expected = F.linear(x, net[0].weight, net[0].bias) + scale * x @ a.lora_A.T @ a.lora_B.T
        torch.testing.assert_close(m(x), expected)  # output form (autograd on)
        with torch.no_grad():
            torch.testing.assert_close(m(x), expected)  # weight form
        m.unwrap()


def test_default_init_is_kaiming_a_and_zero_b() -> None:
    m = peftkit.wrap(nn.Sequential(nn.Linear(64, 32)), "lora", targets=["0"], r=8)
    a = _lora(m)
    assert torch.count_nonzero(a.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) bound
    assert a.lora_A.abs().max() <= bound and a.lora_A.std() > bound / 4
    g = _lora(peftkit.wrap(nn.Sequential(nn.Linear(64, 32)), "lora", targets=["0"], r=8, init="gaussian"))
    torch.testing.assert_close(g.lora_A.std().item(), 1 / 8, rtol=0.15, atol=0)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv2d_formula_with_groups(groups: int) -> None:
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=groups)
    x = torch.randn(2, 8, 9, 9)
    base_out = conv(x).detach()  # before wrapping: the wrapped module itself applies the adapter
    m = peftkit.wrap(nn.Sequential(conv), "lora", targets=["0"], r=3, alpha=3, init=False)
    a = _lora(m)
    rank = groups * math.ceil(3 / groups)
    assert a.lora_A.shape == (rank, 8 // groups, 3, 3) and a.lora_B.shape == (12, rank // groups, 1, 1)
    h = F.conv2d(x, a.lora_A, stride=2, padding=1, groups=groups)
    expected = base_out + F.conv2d(h, a.lora_B, groups=groups)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 3, padding=1), nn.Conv3d(4, 6, 3, padding=1, padding_mode="circular")])
def test_conv1d_and_conv3d_weight_and_output_forms_agree(conv: nn.Module) -> None:
    x = torch.randn(2, 4, *([5] * (conv.weight.dim() - 2)))
    m = peftkit.wrap(nn.Sequential(conv), "lora", targets=["0"], r=2, init=False)
    out = m(x)
    with torch.no_grad():
        torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-5)
        m.merge()
        torch.testing.assert_close(m(x), out, rtol=1e-5, atol=1e-5)


def test_embedding_formula() -> None:
    emb = nn.Embedding(10, 6, padding_idx=0)
    ids = torch.tensor([[0, 3, 9], [1, 1, 2]])
    base_out = emb(ids).detach()
    m = peftkit.wrap(nn.Sequential(emb), "lora", targets=["0"], r=2, alpha=4, init=False)
    a = _lora(m)
    expected = base_out + 2.0 * (a.lora_A.T[ids] @ a.lora_B.T)
    torch.testing.assert_close(m(ids), expected)
    with torch.no_grad():
        torch.testing.assert_close(m(ids), expected)
    default = _lora(peftkit.wrap(nn.Sequential(nn.Embedding(10, 6)), "lora", targets=["0"]))
    assert torch.count_nonzero(default.lora_A) == 0  # A zero, B random: identity at init


@pytest.mark.parametrize("kdim", [None, 5])
def test_multihead_attention_in_proj_and_out_proj(kdim: int | None) -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
    q = torch.randn(2, 4, 8)
    kv = torch.randn(2, 4, kdim or 8)
    m = peftkit.wrap(mha, "lora", targets=[nn.MultiheadAttention], r=2, init=False, bias="lora_only")
    a = m.peft_adapters["default"].adapters[0]
    ref = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
    ref.load_state_dict(mha.state_dict())
    with torch.no_grad():
        for name, delta in a.delta(mha).items():
            owner, _, leaf = name.rpartition(".")
            tensor = getattr(ref.get_submodule(owner) if owner else ref, leaf)
            tensor.copy_(add_delta(tensor, delta))
        expected = ref(q, kv, kv)[0]
    torch.testing.assert_close(m(q, kv, kv)[0], expected, rtol=1e-5, atol=1e-5)  # training (autograd) path
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(q, kv, kv)[0], expected, rtol=1e-5, atol=1e-5)  # eval fast path
    m(q, kv, kv)[0].sum().backward()
    assert all(p.grad is not None for p in a.parameters())


def test_out_proj_alone_is_hosted_on_its_attention_module() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    q = torch.randn(2, 3, 8)
    m = peftkit.wrap(mha, "lora", targets=["out_proj"], r=2, init=False)
    out = m(q, q, q)[0]
    out.sum().backward()
    a = m.peft_adapters["default"].adapters[0]
    assert a.lora_A.grad is not None and a.lora_A.grad.abs().sum() > 0  # not a dead adapter
    with torch.no_grad():
        torch.testing.assert_close(m(q, q, q)[0], out, rtol=1e-5, atol=1e-5)


def _attention_calls(length: int, source: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(length, source, generator=g) > 0.6
    mask[:, 0] = False  # every query sees at least one key
    padding = torch.zeros(2, source, dtype=torch.bool)
    padding[0, -1] = True
    return {
        "no weights": {"need_weights": False},
        "weights (default)": {},
        "per-head weights": {"need_weights": True, "average_attn_weights": False},
        "bool mask": {"attn_mask": mask, "need_weights": False},
        "float 3-D mask": {"attn_mask": torch.randn(2 * 2, length, source, generator=g), "need_weights": False},
        "padding": {"key_padding_mask": padding, "need_weights": False},
        "padding and mask, weights": {"attn_mask": mask, "key_padding_mask": padding},
        "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(length)[:, :source], "is_causal": True,
                   "need_weights": False},
    }


@pytest.mark.parametrize("kind", ["self", "cross", "key and value apart"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("call", list(_attention_calls(4, 4)))
def test_attention_stand_in_equals_the_module_with_the_delta(kind: str, batch_first: bool, call: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """While training, LoRA computes the attention itself (both projections folded, no weight
    gradients): outputs, attention weights, the input gradients and the factors' gradients equal
    the module's own forward through ``W + delta`` with autograd."""
    from peftkit_plugins.lora import MultiheadAttentionLoRA

    length, source = 4, (4 if kind == "self" or call == "causal" else 6)
    kwargs = _attention_calls(length, source)[call]

    def run(stand_in: bool) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(3)
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        m = peftkit.wrap(mha, "lora", targets=[nn.MultiheadAttention], r=2, init=False, bias="lora_only")
        a = m.peft_adapters["default"].adapters[0]
        with torch.no_grad():
            a.in_proj.lora_bias.normal_()
        if not stand_in:
            monkeypatch.setattr(MultiheadAttentionLoRA, "stands_in", lambda *args: False)
        shape = (lambda t: (2, t, 8)) if batch_first else (lambda t: (t, 2, 8))
        x = torch.randn(shape(length), requires_grad=True)
        key = x if kind == "self" else torch.randn(shape(source), requires_grad=True)
        value = torch.randn(shape(source), requires_grad=True) if kind == "key and value apart" else key
        out, weights = m(x, key, value, **kwargs)
        monkeypatch.undo()
        assert ("LowRankGradient" in type(out.grad_fn).__name__) == stand_in
        loss = out.pow(2).sum() + (0 if weights is None else weights.pow(2).sum())
        loss.backward()
        grads = [t.grad for t in {id(t): t for t in (x, key, value)}.values()]
        return out, weights, *grads, *(p.grad for p in a.parameters())

    got, want = run(True), run(False)
    assert (got[1] is None) == ("need_weights" in kwargs and not kwargs["need_weights"])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_attention_stand_in_composes_with_a_second_active_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two active adapters on one attention module: the first stands in, reading the module's
    in-projection with the second's delta already substituted; gradients equal the weight form's."""
    from peftkit_plugins.lora import MultiheadAttentionLoRA

    def run(stand_in: bool) -> list[torch.Tensor]:
        torch.manual_seed(4)
        mha = nn.MultiheadAttention(8, 2, batch_first=True)
        m = peftkit.wrap(mha, "lora", targets=[nn.MultiheadAttention], r=2, init=False)
        m.add_adapter("second", "lora", targets=[nn.MultiheadAttention], r=3, init=False)
        m.set_adapter(["default", "second"])
        if not stand_in:
            monkeypatch.setattr(MultiheadAttentionLoRA, "stands_in", lambda *args: False)
        x = torch.randn(2, 4, 8)
        out = m(x, x, x, need_weights=False)[0]
        monkeypatch.undo()
        out.pow(2).sum().backward()
        return [out, *(p.grad for p in m.parameters() if p.requires_grad)]

    got, want = run(True), run(False)
    assert len(got) == 1 + 2 * 4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_attention_stand_in_is_training_only_and_leaves_with_the_adapter() -> None:
    """The stand-in takes attention calls while training; unbatched inputs and inference run the
    module itself. Deep copies and pickled copies train their own adapter; unwrap removes the
    instance forward."""
    import copy
    import pickle

    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    m = peftkit.wrap(nn.Sequential(mha), "lora", targets=[nn.MultiheadAttention], r=2, init=False)
    x = torch.randn(2, 3, 8)
    out = mha(x, x, x, need_weights=False)[0]
    assert "LowRankGradient" in type(out.grad_fn).__name__
    assert "LowRankGradient" not in type(mha(x[0], x[0], x[0])[0].grad_fn).__name__  # unbatched: the module
    with torch.no_grad():
        torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], out, rtol=1e-5, atol=1e-5)

    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):  # torch.save of a whole model pickles it
        twin_out = twin.base_model.get_submodule("0")(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(twin_out, out)
        twin_out.sum().backward()
        assert all(p.grad is not None for p in twin.parameters() if p.requires_grad)
        assert all(p.grad is None for p in m.parameters() if p.requires_grad)  # the original was not touched

    assert "forward" in vars(mha)
    m.unwrap()
    assert "forward" not in vars(mha)
    assert "LowRankGradient" not in type(mha(x, x, x)[0].grad_fn).__name__


def test_attention_stand_in_keeps_an_instance_forward_that_was_there() -> None:
    """A forward already replaced on the instance (as accelerate's hooks do) still runs on the
    calls the stand-in does not take, and is put back by unwrap."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    calls = []

    def theirs(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return type(mha).forward(mha, *args, **kwargs)

    mha.forward = theirs
    m = peftkit.wrap(nn.Sequential(mha), "lora", targets=[nn.MultiheadAttention], r=2)
    x = torch.randn(3, 8)
    mha(x, x, x)  # unbatched: not taken by the stand-in
    assert calls == [1]
    m.unwrap()
    assert mha.forward is theirs


class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D's layout (weight (in, out)), found by name
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def test_hf_conv1d_transposed_weight() -> None:
    net = nn.Sequential(Conv1D(5, 6))
    x = torch.randn(3, 6)
    m = peftkit.wrap(net, "lora", targets=["0"], r=2, init=False)
    a = _lora(m)
    expected = net[0].forward(x) + x @ a.lora_A.T @ a.lora_B.T * (8 / 2)
    torch.testing.assert_close(m(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected)


def test_bias_modes() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    only = peftkit.wrap(net, "lora", targets=["0"], bias="lora_only")
    assert [n for n, _ in only.peft_adapters.named_parameters()] == [
        "default.adapters.0.lora_A", "default.adapters.0.lora_B", "default.adapters.0.lora_bias"]
    only.unwrap()
    every = peftkit.wrap(net, "lora", targets=["0"], bias="all")
    assert every.peft_adapters["default"].paths == ["0", "1", "2"]  # LayerNorm and head get bias deltas
    x = torch.randn(3, 4)
    with torch.no_grad():
        for p in every.peft_adapters.parameters():
            p.add_(0.5)
        y = every(x)
        every.merge()
        torch.testing.assert_close(every(x), y)


def test_rank_and_alpha_patterns(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    m = peftkit.wrap(net, "lora", r=4, rank_pattern={"2": 2}, alpha_pattern={r"[02]": 16})
    a0, a2 = _lora(m, "0"), _lora(m, "2")
    assert a0.lora_A.shape[0] == 4 and a2.lora_A.shape[0] == 2
    assert a0.scale == 4.0 and a2.scale == 8.0
    assert m.peft_adapters["default"].paths == ["0", "2"]  # the output layer is not a default target
    path = peftkit.save(m, tmp_path / "p.safetensors")
    loaded = peftkit.load(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)), path)
    assert _lora(loaded, "2").lora_A.shape[0] == 2


def test_default_targets_skip_depthwise_convs_and_the_head() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1, groups=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    m = peftkit.wrap(net, "lora")
    assert m.peft_adapters["default"].paths == ["0", "2"]


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": 2.5}, {"alpha": -1}, {"dropout": 1.0}, {"init": "xavier"},
                                 {"bias": "some"}, {"rank_pattern": {"x": 0}}])
def test_bad_options_name_the_option(bad: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        peftkit.wrap(nn.Sequential(nn.Linear(2, 2)), "lora", targets=["0"], **bad)


def test_unsupported_module_named_explicitly() -> None:
    with pytest.raises(TargetError, match="LayerNorm"):
        peftkit.wrap(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), "lora", targets=["1"])


@pytest.mark.parametrize("layer", ["linear", "hf_conv1d", "trainable_base", "inplace_after", "permuted_after"])
def test_training_fold_gives_autograd_gradients(layer: str) -> None:
    """Training folds W + s*B@A in without autograd and adds the factors' gradients itself: output,
    input gradient and every trainable gradient equal autograd through the explicit formula."""
    torch.manual_seed(1)
    host = Conv1D(5, 6) if layer == "hf_conv1d" else nn.Linear(6, 5)

    def run(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = net(x)
        if layer == "inplace_after":
            y.mul_(2.0)  # the adapted output may be modified in place, as many models do
        if layer == "permuted_after":
            y = y.transpose(0, 1) * torch.arange(1.0, 4.0)[:, None, None]  # its gradient comes back permuted
        return y

    m = peftkit.wrap(nn.Sequential(host), "lora", targets=["0"], r=2, alpha=3, init=False, bias="lora_only")
    if layer == "trainable_base":
        host.weight.requires_grad_(True)  # a user unfreezing the base: its gradient must still flow
    a = _lora(m)
    with torch.no_grad():
        a.lora_bias.normal_()
    x = torch.randn(2, 3, 6, requires_grad=True)
    out = run(m, x)
    assert "LowRankGradient" in type(out.grad_fn).__name__ or layer in ("inplace_after", "permuted_after")
    out.pow(2).sum().backward()

    A, B, bias = (t.detach().clone().requires_grad_(True) for t in (a.lora_A, a.lora_B, a.lora_bias))
    W = host.weight.detach().clone().requires_grad_(layer == "trainable_base")
    x_ref = x.detach().clone().requires_grad_(True)
    base = x_ref @ W + host.bias if layer == "hf_conv1d" else F.linear(x_ref, W, host.bias)
    ref = base + 1.5 * (x_ref @ A.T) @ B.T + bias
    if layer == "inplace_after":
        ref = ref * 2.0
    if layer == "permuted_after":
        ref = ref.transpose(0, 1) * torch.arange(1.0, 4.0)[:, None, None]
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for got, want in ((a.lora_A, A), (a.lora_B, B), (a.lora_bias, bias)):
        torch.testing.assert_close(got.grad, want.grad)
    if layer == "trainable_base":
        torch.testing.assert_close(host.weight.grad, W.grad)


@pytest.mark.parametrize(("tokens", "folds"), [(1, False), (49, False), (50, True), (400, True)])
def test_linear_folds_only_for_calls_with_enough_tokens(tokens: int, folds: bool) -> None:
    """The fold keeps W + s*B@A for the backward: a Linear folds only when the call has at least
    in*out/(in + out) tokens (there the fold is the cheaper form and the folded weight is no larger
    than the call's activations); fewer tokens train in output space and keep no weight-sized tensor.
    Both forms give the same output and gradients."""
    torch.manual_seed(0)
    layer = nn.Linear(100, 100)  # threshold: 100 * 100 / 200 = 50 tokens
    m = peftkit.wrap(nn.Sequential(layer), "lora", targets=["0"], r=2, init=False)
    x = torch.randn(tokens, 100, requires_grad=True)
    copies: list[torch.Tensor] = []  # weight-sized tensors kept for the backward other than the layer's own weight
    weight = layer.weight  # the layer's own (a fold substitutes another during the call)

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == weight.numel() and t.untyped_storage().data_ptr() != weight.data_ptr():
            copies.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = m(x)
    assert ("LowRankGradient" in type(out.grad_fn).__name__) == folds
    assert bool(copies) == folds
    out.pow(2).sum().backward()

    a = _lora(m)
    A, B = (t.detach().clone().requires_grad_(True) for t in (a.lora_A, a.lora_B))
    x_ref = x.detach().clone().requires_grad_(True)
    ref = F.linear(x_ref, layer.weight, layer.bias) + a.scale * (x_ref @ A.T) @ B.T
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in ((x, x_ref), (a.lora_A, A), (a.lora_B, B)):  # the fold sums in another order
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


def test_fold_gradient_hands_on_a_contiguous_gradient() -> None:
    """A permuted output gradient is copied once by the fold's backward, and the copy is what the
    Linear's own backward receives, so it does not copy it again (a value projection's gradient comes
    back from attention permuted)."""
    from peftkit_plugins.lora import _LowRankGradient

    torch.manual_seed(0)
    x, A, B = torch.randn(4, 3, 6), torch.randn(2, 6, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    y = torch.randn(4, 3, 5, requires_grad=True)
    seen = []
    y.register_hook(seen.append)
    g = torch.randn(3, 4, 5).transpose(0, 1)  # (4, 3, 5), not contiguous
    _LowRankGradient.apply(y, x, A, B, None, 0.5).backward(g)
    assert seen[0].is_contiguous()
    torch.testing.assert_close(seen[0], g)
    torch.testing.assert_close(B.grad, 0.5 * g.reshape(-1, 5).T @ (x.reshape(-1, 6) @ A.detach().T))
    torch.testing.assert_close(A.grad, 0.5 * (g.reshape(-1, 5) @ B.detach()).T @ x.reshape(-1, 6))


def test_dropout_trains_in_output_space() -> None:
    m = peftkit.wrap(nn.Sequential(nn.Linear(6, 5)), "lora", targets=["0"], r=2, dropout=0.5)
    out = m(torch.randn(3, 6))
    assert "LowRankGradient" not in type(out.grad_fn).__name__  # dropout(x) has no weight-space form
    out.sum().backward()
    assert _lora(m).lora_A.grad is not None


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("nd", [1, 2])
def test_conv_training_fold_gives_autograd_gradients(groups: int, nd: int) -> None:
    conv = (nn.Conv1d if nd == 1 else nn.Conv2d)(128, 8, 3, stride=2, padding=1, groups=groups)
    m = peftkit.wrap(nn.Sequential(conv), "lora", targets=["0"], r=4, alpha=2, init=False, bias="lora_only")
    a = _lora(m)
    with torch.no_grad():
        a.lora_bias.normal_()
    x = torch.randn(2, 128, *([7] * nd), requires_grad=True)
    out = m(x)
    assert "LowRankGradient" in type(out.grad_fn).__name__
    out.pow(2).sum().backward()

    A, B, bias = (t.detach().clone().requires_grad_(True) for t in (a.lora_A, a.lora_B, a.lora_bias))
    x_ref = x.detach().clone().requires_grad_(True)
    fn = F.conv1d if nd == 1 else F.conv2d
    h = fn(x_ref, A, stride=2, padding=1, groups=groups)
    ref = conv._conv_forward(x_ref, conv.weight, conv.bias) + 0.5 * fn(h, B, groups=groups)
    ref = ref + bias.view(-1, *([1] * nd))
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in ((x, x_ref), (a.lora_A, A), (a.lora_B, B), (a.lora_bias, bias)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv2d(64, 8, 1), nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.Conv2d(32, 8, 3),
                                  nn.Conv2d(64, 8, 3, padding="same"), nn.Conv2d(64, 8, 3, padding_mode="circular")])
def test_convs_without_a_cheaper_fold_train_in_weight_space(conv: nn.Module) -> None:
    m = peftkit.wrap(nn.Sequential(conv), "lora", targets=["0"], r=2, init=False)
    x = torch.randn(2, conv.in_channels, 9, 9)
    out = m(x)
    assert "LowRankGradient" not in type(out.grad_fn).__name__
    out.sum().backward()
    assert _lora(m).lora_A.grad is not None


def test_training_fold_under_autocast_gives_float32_gradients() -> None:
    """Under bf16 autocast the folded layers run in bf16, and the factors' gradients stay close to
    the float32 ones, in float32."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 16, 16), nn.ReLU(), nn.Linear(16, 4))
    m = peftkit.wrap(net, "lora", r=4, init=False, targets=["0", "2"])
    x = torch.randn(16, 64, 4, 4)  # 16 rows: enough for the Linear (1024 -> 16) to fold
    seen = []
    for layer in (net[0], net[2]):  # registered after peftkit's hooks: sees the adapted output
        layer.register_forward_hook(lambda mod, args, out: seen.append(type(out.grad_fn).__name__))

    def grads(autocast: bool) -> list[torch.Tensor]:
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(x)
        assert all("LowRankGradient" in name for name in seen) and len(seen) == 2
        seen.clear()
        out.float().pow(2).sum().backward()
        return [p.grad.clone() for p in m.parameters() if p.requires_grad]

    full, mixed = grads(False), grads(True)
    for f, b in zip(full, mixed, strict=True):
        assert b.dtype == torch.float32
        assert (b - f).norm() <= 0.05 * f.norm()


# -- recurrent layers -------------------------------------------------------------------------------

class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase], **options: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.rnn = kind(6, 8, batch_first=True, **options)
        width = (self.rnn.proj_size or 8) * (2 if self.rnn.bidirectional else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.rnn(self.emb(x))[0].mean(1))  # every step: every weight gets a gradient
        return out


def _reference(m: peftkit.AdaptedModel, rnn: nn.RNNBase, adapter: nn.Module,
               x: torch.Tensor | nn.utils.rnn.PackedSequence) -> Any:
    """The recurrent layer run with W + s B A written out, through torch.func.functional_call (with
    the adapters disabled, so that the layer's own hooks add nothing)."""
    params = dict(rnn.named_parameters())
    for name, part in adapter.parts.items():
        params[name] = params[name] + part.scale * part.lora_B @ part.lora_A
        if part.lora_bias is not None:
            params[name.replace("weight_ih", "bias_ih")] = params[name.replace("weight_ih", "bias_ih")] + part.lora_bias
    with m.disable_adapters():
        return torch.func.functional_call(rnn, params, (x,))[0]


RECURRENT = [(nn.LSTM, {"num_layers": 2, "bidirectional": True, "proj_size": 3}), (nn.LSTM, {}),
             (nn.GRU, {"num_layers": 2, "bidirectional": True}), (nn.RNN, {"nonlinearity": "relu"})]


@pytest.mark.parametrize(("kind", "options"), RECURRENT, ids=["lstm-proj-bi", "lstm", "gru-bi", "rnn"])
def test_recurrent_layers_every_weight_formula_merge_and_file(kind: type[nn.RNNBase], options: dict[str, object],
                                                              tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Recurrent(kind, **options)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 20, (4, 5))
    m = peftkit.wrap(model, "lora", r=2)
    assert m.peft_adapters["default"].paths == ["rnn"]  # a default target; the head is the output layer
    adapter = _lora(m, "rnn")
    names = [n for n, _ in model.rnn.named_parameters() if n.startswith("weight_")]
    assert sorted(adapter.parts) == sorted(names)  # every layer, direction, and the projection
    with torch.no_grad():
        m.eval()
        torch.testing.assert_close(m(x), model.head(_reference(m, model.rnn, adapter, model.emb(x)).mean(1)))
        with m.disable_adapters():
            base = m(x)
        torch.testing.assert_close(m(x), base, rtol=0, atol=0)  # identity at init: B = 0
        for part in adapter.parts.values():
            part.lora_B.normal_()
    m.train()
    out = m(x)
    torch.testing.assert_close(out, model.head(_reference(m, model.rnn, adapter, model.emb(x)).mean(1)))
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    for k, v in model.state_dict().items():  # frozen means frozen
        torch.testing.assert_close(v, frozen[k], rtol=0, atol=0)
    unmerged = _merge_round_trip(m, x)
    path = peftkit.save(m, tmp_path / "rnn.safetensors")
    torch.manual_seed(0)
    again = peftkit.load(_Recurrent(kind, **options), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), unmerged, rtol=0, atol=0)


def test_recurrent_bias_delta_and_packed_sequences() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, num_layers=2)
    m = peftkit.wrap(nn.Sequential(lstm), "lora", targets=[nn.LSTM], r=2, bias="lora_only", init=False)
    adapter = _lora(m, "0")
    with_bias = sorted(n for n, p in adapter.parts.items() if p.lora_bias is not None)
    assert with_bias == ["weight_ih_l0", "weight_ih_l1"]
    seqs = [torch.randn(5, 4), torch.randn(3, 4)]
    packed = nn.utils.rnn.pack_sequence(seqs)
    out = m(packed)[0]
    with m.disable_adapters():
        base = m(packed)[0]
    torch.testing.assert_close(out.data, _reference(m, lstm, adapter, packed).data)
    assert not torch.allclose(out.data, base.data)  # the bias and weight deltas apply to packed input too


# -- named parameters -------------------------------------------------------------------------------

class _Experts(nn.Module):
    """Stacked expert weights (n, in, out) read with bmm: no Linear anywhere."""

    def __init__(self, n: int = 4, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n, d, h) * 0.1)
        self.w2 = nn.Parameter(torch.randn(n, h, d) * 0.1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.bmm(torch.relu(torch.bmm(x[:, None], self.w1[idx])), self.w2[idx])[:, 0]


class _MatmulLayer(nn.Module):
    """A custom layer that keeps its own weight and calls torch.matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.T)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8) * 0.1)  # read by the root's own forward
        self.mine = _MatmulLayer()
        self.blocks = nn.ModuleList([_Experts() for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mine((x + self.pos_embed).mean(1))
        for block in self.blocks:
            h = h + block(h, torch.arange(h.shape[0]) % 4)
        out: torch.Tensor = self.head(h)
        return out


def _dense(part: nn.Module, scale: float) -> torch.Tensor:
    A, B = part.lora_A, part.lora_B
    return scale * (torch.bmm(B, A) if A.dim() == 3 else B @ A)


def test_named_parameters_formula_per_expert_merge_and_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _Custom()
    x = torch.randn(6, 5, 8)
    with torch.no_grad():
        base = net(x)
    m = peftkit.wrap(net, "lora", r=2, alpha=4, targets=["pos_embed", "mine.weight", "0.w1", "blocks.1.w2"])
    adapters = m.peft_adapters["default"]
    assert adapters.paths == ["", "mine", "blocks.0", "blocks.1"]  # each parameter's owner
    with torch.no_grad():
        torch.testing.assert_close(m(x), base, rtol=0, atol=0)  # identity at init
        for a in adapters.adapters:
            for part in a.parts.values():
                part.lora_B.normal_()
    w1 = _lora(m, "blocks.0").parts["w1"]
    assert w1.lora_A.shape == (4, 2, 16) and w1.lora_B.shape == (4, 8, 2)  # one (8 x 2)(2 x 16) pair per expert
    assert _lora(m, "").parts["pos_embed"].lora_A.shape == (1, 2, 8)
    # the reference: the same network with every parameter replaced by W + delta, adapters off
    params = dict(net.named_parameters())
    for path, name in (("", "pos_embed"), ("mine", "weight"), ("blocks.0", "w1"), ("blocks.1", "w2")):
        full = f"{path}.{name}" if path else name
        params[full] = params[full] + _dense(_lora(m, path).parts[name], 2.0)
    with m.disable_adapters():
        want = torch.func.functional_call(net, params, (x,))
    out = m(x)
    torch.testing.assert_close(out, want)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters() if p.requires_grad)
    assert all(p.grad is None for p in net.parameters())
    unmerged = _merge_round_trip(m, x)
    path = peftkit.save(m, tmp_path / "params.safetensors")
    assert peftkit.read_header(path).targets["blocks.0"]["spec"] == {"parameters": ["w1"]}
    torch.manual_seed(0)
    again = peftkit.load(_Custom(), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), unmerged, rtol=0, atol=0)


def test_named_parameters_on_a_timm_vit_beside_module_targets() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False).eval()
    x = torch.randn(1, 3, *vit.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        base = vit(x)
    m = peftkit.wrap(vit, "lora", r=2, targets=["pos_embed", "cls_token", "qkv"], init=False)
    paths = m.peft_adapters["default"].paths
    assert "" in paths and sorted(_lora(m, "").parts) == ["cls_token", "pos_embed"]
    assert all(p.endswith("attn.qkv") for p in paths if p) and len(paths) > 1
    with torch.no_grad():
        assert not torch.allclose(m(x), base)
        with m.disable_adapters():
            torch.testing.assert_close(m(x), base, rtol=0, atol=0)


def test_named_parameter_misuse_is_named() -> None:
    net = _Custom()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(TargetError, match=r"'w1' is the leaf name of parameters blocks\.0\.w1, blocks\.1\.w1"):
        peftkit.wrap(net, "lora", targets=["w1"])
    with pytest.raises(TargetError, match=r"cannot adapt: mine \(_MatmulLayer\).*name the parameters .*: mine\.weight"):
        peftkit.wrap(net, "lora", targets=["mine"])
    with pytest.raises(TargetError, match=r"parameter 'bias' of shape \(3,\).*2 or more dims"):
        peftkit.wrap(net, "lora", targets=["head.bias"])
    with pytest.raises(TargetError, match="select one or the other"):
        peftkit.wrap(net, "lora", targets=["head", "head.weight"])
    with pytest.raises(TargetError, match="trained whole"):
        peftkit.wrap(net, "lora", targets=["mine.weight"], train=["mine"])
    with pytest.raises(TargetError, match="'pos_embed' is a parameter, and 'fish' selects modules"):
        peftkit.wrap(net, "fish", targets=["pos_embed"], keep=0.1, data=[(torch.randn(2, 5, 8), torch.zeros(2).long())])
    assert not hasattr(net, "peft_adapters")
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("spec", [{"parameters": ["nope"]}, {"parameters": "w1"}, {"parameters": []},
                                  {"parameters": ["w1", 3]}])
def test_a_file_whose_parameter_spec_is_bad_is_refused_and_changes_nothing(spec: dict[str, object],
                                                                           tmp_path: Path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    path = peftkit.save(peftkit.wrap(_Custom(), "lora", targets=["0.w1"]), tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    table = json.loads(meta["peftkit.targets"])
    table["blocks.0"]["spec"] = spec
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={**meta, "peftkit.targets": json.dumps(table)})
    net = _Custom()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(peftkit.errors.PeftkitError, match="blocks.0|parameter"):
        peftkit.load(net, bad)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


# -- DoRA ---------------------------------------------------------------------------------------------

def _dora_weight(w: torch.Tensor, low_rank: torch.Tensor, magnitude: torch.Tensor, per_column: bool = False) -> torch.Tensor:
    """m * V / ||V|| with V = W + low_rank, written out: one norm per row (per column for an
    embedding and HF Conv1D), over every other dim; the norm without gradient."""
    v = w + low_rank
    if per_column:
        return v * (magnitude / v.detach().norm(dim=0))
    n = v.detach().flatten(1).norm(dim=1)
    return v * (magnitude / n).view(-1, *[1] * (v.dim() - 1))


class _DoraNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.lin = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2)
        out: torch.Tensor = self.head(torch.relu(self.lin(h)).mean(1))
        return out


def _low_rank_dense(module: nn.Module, a: nn.Module) -> torch.Tensor:
    """s B A in the layer's weight layout, written out per layer kind (grouped convs block-diagonal)."""
    if isinstance(module, nn.Embedding):
        return a.scale * (a.lora_B @ a.lora_A).T
    if isinstance(module, nn.Conv1d):
        g, r = module.groups, a.lora_A.shape[0]
        blocks = [a.lora_B[i * 8 // g:(i + 1) * 8 // g, :, 0] @ a.lora_A[i * r // g:(i + 1) * r // g].flatten(1)
                  for i in range(g)]
        return a.scale * torch.cat(blocks).view_as(module.weight)
    return a.scale * a.lora_B @ a.lora_A


@pytest.mark.parametrize("force_transform", [False, True], ids=["default-forms", "output-space"])
def test_dora_formula_and_gradients_on_linear_grouped_conv_and_embedding(force_transform: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = _DoraNet()
    x = torch.randint(0, 12, (4, 5))
    with torch.no_grad():
        base = net(x)
    m = peftkit.wrap(net, "lora", r=2, alpha=4, dora=True, targets=["emb", "conv", "lin"])
    ads = {p: _lora(m, p) for p in ("emb", "conv", "lin")}
    for name, a in ads.items():  # the magnitude starts as the base weight's norms
        module = net.get_submodule(name)
        want = module.weight.norm(dim=0) if name == "emb" else module.weight.flatten(1).norm(dim=1)
        torch.testing.assert_close(a.lora_magnitude, want)
    with torch.no_grad():
        torch.testing.assert_close(m(x), base)  # identity at init, to float rounding (m / ||W|| = 1)
        for a in ads.values():
            a.lora_B.normal_(0, 0.5)
            a.lora_magnitude.mul_(torch.rand_like(a.lora_magnitude) + 0.5)
    if force_transform:  # the output-space forms (taken with dropout) instead of the fold / weight space
        for cls in (type(ads["lin"]), type(ads["conv"])):
            monkeypatch.setattr(cls, "folds_in_training", lambda self, module, *call: False)
        monkeypatch.setattr(type(ads["conv"]), "train_in_weight_space", property(lambda self: False))

    def reference() -> torch.Tensor:
        params = dict(net.named_parameters())
        for name, a in ads.items():
            module = net.get_submodule(name)
            params[f"{name}.weight"] = _dora_weight(module.weight, _low_rank_dense(module, a), a.lora_magnitude,
                                                    per_column=name == "emb")
        with m.disable_adapters():
            out: torch.Tensor = torch.func.functional_call(net, params, (x,))
        return out

    m.train()
    out = m(x)
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad()
    want = reference()
    torch.testing.assert_close(out, want)
    want.square().sum().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, msg=n)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), want.detach())
        unmerged = m(x)
        m.merge()
        torch.testing.assert_close(m(x), unmerged, rtol=1e-5, atol=1e-6)
        m.unmerge()
        torch.testing.assert_close(m(x), unmerged, rtol=0, atol=0)


def test_dora_on_attention_recurrent_hf_conv1d_and_parameters(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.c1d = transformers.pytorch_utils.Conv1D(8, 8)
            self.experts = _Experts(2, 8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.attn(x, x, x, need_weights=False)[0]
            h = self.c1d(self.rnn(h)[0].contiguous()).mean(1)  # HF Conv1D views its input
            out: torch.Tensor = self.head(self.experts(h, torch.arange(h.shape[0]) % 2))
            return out

    net = Mixed()
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        base = net(x)
    m = peftkit.wrap(net, "lora", r=2, dora=True, targets=["attn", "rnn", "c1d", "experts.w1"])
    with torch.no_grad():
        torch.testing.assert_close(m(x), base)
        for p in m.peft_adapters.parameters():
            p.mul_(torch.rand_like(p) + 0.5) if p.dim() == 1 or "magnitude" in str(p.shape) else p.normal_(0, 0.3)
    mags = [n for n, _ in m.peft_adapters.named_parameters() if n.endswith("lora_magnitude")]
    assert len(mags) == 2 + 2 + 1 + 1  # in_proj and out_proj; GRU's two matrices; Conv1D; the experts
    assert _lora(m, "experts").parts["w1"].lora_magnitude.shape == (2, 8)  # per expert, per row
    out = m(x)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.peft_adapters.parameters())
    m.eval()
    with torch.no_grad():
        unmerged = m(x)
        m.merge()
        torch.testing.assert_close(m(x), unmerged, rtol=1e-5, atol=1e-5)
        m.unmerge()
    path = peftkit.save(m, tmp_path / "dora.safetensors")
    assert peftkit.read_header(path).config["dora"] is True
    torch.manual_seed(0)
    again = peftkit.load(Mixed(), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), unmerged, rtol=0, atol=0)


def test_several_dora_adapters_merge_to_what_they_compute_together() -> None:
    """PEFT merged several DoRA adapters one after another, each normalised against the weight the
    previous one had already changed (wrong by up to 14%); here every adapter's change is taken
    against the unmerged weights, as when they run unmerged."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    m = peftkit.wrap(net, "lora", r=2, dora=True, init=False, name="a")
    m.add_adapter("b", "lora", r=3, dora=True, init=False)
    m.set_adapter(["a", "b"])
    x = torch.randn(5, 8)
    m.eval()
    with torch.no_grad():
        together = m(x)
        m.merge()
        torch.testing.assert_close(m(x), together, rtol=1e-5, atol=1e-6)
        m.unmerge()
        torch.testing.assert_close(m(x), together, rtol=0, atol=0)


# -- PiSSA / OLoRA --------------------------------------------------------------------------------

class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.b(torch.relu(self.a(x)))))
        return out


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_train_like_peft_without_touching_the_backbone(init: str, tmp_path: Path) -> None:
    """PEFT starts these by rewriting the base weight into a residual; peftkit keeps the starting
    factors inside the adapter instead. Same factors, same outputs at every step, and the file is an
    ordinary LoRA that loads on the untouched backbone."""
    peft = pytest.importorskip("peft")
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    net = _TwoLayer()
    frozen = {k: v.clone() for k, v in net.state_dict().items()}
    ours = peftkit.wrap(net, "lora", r=2, alpha=4, init=init, targets=["a", "b"])
    theirs = peft.get_peft_model(_TwoLayer(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"],
                                                               init_lora_weights=init))
    for path in ("a", "b"):
        mine, layer = _lora(ours, path), theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(mine.lora_A, layer.lora_A["default"].weight)
        torch.testing.assert_close(mine.lora_B, layer.lora_B["default"].weight)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _TwoLayer()(x))  # identity at the start, to rounding
    opts = [torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1) for model in (ours, theirs)]
    for _ in range(3):
        for model, opt in zip((ours, theirs), opts, strict=True):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, frozen[k], rtol=0, atol=0)
    ours.eval()
    with torch.no_grad():
        want = ours(x)
    path = peftkit.save(ours, tmp_path / "p.safetensors")
    header = peftkit.read_header(path)
    assert header.config["r"] == 4 and header.config["init"] == "kaiming" and header.config["alpha"] == 8
    assert header.tensors["a.lora_A"][0] == [4, 16] and "a.lora_A0" not in header.tensors
    again = peftkit.load(_TwoLayer(), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
        ours.merge()
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)


def test_randomized_pissa_and_misuse() -> None:
    torch.manual_seed(0)
    net = _TwoLayer()
    with torch.no_grad():  # a weight with a clear rank-2 part, which a randomized SVD finds
        net.a.weight.copy_(torch.randn(12, 2) @ torch.randn(2, 16) + 0.01 * torch.randn(12, 16))
    m = peftkit.wrap(net, "lora", r=2, init="pissa_niter_4", targets=["a"])
    a = _lora(m, "a")
    u, s, vh = torch.linalg.svd(net.a.weight.detach())
    torch.testing.assert_close(a.scale * a.lora_B @ a.lora_A, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-3, atol=1e-3)
    m.unwrap()
    with pytest.raises(ConfigError, match="pissa_niter_K"):
        peftkit.wrap(net, "lora", init="pissa_niter_0")
    with pytest.raises(ConfigError, match="dora=True"):
        peftkit.wrap(net, "lora", init="olora", dora=True)
    with pytest.raises(TargetError, match=r"needs r <= 3"):
        peftkit.wrap(nn.Sequential(nn.Linear(8, 3), nn.Linear(3, 2)), "lora", r=4, init="pissa", targets=["0"])
    with pytest.raises(TargetError, match="Embedding: leave it out"):
        peftkit.wrap(nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2)), "lora", init="olora", targets=["0"])
    with pytest.raises(TargetError, match="grouped"):
        peftkit.wrap(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "lora", r=2, init="pissa", targets=["0"])
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in net.modules())


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_dora_fold_with_a_bias_delta_matches_the_reference(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3x3 conv over 64 channels, and a Linear, train DoRA in the fold form (the layer runs once with
    the folded weight; the adapter's gradients come from its input and output gradient), with a bias
    delta, also when the next layer changes the output in place."""
    torch.manual_seed(0)
    if kind == "conv":
        net = nn.Sequential(nn.Conv2d(64, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1))
        x = torch.randn(2, 64, 6, 6)
    else:
        net = nn.Sequential(nn.Linear(64, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))
        x = torch.randn(2, 5, 64)
    m = peftkit.wrap(net, "lora", r=2, alpha=4, dora=True, bias="lora_only", targets=["0"], init=False)
    a = _lora(m, "0")
    with torch.no_grad():
        a.lora_magnitude.mul_(torch.rand_like(a.lora_magnitude) + 0.5)
        a.lora_bias.normal_()
    assert a.folds_in_training(net[0])
    calls = []
    original = type(a).fold_gradient
    monkeypatch.setattr(type(a), "fold_gradient", lambda self, *args: calls.append(1) or original(self, *args))
    out = m(x)
    out.square().sum().backward()
    assert calls, "the fold form ran"
    got = {n: p.grad.clone() for n, p in a.named_parameters()}
    a.zero_grad()
    low_rank = a.scale * (a.lora_B.flatten(1) @ a.lora_A.flatten(1)).view_as(net[0].weight)
    params = {"0.weight": _dora_weight(net[0].weight, low_rank, a.lora_magnitude), "0.bias": net[0].bias + a.lora_bias}
    with m.disable_adapters():
        want = torch.func.functional_call(net, params, (x,))
    torch.testing.assert_close(out, want)
    want.square().sum().backward()
    for n, p in a.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=lambda msg, n=n: f"{n}: {msg}")
