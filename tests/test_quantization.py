"""QLoRA: ``peftkit.quantize`` (torchao and bitsandbytes, NF4 and int8), adapters on quantized
backbones (identity at init, the quantized data bitwise unchanged, gradients to every adapter
tensor), the same adapter file as on the float backbone, merge refused, ``unwrap(merge=True)``."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import ConfigError, MergeError, QuantizationWarning, TargetError
from peftkit.quantized import dequantize, is_quantized, logical_tensors, quantization_of

BACKENDS = [b for b in ("torchao", "bitsandbytes") if importlib.util.find_spec(b) is not None]
COMBOS = [(b, s) for b in BACKENDS for s in ("nf4", "int8")]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="needs torchao or bitsandbytes (pip install 'peftkit[quant]')")
EXPECTED_KIND = {("torchao", "nf4"): "nf4", ("torchao", "int8"): "int8", ("bitsandbytes", "nf4"): "bnb-nf4",
                 ("bitsandbytes", "int8"): "bnb-int8"}


class Net(nn.Module):
    """Two hidden Linear layers of 128 x 128 (16,384 weights: one torchao NF4 block) and an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(128, 128)
        self.b = nn.Linear(128, 128)
        self.fc = nn.Linear(128, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.relu(self.b(torch.relu(self.a(x)))))
        return out


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def quantized(backend: str, scheme: str, seed: int = 0) -> Net:
    model = net(seed)
    out = peftkit.quantize(model, scheme, backend=backend)
    assert out is model
    return model.eval()  # bitsandbytes' int8 layers compute otherwise in training mode


def raw(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor, quantized ones by their inner data (what "bitwise unchanged" compares)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue
        if type(t).__module__.startswith("torchao"):
            inner, _ = t.__tensor_flatten__()
            out.update({f"{name}:{k}": getattr(t, k).detach().clone() for k in inner})
        else:
            out[name] = t.detach().clone()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


@dataclass(frozen=True)
class NoOptions:
    pass


X = torch.randn(6, 128, generator=torch.Generator().manual_seed(1))


# -- quantize ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_quantize_stores_the_hidden_layers_in_low_bits_and_keeps_the_output_layer(backend: str, scheme: str) -> None:
    model = quantized(backend, scheme)
    report = model.peftkit_quantization
    assert report.quantized == ["a", "b"] and list(report.skipped) == ["fc"]
    assert "output layer" in report.skipped["fc"]
    assert quantization_of(model.a.weight) == EXPECTED_KIND[(backend, scheme)]
    assert not is_quantized(model.fc.weight) and not is_quantized(model.a.bias)
    # 4.1 or 8.x bits per weight against float32's 32
    assert report.bytes_after / report.bytes_before < (0.15 if scheme == "nf4" else 0.27)
    assert "2 Linear layers quantized" in str(report) and "fc" in str(report)
    # the logical view: what the float layer holds
    shapes = {k: (list(s), d) for k, (s, d, _) in logical_tensors(model.a).items()}
    assert shapes == {"weight": ([128, 128], torch.float32), "bias": ([128], torch.float32)}
    w = dequantize(model.a.weight, model.a)
    assert w.shape == (128, 128) and w.dtype == torch.float32
    reference = net()
    error = (w - reference.a.weight).abs().max() / reference.a.weight.abs().max()
    assert error < (0.2 if scheme == "nf4" else 0.02)  # 16 levels per block, or 255 per row
    torch.testing.assert_close(model(X), reference.eval()(X), atol=0.1, rtol=0.1)


@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_quantize_takes_named_targets(backend: str, scheme: str) -> None:
    model = net()
    peftkit.quantize(model, scheme, ["b"], backend=backend)
    assert model.peftkit_quantization.quantized == ["b"]
    assert is_quantized(model.b.weight) and not is_quantized(model.a.weight)


def test_quantize_reports_every_layer_it_keeps_in_float_and_why() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 128)
            self.small = nn.Linear(128, 100)  # 12,800 weights: no whole NF4 block (and never called)
            self.attn = nn.MultiheadAttention(128, 4)  # out_proj is read by the attention itself
            self.mid = nn.Linear(128, 256)
            self.head = nn.Linear(256, 10, bias=False)
            self.tied = nn.Linear(128, 10, bias=False)
            self.tied.weight = self.emb.weight  # tied weights: (10, 128)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.emb(ids)
            h = self.attn(h, h, h)[0]
            return self.head(self.mid(h)) + self.tied(h)

    if "torchao" not in BACKENDS:
        pytest.skip("needs torchao")
    model = Odd()
    peftkit.quantize(model, "nf4", backend="torchao", keep_output_layer=False)
    report = model.peftkit_quantization
    assert report.quantized == ["mid"]
    assert "NF4 blocks" in report.skipped["small"]
    assert "reads its weight directly" in report.skipped["attn.out_proj"]
    assert "tied" in report.skipped["tied"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_quantize_leaves_quantized_layers_alone(backend: str) -> None:
    model = quantized(backend, "nf4")
    with pytest.raises(ConfigError, match="no Linear layer to quantize.*already quantized"):
        peftkit.quantize(model, "nf4", backend=backend)


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    (("nf8",), {}, ConfigError, "scheme='nf8' is invalid"),
    (("nf4",), {"backend": "cuda"}, ConfigError, "backend='cuda' is invalid"),
    (("nf4", "a"), {}, ConfigError, "targets='a' is invalid"),
    (("nf4", ["nothing"]), {}, TargetError, "matches no Linear"),
    (("nf4", ["fc"]), {"backend": "torchao"}, TargetError, "'fc' cannot be quantized.*NF4 blocks"),
    (("nf4",), {"keep_output_layer": "yes"}, ConfigError, "keep_output_layer"),
])
def test_quantize_refuses_bad_arguments_and_changes_nothing(args: tuple[Any, ...], kwargs: dict[str, Any],
                                                            error: type[Exception], match: str) -> None:
    if kwargs.get("backend") == "torchao" and "torchao" not in BACKENDS:
        pytest.skip("needs torchao")
    model = net()
    before = raw(model)
    with pytest.raises(error, match=match):
        peftkit.quantize(model, *args, **kwargs)
    assert_same(raw(model), before)
    assert "peftkit_quantization" not in vars(model)


