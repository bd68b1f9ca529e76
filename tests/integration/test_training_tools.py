"""Training tools that introspect the model: an AdaptedModel presents its backbone's signature."""

from __future__ import annotations

import copy as copy_module
import inspect
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def test_forward_presents_the_backbones_signature_and_survives_copies() -> None:
    base = _bert()
    m = peftkit.wrap(base, "lora", r=2).eval()
    assert inspect.signature(m.forward) == inspect.signature(base.forward)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = m(input_ids=ids).logits
        for copy in (pickle.loads(pickle.dumps(m)), copy_module.deepcopy(m)):
            assert inspect.signature(copy.forward) == inspect.signature(base.forward)
            torch.testing.assert_close(copy(input_ids=ids).logits, want, rtol=0, atol=0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert list(inspect.signature(peftkit.wrap(plain, "lora", r=2).forward).parameters) == ["input"]


def test_hugging_face_trainer_keeps_the_columns_the_backbone_takes(tmp_path: Path) -> None:
    """Default TrainingArguments (remove_unused_columns=True) drop the dataset columns the model's
    forward does not name; with (*args, **kwargs) every batch came out empty."""
    m = peftkit.wrap(_bert(), "lora", r=2)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 64, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": int(i % 2), "note": "not a model input"} for i in range(8)]
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          report_to="none", save_strategy="no", use_cpu=True, learning_rate=1e-2)
    transformers.Trainer(model=m, args=args, train_dataset=rows).train()
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters() if p.requires_grad)
