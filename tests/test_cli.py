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
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and (tmp_path / "lora.safetensors").exists()
