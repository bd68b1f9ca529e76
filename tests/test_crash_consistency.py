"""Interrupted and concurrent operations: a save or an export killed at any moment leaves a whole
adapter or none; a load racing a save reads one whole version; merge and unmerge interrupted at any
line leave the model fully merged or fully unmerged; a hot swap never tears a concurrent forward."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyCNN, assert_bitwise_equal, snapshot
from torch import nn

import peftkit

ROUNDS = 12


def _adapters(tmp_path: Path) -> tuple[Path, Path, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two adapters of one recipe (same shapes, other values), and the outputs each gives."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    outs = []
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        m = peftkit.wrap(_backbone(), "lora", r=2, init=False, train=["fc"]).eval()
        outs.append(m(x).detach())
        peftkit.save(m, tmp_path / f"{name}.safetensors")
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors", outs[0], outs[1], x


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


def _write_until_killed(kind: str, dest: Path, models: list[peftkit.AdaptedModel]) -> int:
    """Fork a process that writes the two adapters to ``dest`` in turn, forever; returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: nothing but writing, until SIGKILL
        try:
            i = 0
            while True:
                m = models[i % 2]
                peftkit.save(m, dest) if kind == "save" else peftkit.export_peft(m, dest)
                i += 1
        finally:
            os._exit(0)
    return pid


@pytest.mark.parametrize("kind", ["save", "export"])
def test_killed_writers_leave_a_whole_adapter_or_none(kind: str, tmp_path: Path) -> None:
    a, b, out_a, out_b, x = _adapters(tmp_path)
    models = [peftkit.load(_backbone(), p) for p in (a, b)]
    dest = tmp_path / ("out.safetensors" if kind == "save" else "out")
    peftkit.save(models[0], tmp_path / "warm.safetensors") if kind == "save" else peftkit.export_peft(models[0], tmp_path / "warm")
    rng = random.Random(0)
    seen = set()
    for _ in range(ROUNDS * 2):
        pid = _write_until_killed(kind, dest, models)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not dest.exists():
            seen.add("absent")
            continue
        loaded = peftkit.load(_backbone(), dest).eval()(x).detach()
        assert torch.equal(loaded, out_a) or torch.equal(loaded, out_b), "a mixed or broken adapter on disk"
        seen.add("a" if torch.equal(loaded, out_a) else "b")
    assert seen & {"a", "b"}, "no write finished in any round: the test measured nothing"
    peftkit.save(models[0], dest) if kind == "save" else peftkit.export_peft(models[0], dest)  # cleans up
    left = [p.name for p in tmp_path.iterdir() if ".peftkit-" in p.name]
    assert not left, f"temporaries of killed writers were left: {left}"


def test_a_load_racing_saves_reads_one_whole_version(tmp_path: Path) -> None:
    a, b, out_a, out_b, x = _adapters(tmp_path)
    dest = tmp_path / "shared.safetensors"
    models = [peftkit.load(_backbone(), p) for p in (a, b)]
    peftkit.save(models[0], dest)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            peftkit.save(models[i % 2], dest)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        outcomes = set()
        for _ in range(60):
            out = peftkit.load(_backbone(), dest).eval()(x).detach()
            assert torch.equal(out, out_a) or torch.equal(out, out_b), "a load mixed two versions of the file"
            outcomes.add(torch.equal(out, out_a))
    finally:
        stop.set()
        thread.join()


class _Interrupt:
    """A tracer that raises KeyboardInterrupt at the n-th line peftkit runs (a Ctrl-C at that moment)."""

    def __init__(self, n: int) -> None:
        self.n, self.fired = n, False

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        if "peftkit" not in frame.f_code.co_filename:
            return None
        if event == "line":
            self.n -= 1
            if self.n == 0 and not self.fired:
                self.fired = True
                raise KeyboardInterrupt
        return self


def _lines(fn: Any) -> int:
    count = [0]

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if "peftkit" not in frame.f_code.co_filename:
            return None
        if event == "line":
            count[0] += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count[0]


