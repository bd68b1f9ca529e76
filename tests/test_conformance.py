"""peftkit's built-in methods through the public conformance kit (``peftkit.testing``), exactly as a
third-party plugin author runs it, and proof that the kit catches broken methods."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit.testing import CHECKS, MODELS, Example, KitModel, MethodSuite, check_method, get_model


class _NeedsData(MethodSuite):
    """FISH estimates the Fisher information from labelled batches."""

    def options_for(self, model: KitModel, example: Example) -> dict[str, Any]:
        return {"data": [example], "loss_fn": None}


class TestLora(MethodSuite):
    method = "lora"
    options = {"r": 4}
    random_options = {"r": 4, "init": False}


class TestLoraGaussianRsloraBias(MethodSuite):
    method = "lora"
    options = {"r": 2, "bias": "all", "rslora": True, "init": "gaussian"}
    random_options = {"r": 2, "bias": "all", "rslora": True, "init": False}


class TestDora(MethodSuite):
    """DoRA's own tests cover every layer kind against a written-out reference; the kit here runs on
    a conv net and a transformer (Linear, Conv, MultiheadAttention)."""

    method = "lora"
    options = {"r": 2, "dora": True}
    random_options = {"r": 2, "dora": True, "init": False}
    models = ("cnn", "transformer")


class TestSerialAdapter(MethodSuite):
    method = "serial_adapter"
    options = {"bottleneck": 4}
    random_options = {"bottleneck": 4, "init": "houlsby", "scale": 50.0}
    merges = False


class TestParallelAdapter(MethodSuite):
    method = "parallel_adapter"
    options = {"reduction": 8, "scale": "learned"}
    random_options = {"reduction": 8, "init": "houlsby", "scale": 50.0, "activation": "gelu", "layer_norm": True}
    merges = False


class TestParallelAdapterLinear(MethodSuite):
    """With an identity activation and no norm the adapter is linear, so it folds into Linear and
    Conv targets and merges (the Transformer's attention and the LSTM do not fold)."""

    method = "parallel_adapter"
    options = {"bottleneck": 3, "activation": "identity"}
    random_options = {"bottleneck": 3, "activation": "identity", "init": "houlsby", "scale": 50.0}
    models = ("mlp", "cnn")

    def options_for(self, model: KitModel, example: Example) -> dict[str, Any]:
        # the MLP's second layer has no bias to take the branch's biases, so it does not fold
        return {"targets": ["0"]} if model.name == "mlp" else {}


def test_a_linear_parallel_adapter_on_a_layer_without_bias_runs_as_a_branch_and_refuses_to_merge() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 2))
    m = peftkit.wrap(layer, "parallel_adapter", bottleneck=2, activation="identity", init="houlsby", targets=["0"])
    x = torch.randn(3, 8)
    with torch.no_grad():
        for p in m.peft_adapters["default"].parameters():
            p.add_(0.1)
        inference = m.eval()(x)  # the output form: the branch's biases have no weight-space home
    torch.testing.assert_close(m(x), inference)
    before = layer[0].weight.clone()
    with pytest.raises(peftkit.errors.MergeError, match="cannot be written as a weight delta"):
        m.merge()
    assert torch.equal(layer[0].weight, before) and not m.merged


class TestLastLayer(MethodSuite):
    method = "last_layer"
    random_options = {"unfreeze": 1}


class TestFish(_NeedsData):
    method = "fish"
    options = {"keep": 0.25, "samples": 8}


class TestFishExpectedPerTensor(_NeedsData):
    method = "fish"
    options = {"keep": 0.3, "samples": 8, "scope": "tensor", "fisher": "expected"}
    random_options = {"keep": 0.3, "samples": 8, "scope": "tensor"}


