"""Weighted combinations of adapters (``AdaptedModel.combine``): every ``how`` against its definition
written out densely here, exactness of ``linear``/``cat``, task negation, and the result an ordinary
adapter (save, load, merge, PEFT export); misuse refused with the model unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import build_or_skip, call
from torch import nn

import peftkit
from peftkit.errors import ConfigError, UnknownAdapterError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.conv = nn.Conv1d(16, 12, 3, padding=1)
        self.out = nn.Linear(12, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.embed(ids)))  # (N, T, 16)
        return self.out(torch.relu(self.conv(h.transpose(1, 2))).mean(-1))


IDS = torch.randint(0, 20, (5, 7), generator=torch.Generator().manual_seed(1))
ALL = ["embed", "fc1", "conv", "out"]


def _model() -> peftkit.AdaptedModel:
    """Three LoRA adapters of different ranks, scales and targets, each moved off zero."""
    torch.manual_seed(0)
    m = peftkit.wrap(Net(), "lora", r=2, alpha=4, targets=["embed", "fc1", "conv"], name="a")
    m.add_adapter("b", "lora", r=3, alpha=3, targets=["fc1", "conv", "out"])
    m.add_adapter("c", "lora", r=4, alpha=2, rslora=True, targets=ALL)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.peft_adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _deltas(m: peftkit.AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    """Each target's whole weight change, dense, by the adapter's own delta()."""
    out = {}
    for path, adapter in m.get_adapter(name).modules.items():
        d = adapter.delta(m.base_model.get_submodule(path))["weight"]
        w = m.base_model.get_submodule(path).weight
        out[path] = d.dense(w.shape) if hasattr(d, "dense") else d
    return out


# -- the definitions, written out densely and independently of peftkit.combination --------------
def _trim(d: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * d.numel())
    flat = d.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().argsort(descending=True)[:k]] = True
    return torch.where(keep.view(d.shape), d, torch.zeros_like(d))


def _ties(ds: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
    t = [w * d for w, d in zip(ws, ds, strict=True)]
    elected = torch.where(sum(t) >= 0, 1.0, -1.0)  # PEFT's election: a tie counts as positive
    num = sum(torch.where((torch.sign(x) == elected) & (x != 0), x, torch.zeros_like(x)) for x in t)
    count = sum(((torch.sign(x) == elected) & (x != 0)).float() for x in t)
    return num / torch.clamp(count, min=1)


def _dare(d: torch.Tensor, density: float, g: torch.Generator) -> torch.Tensor:
    keep = torch.rand(d.shape, generator=g) < density
    return torch.where(keep, d / density, torch.zeros_like(d))


WEIGHTS = {"a": 0.7, "b": -0.4, "c": 1.3}


def _expected(m: peftkit.AdaptedModel, how: str, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Target by target in the order the targets first appear (a's, then b's new one), each adapter
    with a target there in the weights' order (DARE's random draws follow that order)."""
    deltas = {n: _deltas(m, n) for n in WEIGHTS}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in ["embed", "fc1", "conv", "out"]:
        members = [n for n in WEIGHTS if path in deltas[n]]
        ws = [WEIGHTS[n] for n in members]
        ds = [deltas[n][path] for n in members]
        if how in ("linear", "cat", "svd"):
            out[path] = sum(w * d for w, d in zip(ws, ds, strict=True))
        elif how == "ties":
            out[path] = _ties([_trim(d, density) for d in ds], ws)
        elif how == "dare_linear":
            out[path] = sum(w * _dare(d, density, g) for w, d in zip(ws, ds, strict=True))
        else:
            out[path] = _ties([_dare(d, density, g) for d in ds], ws)
    return out


