"""Training scenarios shared by the single-process reference (run inside pytest) and the 2-process
runs (``torchrun --nproc_per_node 2 tests/distributed_worker.py OUT REF``, launched by
``tests/test_distributed.py``).

The same global batch of 16 samples and the same seed everywhere: rank r of w trains on rows
``r*16/w .. (r+1)*16/w``, with the loss averaged over its rows, so the averaged gradients equal the
single process's. After 5 AdamW steps the adapter tensors and the saved files must agree.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import peftkit
import peftkit.distributed as pdist
import peftkit.nf4

STEPS = 5
BATCH = 16
METHODS = ("lora", "fish", "serial")
QLORA = importlib.util.find_spec("torchao") is not None


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """An input layer, two residual blocks (the FSDP2 units) and a head: a tiny transformer-like stack."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the global batch."""
    n = BATCH // pdist.world_size()
    return t[pdist.rank() * n:(pdist.rank() + 1) * n]


def backbone(method: str = "") -> nn.Module:
    torch.manual_seed(0)
    if method != "qlora":
        return Net()
    model = Net(d=128)  # blocks of 128 x 256 Linears: whole NF4 blocks of 16,384 weights
    return peftkit.quantize(model, "nf4", [r"blocks\..*"], backend="torchao")


def wrap(method: str) -> peftkit.AdaptedModel:
    """A fresh backbone wrapped with ``method``; FISH's Fisher uses this rank's rows (summed over ranks)."""
    x, y = batch()
    if method in ("lora", "qlora"):
        return peftkit.wrap(backbone(method), "lora", r=2, targets=["fc1", "fc2"], train=["head"])
    if method == "serial":  # a serial adapter beside a module trained whole inside a block
        return peftkit.wrap(backbone(), "serial_adapter", bottleneck=3, scale="learned", targets=["fc2"],
                            train=["blocks.1.fc1", "head"])
    return peftkit.wrap(backbone(), "fish", keep=0.1, data=[(local(x), local(y))], samples=BATCH, train=["head"])


@contextmanager
def count_reduce_scatter() -> Iterator[dict[str, int]]:
    """Bytes FSDP2 reduce-scatters (its gradient communication) while inside."""
    counted = {"bytes": 0, "calls": 0}
    original = dist.reduce_scatter_single

    def counting(*args: Any, **kwargs: Any) -> Any:
        t = kwargs.get("input", args[1] if len(args) > 1 else None)
        counted["bytes"] += t.numel() * t.element_size()
        counted["calls"] += 1
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counting
    try:
        yield counted
    finally:
        dist.reduce_scatter_single = original