# -- the kit itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kit_model", MODELS, ids=lambda m: m.name)
def test_kit_models_are_seeded_and_other_shapes_differ(kit_model: KitModel) -> None:
    a, b = kit_model.build().state_dict(), kit_model.build().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in kit_model.build(seed=1).state_dict().items())
    other = kit_model.build(other_shapes=True).state_dict()
    assert [k for k in a if a[k].shape == other[k].shape and a[k].dim() > 1] == [], "a weight kept its shape"
    x, y = kit_model.example()
    assert torch.equal(x, kit_model.example()[0]) and y.max() < kit_model.num_classes
    state = torch.random.get_rng_state()
    out = kit_model.build().eval()(x)
    assert torch.equal(torch.random.get_rng_state(), state), "building a kit model moved the global RNG"
    assert out.shape == (x.shape[0], kit_model.num_classes)
    assert isinstance(kit_model.build().get_submodule(kit_model.head), nn.Linear)


def test_importing_the_kit_does_not_import_pytest() -> None:
    import subprocess
    import sys

    code = "import sys, peftkit.testing; assert 'pytest' not in sys.modules, 'pytest imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_method_reports_passes_and_skips() -> None:
    results = check_method("lora", {"r": 2}, models=["mlp", "lstm"], checks=["identity_at_init", "save_load"])
    got = {(r.check, r.model): r.status for r in results}
    assert got == {("applies", ""): "passed", ("identity_at_init", "mlp"): "passed", ("save_load", "mlp"): "passed",
                   ("identity_at_init", "lstm"): "passed", ("save_load", "lstm"): "passed"}


def test_check_method_refuses_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown checks"):
        check_method("lora", checks=["no_such_check"])
    with pytest.raises(KeyError, match="no kit model named 'resnet'"):
        check_method("lora", models=["resnet"])
    assert get_model("cnn").head == "fc" and len(CHECKS) == len(set(CHECKS))


# -- the kit catches broken methods ------------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    """Options of the ``kit_toy`` method: which bug to plant (``"none"``: a correct method)."""

    bug: str = "none"


class ToyScale(peftkit.Adapter):
    """A learned scale per output feature of a Linear layer (IA3-like), with an optional bug."""

    def __init__(self, module: nn.Linear, bug: str) -> None:
        super().__init__()
        self.bug = bug
        self.scale = nn.Parameter(torch.ones(module.out_features))
        if bug == "dead":  # a parameter that never reaches the output
            self.unused = nn.Parameter(torch.ones(3))
        if bug == "unsaved":  # state the output depends on but the file does not hold
            self.register_buffer("noise", 1 + 0.1 * torch.rand(module.out_features), persistent=False)
        if bug == "stores_base":  # a copy of the base weight, saved under the backbone's own tensor name
            self.register_buffer("weight", module.weight.detach().clone())
        if bug == "own_hook":  # a hook of its own on the backbone, which nothing removes
            module.register_forward_hook(lambda mod, args, out: out * 1.01)

    def _s(self) -> torch.Tensor:
        return self.scale * self.noise if self.bug == "unsaved" else self.scale

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if self.bug == "mutates":  # behind autograd's back (.data), as a careless plugin would
            module.weight.data.add_(1e-3)
        return output * self._s()

    def delta(self, module: nn.Module) -> dict[str, torch.Tensor]:
        s = self._s() - 1
        if self.bug == "delta":  # the weight-space form disagrees with the output-space one
            s = 2 * s
        out = {"weight": s[:, None] * module.weight}
        if module.bias is not None:
            out["bias"] = s * module.bias
        return out


class Toy(peftkit.Method):
    """A toy scale method with a plantable bug, to prove the conformance kit catches each."""

    name = "kit_toy"
    Config = ToyConfig

    def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
        return ToyScale(module, self.config.bug)


@pytest.fixture
def toy(register_plugin: Callable[[Any, str], None]) -> str:
    class Plugin:
        @peftkit.hookimpl
        def register_methods(self, register: Any) -> None:
            register(Toy)

    register_plugin(Plugin(), "test-kit-toy")
    return "kit_toy"


