"""AdaptedModel behaviour: freezing, BatchNorm, adapters' lifecycle, merge safety, errors."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import TinyCNN, TinyTransformer, assert_bitwise_equal, snapshot, tiny_mlp
from torch import nn

import peftkit
from peftkit.errors import ConfigError, MergeError, TargetError, UnknownAdapterError, UnknownMethodError


class SerialScale(peftkit.Adapter):
    """An output-only adapter (no weight-space form), for testing refusal to merge."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.5))

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return output * (1 + self.s)


class OutputOnly(peftkit.Method):
    """Scale a module's output (test method)."""

    name = "output_only"

    from dataclasses import dataclass as _dc

    @_dc(frozen=True)
    class Config:
        pass

    def build(self, path: str, module: nn.Module) -> peftkit.Adapter:
        return SerialScale(module)


class OutputOnlyPlugin:
    @peftkit.hookimpl
    def register_methods(self, register: Any) -> None:
        register(OutputOnly)


def test_backbone_is_frozen_and_module_tree_unchanged() -> None:
    torch.manual_seed(0)
    cnn = TinyCNN()
    tree = [(n, type(m)) for n, m in cnn.named_modules()]
    m = peftkit.wrap(cnn, "lora", r=2)
    assert not any(p.requires_grad for p in cnn.parameters())
    assert [(n, type(mod)) for n, mod in cnn.named_modules()] == tree
    assert m.trainable_parameters() == sum(p.numel() for p in m.peft_adapters.parameters())
    assert "trainable" in m.summary() and "lora" in m.summary()


@pytest.mark.parametrize("training", [False, True])
def test_wrap_and_load_keep_the_backbones_mode(training: bool, tmp_path) -> None:
    """A backbone wrapped (or loaded onto) in eval mode gives an AdaptedModel in eval mode, adapters,
    heads and trained copies included: their dropout and norms do not act until train()."""
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).train(training)

    m = peftkit.wrap(build(), "lora", r=2, dropout=0.5, targets=["0"], train=["1"], heads={"a": 4})
    assert m.training is training
    assert {mod.training for mod in m.modules()} == {training}
    path = peftkit.save(m, tmp_path / "a.safetensors")
    loaded = peftkit.load(build(), path)
    assert {mod.training for mod in loaded.modules()} == {training}
    x = torch.randn(5, 6)
    if not training:  # deterministic with autograd on: the dropout is off
        torch.testing.assert_close(m(x)["a"], m(x)["a"])
    m.train()
    assert all(mod.training for mod in m.modules() if mod is not m.base_model[1])  # a frozen norm stays in eval
    m.eval()
    assert not any(mod.training for mod in m.modules())


def test_frozen_batchnorm_statistics_do_not_drift() -> None:
    torch.manual_seed(0)
    cnn = TinyCNN()
    stats = snapshot(cnn)
    m = peftkit.wrap(cnn, "lora", r=2).train()
    cnn.train()  # even when the user flips the backbone itself back to training mode
    for _ in range(3):
        m(torch.randn(4, 3, 8, 8)).sum().backward()
    assert_bitwise_equal(snapshot(cnn), stats)
    assert not cnn.bn1.training


def test_train_module_batchnorm_trains_and_its_statistics_are_saved(tmp_path) -> None:
    torch.manual_seed(0)
    cnn = TinyCNN()
    stats = snapshot(cnn)
    m = peftkit.wrap(cnn, "lora", r=2, train=["bn2"]).train()
    for _ in range(2):
        m(torch.randn(4, 3, 8, 8)).sum().backward()
    assert_bitwise_equal(snapshot(cnn), stats)  # the backbone's own bn2 is untouched
    copy = m.peft_adapters["default"].copies[0]
    assert copy.num_batches_tracked.item() == 2 and not torch.equal(copy.running_mean, cnn.bn2.running_mean)
    path = peftkit.save(m, tmp_path / "bn.safetensors")
    assert "bn2.running_mean" in peftkit.read_header(path).tensors


