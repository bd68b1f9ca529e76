"""The method protocol: name, Config and build are enough; plan() decides once and the file keeps
it; wrap and load build through the same call; retired hooks are refused by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import PluginError, TargetError, UnknownMethodError
from peftkit.plugins import failed_plugins, pm


@dataclass(frozen=True)
class NoOptions:
    pass


class Shift(peftkit.Adapter):
    """Adds a learned vector to a Linear's output; its width comes from the spec (or the layer)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))

    def transform(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return output + self.shift

    def delta(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"bias": self.shift}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))


@pytest.fixture
def register(register_plugin: Callable[[Any, str], None]) -> Callable[[type[peftkit.Method]], str]:
    def add(cls: type[peftkit.Method]) -> str:
        class Plugin:
            @peftkit.hookimpl
            def register_methods(self, register: Any) -> None:
                register(cls)

        register_plugin(Plugin(), f"test-{cls.name}")
        return cls.name

    return add


def test_name_config_adapts_and_build_are_a_whole_method(register: Any, tmp_path: Path) -> None:
    class Minimal(peftkit.Method):
        name = "minimal_shift"
        Config = NoOptions
        adapts = (nn.Linear,)

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            return Shift(module.out_features)

    register(Minimal)
    m = peftkit.wrap(_model(), "minimal_shift")
    assert m.peft_adapters["default"].paths == ["0", "2"]  # every Linear but the output layer
    x = torch.randn(3, 4)
    with torch.no_grad():
        m.peft_adapters["default"].adapters[0].shift.add_(1.0)
        want = m(x)
    loaded = peftkit.load(_model(), peftkit.save(m, tmp_path / "a.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)


def test_a_build_taking_path_and_module_only_is_called_that_way(register: Any, tmp_path: Path) -> None:
    class Older(peftkit.Method):
        name = "older_shift"
        Config = NoOptions
        adapts = (nn.Linear,)

        def build(self, path: str, module: nn.Module) -> peftkit.Adapter:  # type: ignore[override]
            return Shift(module.out_features)

    register(Older)
    m = peftkit.wrap(_model(), "older_shift")
    assert len(m.peft_adapters["default"].adapters) == 2
    peftkit.load(_model(), peftkit.save(m, tmp_path / "a.safetensors"))


def test_plan_decides_once_and_the_file_keeps_it(register: Any, tmp_path: Path) -> None:
    """The specs a plan returns reach build when wrapping, are saved, and reach build again when
    loading, while plan() itself never runs on load; planned values fill the built adapter."""
    seen: list[tuple[str, str, dict[str, Any]]] = []
    contexts: list[peftkit.PlanContext] = []

    class Planned(peftkit.Method):
        name = "planned_shift"
        Config = NoOptions
        adapts = (nn.Linear,)

        def plan(self, context: peftkit.PlanContext) -> peftkit.Plan:
            contexts.append(context)
            widths = {p: {"width": context.model.get_submodule(p).out_features} for p in context.targets}
            start = {p: {"shift": torch.full((spec["width"],), 0.5)} for p, spec in widths.items()}
            return peftkit.Plan(widths, values=start)

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            seen.append(("build", path, dict(spec)))
            return Shift(spec["width"])

    register(Planned)
    m = peftkit.wrap(_model(), "planned_shift", exclude=["2"])
    (context,) = contexts
    assert context.targets == ["0"] and not context.explicit and context.output_layer == "4"
    assert seen == [("build", "0", {"width": 6})] * 2  # a dry run on the meta device, then the real build
    assert torch.equal(m.peft_adapters["default"].adapters[0].shift, torch.full((6,), 0.5))  # the planned value
    file = peftkit.save(m, tmp_path / "p.safetensors")
    assert peftkit.read_header(file).targets["0"]["spec"] == {"width": 6}
    seen.clear()
    loaded = peftkit.load(_model(), file)
    # the same two builds; plan() does not run again
    assert seen == [("build", "0", {"width": 6})] * 2 and len(contexts) == 1
    assert torch.equal(loaded.peft_adapters["default"].adapters[0].shift, torch.full((6,), 0.5))


@pytest.mark.parametrize(("bad_plan", "message"), [
    (lambda ctx: {"0": {}}, "plan\\(\\) returned dict"),
    (lambda ctx: peftkit.Plan({"nope": {}}), "modules the model does not have"),
    (lambda ctx: peftkit.Plan({"0": {}}, values={"0": {"shift": torch.zeros(3)}}), "planned a value for 0.shift"),
    (lambda ctx: peftkit.Plan({"0": {}}, values={"0": {"other": torch.zeros(6)}}), "no such tensor"),
])
def test_a_wrong_plan_is_a_plugin_error_and_changes_nothing(register: Any, bad_plan: Any, message: str) -> None:
    class Wrong(peftkit.Method):
        name = "wrong_plan"
        Config = NoOptions
        adapts = (nn.Linear,)

        def plan(self, context: peftkit.PlanContext) -> peftkit.Plan:
            return bad_plan(context)  # type: ignore[no-any-return]

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            return Shift(module.out_features)

    register(Wrong)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PluginError, match=message):
        peftkit.wrap(model, "wrong_plan")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model._forward_hooks


@pytest.mark.parametrize("hook", ["setup", "expand_targets", "trained_modules", "rebuild"])
def test_a_method_still_implementing_a_retired_hook_is_refused_by_name(register: Any, hook: str) -> None:
    """Its plugin is reported as failed (a warning, peftkit methods, failed_plugins) with the hook and
    what replaced it, and wrapping with it says the plugin failed; the other plugins keep working."""

    def retired(self: Any, *args: Any) -> Any:
        return None

    cls = type("Retired", (peftkit.Method,), {
        "name": f"retired_{hook}", "Config": NoOptions, "adapts": (nn.Linear,), hook: retired,
        "build": lambda self, path, module, spec: Shift(module.out_features)})
    register(cls)
    with pytest.warns(RuntimeWarning, match=rf"implements {hook}\(\), which peftkit no longer calls; use "):
        assert f"retired_{hook}" not in peftkit.methods() and "lora" in peftkit.methods()
    assert "no longer calls" in failed_plugins()[f"test-retired_{hook}"]
    with pytest.raises(UnknownMethodError, match=f"Plugins that failed to load: .*test-retired_{hook}"):
        peftkit.wrap(_model(), f"retired_{hook}")


def test_an_adapter_still_implementing_spec_is_refused(register: Any) -> None:
    class Speccing(Shift):
        def spec(self) -> dict[str, Any]:
            return {"width": 6}

    class UsesSpec(peftkit.Method):
        name = "uses_spec"
        Config = NoOptions
        adapts = (nn.Linear,)

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            return Speccing(module.out_features)

    register(UsesSpec)
    with pytest.raises(PluginError, match="spec\\(\\) is no longer called; return what it held from Method.plan"):
        peftkit.wrap(_model(), "uses_spec")


def test_registrations_are_collected_once_until_the_plugins_change(register_plugin: Any) -> None:
    calls: list[str] = []

    def plugin(doc: str) -> Any:
        class One(peftkit.Method):
            __doc__ = doc
            name = "collected_once"
            Config = NoOptions

            def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
                return Shift(module.out_features)

        class Plugin:
            @peftkit.hookimpl
            def register_methods(self, register: Any) -> None:
                calls.append(doc)
                register(One)

        return Plugin()

    register_plugin(plugin("First."), "test-collected")
    assert peftkit.methods()["collected_once"].doc == "First."
    assert peftkit.methods()["collected_once"].doc == "First."
    assert calls == ["First."]  # the hook ran once for both lookups
    pm.unregister(name="test-collected")
    register_plugin(plugin("Second."), "test-collected")  # another plugin object under the same name
    assert peftkit.methods()["collected_once"].doc == "Second."


class BiasShift(peftkit.Adapter):
    """A delta on the target's bias, under a configurable key (to plant mistakes)."""

    def __init__(self, width: int, key: str = "bias", shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.key = key
        self.shift_b = nn.Parameter(torch.zeros(shape or (width,)))

    def delta(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {self.key: self.shift_b}


def _biasless() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 2))


@pytest.mark.parametrize(("key", "shape", "model", "message"), [
    ("bias", None, _biasless, r"delta for 'bias', which Linear at '0' does not hold \(it is None there\); it holds: weight"),
    ("biass", None, _model, r"delta for 'biass', which Linear at '0' does not hold; it holds: weight, bias"),
    ("bias", (5,), _model, r"delta for 'bias' that does not fit that tensor's shape \[6\]"),
])
def test_a_delta_that_does_not_fit_its_module_is_refused_at_wrap(register: Any, key: str, shape: Any, model: Any,
                                                                  message: str) -> None:
    """Found on the dry run, before anything is attached, instead of at the first inference or merge."""

    class Planted(peftkit.Method):
        name = f"planted_{key}_{shape}"
        Config = NoOptions

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            return BiasShift(module.weight.shape[0], key, shape)

    name = register(Planted)
    backbone = model()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(PluginError, match=message):
        peftkit.wrap(backbone, name, targets=["0"])
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert all(p.requires_grad for p in backbone.parameters()) and not backbone[0]._forward_pre_hooks


def test_failures_inside_a_plugin_name_the_method_and_the_target(register: Any) -> None:
    class Fails(peftkit.Method):
        name = "fails_inside"
        Config = NoOptions
        adapts = (nn.Linear,)

        def plan(self, context: peftkit.PlanContext) -> peftkit.Plan:
            if context.explicit:
                raise IndexError("planning went wrong")
            return peftkit.Plan({p: {} for p in context.targets})

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            raise ValueError("no such layer layout")

    register(Fails)
    with pytest.raises(PluginError, match="method 'fails_inside' raised IndexError while planning: planning went wrong"):
        peftkit.wrap(_model(), "fails_inside", targets=["0"])
    with pytest.raises(PluginError, match=r"method 'fails_inside' could not build the adapter for '0' \(Linear\): "
                                          "ValueError: no such layer layout") as caught:
        peftkit.wrap(_model(), "fails_inside")
    assert isinstance(caught.value.__cause__, ValueError)  # the plugin's own traceback is kept


def test_a_spec_that_cannot_be_saved_is_refused_when_planned(register: Any) -> None:
    class TensorSpec(peftkit.Method):
        name = "tensor_spec"
        Config = NoOptions
        adapts = (nn.Linear,)

        def plan(self, context: peftkit.PlanContext) -> peftkit.Plan:
            return peftkit.Plan({p: {"rows": torch.arange(2)} for p in context.targets})

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            return Shift(module.out_features)

    register(TensorSpec)
    with pytest.raises(PluginError, match="the spec planned for '0' cannot be saved in a file .*tensors go in Plan.values"):
        peftkit.wrap(_model(), "tensor_spec")


def test_a_refusal_by_a_methods_own_can_adapt_says_whose_rule_it_is(register: Any) -> None:
    """Declared types plus a rule of its own: a refused module of a declared type would otherwise read
    as a contradiction ("cannot adapt: 0 (Linear)" from a method that adapts Linear)."""

    class WideOnly(peftkit.Method):
        name = "wide_only"
        Config = NoOptions
        adapts = (nn.Linear,)

        def can_adapt(self, module: nn.Module) -> bool:
            return isinstance(module, nn.Linear) and module.in_features > 100

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            return Shift(module.out_features)

    register(WideOnly)
    with pytest.raises(TargetError, match=r"name modules 'wide_only' \(WideOnly.can_adapt\) cannot adapt: 0 \(Linear\)"):
        peftkit.wrap(_model(), "wide_only", targets=["0"])
    with pytest.raises(TargetError, match=r"no default targets in Sequential \(its defaults: every Linear that "
                                          r"WideOnly.can_adapt accepts, except the output layer\)"):
        peftkit.wrap(_model(), "wide_only")
