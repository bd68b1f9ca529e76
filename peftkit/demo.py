"""``peftkit demo``: the whole story on a 2-core CPU, with data drawn on the fly (nothing downloaded).

1. Source task: count the points (3 to 8) of grey stars of any contrast on dark grounds. Target task: the same question
   in a shifted domain (coloured stars on coloured, noisy backgrounds, fatter arms), with only a
   few hundred labelled images.
2. A small ResNet (torchvision BasicBlocks) is pretrained on the source, cached on disk.
3. It is adapted to the target with every registered method, against two references: training
   from scratch and full fine-tuning.
4. One table (trainable parameters, file size, accuracy, time) and a plot.
5. Every adapter file is loaded, one after another, onto one frozen backbone: same accuracies.
6. Multi-task: one trunk, two heads (points: classification; size: quantiles, pinball loss), LoRA.
7. No labels in the target domain: LoRA and last-layer training adapt from labelled source images
   and unlabelled target images (DANN, CORAL), against the source-only backbone and the labelled
   target; a picture of the features before and after.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock
from tqdm import tqdm

import peftkit

__all__ = ["SmallResNet", "Task", "accuracy", "draw_stars", "fresh_backbone", "pretrained_backbone", "run"]

N_CLASSES = 6  # 3..8 points
SIZE = 32
QUANTILES = (0.1, 0.5, 0.9)
NOISE = 0.15  # target-domain pixel noise

# How each method is run in the demo (a third-party method gets its defaults and lr 3e-3).
RECIPES: dict[str, tuple[dict[str, Any], float]] = {
    "last_layer": ({}, 1e-2),
    "lora": ({"r": 4, "alpha": 8, "train": ["fc"]}, 3e-3),
    "serial_adapter": ({"reduction": 4, "train": ["fc"]}, 1e-2),
    "parallel_adapter": ({"reduction": 4, "train": ["fc"]}, 1e-2),
    "fish": ({"keep": 0.03, "samples": 256, "train": ["fc"]}, 3e-3),
}


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
    if not target:  # grey stars of random contrast, a little noise
        fg = (0.55 + 0.45 * torch.rand(n, 1, 1, 1, generator=g)).expand(n, 3, 1, 1)
        bg = (0.35 * torch.rand(n, 1, 1, 1, generator=g)).expand(n, 3, 1, 1)
        noise = 0.04
    else:  # a bright colour on a dark colour, noisier
        fg = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=g)
        bg = 0.35 * torch.rand(n, 3, 1, 1, generator=g)
        noise = NOISE
    images = bg + (fg - bg) * mask[:, None] + noise * torch.randn(n, 3, SIZE, SIZE, generator=g)
    return (images - 0.5) / 0.5, points - 3, radius


class SmallResNet(nn.Module):
    """A CPU-sized ResNet of torchvision BasicBlocks (16-32-64-128 channels).

    ``stem_stride=2`` (the demo's 32-pixel stars) halves the first feature maps, which makes a training
    step about 2.7x cheaper on CPU; the benchmarks' 16-pixel digits keep full resolution with 1.
    """

    def __init__(self, n_classes: int = N_CLASSES, widths: tuple[int, ...] = (16, 32, 64, 128),
                 stem_stride: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and c == w else nn.Sequential(nn.Conv2d(c, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            layers.append(nn.Sequential(BasicBlock(c, w, stride, down), BasicBlock(w, w)))
            c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))
        return out


@dataclass
class Task:
    x: torch.Tensor
    y: torch.Tensor
    size: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    test_size: torch.Tensor


def _fit(model: nn.Module, task: Task, steps: int, lr: float, label: str, seed: int,
         loss_fn: Any = None, batch: int = 48) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=f"  {label:<16}", unit="steps", disable=None)  # hidden where stderr is not a terminal
    correct = seen = 0
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(task.x), (batch,), generator=g)
        out = model(task.x[idx])
        if loss_fn is None:
            loss = F.cross_entropy(out, task.y[idx])
            correct += (out.argmax(1) == task.y[idx]).sum().item()
        else:
            loss = loss_fn(out, idx)
            correct += (out["points"].argmax(1) == task.y[idx]).sum().item()
        seen += batch
        opt.zero_grad()
        torch.autograd.backward(loss)  # what loss.backward() runs; Tensor.backward is unannotated
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4g}", train_acc=f"{correct / seen:.4g}", refresh=False)
        bar.update(1)
    bar.close()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    out = torch.cat([model(b).argmax(1) for b in torch.split(x, 500)])
    return (out == y).float().mean().item()


def pretrained_backbone(out: Path, seed: int, steps: int) -> Path:
    """Pretrain on the source task once; later runs reuse the cached weights."""
    path = out / f"backbone-seed{seed}-steps{steps}.pt"
    if path.exists():
        print(f"2. Pretrained backbone: cached at {path}")
        return path
    x, y, r = draw_stars(6000, target=False, seed=seed)
    tx, ty, tr = draw_stars(1000, target=False, seed=seed + 100)
    torch.manual_seed(seed)
    model = SmallResNet()
    print(f"2. Pretraining a {sum(p.numel() for p in model.parameters()):,}-parameter ResNet on the source task")
    _fit(model, Task(x, y, r, tx, ty, tr), steps, 3e-3, "source", seed)
    print(f"   source accuracy {accuracy(model, tx, ty):.1%}; cached at {path}")
    torch.save(model.state_dict(), path)
    return path


def fresh_backbone(weights: Path) -> SmallResNet:
    model = SmallResNet()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model


@dataclass
class Row:
    method: str
    trainable: int
    file_bytes: int | None
    accuracy: float
    seconds: float
    file: Path | None = None


def _table(rows: list[Row], total: int) -> str:
    lines = [f"   {'method':<18}{'trainable':>12}{'%':>8}{'file':>11}{'accuracy':>10}{'time':>8}"]
    for r in rows:
        size = f"{r.file_bytes / 1024:.1f} kB" if r.file_bytes else "-"
        lines.append(f"   {r.method:<18}{r.trainable:>12,}{100 * r.trainable / total:>7.2f}%{size:>11}"
                     f"{r.accuracy:>9.1%}{r.seconds:>7.1f}s")
    return "\n".join(lines)


def _plot(rows: list[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, r in enumerate(sorted(rows, key=lambda r: (r.trainable, r.accuracy))):
        ax.scatter(r.trainable, 100 * r.accuracy, s=40)
        below = i % 2 == 1  # alternate sides so neighbouring labels do not collide
        ax.annotate(r.method, (r.trainable, 100 * r.accuracy), textcoords="offset points",
                    xytext=(5, -11 if below else 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("target accuracy (%)")
    ax.set_title("Adapting a pretrained star counter to a shifted domain")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _adapt(name: str, weights: Path, task: Task, steps: int, seed: int, folder: Path) -> Row:
    options, lr = RECIPES.get(name, ({}, 3e-3))
    options = dict(options)
    if name == "fish":
        options["data"] = [(task.x[i:i + 64], task.y[i:i + 64]) for i in range(0, len(task.x), 64)]
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = peftkit.wrap(fresh_backbone(weights), name, **options)
    _fit(model, task, steps, lr, name, seed)
    took = time.perf_counter() - start
    file = peftkit.save(model, folder / f"{name}.safetensors")
    return Row(name, model.trainable_parameters(), file.stat().st_size, accuracy(model, task.test_x, task.test_y), took, file)


def _reference(name: str, weights: Path | None, task: Task, steps: int, seed: int) -> Row:
    torch.manual_seed(seed)
    model = fresh_backbone(weights) if weights else SmallResNet()
    start = time.perf_counter()
    _fit(model, task, steps, 1e-3 if weights else 3e-3, name, seed)
    return Row(name, sum(p.numel() for p in model.parameters()), None,
               accuracy(model, task.test_x, task.test_y), time.perf_counter() - start)


def _multitask(weights: Path, task: Task, steps: int, seed: int, folder: Path) -> None:
    lo, hi = task.size.min(), task.size.max()

    def scaled(r: torch.Tensor) -> torch.Tensor:
        return (r - lo) / (hi - lo)  # radius -> [0, 1]

    def loss_fn(out: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        total, _ = peftkit.multitask_loss(
            out, {"points": task.y[idx], "size": scaled(task.size[idx])},
            {"points": F.cross_entropy, "size": lambda p, t: peftkit.pinball_loss(p, t, QUANTILES)},
            weights={"size": 4.0})
        return total

    torch.manual_seed(seed)
    model = peftkit.wrap(fresh_backbone(weights), "lora", r=4, heads={"points": N_CLASSES, "size": len(QUANTILES)})
    _fit(model, task, steps, 3e-3, "lora, two heads", seed, loss_fn=loss_fn)
    model.eval()
    with torch.no_grad():
        out = model(task.test_x)
    acc = (out["points"].argmax(1) == task.test_y).float().mean().item()
    size = scaled(task.test_size)
    q = out["size"].sort(dim=1).values
    covered = ((q[:, 0] <= size) & (size <= q[:, 2])).float().mean().item()
    pinball = peftkit.pinball_loss(out["size"], size, QUANTILES).item()
    mae = (q[:, 1] - size).abs().mean().item() * (hi - lo).item()
    file = peftkit.save(model, folder / "multitask-lora.safetensors")
    print(f"   points accuracy {acc:.1%}; size: median off by {mae:.3f} radius units, "
          f"{covered:.0%} inside the 10-90% band (80% expected), pinball loss {pinball:.4f}")
    print(f"   both heads and the LoRA deltas: {file} ({file.stat().st_size / 1024:.1f} kB)")


# Unsupervised adaptation (step 7): method -> (options, learning rate); each variant's loss weight
ADAPT: dict[str, tuple[dict[str, Any], float]] = {"lora": ({"r": 4, "alpha": 8}, 3e-3),
                                                  "last_layer unfreeze=1": ({"unfreeze": 1}, 3e-3)}
ADAPT_WEIGHTS = {"dann": 1.0, "coral": 10.0}


def adapt_unlabelled(weights: Path, method: str, variant: str, source: tuple[torch.Tensor, torch.Tensor],
                     target: tuple[torch.Tensor, torch.Tensor], steps: int, seed: int) -> peftkit.AdaptedModel:
    """An adapter and a fresh label head trained from labelled source rows and target rows: with
    ``variant`` ``"dann"``/``"coral"`` the target's labels are never read; ``"target labels"`` trains
    on the target's labels instead (the reference)."""
    options, lr = ADAPT[method]
    heads: dict[str, Any] = {"label": N_CLASSES, **({"domain": [64, 1]} if variant == "dann" else {})}
    torch.manual_seed(seed)
    m = peftkit.wrap(fresh_backbone(weights), method.split()[0], heads=heads, **options)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    da = (peftkit.DomainAdaptation(m, variant, weight=ADAPT_WEIGHTS[variant], total_steps=steps)
          if variant in ADAPT_WEIGHTS else None)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=f"  {method + ', ' + variant:<16}", unit="steps", disable=None)
    m.train()
    for _ in range(steps):
        i, j = (torch.randint(0, len(source[0]), (32,), generator=g), torch.randint(0, len(target[0]), (32,), generator=g))
        if da is not None:
            loss, logs = da.loss(source[0][i], source[1][i], target[0][j])  # target labels unread
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()}, refresh=False)
        else:
            loss = F.cross_entropy(m(target[0][j])["label"], target[1][j])
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
        sched.step()
        bar.update(1)
    bar.close()
    return m.eval()