def test_merge_refuses_nan_and_changes_nothing() -> None:
    net = tiny_mlp()
    before = snapshot(net)
    m = peftkit.wrap(net, "lora", r=2, init=False)
    with torch.no_grad():
        m.peft_adapters["default"].adapters[1].lora_B[0, 0] = float("inf")
    with pytest.raises(MergeError, match="NaN/inf"):
        m.merge()
    assert_bitwise_equal(snapshot(net), before)
    assert not m.merged


def test_unmergeable_adapter(register_plugin) -> None:
    register_plugin(OutputOnlyPlugin(), "test-output-only")
    net = tiny_mlp()
    before = snapshot(net)
    x = torch.randn(3, 8)
    base = net(x).detach()
    m = peftkit.wrap(net, "output_only", targets=["4"])
    torch.testing.assert_close(m(x), base * 1.5)
    with pytest.raises(MergeError, match="cannot be merged"):
        m.merge()
    with pytest.raises(MergeError):
        m.unwrap(merge=True)
    assert_bitwise_equal(snapshot(net), before)
    assert m.unwrap(merge=False) is net


def test_transform_only_adapter_on_a_module_its_parent_reads_directly_is_refused(register_plugin) -> None:
    register_plugin(OutputOnlyPlugin(), "test-output-only")
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TargetError, match="reads its weights directly"):
        peftkit.wrap(mha, "output_only", targets=["0.out_proj"])


def test_unmerge_is_exact_even_after_the_adapter_changed() -> None:
    net = tiny_mlp()
    before = snapshot(net)
    m = peftkit.wrap(net, "lora", r=2, init=False)
    m.merge()
    with torch.no_grad():
        m.peft_adapters["default"].adapters[0].lora_B.add_(1.0)
    m.unmerge()
    assert_bitwise_equal(snapshot(net), before)


def test_adapter_name_errors() -> None:
    m = peftkit.wrap(tiny_mlp(), "lora", r=2)
    with pytest.raises(UnknownAdapterError, match="default"):
        m.set_adapter("nope")
    with pytest.raises(UnknownAdapterError, match="already exists"):
        m.add_adapter("default", "lora")
    with pytest.raises(ConfigError, match="not valid"):
        m.add_adapter("a.b", "lora")
    with pytest.raises(ConfigError, match="already an AdaptedModel"):
        peftkit.wrap(m, "lora")


def test_unknown_method_lists_available() -> None:
    with pytest.raises(UnknownMethodError, match="available: .*lora"):
        peftkit.wrap(tiny_mlp(), "loar")


def test_unknown_and_misspelled_options() -> None:
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        peftkit.wrap(tiny_mlp(), "lora", alhpa=4)


def test_targets_matching_nothing_lists_nearest_names() -> None:
    with pytest.raises(TargetError, match="Nearest module names: .*linear1"):
        peftkit.wrap(TinyTransformer(), "lora", targets=["linear_1"])


def test_unwrapped_model_cannot_be_used() -> None:
    m = peftkit.wrap(tiny_mlp(), "lora", r=2)
    m.unwrap()
    with pytest.raises(ConfigError, match="unwrapped"):
        m(torch.randn(2, 8))


def test_attributes_fall_through_to_the_backbone() -> None:
    cnn = TinyCNN()
    cnn.config = {"name": "tiny"}
    assert peftkit.wrap(cnn, "lora").config == {"name": "tiny"}


def test_target_selectors() -> None:
    tr = TinyTransformer()
    from peftkit.targets import select_modules

    assert select_modules(tr, ["linear1"]) == ["layer.linear1"]
    assert select_modules(tr, [r"layer\.linear\d"]) == ["layer.linear1", "layer.linear2"]
    assert select_modules(tr, [nn.Embedding]) == ["embed"]
    assert select_modules(tr, lambda p, m: p.endswith("norm1")) == ["layer.norm1"]
    assert select_modules(tr, [nn.Linear], exclude=["layer"]) == ["head"]


