"""``peftkit train`` and ``peftkit predict``: the course's transfer-learning recipe as a command.

A torchvision or timm classifier (its weights from a local file: nothing is downloaded) is adapted
to an ImageFolder with any registered method; only the adapter file is written, with what
``predict`` needs to use it (the model's name, the class names, the image size and normalisation)
in its header::

    peftkit train --data hymenoptera_data --model resnet18 --weights resnet18.pth --method lora --r 8 \\
        --epochs 5 --out bees-ants.safetensors
    peftkit predict --adapter bees-ants.safetensors --weights resnet18.pth --data new_photos/

``--data`` holds ``train/`` and ``val/`` (or ``valid/``, ``validation/``) folders with one subfolder per
class, or the class subfolders directly (then ``--val-fraction`` of the images, 20% by default, is
held out with a fixed seed).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from tqdm import tqdm

import peftkit
from peftkit.errors import ConfigError

__all__ = [
    "EpochStats", "Prediction", "TrainResult", "build_backbone", "method_options", "predict", "split_folders", "train",
    "weights_digest", "write_predictions",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_FOLDERS = ("val", "valid", "validation")
HEADS = ("auto", "new", "keep")
WRAP_LISTS = ("targets", "exclude", "train")  # wrap's own options, given as comma lists


@dataclasses.dataclass
class EpochStats:
    """One epoch of ``train``: mean training loss and accuracy, validation accuracy, seconds."""

    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float
    seconds: float


@dataclasses.dataclass
class TrainResult:
    """What ``train`` did.

    Attributes:
        adapter: The adapter file written (the epoch with the best validation accuracy).
        classes: The class names, in the order of the model's outputs.
        accuracy: Validation accuracy of the saved adapter.
        best_epoch: The epoch whose adapter was saved (1-based).
        history: Per-epoch statistics.
        confusion: ``(classes, classes)`` counts of the saved adapter on the validation set, rows the
            true class and columns the predicted one.
        plot: The PNG written (accuracy curves and confusion matrix), or None without matplotlib.
        trainable: Trainable parameters.
        total: Parameters of the backbone.
    """

    adapter: Path
    classes: list[str]
    accuracy: float
    best_epoch: int
    history: list[EpochStats]
    confusion: torch.Tensor
    plot: Path | None
    trainable: int
    total: int


@dataclasses.dataclass
class Prediction:
    """One image's prediction: the file, the predicted class and its probability, and the true
    class where the image sits in a folder named after one."""

    path: Path
    predicted: str
    probability: float
    label: str | None


# -- backbone -------------------------------------------------------------------------------------
def _torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm() -> types.ModuleType | None:
    try:
        import timm  # optional: `pip install timm`
    except ImportError:
        return None
    module: types.ModuleType = timm
    return module


def build_backbone(name: str, weights: str | os.PathLike[str] | None = None, *, seed: int = 0) -> nn.Module:
    """A torchvision (``resnet18``) or timm (``timm:resnet10t``, or a name only timm has) classifier,
    with the weights of a local file (a ``state_dict``, or a checkpoint holding one under
    ``state_dict`` or ``model``); without ``weights``, random weights drawn from ``seed``.

    Raises:
        ConfigError: an unknown model name (with the nearest ones), an unreadable weights file, or
            weights of another architecture (with the first keys that differ).
    """
    tv_names = _torchvision_names()
    timm = _timm()
    plain = name.removeprefix("timm:")
    torch.manual_seed(seed)
    if not name.startswith("timm:") and name in tv_names:
        model: nn.Module = torchvision.models.get_model(name, weights=None)
    elif timm is not None and timm.is_model(plain):
        model = timm.create_model(plain, pretrained=False)
    else:
        known = tv_names + ([f"timm:{n}" for n in timm.list_models()] if timm is not None else [])
        close = difflib.get_close_matches(name, known, 5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        extra = "" if timm is not None else " (timm models need `pip install timm`)"
        raise ConfigError(f"model={name!r} is neither a torchvision nor a timm model{extra}{hint}. "
                          "See torchvision.models.list_models() and timm.list_models().")
    if weights is not None:
        _load_weights(model, Path(weights), name)
    return model


def _load_weights(model: nn.Module, path: Path, name: str) -> None:
    if not path.is_file():
        raise ConfigError(f"weights={str(path)!r} is not a file; pass a local state_dict (.pth) saved with "
                          "torch.save(model.state_dict(), path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ConfigError(f"weights={str(path)!r} cannot be read as a PyTorch checkpoint of tensors "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights={str(path)!r} holds no state_dict (a mapping of names to tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)) if keys]
        raise ConfigError(f"weights={str(path)!r} are not {name}'s ({'; '.join(parts)}); pass the model they were "
                          "saved from with --model")
    model.load_state_dict(state)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's tensors (names, dtypes, shapes, values): the same for the same weights,
    however the file holding them was written."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _normalisation(model: nn.Module, size: int | None) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Image size and normalisation the backbone expects: timm's pretrained config, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = cfg.get("input_size", (3, 224, 224))[-1]
    return (size if size is not None else int(default), tuple(cfg.get("mean", IMAGENET_MEAN)),
            tuple(cfg.get("std", IMAGENET_STD)))


# -- data -----------------------------------------------------------------------------------------
def _load_image(path: str) -> Any:
    """An image as RGB, or an error naming the file (a corrupt or mislabelled file in the folder)."""
    try:
        return torchvision.datasets.folder.default_loader(path)
    except OSError as exc:  # PIL's UnidentifiedImageError, truncated files
        raise ConfigError(f"{path!r} is not a readable image ({type(exc).__name__}: {str(exc)[:120]}); remove or "
                          "replace it") from None


def _image_folder(root: Path, transform: Callable[[Any], Any]) -> torchvision.datasets.ImageFolder:
    try:
        return torchvision.datasets.ImageFolder(root, transform, loader=_load_image)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"data={str(root)!r} is not an ImageFolder: {exc}. Expected one subfolder per class "
                          "holding images (.jpg, .png, ...), or train/ and val/ folders laid out that way.") from None


def split_folders(root: str | os.PathLike[str], train_tf: Callable[[Any], Any], eval_tf: Callable[[Any], Any], *,
                  val_fraction: float = 0.2, seed: int = 0) -> tuple[Any, Any, list[str]]:
    """Training and validation sets (map-style datasets of ``(image, class index)``) of an
    ImageFolder root, and the class names.

    ``root/train`` with ``root/val`` (or ``valid``, ``validation``) are used as they are; otherwise
    ``root`` (or ``root/train``) is split, ``val_fraction`` of each class held out with ``seed``.

    Raises:
        ConfigError: no images, one class only, or train and val folders with different classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data={str(root)!r} is not a folder")
    train_root = root / "train" if (root / "train").is_dir() else root
    val_root = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if val_root is None and not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction!r} is invalid; expected a fraction in (0, 1), e.g. 0.2")
    train_set = _image_folder(train_root, train_tf)
    classes: list[str] = list(train_set.classes)
    if len(classes) < 2:
        raise ConfigError(f"data={str(root)!r} has {len(classes)} class folder(s) ({', '.join(classes)}); a "
                          "classifier needs at least two")
    if val_root is not None:
        val_set = _image_folder(val_root, eval_tf)
        if list(val_set.classes) != classes:
            raise ConfigError(f"{str(val_root)!r} has classes {val_set.classes}, but {str(train_root)!r} has "
                              f"{classes}; both need the same class folders")
        return train_set, val_set, classes
    eval_set = _image_folder(train_root, eval_tf)
    g = torch.Generator().manual_seed(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for c in range(len(classes)):  # stratified: each class keeps its share in both parts
        idx = [i for i, t in enumerate(train_set.targets) if t == c]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        cut = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val_idx += idx[:cut]
        train_idx += idx[cut:]
    return Subset(train_set, train_idx), Subset(eval_set, val_idx), classes


def _transforms(size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[Any, Any]:
    norm = transforms.Normalize(mean, std)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.5, 1.0)), transforms.RandomHorizontalFlip(),
                                   transforms.ColorJitter(0.2, 0.2, 0.2), transforms.ToTensor(), norm])
    eval_tf = transforms.Compose([transforms.Resize(math.ceil(size * 1.14)), transforms.CenterCrop(size),
                                  transforms.ToTensor(), norm])
    return train_tf, eval_tf


