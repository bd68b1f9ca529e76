"""FISH: the Fisher estimate, exact masks, bitwise-exact sparse training, files and swaps."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, TinyModel, assert_bitwise_equal, snapshot
from peftkit_plugins.fish import decode_gaps, encode_gaps
from torch import nn

import peftkit
from peftkit.errors import BackboneMismatchError, ConfigError


def _data(tiny: TinyModel, n: int = 8) -> list:
    g = torch.Generator().manual_seed(3)
    x = torch.cat([tiny.input()] * 4)[:n]
    return [(x, torch.randint(0, 3, (x.shape[0],), generator=g))]


@pytest.mark.parametrize("tiny", TINY_MODELS, ids=lambda t: t.name)
def test_vectorised_fisher_equals_the_loop(tiny: TinyModel) -> None:
    model = tiny.fresh()
    data = _data(tiny)
    fast = peftkit.fisher_information(model, data, samples=8, vectorize=True, progress=False)
    slow = peftkit.fisher_information(model, data, samples=8, vectorize=False, progress=False)
    assert fast.keys() == slow.keys() == {n for n, _ in model.named_parameters()}
    for n in fast:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-9)
    assert model.training  # mode restored


def test_fisher_restores_every_module_s_own_mode() -> None:
    tiny = TINY_MODELS[1]  # CNN with BatchNorm
    model = tiny.fresh()
    model.bn1.eval()  # e.g. frozen statistics, set by the user before wrapping
    modes = [m.training for m in model.modules()]
    peftkit.fisher_information(model, _data(tiny), samples=4, progress=False)
    assert [m.training for m in model.modules()] == modes


class _NeedsItem(nn.Module):  # .item() in forward: torch.func.vmap cannot take it
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (1.0 if x.sum().item() > -1e9 else 0.0)


@pytest.mark.parametrize("model", ["vmap works", "vmap fails"])
def test_auto_vectorize_times_both_ways_and_counts_every_sample_once(model: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)) if model == "vmap works" else _NeedsItem()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(13, 4, generator=g), torch.randint(0, 3, (13,), generator=g))]  # probe (10) + 3 more
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the automatic choice falls back silently
        auto = peftkit.fisher_information(net, data, samples=13, progress=False)
        few = peftkit.fisher_information(net, data, samples=3, progress=False)  # too few to time: vmap, else the loop
    loop = peftkit.fisher_information(net, data, samples=13, vectorize=False, progress=False)
    for n in loop:
        torch.testing.assert_close(auto[n], loop[n], rtol=1e-4, atol=1e-9)
    loop3 = peftkit.fisher_information(net, [(data[0][0][:3], data[0][1][:3])], samples=3, vectorize=False,
                                       progress=False)
    for n in loop3:
        torch.testing.assert_close(few[n], loop3[n], rtol=1e-4, atol=1e-9)
    if model == "vmap fails":
        with pytest.warns(RuntimeWarning, match="could not be vectorised"):  # asked for vmap: say why it is not used
            peftkit.fisher_information(net, data, samples=3, vectorize=True, progress=False)


def test_bad_vectorize_value_is_named() -> None:
    with pytest.raises(ConfigError, match="vectorize"):
        peftkit.fisher_information(nn.Linear(2, 2), [torch.randn(2, 2)], vectorize="fast", progress=False)


def test_fisher_does_not_depend_on_batch_composition() -> None:
    tiny = TINY_MODELS[1]  # CNN with BatchNorm: computed in eval mode
    (x, y), = _data(tiny)
    model = tiny.fresh()
    whole = peftkit.fisher_information(model, [(x, y)], samples=8, progress=False)
    split = peftkit.fisher_information(model, [(x[:3], y[:3]), (x[3:], y[3:])], samples=8, progress=False)
    for n in whole:
        torch.testing.assert_close(whole[n], split[n], rtol=1e-5, atol=1e-10)


class _TwoInputs(nn.Module):
    """A model of two inputs (tokens and a mask), as text classifiers are."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * mask[..., None]
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))


