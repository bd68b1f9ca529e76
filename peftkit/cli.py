"""The ``peftkit`` command: ``methods``, ``inspect FILE``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftkit`` console command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PeftkitError as exc:
        print(f"peftkit: error: {_printable(str(exc), 4000)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