# -- options ----------------------------------------------------------------------------------------
def _convert(text: str, hint: Any, option: str) -> Any:
    """A command-line value as the type of a method's config field (``int``, ``float``, ``bool``,
    ``str``, lists, optionals); other types are parsed as JSON, else kept as text."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in [a for a in args if a is not type(None)]:
            try:
                return _convert(text, arg, option)
            except ConfigError:
                continue
        raise ConfigError(f"--{option.replace('_', '-')} {text!r} is not a {hint}")
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        inner = args[0] if args else str
        items = [_convert(t.strip(), inner, option) for t in text.split(",") if t.strip()]
        return tuple(items) if origin is tuple or hint is tuple else items
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(text)
    except ValueError:
        raise ConfigError(f"--{option.replace('_', '-')} {text!r} is not a valid {hint.__name__}") from None
    try:
        return json.loads(text)
    except ValueError:
        return text


def method_options(method: str, args: Sequence[str]) -> dict[str, Any]:
    """The ``--option value`` pairs after a method's name, converted to its config's field types
    (``--r 8 --alpha 16``, ``--targets 'layer4\\..*'``; a boolean ``--flag`` alone means true).

    Raises:
        ConfigError: an option the method does not have (with the nearest names), or a bad value.
    """
    cls = peftkit.methods()[method].cls if method in peftkit.methods() else None
    if cls is None:
        raise peftkit.errors.UnknownMethodError(f"no method {method!r}; registered: {', '.join(peftkit.methods())}")
    fields = {f.name: f for f in dataclasses.fields(cls.Config) if not f.metadata.get("runtime")}
    hints = typing.get_type_hints(cls.Config)
    options: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) < 3:
            raise ConfigError(f"unexpected argument {token!r}; method options are given as --name value")
        key, _, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields and key not in WRAP_LISTS:
            names = [*fields, *WRAP_LISTS]
            close = ([n for n in names if key.startswith(n) or n.startswith(key)]  # --rank for --r
                     or difflib.get_close_matches(key, names, 1))
            raise ConfigError(f"method {method!r} has no option --{key.replace('_', '-')}"
                              f"{f' (did you mean --{close[0]}?)' if close else ''}; its options are: "
                              f"{', '.join('--' + f.replace('_', '-') for f in fields) or 'none'} (and --targets, "
                              "--exclude, --train: comma lists of module names)")
        if inline or "=" in token:
            value, i = inline, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 2
        elif key not in WRAP_LISTS and hints[key] is bool:
            value, i = "true", i + 1  # a flag alone
        else:
            raise ConfigError(f"--{key.replace('_', '-')} needs a value")
        options[key] = (_convert(value, list[str], key) if key in WRAP_LISTS else _convert(value, hints[key], key))
    return options


# -- training -------------------------------------------------------------------------------------
def _outputs(module: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels", "num_embeddings"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    return None


def _head(model: nn.Module, choice: str, classes: int) -> int | None:
    """``head=`` for wrap: a fresh output layer with one output per class, or None to keep the model's."""
    if choice not in HEADS:
        raise ConfigError(f"head={choice!r} is invalid; expected one of {', '.join(HEADS)}")
    output = peftkit.find_output_layer(model)
    have = _outputs(model.get_submodule(output)) if output is not None else None
    if choice == "new" or (choice == "auto" and have != classes):
        return classes
    if have != classes:
        raise ConfigError(f"head='keep' keeps the model's output layer {output!r} with {have} outputs, but the data has "
                          f"{classes} classes; use head='auto' for a fresh layer with one output per class")
    return None


