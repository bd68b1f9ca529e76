"""Lightning: checkpoints that hold the adapters and not the frozen backbone; resuming and
``load_from_checkpoint`` restore them onto the module's own backbone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.errors import ConfigError
from peftkit.lightning import CHECKPOINT_KEY, AdapterCheckpoints

L = pytest.importorskip("lightning")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _backbone(seed: int = 0, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 3))


class Classifier(AdapterCheckpoints, L.LightningModule):
    def __init__(self, backbone: nn.Module, method: str = "lora") -> None:
        super().__init__()
        options: dict[str, Any] = {"r": 2} if method == "lora" else {}
        self.model = peftkit.wrap(backbone, method, train=["1"], **options)  # the BatchNorm trained whole
        self.extra = nn.Linear(3, 3)  # the module's own layer: checkpointed as usual
        self.saw: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.extra(self.model(x))
        return out

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.saw["saved_keys"] = sorted(checkpoint["state_dict"])


def _loader() -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    # no shuffling: a resumed run sees the same batches in its second epoch as the uninterrupted run
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _trainer(root: Path, epochs: int) -> Any:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=str(root), logger=False,
                     enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                     callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=str(root), save_last=True,
                                                                    save_top_k=-1, every_n_epochs=1)])


def _trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "base_model." not in k}


def test_checkpoints_hold_no_backbone_and_resume_where_the_run_left_off(tmp_path: Path) -> None:
    backbone = _backbone()
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    full = Classifier(backbone)
    L.seed_everything(0)
    _trainer(tmp_path / "full", 2).fit(full, _loader())
    for k, v in backbone.state_dict().items():  # frozen means frozen
        torch.testing.assert_close(v, frozen[k], rtol=0, atol=0)

    ckpt = torch.load(tmp_path / "full" / "epoch=0-step=4.ckpt", weights_only=False)
    assert not any("base_model." in k for k in ckpt["state_dict"])
    assert set(ckpt[CHECKPOINT_KEY]) == {f"model.base_model.{k}" for k in frozen}
    assert ckpt[CHECKPOINT_KEY]["model.base_model.0.weight"]["shape"] == [32, 8]
    assert any("lora_A" in k for k in ckpt["state_dict"]) and "extra.weight" in ckpt["state_dict"]
    assert any(k.endswith("copies.0.running_mean") for k in ckpt["state_dict"])  # the trained BatchNorm's statistics too
    assert ckpt["optimizer_states"], "the optimizer state is checkpointed as usual"
    backbone_bytes = sum(v.numel() * v.element_size() for v in frozen.values())
    assert sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values()) < backbone_bytes

    # resume from epoch 1's checkpoint on a freshly built module: the same end as the uninterrupted run
    resumed = Classifier(_backbone())
    L.seed_everything(0)
    _trainer(tmp_path / "resumed", 2).fit(resumed, _loader(), ckpt_path=str(tmp_path / "full" / "epoch=0-step=4.ckpt"))
    want, got = _trainable(full), _trainable(resumed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_load_from_checkpoint_gives_the_same_outputs_and_the_adapter_file(tmp_path: Path) -> None:
    module = Classifier(_backbone())
    L.seed_everything(0)
    _trainer(tmp_path, 1).fit(module, _loader())
    x = torch.randn(5, 8)
    module.eval()
    with torch.no_grad():
        want = module(x)
    restored = Classifier.load_from_checkpoint(tmp_path / "last.ckpt", backbone=_backbone()).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), want, rtol=0, atol=0)
    # the adapter file that ships, onto yet another fresh backbone
    path = peftkit.save(restored.model, tmp_path / "task.safetensors")
    again = peftkit.load(_backbone(), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.extra(again(x)), want, rtol=0, atol=0)


def test_a_checkpoint_for_another_backbone_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    module = Classifier(_backbone())
    _trainer(tmp_path, 1).fit(module, _loader())
    other = Classifier(_backbone(width=16))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match="another backbone"):
        Classifier.load_from_checkpoint(tmp_path / "last.ckpt", backbone=_backbone(width=16))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    kept = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
    with pytest.raises(ConfigError, match="lacks|other shapes"):
        other.on_load_checkpoint(checkpoint)
    same_shapes = Classifier(_backbone(seed=1))  # the same architecture with other weights
    with pytest.raises(ConfigError, match="other values in model.base_model.0.weight"):
        same_shapes.on_load_checkpoint(checkpoint)
    assert checkpoint["state_dict"].keys() == kept.keys()
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_misuse_is_named() -> None:
    plain = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="holds no model wrapped by peftkit"):
        peftkit.lightning.strip_backbone(plain, {"state_dict": plain.state_dict()})
    module = Classifier(_backbone(), method="lora")
    module.model.merge()
    with pytest.raises(ConfigError, match="unmerge"):
        peftkit.lightning.strip_backbone(module, {"state_dict": module.state_dict()})
    module.model.unmerge()
    with pytest.raises(ConfigError, match="state_dict"):
        peftkit.lightning.strip_backbone(module, {})
