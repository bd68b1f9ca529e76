"""Adapter files: contents, metadata, atomic writes, and every refusal leaving the model unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TinyCNN, assert_bitwise_equal, snapshot, tiny_mlp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.errors import AdapterFileError, BackboneMismatchError, UnknownMethodError


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = peftkit.wrap(TinyCNN(), "lora", r=2, init=False, train=["fc"])
    return peftkit.save(m, tmp_path / "cnn.safetensors")


def _refused(model: nn.Module, path: Path, error: type[Exception], match: str) -> None:
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=match):
        peftkit.load(model, path)
    assert_bitwise_equal(snapshot(model), before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _rewrite(src: Path, dst: Path, meta: dict[str, str] | None = None, tensors: dict | None = None) -> Path:
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst), metadata={**metadata, **(meta or {})})
    return dst


def test_metadata(saved: Path) -> None:
    h = peftkit.read_header(saved)
    assert h.method == "lora" and h.adapter == "default"
    assert h.plugin["distribution"] == "peftkit"
    assert h.config["r"] == 2
    assert h.targets["conv1"] == {"class": "Conv2d", "role": "target",
                                  "shapes": {"weight": [8, 3, 3, 3], "bias": [8]}}
    assert h.targets["fc"]["role"] == "train"
    assert set(h.backbone) == {"layout", "values"} and h.backbone["values"] is None
    assert all(isinstance(v, str) for v in h.metadata.values())
    assert not list(saved.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_another_architecture(saved: Path) -> None:
    _refused(tiny_mlp(), saved, BackboneMismatchError, "another backbone: module 'conv1' is missing")


def test_shape_mismatch(saved: Path) -> None:
    other = TinyCNN(n_out=7)
    _refused(other, saved, BackboneMismatchError, r"'fc' tensor shapes differ \(bias: file \[4\] vs model \[7\]")


def test_dtype_mismatch(saved: Path) -> None:
    _refused(TinyCNN().double(), saved, BackboneMismatchError, "dtype")


def test_truncated_file(saved: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(saved.read_bytes()[:-100])
    _refused(TinyCNN(), cut, AdapterFileError, "truncated")


def test_corrupt_header(saved: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    data = bytearray(saved.read_bytes())
    data[10:20] = b"\x00" * 10
    bad.write_bytes(bytes(data))
    _refused(TinyCNN(), bad, AdapterFileError, "not a readable safetensors file")


def test_not_a_peftkit_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    _refused(TinyCNN(), plain, AdapterFileError, "not a peftkit adapter file")


def test_missing_file(tmp_path: Path) -> None:
    _refused(TinyCNN(), tmp_path / "nope.safetensors", AdapterFileError, "does not exist")


def test_newer_format(saved: Path, tmp_path: Path) -> None:
    _refused(TinyCNN(), _rewrite(saved, tmp_path / "v9.safetensors", {"peftkit.format": "9"}), AdapterFileError,
             "format '9'")


def test_missing_plugin_says_what_to_install(saved: Path, tmp_path: Path) -> None:
    meta = {"peftkit.method": "dora", "peftkit.plugin": json.dumps({"distribution": "peftkit-dora", "version": "1.2"})}
    _refused(TinyCNN(), _rewrite(saved, tmp_path / "dora.safetensors", meta), UnknownMethodError,
             "pip install peftkit-dora")


def test_tensor_shape_mismatch_inside_file(saved: Path, tmp_path: Path) -> None:
    tensors = load_file(str(saved))
    tensors["conv1.lora_A"] = torch.zeros(3, 3, 3, 3)
    _refused(TinyCNN(), _rewrite(saved, tmp_path / "shape.safetensors", tensors=tensors), AdapterFileError,
             "conv1.lora_A")


def test_missing_tensor_inside_file(saved: Path, tmp_path: Path) -> None:
    tensors = load_file(str(saved))
    del tensors["conv1.lora_B"]
    _refused(TinyCNN(), _rewrite(saved, tmp_path / "miss.safetensors", tensors=tensors), AdapterFileError,
             "missing tensors")


def test_bad_config_in_file(saved: Path, tmp_path: Path) -> None:
    bad = _rewrite(saved, tmp_path / "cfg.safetensors", {"peftkit.config": json.dumps({"r": 2, "rank": 3})})
    _refused(TinyCNN(), bad, AdapterFileError, "config")


def test_load_adapter_refusal_leaves_adapted_model_unchanged(saved: Path) -> None:
    m = peftkit.wrap(tiny_mlp(), "lora", r=2)
    with pytest.raises(BackboneMismatchError):
        m.load_adapter(saved, name="other")
    assert m.adapter_names == ["default"]


def test_load_onto_adapted_model_and_names(saved: Path) -> None:
    torch.manual_seed(0)
    cnn = TinyCNN()
    m = peftkit.wrap(cnn, "lora", r=2)
    assert peftkit.load(m, saved, name="second") is m
    assert m.adapter_names == ["default", "second"]


def test_file_is_small_and_holds_no_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    m = peftkit.wrap(big, "lora", r=4)
    path = peftkit.save(m, tmp_path / "s.safetensors")
    tensors = load_file(str(path))
    assert set(tensors) == {"0.lora_A", "0.lora_B"}
    assert path.stat().st_size < 4 * (2 * 4 * 256) + 4096


def test_files_are_deterministic_and_standard_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = peftkit.wrap(TinyCNN(), "lora", r=2, init=False, train=["fc"])
    a = peftkit.save(m, tmp_path / "a.safetensors")
    b = peftkit.save(peftkit.load(TinyCNN(), a), tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()  # sorted keys: equal contents, equal bytes
    with safe_open(str(a), "pt") as f:  # the reference reader takes it
        keys = set(f.keys())
        assert f.metadata()["peftkit.method"] == "lora"
    assert keys == set(m.peft_adapters["default"].file_tensors())
    for k, t in load_file(str(a)).items():
        assert torch.equal(t, m.peft_adapters["default"].file_tensors()[k]), k


def _trained(model: nn.Module, seed: int, **options: object) -> peftkit.AdaptedModel:
    m = peftkit.wrap(model, "lora", r=2, train=["fc"], **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


def test_hotswap_equals_loading_and_keeps_the_same_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    other = peftkit.save(_trained(TinyCNN(), 1), tmp_path / "other.safetensors")
    torch.manual_seed(0)
    with torch.no_grad():
        want = peftkit.load(TinyCNN(), other).eval()(x)
    torch.manual_seed(0)
    m = _trained(TinyCNN(), 2).eval()
    params = list(m.parameters())
    opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.1)
    with torch.no_grad():
        before = m(x)  # fills the folded-weight cache, which the swap must drop
    assert m.hotswap(other) == "default"
    assert all(a is b for a, b in zip(params, m.parameters(), strict=True))
    with torch.no_grad():
        got = m(x)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, before)
    m.train()
    m(x).sum().backward()
    opt.step()  # the optimizer built before the swap still drives the same parameters


@pytest.mark.parametrize(("options", "match"), [
    ({"r": 3}, "other options"),
    ({"alpha": 4}, "other options"),
    ({"targets": ["conv1"]}, "adapts other modules"),
])
def test_hotswap_refuses_other_recipes(tmp_path: Path, options: dict, match: str) -> None:
    torch.manual_seed(0)
    kw = {"r": 2, "train": ["fc"], **options}
    other = peftkit.save(peftkit.wrap(TinyCNN(), "lora", **kw), tmp_path / "o.safetensors")
    torch.manual_seed(0)
    m = _trained(TinyCNN(), 2)
    before = snapshot(m)
    with pytest.raises(AdapterFileError, match=match):
        m.hotswap(other)
    assert_bitwise_equal(snapshot(m), before)


def test_hotswap_refuses_another_method_and_merged_adapters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = peftkit.save(peftkit.wrap(TinyCNN(), "parallel_adapter"), tmp_path / "p.safetensors")
    m = _trained(TinyCNN(), 2)
    with pytest.raises(AdapterFileError, match="load_adapter"):
        m.hotswap(other)
    same = peftkit.save(m, tmp_path / "same.safetensors")
    m.merge()
    with pytest.raises(peftkit.errors.ConfigError, match="unmerge"):
        m.hotswap(same)


def test_hotswap_fish_checks_the_base_values(tmp_path: Path) -> None:
    mask = {"conv1.weight": torch.tensor([0, 5, 9]), "fc.bias": torch.tensor([1])}
    torch.manual_seed(0)
    m = peftkit.wrap(TinyCNN(), "fish", mask=mask)
    same = peftkit.save(m, tmp_path / "same.safetensors")
    torch.manual_seed(1)  # the same architecture and mask, other base weights
    other = peftkit.save(peftkit.wrap(TinyCNN(), "fish", mask=mask), tmp_path / "other.safetensors")
    assert m.hotswap(same) == "default"
    with pytest.raises(BackboneMismatchError, match="other base weights"):
        m.hotswap(other)


def test_hotswap_checks_follow_a_backbone_cast_after_loading(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = peftkit.wrap(TinyCNN(), "lora", r=2, init=False)
    path = peftkit.save(m, tmp_path / "f32.safetensors")
    m.hotswap(path)  # caches what it checked
    m.double()
    with pytest.raises(BackboneMismatchError, match="dtypes"):
        m.hotswap(path)  # a float32 adapter onto the float64 backbone is refused, as load() refuses it
    m.float()
    m.hotswap(path)
