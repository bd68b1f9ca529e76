"""The benchmark harness runs end to end at tiny sizes, once (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RUN = Path(__file__).parents[2] / "benchmarks" / "run.py"


def _harness() -> Any:
    spec = importlib.util.spec_from_file_location("peftkit_benchmarks_run", RUN)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_bench_smoke(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(RUN), "--smoke", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["rows"]) >= {"MiniLM q,v", "resnet18 all convs", "vit_b_16 attention+MLP"}
    assert results["compile"]["torch.compile same outputs"] is True
    assert results["scale"]["tiny peftkit wrap s"] > 0
    methods = {f"{task}: {m}" for task in ("docstrings", "digits")
               for m in ("scratch", "full fine-tune", "last_layer", "lora", "lora dora", "lora pissa", "fish")}
    assert set(results["methods"]) >= methods
    assert {f"{shift}: lora: {v}" for shift in ("stars", "digits-M", "mnist->digits")
            for v in ("source only", "dann", "coral", "mmd", "target labels")} <= set(results["domain"])
    assert {f"{v}: step s" for v in ("bf16", "nf4 torchao", "nf4 bitsandbytes", "peft nf4 bitsandbytes")} <= set(
        results["qlora"])
    assert {f"{row}: {n} adapters: x peft" for row in ("MiniLM all Linear", "resnet18 all convs") for n in (1, 2)} <= set(
        results["mixed"])
    assert "| MiniLM q,v |" in (tmp_path / "RESULTS.md").read_text()
    assert _harness().memory("MiniLM q,v", "peftkit", smoke=True) > 0  # the memory probe, once, in-process


def test_the_domain_report_marks_the_seeds_that_diverged() -> None:
    sys.path.insert(0, str(RUN.parent))
    try:
        import domain  # benchmarks/domain.py
    finally:
        sys.path.remove(str(RUN.parent))

    def row(per_seed: list[float], diverged: list[int | None] | None) -> dict[str, Any]:
        r: dict[str, Any] = {"per seed": per_seed, "mean": sum(per_seed) / 2, "spread": 0.0, "recovered": 0.0}
        if diverged is not None:  # a domain.json written before the bench recorded divergence has no such key
            r["diverged at step"] = diverged
        return r

    rows = {v: row([0.5, 0.5], [None, None]) for v in domain.VARIANTS}
    rows["target labels"] = row([0.9, 0.9], [None, None])
    rows["dann"] = row([0.1, 0.6], [80, None])
    rows["coral"] = row([0.6, 0.6], None)
    text = domain.report({"s": {"shift": "a shift", "seeds": 2, "steps": 10, "methods": {"lora": rows}}})
    dann, coral = (cell for cell in text.splitlines()[-1].split(" | ")[2:4])
    assert dann.endswith("**diverged**: seed 0 at step 80") and "diverged" not in coral