@pytest.mark.parametrize("method", ["lora", "fish", "last_layer"])
def test_interrupted_merge_and_unmerge_are_all_or_nothing(method: str) -> None:
    options = {"lora": {"r": 2, "init": False, "train": ["fc"]}, "last_layer": {"head": 3},
               "fish": {"mask": {"conv1.weight": torch.arange(0, 200, 3), "fc.weight": torch.tensor([0, 7])}}}[method]
    x = torch.randn(2, 3, 8, 8)

    def fresh() -> peftkit.AdaptedModel:
        m = peftkit.wrap(_backbone(), method, **options).eval()
        with torch.no_grad():
            for p in m.peft_adapters.parameters():
                p.add_(0.1)
        return m

    probe = fresh()
    merged_out = probe.unwrap(merge=True)(x).detach()
    total = _lines(fresh().merge)
    rng = random.Random(1)
    for n in sorted(rng.sample(range(1, total + 1), min(25, total))):
        m = fresh()
        before = snapshot(m.base_model)
        unmerged_out = m(x).detach()
        tracer = _Interrupt(n)
        sys.settrace(tracer)
        try:
            m.merge()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        if m.merged:  # the interrupt came after the merge was complete
            torch.testing.assert_close(m(x), merged_out, rtol=1e-5, atol=1e-6)
            undo = _Interrupt(max(1, n // 2))
            sys.settrace(undo)
            try:
                m.unmerge()
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
        assert not m.merged, "an interrupted unmerge must still finish"
        assert torch.is_grad_enabled(), f"an interrupt at line {n} left autograd off"
        assert_bitwise_equal(snapshot(m.base_model), before)
        torch.testing.assert_close(m(x), unmerged_out, rtol=0, atol=0)


def test_a_hotswap_never_tears_a_concurrent_forward(tmp_path: Path) -> None:
    a, b, out_a, out_b, x = _adapters(tmp_path)
    m = peftkit.load(_backbone(), a).eval()
    stop = threading.Event()
    torn: list[torch.Tensor] = []

    def infer() -> None:
        while not stop.is_set():
            with torch.no_grad():
                out = m(x)
            if not (torch.equal(out, out_a) or torch.equal(out, out_b)):
                torn.append(out)

    threads = [threading.Thread(target=infer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            m.hotswap(b if i % 2 == 0 else a)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not torn, f"{len(torn)} forwards saw a mix of two adapters"


def test_save_takes_every_safetensors_dtype_and_refuses_the_rest(tmp_path: Path) -> None:
    class WithBuffers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("counts", torch.arange(4).to(torch.uint16))
            self.register_buffer("phase", torch.ones(2, dtype=torch.complex64))
            self.register_buffer("scale8", torch.ones(2).to(torch.float8_e4m3fn))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    net = nn.Sequential(WithBuffers(), nn.Linear(4, 2))
    m = peftkit.wrap(net, "lora", r=2, targets=["1"], train=["0"])
    path = peftkit.save(m, tmp_path / "dtypes.safetensors")
    back = peftkit.load(nn.Sequential(WithBuffers(), nn.Linear(4, 2)), path)
    copy = back.peft_adapters["default"].copies[0]
    assert copy.counts.dtype == torch.uint16 and copy.phase.dtype == torch.complex64 and copy.scale8.dtype == torch.float8_e4m3fn
    wide = WithBuffers()
    wide.register_buffer("wide", torch.ones(2, dtype=torch.complex128))
    m2 = peftkit.wrap(nn.Sequential(wide, nn.Linear(4, 2)), "lora", r=2, targets=["1"], train=["0"])
    with pytest.raises(peftkit.errors.ConfigError, match="complex128, which the safetensors format cannot store"):
        peftkit.save(m2, tmp_path / "wide.safetensors")
    assert not (tmp_path / "wide.safetensors").exists()
    assert not [p for p in os.listdir(tmp_path) if ".peftkit-" in p]
