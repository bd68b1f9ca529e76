"""The peftkit command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_mlp

import peftkit
from peftkit.cli import main


def test_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "peftkit" in out and "Low-rank adaptation" in out
    assert main(["methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lora"]["distribution"] == "peftkit" and data["lora"]["version"]


def test_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    path = peftkit.save(peftkit.wrap(tiny_mlp(), "lora", r=2), tmp_path / "a.safetensors")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "lora" and info["config"]["r"] == 2 and info["tensors"] == 4
    assert info["tensor_bytes"] == 4 * (2 * 8 + 16 * 2 + 2 * 16 + 16 * 2)
    assert info["target_paths"] == ["0", "2"]
    assert main(["inspect", str(path)]) == 0
    assert "fingerprint" not in capsys.readouterr().err


def test_inspect_bad_file_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    assert main(["inspect", str(bad)]) == 2
    assert "peftkit: error:" in capsys.readouterr().err


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), "--methods", "lora,fish,last_layer"]) == 0
    out = capsys.readouterr().out
    for step in ("1. Data", "2. Pretrain", "3. Adapting", "4. Results", "5. Swapping", "6. Multi-task",
                 "7. No labels", "Done in"):
        assert step in out
    assert "last_layer unfreeze=1" in out and (tmp_path / "domain_features.png").exists()
    header = peftkit.read_header(tmp_path / "adapters-unlabelled.safetensors")
    assert header.targets["fc"]["role"] == "heads"  # the label head (and a DANN discriminator) ship in the file
    assert out.count("(identical)") == 3 and "DIFFERENT" not in out
    assert {p.name for p in (tmp_path / "adapters").iterdir()} == {"lora.safetensors", "fish.safetensors",
                                                                  "last_layer.safetensors"}
    assert (tmp_path / "multitask-lora.safetensors").exists() and (tmp_path / "accuracy_vs_parameters.png").exists()
    assert main(["demo", "--quick", "--out", str(tmp_path), "--methods", "lora"]) == 0  # cached backbone
    assert "cached at" in capsys.readouterr().out


def test_demo_unknown_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), "--methods", "nope"]) == 2
    assert "unknown methods ['nope']" in capsys.readouterr().err
