"""Hugging Face PEFT LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``),
both ways: ``peftkit.export_peft`` writes what ``peft.PeftModel.from_pretrained`` loads with the
same outputs; ``peftkit.import_peft`` (or ``peftkit.load`` on such a directory) reads one.

Key layout: ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight`` (Linear, Conv, the packed
in-projection of ``nn.MultiheadAttention`` at its own path and its out_proj under
``<path>.base_layer.out_proj``), ``lora_embedding_A`` / ``lora_embedding_B`` (Embedding), full bias
values under ``<path>.base_layer.bias`` (LoRA layers) or ``<path>.bias``, and ``modules_to_save``
under their own state_dict keys. PEFT scales by ``lora_alpha / r`` (or ``/ sqrt(r)``), so per-layer
ranks and scales go to ``rank_pattern`` / ``alpha_pattern`` with exact-path keys.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from peftkit_plugins.lora import BiasDelta, ConvLoRA, EmbeddingLoRA, LinearLoRA, MultiheadAttentionLoRA
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import peftkit
from peftkit.errors import AdapterFileError, BackboneMismatchError, ConfigError
from peftkit.formats import Format
from peftkit.model import AdaptedModel, Prepared, build
from peftkit.plugins import get_method
from peftkit.targets import attributes_read, host_of

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# PEFT features peftkit's LoRA does not have: a file using any of them is refused, by name.
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "layer_replication": None, "target_parameters": None,
               "trainable_token_indices": None, "alora_invocation_tokens": None, "use_qalora": False,
               "use_bdlora": None, "arrow_config": None, "layers_to_transform": None, "megatron_config": None}


def _alpha(scale: float, r: int, rslora: bool) -> float:
    return scale * (math.sqrt(r) if rslora else r)


class PeftFormat(Format):
    """Hugging Face PEFT LoRA directories."""

    name = "peft"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG).is_file()

    # -- export --------------------------------------------------------------------------------
    def write(self, model: AdaptedModel, adapter: str, directory: Path) -> Path:
        rec = model._record(adapter)
        if rec.method.name != "lora":
            raise ConfigError(f"only LoRA adapters can be exported to PEFT; {adapter!r} is a {rec.method.name!r} adapter")
        mods = rec.modules
        if mods.heads is not None:
            raise ConfigError("multi-task heads have no PEFT equivalent; export an adapter without heads=")
        c = rec.method.config
        base = model.base_model
        _check_peft_applies(base, mods)
        tensors: dict[str, torch.Tensor] = {}
        targets, ranks, alphas, transposed = [], {}, {}, False

        def put(key: str, t: torch.Tensor) -> None:
            tensors[PREFIX + key] = t.detach().to("cpu").contiguous().clone()

        def note(where: str, r: int, scale: float) -> None:
            # PEFT scales by lora_alpha / r: a layer whose rank or scale differs gets an exact-path entry
            if r != c.r:
                ranks["^" + re.escape(where)] = r
            alpha = _alpha(scale, r, c.rslora)
            if not math.isclose(alpha, c.alpha, rel_tol=1e-9):
                alphas["^" + re.escape(where)] = alpha

        def pair(key: str, a: torch.Tensor, b: torch.Tensor, scale: float, where: str) -> None:
            put(f"{key}.lora_A.weight", a)
            put(f"{key}.lora_B.weight", b)
            note(where, a.shape[0], scale)

        for path, a in mods.items():
            module = base.get_submodule(path)
            if not path:
                raise ConfigError("PEFT cannot adapt the root module itself; wrap a model that contains it")
            if isinstance(a, BiasDelta):
                put(f"{path}.bias", module.bias + a.lora_bias)
                continue
            if isinstance(module, nn.MultiheadAttention) or (path.endswith(".out_proj") and
                                                             isinstance(base.get_submodule(path.rsplit(".", 1)[0]), nn.MultiheadAttention)):
                if not isinstance(a, MultiheadAttentionLoRA):
                    raise ConfigError(f"{path!r}: PEFT cannot apply LoRA to an out_proj alone (MultiheadAttention "
                                      "reads its weight directly); target the attention module")
                if not hasattr(a, "in_proj"):
                    raise ConfigError(f"{path!r}: PEFT's MultiheadAttention LoRA needs a packed in-projection (kdim == vdim == embed_dim)")
                if a.in_proj.lora_bias is not None and a.in_proj.lora_bias.abs().max() > 0:
                    raise ConfigError(f"{path!r}: PEFT has no place for a bias delta on in_proj_bias; train with bias='none'")
                pair(path, a.in_proj.lora_A, a.in_proj.lora_B, a.in_proj.scale, path)
                pair(f"{path}.base_layer.out_proj", a.out_proj.lora_A, a.out_proj.lora_B, a.out_proj.scale, path)
                if a.out_proj.lora_bias is not None:
                    put(f"{path}.base_layer.out_proj.base_layer.bias", module.out_proj.bias + a.out_proj.lora_bias)
            elif isinstance(a, EmbeddingLoRA):
                put(f"{path}.lora_embedding_A", a.lora_A)
                put(f"{path}.lora_embedding_B", a.lora_B)
                note(path, a.lora_A.shape[0], a.scale)
            elif isinstance(a, ConvLoRA):
                if any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
                    raise ConfigError(f"{path!r}: PEFT's conv LoRA ignores dilation and padding_mode, so it would "
                                      "compute something else; export is refused")
                g = module.groups
                dense_a = a.lora_A
                if g > 1:  # PEFT's A is a dense conv in -> r; ours is grouped: embed it block-diagonally
                    rg, per_in = a.lora_A.shape[0], a.lora_A.shape[1]
                    dense_a = a.lora_A.new_zeros((rg, per_in * g, *a.lora_A.shape[2:]))
                    for j in range(g):
                        rows = slice(j * rg // g, (j + 1) * rg // g)
                        dense_a[rows, j * per_in:(j + 1) * per_in] = a.lora_A[rows]
                pair(path, dense_a, a.lora_B, a.scale, path)
                if a.lora_bias is not None:
                    put(f"{path}.base_layer.bias", module.bias + a.lora_bias.view(-1))
            elif isinstance(a, LinearLoRA):
                transposed |= a.transposed
                pair(path, a.lora_A, a.lora_B, a.scale, path)
                if a.lora_bias is not None:
                    put(f"{path}.base_layer.bias", module.bias + a.lora_bias)
            else:
                raise ConfigError(f"{path!r}: {type(a).__name__} has no PEFT equivalent")
            targets.append(path)
        for path, trained in mods.train_items():
            for k, t in trained.state_dict().items():
                put(f"{path}.{k}", t)
        config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            "r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.rslora,
            "target_modules": sorted(targets), "fan_in_fan_out": transposed, "bias": c.bias,
            "modules_to_save": list(mods.train_paths) or None, "rank_pattern": ranks, "alpha_pattern": alphas,
            "init_lora_weights": True, "use_dora": False, "lora_bias": False, "layers_to_transform": None,
            "layers_pattern": None, "exclude_modules": None,
        }
        directory.mkdir(parents=True, exist_ok=True)
        for name, writer in ((WEIGHTS, lambda f: save_file(tensors, f, metadata={"format": "pt"})),
                             (CONFIG, lambda f: Path(f).write_text(json.dumps(config, indent=2)))):
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
            os.close(fd)
            writer(tmp)
            os.replace(tmp, directory / name)
        return directory

    # -- import --------------------------------------------------------------------------------
    def read(self, model: nn.Module, path: Path) -> Prepared:
        try:
            config = json.loads((path / CONFIG).read_text())
            with safe_open(str(path / WEIGHTS), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except (OSError, json.JSONDecodeError, Exception) as exc:
            raise AdapterFileError(f"{str(path)!r} is not a readable PEFT adapter directory: {exc}") from exc
        if config.get("peft_type") != "LORA":
            raise ConfigError(f"{str(path)!r} is a PEFT {config.get('peft_type')!r} adapter; peftkit imports LoRA only")
        used = [k for k, off in UNSUPPORTED.items() if config.get(k) not in (off, None, {}, [], False)]
        if used:
            raise ConfigError(f"{str(path)!r} uses PEFT features peftkit's LoRA does not have: {', '.join(used)}")
        modules = dict(model.named_modules())
        keys = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}
        fix = _prefix_fixer(modules, keys)
        keys = {fix(k): v for k, v in keys.items()}
        rslora, r0, alpha0 = bool(config.get("use_rslora")), int(config["r"]), float(config["lora_alpha"])

        def pick(pattern: dict[str, Any], where: str, default: Any) -> Any:
            for key, value in (pattern or {}).items():
                if re.match(rf"(.*\.)?({key})$", where):
                    return value
            return default

        lora_paths: dict[str, str] = {}  # module path -> kind
        for k in keys:
            for suffix, kind in ((".lora_A.weight", "pair"), (".lora_embedding_A", "embedding")):
                if k.endswith(suffix):
                    where = k[: -len(suffix)]
                    if ".base_layer.out_proj" in where:
                        continue  # part of its attention module's adapter
                    lora_paths[where] = kind
        missing = [p for p in lora_paths if p not in modules]
        if missing:
            raise BackboneMismatchError(f"{str(path)!r} adapts modules this model does not have: {missing[:3]}")
        bias = config.get("bias", "none")
        train = list(config.get("modules_to_save") or [])
        train_paths = [p for p in modules if p and any(p == t or p.endswith("." + t) for t in train)]
        ranks = {p: int(keys[f"{p}.lora_A.weight" if kind == "pair" else f"{p}.lora_embedding_A"].shape[0])
                 for p, kind in lora_paths.items()}
        alphas = {p: float(pick(config.get("alpha_pattern"), p, alpha0)) for p in lora_paths}
        method = get_method("lora").cls.configure(
            r=r0, alpha=alpha0, rslora=rslora, dropout=float(config.get("lora_dropout") or 0.0), bias=bias,
            fan_in_fan_out=bool(config.get("fan_in_fan_out")),
            rank_pattern={"^" + re.escape(p) + "$": r for p, r in ranks.items() if r != r0},
            alpha_pattern={"^" + re.escape(p) + "$": a for p, a in alphas.items() if a != alpha0})
        paths = sorted(lora_paths, key=list(modules).index)
        paths = method.expand_targets(model, paths)
        paths = [p for p in paths if not any(p == t or p.startswith(t + ".") for t in train_paths)]
        prepared = build(model, method, get_method("lora"), paths, train_paths)
        consumed: set[str] = set()

        def take(key: str) -> torch.Tensor:
            if key not in keys:
                raise AdapterFileError(f"{str(path)!r} lacks tensor {PREFIX + key}")
            consumed.add(key)
            return keys[key]

        with torch.no_grad():
            for p, a in prepared.modules.items():
                module = modules[p]
                if isinstance(a, BiasDelta):
                    k = f"{p}.bias"
                    if k in keys:
                        a.lora_bias.copy_(take(k) - module.bias)
                elif isinstance(a, MultiheadAttentionLoRA):
                    a.in_proj.lora_A.copy_(take(f"{p}.lora_A.weight"))
                    a.in_proj.lora_B.copy_(take(f"{p}.lora_B.weight"))
                    a.out_proj.lora_A.copy_(take(f"{p}.base_layer.out_proj.lora_A.weight"))
                    a.out_proj.lora_B.copy_(take(f"{p}.base_layer.out_proj.lora_B.weight"))
                    a.out_proj.scale = _scale(pick(config.get("alpha_pattern"), p, alpha0), a.out_proj.lora_A.shape[0], rslora)
                    if a.out_proj.lora_bias is not None and f"{p}.base_layer.out_proj.base_layer.bias" in keys:
                        a.out_proj.lora_bias.copy_(take(f"{p}.base_layer.out_proj.base_layer.bias") - module.out_proj.bias)
                elif isinstance(a, EmbeddingLoRA):
                    a.lora_A.copy_(take(f"{p}.lora_embedding_A"))
                    a.lora_B.copy_(take(f"{p}.lora_embedding_B"))
                else:
                    A = take(f"{p}.lora_A.weight")
                    if isinstance(a, ConvLoRA) and module.groups > 1:
                        A = _grouped(A, module.groups, p)
                    if A.shape != a.lora_A.shape:
                        raise BackboneMismatchError(f"{p!r}: lora_A has shape {tuple(A.shape)}, the model needs "
                                                    f"{tuple(a.lora_A.shape)}")
                    a.lora_A.copy_(A)
                    a.lora_B.copy_(take(f"{p}.lora_B.weight"))
                    if a.lora_bias is not None and f"{p}.base_layer.bias" in keys:
                        a.lora_bias.copy_(take(f"{p}.base_layer.bias") - module.bias)
            for p, trained in prepared.modules.train_items():
                state = {k: take(f"{p}.{k}") for k in trained.state_dict()}
                wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(trained.state_dict()[k].shape)}"
                         for k, v in state.items() if v.shape != trained.state_dict()[k].shape]
                if wrong:
                    raise BackboneMismatchError(
                        f"{str(path)!r}: modules_to_save {p!r} does not fit this model's layer ({'; '.join(wrong[:3])}). "
                        "A layer trained with a new size (a new head) is loaded onto a model whose layer already has "
                        f"that size: replace model.{p} first, as when the adapter was trained.")
                trained.load_state_dict(state)
        left = sorted(set(keys) - consumed)
        if left:
            raise AdapterFileError(f"{str(path)!r} holds tensors peftkit does not know where to put: {left[:5]}")
        return prepared


def _check_peft_applies(base: nn.Module, mods: Any) -> None:
    """Refuse what PEFT would load but compute differently: targets whose weights a parent reads
    directly (PEFT's LoRA layers act in their own forward, which then never runs on that path), and a
    MultiheadAttention's out_proj delta where the PEFT at hand applies it twice. A fresh ``head=N``
    is written as ``modules_to_save`` with a warning: PEFT loads it onto a model whose layer already
    has the new size, as PEFT's own recipe for a new head does."""
    for path, outputs in mods.fresh.items():
        layer = base.get_submodule(path)
        warnings.warn(
            f"{path!r} is a fresh {outputs}-output layer (head={outputs}); it is written as PEFT modules_to_save, which "
            f"PEFT loads onto a model whose {path!r} already has {outputs} outputs, as when it was trained with PEFT: "
            f"replace it before PeftModel.from_pretrained (model.{path} = {_describe(layer, outputs)}).",
            UserWarning, stacklevel=4)
    unreachable, missing = [], []
    names: dict[int, list[str]] = {}
    for p, m in base.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(p)
    for path, a in mods.items():
        host, prefix = host_of(base, path)
        if isinstance(a, BiasDelta):  # a bias is written as its full value, read wherever it is
            continue
        others = [p for p in names.get(id(base.get_submodule(path)), []) if p != path]
        if others:  # PEFT swaps the module in at one attribute: calls through the others stay un-adapted
            unreachable.append(f"{path} (also called as {others[0]!r}, which PEFT would leave as it is)")
            continue
        if prefix:
            unreachable.append(f"{path} (read by {type(base.get_submodule(host)).__name__} {host!r})")
        elif not isinstance(a, MultiheadAttentionLoRA):
            parts = path.split(".")
            for depth in range(len(parts)):  # what the enclosing modules read of it, beyond PEFT's layer's surface
                ancestor = base.get_submodule(".".join(parts[:depth]))
                extra = sorted(attributes_read(ancestor, ".".join(parts[depth:])) - _PEFT_LAYER_SURFACE)
                if extra:
                    missing.append(f"{path} ({type(ancestor).__name__} reads its {', '.join(extra)})")
            if isinstance(a, ConvLoRA) and not _peft_can_build(base.get_submodule(path)):
                missing.append(f"{path} (PEFT builds its LoRA layers with the layer's own class, "
                               f"{type(base.get_submodule(path)).__name__}, whose constructor does not take nn.Conv's)")
        elif isinstance(a, MultiheadAttentionLoRA) and bool(a.out_proj.lora_B.detach().abs().max() > 0) \
                and peft_doubles_mha_out_proj():
            raise ConfigError(
                f"{path!r}: PEFT (up to {_peft_version()}, huggingface/peft PR #3774) applies a MultiheadAttention's "
                "out_proj delta twice, so it would compute something else than this adapter. Export is refused until "
                "a PEFT with the fix is installed; peftkit's own file (peftkit.save) keeps the adapter exactly.")
    if missing:
        raise ConfigError(
            f"PEFT could not run LoRA on {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}: PEFT replaces "
            "each target by its own LoRA layer, which has only weight, bias, in_features and out_features, so PEFT's "
            "model would fail there. Export is refused; leave these layers out of targets to export the rest, or "
            "keep peftkit's own file (peftkit.save).")
    if unreachable:
        raise ConfigError(
            f"PEFT cannot apply LoRA to {', '.join(unreachable[:4])}{' …' if len(unreachable) > 4 else ''}: PEFT's "
            "LoRA layer takes the module's place at one attribute and acts in its forward, and these weights are also "
            "read another way (directly by a parent, in a fused inference path or a function given the weight, or "
            "through another attribute), so PEFT's model would silently compute something else. Export is refused; "
            "peftkit's own file (peftkit.save) applies these adapters wherever the weights are read.")


_PEFT_LAYER_SURFACE = {"weight", "bias", "in_features", "out_features"}  # what PEFT's LoRA layers expose


def _peft_can_build(conv: nn.Module) -> bool:
    """Whether PEFT's conv LoRA can build its factors with ``type(conv)(in, r, kernel, stride, padding, bias=False)``."""
    try:
        with torch.device("meta"):
            type(conv)(conv.in_channels, 1, conv.kernel_size, conv.stride, conv.padding, bias=False)
    except Exception:
        return False
    return True


def _describe(layer: nn.Module, outputs: int) -> str:
    """How to build the replacement layer, for messages."""
    if isinstance(layer, nn.Linear):
        return f"nn.Linear({layer.in_features}, {outputs})"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"nn.{type(layer).__name__}({layer.in_channels}, {outputs}, {layer.kernel_size})"
    return f"a {type(layer).__name__} with {outputs} outputs"


def _peft_version() -> str:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return "0.21"


@functools.cache
def peft_doubles_mha_out_proj() -> bool:
    """Whether the installed PEFT applies a MultiheadAttention's out_proj delta twice (as every release
    up to 0.21 does; huggingface/peft PR #3774). Without PEFT installed: assume it does."""
    try:
        import peft
    except ImportError:
        return True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.MultiheadAttention(4, 1, batch_first=True))
        ref = copy.deepcopy(net)
        pm = peft.get_peft_model(net, peft.LoraConfig(r=1, target_modules=["0"], init_lora_weights=False)).eval()
        layer = pm.base_model.model[0]
        h = torch.randn(1, 3, 4)
        with torch.no_grad():
            ref[0].in_proj_weight += layer.get_delta_weight("default")
            ref[0].out_proj.weight += layer.base_layer.out_proj.get_delta_weight("default")
            return not torch.allclose(layer(h, h, h)[0], ref[0](h, h, h)[0], atol=1e-5)


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _grouped(A: torch.Tensor, groups: int, where: str) -> torch.Tensor:
    """PEFT's dense A (r, in, k..) -> peftkit's grouped A (r, in/g, k..), if it is block-diagonal."""
    r, cin = A.shape[0], A.shape[1]
    blocks = [A[j * r // groups:(j + 1) * r // groups, j * cin // groups:(j + 1) * cin // groups] for j in range(groups)]
    rebuilt = torch.zeros_like(A)
    for j, b in enumerate(blocks):
        rebuilt[j * r // groups:(j + 1) * r // groups, j * cin // groups:(j + 1) * cin // groups] = b
    if not torch.equal(rebuilt, A):
        raise ConfigError(f"{where!r}: this PEFT LoRA mixes channel groups of a grouped conv, which peftkit's grouped "
                          "LoRA cannot represent")
    return torch.cat(blocks, dim=0)


def _prefix_fixer(modules: dict[str, nn.Module], keys: dict[str, torch.Tensor]) -> Any:
    """Keys saved from a transformers task model (``bert.encoder...``) onto its base model
    (``encoder...``), or the other way round: find the path prefix to drop or add."""
    probe = next((k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k), None)
    if probe is None or probe.replace(".base_layer", "") in modules:
        return lambda k: k
    parts = probe.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[i:]) in modules:
            drop = ".".join(parts[:i]) + "."
            return lambda k: k[len(drop):] if k.startswith(drop) else k
    for prefix in {p.rsplit(".", 1)[0] + "." for p in modules if "." in p}:
        if prefix + probe in modules:
            return lambda k: prefix + k
    raise BackboneMismatchError(f"the PEFT adapter adapts {probe!r}, which this model does not have")


@peftkit.hookimpl
def register_formats(register: Any) -> None:
    register(PeftFormat)