@pytest.mark.parametrize("fisher", ["empirical", "expected"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_models_of_several_inputs_take_a_tuple_or_a_dict_of_inputs(fisher: str, vectorize: bool) -> None:
    torch.manual_seed(0)
    model = _TwoInputs()
    ids, mask = torch.randint(0, 20, (6, 5)), (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    y = torch.randint(0, 3, (6,))
    opts = {"samples": 6, "fisher": fisher, "vectorize": vectorize, "progress": False}
    as_tuple = peftkit.fisher_information(model, [((ids, mask), y)], **opts)
    as_dict = peftkit.fisher_information(model, [({"ids": ids, "mask": mask}, y)], **opts)

    def explicit(m: nn.Module, batch: tuple) -> torch.Tensor:
        (i, k), labels = batch
        return torch.nn.functional.cross_entropy(m(i, k), labels)

    if fisher == "empirical":  # the default loss equals the loss written out
        reference = peftkit.fisher_information(model, [((ids, mask), y)], explicit, **opts)
        for n in reference:
            torch.testing.assert_close(as_tuple[n], reference[n])
    for n in as_tuple:
        torch.testing.assert_close(as_tuple[n], as_dict[n])
        assert as_tuple[n].abs().sum() > 0


def test_expected_fisher_is_seeded_and_differs_from_empirical() -> None:
    tiny = TINY_MODELS[0]
    model, data = tiny.fresh(), _data(tiny)
    a = peftkit.fisher_information(model, data, samples=8, fisher="expected", seed=1, progress=False)
    b = peftkit.fisher_information(model, data, samples=8, fisher="expected", seed=1, progress=False)
    e = peftkit.fisher_information(model, data, samples=8, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], e[n]) for n in a)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("keep", [0.005, 0.05, 0.3])
def test_mask_has_exactly_the_requested_entries(scope: str, keep: float) -> None:
    tiny = TINY_MODELS[2]
    model = tiny.fresh()
    total = sum(p.numel() for p in model.parameters())
    mask = peftkit.fisher_mask(model, _data(tiny), keep=keep, scope=scope, samples=8, progress=False)
    assert sum(i.numel() for i in mask.values()) == round(keep * total)
    for n, i in mask.items():
        assert torch.equal(i, i.unique()) and i.max() < model.get_parameter(n).numel()  # sorted, distinct, in range
    if scope == "global":  # the top-k: every kept score >= every dropped score
        scores = peftkit.fisher_information(model, _data(tiny), samples=8, progress=False)
        kept = torch.cat([scores[n].reshape(-1)[i] for n, i in mask.items()])
        assert kept.min() >= torch.cat([s.reshape(-1) for s in scores.values()]).sort(descending=True).values[len(kept) - 1]


def test_head_counts_inside_the_budget() -> None:
    tiny = TINY_MODELS[0]
    model = tiny.fresh()
    total = sum(p.numel() for p in model.parameters())
    m = peftkit.wrap(model, "fish", keep=0.2, data=_data(tiny), head=2)
    old_head, head = 16 * 4 + 4, 16 * 2 + 2
    budget = round(0.2 * (total - old_head + head))  # the replaced layer is no candidate; the new one counts
    assert m.trainable_parameters() == budget
    assert sum(p.numel() for p in m.peft_adapters["default"].adapters.parameters()) == budget - head


def test_adamw_with_weight_decay_changes_exactly_the_selected_entries() -> None:
    tiny = TINY_MODELS[1]
    model = tiny.fresh()
    before = snapshot(model)
    x, y = _data(tiny)[0]
    mask = peftkit.fisher_mask(model, [(x, y)], keep=0.05, samples=8, progress=False)
    m = peftkit.wrap(model, "fish", mask=mask).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    for _ in range(5):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_bitwise_equal(snapshot(model), before)  # the backbone itself never changes
    m.merge()  # the effective weights: base + sparse deltas
    effective = snapshot(model)
    m.unmerge()
    assert_bitwise_equal(snapshot(model), before)  # unmerge restores exactly
    for name, param in model.named_parameters():
        changed = (effective[name] != before[name]).reshape(-1).nonzero().squeeze(1)
        selected = mask.get(name, torch.empty(0, dtype=torch.int64))
        assert set(changed.tolist()) <= set(selected.tolist()), f"{name}: entries outside the mask changed"
        keep = torch.ones(param.numel(), dtype=torch.bool)
        keep[selected] = False
        assert torch.equal(effective[name].reshape(-1)[keep], before[name].reshape(-1)[keep])  # bitwise


def test_gap_codes_round_trip() -> None:
    idx = torch.tensor([0, 1, 65535, 65536, 65537 + 65535 * 3, 10**7])
    assert torch.equal(decode_gaps(encode_gaps(idx)), idx)
    assert encode_gaps(idx).dtype == torch.int16
    rand = torch.randperm(10**6)[:5000].sort().values
    assert torch.equal(decode_gaps(encode_gaps(rand)), rand)


def test_file_is_compact_and_bound_to_the_base_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    x = torch.randn(16, 64)
    data = [(x, torch.arange(16) % 4)]
    m = peftkit.wrap(model, "fish", keep=0.005, data=data, samples=16)
    with torch.no_grad():
        for p in m.peft_adapters.parameters():
            p.normal_()
    path = peftkit.save(m, tmp_path / "fish.safetensors")
    header = peftkit.read_header(path)
    index_bytes = sum(2 * s[0] for k, (s, d) in header.tensors.items() if k.endswith("_index"))
    value_bytes = sum(4 * s[0] for k, (s, d) in header.tensors.items() if k.endswith("_delta"))
    assert value_bytes == 4 * round(0.005 * sum(p.numel() for p in model.parameters()))
    assert index_bytes <= 0.6 * value_bytes
    assert header.backbone["values"] is not None
    m.eval()
    with torch.no_grad():
        expected = m(x)
    torch.manual_seed(0)
    same = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    with torch.no_grad():
        torch.testing.assert_close(peftkit.load(same, path).eval()(x), expected, rtol=0, atol=0)
    other = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    with pytest.raises(BackboneMismatchError, match="weights differ"):
        peftkit.load(other, path)
    with pytest.raises(BackboneMismatchError):
        peftkit.load(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4)), path)


