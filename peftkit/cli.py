"""The ``peftkit`` command: ``methods``, ``inspect FILE``, ``demo``, ``train``, ``predict``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import classify
from .demo import run
from .errors import PeftkitError
from .io import read_header
from .plugins import failed_plugins, method_infos

__all__ = ["build_parser", "main"]


def _methods(args: argparse.Namespace) -> int:
    infos = method_infos()
    if args.json:
        print(json.dumps({n: {"plugin": i.plugin, "distribution": i.distribution, "version": i.version, "doc": i.doc}
                          for n, i in infos.items()}, indent=2))
        return 0
    rows = [("method", "plugin", "version", "description")]
    rows += [(n, f"{i.plugin} ({i.distribution})", i.version, i.doc) for n, i in infos.items()]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(3)) + "  " + r[3])
    for name, why in failed_plugins().items():
        print(f"! plugin {name} failed to load: {why}", file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    h = read_header(args.file)
    info = {
        "file": str(h.path),
        "file_bytes": h.path.stat().st_size,
        "adapter": h.adapter,
        "method": h.method,
        "plugin": h.plugin,
        "config": h.config,
        "targets": len([t for t in h.targets.values() if t["role"] == "target"]),
        "train_modules": [p for p, t in h.targets.items() if t["role"] == "train"],
        "tensors": len(h.tensors),
        "tensor_bytes": h.tensor_bytes,
        "backbone": h.backbone,
        "metadata": h.user_metadata,
    }
    if args.json:
        print(json.dumps({**info, "target_paths": list(h.targets)}, indent=2))
        return 0
    width = max(map(len, info))
    for k, v in info.items():  # JSON escapes control characters; plain strings are escaped here
        print(f"{k.ljust(width)}  {json.dumps(v) if isinstance(v, (dict, list)) else _printable(str(v))}")
    shown = [_printable(p) for p in list(h.targets)[:10]]
    print(f"{'target paths'.ljust(width)}  {', '.join(shown)}{' …' if len(h.targets) > 10 else ''}")
    return 0


def _printable(text: str, limit: int = 200) -> str:
    """Text from a file, safe for a terminal: control and other non-printable characters escaped."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("…" if len(text) > limit else "")


def _demo(args: argparse.Namespace) -> int:
    return run(out=args.out, methods=args.methods, quick=args.quick, seed=args.seed)


def _train(args: argparse.Namespace) -> int:
    options = classify.method_options(args.method, args.method_args)
    result = classify.train(args.data, args.out, model=args.model, weights=args.weights, method=args.method,
                            options=options, head=args.head, epochs=args.epochs, lr=args.lr, lr_decay=args.lr_decay,
                            batch_size=args.batch_size, image_size=args.image_size, val_fraction=args.val_fraction,
                            seed=args.seed, plot=not args.no_plot, max_steps=args.max_steps)
    return 0 if result.adapter.is_file() else 1


def _predict(args: argparse.Namespace) -> int:
    predictions = classify.predict(args.adapter, args.data, weights=args.weights, model=args.model,
                                   batch_size=args.batch_size)
    classify.write_predictions(predictions, args.out)
    labelled = [p for p in predictions if p.label is not None]
    summary = f"{len(predictions)} images"
    if labelled:
        right = sum(p.predicted == p.label for p in labelled)
        summary += f"; accuracy {right / len(labelled):.1%} on the {len(labelled)} in folders named after a class"
    print(summary + (f"; written to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a torchvision/timm classifier on an ImageFolder; writes the adapter file",
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a torchvision or timm classifier on an ImageFolder with a peftkit method. Options the "
                    "command does not know go to the method: --r 8 --alpha 16 (lora), --keep 0.01 (fish), "
                    "--targets 'layer4\\..*' (comma lists of names, suffixes or regexes); `peftkit methods` lists the "
                    "methods.",
        epilog="example:\n  peftkit train --data hymenoptera_data --model resnet18 --weights resnet18.pth \\\n"
               "      --method lora --r 8 --epochs 5 --out bees-ants.safetensors")
    p.add_argument("--data", required=True, help="ImageFolder root: train/ and val/ folders, or class folders")
    p.add_argument("--out", required=True, help="the adapter file to write (.safetensors); the plot goes beside it")
    p.add_argument("--model", default="resnet18", help="torchvision or timm model name (default: %(default)s)")
    p.add_argument("--weights", default=None, help="local backbone weights (.pth state_dict); none: random weights")
    p.add_argument("--method", default="lora", help="a registered method (default: %(default)s)")
    p.add_argument("--head", default="auto", choices=classify.HEADS,
                   help="auto: a fresh output layer when the class count differs (default); new: always; keep: never")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training set (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the method's advice)")
    p.add_argument("--lr-decay", type=float, default=0.8, help="lr factor per block towards the input (default: 0.8)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: the model's)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held out without a val/ folder (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch (smoke tests)")
    p.add_argument("--no-plot", action="store_true", help="do not write the accuracy/confusion PNG")
    p.set_defaults(func=_train, takes_method_args=True)
    p = sub.add_parser("predict", help="classify images with an adapter file written by `peftkit train`",
                       allow_abbrev=False,
                       description="Classify every image under --data with an adapter file from `peftkit train`; "
                                   "prints CSV (path,predicted,probability,label), and the accuracy where images sit "
                                   "in folders named after classes.")
    p.add_argument("--adapter", required=True, help="the adapter file")
    p.add_argument("--data", required=True, help="an image, or a folder searched recursively")
    p.add_argument("--weights", default=None, help="the backbone weights the adapter was trained on")
    p.add_argument("--model", default=None, help="the backbone's name (default: the one the file names)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    p.add_argument("--out", default=None, help="CSV file to write (default: standard output)")
    p.set_defaults(func=_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning with plugin methods.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list the registered methods and the plugins providing them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_methods)
    p = sub.add_parser("inspect", help="describe an adapter file (no backbone needed)")
    p.add_argument("file", help="a peftkit .safetensors adapter file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("demo", help="an end-to-end run on generated data: wrap, train, save, load, compare",
                       description="Adapt a small pretrained CNN to a shifted target task with every registered "
                                   "method; nothing is downloaded.")
    p.add_argument("--out", default="peftkit-demo", help="folder for adapter files and results (default: %(default)s)")
    p.add_argument("--methods", default=None, help="comma list of methods (default: every registered method)")
    p.add_argument("--quick", action="store_true", help="a few steps only (for tests)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=_demo)
    _train_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftkit`` console command."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_method_args", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.method_args = rest
    try:
        return int(args.func(args))
    except PeftkitError as exc:
        print(f"peftkit: error: {_printable(str(exc), 4000)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
