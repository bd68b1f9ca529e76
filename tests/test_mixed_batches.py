"""Mixed-adapter batches: ``model(x, adapter_names=[...])`` gives every row what running it alone with
its adapter gives, for every built-in method and on real architectures, in inference and training;
misuse is refused before anything runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from architectures import build_or_skip, call, flatten
from torch import nn
from torch.utils import _pytree as pytree

import peftkit
from peftkit.errors import ConfigError, MergeError
from peftkit.method import Adapter

BASE = "__base__"


class Net(nn.Module):
    """Linear, norm and an output layer: every built-in method has something to adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(self.norm(torch.relu(self.fc1(x))))))


X = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(2))
# one adapter of every built-in method (and variants): name -> (method, options)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {"r": 2}),
    "lora_r4_bias": ("lora", {"r": 4, "bias": "all"}),
    "dora": ("lora", {"r": 3, "dora": True}),
    "pissa": ("lora", {"r": 2, "init": "pissa"}),
    "serial": ("serial_adapter", {}),
    "parallel": ("parallel_adapter", {}),
    "ia3": ("ia3", {}),
    "fish": ("fish", {"keep": 0.2, "data": [(X, Y)]}),
    "train_norm": ("lora", {"r": 2, "train": ["norm"]}),
    "head": ("last_layer", {"head": 4}),
}