def count_ddp(model: DistributedDataParallel) -> dict[str, int]:
    """Bytes DDP all-reduces (its gradient buckets) from now on."""
    counted = {"bytes": 0, "calls": 0}

    def hook(state, bucket):  # noqa: ANN001 (DDP checks the annotations and string ones fail)
        counted["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        counted["calls"] += 1
        buf = bucket.buffer().div_(pdist.world_size())
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

    model.register_comm_hook(None, hook)
    return counted


def train(method: str, mode: str, out: Path) -> dict[str, Any]:
    """5 AdamW steps; returns facts for the test and writes the adapter file (and, on rank 0, the
    full adapter tensors) under ``out``."""
    m = wrap(method)
    if mode == "single":
        peftkit.save(m, out / f"{method}-single-init.safetensors")
    facts: dict[str, Any] = {"trainable": m.trainable_parameters()}
    net: nn.Module = m
    counted = None
    if mode == "ddp":
        net = DistributedDataParallel(m)
        counted = count_ddp(net)
    elif mode == "fsdp":
        pdist.shard(m, blocks=[r"blocks\..*"])  # a pattern matching inside the blocks too: the outermost count
        from torch.distributed.fsdp import fully_shard

        names = {id(p): n for n, p in m.named_parameters()}  # the sharded parameters, by their names
        facts["groups"] = {b: sorted(names[id(fp.sharded_param)] for g in fully_shard.state(
            m.base_model.get_submodule(b))._fsdp_param_groups for fp in g.fsdp_params) for b in ("blocks.0", "blocks.1")}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch()
    with count_reduce_scatter() if mode == "fsdp" else _nothing() as rs, count_dequantizations() as dq:
        for _ in range(STEPS):
            loss = nn.functional.cross_entropy(net(local(x)), local(y))
            loss.backward()
            opt.step()
            opt.zero_grad()
    facts["dequantizations"] = dq
    if counted is not None:
        facts["grad_bytes_per_step"] = counted["bytes"] / STEPS
    if rs is not None:
        facts["grad_bytes_per_step"] = rs["bytes"] / STEPS
    file = out / f"{method}-{mode}.safetensors"
    peftkit.save(net, file)  # every rank calls it; rank 0 writes
    tensors = {k: pdist.full_tensor(t.detach()).clone() for k, t in m.peft_adapters["default"].file_tensors().items()}
    if pdist.rank() == 0:
        torch.save(tensors, out / f"{method}-{mode}.pt")
    return facts


@contextmanager
def count_dequantizations() -> Iterator[dict[str, int]]:
    """NF4 weights dequantized while inside: by peftkit's NF4Linear, and whole by torchao's own path."""
    counted = {"peftkit": 0, "torchao": 0}
    if not QLORA:
        yield counted
        return
    from torchao.quantization import to_nf4

    cls = type(to_nf4(torch.zeros(64, 256)))
    real = cls.get_original_weight, peftkit.nf4.dequantize_nf4

    def counting(which: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            counted[which] += 1
            return fn(*args, **kwargs)
        return call

    cls.get_original_weight, peftkit.nf4.dequantize_nf4 = counting("torchao", real[0]), counting("peftkit", real[1])
    try:
        yield counted
    finally:
        cls.get_original_weight, peftkit.nf4.dequantize_nf4 = real


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def full_ddp_bytes() -> float:
    """What DDP all-reduces per step when fine-tuning the whole backbone."""
    torch.manual_seed(0)
    net = DistributedDataParallel(backbone())
    counted = count_ddp(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x, y = batch()
    for _ in range(2):
        nn.functional.cross_entropy(net(local(x)), local(y)).backward()
        opt.step()
        opt.zero_grad()
    return counted["bytes"] / 2


def sharded_loading(method: str, ref: Path) -> dict[str, Any]:
    """Load the single-process file two ways on sharded models; report each rank's view."""
    file = ref / f"{method}-single.safetensors"
    x, _ = batch()
    # 1. load before sharding, then shard: every rank keeps its shard of the loaded tensors
    m = peftkit.load(backbone(), file)
    pdist.shard(m)  # default blocks: the root's children, the ModuleList replaced by its items
    with torch.no_grad():
        before = m(x)
    # 2. hot swap into the untrained adapter of a sharded model (each rank reads the file and keeps
    # its part); for FISH the untrained adapter is loaded from a file, to have the same mask
    h = peftkit.load(backbone(), ref / f"{method}-single-init.safetensors")
    pdist.shard(h, blocks=["blocks.0", "blocks.1"])
    assert peftkit.load(h, file) is h  # on a sharded model, loading a held adapter's file swaps its values in
    with torch.no_grad():
        after = h(x)
    shards = {k: (list(t.to_local().shape), t.to_local().flatten()[:3].tolist())
              for k, t in h.peft_adapters["default"].file_tensors().items() if pdist.is_dtensor(t)}
    return {"loaded_then_sharded": before.tolist(), "hotswapped": after.tolist(), "shards": shards}


def main(out: Path, ref: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    report: dict[str, Any] = {}
    for method in METHODS:
        for mode in ("ddp", "fsdp"):
            report[f"{method}-{mode}"] = train(method, mode, out)
        report[f"{method}-loading"] = sharded_loading(method, ref)
    if QLORA:  # LoRA on a torchao NF4 backbone: DDP, and FSDP2 (which shards NF4 weights)
        for mode in ("ddp", "fsdp"):
            report[f"qlora-{mode}"] = train("qlora", mode, out)
    report["full-ddp"] = {"grad_bytes_per_step": full_ddp_bytes()}
    (out / f"report-{pdist.rank()}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    # Skip the interpreter's shutdown: gloo's worker threads may still release a Python callback (the
    # comm hook's future.then above) after Python finalisation began, which aborts the process (about
    # one run in six, seen with gdb on a core dump). Everything is written by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