def test_quantize_refuses_a_wrapped_model() -> None:
    model = net()
    m = peftkit.wrap(model, "lora", r=2)
    for given in (m, model):
        with pytest.raises(ConfigError, match="before wrapping"):
            peftkit.quantize(given, "nf4")


def test_a_missing_backend_is_named_with_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def without_backends(name: str, *args: Any) -> Any:
        if name in ("torchao", "bitsandbytes"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_backends)
    with pytest.raises(ConfigError, match=r"pip install \"peftkit\[torchao\]\".*peftkit\[bitsandbytes\]"):
        peftkit.quantize(net(), "nf4")
    with pytest.raises(ConfigError, match=r"pip install \"peftkit\[bitsandbytes\]\""):
        peftkit.quantize(net(), "nf4", backend="bitsandbytes")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failure_half_way_puts_every_layer_back(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftkit import quantization

    model = net()
    before = raw(model)
    modules = dict(model.named_modules())
    classes = [type(m) for m in modules.values()]
    calls = {"n": 0}
    real = quantization._torchao_weight if backend == "torchao" else quantization._bnb_layer

    def second_fails(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(quantization, "_torchao_weight" if backend == "torchao" else "_bnb_layer", second_fails)
    with pytest.raises(KeyboardInterrupt):
        peftkit.quantize(model, "nf4", backend=backend)
    assert calls["n"] == 2
    assert_same(raw(model), before)
    assert dict(model.named_modules()) == modules and not is_quantized(model.a.weight)
    assert [type(m) for m in model.modules()] == classes  # torchao's NF4Linear is a plain Linear again


# -- adapters on quantized backbones ---------------------------------------------------------------
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("lora", {"r": 4}), ("lora", {"r": 4, "dora": True}), ("lora", {"r": 4, "init": "pissa"}),
    ("lora", {"r": 4, "bias": "all"}), ("serial_adapter", {}), ("parallel_adapter", {}),
    ("lora", {"r": 4, "train": ["fc"]}), ("ia3", {}),
]
# plain LoRA on every backend and scheme; the other methods on each backend's NF4 (int8 differs in storage only)
CASES = [(b, s, m, o) for (b, s) in COMBOS for m, o in METHODS if (m, o) == METHODS[0] or s == "nf4"]


@pytest.mark.parametrize(("backend", "scheme", "method", "options"), CASES, ids=lambda v: str(v))
def test_adapters_train_beside_quantized_layers_which_never_change(backend: str, scheme: str, method: str,
                                                                  options: dict[str, Any]) -> None:
    model = quantized(backend, scheme)
    y0 = model(X).detach()
    before = raw(model)
    m = peftkit.wrap(model, method, **options)
    torch.testing.assert_close(m(X), y0, atol=1e-5, rtol=1e-5)  # identity at init
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(p.is_floating_point() for p in trainable.values())
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(m(X), torch.arange(6) % 5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # by the second step every tensor gets a gradient (on the first, LoRA's A does not: B starts at 0)
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, f"no gradient reached {missing}"
    m.eval()
    assert not torch.allclose(m(X), y0)  # the adapter learned something
    m.unwrap()
    assert_same(raw(model), before)  # the quantized data (and every float tensor) bitwise unchanged


@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_lora_wraps_a_quantized_layer_without_dequantizing_it(backend: str, scheme: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA's default factors need only the weight's shape, dtype and device: wrapping dequantizes
    nothing (a whole model's float weights would otherwise be formed, and left behind in the heap,
    at wrap). PiSSA and DoRA, which read the weight's values, still get the dequantized weight."""
    import peftkit_plugins.lora as lora

    calls: list[torch.Size] = []
    original = lora.dequantize
    monkeypatch.setattr(lora, "dequantize", lambda t, module=None: calls.append(t.shape) or original(t, module))
    m = peftkit.wrap(quantized(backend, scheme), "lora", r=4, targets=["a", "b"])
    assert not calls
    floats = peftkit.wrap(net(), "lora", r=4, targets=["a", "b"])
    assert {n: (p.shape, p.dtype) for n, p in m.named_parameters() if p.requires_grad} == {
        n: (p.shape, p.dtype) for n, p in floats.named_parameters() if p.requires_grad}
    peftkit.wrap(quantized(backend, scheme), "lora", r=4, targets=["a"], dora=True)
    assert calls  # DoRA's magnitudes are norms of the float weight


_RESIDENT_AFTER_QUANTIZE = """
import os, sys, torch
from torch import nn
import peftkit

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

torch.set_num_threads(1)
big = torch.empty(8 * 2**20)
del big  # glibc's mmap threshold rises: the weights below come from its heap, as a model's often do
model = nn.Sequential(*[m for _ in range(64) for m in (nn.Linear(512, 512, bias=False), nn.ReLU())],
                      nn.Linear(512, 2))  # 64 MB
peftkit.quantize(nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 2)), "nf4")  # the backend's one-time set-up
before = rss()
peftkit.quantize(model, "nf4")
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or importlib.util.find_spec("torchao") is None,
                    reason="glibc's heap, torchao")
def test_quantize_gives_the_float_weights_memory_back() -> None:
    """Quantizing 64 MB of float32 Linear weights to NF4 leaves the process smaller (by the weights
    less their 4-bit form, about 56 MB), not larger: torchao's temporaries and the freed weights
    stayed resident in glibc's heap (45 MB more than before quantizing here, up to 437 MB in other
    layouts tried) until quantize returned the free pages (malloc_trim)."""
    proc = subprocess.run([sys.executable, "-c", _RESIDENT_AFTER_QUANTIZE], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown = float(proc.stdout.strip().splitlines()[-1])
    assert grown < 0, f"resident memory grew by {grown:.0f} MB while quantizing"


@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_multitask_heads_replace_a_float_output_layer(backend: str, scheme: str) -> None:
    m = peftkit.wrap(quantized(backend, scheme), "lora", r=2, heads={"x": 3, "y": [16, 2]})
    out = m(X)
    assert out["x"].shape == (6, 3) and out["y"].shape == (6, 2)
    (out["x"].sum() + out["y"].sum()).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("method", "options", "match"), [
    ("lora", {"train": ["a"], "targets": ["b"]}, r"train=\['a'\] trains a copy.*quantized"),
    ("fish", {"mask": {"a.weight": [0, 1]}}, "a.weight, which is quantized"),
])
def test_what_would_write_a_quantized_weight_is_refused(backend: str, method: str, options: dict[str, Any],
                                                        match: str) -> None:
    model = quantized(backend, "nf4")
    before = raw(model)
    with pytest.raises(TargetError, match=match):
        peftkit.wrap(model, method, **options)
    assert_same(raw(model), before)
    assert not peftkit.attach.slots_in(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fish_picks_only_float_entries_on_a_quantized_backbone(backend: str) -> None:
    model = quantized(backend, "nf4")
    before = raw(model)
    m = peftkit.wrap(model, "fish", keep=0.2, samples=6, data=[(X, torch.arange(6) % 5)])
    picked = [n for n, _ in m.named_parameters() if n.endswith("_delta")]
    assert picked and not any(n.startswith(("a.weight", "b.weight")) for n in picked)
    m.merge()  # FISH's deltas go to float tensors only: they merge
    m.unmerge()
    m.unwrap()
    assert_same(raw(model), before)


def test_a_plugin_without_an_output_form_cannot_touch_a_quantized_weight(register_plugin: Any) -> None:
    class Scale(peftkit.Adapter):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.zeros(()))

        def delta(self, module: nn.Module) -> dict[str, torch.Tensor]:
            return {"weight": self.s * torch.ones(module.out_features, module.in_features)}

    class WeightOnly(peftkit.Method):
        name = "weight_only_test"
        Config = NoOptions
        adapts = (nn.Linear,)

        def build(self, path: str, module: nn.Module, spec: dict[str, Any]) -> peftkit.Adapter:
            return Scale(module)

    class Plugin:
        @peftkit.hookimpl
        def register_methods(self, register: Any) -> None:
            register(WeightOnly)

    register_plugin(Plugin(), "weight-only-test")
    model = quantized(BACKENDS[0], "nf4")
    with pytest.raises(TargetError, match=r"cannot adapt 'a'.*quantized.*W \+ delta"):
        peftkit.wrap(model, "weight_only_test", targets=["a"])
    peftkit.wrap(model, "weight_only_test", targets=["fc"]).unwrap()  # the float output layer: fine


# -- files -----------------------------------------------------------------------------------------
def _trained(model: nn.Module, method: str = "lora", **options: Any) -> peftkit.AdaptedModel:
    m = peftkit.wrap(model, method, **({"r": 4} if method == "lora" else {}), **options)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        loss = m(X).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_the_adapter_file_is_the_float_backbones_and_loads_on_both(backend: str, scheme: str, tmp_path: Path) -> None:
    m = _trained(quantized(backend, scheme))
    y = m(X).detach()
    path = peftkit.save(m, tmp_path / "q.safetensors")
    float_file = peftkit.save(peftkit.wrap(net(), "lora", r=4), tmp_path / "f.safetensors")
    header, float_header = peftkit.read_header(path), peftkit.read_header(float_file)
    assert header.tensors == float_header.tensors  # the same tensors, shapes and dtypes
    assert header.targets == float_header.targets  # the same classes and (float) shapes
    assert header.backbone["layout"] == float_header.backbone["layout"]
    kind = EXPECTED_KIND[(backend, scheme)]
    assert header.backbone["quantization"] == {"a.weight": kind, "b.weight": kind}
    assert "quantization" not in float_header.backbone
    # onto the same quantized backbone: exactly the outputs seen after training, and no note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = peftkit.load(quantized(backend, scheme), path).eval()
    torch.testing.assert_close(again(X), y, atol=0, rtol=0)
    # onto the float backbone (how a QLoRA adapter ships): allowed, with a note; the float weights
    # differ from the quantized ones by the rounding only
    with pytest.warns(QuantizationWarning, match=rf"quantized as {kind} \(2 tensors\); this backbone is float.*QLoRA"):
        on_float = peftkit.load(net(), path).eval()
    torch.testing.assert_close(on_float(X), y, atol=0.1, rtol=0.1)
    # and a float-trained adapter onto a quantized backbone: a note too
    with pytest.warns(QuantizationWarning, match="trained on a backbone quantized as float.*this backbone is"):
        peftkit.load(quantized(backend, scheme), float_file)


def test_a_malformed_quantization_table_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = peftkit.save(_trained(quantized(BACKENDS[0], "nf4")), tmp_path / "q.safetensors")
    meta = dict(peftkit.read_header(path).metadata)
    meta["peftkit.backbone"] = meta["peftkit.backbone"].replace('"quantization":{', '"quantization":{"x":1,')
    save_file(load_file(path), tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(peftkit.errors.AdapterFileError, match="'quantization' is malformed"):
        peftkit.read_header(tmp_path / "bad.safetensors")


# -- merge -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
def test_merge_is_refused_and_changes_nothing(backend: str, scheme: str) -> None:
    model = quantized(backend, scheme)
    before = raw(model)
    m = _trained(model)
    y = m(X).detach()
    with pytest.raises(MergeError, match=r"cannot merge into a\.weight: it is quantized.*rounds.*unwrap\(merge=True\)"):
        m.merge()
    assert not m.merged
    torch.testing.assert_close(m(X), y, atol=0, rtol=0)
    m.unwrap()
    assert_same(raw(model), before)


@pytest.mark.parametrize(("backend", "scheme"), COMBOS)
@pytest.mark.parametrize("dora", [False, True])
def test_unwrap_merge_gives_a_float_model_of_the_dequantized_weights_plus_the_delta(backend: str, scheme: str,
                                                                                  dora: bool) -> None:
    model = quantized(backend, scheme)
    m = _trained(model, dora=dora)
    # the reference: the float model holding the dequantized weights, with the adapter unmerged
    reference = net()
    with torch.no_grad():
        for name in ("a", "b"):
            layer = getattr(model, name)
            getattr(reference, name).weight.copy_(dequantize(layer.weight, layer))
    ref = peftkit.wrap(reference, "lora", r=4, dora=dora)
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("peft_adapters.")}, strict=False)
    expected = ref.eval()(X).detach()
    base = m.unwrap(merge=True)
    assert base is model
    assert [type(c) for c in base.children()] == [nn.Linear] * 3
    assert not any(is_quantized(p) for p in base.parameters())
    assert all(p.dtype == torch.float32 for p in base.parameters())
    assert not base.a.weight.requires_grad  # as the quantized weight was (the other tensors keep their own flags)
    torch.testing.assert_close(base.eval()(X), expected, atol=1e-5, rtol=1e-5)
    peftkit.quantize(base, scheme, backend=backend)  # re-quantized, if one wishes
    assert is_quantized(base.a.weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("method", "options"), [("ia3", {}), ("lora", {"bias": "all"})], ids=["ia3", "lora-bias"])
def test_a_delta_computed_from_the_weight_merges_on_the_dequantized_one(backend: str, method: str,
                                                                        options: dict[str, Any]) -> None:
    """IA3's delta is ``(scale - 1) * weight``: asked which tensors it changes, the plugin is given a float
    stand-in (a quantized weight takes no arithmetic), then the dequantized weight for the merge."""
    model = quantized(backend, "nf4")
    m = _trained(model, method, **options)
    with pytest.raises(MergeError, match=r"cannot merge into a\.weight: it is quantized"):
        m.merge()
    reference = net()
    with torch.no_grad():
        for name in ("a", "b"):
            layer = getattr(model, name)
            getattr(reference, name).weight.copy_(dequantize(layer.weight, layer))
    ref = peftkit.wrap(reference, method, **({"r": 4} if method == "lora" else {}), **options)
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("peft_adapters.")}, strict=False)
    expected = ref.eval()(X).detach()
    torch.testing.assert_close(m(X), expected, atol=1e-5, rtol=1e-5)
    base = m.unwrap(merge=True)
    assert [type(c) for c in base.children()] == [nn.Linear] * 3 and not any(is_quantized(p) for p in base.parameters())
    torch.testing.assert_close(base.eval()(X), expected, atol=1e-5, rtol=1e-5)


def test_a_failed_unwrap_merge_puts_the_quantized_weights_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model = quantized(BACKENDS[0], "nf4")
    m = _trained(model)
    before = raw(model)
    y = m(X).detach()

    def fails(*args: Any) -> None:
        raise MergeError("merging adapter 'default' would put NaN/inf into a.weight; nothing was merged")

    monkeypatch.setattr(type(m), "_check_mergeable", fails)
    with pytest.raises(MergeError, match="NaN"):
        m.unwrap(merge=True)
    assert is_quantized(model.a.weight)
    assert_same(raw(model), before)
    torch.testing.assert_close(m(X), y, atol=0, rtol=0)


# -- real architectures ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_qlora_on_a_llama_shaped_transformer(backend: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    float_model = copy.deepcopy(model)
    peftkit.quantize(model, "nf4", backend=backend)
    report = model.peftkit_quantization
    assert "lm_head" in report.skipped and len(report.quantized) == 2 * 7 - (4 if backend == "torchao" else 0)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    y0 = model(ids).logits.detach()
    m = peftkit.wrap(model, "lora", r=4, targets=["q_proj", "v_proj", "up_proj"])
    torch.testing.assert_close(m(ids).logits, y0, atol=1e-5, rtol=1e-5)
    out = m(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    path = peftkit.save(m, tmp_path / "qlora.safetensors")
    with pytest.warns(QuantizationWarning):
        peftkit.load(float_model, path)


def test_a_model_transformers_loads_with_a_bitsandbytes_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    for options, kind in (({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                            "bnb_4bit_compute_dtype": torch.float32}, "bnb-nf4"), ({"load_in_8bit": True}, "bnb-int8")):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "model", quantization_config=transformers.BitsAndBytesConfig(**options), device_map="cpu").eval()
        y0 = model(ids).logits.detach()
        m = peftkit.wrap(model, "lora", r=4, targets=["q_proj", "v_proj"])
        torch.testing.assert_close(m(ids).logits, y0, atol=1e-5, rtol=1e-5)
        m(ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
        path = peftkit.save(m, tmp_path / f"{kind}.safetensors")
        assert set(peftkit.read_header(path).backbone["quantization"].values()) == {kind}
        with pytest.warns(QuantizationWarning):
            peftkit.load(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model"), path)


def test_a_model_quantized_with_torchao_directly() -> None:
    torchao = pytest.importorskip("torchao")
    model = net()
    torchao.quantization.quantize_(model, torchao.quantization.Int8WeightOnlyConfig())  # every Linear, fc too
    assert quantization_of(model.fc.weight) == "int8"
    y0 = model(X).detach()
    m = peftkit.wrap(model, "lora", r=2, head=3)  # a fresh float head replaces the quantized output layer
    assert m(X).shape == (6, 3)
    m.unwrap()
    m = peftkit.wrap(model, "lora", r=2)
    torch.testing.assert_close(m(X), y0, atol=1e-5, rtol=1e-5)
    with pytest.raises(MergeError, match="quantized"):
        m.merge()


_HEAP_PROBE = """
import os, sys, torch
from peftkit.quantization import set_mmap_threshold
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if sys.argv[1] == "set":
    assert set_mmap_threshold() is True
a = torch.ones(6 << 20); del a  # 24 MB, mapped on its own: freeing it raises glibc's threshold to 24 MB
w = torch.ones(4 << 20)  # 16 MB: a dequantized weight, say
live = torch.ones(1000)  # and an activation made while it was alive
before = rss()
del w
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_set_mmap_threshold_gives_freed_temporaries_back_and_checks_its_argument() -> None:
    returned = {mode: float(subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True,
                                           check=True).stdout) for mode in ("default", "set")}
    assert returned["default"] < 2 and returned["set"] > 14, returned  # MB of a freed 16 MB block
    for bad in (-1, 33 * 2**20, 1.5, True, "64k"):
        with pytest.raises(ConfigError, match="size=.*invalid; expected bytes from 0 to 33554432"):
            peftkit.quantization.set_mmap_threshold(bad)  # type: ignore[arg-type]


def test_set_mmap_threshold_says_when_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert peftkit.quantization.set_mmap_threshold() is False
