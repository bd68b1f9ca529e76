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


def _rows(n: int = 16) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (8,), generator=g), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": int(i % 2)} for i in range(n)]


def test_adapter_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path: Path) -> None:
    from peftkit.hf import ADAPTER_FILE, AdapterTrainer

    def run(out: Path, resume: str | None = None) -> peftkit.AdaptedModel:
        m = peftkit.wrap(_bert(), "lora", r=2)
        if resume is not None:  # a resumed run must take the checkpoint's values, not start from these
            with torch.no_grad():
                for p in m.peft_adapters.parameters():
                    p.add_(0.5)
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                                              report_to="none", use_cpu=True, learning_rate=1e-2, seed=0)
        AdapterTrainer(model=m, args=args, train_dataset=_rows()).train(resume_from_checkpoint=resume)
        return m

    full = run(tmp_path / "a")
    for step in (2, 4):
        ckpt = tmp_path / "a" / f"checkpoint-{step}"
        assert (ckpt / ADAPTER_FILE).is_file() and (ckpt / "optimizer.pt").is_file()
        assert not any(f.name.startswith(("model", "pytorch_model")) for f in ckpt.iterdir())  # not the whole model
    ids = torch.randint(0, 64, (3, 8))
    with torch.no_grad():
        want = full.eval()(input_ids=ids).logits
        loaded = peftkit.load(_bert(), tmp_path / "a" / "checkpoint-4" / ADAPTER_FILE).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)
    # resumed from step 2 in a fresh process state: the adapter and optimizer come back, training ends the same
    resumed = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-2"))
    with torch.no_grad():
        torch.testing.assert_close(resumed.eval()(input_ids=ids).logits, want)


def test_adapter_trainer_refuses_a_plain_model(tmp_path: Path) -> None:
    from peftkit.errors import ConfigError
    from peftkit.hf import AdapterTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match="trains an AdaptedModel"):
        AdapterTrainer(model=_bert(), args=args)


def test_adapter_trainer_loads_the_best_checkpoints_adapter_at_the_end(tmp_path: Path) -> None:
    from peftkit.hf import ADAPTER_FILE, AdapterTrainer

    m = peftkit.wrap(_bert(), "lora", r=2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, save_steps=2, eval_steps=2,
                                          eval_strategy="steps", load_best_model_at_end=True,
                                          metric_for_best_model="loss", greater_is_better=False,
                                          per_device_train_batch_size=4, report_to="none", use_cpu=True,
                                          learning_rate=5e-2, seed=0)
    train = _rows(8)
    flipped = [{**row, "labels": 1 - int(row["labels"])} for row in train]  # gets worse as training fits: best is early
    trainer = AdapterTrainer(model=m, args=args, train_dataset=train, eval_dataset=flipped)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6"), best  # not simply the last state
    ids = torch.randint(0, 64, (3, 8))
    with torch.no_grad():
        from_file = peftkit.load(_bert(), Path(best) / ADAPTER_FILE).eval()(input_ids=ids).logits
        torch.testing.assert_close(m.eval()(input_ids=ids).logits, from_file, rtol=0, atol=0)