@pytest.mark.parametrize("how", ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"])
def test_each_how_is_its_definition(how: str) -> None:
    m = _model()
    # a rank as large as every target's smaller side: the rank-limited ones are then exact too
    m.combine(WEIGHTS, "combined", how, density=0.5, seed=7, rank=16)
    got = _deltas(m, "combined")
    assert set(got) == set(ALL)
    want = _expected(m, how, 0.5, 7)
    for path in ALL:
        torch.testing.assert_close(got[path], want[path], atol=1e-5, rtol=1e-4, msg=lambda s, p=path: f"{p}: {s}")


def test_svd_keeps_the_best_low_rank_approximation() -> None:
    m = _model()
    m.combine(WEIGHTS, "low", "svd", rank=2)
    got = _deltas(m, "low")
    want = _expected(m, "linear", 1.0, 0)
    for path in ALL:
        w2d = want[path].reshape(want[path].shape[0], -1) if path != "embed" else want[path]
        s = torch.linalg.svdvals(w2d)
        g2d = got[path].reshape(w2d.shape)
        assert torch.linalg.matrix_rank(g2d, atol=1e-4) <= 2
        # the error of the best rank-2 approximation is the norm of the remaining singular values
        torch.testing.assert_close(torch.linalg.norm(w2d - g2d), s[2:].norm(), atol=1e-4, rtol=1e-3)
    assert m.get_adapter("low").method.config.r == 2


def test_cat_and_linear_with_weights_one_run_as_the_adapters_together() -> None:
    m = _model().eval()
    m.set_adapter(["a", "b", "c"])
    with torch.no_grad():
        together = m(IDS)
        for how in ("cat", "linear"):
            m.combine({"a": 1, "b": 1, "c": 1}, how, how)
            m.set_adapter(how)
            torch.testing.assert_close(m(IDS), together, atol=1e-5, rtol=1e-5)
    assert m.get_adapter("cat").method.config.r == 2 + 3 + 4


def test_task_negation_undoes_the_adapter() -> None:
    m = _model().eval()
    with torch.no_grad():
        with m.disable_adapters():
            base = m(IDS)
        m.combine({"a": -1.0}, "not_a", "linear")
        m.set_adapter(["a", "not_a"])
        torch.testing.assert_close(m(IDS), base, atol=1e-5, rtol=1e-5)


def test_dare_is_seeded() -> None:
    m = _model()
    for name, seed in (("x", 1), ("y", 1), ("z", 2)):
        m.combine(WEIGHTS, name, "dare_ties", density=0.3, seed=seed, rank=16)
    x, y, z = (_deltas(m, n) for n in "xyz")
    assert all(torch.equal(x[p], y[p]) for p in ALL)
    assert not all(torch.allclose(x[p], z[p]) for p in ALL)


def test_the_result_is_an_ordinary_adapter(tmp_path: Path) -> None:
    m = _model().eval()
    m.combine(WEIGHTS, "ties", "ties", density=0.6)
    m.set_adapter("ties")
    assert all(p.requires_grad for p in m.get_adapter("ties").modules.parameters())
    with torch.no_grad():
        y = m(IDS)
        path = peftkit.save(m, tmp_path / "ties.safetensors", adapter="ties")
        loaded = peftkit.load(Net_like(m), path)
        torch.testing.assert_close(loaded.eval()(IDS), y, atol=0, rtol=0)
        m.merge()
        torch.testing.assert_close(m(IDS), y, atol=1e-5, rtol=1e-5)
        m.unmerge()
    pytest.importorskip("peft")
    m.delete_adapter("c")  # PEFT's LoRA has no embedding + conv1d mix issue, but one adapter per export
    peftkit.export_peft(m, str(tmp_path / "peft"), adapter="ties")
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()


def Net_like(m: peftkit.AdaptedModel) -> nn.Module:  # noqa: N802 (reads as a constructor)
    """A fresh backbone with the same weights as ``m``'s."""
    fresh = Net()
    fresh.load_state_dict(m.base_model.state_dict())
    return fresh


@pytest.mark.parametrize("arch", ["bert", "gpt2", "resnet18"])
def test_real_architectures(arch: str) -> None:
    a, model = build_or_skip(arch)
    m = peftkit.wrap(model, "lora", r=2, name="a")
    m.add_adapter("b", "lora", r=4)
    with torch.no_grad():
        for p in m.peft_adapters.parameters():
            p.normal_(0, 0.05)
        m.set_adapter(["a", "b"])
        inputs = a.input()
        together = call(m, inputs)
        m.combine({"a": 1, "b": 1}, "ab", "cat")
        m.set_adapter("ab")
        for t, u in zip(_tensors(call(m, inputs)), _tensors(together), strict=True):
            torch.testing.assert_close(t, u, atol=1e-4, rtol=1e-4)


def _tensors(out: Any) -> list[torch.Tensor]:
    from architectures import flatten

    return flatten(out)


def test_misuse_is_refused_and_changes_nothing() -> None:
    m = _model()
    m.add_adapter("dora", "lora", r=2, dora=True, targets=["fc1"])
    m.add_adapter("serial", "serial_adapter")
    m.add_adapter("head", "lora", r=2, targets=["fc1"], head=3)
    names = m.adapter_names
    cases: list[tuple[dict[str, Any], str, type[Exception]]] = [
        ({"weights": {"a": 1, "serial": 1}}, "one method", ConfigError),
        ({"weights": {"a": 1, "nope": 1}}, "nope", UnknownAdapterError),
        ({"weights": {}}, "adapter name -> weight", ConfigError),
        ({"weights": {"a": float("nan")}}, "finite", ConfigError),
        ({"weights": {"a": True}}, "finite", ConfigError),
        ({"weights": {"a": 1}, "how": "average"}, "not a combination", ConfigError),
        ({"weights": {"a": 1}, "how": "ties", "density": 0}, "density", ConfigError),
        ({"weights": {"a": 1}, "how": "svd", "rank": 0}, "rank", ConfigError),
        ({"weights": {"a": 1, "dora": 1}}, "DoRA", ConfigError),
        ({"weights": {"a": 1, "head": 1}}, "whole modules or heads", ConfigError),
        ({"weights": {"serial": 1}}, "cannot combine", ConfigError),
        ({"weights": {"a": 1}, "name": "b"}, "already exists", UnknownAdapterError),
    ]
    for kwargs, match, error in cases:
        kwargs = {"name": "new", **kwargs}
        with pytest.raises(error, match=match):
            m.combine(kwargs.pop("weights"), **kwargs)
        assert m.adapter_names == names


def _fish_model() -> peftkit.AdaptedModel:
    """Two FISH adapters with overlapping positions, and values moved off zero."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    m = peftkit.wrap(Net(), "fish", name="f1", mask={"fc1.weight": torch.randperm(128, generator=g)[:40],
                                                     "conv.bias": torch.tensor([0, 3, 5])})
    m.add_adapter("f2", "fish", mask={"fc1.weight": torch.randperm(128, generator=g)[:40],
                                      "out.weight": torch.tensor([1, 2, 30])})
    with torch.no_grad():
        for p in m.peft_adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _fish_dense(m: peftkit.AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    """Parameter name -> the adapter's dense change to it."""
    out = {}
    for path, adapter in m.get_adapter(name).modules.items():
        module = m.base_model.get_submodule(path)
        for leaf, d in adapter.delta(module).items():
            base = module.get_parameter(leaf)
            out[f"{path}.{leaf}"] = torch.zeros(base.numel()).index_add(0, d.index, d.values.detach()).view(base.shape)
    return out


@pytest.mark.parametrize("how", ["linear", "svd", "ties", "dare_linear"])
def test_fish_deltas_combine_by_their_definition(how: str) -> None:
    m = _fish_model()
    weights = {"f1": 0.6, "f2": -1.2}
    m.combine(weights, "c", how, density=0.5, seed=3)
    got = _fish_dense(m, "c")
    parts = {n: _fish_dense(m, n) for n in weights}
    g = torch.Generator().manual_seed(3)
    for param in ["fc1.weight", "conv.bias", "out.weight"]:  # the order the targets first appear
        members = [n for n in weights if param in parts[n]]
        ws, ds = [weights[n] for n in members], [parts[n][param] for n in members]
        if how in ("linear", "svd"):
            want = sum(w * d for w, d in zip(ws, ds, strict=True))
        elif how == "ties":
            want = _ties([_trim(d, 0.5) for d in ds], ws)
        else:
            want = sum(w * _dare(d, 0.5, g) for w, d in zip(ws, ds, strict=True))
        torch.testing.assert_close(got[param], want, atol=1e-6, rtol=1e-5, msg=lambda s, p=param: f"{p}: {s}")


def test_fish_linear_with_weights_one_runs_as_both(tmp_path: Path) -> None:
    m = _fish_model().eval()
    m.set_adapter(["f1", "f2"])
    with torch.no_grad():
        both = m(IDS)
        m.combine({"f1": 1, "f2": 1}, "sum")
        m.set_adapter("sum")
        torch.testing.assert_close(m(IDS), both, atol=1e-5, rtol=1e-5)
        path = peftkit.save(m, tmp_path / "sum.safetensors", adapter="sum")
        torch.testing.assert_close(peftkit.load(Net_like(m), path).eval()(IDS), m(IDS), atol=0, rtol=0)


def test_numbers_of_any_kind_and_ranks_past_the_layer() -> None:
    np = pytest.importorskip("numpy")
    m = _model()
    m.combine({"a": np.float32(0.5), "b": np.int64(1)}, "np", "linear")
    m.combine(WEIGHTS, "big", "svd", rank=10**6)  # capped at each layer's smaller side (conv: 12 x 48)
    assert m.get_adapter("big").method.config.r == 12
    torch.testing.assert_close(_deltas(m, "big")["fc1"], _expected(m, "linear", 1.0, 0)["fc1"], atol=1e-5, rtol=1e-4)
    for seed in (1.5, True, -1, 2**70):
        with pytest.raises(ConfigError, match="seed"):
            m.combine(WEIGHTS, "s", "dare_linear", seed=seed)


def test_a_fish_mask_past_the_end_of_its_tensor_is_refused() -> None:
    with pytest.raises(ConfigError, match="outside fc1.weight"):
        peftkit.wrap(Net(), "fish", mask={"fc1.weight": torch.tensor([0, 128])})
