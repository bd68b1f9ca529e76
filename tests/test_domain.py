"""Domain adaptation: gradient reversal, CORAL, MMD and feature augmentation against their formulas
written out; features from any wrapped model; one adaptation step with every built-in method."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import TinyCNN, assert_bitwise_equal, snapshot
from torch import nn

import peftkit
from peftkit.errors import ConfigError, DivergenceWarning, TargetError


# -- gradient reversal ------------------------------------------------------------------------------
@pytest.mark.parametrize("coeff", [0.0, 0.5, 1.0, 3.0])
def test_grad_reverse_is_the_identity_forward_and_flips_and_scales_the_gradient(coeff: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = peftkit.grad_reverse(x, coeff)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.equal(x.grad, -coeff * upstream)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "1"])
def test_grad_reverse_refuses_a_bad_coefficient(bad: Any) -> None:
    with pytest.raises(ConfigError, match="coeff"):
        peftkit.grad_reverse(torch.zeros(2), bad)


def test_the_warm_up_follows_ganins_schedule() -> None:
    assert peftkit.dann_coefficient(0.0) == 0.0
    assert peftkit.dann_coefficient(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert peftkit.dann_coefficient(0.3, gamma=5, max_coeff=2) == pytest.approx(2 * (2 / (1 + math.exp(-1.5)) - 1))
    assert peftkit.dann_coefficient(7.0) == peftkit.dann_coefficient(1.0)  # progress is clipped to [0, 1]
    layer = peftkit.GradientReversal(2.0, warmup_steps=10)
    seen = []
    for _ in range(12):
        seen.append(layer.coeff)
        layer.step()
    assert seen[0] == 0 and seen == sorted(seen) and seen[-1] == pytest.approx(2 * (2 / (1 + math.exp(-10)) - 1))
    x = torch.ones(3, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -layer.coeff))
    assert peftkit.GradientReversal(0.5).coeff == 0.5
    with pytest.raises(ConfigError, match="warmup_steps"):
        peftkit.GradientReversal(warmup_steps=0)


# -- CORAL and MMD against dense references ---------------------------------------------------------
def _coral_reference(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """Covariances entry by entry, in float64."""
    def cov(f: torch.Tensor) -> torch.Tensor:
        n, d = f.shape
        mean = [sum(f[i, a] for i in range(n)) / n for a in range(d)]
        return torch.stack([torch.stack([sum((f[i, a] - mean[a]) * (f[i, b] - mean[b]) for i in range(n)) / (n - 1)
                                         for b in range(d)]) for a in range(d)])
    d = fs.shape[1]
    return ((cov(fs) - cov(ft)) ** 2).sum() / (4 * d * d)


def _gauss(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, kernels: tuple[float, ...]) -> torch.Tensor:
    sq = ((x - y) ** 2).sum()
    return sum(torch.exp(-sq / (2 * k * scale)) for k in kernels)


def _mmd_reference(fs: torch.Tensor, ft: torch.Tensor, kernels: tuple[float, ...], linear: bool) -> torch.Tensor:
    """The estimators written out pair by pair, in float64."""
    if linear:
        pairs = [(fs[2 * i], fs[2 * i + 1], ft[2 * i], ft[2 * i + 1]) for i in range(len(fs) // 2)]
        sq = [((a - b) ** 2).sum() for s1, s2, t1, t2 in pairs for a, b in ((s1, s2), (t1, t2), (s1, t2), (s2, t1))]
        scale = (sum(sq) / len(sq)).detach()
        return sum(_gauss(s1, s2, scale, kernels) + _gauss(t1, t2, scale, kernels) - _gauss(s1, t2, scale, kernels)
                   - _gauss(s2, t1, scale, kernels) for s1, s2, t1, t2 in pairs) / len(pairs)
    both = torch.cat([fs, ft])
    n = len(both)
    scale = (sum(((both[i] - both[j]) ** 2).sum() for i in range(n) for j in range(n) if i != j) / (n * n - n)).detach()

    def mean_k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum(_gauss(x, y, scale, kernels) for x in a for y in b) / (len(a) * len(b))

    return mean_k(fs, fs) + mean_k(ft, ft) - 2 * mean_k(fs, ft)


def _features(seed: int, ns: int = 6, nt: int = 6, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ns, d, generator=g, dtype=torch.float64), 2 * torch.randn(nt, d, generator=g, dtype=torch.float64) + 1


def _loss_and_grads(fn: Any, fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fs, ft = fs.clone().requires_grad_(), ft.clone().requires_grad_()
    loss = fn(fs, ft)
    gs, gt = torch.autograd.grad(loss, [fs, ft])
    return loss.detach(), gs, gt


@pytest.mark.parametrize("seed", [0, 1])
def test_coral_matches_its_formula_with_gradients_and_is_zero_for_identical_features(seed: int) -> None:
    fs, ft = _features(seed, nt=5)
    ours = _loss_and_grads(lambda a, b: peftkit.coral_loss(a.double(), b.double()), fs, ft)
    ref = _loss_and_grads(_coral_reference, fs, ft)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-5, atol=1e-7)
    assert peftkit.coral_loss(fs.float(), fs.float()) == 0
    assert peftkit.coral_loss(fs.float(), fs.float() + 3.0) < 1e-9  # a shift of the mean is not CORAL's business


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("kernels", [(1.0,), (0.25, 1.0, 4.0)])
def test_mmd_matches_its_estimators_with_gradients_and_is_zero_for_identical_features(
        linear: bool, kernels: tuple[float, ...]) -> None:
    fs, ft = _features(3)
    ours = _loss_and_grads(lambda a, b: peftkit.mmd_loss(a, b, kernels, linear=linear), fs, ft)
    ref = _loss_and_grads(lambda a, b: _mmd_reference(a, b, kernels, linear), fs, ft)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-4, atol=1e-6)
    assert peftkit.mmd_loss(fs, fs, kernels, linear=linear) == 0
    near, far = peftkit.mmd_loss(fs, fs + 0.1, kernels), peftkit.mmd_loss(fs, fs + 3.0, kernels)
    assert 0 < near < far


def test_loss_arguments_are_checked() -> None:
    f = torch.randn(4, 3)
    with pytest.raises(ConfigError, match="same width"):
        peftkit.coral_loss(f, torch.randn(4, 2))
    with pytest.raises(ConfigError, match="pool or flatten"):
        peftkit.mmd_loss(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2))
    with pytest.raises(ConfigError, match="at least 2 rows"):
        peftkit.coral_loss(f[:1], f)
    with pytest.raises(ConfigError, match="as many source rows"):
        peftkit.mmd_loss(f, f[:2], linear=True)
    for bad in [(), (0.0,), (-1.0,), "1", (float("nan"),)]:
        with pytest.raises(ConfigError, match="kernels"):
            peftkit.mmd_loss(f, f, bad)


def test_feature_augmentation_is_daumes() -> None:
    f = torch.arange(6.0).reshape(3, 2)
    out = peftkit.augment_features(f, torch.tensor([False, True, False]))
    expected = torch.tensor([[0, 1, 0, 1, 0, 0], [2, 3, 0, 0, 2, 3], [4, 5, 4, 5, 0, 0]], dtype=torch.float32)
    assert torch.equal(out, expected)
    assert torch.equal(peftkit.augment_features(f, True)[:, 2:4], torch.zeros(3, 2))
    with pytest.raises(ConfigError, match="expected one flag"):
        peftkit.augment_features(f, torch.tensor([True, False]))


# -- features from a wrapped model ------------------------------------------------------------------
def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def test_features_are_the_output_layers_input_from_one_forward() -> None:
    x = torch.randn(2, 3, 32, 32)
    m = peftkit.wrap(_resnet(), "lora", r=2).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05)
    calls = []
    m.base_model.conv1.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out, feats = m.forward_with_features(x)
        assert len(calls) == 1
        pooled = {}
        handle = m.base_model.avgpool.register_forward_hook(lambda _m, _a, o: pooled.setdefault("x", o))
        expected = m(x)
        handle.remove()
    assert torch.equal(out, expected) and torch.equal(feats, pooled["x"].flatten(1)) and feats.shape == (2, 512)
    assert not m.base_model.fc._forward_pre_hooks  # the capture is gone
    _, layer4 = m.forward_with_features(x, layer="layer4")
    assert layer4.shape == (2, 512, 1, 1)


def test_features_enter_the_heads_of_a_multi_head_adapter_and_of_a_fresh_head() -> None:
    x = torch.randn(3, 3, 8, 8)
    torch.manual_seed(0)
    m = peftkit.wrap(TinyCNN(), "lora", r=2, heads={"label": 4, "domain": [8, 1]})
    out, feats = m.forward_with_features(x)
    assert set(out) == {"label", "domain"} and feats.shape == (3, 8)
    torch.testing.assert_close(m.head("domain")(feats), out["domain"])
    m2 = peftkit.wrap(TinyCNN(), "last_layer", head=3)
    out2, feats2 = m2.forward_with_features(x)
    torch.testing.assert_close(dict(m2.get_adapter().modules.train_items())["fc"](feats2), out2)


def test_feature_capture_errors_leave_no_hook_behind() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.block(self.block(x)))

    torch.manual_seed(0)
    model = Twice()
    before = snapshot(model)
    m = peftkit.wrap(model, "lora", r=2)
    hooks = [(len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in model.modules()]
    with pytest.raises(ConfigError, match="ran 2 times"):
        m.forward_with_features(torch.randn(2, 4), layer="block")
    with pytest.raises(TargetError, match="names no module"):
        m.forward_with_features(torch.randn(2, 4), layer="nope")
    assert hooks == [(len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in model.modules()]
    _, f = m.forward_with_features(torch.randn(2, 4))
    assert f.shape == (2, 4)
    with pytest.raises(ConfigError, match="no heads"):
        m.head("domain")
    m.unwrap()
    assert_bitwise_equal(before, snapshot(model))


# -- one adaptation step, with every built-in method ------------------------------------------------
def _shifted_batches(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(8, 3, 8, 8, generator=g)
    return xs, torch.randint(0, 4, (8,), generator=g), 1.5 * torch.randn(8, 3, 8, 8, generator=g) + 0.5


METHODS = {"lora": {"r": 2}, "lora dora": {"r": 2, "dora": True}, "serial_adapter": {}, "parallel_adapter": {},
           "last_layer": {"unfreeze": 1}, "fish": {"keep": 0.5, "samples": 8}}


@pytest.mark.parametrize("adaptation", ["dann", "coral", "mmd"])
@pytest.mark.parametrize("name", list(METHODS))
def test_one_adaptation_step_trains_the_adapter_and_saves_with_its_discriminator(
        name: str, adaptation: str, tmp_path: Path) -> None:
    xs, ys, xt = _shifted_batches(0)
    torch.manual_seed(0)
    model = TinyCNN()
    before = snapshot(model)
    method, options = name.split()[0], dict(METHODS[name])
    if method == "fish":
        options["data"] = [(xs, ys)]
    heads = {"label": 4, "domain": [16, 1]} if adaptation == "dann" else {"label": 4}
    m = peftkit.wrap(model, method, heads=heads, **options)
    da = peftkit.DomainAdaptation(m, adaptation, weight=0.5, total_steps=10)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():  # off the identity start (LoRA's A gets no gradient while B is zero)
        for p in trainable.values():
            p.add_(0.01 * torch.randn_like(p))
    loss, logs = da.loss(xs, ys, xt)
    loss.backward()
    assert set(logs) >= {"task", "adaptation"} and math.isfinite(float(loss.detach()))
    torch.testing.assert_close(float(loss.detach()), logs["task"] + 0.5 * logs["adaptation"], rtol=1e-5, atol=1e-6)
    # every trainable tensor outside the heads gets a gradient; the discriminator too, for DANN
    got = {n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
    adapters = {n for n in trainable if ".heads." not in n}
    assert adapters and adapters <= got
    assert any(".heads.domain." in n for n in got) == (adaptation == "dann")
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    opt.step()
    x = torch.randn(2, 3, 8, 8)
    m.eval()
    with torch.no_grad():
        expected = m(x)
    path = peftkit.save(m, tmp_path / "a.safetensors")
    if adaptation == "dann":
        assert any(".heads.domain." in k for k in peftkit.read_header(path).tensors)
    m.unwrap()
    assert_bitwise_equal(before, snapshot(model))  # frozen means frozen
    torch.manual_seed(0)
    with torch.no_grad():
        again = peftkit.load(TinyCNN(), path).eval()(x)
    assert set(again) == set(heads)
    for k in heads:
        torch.testing.assert_close(again[k], expected[k], rtol=0, atol=0)


def test_dann_sends_the_features_the_discriminator_s_gradient_reversed_and_scaled() -> None:
    xs, ys, xt = _shifted_batches(1)
    torch.manual_seed(0)
    m = peftkit.wrap(TinyCNN(), "lora", r=2, heads={"label": 4, "domain": [8, 2]})
    da = peftkit.DomainAdaptation(m, "dann", weight=1.0, task_loss=lambda logits, y: logits.sum() * 0)
    lora = [p for n, p in m.named_parameters() if p.requires_grad and "lora_B" in n]
    loss, logs = da.loss(xs, ys, xt)
    assert logs["coeff"] == 1.0
    ours = torch.autograd.grad(loss, lora)
    # the same discriminator loss without reversal: minus the gradient
    _, feats = m.forward_with_features(torch.cat([xs, xt]))
    domain = torch.cat([torch.zeros(8), torch.ones(8)]).long()
    plain = torch.autograd.grad(F.cross_entropy(m.head("domain")(feats), domain), lora)
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, -b)
    assert 0 <= logs["domain_accuracy"] <= 1


@pytest.mark.parametrize("adaptation", ["coral", "mmd"])
def test_adaptation_steps_through_lora_shrink_the_gap_between_domains(adaptation: str) -> None:
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(64, 6, generator=g), 3 * torch.randn(64, 6, generator=g) + 1  # target: wider, shifted
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 2))
    m = peftkit.wrap(model, "lora", r=4)
    da = peftkit.DomainAdaptation(m, adaptation, task_loss=lambda logits, y: 0 * logits.sum())  # alignment only
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-2)
    gaps = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)  # a run that trains is never called diverging
        for _ in range(40):
            loss, logs = da.loss(xs, torch.zeros(64, dtype=torch.long), xt)
            gaps.append(logs["adaptation"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert gaps[-1] < 0.3 * gaps[0], gaps[::8]


def _relu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("adaptation", ["dann", "coral", "mmd"])
def test_features_that_run_away_warn_once_with_the_step_and_the_fix(adaptation: str) -> None:
    g = torch.Generator().manual_seed(0)
    xs, ys, xt = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g), torch.randn(16, 6, generator=g)
    heads = {"label": 3, "domain": [8, 1]} if adaptation == "dann" else {"label": 3}
    m = peftkit.wrap(_relu_mlp(), "lora", r=2, heads=heads)
    da = peftkit.DomainAdaptation(m, adaptation)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        _, logs = da.loss(xs, ys, xt)
        assert logs["feature_scale"] == 1.0  # the first step is what later ones are measured against
        _, logs = da.loss(xs, ys, xt)
        assert logs["feature_scale"] == pytest.approx(1.0)
    with torch.no_grad():  # what DANN's reversed gradient does to LoRA on MNIST -> digits, in one go
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(30 * torch.randn(p.shape, generator=g))
    fix = "lower weight= .*total_steps=.*method='mmd'" if adaptation == "dann" else "lower weight= or the learning rate"
    with pytest.warns(DivergenceWarning, match=rf"^{adaptation} is diverging at step 3: the features are .*x their "
                                                rf"scale at the first step .*{fix}"):
        _, logs = da.loss(xs, ys, xt)
    assert logs["feature_scale"] > 100
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)  # once per run: a log, not a flood
        da.loss(xs, ys, xt)


def test_a_loss_that_is_not_finite_warns() -> None:
    g = torch.Generator().manual_seed(1)
    xs, ys, xt = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g), torch.randn(8, 6, generator=g)
    m = peftkit.wrap(_relu_mlp(), "lora", r=2, head=3)
    da = peftkit.DomainAdaptation(m, "coral")
    da.loss(xs, ys, xt)
    xt[0, 0] = float("inf")  # one bad target row
    with pytest.warns(DivergenceWarning, match="coral is diverging at step 2: the adaptation loss is not finite"):
        da.loss(xs, ys, xt)


def test_domain_adaptation_misuse_is_named() -> None:
    torch.manual_seed(0)
    plain = peftkit.wrap(TinyCNN(), "lora", r=2)
    with pytest.raises(ConfigError, match="discriminator head 'domain'"):
        peftkit.DomainAdaptation(plain, "dann")
    with pytest.raises(ConfigError, match="method="):
        peftkit.DomainAdaptation(plain, "adda")
    with pytest.raises(ConfigError, match="weight="):
        peftkit.DomainAdaptation(plain, "coral", weight=-1)
    with pytest.raises(ConfigError, match="wrapped model"):
        peftkit.DomainAdaptation(TinyCNN(), "coral")  # type: ignore[arg-type]
    wide = peftkit.wrap(TinyCNN(), "lora", r=2, heads={"label": 4, "domain": [8, 3]})
    with pytest.raises(ConfigError, match="give it 1"):
        peftkit.DomainAdaptation(wide, "dann")
    two = peftkit.wrap(TinyCNN(), "lora", r=2, heads={"a": 4, "b": 4})
    with pytest.raises(ConfigError, match="label_head="):
        peftkit.DomainAdaptation(two, "coral")
    da = peftkit.DomainAdaptation(plain, "mmd")
    xs, ys, xt = _shifted_batches(3)
    with pytest.raises(ConfigError, match="same structure"):
        da.loss(xs, ys, (xt,))
    loss, _ = da.loss(xs, ys, xt)  # a plain output (no heads) is the logits
    assert math.isfinite(float(loss.detach()))


def test_a_transformers_classifier_adapts_from_dict_batches_with_its_heads_in_the_model_output() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    m = peftkit.wrap(transformers.BertForSequenceClassification(cfg), "lora", r=2,
                     heads={"label": 3, "domain": [16, 1]})
    ids = torch.randint(0, 100, (4, 8))
    source = {"input_ids": ids, "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    target = {"input_ids": ids.flip(1), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    out, feats = m.forward_with_features(**source)
    assert set(out.logits) == {"label", "domain"} and feats.shape == (4, 32)  # the pooled output enters the heads
    loss, logs = peftkit.DomainAdaptation(m, "dann").loss(source, torch.tensor([0, 1, 2, 0]), target)
    loss.backward()
    assert logs["domain_accuracy"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad and "lora_B" in n)
    plain = peftkit.wrap(transformers.BertForSequenceClassification(cfg), "lora", r=2)
    loss, _ = peftkit.DomainAdaptation(plain, "coral").loss(source, torch.tensor([0, 1, 2, 0]), target)  # .logits
    assert math.isfinite(float(loss.detach()))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_timm_models_adapt_with_dann_through_lora(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"img_size": 32} if name.startswith("vit") else {}
    net = timm.create_model(name, pretrained=False, num_classes=5, **kw)
    before = snapshot(net)
    m = peftkit.wrap(net, "lora", r=2, heads={"label": 5, "domain": [8, 1]})
    x = torch.randn(4, 3, 32, 32)
    loss, logs = peftkit.DomainAdaptation(m, "dann").loss(x, torch.tensor([0, 1, 2, 3]), x + 1)
    loss.backward()
    assert logs["coeff"] == 1.0 and any(p.grad is not None for p in m.head("domain").parameters())
    m.unwrap()
    assert_bitwise_equal(before, snapshot(net))


class _Seq(nn.Module):
    """Embedding -> LSTM -> Linear on the last step: a layer with (batch, sequence, hidden) outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.out = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(ids))
        return self.out(h[:, -1])


