"""QLoRA memory and speed (``make bench``, section ``qlora``): a Llama-shaped model built from a
transformers config with random weights (nothing downloaded), LoRA on every Linear of its decoder
layers, trained in bf16 against the same model with its decoder Linears in NF4.

Every variant runs in its own fresh process (peak RSS is per process), side by side in one run:

- ``bf16``: the model in bf16, peftkit LoRA;
- ``nf4 torchao`` / ``nf4 bitsandbytes``: ``peftkit.quantize`` each decoder layer as it is built
  (as a checkpoint loader quantizes shard by shard: the bf16 model never exists whole), then LoRA;
- ``peft nf4 bitsandbytes``: Hugging Face PEFT's LoRA over the same bitsandbytes model.

Embeddings and the output layer stay bf16, as QLoRA keeps them. Reported per variant: the weight
bytes (quantized layers alone, and the whole model), the peak RSS of the process through training
(and above the RSS of the imported runtime, which is about 0.8 GB whatever the model),
and the median training step (batch 1 x ``SEQ`` tokens, AdamW on the adapter, all in bf16). ``--smoke`` runs a
tiny config (the test suite does).

    python benchmarks/qlora.py [--smoke] [--steps 2] [--mmap-threshold] [--size 0.44b|1.1b] [--variants bf16,...]

``make bench`` runs it twice: with glibc's defaults, and with every freed block of 64 KiB or more
returned to the system (``MALLOC_MMAP_THRESHOLD_=65536``, see ``MMAP_THRESHOLD``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

# Llama's proportions (GQA, SwiGLU MLP), a 32k vocabulary: about 0.44 B parameters by default, and
# TinyLlama-1.1B's shapes (where the imported runtime and the bf16 embeddings weigh less)
CONFIGS = {
    "0.44b": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 512},
    "1.1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 512},
}
SMOKE = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
SEQ = 64  # this CPU computes bf16 at a quarter of its float32 speed (no bf16 instructions)
VARIANTS = ("bf16", "nf4 torchao", "nf4 bitsandbytes", "peft nf4 bitsandbytes")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(smoke: bool, size: str) -> dict[str, Any]:
    return SMOKE if smoke else CONFIGS[size]


def _build(smoke: bool, backend: str | None, size: str = "0.44b") -> Any:
    """The model in bf16, materialised one module at a time; with ``backend``, each decoder layer's
    Linears are quantized to NF4 as soon as the layer exists."""
    import torch
    import transformers

    import peftkit

    config = transformers.LlamaConfig(**_config(smoke, size))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)

    def materialise(module: torch.nn.Module) -> None:
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                t = torch.empty(p.shape, dtype=p.dtype)
                if name == "weight" and p.dim() == 1:  # RMSNorm
                    t.fill_(1.0)
                elif name == "bias":
                    t.zero_()
                else:
                    t.normal_(0.0, 0.02, generator=g)
                m._parameters[name] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None and b.device.type == "meta":
                    m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)

    for layer in model.model.layers:
        materialise(layer)
        if backend:
            peftkit.quantize(layer, "nf4", backend=backend, keep_output_layer=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # computed, not loaded: built for real
    materialise(model)
    return model.eval()


def _weight_bytes(model: Any) -> tuple[int, int]:
    """(bytes of the decoder layers' Linear weights, bytes of every tensor of the model)."""
    import torch

    from peftkit.quantized import is_quantized

    def size(t: Any) -> int:
        if type(t).__module__.startswith("torchao"):
            inner, _ = type(t).__tensor_flatten__(t)
            return sum(size(getattr(t, n)) for n in inner)
        n = int(t.numel() * t.element_size())
        state = getattr(t, "quant_state", None)
        if state is not None:
            n += int(state.absmax.numel() * state.absmax.element_size())
            if state.state2 is not None:
                n += int(state.state2.absmax.numel() * state.state2.absmax.element_size())
        return n

    linear = sum(size(m.weight) for layer in model.model.layers for m in layer.modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor) and (is_quantized(m.weight) or m.weight.dim() == 2))
    total = sum(size(t) for t in [*model.parameters(), *model.buffers()])
    return linear, total


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _train(name: str, smoke: bool, backend: str | None, steps: int, size: str = "0.44b"
           ) -> tuple[Any, tuple[int, int], list[float], torch.Tensor]:
    """Build, wrap and train ``steps`` steps after a warm-up one: (the model, its weight bytes before
    wrapping (PEFT adds its adapters inside the model), the step times, the last loss)."""
    import peftkit

    model = _build(smoke, backend, size)
    weights = _weight_bytes(model)
    if name.startswith("peft"):
        import peft

        m = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    else:
        m = peftkit.wrap(model, "lora", r=16, alpha=32, targets=TARGETS)
    m.train()  # everything computes in bf16 (the NF4 weights dequantize to it), the adapters included
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    vocab = _config(smoke, size)["vocab_size"]
    seq = 16 if smoke else SEQ
    times = []
    for i in range(steps + 1):
        ids = torch.randint(0, vocab, (1, seq), generator=g)
        start = time.perf_counter()
        loss = m(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return model, weights, times, loss.detach()


def variant(name: str, smoke: bool, steps: int, size: str = "0.44b") -> dict[str, Any]:
    """One variant, in this process: build, wrap, train ``steps`` steps (after one warm-up)."""
    torch.set_num_threads(2)
    backend = {"bf16": None, "nf4 torchao": "torchao"}.get(name, "bitsandbytes")
    if backend:
        __import__(backend)
    if name.startswith("peft"):
        import peft  # noqa: F401
    import transformers  # noqa: F401

    from peftkit.quantization import _release_freed_memory

    if not smoke:
        # The runtime: what the process holds whatever the model's size. Transformers, PEFT and the
        # backends import most of their modules lazily, on first use, and torch sets up its kernels
        # on the first step: a whole training run on the tiny config does all of that once.
        _train(name, True, backend, 1)
        gc.collect()
        _release_freed_memory()
    runtime = _current_rss_mb()
    model, (linear, total), times, loss = _train(name, smoke, backend, steps, size)
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {"parameters": params, "linear MB": linear / 2**20, "weights MB": total / 2**20,
            "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "runtime MB": runtime,
            "step s": statistics.median(times), "loss": float(loss)}


# glibc returns a freed block to the system only when it was mapped on its own; larger blocks are
# (above a threshold that rises to 32 MB as blocks are freed), so smaller freed ones stay in the
# process as holes that later allocations may or may not fill: quantizing layer by layer leaves the
# bf16 weights' holes behind. A fixed low threshold maps every block of 64 KiB or more on its own.
MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run(smoke: bool, steps: int, env: dict[str, str] | None = None, size: str = "0.44b",
        variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Every variant in a fresh process (with ``env`` added to its environment); the ratios against bf16."""
    out: dict[str, Any] = {}
    for name in variants:
        proc = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(steps), "--size", size,
                               *(["--smoke"] if smoke else [])], capture_output=True, text=True, timeout=3600,
                              env={**os.environ, **(env or {})})
        if proc.returncode:
            out[name] = {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
            continue
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out.get("bf16", {})
    for r in out.values():
        if "error" in r or "error" in base:
            continue
        r["linear x bf16"] = r["linear MB"] / base["linear MB"]
        r["weights x bf16"] = r["weights MB"] / base["weights MB"]
        r["peak RSS x bf16"] = r["peak RSS MB"] / base["peak RSS MB"]
        r["model RSS x bf16"] = (r["peak RSS MB"] - r["runtime MB"]) / (base["peak RSS MB"] - base["runtime MB"])
        r["step x bf16"] = r["step s"] / base["step s"]
    return out


def report(res: dict[str, Any], smoke: bool, title: str = "") -> str:
    params = next((r["parameters"] for r in res.values() if "parameters" in r), 0)
    lines = [f"## qlora: Llama-shaped, {params / 1e9:.2f} B parameters, LoRA r=16 on every decoder Linear, "
             f"batch 1 x {16 if smoke else SEQ} tokens{title}", "",
             "| variant | decoder Linears MB (x bf16) | all weights MB (x bf16) | peak RSS MB (x bf16) | "
             "peak RSS above the runtime MB (x bf16) | step s (x bf16) |",
             "|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {name} | {r['linear MB']:.0f} ({r.get('linear x bf16', 1):.2f}) | {r['weights MB']:.0f} "
                     f"({r.get('weights x bf16', 1):.2f}) | {r['peak RSS MB']:.0f} ({r.get('peak RSS x bf16', 1):.2f}) | "
                     f"{r['peak RSS MB'] - r['runtime MB']:.0f} ({r.get('model RSS x bf16', 1):.2f}) | "
                     f"{r['step s']:.2f} ({r.get('step x bf16', 1):.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--mmap-threshold", action="store_true",
                   help="run every variant with MALLOC_MMAP_THRESHOLD_=65536 (glibc maps each block of 64 KiB or more "
                        "on its own, so freed blocks go back to the system)")
    p.add_argument("--size", choices=sorted(CONFIGS), default="0.44b",
                   help="the model's shapes: 0.44b (default), or 1.1b (TinyLlama-1.1B's; about 2.5x the time)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="which variants, comma-separated (bf16 always runs)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.variant:
        print(json.dumps(variant(a.variant, a.smoke, 1 if a.smoke else a.steps, a.size)))
        return 0
    chosen = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; the variants are {', '.join(VARIANTS)}")
    variants = ("bf16", *[v for v in VARIANTS if v in chosen and v != "bf16"])  # the ratios' denominator first
    res = run(a.smoke, 1 if a.smoke else a.steps, MMAP_THRESHOLD if a.mmap_threshold else None, a.size, variants)
    print(report(res, a.smoke, ", MALLOC_MMAP_THRESHOLD_=65536" if a.mmap_threshold else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