def test_exclude_with_default_targets() -> None:
    m = peftkit.wrap(TinyTransformer(), "lora", exclude=["linear2"])
    assert m.peft_adapters["default"].paths == ["layer.self_attn", "layer.linear1"]


def test_dead_adapter_warning() -> None:
    class Sneaky(nn.Module):  # reads its child's weight through a helper the source check cannot see
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, *_weights(self))

    def _weights(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return mod.inner.weight, mod.inner.bias

    m = peftkit.wrap(nn.Sequential(Sneaky(), nn.Linear(4, 2)), "lora", targets=["inner"]).train()
    with pytest.warns(RuntimeWarning, match="never ran"):
        m(torch.randn(2, 4))


def test_inference_cache_follows_every_change() -> None:
    torch.manual_seed(0)
    net = tiny_mlp()
    x = torch.randn(3, 8)
    m = peftkit.wrap(net, "lora", r=2, init=False).eval()
    lora = m.peft_adapters["default"].adapters[0]

    def reference() -> torch.Tensor:  # the adapted function computed from scratch
        with torch.no_grad():
            h = torch.relu(net[0].forward(x) + lora.scale * x @ lora.lora_A.T @ lora.lora_B.T)
            a1 = m.peft_adapters["default"].adapters[1]
            h = torch.relu(net[2].forward(h) + a1.scale * h @ a1.lora_A.T @ a1.lora_B.T)
            return net[4].forward(h)

    with torch.no_grad():
        first = m(x)
        assert m(x) is not first and torch.equal(m(x), first)  # served from the cache
        lora.lora_B.add_(1.0)  # an in-place change to an adapter
        torch.testing.assert_close(m(x), reference())
        net[0].weight.mul_(2.0)  # an in-place change to a base weight
        torch.testing.assert_close(m(x), reference())
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(x).sum().backward()
    opt.step()  # a training step
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference())
        m.cache_weights = False
        torch.testing.assert_close(m(x), reference())


# -- one backbone, one AdaptedModel ------------------------------------------------------------------


def _params(module: nn.Module) -> list[tuple[str, type, bool]]:
    return [(n, type(p), p.requires_grad) for n, p in module.named_parameters()]


@pytest.mark.parametrize("second", ["wrap", "load", "wrap_part", "wrap_parent", "import_peft"])
def test_a_wrapped_backbone_is_refused_and_left_as_it_was(second: str, tmp_path) -> None:
    torch.manual_seed(0)
    net = tiny_mlp()
    before = snapshot(net)
    x = torch.randn(3, 8)
    m = peftkit.wrap(net, "lora", r=2, init=False)
    path = peftkit.save(m, tmp_path / "a.safetensors")
    peftkit.export_peft(m, tmp_path / "peft")
    flags = _params(net)
    with torch.no_grad():
        adapted = m(x)
    with pytest.raises(ConfigError, match="already wrapped.*add_adapter.*unwrap"):
        if second == "wrap":
            peftkit.wrap(net, "lora", r=2)
        elif second == "load":
            peftkit.load(net, path)
        elif second == "wrap_part":
            peftkit.wrap(net[2], "lora", r=2)
        elif second == "wrap_parent":
            peftkit.wrap(nn.Sequential(net, nn.ReLU()), "lora", r=2)
        else:
            peftkit.import_peft(net, tmp_path / "peft")
    assert _params(net) == flags
    m.train()
    m(x).sum().backward()  # the first wrapper still works, and restores the backbone after each call
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), adapted, rtol=0, atol=0)
    back = m.unwrap()
    assert_bitwise_equal(snapshot(back), before)
    assert all(type(p) is nn.Parameter for p in back.parameters())
    peftkit.wrap(back, "lora", r=2)  # after unwrap() it is a plain backbone again