def test_the_toy_without_a_bug_passes(toy: str) -> None:
    results = check_method(toy, {"targets": ["0", "2"]}, models=["mlp"])  # the MLP's hidden layers
    assert {r.status for r in results} == {"passed"}


@pytest.mark.parametrize(("bug", "check", "message"), [
    ("mutates", "frozen_backbone", "training changed the backbone"),
    ("delta", "merge", "forms with and without autograd disagree"),
    ("dead", "gradients", "unused: zero gradient|unused: no gradient"),
    ("unsaved", "save_load", "the loaded adapter gives other outputs"),
    ("stores_base", "file_contents", "backbone tensors of modules not trained whole: .'0.weight'"),
    ("own_hook", "unwrap", "the unwrapped backbone gives other outputs"),
])
def test_the_kit_catches_a_broken_method(toy: str, bug: str, check: str, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_method(toy, {"targets": ["0", "2"], "bug": bug}, models=["mlp"], checks=[check])


def test_the_kit_fails_a_method_that_applies_to_no_model(toy: str) -> None:
    with pytest.raises(AssertionError, match="applies to none of the kit models"):
        check_method(toy, {"targets": nn.GRU}, checks=["identity_at_init"])


@pytest.mark.parametrize(("method", "claims", "message"), [
    ("serial_adapter", {"merges": True}, r"merge\[mlp\]: merges = True, but merge\(\) raised MergeError"),
    ("lora", {"merges": False}, "did not raise MergeError"),
    ("lora", {"options": {"init": False}}, "a fresh adapter changed the outputs"),
    ("lora", {"options": {"r": 16}, "max_file_ratio": 0.05}, "more than 0.05 x the backbone"),
])
def test_the_kit_catches_wrong_claims_about_a_method(method: str, claims: dict[str, Any], message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        check_method(method, models=["mlp"], checks=["identity_at_init", "merge", "file_contents"], **claims)


def test_registered_methods_run_through_the_kit_and_are_gone_afterwards() -> None:
    """What a plugin author tests before installing the package: ``registered`` then ``check_method``,
    on a kit model of their own too."""
    own = KitModel("wide_mlp", "4", 32, 24, lambda w: nn.Sequential(nn.Linear(16, w), nn.ReLU(), nn.Linear(w, w),
                                                                       nn.ReLU(), nn.Linear(w, 3)),
                   lambda g: torch.randn(8, 16, generator=g), num_classes=3)
    assert get_model(own) is own
    with peftkit.testing.registered(Toy) as names:
        assert names == ["kit_toy"] and "kit_toy" in peftkit.methods()
        results = check_method("kit_toy", {"targets": ["0", "2"]}, models=[own], checks=["save_load", "merge"])
        assert [(r.check, r.model, r.status) for r in results] == [
            ("applies", "", "passed"), ("save_load", "wide_mlp", "passed"), ("merge", "wide_mlp", "passed")]
    assert "kit_toy" not in peftkit.methods()


def test_a_plugin_error_at_wrap_is_a_failed_check_not_a_crash() -> None:
    class BiasOnly(peftkit.Adapter):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.shift_b = nn.Parameter(torch.zeros(width))

        def delta(self, module: nn.Module) -> dict[str, torch.Tensor]:
            return {"bias": self.shift_b}  # a layer with bias=False has none: refused on the dry run

    class NoBiasCheck(peftkit.Method):
        name = "kit_no_bias_check"
        Config = ToyConfig
        adapts = (nn.Linear,)

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            return BiasOnly(module.weight.shape[0])

    biasless = KitModel("biasless", "2", 32, 24, lambda w: nn.Sequential(nn.Linear(16, w, bias=False), nn.ReLU(),
                                                                        nn.Linear(w, 3)),
                        lambda g: torch.randn(8, 16, generator=g), num_classes=3)
    with peftkit.testing.registered(NoBiasCheck), pytest.raises(AssertionError, match="PluginError: .*does not hold"):
        check_method("kit_no_bias_check", models=[biasless], checks=["identity_at_init"])