def test_features_of_more_dimensions_need_a_pool_and_then_compare_rows() -> None:
    torch.manual_seed(0)
    model = _Seq()
    m = peftkit.wrap(model, "lora", r=2)
    ids_s, ids_t, y = torch.randint(0, 30, (4, 7)), torch.randint(0, 30, (4, 7)), torch.tensor([0, 1, 2, 0])
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"shape \(8, 7, 12\).*pool="):
        peftkit.DomainAdaptation(m, "coral", layer="lstm").loss(ids_s, y, ids_t)
    assert_bitwise_equal(before, snapshot(model))
    seen = []

    def pool(f: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(f.shape))
        return f.mean(1)

    loss, _ = peftkit.DomainAdaptation(m, "mmd", layer="lstm", pool=pool).loss(ids_s, y, ids_t)
    assert seen == [(8, 7, 12)] and math.isfinite(float(loss.detach()))
    with torch.no_grad():
        _, h = m.forward_with_features(torch.cat([ids_s, ids_t]), layer="lstm")
        torch.testing.assert_close(loss - F.cross_entropy(m(ids_s), y), peftkit.mmd_loss(h[:4].mean(1), h[4:].mean(1)))


def test_a_discriminator_refuses_features_of_another_width_and_judges_every_position_of_maps() -> None:
    torch.manual_seed(0)
    m = peftkit.wrap(torchvision.models.resnet18(num_classes=4), "lora", r=2, heads={"label": 4, "domain": [8, 1]})
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"takes 512 features per row.*'layer3'.*\(4, 256, 2, 2\)"):
        peftkit.DomainAdaptation(m, "dann", layer="layer3").loss(x, torch.tensor([0, 1]), x + 1)

    class Seg(nn.Module):  # per-pixel classes: the output layer is a 1x1 convolution
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3, padding=1)
            self.out = nn.Conv2d(8, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.body(x)))

    for domain in (1, [4, 2]):
        seg = peftkit.wrap(Seg(), "lora", r=2, heads={"label": 3, "domain": domain})
        da = peftkit.DomainAdaptation(seg, "dann")
        loss, logs = da.loss(torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5)), torch.randn(3, 3, 5, 5))
        loss.backward()
        assert 0 <= logs["domain_accuracy"] <= 1
        assert all(p.grad is not None for p in seg.head("domain").parameters())


def test_a_discriminator_head_is_never_taken_for_the_task_and_bad_batches_are_named() -> None:
    torch.manual_seed(0)
    m = peftkit.wrap(TinyCNN(), "lora", r=2, heads={"label": 4, "domain": [8, 1]})
    xs, ys, xt = _shifted_batches(4)
    for how in ("coral", "mmd"):  # the README's "or coral, mmd" on a model with a discriminator
        assert peftkit.DomainAdaptation(m, how).label_head == "label"
    with pytest.raises(ConfigError, match="is the discriminator"):
        peftkit.DomainAdaptation(m, "dann", label_head="domain")
    da = peftkit.DomainAdaptation(m, "dann")
    with pytest.raises(ConfigError, match="rows of both domains"):
        da.loss(xs, ys, xt[:0])
    with pytest.raises(ConfigError, match="one label per source row"):
        da.loss(xs, ys[:3], xt)
    with pytest.raises(ConfigError, match="every dimension but the batch"):
        da.loss(xs, ys, torch.randn(8, 3, 10, 10))
    assert da.reversal.steps == 0  # refused steps do not advance the warm-up
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ConfigError, match="gamma="):
            peftkit.GradientReversal(warmup_steps=5, gamma=bad)
