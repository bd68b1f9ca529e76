"""Every built-in method on a real-data transfer task: which method, at which settings (``make bench``).

The data ship in scikit-learn (nothing is downloaded or generated): the 1,797 handwritten digits of
``sklearn.datasets.load_digits`` (8 x 8 scans, upsampled to 16 x 16). A small ResNet (the demo's) is
pretrained on the digits 0-4; the target task is the digits 5-9 with only ``--shots`` labelled
images per class, tested on all the other 5-9 images. Every method runs with the settings in
``RECIPES`` (the ones the README recommends), against training from scratch and full fine-tuning,
for several seeds (the few-shot sample and the initialisation change with the seed).

    python benchmarks/methods.py [--shots 10] [--seeds 3] [--out benchmarks]

Writes ``methods.json`` and ``METHODS.md`` (mean and spread of the accuracy, trainable share, file
size, time). ``--smoke`` runs one seed for a few steps (the test suite does, so this cannot rot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import peftkit
from peftkit.demo import SmallResNet

HERE = Path(__file__).parent
SIZE = 16
# method -> (options, AdamW learning rate, steps): the recommended settings for a small pretrained CNN
# and a few labelled images per class (also in the README). Each trains a fresh 5-class head too.
RECIPES: dict[str, tuple[dict[str, Any], float, int]] = {
    "last_layer": ({}, 3e-2, 150),
    "last_layer unfreeze=1": ({"unfreeze": 1}, 3e-3, 150),
    "lora": ({"r": 4, "alpha": 8}, 3e-3, 150),
    "lora dora": ({"r": 4, "alpha": 8, "dora": True}, 3e-3, 150),
    "lora pissa": ({"r": 4, "alpha": 8, "init": "pissa"}, 1e-3, 150),
    "serial_adapter": ({"reduction": 4}, 3e-3, 150),
    "parallel_adapter": ({"reduction": 4}, 3e-3, 150),
    "fish": ({"keep": 0.05, "samples": 64}, 1e-3, 150),
}
BASELINES: dict[str, tuple[float, int]] = {"scratch": (3e-3, 150), "full fine-tune": (1e-3, 150)}


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (n, 3, 16, 16) images in [-1, 1] and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8), ink in [0, 1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (x.expand(-1, 3, -1, -1) - 0.5) / 0.5, torch.tensor(data.target)


def _fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(64, len(x)),), generator=g)
        shifted = torch.roll(x[idx], shifts=tuple(torch.randint(-2, 3, (2,), generator=g).tolist()), dims=(2, 3))
        loss = F.cross_entropy(model(shifted), y[idx])  # a shift of up to 2 px: the only augmentation
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
        sched.step()


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def pretrain(x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """The source model: digits 0-4, 5 classes."""
    torch.manual_seed(0)
    model = SmallResNet(n_classes=5)
    _fit(model, x, y, 3e-3, steps, seed=0)
    return model.state_dict()


def run(shots: int, seeds: int, smoke: bool) -> dict[str, Any]:
    torch.set_num_threads(2)
    x, y = digits()
    source, target = y < 5, y >= 5
    scale = 0.02 if smoke else 1.0  # smoke: a few steps each, to prove the code runs
    weights = pretrain(x[source], y[source], max(2, int(400 * scale)))
    results: dict[str, list[dict[str, float]]] = {}
    total = sum(p.numel() for p in SmallResNet(n_classes=5).parameters())
    tx, ty = x[target], y[target] - 5
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        picked = torch.cat([torch.nonzero(ty == c).flatten()[torch.randperm(int((ty == c).sum()), generator=g)[:shots]]
                            for c in range(5)])
        rest = torch.ones(len(ty), dtype=torch.bool)
        rest[picked] = False
        train_x, train_y, test_x, test_y = tx[picked], ty[picked], tx[rest], ty[rest]

        def backbone() -> SmallResNet:
            model = SmallResNet(n_classes=5)
            model.load_state_dict(weights)
            return model

        for name, (lr, steps) in BASELINES.items():
            torch.manual_seed(seed)
            model = SmallResNet(n_classes=5) if name == "scratch" else backbone()
            start = time.perf_counter()
            _fit(model, train_x, train_y, lr, max(2, int(steps * scale)), seed)
            results.setdefault(name, []).append({"accuracy": _accuracy(model, test_x, test_y), "trainable": total,
                                                 "bytes": 0, "seconds": time.perf_counter() - start})
        for name, (options, lr, steps) in RECIPES.items():
            torch.manual_seed(seed)
            method = name.split()[0]
            extra = {"data": [(train_x, train_y)]} if method == "fish" else {}
            start = time.perf_counter()
            m = peftkit.wrap(backbone(), method, head=5, **options, **extra)
            _fit(m, train_x, train_y, lr, max(2, int(steps * scale)), seed)
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as d:
                size = peftkit.save(m, Path(d) / "a.safetensors").stat().st_size
            results.setdefault(name, []).append({"accuracy": _accuracy(m, test_x, test_y),
                                                 "trainable": m.trainable_parameters(), "bytes": size,
                                                 "seconds": seconds})
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]['accuracy']:.3f}" for k, v in results.items()), flush=True)
    summary = {}
    for name, runs in results.items():
        accs = [r["accuracy"] for r in runs]
        summary[name] = {"accuracy": statistics.mean(accs), "spread": statistics.pstdev(accs),
                         "trainable": runs[0]["trainable"], "share": runs[0]["trainable"] / total,
                         "bytes": runs[0]["bytes"], "seconds": statistics.mean(r["seconds"] for r in runs)}
    return {"task": f"sklearn digits: pretrained on 0-4, adapted to 5-9 with {shots} images per class "
                    f"(tested on the other {int(target.sum()) - 5 * shots}), {seeds} seeds, {SIZE} px",
            "backbone parameters": total, "methods": summary}


def report(res: dict[str, Any]) -> str:
    lines = ["# Methods on a real-data transfer task", "", f"Generated by `make bench` ({res['task']}).", "",
             "| method | accuracy (mean ± sd over seeds) | trainable | share | file | time |", "|---|---|---|---|---|---|"]
    for name, r in sorted(res["methods"].items(), key=lambda kv: -kv[1]["accuracy"]):
        size = f"{r['bytes'] / 1024:.1f} kB" if r["bytes"] else "-"
        lines.append(f"| {name} | {100 * r['accuracy']:.1f} ± {100 * r['spread']:.1f} | {r['trainable']:,} | "
                     f"{100 * r['share']:.2f}% | {size} | {r['seconds']:.1f} s |")
    full = res["methods"]["full fine-tune"]["accuracy"]
    adapters = {k: v for k, v in res["methods"].items() if k in RECIPES and v["share"] < 0.10}
    best = max(adapters, key=lambda k: adapters[k]["accuracy"])
    lines += ["", f"Best method under 10% of the parameters: {best}, {100 * adapters[best]['accuracy']:.1f}% against "
                  f"{100 * full:.1f}% for full fine-tuning ({100 * (adapters[best]['accuracy'] - full):+.1f} points)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shots", type=int, default=10, help="labelled target images per class (default: 10)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--smoke", action="store_true", help="one seed, a few steps")
    a = p.parse_args(argv)
    res = run(a.shots, 1 if a.smoke else a.seeds, a.smoke)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "methods.json").write_text(json.dumps(res, indent=2))
    (a.out / "METHODS.md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