def test_fish_adapters_swap_exactly_on_one_backbone(tmp_path: Path) -> None:
    tiny = TINY_MODELS[2]
    model = tiny.fresh().eval()
    before = snapshot(model)
    x = tiny.input()
    with torch.no_grad():
        base = model(x)
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = peftkit.wrap(tiny.fresh(), "fish", keep=0.1, data=_data(tiny), samples=8)
        with torch.no_grad():
            for p in m.peft_adapters.parameters():
                p.normal_()
        with torch.no_grad():
            files.append((peftkit.save(m, tmp_path / f"f{seed}.safetensors"), m.eval()(x)))
    swap = peftkit.load(model, files[0][0], name="a").eval()
    swap.load_adapter(files[1][0], name="b")
    with torch.no_grad():
        torch.testing.assert_close(swap(x), files[0][1], rtol=0, atol=0)
        swap.set_adapter("b")
        torch.testing.assert_close(swap(x), files[1][1], rtol=0, atol=0)
        with swap.disable_adapters():
            torch.testing.assert_close(swap(x), base, rtol=0, atol=0)
        swap.delete_adapter("b")
        swap.delete_adapter("a")
        torch.testing.assert_close(swap(x), base, rtol=0, atol=0)
    assert_bitwise_equal(snapshot(model), before)


def test_errors() -> None:
    with pytest.raises(ConfigError, match="mask=peftkit.fisher_mask"):
        peftkit.wrap(TINY_MODELS[0].fresh(), "fish")
    with pytest.raises(ConfigError, match="keep"):
        peftkit.wrap(TINY_MODELS[0].fresh(), "fish", keep=0, data=[])
    with pytest.raises(ConfigError, match="no samples"):
        peftkit.fisher_information(TINY_MODELS[0].fresh(), [], progress=False)
    with pytest.raises(ConfigError, match="candidates"):
        peftkit.fisher_mask(TINY_MODELS[0].fresh(), _data(TINY_MODELS[0]), candidates=["nope"], progress=False)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "progress", "drawn"), [
    (_Terminal, True, True),  # a terminal: tqdm's bar
    (io.StringIO, True, False),  # a log file or pipe: nothing (tqdm's disable=None)
    (_Terminal, False, False),  # progress=False: nothing anywhere
])
def test_fisher_progress_is_a_tqdm_bar_on_terminals_only(monkeypatch: pytest.MonkeyPatch, stream: type[io.StringIO],
                                                         progress: bool, drawn: bool) -> None:
    err = stream()
    monkeypatch.setattr("sys.stderr", err)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(6, 4)
    peftkit.fisher_information(net, [(x, torch.arange(6) % 3)], samples=6, progress=progress)
    text = err.getvalue()
    assert ("Fisher information" in text and "6/6" in text and "samples/s" in text) == drawn, text


def test_a_second_fish_adapter_estimated_while_the_first_is_active() -> None:
    """The second adapter's Fisher estimate runs the model under torch.func with the first FISH
    adapter active: nothing from inside that transform may stay cached in the first (it crashed the
    next forward: a position cache stamped with a functorch wrapper)."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    m = peftkit.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), "fish", keep=0.2,
                     data=[(x, y)], name="a")
    m.add_adapter("b", "fish", keep=0.2, data=[(x, y)])
    with torch.no_grad():
        ya = m(x)
        m.set_adapter(["a", "b"])
        assert m(x).shape == ya.shape