def _randomise(m: peftkit.AdaptedModel, scale: float = 0.3) -> None:
    """Move every adapter away from its identity start, so that each row's adapter shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.peft_adapters.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _all_methods() -> peftkit.AdaptedModel:
    torch.manual_seed(0)
    m: peftkit.AdaptedModel | None = None
    for name, (method, options) in METHODS.items():
        if m is None:
            m = peftkit.wrap(Net(), method, name=name, **options)
        else:
            m.add_adapter(name, method, **options)
    assert m is not None
    _randomise(m)
    return m


def _rows_alone(m: peftkit.AdaptedModel, inputs: Any, names: list[str]) -> list[Any]:
    """Each row run alone with its adapter active (or none): what the mixed batch must give."""
    size = len(names)
    out = []
    active = m.active_adapters
    for i, name in enumerate(names):
        row = pytree.tree_map(lambda t, i=i: t[i:i + 1] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == size
                              else t, inputs)
        if name == BASE:
            with m.disable_adapters():
                out.append(call(m, row))
        else:
            m.set_adapter(name)
            out.append(call(m, row))
    m.set_adapter(active)
    return out


def _assert_rows(mixed: Any, alone: list[Any], size: int, tol: float = 1e-5) -> None:
    got = [t for t in flatten(mixed) if t.dim() and t.shape[0] == size]
    assert got, "the output has no tensor with one row per row of the batch"
    for j, t in enumerate(got):
        want = torch.cat([[u for u in flatten(a) if u.dim() and u.shape[0] == 1][j] for a in alone])
        torch.testing.assert_close(t, want, atol=tol, rtol=tol)


def test_every_method_gives_each_row_what_it_gives_alone() -> None:
    m = _all_methods().eval()
    names = [*METHODS, BASE, "lora"][:10]
    with torch.no_grad():
        before = {k: v.clone() for k, v in m.base_model.state_dict().items()}
        _assert_rows(m(X, adapter_names=names), _rows_alone(m, X, names), 10)
        for k, v in m.base_model.state_dict().items():  # nothing substituted was left behind
            assert torch.equal(v, before[k]), k


def test_rows_without_an_adapter_are_the_backbone_exactly() -> None:
    m = _all_methods().eval()
    names = ["lora", BASE, "fish", BASE, "serial", "ia3", BASE, "head", "dora", BASE]
    with torch.no_grad():
        y = m(X, adapter_names=names)
        with m.disable_adapters():
            y0 = m(X)
    base = torch.tensor([n == BASE for n in names])
    assert torch.equal(y[base], y0[base])
    assert not torch.allclose(y[~base], y0[~base])


@pytest.mark.parametrize("method", list(METHODS))
def test_training_gives_each_adapter_the_gradient_of_its_own_rows(method: str) -> None:
    """Several users' adapters trained in one batch: each adapter's gradient is the sum of its rows'
    gradients run alone; an adapter with no row in the batch gets none."""
    m = _all_methods().train()
    other = "lora" if method != "lora" else "ia3"
    names = [method, other, BASE, method, other, method, BASE, other, method, BASE]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    m.set_adapter([method, other])  # both trainable
    m.zero_grad()
    loss_fn(m(X, adapter_names=names), Y).backward()
    mixed = {n: p.grad.clone() for n, p in m.peft_adapters.named_parameters() if p.grad is not None}
    assert any(k.startswith(f"{method}.") for k in mixed) and any(k.startswith(f"{other}.") for k in mixed)
    assert all(k.split(".")[0] in (method, other) for k in mixed), sorted(mixed)

    m.zero_grad()
    for i, name in enumerate(names):
        if name != BASE:
            m.set_adapter(name)
            loss_fn(m(X[i:i + 1]), Y[i:i + 1]).backward()
    alone = {n: p.grad for n, p in m.peft_adapters.named_parameters() if p.grad is not None}
    assert mixed.keys() == alone.keys()
    for k in mixed:
        torch.testing.assert_close(mixed[k], alone[k], atol=1e-5, rtol=1e-4, msg=lambda s, k=k: f"{k}: {s}")


def test_lora_rows_are_batched_in_one_computation_equal_to_each_adapters_own() -> None:
    """LoRA's batched form (factors gathered per row) against LoRA's transform on each adapter's rows:
    different ranks, a PiSSA start (twice the rank shipped), DoRA and bias deltas in one batch."""
    m = _all_methods().eval()
    names = ["lora", "lora_r4_bias", "dora", "pissa", BASE, "dora", "pissa", "lora", "lora_r4_bias", BASE]
    calls = []
    lora_cls = type(dict(m.get_adapter("lora").modules.items())["fc1"])
    real = lora_cls.transform_rows.__func__  # type: ignore[attr-defined]

    def spy(cls: type[Adapter], *args: Any) -> Any:
        calls.append(len(args[4]))
        return real(cls, *args)

    with torch.no_grad():
        batched = m(X, adapter_names=names)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lora_cls, "transform_rows", classmethod(spy))
            m(X, adapter_names=names)
            assert calls and max(calls) == 4  # the four LoRA adapters of a layer in one call
            mp.setattr(lora_cls, "transform_rows", classmethod(lambda cls, *a: NotImplemented))
            looped = m(X, adapter_names=names)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    _assert_rows(batched, _rows_alone(m, X, names), 10)


ARCHITECTURES = ["bert", "gpt2", "llama", "t5", "whisper", "resnet18", "swin", "timm_vit", "convnext", "lstm", "gru",
                 "conv1d", "padded_encoder"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_real_architectures(arch: str) -> None:
    a, model = build_or_skip(arch)
    inputs = a.input()
    size = next(t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)).shape[0]
    m = peftkit.wrap(model, "lora", r=2, name="a")
    m.add_adapter("b", "lora", r=3)
    m.add_adapter("c", "parallel_adapter")
    _randomise(m, 0.05)
    names = ["b", "a", "c", BASE][:size] if size > 2 else ["b", "c"]
    with torch.no_grad():
        _assert_rows(_call_with_names(m, inputs, names), _rows_alone(m, inputs, names), size, tol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "conv1d", "bert"])
def test_lora_alone_every_row_with_its_own_adapter(arch: str) -> None:
    """Every row with a LoRA adapter of its own (LoRA's batched form on every row, no base row)."""
    a, model = build_or_skip(arch)
    inputs = a.input()
    m = peftkit.wrap(model, "lora", r=2, name="a")
    m.add_adapter("b", "lora", r=5, alpha=3)
    _randomise(m, 0.05)
    with torch.no_grad():
        _assert_rows(_call_with_names(m, inputs, ["b", "a"]), _rows_alone(m, inputs, ["b", "a"]), 2, tol=1e-4)


def _call_with_names(m: nn.Module, inputs: Any, names: list[str]) -> Any:
    if isinstance(inputs, dict):
        return m(**inputs, adapter_names=names)
    return m(*inputs, adapter_names=names) if isinstance(inputs, tuple) else m(inputs, adapter_names=names)


def test_one_adapter_for_every_row_is_an_ordinary_call_and_no_adapter_the_backbone() -> None:
    m = _all_methods().eval()
    with torch.no_grad():
        m.set_adapter("dora")
        torch.testing.assert_close(m(X, adapter_names=["dora"] * 10), m(X), atol=0, rtol=0)
        with m.disable_adapters():
            y0 = m(X)
        assert torch.equal(m(X, adapter_names=[BASE] * 10), y0)
    assert m.active_adapters == ["dora"]


class Query(nn.Module):
    """A learned query shared by every row (one row, broadcast): not a per-row computation."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 8))
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x * self.proj(self.query))


class SelfAttention(nn.Module):
    """nn.MultiheadAttention as PyTorch builds it by default: (length, batch, width)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x)[0]