@torch.no_grad()
def _label_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (torch.cat([model(b)["label"].argmax(1) for b in torch.split(x, 500)]) == y).float().mean().item()


def _feature_plot(before: nn.Module, after: peftkit.AdaptedModel, source: torch.Tensor, target: torch.Tensor,
                  title: str, path: Path) -> bool:
    """Source and target features entering the output layer, before and after adapting, on their first
    two principal components (fitted to each model's features of both domains)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(model, peftkit.AdaptedModel):
            return model.forward_with_features(x)[1]
        seen: list[torch.Tensor] = []
        handle = model.get_submodule("fc").register_forward_pre_hook(lambda _m, args: seen.append(args[0]))  # plain
        model(x)
        handle.remove()
        return seen[0]

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    with torch.no_grad():
        for ax, model, name in ((axes[0], before.eval(), "pretrained on the source"), (axes[1], after, title)):
            feats = torch.cat([features(model, x) for x in (source, target)])
            centred = feats - feats.mean(0)
            _, _, v = torch.linalg.svd(centred, full_matrices=False)
            xy = centred @ v[:2].T
            n = len(source)
            ax.scatter(xy[:n, 0], xy[:n, 1], s=4, alpha=0.5, label="source (grey stars)")
            ax.scatter(xy[n:, 0], xy[n:, 1], s=4, alpha=0.5, label="target (coloured, no labels)")
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0].legend(fontsize=8, markerscale=3)
    fig.suptitle("Features entering the output layer (first two principal components)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _no_labels(weights: Path, task: Task, steps: int, seed: int, folder: Path) -> None:
    source = draw_stars(len(task.x) * 4, target=False, seed=seed + 10)[:2]
    before = accuracy(fresh_backbone(weights), task.test_x, task.test_y)
    print(f"   source only (the pretrained backbone, never shown a target image): {before:.1%}")
    header = f"   {'method':<24}" + "".join(f"{v:>15}" for v in ("dann", "coral", "target labels"))
    print(header)
    best: tuple[float, str, peftkit.AdaptedModel | None] = (-1.0, "", None)
    for method in ADAPT:
        accs = []
        for variant in (*ADAPT_WEIGHTS, "target labels"):
            m = adapt_unlabelled(weights, method, variant, source, (task.x, task.y), steps, seed)
            accs.append(_label_accuracy(m, task.test_x, task.test_y))
            if variant in ADAPT_WEIGHTS and accs[-1] > best[0]:
                best = (accs[-1], f"{method} + {variant}", m)
        recovered = [(a - before) / (accs[-1] - before) if accs[-1] != before else float("nan") for a in accs[:-1]]
        print(f"   {method:<24}" + "".join(f"{a:>8.1%} ({r:>+4.0%})" for a, r in zip(accs, recovered, strict=False))
              + f"{accs[-1]:>15.1%}")
    print("   (in brackets: the share of the gap between source only and target labels recovered without labels)")
    if best[2] is not None:
        file = peftkit.save(best[2], folder / "adapters-unlabelled.safetensors")
        plot = folder / "domain_features.png"
        n = min(300, len(task.test_x))
        drawn = _feature_plot(fresh_backbone(weights), best[2], source[0][:n], task.test_x[:n], best[1], plot)
        print(f"   best without labels: {best[1]}, {best[0]:.1%}; its adapter file: {file}")
        print(f"   features before and after: {plot}" if drawn else "   (install matplotlib for the picture)")


def _mixed_batch(adapted: peftkit.AdaptedModel, names: list[str], x: torch.Tensor) -> None:
    """One batch whose rows each use another adapter (``adapter_names``) against one batch per adapter."""
    rows = [names[i % len(names)] for i in range(len(x))]
    adapted.eval()
    with torch.no_grad():
        times = []
        for _ in range(2):  # the second time, warm
            start = time.perf_counter()
            mixed = adapted(x, adapter_names=rows)
            mixed_ms = 1000 * (time.perf_counter() - start)
            own = torch.empty_like(mixed)
            start = time.perf_counter()
            for name in names:
                mine = torch.tensor([n == name for n in rows])
                adapted.set_adapter(name)
                own[mine] = adapted(x[mine])
            times.append((mixed_ms, 1000 * (time.perf_counter() - start)))
        mixed_ms, own_ms = times[-1]
    diff = (mixed - own).abs().max().item()
    print(f"   one mixed batch of {len(x)} images, row i served by adapter i mod {len(names)} ({', '.join(names)}): "
          f"{mixed_ms:.0f} ms, against {own_ms:.0f} ms for {len(names)} batches of one adapter each; the outputs "
          f"differ from those by at most {diff:.1e}")
    print("   (one pass serves every user; LoRA rows are batched across adapters, while FISH and the heads run their "
          "layers again on their rows, which costs more here than 6 small batches: see benchmarks/RESULTS.md, mixed)")


def run(out: str = "peftkit-demo", methods: str | None = None, quick: bool = False, seed: int = 0) -> int:
    """Run the demo; returns the process exit code."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    folder = Path(out)
    (folder / "adapters").mkdir(parents=True, exist_ok=True)
    available = list(peftkit.methods())
    chosen = [m.strip() for m in methods.split(",")] if methods else available
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise peftkit.errors.UnknownMethodError(f"unknown methods {unknown}; available: {', '.join(available)}")
    steps, n_target = (8, 64) if quick else (120, 400)
    started = time.perf_counter()

    n_test = 256 if quick else 2000
    print(f"1. Data: source = grey stars on dark grounds; target = coloured, noisy, fatter stars "
          f"({n_target} labelled images, {n_test} for testing). Seed {seed}.")
    x, y, r = draw_stars(n_target, target=True, seed=seed + 1)
    tx, ty, tr = draw_stars(n_test, target=True, seed=seed + 2)
    task = Task(x, y, r, tx, ty, tr)
    weights = pretrained_backbone(folder, seed, 20 if quick else 300)
    backbone = fresh_backbone(weights)
    total = sum(p.numel() for p in backbone.parameters())
    print(f"   pretrained backbone on the target domain, before adapting: {accuracy(backbone, tx, ty):.1%} "
          f"(chance {1 / N_CLASSES:.1%})")

    print(f"3. Adapting to the target: {', '.join(chosen)}, and two references")
    rows = [_reference("scratch", None, task, steps, seed), _reference("full fine-tune", weights, task, steps, seed)]
    rows += [_adapt(name, weights, task, steps, seed, folder / "adapters") for name in chosen]

    print(f"4. Results (accuracy on {n_test} held-out target images)")
    print(_table(rows, total))
    full = rows[1]
    small = [r for r in rows[2:] if r.trainable < 0.05 * full.trainable]
    if small:
        best = max(small, key=lambda r: r.accuracy)
        print(f"   best method under 5% of the parameters: {best.method}, {best.accuracy:.1%} with "
              f"{best.trainable / full.trainable:.1%} of them, against {full.accuracy:.1%} for full fine-tuning; "
              f"training from scratch on {n_target} images: {rows[0].accuracy:.1%}")
    plot = folder / "accuracy_vs_parameters.png"
    print(f"   plot: {plot}" if _plot(rows, plot) else "   (install matplotlib for the plot)")
    print(f"   adapter files: {folder / 'adapters'}")

    print("5. Swapping every adapter file onto one frozen backbone")
    adapted = None
    ok = True
    for row in rows[2:]:
        assert row.file is not None, f"no adapter file for {row.method}"  # every adapter's row has one
        start = time.perf_counter()
        if adapted is None:
            adapted = peftkit.load(fresh_backbone(weights), row.file, name=row.method)
        else:
            adapted.load_adapter(row.file, name=row.method)
            adapted.set_adapter(row.method)
        swap_ms = 1000 * (time.perf_counter() - start)
        acc = accuracy(adapted, tx, ty)
        same = acc == row.accuracy
        ok &= same
        print(f"   {row.method:<18} loaded in {swap_ms:6.1f} ms, accuracy {acc:.1%} "
              f"({'identical' if same else 'DIFFERENT from step 4'})")

    if adapted is not None:
        _mixed_batch(adapted, [row.method for row in rows[2:]], tx)

    print("6. Multi-task: one trunk, two heads (points: classes; size: 10/50/90% quantiles), LoRA")
    _multitask(weights, task, steps, seed, folder)
    print("7. No labels in the target domain: labelled source images, unlabelled target images")
    _no_labels(weights, task, 8 if quick else 80, seed, folder)
    print(f"Done in {time.perf_counter() - started:.0f} s. Everything is in {folder}/")
    return 0 if ok else 1
