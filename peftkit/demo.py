"""``peftkit demo``: the whole story on a 2-core CPU, with data drawn on the fly.

Source task: count the points of white stars on black (3 to 8 points). Target task: the same
question in a shifted domain (coloured stars on coloured, noisy backgrounds, thicker and smaller),
with only a few hundred labelled images. A small ResNet is pretrained on the source (cached on
disk), then adapted to the target with LoRA; the adapter is saved, reloaded onto a freshly built
backbone, and the outputs are compared.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

N_CLASSES = 6  # 3..8 points
SIZE = 32


def draw_stars(n: int, *, target: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``n`` star images (n, 3, 32, 32), their point counts minus 3, and their radii."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randint(3, 3 + N_CLASSES, (n,), generator=g)
    radius = torch.empty(n).uniform_(0.45, 0.85, generator=g)
    inner = radius * torch.empty(n).uniform_(0.35, 0.5, generator=g) * (1.15 if target else 1.0)
    turn = torch.rand(n, generator=g) * 2 * math.pi
    centre = (torch.rand(n, 2, generator=g) - 0.5) * 0.3
    lin = torch.linspace(-1, 1, SIZE)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    dx = xx[None] - centre[:, 0, None, None]
    dy = yy[None] - centre[:, 1, None, None]
    angle = torch.atan2(dy, dx) - turn[:, None, None]
    phase = (angle * points[:, None, None] / (2 * math.pi)) % 1.0  # 0 at a tip, 0.5 between tips
    edge = inner[:, None, None] + (radius - inner)[:, None, None] * (1 - 2 * (phase - 0.5).abs()) ** 1.5
    mask = torch.sigmoid((edge - torch.sqrt(dx**2 + dy**2)) * 40)  # (n, 32, 32), soft edges
    if not target:
        images = mask[:, None].expand(n, 3, SIZE, SIZE).clone()
    else:
        fg = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)  # bright colour on a dark colour
        bg = 0.35 * torch.rand(n, 3, 1, 1, generator=g)
        images = bg + (fg - bg) * mask[:, None] + 0.12 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return (images - 0.5) / 0.5, points - 3, radius


class SmallResNet(nn.Module):
    """A CPU-sized ResNet of torchvision BasicBlocks (16-32-64-128 channels)."""

    def __init__(self, n_classes: int = N_CLASSES, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and c == w else nn.Sequential(nn.Conv2d(c, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            layers.append(nn.Sequential(BasicBlock(c, w, stride, down), BasicBlock(w, w)))
            c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, label: str, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            print(f"\r  {label}: step {step}/{steps}  loss {loss.item():.3f}", end="", flush=True)
    print()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (torch.cat([model(b).argmax(1) for b in x.split(256)]) == y).float().mean().item()


def pretrained_backbone(out: Path, seed: int, steps: int) -> Path:
    """Pretrain on the source task once; later runs reuse the cached weights."""
    path = out / f"backbone-seed{seed}-{steps}.pt"
    if path.exists():
        print(f"Pretrained backbone: cached at {path}")
        return path
    x, y, _ = draw_stars(6000, target=False, seed=seed)
    torch.manual_seed(seed)
    model = SmallResNet()
    print(f"Pretraining a {sum(p.numel() for p in model.parameters()):,}-parameter ResNet on the source task")
    _fit(model, x, y, steps, 3e-3, "source", seed)
    xt, yt, _ = draw_stars(1000, target=False, seed=seed + 100)
    print(f"  source accuracy {accuracy(model, xt, yt):.1%}")
    torch.save(model.state_dict(), path)
    return path


def fresh_backbone(weights: Path) -> SmallResNet:
    model = SmallResNet()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model


def run(out: str = "peftkit-demo", methods: str | None = None, quick: bool = False, seed: int = 0) -> int:
    """Run the demo; returns the process exit code."""
    import peftkit

    torch.manual_seed(seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    weights = pretrained_backbone(folder, seed, 30 if quick else 600)
    x, y, _ = draw_stars(64 if quick else 400, target=True, seed=seed + 1)
    xt, yt, _ = draw_stars(256 if quick else 2000, target=True, seed=seed + 2)
    chosen = methods.split(",") if methods else ["lora"]
    for name in chosen:
        model = peftkit.wrap(fresh_backbone(weights), name, train=["fc"])
        print(f"\nBefore adapting, target accuracy {accuracy(model, xt, yt):.1%}")
        print(model.summary())
        start = time.perf_counter()
        _fit(model, x, y, 10 if quick else 300, 3e-3, name, seed)
        took = time.perf_counter() - start
        acc = accuracy(model, xt, yt)
        file = peftkit.save(model, folder / f"{name}.safetensors")
        reloaded = peftkit.load(fresh_backbone(weights), file)
        with torch.no_grad():
            same = torch.equal(model.eval()(xt[:256]), reloaded.eval()(xt[:256]))
        backbone_bytes = weights.stat().st_size
        print(f"  target accuracy {acc:.1%} after {took:.1f}s of training")
        print(f"  adapter file {file} : {file.stat().st_size:,} bytes ({file.stat().st_size / backbone_bytes:.1%} "
              f"of the {backbone_bytes:,}-byte backbone)")
        print(f"  reloaded onto a freshly built backbone: outputs {'identical' if same else 'DIFFER'}")
        if not same:
            return 1
    return 0