def test_misuse_is_refused_before_anything_runs() -> None:
    m = _all_methods().eval()
    m.set_adapter("lora")
    with torch.no_grad():
        y = m(X)
        for names, match in [(["lora"] * 9, "9 names for an input of shape \\(10, 8\\)"), (["nope"] * 10, "does not hold"),
                             ("lora", "one adapter name per row"), ([], "one adapter name per row"),
                             ([1] * 10, "does not hold")]:
            with pytest.raises(ConfigError, match=match):
                m(X, adapter_names=names)
        with pytest.raises(ConfigError, match="adapter_names' word"):
            m.add_adapter(BASE, "lora", r=2)
        with m.disable_adapters(), pytest.raises(ConfigError, match="disable_adapters"):
            m(X, adapter_names=["lora"] * 10)
        m.merge()
        with pytest.raises(MergeError, match="unmerge"):
            m(X, adapter_names=["lora", BASE] * 5)
        m.unmerge()
        torch.testing.assert_close(m(X), y, atol=0, rtol=0)
    assert m.active_adapters == ["lora"]


def test_modules_that_do_not_run_per_row_are_refused_by_name() -> None:
    torch.manual_seed(0)
    m = peftkit.wrap(Query(), "lora", r=2, targets=["proj"], name="a")
    m.add_adapter("b", "lora", r=2, targets=["proj"])
    with pytest.raises(ConfigError, match="'proj'.*first dimension"):
        m(torch.randn(3, 8), adapter_names=["a", "b", BASE])
    m = peftkit.wrap(SelfAttention(), "lora", r=2, name="a")
    m.add_adapter("b", "lora", r=2)
    with pytest.raises(ConfigError, match="batch_first=False"):
        m(torch.randn(5, 3, 8), adapter_names=["a", "b", BASE])


def test_heads_of_different_widths_cannot_share_a_batch() -> None:
    torch.manual_seed(0)
    m = peftkit.wrap(Net(), "last_layer", head=4, name="four")
    m.add_adapter("three", "last_layer", head=3)
    with pytest.raises(ConfigError, match="heads with different numbers of outputs"):
        m(X[:2], adapter_names=["four", "three"])
    m.add_adapter("also_four", "last_layer", head=4)
    _randomise(m)
    names = ["four", "also_four", BASE, "four"]
    with torch.no_grad():
        _assert_rows(m(X[:4], adapter_names=names), _rows_alone(m, X[:4], names), 4)


def test_the_model_is_as_it_was_after_a_refused_call() -> None:
    m = _all_methods().eval()
    m.set_adapter(["lora", "ia3"])
    with torch.no_grad():
        y = m(X)
        with pytest.raises(ConfigError):
            m(X, adapter_names=["lora"] * 3)
        torch.testing.assert_close(m(X), y, atol=0, rtol=0)
    assert m.active_adapters == ["lora", "ia3"]


def test_a_batch_as_long_as_its_sequences_is_refused_not_split_by_position() -> None:
    """Token ids of shape (4, 4): inside the model a (positions x positions) tensor (T5's position
    bias, a shared mask) would look like the batch. Refused; one more row makes it unambiguous."""
    a, model = build_or_skip("t5")
    m = peftkit.wrap(model, "lora", r=2, name="a")  # LoRA's defaults include T5's position-bias Embedding
    m.add_adapter("b", "lora", r=2)
    _randomise(m, 0.05)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 64, (4, 4), generator=g), "decoder_input_ids": torch.randint(0, 64, (4, 3), generator=g)}
    with torch.no_grad(), pytest.raises(ConfigError, match="sequence of 4 positions"):
        m(**inputs, adapter_names=["a", "b", "a", BASE])
    inputs = {k: torch.cat([v, v[:1]]) for k, v in inputs.items()}
    names = ["a", "b", "a", BASE, "b"]
    with torch.no_grad():
        _assert_rows(_call_with_names(m, inputs, names), _rows_alone(m, inputs, names), 5, tol=1e-4)
    images = torch.randn(3, 3, 32, 32)  # three rows of three channels: images are not sequences
    _, resnet = build_or_skip("resnet18")
    r = peftkit.wrap(resnet, "lora", r=2, name="a")
    r.add_adapter("b", "lora", r=2)
    with torch.no_grad():
        assert r(images, adapter_names=["a", "b", BASE]).shape[0] == 3