def test_a_wrapper_that_goes_away_releases_the_backbone(tmp_path) -> None:
    torch.manual_seed(0)
    net = tiny_mlp()
    net[0].weight.requires_grad_(False)  # the user's own flags come back as they were
    flags = _params(net)
    before = snapshot(net)
    x = torch.randn(3, 8)

    def finetune() -> None:  # the common pattern: wrap, train, save; the wrapper is local
        m = peftkit.wrap(net, "lora", r=2, init=False).train()
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        m(x).pow(2).mean().backward()
        opt.step()
        peftkit.save(m, tmp_path / "a.safetensors")

    finetune()
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in net.modules())
    assert _params(net) == flags
    assert_bitwise_equal(snapshot(net), before)
    finetune()  # a second run is not refused
    m = peftkit.load(net, tmp_path / "a.safetensors")
    import copy

    twin = copy.deepcopy(m)  # a copy carries its own hooks, released with it
    del twin
    assert peftkit.targets.is_under  # (keep the module imported)
    assert m.adapter_names == ["default"]


def test_a_forward_interrupted_by_ctrl_c_leaves_no_substituted_tensor() -> None:
    torch.manual_seed(0)
    net = tiny_mlp()
    before = snapshot(net)
    m = peftkit.wrap(net, "lora", r=2, init=False).eval()
    handle = net[4].register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(KeyboardInterrupt))
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(KeyboardInterrupt):
            m(torch.randn(2, 8))
        assert all(type(p) is nn.Parameter for p in net.parameters())
        assert_bitwise_equal(snapshot(net), before)
    handle.remove()
    m(torch.randn(2, 8))


# -- caches follow the tensors --------------------------------------------------------------------


def _reference(net: nn.Module, m: peftkit.AdaptedModel, x: torch.Tensor) -> torch.Tensor:
    """The adapted tiny MLP computed from scratch, in the model's current dtype."""
    adapters = m.peft_adapters["default"].adapters
    h = x
    with torch.no_grad():
        for i, a in zip((0, 2), adapters, strict=True):
            h = torch.relu(net[i].forward(h) + a.scale * h @ a.lora_A.T.to(h.dtype) @ a.lora_B.T.to(h.dtype))
        return net[4].forward(h)


@pytest.mark.parametrize("change", ["bfloat16", "half", "double", "meta", "base.to", "load_state_dict", "data"])
def test_inference_cache_follows_dtype_device_and_replaced_tensors(change: str) -> None:
    torch.manual_seed(0)
    net = tiny_mlp()
    x = torch.randn(3, 8)
    m = peftkit.wrap(net, "lora", r=2, init=False).eval()
    with torch.no_grad():
        m(x)  # fills the cache
    if change == "bfloat16":
        m.to(torch.bfloat16)
    elif change == "half":
        m.half()
    elif change == "double":
        m.double()
    elif change == "meta":
        m.to("meta")
    elif change == "base.to":  # the backbone alone, behind the wrapper's back
        net.double()
    elif change == "load_state_dict":
        net.load_state_dict({k: v + 1 for k, v in net.state_dict().items()})
    else:
        net[0].weight.data = net[0].weight.data * 2
    dtype = next(net.parameters()).dtype
    xin = x.to(device=next(net.parameters()).device, dtype=dtype)
    with torch.no_grad():
        out = m(xin)
    assert out.dtype == dtype and out.device == xin.device
    if change != "meta":
        expected = _reference(net, m, xin)
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.bfloat16, torch.float16) else {}
        torch.testing.assert_close(out.to(expected.dtype), expected, **tol)


def test_a_model_collected_inside_a_torch_func_transform_releases_its_backbone_later() -> None:
    """A finalizer run inside torch.func (a Fisher estimate's vmap collecting garbage) cannot call
    requires_grad_; the release waits for the next wrap instead of failing half-way."""
    import gc

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    holder = [peftkit.wrap(net, "lora", r=2)]

    def collect_inside(x: torch.Tensor) -> torch.Tensor:
        holder.clear()
        gc.collect()
        return (x * 2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exception in a finalizer is reported as a warning
        torch.func.grad(collect_inside)(torch.randn(3))
    m = peftkit.wrap(net, "lora", r=2)  # the pending release runs first: not "already wrapped"
    m.unwrap()
    assert all(p.requires_grad for p in net.parameters())