@torch.no_grad()
def _evaluate(model: nn.Module, loader: Iterable[Any], classes: int) -> tuple[float, torch.Tensor]:
    model.eval()
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    for x, y in loader:
        pred = model(x).argmax(1)
        confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    total = int(confusion.sum())
    return (float(confusion.diag().sum()) / total if total else 0.0), confusion


def train(data: str | os.PathLike[str], out: str | os.PathLike[str], *, model: str = "resnet18",
          weights: str | os.PathLike[str] | None = None, method: str = "lora", options: dict[str, Any] | None = None,
          head: str = "auto", epochs: int = 5, lr: float | None = None, lr_decay: float = 0.8, batch_size: int = 32,
          image_size: int | None = None, val_fraction: float = 0.2, seed: int = 0, plot: bool = True,
          max_steps: int | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune a classifier on an ImageFolder with a peftkit method and write the adapter file.

    Args:
        data: ImageFolder root (see :func:`split_folders`).
        out: The adapter file to write (``.safetensors``); the plot goes next to it (``.png``).
        model: A torchvision or timm model name (see :func:`build_backbone`).
        weights: Local backbone weights; None: random weights (for trying the command only).
        method: A registered method (``peftkit methods``).
        options: The method's options and wrap's ``targets``/``exclude``/``train``.
        head: ``auto``: a fresh output layer when the model's has another number of outputs than
            there are classes; ``new``: always a fresh one; ``keep``: the model's own.
        epochs: Passes over the training set.
        lr: AdamW learning rate at the output; None: the method's advice (:attr:`Method.learning_rate`).
        lr_decay: Per-block factor towards the input (:func:`peftkit.param_groups`).
        batch_size: Images per step.
        image_size: Side of the square input; None: what the model expects (224 for torchvision).
        val_fraction: Share held out when there is no validation folder.
        seed: Seeds the split, the shuffling, the augmentation and random backbone weights.
        plot: Write the PNG (needs matplotlib; skipped with a note without it).
        max_steps: Stop each epoch after this many steps (smoke tests).
        log: Where progress lines go.
    """
    for what, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("max_steps", max_steps, 1),
                             ("image_size", image_size, 16)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{what}={value!r} is invalid; expected an integer of at least {low}")
    if lr is not None and not 0 < lr < math.inf:
        raise ConfigError(f"lr={lr!r} is invalid; expected a positive learning rate such as 1e-3")
    infos = peftkit.methods()
    if method not in infos:
        raise peftkit.errors.UnknownMethodError(f"no method {method!r}; registered: {', '.join(infos)}")
    out = Path(out)
    if out.suffix.lower() != ".safetensors" or out.is_dir():
        raise ConfigError(f"out={str(out)!r} names the adapter file to write: give it a .safetensors name (the plot "
                          "is written beside it, as .png)")
    backbone = build_backbone(model, weights, seed=seed)
    size, mean, std = _normalisation(backbone, image_size)
    train_set, val_set, classes = split_folders(data, *_transforms(size, mean, std), val_fraction=val_fraction, seed=seed)
    if len(val_set) == 0 or len(train_set) == 0:
        raise ConfigError(f"data={str(data)!r} leaves {len(train_set)} images for training and {len(val_set)} to "
                          "validate; both need some (add images, change val_fraction, or add a val/ folder)")
    if out.exists():
        log(f"note: {out} exists; it is replaced when the first epoch ends")
    g = torch.Generator().manual_seed(seed)
    # a last batch of one image would fail in BatchNorm layers being trained: dropped when there is more
    train_loader = DataLoader(train_set, batch_size, shuffle=True, generator=g, num_workers=0,
                              drop_last=len(train_set) % batch_size == 1 and len(train_set) > batch_size)
    val_loader = DataLoader(val_set, batch_size, num_workers=0)
    options = dict(options or {})
    config_fields = {f.name for f in dataclasses.fields(infos[method].cls.Config)}
    if "data" in config_fields and "data" not in options:  # a method that estimates from data (FISH)
        options["data"] = train_loader
    m = peftkit.wrap(backbone, method, head=_head(backbone, head, len(classes)), **options)
    trainable = m.trainable_parameters()
    total = sum(p.numel() for p in backbone.parameters())
    rate = lr if lr is not None else (infos[method].cls.learning_rate or 1e-3)
    log(f"{model} + {method}: {trainable:,} parameters train ({trainable / total:.2%} of the backbone's {total:,}); "
        f"{len(classes)} classes, {len(train_set)} training and {len(val_set)} validation images at {size} px; "
        f"lr {rate:g}")
    opt = torch.optim.AdamW(peftkit.param_groups(m, lr=rate, decay=lr_decay), weight_decay=1e-4)
    steps_per_epoch = len(train_loader) if max_steps is None else min(max_steps, len(train_loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [g_["lr"] for g_ in opt.param_groups],
                                                total_steps=epochs * steps_per_epoch, pct_start=0.1)
    meta = {"train.model": model, "train.classes": json.dumps(classes), "train.image_size": str(size),
            "train.mean": json.dumps(mean), "train.std": json.dumps(std), "train.seed": str(seed),
            "train.weights": weights_digest(backbone) if weights is not None else "none"}
    history: list[EpochStats] = []
    best = (-1.0, 0, torch.zeros(0))
    for epoch in range(1, epochs + 1):
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        m.train()
        bar = tqdm(train_loader, total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", unit="batch", disable=None,
                   leave=False)
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            logits = m(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)  # what loss.backward() runs; Tensor.backward is unannotated
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        accuracy, confusion = _evaluate(m, val_loader, len(classes))
        history.append(EpochStats(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), accuracy,
                                  time.perf_counter() - start))
        log(f"epoch {epoch}/{epochs}: loss {history[-1].loss:.3f}, train accuracy {history[-1].train_accuracy:.1%}, "
            f"val accuracy {accuracy:.1%} ({history[-1].seconds:.1f} s)")
        if accuracy > best[0]:  # keep the best epoch's adapter
            best = (accuracy, epoch, confusion)
            peftkit.save(m, out, metadata={**meta, "train.val_accuracy": f"{accuracy:.6f}", "train.epoch": str(epoch)})
    picture = _plot(history, best[2], classes, out.with_suffix(".png"), log) if plot else None
    log(f"saved {out} ({out.stat().st_size:,} bytes): epoch {best[1]}, val accuracy {best[0]:.1%}"
        + (f"; plot {picture}" if picture else ""))
    m.unwrap()
    return TrainResult(out, classes, best[0], best[1], history, best[2], picture, trainable, total)


def _plot(history: list[EpochStats], confusion: torch.Tensor, classes: list[str], path: Path,
          log: Callable[[str], None]) -> Path | None:
    try:
        import matplotlib  # optional: `pip install peftkit[demo]`

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no plot: matplotlib is not installed (pip install matplotlib)")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    epochs = [h.epoch for h in history]
    left.plot(epochs, [h.train_accuracy for h in history], "o-", label="train")
    left.plot(epochs, [h.val_accuracy for h in history], "o-", label="validation")
    left.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.legend()
    right.imshow(confusion.numpy(), cmap="Blues")
    right.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
              title="confusion (validation, saved epoch)")
    right.set_xticklabels(classes, rotation=45, ha="right")
    right.set_yticklabels(classes)
    dark = confusion.max().item() / 2
    for (i, j), n in zip(((i, j) for i in range(len(classes)) for j in range(len(classes))),
                         confusion.flatten().tolist(), strict=True):
        right.text(j, i, str(n), ha="center", va="center", color="white" if n > dark else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- prediction -----------------------------------------------------------------------------------
def _header_value(header: peftkit.AdapterHeader, key: str) -> Any:
    value = header.user_metadata.get(key)
    if value is None:
        raise ConfigError(f"{str(header.path)!r} was not written by `peftkit train` (its header has no {key!r}); "
                          "load it with peftkit.load in your own code")
    try:
        return json.loads(value) if key in ("train.classes", "train.mean", "train.std") else value
    except ValueError:
        raise peftkit.errors.AdapterFileError(f"{str(header.path)!r} has a corrupt {key!r} entry") from None


class _Images(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, files: list[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(_load_image(str(self.files[i]))), i


def predict(adapter: str | os.PathLike[str], data: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None,
            model: str | None = None, batch_size: int = 32) -> list[Prediction]:
    """Classify every image under ``data`` with an adapter file written by :func:`train`.

    The backbone is rebuilt from the file's header (``model`` overrides its name) with ``weights``,
    which must hold the tensors the adapter was trained on (checked by a hash of the tensors, so a
    re-saved copy is fine). An image in a folder named after a class gets that class as its label.

    Raises:
        ConfigError: no images, the wrong weights, or a file ``train`` did not write.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is invalid; expected at least 1")
    root = Path(data)
    if not root.exists():
        raise ConfigError(f"data={str(data)!r} does not exist")
    header = peftkit.read_header(adapter)
    classes: list[str] = _header_value(header, "train.classes")
    name = model or _header_value(header, "train.model")
    trained_on = _header_value(header, "train.weights")
    if trained_on != "none" and weights is None:
        raise ConfigError(f"{str(adapter)!r} was trained on backbone weights from a file; pass that file with --weights")
    if trained_on == "none" and weights is not None:
        raise ConfigError(f"{str(adapter)!r} was trained on random backbone weights (no --weights), not on "
                          f"{str(weights)!r}: its predictions only make sense on the same random backbone; leave out "
                          "--weights")
    backbone = build_backbone(name, weights, seed=int(_header_value(header, "train.seed")))
    if weights is not None and weights_digest(backbone) != trained_on:
        raise ConfigError(f"weights={str(weights)!r} are not the ones {str(adapter)!r} was trained on (their tensors "
                          "differ); pass the weights file given to `peftkit train`")
    m = peftkit.load(backbone, adapter)
    size = int(_header_value(header, "train.image_size"))
    _, eval_tf = _transforms(size, _header_value(header, "train.mean"), _header_value(header, "train.std"))
    extensions = torchvision.datasets.folder.IMG_EXTENSIONS
    files = sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.suffix.lower() in extensions)
    if not files:
        raise ConfigError(f"data={str(data)!r} holds no images ({', '.join(extensions)})")
    out: list[Prediction] = []
    m.eval()
    with torch.no_grad():
        loader = DataLoader(_Images(files, eval_tf), batch_size, num_workers=0)
        for x, idx in tqdm(loader, desc="predict", unit="batch", disable=None, leave=False):
            probs = m(x).softmax(-1)
            p, k = probs.max(-1)
            for i, pi, ki in zip(idx.tolist(), p.tolist(), k.tolist(), strict=True):
                parent = files[i].parent.name  # also the folder given, when it is named after a class
                label = parent if parent in classes else None
                out.append(Prediction(files[i], classes[ki], pi, label))
    m.unwrap()
    return out


def write_predictions(predictions: list[Prediction], out: str | os.PathLike[str] | None) -> None:
    """Predictions as CSV (``path,predicted,probability,label``) to ``out``, or stdout."""
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    handle = open(out, "w", newline="") if out is not None else sys.stdout  # noqa: SIM115 (stdout is not closed)
    try:
        writer = csv.writer(handle)
        writer.writerow(["path", "predicted", "probability", "label"])
        for p in predictions:
            writer.writerow([str(p.path), p.predicted, f"{p.probability:.4f}", p.label or ""])
    finally:
        if out is not None:
            handle.close()
