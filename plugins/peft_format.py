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
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import peftkit
from peftkit import container
from peftkit.build import Prepared, build
from peftkit.errors import AdapterFileError, BackboneMismatchError, ConfigError, shown
from peftkit.formats import Format
from peftkit.model import AdaptedModel
from peftkit.plan import plan_for
from peftkit.plugins import get_method
from peftkit.targets import attributes_read, host_of, pattern_problem

from .lora import BiasDelta, ConvLoRA, EmbeddingLoRA, LinearLoRA, MultiheadAttentionLoRA, ParameterLoRA

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# PEFT features peftkit's LoRA does not have: a file using any of them is refused, by name.
UNSUPPORTED = {"lora_bias": False, "layer_replication": None,
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
        rec = model.get_adapter(adapter)
        if rec.method.name != "lora":
            raise ConfigError(f"only LoRA adapters can be exported to PEFT; {adapter!r} is a {rec.method.name!r} adapter")
        mods = rec.modules
        if mods.heads is not None:
            raise ConfigError("multi-task heads have no PEFT equivalent; export an adapter without heads=")
        c = rec.method.file_method().config  # a PiSSA/OLoRA start ships as an ordinary LoRA of rank 2r
        base = model.base_model
        _check_peft_applies(base, mods)
        tensors: dict[str, torch.Tensor] = {}
        targets, ranks, alphas, transposed = [], {}, {}, False
        parameters: list[str] = []  # PEFT's target_parameters

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
                put(f"{path}.bias", _bias(module) + a.lora_bias)
                continue
            if isinstance(module, nn.MultiheadAttention) or (path.endswith(".out_proj") and
                                                             isinstance(base.get_submodule(path.rsplit(".", 1)[0]), nn.MultiheadAttention)):
                if not isinstance(a, MultiheadAttentionLoRA):
                    raise ConfigError(f"{path!r}: PEFT cannot apply LoRA to an out_proj alone (MultiheadAttention "
                                      "reads its weight directly); target the attention module")
                if a.dora:
                    raise ConfigError(f"{path!r}: PEFT has no DoRA for MultiheadAttention; export is refused")
                if not hasattr(a, "in_proj"):
                    raise ConfigError(f"{path!r}: PEFT's MultiheadAttention LoRA needs a packed in-projection (kdim == vdim == embed_dim)")
                assert isinstance(module, nn.MultiheadAttention), type(module).__name__  # what lora built it for
                if a.in_proj.lora_bias is not None and a.in_proj.lora_bias.abs().max() > 0:
                    raise ConfigError(f"{path!r}: PEFT has no place for a bias delta on in_proj_bias; train with bias='none'")
                pair(path, a.in_proj.lora_A, a.in_proj.lora_B, a.in_proj.scale, path)
                pair(f"{path}.base_layer.out_proj", a.out_proj.lora_A, a.out_proj.lora_B, a.out_proj.scale, path)
                if a.out_proj.lora_bias is not None:
                    put(f"{path}.base_layer.out_proj.base_layer.bias", _bias(module.out_proj) + a.out_proj.lora_bias)
            elif isinstance(a, EmbeddingLoRA):
                put(f"{path}.lora_embedding_A", a.lora_A)
                put(f"{path}.lora_embedding_B", a.lora_B)
                note(path, a.lora_A.shape[0], a.scale)
                if a.lora_magnitude is not None:
                    put(f"{path}.lora_magnitude_vector", a.lora_magnitude)
            elif isinstance(a, ConvLoRA):
                conv = _conv(module)
                if any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
                    raise ConfigError(f"{path!r}: PEFT's conv LoRA ignores dilation and padding_mode, so it would "
                                      "compute something else; export is refused")
                g = conv.groups
                dense_a, shipped_b = a.shipped_factors()
                if g > 1:  # PEFT's A is a dense conv in -> r; ours is grouped: embed it block-diagonally
                    rg, per_in = a.lora_A.shape[0], a.lora_A.shape[1]
                    dense_a = a.lora_A.new_zeros((rg, per_in * g, *a.lora_A.shape[2:]))
                    for j in range(g):
                        rows = slice(j * rg // g, (j + 1) * rg // g)
                        dense_a[rows, j * per_in:(j + 1) * per_in] = a.lora_A[rows]
                pair(path, dense_a, shipped_b, a.scale, path)
                if a.lora_magnitude is not None:  # PEFT keeps a conv's magnitude as (1, out, 1, ...)
                    if g > 1:
                        raise ConfigError(f"{path!r}: PEFT's DoRA on a grouped convolution computes its norms from a "
                                          "dense low-rank weight of another shape; export is refused")
                    put(f"{path}.lora_magnitude_vector", a.lora_magnitude.view(1, -1, *[1] * (conv.weight.dim() - 2)))
                if a.lora_bias is not None:
                    put(f"{path}.base_layer.bias", _bias(conv) + a.lora_bias.view(-1))
            elif isinstance(a, ParameterLoRA):
                parameters += _parameter_pairs(path, module, a, c.r, _scale(c.alpha, c.r, c.rslora), put)
                continue
            elif isinstance(a, LinearLoRA):
                transposed |= a.transposed
                pair(path, *a.shipped_factors(), a.scale, path)
                if a.lora_magnitude is not None:
                    put(f"{path}.lora_magnitude_vector", a.lora_magnitude)
                if a.lora_bias is not None:
                    put(f"{path}.base_layer.bias", _bias(module) + a.lora_bias)
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
            "target_parameters": parameters or None,
            "modules_to_save": list(mods.train_paths) or None, "rank_pattern": ranks, "alpha_pattern": alphas,
            "init_lora_weights": True, "use_dora": c.dora, "lora_bias": False, "layers_to_transform": None,
            "layers_pattern": None, "exclude_modules": None,
            # the format of PEFT 0.22 on: a MultiheadAttention's out_proj delta applies once (older PEFTs
            # ignore the field; the export is refused where the PEFT at hand would apply it twice)
            "peft_version": ONCE,
        }
        bad = [k for k, t in tensors.items() if not container.finite(t)]
        if bad:
            raise ConfigError(f"adapter {adapter!r} holds NaN or infinite values in {', '.join(bad[:3])}; nothing was written")
        _write_directory(directory, {WEIGHTS: lambda f: save_file(tensors, f, metadata={"format": "pt"}),
                                     CONFIG: lambda f: Path(f).write_text(json.dumps(config, indent=2))})
        return directory

    # -- import --------------------------------------------------------------------------------
    def read(self, model: nn.Module, path: Path) -> Prepared:
        where = repr(str(path))
        config, snap = _open_directory(path)
        with snap:
            cfg = _lora_config(config, where)
            modules = dict(model.named_modules())
            fix = _prefix_fixer(modules, {_strip(k): None for k in snap.tensors})
            shapes = {fix(_strip(k)): info.shape for k, info in snap.tensors.items()}
            names = {fix(_strip(k)): k for k in snap.tensors}  # our key -> the file's
            if len(names) != len(snap.tensors):
                raise AdapterFileError(f"{where} holds two tensors for one place")
            parameters = _target_parameters(model, cfg["target_parameters"], where)
            nested = _parameter_keys(model, parameters)  # our key -> (owner, parameter, "A" | "B")
            lora_paths: dict[str, str] = {}  # module path -> kind
            for k, shape in shapes.items():
                if k in nested:
                    continue
                for suffix, kind in ((".lora_A.weight", "pair"), (".lora_embedding_A", "embedding")):
                    if k.endswith(suffix) and ".base_layer.out_proj" not in k:  # out_proj: part of its attention's
                        if len(shape) < 2 or shape[0] < 1:
                            raise AdapterFileError(f"{where}: {shown(names[k])} has shape {list(shape)}; a LoRA factor "
                                                   "has a rank of at least 1 and a second dimension")
                        lora_paths[k[: -len(suffix)]] = kind
            missing = [p for p in lora_paths if p not in modules]
            if missing:
                raise BackboneMismatchError(f"{where} adapts modules this model does not have: "
                                            f"{[shown(p) for p in missing[:3]]}")
            train_paths = [p for p in modules if p and any(p == t or p.endswith("." + t) for t in cfg["modules_to_save"])]
            ranks = {p: shapes[f"{p}.lora_A.weight" if kind == "pair" else f"{p}.lora_embedding_A"][0]
                     for p, kind in lora_paths.items()}
            for k, (holder, pname, side) in nested.items():  # a 3-D parameter's A stacks experts * r rows
                param = modules[holder].get_parameter(pname)
                if side == "A" and k in shapes:
                    ranks.setdefault(holder, shapes[k][0] // (param.shape[0] if param.dim() == 3 else 1))
            both = sorted(set(lora_paths) & set(parameters))
            if both:
                raise AdapterFileError(f"{where} adapts module {shown(both[0])} and parameters of it; peftkit takes one "
                                       "or the other")
            alphas = {p: _pick(cfg["alpha_pattern"], p, cfg["lora_alpha"]) for p in [*lora_paths, *parameters]}
            try:
                method = get_method("lora").cls.configure(
                    r=cfg["r"], alpha=cfg["lora_alpha"], rslora=cfg["use_rslora"], dropout=cfg["lora_dropout"],
                    dora=cfg["use_dora"],
                    bias=cfg["bias"], fan_in_fan_out=cfg["fan_in_fan_out"],
                    rank_pattern={"^" + re.escape(p) + "$": r for p, r in ranks.items() if r != cfg["r"]},
                    alpha_pattern={"^" + re.escape(p) + "$": a for p, a in alphas.items() if a != cfg["lora_alpha"]})
            except ConfigError as exc:
                raise AdapterFileError(f"{where} has a LoRA config peftkit cannot take: {exc}") from None
            paths = sorted(lora_paths, key=list(modules).index)
            plan = plan_for(model, method, paths, train_paths, parameters)
            # the shapes every tensor must have, from a build on the meta device (nothing allocated yet)
            wanted = _places(build(model, plan, on_meta=True), modules, shapes.keys())
            unknown = sorted(set(shapes) - set(wanted))
            if unknown:
                raise AdapterFileError(f"{where} holds tensors peftkit does not know where to put: "
                                       f"{[shown(names[k]) for k in unknown[:5]]}")
            for k, (shape, _) in wanted.items():
                if k in shapes and tuple(shapes[k]) != tuple(shape):
                    msg = f"{where}: {shown(names[k])} has shape {list(shapes[k])}, this model needs {list(shape)}"
                    owner = next((t for t in train_paths if k.startswith(t + ".")), None)
                    if owner is not None:
                        msg += (f". modules_to_save {owner!r} does not fit this model's layer: a layer trained with a new "
                                f"size (a new head) is loaded onto a model whose layer already has that size; replace "
                                f"model.{owner} first, as when the adapter was trained")
                    raise BackboneMismatchError(msg)
            lacking = sorted(k for k in wanted if k not in shapes)
            if lacking:
                raise AdapterFileError(f"{where} lacks tensors {[shown(PREFIX + k) for k in lacking[:5]]}")
            values = snap.read([names[k] for k in wanted])
        values = {k: values[names[k]] for k in wanted}
        bad = [names[k] for k, v in values.items() if not container.finite(v)]
        if bad:
            raise AdapterFileError(f"{where} holds NaN or infinite values in {', '.join(shown(k) for k in bad[:3])}; refused")
        prepared = build(model, plan)
        places = _places(prepared, modules, shapes.keys())
        with torch.no_grad():
            for k, (_, put) in places.items():
                put(values[k])
        twice = _applied_out_proj_twice(config.get("peft_version"))
        for p, a in prepared.modules.items():  # PEFT scales out_proj by the attention module's alpha
            if isinstance(a, MultiheadAttentionLoRA):
                a.out_proj.scale = _scale(alphas[p], a.out_proj.lora_A.shape[0], cfg["use_rslora"])
                if twice:  # trained where PEFT added this delta twice: what the adapter computed is 2 B A
                    with torch.no_grad():
                        a.out_proj.lora_B.mul_(2)
        return prepared


def _parameter_pairs(path: str, module: nn.Module, a: ParameterLoRA, r: int, scale: float,
                     put: Callable[[str, torch.Tensor], None]) -> list[str]:
    """Write LoRA on named parameters as PEFT's ``target_parameters``: one ParamWrapper per parameter,
    the first of a module innermost (``base_layer.`` once per wrapper around it). A 2-D parameter's
    factors are PEFT's as they are; a 3-D (experts, rows, cols) one's A is stacked (experts * r, cols)
    and B laid out (rows, r * experts), as PEFT's ParamWrapper reads them. Returns the parameters' full
    names (PEFT matches a bare name as a suffix)."""
    order = list(module._parameters)  # PEFT wraps a module's parameters in their registration order
    names = sorted(a.parts, key=order.index)
    for i, name in enumerate(names):
        part = a.parts[name]
        A, B = part.lora_A, part.lora_B
        if part.lora_magnitude is not None:
            raise ConfigError(f"{path}.{name}: PEFT's target_parameters has no DoRA; export is refused")
        if a.dims[name] not in (2, 3):
            raise ConfigError(f"{path}.{name}: PEFT's target_parameters takes 2-D and 3-D parameters only, this one "
                              f"has {a.dims[name]} dims; export is refused")
        if A.shape[-2] != r or not math.isclose(a.scale, scale, rel_tol=1e-9):
            raise ConfigError(f"{path}.{name}: rank {A.shape[-2]} or scale {a.scale:g} differs from r={r} and scale "
                              f"{scale:g}, which PEFT's target_parameters cannot express per parameter; export is refused")
        if A.dim() == 3:
            n, rank, cols = A.shape
            A, B = A.reshape(n * rank, cols), B.permute(1, 2, 0).reshape(B.shape[1], rank * n)
        key = f"{path}.{'base_layer.' * (len(names) - 1 - i)}"
        put(f"{key}lora_A.weight", A)
        put(f"{key}lora_B.weight", B)
    return [f"{path}.{n}" for n in names]


def _target_parameters(model: nn.Module, wanted: list[str], where: str) -> dict[str, list[str]]:
    """PEFT's ``target_parameters`` (full names, or suffixes as PEFT matches them) -> owner module path
    -> parameter names, in the module's registration order."""
    names = [n for n, _ in model.named_parameters()]
    owners: dict[str, list[str]] = {}
    for t in wanted:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise BackboneMismatchError(f"{where} adapts parameter {shown(t)}, which this model does not have")
        for n in hits:
            owner, _, leaf = n.rpartition(".")
            if leaf not in owners.setdefault(owner, []):
                owners[owner].append(leaf)
    for owner, leaves in owners.items():
        order = list(model.get_submodule(owner)._parameters)
        leaves.sort(key=order.index)
    return owners


def _parameter_keys(model: nn.Module | dict[str, nn.Module], owners: dict[str, list[str]]) -> dict[str, tuple[str, str, str]]:
    """Where PEFT keeps each parameter's factors: ``owner.(base_layer.)*lora_A.weight``, the first of a
    module's parameters (registration order) innermost -> (owner, parameter, "A" | "B")."""
    out: dict[str, tuple[str, str, str]] = {}
    for owner, leaves in owners.items():
        module = model[owner] if isinstance(model, dict) else model.get_submodule(owner)
        order = list(module._parameters)
        ordered = sorted(leaves, key=order.index)
        for i, name in enumerate(ordered):
            key = f"{owner}.{'base_layer.' * (len(ordered) - 1 - i)}"
            out[f"{key}lora_A.weight"] = (owner, name, "A")
            out[f"{key}lora_B.weight"] = (owner, name, "B")
    return out


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def _pick(pattern: dict[str, Any], where: str, default: Any) -> Any:
    """PEFT's rule for rank/alpha patterns: the first key matching the end of the module's path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", where):
            return value
    return default


_CONFIG_BYTES = 1024 * 1024


def _open_directory(path: Path) -> tuple[dict[str, Any], container.Snapshot]:
    """The config and an open snapshot of the weights, both from one directory: it is opened once and
    both files are read relative to it, so an export renamed into place meanwhile is not mixed in."""
    where = repr(str(path))
    try:
        dir_fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise AdapterFileError(f"{where} is not a readable PEFT adapter directory: {exc.strerror or exc}") from None
    try:
        fd, info = container.open_regular(CONFIG, "PEFT adapter config", dir_fd=dir_fd)
        try:
            if info.st_size > _CONFIG_BYTES:
                raise AdapterFileError(f"{where}: {CONFIG} is {info.st_size} bytes; a LoRA config is a few hundred")
            raw = os.pread(fd, info.st_size, 0)
        finally:
            os.close(fd)
        snap = container.Snapshot(WEIGHTS, dir_fd=dir_fd, shown_as=str(path / WEIGHTS))
    finally:
        os.close(dir_fd)
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        snap.close()
        raise AdapterFileError(f"{where}: {CONFIG} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        snap.close()
        raise AdapterFileError(f"{where}: {CONFIG} is not a JSON object")
    return config, snap


def _lora_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of a PEFT LoRA config that peftkit reads, checked (type, range, safe patterns)."""
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{where} is a PEFT {shown(config.get('peft_type'))} adapter; peftkit imports LoRA only")
    used = [k for k, off in UNSUPPORTED.items() if k in config and not _off(config[k], off)]
    if used:
        raise ConfigError(f"{where} uses PEFT features peftkit's LoRA does not have: {', '.join(used)}")

    def number(key: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
        value = config.get(key, default)
        if value is None and default is not None:
            value = default
        kind = int if integer else (int, float)
        if not isinstance(value, kind) or isinstance(value, bool) or not low <= value < high:
            raise AdapterFileError(f"{where}: {CONFIG} field {key!r} is {shown(value)}; expected "
                                   f"{'an integer' if integer else 'a number'} in [{low}, {high})")
        return value

    if "r" not in config:
        raise AdapterFileError(f"{where}: {CONFIG} has no 'r' (the LoRA rank); not a LoRA adapter config")
    out: dict[str, Any] = {
        "r": number("r", None, 1, 2**31, integer=True),
        "lora_alpha": float(number("lora_alpha", 8, 1e-12, math.inf)),
        "lora_dropout": float(number("lora_dropout", 0.0, 0.0, 1.0)),
        "use_rslora": config.get("use_rslora") or False,
        "use_dora": config.get("use_dora") or False,
        "fan_in_fan_out": config.get("fan_in_fan_out") or False,
        "bias": config.get("bias") or "none",
        "modules_to_save": config.get("modules_to_save") or [],
        "target_parameters": config.get("target_parameters") or [],
    }
    if not isinstance(out["target_parameters"], list) or not all(isinstance(t, str) and t
                                                                  for t in out["target_parameters"]):
        raise AdapterFileError(f"{where}: {CONFIG} field 'target_parameters' must be a list of parameter names")
    if not all(isinstance(out[k], bool) for k in ("use_rslora", "use_dora", "fan_in_fan_out")):
        raise AdapterFileError(f"{where}: {CONFIG} fields use_rslora, use_dora and fan_in_fan_out must be true or false")
    if out["bias"] not in ("none", "lora_only", "all"):
        raise AdapterFileError(f"{where}: {CONFIG} field 'bias' is {shown(out['bias'])}; expected none, lora_only or all")
    if not isinstance(out["modules_to_save"], list) or not all(isinstance(m, str) for m in out["modules_to_save"]):
        raise AdapterFileError(f"{where}: {CONFIG} field 'modules_to_save' must be a list of module names")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise AdapterFileError(f"{where}: {CONFIG} field {key!r} must be a map of patterns to numbers")
        for k, v in pattern.items():
            why = pattern_problem(k) or (None if _compiles(rf"(.*\.)?({k})$") else "it is not a valid regular expression")
            if why:
                raise AdapterFileError(f"{where}: {CONFIG} {key} key {shown(k)} is refused: {why}")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf:
                raise AdapterFileError(f"{where}: {CONFIG} {key}[{shown(k)}] is {shown(v)}; expected a positive number")
        out[key] = pattern
    return out


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def _off(value: Any, off: Any) -> bool:
    """Whether a PEFT config field is at its 'feature unused' value (``0`` is a value, not unset)."""
    if value is None or (isinstance(value, (dict, list)) and not value):
        return True
    return value is False and (off is False or off is None)


def _places(prepared: Prepared, modules: dict[str, nn.Module], keys: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Where each PEFT tensor goes: our key -> (the shape the file must hold, put(value)) for the built
    adapter (on the meta device for the checks, for real to fill it)."""
    keys = set(keys)
    out: dict[str, tuple[tuple[int, ...], Any]] = {}

    def to(dst: torch.Tensor, shape: Any = None, convert: Any = None) -> tuple[tuple[int, ...], Any]:
        return tuple(dst.shape if shape is None else shape), (lambda v: dst.copy_(convert(v) if convert else v))

    for p, a in prepared.modules.items():
        module = modules[p]
        if isinstance(a, BiasDelta):
            if f"{p}.bias" in keys:
                out[f"{p}.bias"] = to(a.lora_bias, convert=lambda v, m=module: v - m.bias)
        elif isinstance(a, MultiheadAttentionLoRA):
            out[f"{p}.lora_A.weight"] = to(a.in_proj.lora_A)
            out[f"{p}.lora_B.weight"] = to(a.in_proj.lora_B)
            out[f"{p}.base_layer.out_proj.lora_A.weight"] = to(a.out_proj.lora_A)
            out[f"{p}.base_layer.out_proj.lora_B.weight"] = to(a.out_proj.lora_B)
            k = f"{p}.base_layer.out_proj.base_layer.bias"
            if a.out_proj.lora_bias is not None and k in keys:
                out[k] = to(a.out_proj.lora_bias, convert=lambda v, m=module: v - m.out_proj.bias)
        elif isinstance(a, ParameterLoRA):
            for k, (_, name, side) in _parameter_keys(modules, {p: list(a.parts)}).items():
                t = a.parts[name].get_parameter("lora_A" if side == "A" else "lora_B")
                if t.dim() == 2:
                    out[k] = to(t)
                elif side == "A":  # (experts * r, cols) -> (experts, r, cols)
                    out[k] = to(t, (t.shape[0] * t.shape[1], t.shape[2]), lambda v, s=tuple(t.shape): v.reshape(s))
                else:  # (rows, r * experts) -> (experts, rows, r)
                    n, rows, rank = t.shape
                    out[k] = to(t, (rows, rank * n),
                                lambda v, n=n, rows=rows, rank=rank: v.reshape(rows, rank, n).permute(2, 0, 1))
        elif isinstance(a, EmbeddingLoRA):
            out[f"{p}.lora_embedding_A"] = to(a.lora_A)
            out[f"{p}.lora_embedding_B"] = to(a.lora_B)
            if a.lora_magnitude is not None:
                out[f"{p}.lora_magnitude_vector"] = to(a.lora_magnitude)
        else:
            assert isinstance(a, (LinearLoRA, ConvLoRA)), type(a).__name__  # what else lora builds
            if isinstance(a, ConvLoRA) and _conv(module).groups > 1:  # PEFT's A is dense over the input channels
                groups = _conv(module).groups
                dense = (a.lora_A.shape[0], a.lora_A.shape[1] * groups, *a.lora_A.shape[2:])
                out[f"{p}.lora_A.weight"] = to(a.lora_A, dense, lambda v, g=groups, q=p: _grouped(v, g, q))
            else:
                out[f"{p}.lora_A.weight"] = to(a.lora_A)
            out[f"{p}.lora_B.weight"] = to(a.lora_B)
            if a.lora_magnitude is not None:  # a conv's is (1, out, 1, ...) in PEFT
                m = a.lora_magnitude
                shape = (1, m.shape[0], *[1] * (_conv(module).weight.dim() - 2)) if isinstance(a, ConvLoRA) else None
                out[f"{p}.lora_magnitude_vector"] = to(m, shape, (lambda v: v.reshape(-1)) if shape else None)
            if a.lora_bias is not None and f"{p}.base_layer.bias" in keys:
                out[f"{p}.base_layer.bias"] = to(a.lora_bias, convert=lambda v, m=module: v - m.bias)
    for p, trained in prepared.modules.train_items():
        for k, t in trained.state_dict(keep_vars=True).items():
            out[f"{p}.{k}"] = to(t)
    return out


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


ONCE = "0.22.0"  # the first PEFT release that applies a MultiheadAttention's out_proj delta once (PR #3774)


def _applied_out_proj_twice(version: Any) -> bool:
    """Whether a PEFT directory saved by this ``peft_version`` applied a MultiheadAttention's out_proj
    delta twice: PEFT 0.22's own rule (a missing version, a release before 0.22.0, or a development
    version before 0.21.1), so that the import computes what the adapter computed when saved."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(version)) if version is not None else None
    if match is None:  # no version (PEFT before 0.18 wrote none) or an unreadable one
        return True
    release = (int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))
    dev = "dev" in str(version).partition("@")[0]
    return release < (0, 21, 1) or (not dev and release < (0, 22, 0))


def _peft_version() -> str:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:
        return "0.21"


def _bias(module: nn.Module) -> torch.Tensor:
    """The bias of a module that has one (a target with a bias delta)."""
    bias = module.bias
    assert isinstance(bias, torch.Tensor), f"{type(module).__name__}.bias is a {type(bias).__name__}"
    return bias


def _conv(module: nn.Module) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
    """The target of a ConvLoRA (a convolution, as lora built it)."""
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), type(module).__name__
    return module


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
        ref = copy.deepcopy(net)[0]
        assert isinstance(ref, nn.MultiheadAttention) and ref.in_proj_weight is not None
        pm = peft.get_peft_model(net, peft.LoraConfig(r=1, target_modules=["0"], init_lora_weights=False)).eval()
        layer = pm.base_model.model[0]
        h = torch.randn(1, 3, 4)
        with torch.no_grad():
            ref.in_proj_weight.add_(layer.get_delta_weight("default"))  # in place, as += does
            ref.out_proj.weight.add_(layer.base_layer.out_proj.get_delta_weight("default"))
            return not torch.allclose(layer(h, h, h)[0], ref(h, h, h)[0], atol=1e-5)


def _write_directory(directory: Path, files: dict[str, Any]) -> None:
    """Write a whole directory, atomically: into a temporary directory beside it, then renamed into
    place, so that ``directory`` holds one whole export or none (a writer killed at any moment
    leaves a temporary that the next export removes). An existing export is replaced; files of its
    own (a README) are carried over."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{str(directory)!r} exists and is not a directory; choose another path for the export")
    container.remove_stale_temporaries(directory)
    tmp = Path(container.temporary_beside(directory, suffix=".tmp", directory=True))
    old = None
    try:
        if directory.is_dir():  # keep what else the user put there
            for entry in directory.iterdir():
                if entry.name not in files and entry.is_file():
                    shutil.copy2(entry, tmp / entry.name)
        for name, writer in files.items():
            writer(str(tmp / name))
        if directory.exists():
            old = Path(container.temporary_beside(directory, suffix=".old.tmp", directory=True))
            os.rmdir(old)
            os.rename(directory, old)  # from here until the next rename, the export is absent, never mixed
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not directory.exists():
            os.rename(old, directory)  # put the previous export back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def _prefix_fixer(modules: dict[str, nn.Module], keys: Iterable[str]) -> Callable[[str], str]:
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
