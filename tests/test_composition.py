"""Composition blocks: ``Stack`` applies adapters in its order, ``Average`` weights each adapter's
change at every layer, ``Parallel`` returns one output per branch and runs the shared modules once;
each against a reference computed another way, in inference and training; misuse refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from architectures import build_or_skip, call, flatten
from torch import nn

import peftkit
from peftkit import Average, Parallel, Stack
from peftkit.errors import ConfigError, MergeError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))


def _moved(m: peftkit.AdaptedModel, scale: float = 0.3) -> peftkit.AdaptedModel:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.peft_adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def _serial_pair() -> peftkit.AdaptedModel:
    """Two serial adapters after fc2 only, added task first (the stack's order must win)."""
    torch.manual_seed(0)
    m = peftkit.wrap(Net(), "serial_adapter", targets=["fc2"], name="task")
    m.add_adapter("lang", "serial_adapter", targets=["fc2"])
    return _moved(m).eval()


def test_stack_applies_its_adapters_in_its_order() -> None:
    m = _serial_pair()
    with torch.no_grad():
        m.set_adapter(Stack("lang", "task"))
        lang_first = m(X)
        torch.testing.assert_close(lang_first, _by_hand_from_input(m, ["lang", "task"]), atol=1e-6, rtol=1e-6)
        m.set_adapter(Stack("task", "lang"))
        task_first = m(X)
        torch.testing.assert_close(task_first, _by_hand_from_input(m, ["task", "lang"]), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(lang_first, task_first)
        m.set_adapter(["lang", "task"])  # a plain list is applied in its order too
        torch.testing.assert_close(m(X), lang_first, atol=0, rtol=0)
    assert m.active_adapters == ["lang", "task"] and m.composition is None


def _by_hand_from_input(m: peftkit.AdaptedModel, order: list[str]) -> torch.Tensor:
    net = m.base_model
    x1 = torch.relu(net.fc1(X))
    h = nn.functional.linear(x1, net.fc2.weight, net.fc2.bias)  # not net.fc2(x1): its hooks apply the adapters
    for name in order:
        h = dict(m.get_adapter(name).modules.items())["fc2"].transform(net.fc2, (x1,), {}, h)
    return net.out(torch.relu(h))


@pytest.mark.parametrize("method", ["serial_adapter", "parallel_adapter"])
def test_average_of_output_adapters_is_the_weighted_mean_of_their_outputs(method: str) -> None:
    """Adapters on the output layer only: the model's output is the weighted mean of the outputs each
    gives alone (weights summing to 1), and with other weights ``y + sum w_i (y_i - y)``."""
    torch.manual_seed(0)
    m = peftkit.wrap(Net(), method, targets=["out"], name="a")
    m.add_adapter("b", method, targets=["out"])
    m.add_adapter("c", method, targets=["out"])
    m = _moved(m).eval()
    with torch.no_grad():
        alone = {}
        for n in "abc":
            m.set_adapter(n)
            alone[n] = m(X)
        with m.disable_adapters():
            base = m(X)
        for weights in ({"a": 0.2, "b": 0.5, "c": 0.3}, {"a": 1.0, "c": -0.5}):
            m.set_adapter(Average(weights))
            want = base + sum(w * (alone[n] - base) for n, w in weights.items())
            torch.testing.assert_close(m(X), want, atol=1e-5, rtol=1e-5)
        assert m.composition == Average({"a": 1.0, "c": -0.5})


@pytest.mark.parametrize("method, options", [("lora", {"r": 3}), ("fish", {"keep": 0.2})])
def test_average_of_weight_adapters_is_their_linear_combination(method: str, options: dict[str, Any]) -> None:
    """At every layer: for LoRA and FISH the weighted change is the linear combination's."""
    torch.manual_seed(0)
    if method == "fish":
        options = {**options, "data": [(X, torch.randint(0, 4, (6,)))]}
    m = peftkit.wrap(Net(), method, name="a", **options)
    m.add_adapter("b", method, **options)
    m = _moved(m).eval()
    weights = {"a": 0.7, "b": -0.4}
    with torch.no_grad():
        m.combine(weights, "linear")
        m.set_adapter("linear")
        want = m(X)
        m.set_adapter(Average(weights))
        torch.testing.assert_close(m(X), want, atol=1e-5, rtol=1e-5)


def test_average_trains_every_adapter() -> None:
    torch.manual_seed(0)
    m = _moved(peftkit.wrap(Net(), "lora", r=2, name="a"))
    m.add_adapter("b", "serial_adapter")
    m.set_adapter(Average({"a": 0.5, "b": 0.5}))
    m.train()
    m(X).pow(2).mean().backward()
    grads = {n.split(".")[0]: p.grad for n, p in m.peft_adapters.named_parameters()}
    assert set(grads) == {"a", "b"} and all(g is not None and torch.isfinite(g).all() for g in grads.values())


PARALLEL_ARCHS = ["bert", "gpt2", "resnet18", "timm_vit"]


@pytest.mark.parametrize("arch", PARALLEL_ARCHS)
def test_parallel_gives_each_branch_its_own_output(arch: str) -> None:
    a, model = build_or_skip(arch)
    m = peftkit.wrap(model, "lora", r=2, name="a")
    m.add_adapter("b", "parallel_adapter")
    m = _moved(m, 0.05).eval()
    inputs = a.input()
    with torch.no_grad():
        alone = {}
        for n in ("a", "b"):
            m.set_adapter(n)
            alone[n] = flatten(call(m, inputs))
        m.set_adapter(Parallel("a", "b"))
        out = call(m, inputs)
    assert set(out) == {"a", "b"}
    for n in ("a", "b"):
        for t, u in zip(flatten(out[n]), alone[n], strict=True):
            torch.testing.assert_close(t, u, atol=1e-5, rtol=1e-5)


def test_parallel_runs_the_shared_modules_once_and_heads_may_differ() -> None:
    """Adapters and heads on the last layers of a BERT: the first layers run once for both branches."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    m = peftkit.wrap(transformers.BertForSequenceClassification(cfg), "lora", r=2,
                     targets=["encoder.layer.3.attention.self.query"], head=3, name="sentiment")
    m.add_adapter("topic", "lora", r=3, targets=["encoder.layer.3.output.dense"], head=5)
    m = _moved(m).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    ran = []
    m.base_model.bert.encoder.layer[1].attention.self.key.register_forward_hook(lambda *a: ran.append(1))
    with torch.no_grad():
        alone = {}
        for n in ("sentiment", "topic"):
            m.set_adapter(n)
            alone[n] = m(input_ids=ids).logits
        ran.clear()
        m.set_adapter(Parallel("sentiment", "topic"))
        out = m(input_ids=ids)
    assert len(ran) == 1, "layer 1, which no branch adapts, ran once per branch"
    assert out["sentiment"].logits.shape == (2, 3) and out["topic"].logits.shape == (2, 5)
    for n in alone:
        torch.testing.assert_close(out[n].logits, alone[n], atol=1e-6, rtol=1e-6)


def test_parallel_recomputes_what_a_branch_changed_in_place() -> None:
    """torchvision's ResNet adds its shortcut in place (``out += identity``) and its ReLUs are in
    place: a remembered output changed since is never reused, so both branches stay exact."""
    a, model = build_or_skip("resnet18")
    m = peftkit.wrap(model, "lora", r=2, targets=["layer4.1.conv2"], name="a")
    m.add_adapter("b", "lora", r=2, targets=["layer3.0.conv1"])
    m = _moved(m).eval()
    x = a.input()
    with torch.no_grad():
        alone = {}
        for n in ("a", "b"):
            m.set_adapter(n)
            alone[n] = m(x)
        m.set_adapter(Parallel("a", "b"))
        out = m(x)
    for n in alone:
        torch.testing.assert_close(out[n], alone[n], atol=0, rtol=0)


def test_parallel_trains_each_branch_as_its_own_run() -> None:
    torch.manual_seed(0)
    m = _moved(peftkit.wrap(Net(), "lora", r=2, targets=["fc2", "out"], name="a"))
    m.add_adapter("b", "lora", r=3, targets=["out"])
    m.train()
    m.set_adapter(Parallel("a", "b"))
    out = m(X)
    (out["a"].pow(2).mean() + 2 * out["b"].abs().mean()).backward()
    together = {n: p.grad.clone() for n, p in m.peft_adapters.named_parameters()}
    m.zero_grad()
    m.set_adapter("a")
    m(X).pow(2).mean().backward()
    m.set_adapter("b")
    (2 * m(X).abs().mean()).backward()
    for n, p in m.peft_adapters.named_parameters():
        torch.testing.assert_close(together[n], p.grad, atol=1e-6, rtol=1e-5)


def test_misuse_is_refused() -> None:
    for bad, match in [(lambda: Stack(), "adapter names"), (lambda: Stack("a", "a"), "twice"),
                       (lambda: Parallel("a", 3), "adapter names"), (lambda: Average({}), "name -> weight"),
                       (lambda: Average({"a": float("inf")}), "finite weight")]:
        with pytest.raises(ConfigError, match=match):
            bad()
    torch.manual_seed(0)
    m = peftkit.wrap(Net(), "lora", r=2, name="a")
    m.add_adapter("b", "lora", r=2, train=["out"])
    with pytest.raises(ConfigError, match="train whole modules"):
        m.set_adapter(Average({"a": 0.5, "b": 0.5}))
    assert m.active_adapters == ["a"] and m.composition is None
    m.add_adapter("c", "lora", r=2)
    m.set_adapter(Average({"a": 0.5, "c": 0.5}))
    with pytest.raises(MergeError, match="composed"):
        m.merge()
    m.set_adapter(Parallel("a", "c"))
    with pytest.raises(MergeError, match="composed"):
        m.merge()
    with m.disable_adapters():
        assert isinstance(m(X), torch.Tensor)  # the backbone alone: one output