def test_layers_inside_a_batch_second_transformer_are_refused() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 1).eval()  # batch_first=False
    m = peftkit.wrap(encoder, "lora", r=2, targets=["linear1"], name="a")
    m.add_adapter("b", "lora", r=2, targets=["linear1"])
    with torch.no_grad(), pytest.raises(ConfigError, match="second dimension"):
        m(torch.randn(5, 4, 16), adapter_names=["a", "b", "a", BASE])
    with torch.no_grad(), pytest.raises(ConfigError, match="second dimension|sequence of 4 positions"):
        m(torch.randn(4, 4, 16), adapter_names=["a", "b", "a", BASE])  # the sequence as long as the batch


def test_a_module_rerun_with_a_key_value_cache_is_refused_and_runs_without_one() -> None:
    a, model = build_or_skip("llama")
    m = peftkit.wrap(model, "lora", r=2, train=["model.layers.0.self_attn"], name="a")
    m.add_adapter("b", "lora", r=2)
    _randomise(m, 0.05)
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with pytest.raises(ConfigError, match="use_cache=False"):
            m(input_ids=ids, adapter_names=["a", "b", BASE], use_cache=True)
        names = ["a", "b", BASE]
        got = m(input_ids=ids, adapter_names=names, use_cache=False).logits
        want = torch.cat([o.logits for o in _rows_alone(m, {"input_ids": ids, "use_cache": False}, names)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.reentrant = reentrant

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)))


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_cannot_recompute_a_mixed_batch_silently(reentrant: bool) -> None:
    """The backward pass recomputes the checkpointed layers after the call's rows are forgotten: it is
    refused there (it gave wrong gradients); a plain call afterwards trains as before."""
    torch.manual_seed(0)
    m = peftkit.wrap(Checkpointed(reentrant), "lora", r=2, targets=["fc1", "fc2"], name="a")
    m.add_adapter("b", "lora", r=2, targets=["fc1", "fc2"])
    _randomise(m)
    m.set_adapter(["a", "b"])
    m.train()
    x = torch.randn(4, 8, requires_grad=reentrant)
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        m(x, adapter_names=["a", "b", "a", BASE]).sum().backward()
    m.zero_grad()
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.peft_adapters.parameters())
    with torch.no_grad():  # inference with adapter_names does not stop later training
        m(x, adapter_names=["a", "b", "a", BASE])
    m(x).sum().backward()


def test_lora_dropout_stays_off_without_autograd_as_in_an_ordinary_call() -> None:
    torch.manual_seed(0)
    m = peftkit.wrap(Net(), "lora", r=2, dropout=0.5, name="a")
    m.add_adapter("b", "lora", r=3, dropout=0.5, targets=[nn.Linear])
    _randomise(m)
    m.train()  # a model left in training mode, called under no_grad (a server)
    names = ["a", "b", BASE, "a", "b", "b", "a", BASE, "a", "b"]
    with torch.no_grad():
        first = m(X, adapter_names=names)
        torch.testing.assert_close(m(X, adapter_names=names), first, atol=0, rtol=0)
        _assert_rows(first, _rows_alone(m, X, names), 10)


def test_generation_continues_each_row_with_its_own_adapter() -> None:
    _, model = build_or_skip("llama")
    m = peftkit.wrap(model, "lora", r=2, name="a")
    m.add_adapter("b", "lora", r=3)
    _randomise(m)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", BASE]
    out = m.generate(ids, adapter_names=names, max_new_tokens=4, do_sample=False)
    alone = []
    for i, name in enumerate(names):
        if name == BASE:
            with m.disable_adapters():
                alone.append(m.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False))
        else:
            m.set_adapter(name)
            alone.append(m.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False))
    assert torch.equal(out, torch.cat(alone))
    assert len(set(map(tuple, out[:, 5:].tolist()))) > 1  # the adapters do change what is generated


def test_a_transformers_model_with_gradient_checkpointing_is_refused_up_front() -> None:
    _, model = build_or_skip("bert")
    model.gradient_checkpointing_enable()
    m = peftkit.wrap(model, "lora", r=2, name="a")
    m.add_adapter("b", "lora", r=2)
    m.set_adapter(["a", "b"])
    m.train()
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ConfigError, match="gradient_checkpointing_disable"):
        m(input_ids=ids, adapter_names=["a", "b", BASE])
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    with torch.no_grad():  # inference recomputes nothing: allowed
        m(input_ids=ids, adapter_names=["a", "b", BASE])
