"""Fine-tune a torchvision ResNet on any ImageFolder dataset with a peftkit method.

The course's bees-and-ants recipe: a pretrained resnet18, its ``fc`` swapped for a fresh layer with
one output per class, trained with a parameter-efficient method; only the adapter file is saved.

    python examples/finetune_imagefolder.py --data hymenoptera_data --weights resnet18.pth --method lora

``--data`` holds ``train/`` and ``val/`` folders (one subfolder per class), or class subfolders
directly (then 20% is held out). ``--weights`` is a local torchvision state_dict file (nothing is
downloaded); without it the network starts from random weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

import peftkit


def loaders(root: Path, size: int, batch: int) -> tuple[DataLoader, DataLoader, list[str]]:
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    eval_tf = transforms.Compose([transforms.Resize(int(size * 1.14)), transforms.CenterCrop(size),
                                  transforms.ToTensor(), norm])
    if (root / "train").is_dir():
        train = torchvision.datasets.ImageFolder(root / "train", train_tf)
        val = torchvision.datasets.ImageFolder(root / ("val" if (root / "val").is_dir() else "train"), eval_tf)
    else:
        full_train = torchvision.datasets.ImageFolder(root, train_tf)
        full_eval = torchvision.datasets.ImageFolder(root, eval_tf)
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(0)).tolist()
        cut = max(1, len(order) // 5)
        train, val = Subset(full_train, order[cut:]), Subset(full_eval, order[:cut])
        train.classes = full_train.classes  # type: ignore[attr-defined]
    classes = train.classes  # type: ignore[attr-defined]
    return (DataLoader(train, batch, shuffle=True, num_workers=0), DataLoader(val, batch, num_workers=0), classes)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in val:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root (train/ and val/, or class folders)")
    p.add_argument("--weights", type=Path, default=None, help="local resnet18 state_dict (.pth); none = random init")
    p.add_argument("--method", default="lora", help="a peftkit method (see `peftkit methods`)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=224, help="image size")
    p.add_argument("--out", type=Path, default=Path("imagefolder-adapter.safetensors"))
    p.add_argument("--quick", action="store_true", help="1 epoch of 2 batches at 64 px (smoke test)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    size = 64 if args.quick else args.size
    train, val, classes = loaders(args.data, size, 8 if args.quick else 16)
    model = torchvision.models.resnet18()
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    options = {"data": train, "samples": 16 if args.quick else 256} if args.method == "fish" else {}
    m = peftkit.wrap(model, args.method, head=len(classes), **options)
    print(m.summary())
    opt = torch.optim.AdamW(peftkit.param_groups(m, lr=args.lr, decay=0.8))
    start = time.perf_counter()
    for epoch in range(1 if args.quick else args.epochs):
        m.train()
        for i, (x, y) in enumerate(train):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if args.quick and i == 1:
                break
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, val accuracy {evaluate(m, val):.1%}")
    acc = evaluate(m, val)
    path = peftkit.save(m, args.out)
    print(f"{args.method} on {len(classes)} classes ({', '.join(classes)}): val accuracy {acc:.1%} after "
          f"{time.perf_counter() - start:.0f} s; adapter {path} ({path.stat().st_size:,} bytes)")
    return acc


if __name__ == "__main__":
    main()
