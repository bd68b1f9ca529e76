"""Adapter files <-> plans: the metadata, the checks, and reading a file into a built adapter.

An adapter file is safetensors with string metadata: ``peftkit.format``, ``peftkit.method``,
``peftkit.plugin`` (JSON: distribution, version, entry point), ``peftkit.config`` (JSON),
``peftkit.targets`` (JSON: path -> class, role, tensor shapes and the method's spec: the plan),
``peftkit.backbone`` (JSON fingerprint), ``peftkit.adapter`` (the adapter's name),
``peftkit.version``. Tensors: ``<backbone path>.<adapter tensor name>``. Writing and the
user-facing ``save``/``load`` are in :mod:`peftkit.io`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import container, sharding
from .attach import TensorStamp, stamps_match
from .build import AdapterSet, Prepared, build
from .errors import (
    AdapterFileError,
    BackboneMismatchError,
    ConfigError,
    PeftkitError,
    QuantizationWarning,
    UnknownMethodError,
    shown,
)
from .heads import is_head_spec
from .method import Method
from .plan import AdapterPlan
from .plugins import MethodInfo, get_method
from .quantized import dequantize, float_class, logical_tensors
from .targets import nearest_names

__all__ = [
    "FORMAT_VERSION", "RESERVED_PREFIX", "AdapterHeader", "check_swappable", "check_tensors", "describe_targets", "file_metadata",
    "fingerprint", "is_safetensors", "plan_from_header", "read_adapter", "read_header", "read_swap",
]

FORMAT_VERSION = "1"
RESERVED_PREFIX = "peftkit."  # header keys peftkit writes; the rest are the application's (save(metadata=...))
_KEYS = ("peftkit.format", "peftkit.method", "peftkit.plugin", "peftkit.config", "peftkit.targets", "peftkit.backbone")


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


def _class_name(module: nn.Module) -> str:
    """The class a file records: the float one a quantized layer stands for (a Linear4bit is a Linear)."""
    return float_class(sharding.original_class(module)).__name__


def describe_targets(model: nn.Module, modules: AdapterSet) -> dict[str, Any]:
    """path -> {class, role, shapes[, spec]} for the base modules an adapter touches."""
    out: dict[str, Any] = {}

    def add(path: str, role: str, spec: dict[str, Any]) -> None:
        m = model.get_submodule(path)
        out[path] = {"class": _class_name(m), "role": role,
                     "shapes": {k: list(shape) for k, (shape, _, _) in logical_tensors(m).items()}}
        if spec:
            out[path]["spec"] = spec

    for p in modules.paths:
        add(p, "target", modules.specs.get(p, {}))
    for p, _ in modules.train_items():
        add(p, "head", {"outputs": modules.fresh[p]}) if p in modules.fresh else add(p, "train", {})
    if modules.heads is not None and modules.heads_path is not None:
        add(modules.heads_path, "heads", {"heads": modules.heads.outputs()})
    return out


def fingerprint(model: nn.Module, paths: list[str], with_values: bool) -> dict[str, Any]:
    """Hash of the touched base tensors' names, shapes and dtypes (and values when asked; sharded
    tensors are gathered for that, so under FSDP2 every rank must call it). A quantized tensor counts
    by the float shape and dtype it stands for (and its dequantized values); which tensors are
    quantized, and how, is listed apart (``quantization``, only when some are), so that an adapter
    trained on a quantized backbone fits the float one."""
    layout = hashlib.sha256()
    content = hashlib.sha256() if with_values else None
    quantization: dict[str, str] = {}
    for p in sorted(paths):
        module = model.get_submodule(p)
        tensors = _module_tensors(module)
        for k, (shape, dtype, kind) in sorted(logical_tensors(module).items()):
            layout.update(f"{p}.{k}|{list(shape)}|{dtype}\n".encode())
            if kind is not None:
                quantization[f"{p}.{k}" if p else k] = kind
            if content is not None:
                whole = sharding.full_tensor(dequantize(tensors[k].detach(), module))
                content.update(whole.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    out: dict[str, Any] = {"layout": layout.hexdigest(), "values": content.hexdigest() if content else None}
    if quantization:
        out["quantization"] = quantization
    return out


def _quantization_note(where: str, trained: dict[str, str], here: dict[str, str]) -> str | None:
    """What a user should know when the file's backbone was quantized otherwise than this one."""
    if trained == here:
        return None

    def kinds(q: dict[str, str]) -> str:
        return ", ".join(sorted(set(q.values()))) + f" ({len(q)} tensors)" if q else "float"

    usual = " (the usual way to ship a QLoRA adapter)" if trained and not here else ""
    return (f"{where} was trained on a backbone quantized as {kinds(trained)}; this backbone is {kinds(here)}. "
            f"Loading it is allowed{usual}; the outputs differ from those seen in training by the quantization error.")


def file_metadata(model: nn.Module, name: str, method: Method[Any], info: MethodInfo, modules: AdapterSet) -> dict[str, str]:
    """The metadata an adapter file stores for adapter ``name`` of ``model`` (a backbone): the
    method and its plugin, the config, the plan (targets table) and the backbone's fingerprint."""
    described = describe_targets(model, modules)
    return {
        "peftkit.format": FORMAT_VERSION,
        "peftkit.method": method.name,
        "peftkit.plugin": _json({"distribution": info.distribution, "version": info.version,
                                 "entry_point": info.plugin}),
        "peftkit.config": method.config_json(),
        "peftkit.targets": _json(described),
        "peftkit.backbone": _json(fingerprint(model, list(described), method.hash_base_values)),
        "peftkit.adapter": name,
        "peftkit.version": _version(),
    }


def _version() -> str:
    try:
        return version("peftkit")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class AdapterHeader:
    """An adapter file's metadata and tensor table, read without loading the tensors (every field
    checked for type)."""

    path: Path
    method: str
    plugin: dict[str, str]
    config: dict[str, Any]
    targets: dict[str, Any]
    backbone: dict[str, Any]
    adapter: str
    tensors: dict[str, tuple[list[int], str]]  # key -> (shape, dtype)
    metadata: dict[str, str]

    @property
    def tensor_bytes(self) -> int:
        total = 0
        for shape, dtype in self.tensors.values():
            n = 1
            for s in shape:
                n *= s
            total += n * container.DTYPES[dtype].itemsize
        return total

    @property
    def user_metadata(self) -> dict[str, str]:
        """The entries the application stored with ``save(metadata=...)`` (keys not starting with ``peftkit.``)."""
        return {k: v for k, v in self.metadata.items() if not k.startswith(RESERVED_PREFIX)}


_ROLES = ("target", "train", "head", "heads")
_DISTRIBUTION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")  # a valid (PEP 508) package name


def read_header(path: str | os.PathLike[str]) -> AdapterHeader:
    """Read and check an adapter file's metadata (no backbone needed).

    Raises:
        AdapterFileError: missing, not a regular file, not a safetensors file, truncated, corrupt,
            not a peftkit file, malformed metadata, or written by a newer format version.
    """
    with container.Snapshot(path) as snap:
        return _header(snap)


def _metadata_json(text: str, key: str, where: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AdapterFileError(f"{where} has corrupt metadata {key} ({type(exc).__name__})") from None
    if not isinstance(value, kind):
        raise AdapterFileError(f"{where}: metadata {key} is a JSON {type(value).__name__}, expected a {kind.__name__}")
    return value


def _header(snap: container.Snapshot) -> AdapterHeader:
    meta, where = snap.metadata, repr(str(snap.path))
    missing = [k for k in _KEYS if k not in meta]
    if missing:
        raise AdapterFileError(f"{where} is not a peftkit adapter file: metadata lacks {', '.join(missing)}")
    if meta["peftkit.format"] != FORMAT_VERSION:
        raise AdapterFileError(f"{where} uses adapter format {shown(meta['peftkit.format'])}; this peftkit reads "
                               f"format {FORMAT_VERSION!r}. Upgrade peftkit (pip install -U peftkit).")
    method = meta["peftkit.method"]
    if not method or len(method) > 200 or not method.isprintable():
        raise AdapterFileError(f"{where} names method {shown(method)}, which is not a method name")
    plugin = _metadata_json(meta["peftkit.plugin"], "peftkit.plugin", where, dict)
    if not all(isinstance(v, str) for v in plugin.values()):
        raise AdapterFileError(f"{where}: metadata peftkit.plugin holds non-string values")
    config = _metadata_json(meta["peftkit.config"], "peftkit.config", where, dict)
    targets = _metadata_json(meta["peftkit.targets"], "peftkit.targets", where, dict)
    for path, entry in targets.items():
        _check_target(path, entry, where)
    backbone = _metadata_json(meta["peftkit.backbone"], "peftkit.backbone", where, dict)
    if not isinstance(backbone.get("layout"), str) or not isinstance(backbone.get("values"), (str, type(None))):
        raise AdapterFileError(f"{where}: metadata peftkit.backbone needs a 'layout' string and a 'values' string or null")
    quantization = backbone.get("quantization", {})
    if not (isinstance(quantization, dict) and all(isinstance(k, str) and isinstance(v, str) and len(v) <= 40
                                                   for k, v in quantization.items())):
        raise AdapterFileError(f"{where}: metadata peftkit.backbone's 'quantization' is malformed (expected tensor "
                               "name -> quantization)")
    paths = set(targets)
    strays = [k for k in snap.tensors if not _under_some(k, paths)]
    if strays:  # cheap, before any per-target work: every tensor belongs to a module of the table
        raise AdapterFileError(f"{where} holds tensors of no module in its targets table: "
                               f"{', '.join(shown(k) for k in strays[:3])}{' …' if len(strays) > 3 else ''}")
    tensors = {k: (list(t.shape), t.dtype) for k, t in snap.tensors.items()}
    return AdapterHeader(snap.path, method, plugin, config, targets, backbone, meta.get("peftkit.adapter", "default"),
                         tensors, dict(meta))


def _under_some(key: str, paths: set[str]) -> bool:
    """Whether tensor ``key`` is ``<path>.<name>`` for a path of ``paths`` (or a root tensor)."""
    if "" in paths:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) in paths for i in range(1, len(parts)))


def _check_target(path: Any, entry: Any, where: str) -> None:
    """One row of the targets table: ``{class: str, role: str, shapes: {name: [int]}, spec?: {...}}``."""
    ok = (isinstance(entry, dict) and isinstance(entry.get("class"), str) and entry.get("role") in _ROLES
          and isinstance(entry.get("shapes"), dict) and isinstance(entry.get("spec", {}), dict)
          and all(isinstance(k, str) and isinstance(v, list) and all(type(d) is int and d >= 0 for d in v)
                  for k, v in entry["shapes"].items()))
    if not ok:
        raise AdapterFileError(f"{where}: the targets table's row for {shown(path)} is malformed (expected class, "
                               f"role one of {', '.join(_ROLES)}, shapes as lists of integers, and an optional spec)")
    spec = entry.get("spec", {})
    if entry["role"] == "head" and not (type(spec.get("outputs")) is int and spec["outputs"] >= 1):
        raise AdapterFileError(f"{where}: head {shown(path)} declares outputs {shown(spec.get('outputs'))}, not a count")
    if entry["role"] == "heads" and not (isinstance(spec.get("heads"), dict) and spec["heads"]
                                         and all(isinstance(k, str) and k and is_head_spec(v)
                                                 for k, v in spec["heads"].items())):
        raise AdapterFileError(f"{where}: heads at {shown(path)} are malformed (expected name -> outputs or MLP widths)")



def _check_backbone(model: nn.Module, header: AdapterHeader) -> None:
    modules = dict(model.named_modules())
    problems: list[str] = []
    for path, want in header.targets.items():
        m = modules.get(path)
        if m is None:
            if len(problems) < 5:  # only the reported ones get a (costly) nearest-name search
                near = nearest_names(model, path, 3)
                problems.append(f"module {path!r} is missing" + (f" (nearest: {', '.join(near)})" if near else ""))
            else:
                problems.append(path)
            continue
        have_class = _class_name(m)
        if have_class != want["class"]:
            problems.append(f"{path!r} is a {have_class}, the file expects a {want['class']}")
            continue
        have = {k: list(shape) for k, (shape, _, _) in logical_tensors(m).items()}
        if have != want["shapes"]:
            diff = [f"{k}: file {want['shapes'].get(k)} vs model {have.get(k)}"
                    for k in sorted(set(have) | set(want["shapes"])) if have.get(k) != want["shapes"].get(k)]
            problems.append(f"{path!r} tensor shapes differ ({'; '.join(diff[:3])})")
    if problems:
        raise BackboneMismatchError(
            f"{str(header.path)!r} was made for another backbone: " + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". Load it onto the model it was trained on.")
    got = fingerprint(model, list(header.targets), header.backbone.get("values") is not None)
    if got["layout"] != header.backbone.get("layout"):
        raise BackboneMismatchError(
            f"{str(header.path)!r}: the targeted tensors' names or dtypes differ from the backbone it was made for "
            "(e.g. float32 vs bfloat16); cast the model to the dtype it was trained in, or retrain.")
    if got["values"] != header.backbone.get("values"):
        raise BackboneMismatchError(
            f"{str(header.path)!r} holds deltas for specific base weights, and this backbone's weights differ "
            "(same architecture, other values). Load it onto the exact pretrained weights it was trained on.")
    note = _quantization_note(repr(str(header.path)), header.backbone.get("quantization", {}),
                              got.get("quantization", {}))
    if note:
        warnings.warn(note, QuantizationWarning, stacklevel=4)


def _method(header: AdapterHeader) -> tuple[MethodInfo, Method[Any]]:
    """The installed method the file needs, configured from the file (refused with a safe message)."""
    where = repr(str(header.path))
    try:
        info = get_method(header.method)
    except UnknownMethodError as exc:
        plug = header.plugin
        dist = plug.get("distribution", "")
        hint = (f"install it (pip install {dist}) and retry" if _DISTRIBUTION.fullmatch(dist) else
                "no install command is suggested, as that is not a valid package name")
        raise UnknownMethodError(
            f"{where} needs method {shown(header.method)}, written by plugin {shown(plug.get('entry_point', '?'))} of "
            f"distribution {shown(dist)} (version {shown(plug.get('version', '?'))}); {hint}. {exc}") from None
    try:
        return info, info.cls.configure(**header.config)
    except ConfigError as exc:
        raise AdapterFileError(f"{where} has a config the installed {info.distribution} {info.version} does not accept "
                               f"(written by {shown(header.plugin.get('version', '?'))}): {exc}") from exc
    except Exception as exc:  # a plugin's config rejecting a value in an unplanned way
        raise AdapterFileError(f"{where} has a config method {info.name!r} cannot take: {type(exc).__name__}: "
                               f"{str(exc)[:200]}") from None


def plan_from_header(header: AdapterHeader, method: Method[Any], info: MethodInfo) -> AdapterPlan:
    """The plan a file's targets table stores: targets with their specs, trained modules, fresh
    output layers, multi-task heads (the values come from the file's tensors)."""
    roles = {p: t["role"] for p, t in header.targets.items()}
    specs: dict[str, dict[str, Any]] = {p: t.get("spec", {}) for p, t in header.targets.items()}
    return AdapterPlan(
        method, info,
        targets={p: specs[p] for p, r in roles.items() if r == "target"},
        train=[p for p, r in roles.items() if r in ("train", "head")],
        fresh={p: specs[p]["outputs"] for p, r in roles.items() if r == "head"},
        heads=next(((p, dict(specs[p]["heads"])) for p, r in roles.items() if r == "heads"), None))


def read_adapter(model: nn.Module, path: str | os.PathLike[str]) -> tuple[AdapterHeader, Prepared]:
    """Validate an adapter file against ``model`` and build its adapter, without touching ``model``.

    In this order, everything from one snapshot of the file: the header (types, sizes against the
    file's bytes), the method and its config, the backbone (modules, classes, shapes, fingerprint),
    then a dry run of the build on the meta device whose tensors must match the file's table, so
    that no size the file declares is allocated before the file is known to hold it. Only then the
    real build, the values (which must be finite) and the adapters' own checks.

    Raises:
        AdapterFileError, BackboneMismatchError, UnknownMethodError: the file cannot be used here.
    """
    with container.Snapshot(path) as snap:
        header = _header(snap)
        info, method = _method(header)
        _check_backbone(model, header)
        plan = plan_from_header(header, method, info)
        where = repr(str(header.path))
        try:
            dry = build(model, plan, on_meta=True, source=where)
        except PeftkitError:
            raise
        except Exception as exc:  # a spec the method cannot build from
            raise AdapterFileError(f"{where} has target specs method {method.name!r} cannot build from: "
                                   f"{type(exc).__name__}: {str(exc)[:200]}") from None
        check_tensors(header, dry.modules.file_tensors())
        prepared = build(model, plan, dry_run=False, source=where)
        expected = prepared.modules.file_tensors()
        values = snap.read(list(expected))
    _check_finite(header, values)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(values[k])
    _validate(header, model, prepared.modules)
    # the hot swap of another file into this adapter compares against these (already checked here)
    prepared.cache = {"targets": header.targets, _fingerprint_key(header.backbone): header.backbone,
                      "stamps": [TensorStamp(t) for t in _touched(model, header.targets)]}
    return header, prepared


def _check_finite(header: AdapterHeader, values: dict[str, torch.Tensor]) -> None:
    bad = [k for k, t in values.items() if not container.finite(t)]
    if bad:
        raise AdapterFileError(f"{str(header.path)!r} holds NaN or infinite values in {', '.join(shown(k) for k in bad[:3])}; "
                               "it would make every output NaN. Refused.")


def _validate(header: AdapterHeader, model: nn.Module, modules: AdapterSet) -> None:
    """The adapters' own checks of the values just loaded (e.g. FISH's positions inside their tensors)."""
    for p, a in modules.items():
        try:
            a.validate(model.get_submodule(p))
        except (ValueError, IndexError, TypeError, RuntimeError) as exc:
            raise AdapterFileError(f"{str(header.path)!r}: the adapter for {p!r} does not fit its module: {exc}") from None


def _touched(model: nn.Module, paths: Any) -> list[torch.Tensor]:
    """The base tensors a file's checks read (what the checks cached on a record must still match)."""
    return [t for p in sorted(set(paths)) for t in _module_tensors(model.get_submodule(p)).values()]


def _fingerprint_key(backbone: dict[str, Any]) -> str:
    """Where a record caches its backbone fingerprint: with or without the content hash."""
    return "backbone+values" if backbone.get("values") is not None else "backbone"


def read_swap(model: nn.Module, name: str, method: Method[Any], modules: AdapterSet, cache: dict[str, Any],
              path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """Read a file to be swapped into an existing adapter (a hot swap), checking that it fits.

    Args:
        model: The backbone.
        name: The adapter's name (for messages).
        method: The adapter's configured method.
        modules: Its built modules.
        cache: Facts checked before for this adapter (updated here).
        path: The file.

    Returns:
        The file's value for each tensor of ``modules.file_tensors()``, and a check to run once
        they are in place (the adapters' own :meth:`~peftkit.Adapter.validate`).

    Raises:
        AdapterFileError: the file does not fit this adapter (another method, other options, other
            targets or tensor shapes).
        BackboneMismatchError: the file was made for other base weights.
    """
    with container.Snapshot(path) as snap:
        header = _header(snap)
        check_swappable(model, name, method, modules, cache, header)
        expected = modules.file_tensors()
        check_tensors(header, expected)
        values = snap.read(list(expected))
    _check_finite(header, values)
    return values, lambda: _validate(header, model, modules)


def check_swappable(model: nn.Module, name: str, method: Method[Any], modules: AdapterSet, cache: dict[str, Any],
                    header: AdapterHeader) -> None:
    """Whether a file can be swapped into adapter ``name`` (same method, options, targets, backbone);
    ``cache`` keeps what was computed for the adapter, reused while the backbone is unchanged."""
    where = repr(str(header.path))
    if header.method != method.name:
        raise AdapterFileError(f"{where} holds a {shown(header.method)} adapter and {name!r} is {method.name!r}; "
                               "load it as a new adapter with load_adapter() instead")
    mine = json.loads(method.config_json())
    if header.config != mine:
        diff = [f"{k}: file {shown(header.config.get(k), 40)} vs {mine.get(k)!r}"
                for k in sorted(set(mine) | set(header.config)) if mine.get(k) != header.config.get(k)]
        raise AdapterFileError(f"{where} was trained with other options than adapter {name!r} ({'; '.join(diff[:4])}); "
                               "hot swapping needs the same options. Load it with load_adapter() instead.")
    base, cached = model, cache
    touched = _touched(base, [*modules.paths, *modules.train_paths,
                              *([modules.heads_path] if modules.heads is not None else [])])
    if not stamps_match(cached.get("stamps", []), touched):  # first swap, or the backbone changed (dtype, values)
        cached.clear()
        cached["stamps"] = [TensorStamp(t) for t in touched]
    if "targets" not in cached:
        cached["targets"] = describe_targets(base, modules)
    if header.targets != cached["targets"]:
        diff = sorted(shown(p) for p in set(header.targets) | set(cached["targets"])
                      if header.targets.get(p) != cached["targets"].get(p))
        raise AdapterFileError(f"{where} adapts other modules, or the same ones with other shapes, than adapter "
                               f"{name!r} (first differences: {', '.join(diff[:3])}); load it with load_adapter() instead")
    key = _fingerprint_key(header.backbone)
    if key not in cached:
        cached[key] = fingerprint(base, list(cached["targets"]), header.backbone.get("values") is not None)
    if cached[key] != header.backbone:
        raise BackboneMismatchError(f"{where} was made for other base weights (or dtypes) than this model's; "
                                    "load it onto the backbone it was trained on")


def check_tensors(header: AdapterHeader, expected: dict[str, torch.Tensor]) -> None:
    """The file's tensor table against the keys, shapes and dtypes an adapter holds (global shapes for
    sharded tensors), before any tensor is read."""
    where = repr(str(header.path))
    missing = sorted(set(expected) - set(header.tensors))
    unexpected = sorted(set(header.tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(f"{where} does not match its own metadata: missing tensors "
                               f"{[shown(k) for k in missing[:5]]}, unexpected {[shown(k) for k in unexpected[:5]]}"
                               + (f" (and {len(missing) + len(unexpected) - 10} more)" if len(missing) + len(unexpected) > 10 else ""))
    wrong = []
    for k, t in expected.items():
        want = (list(t.shape), container.dtype_name(t.dtype))
        if header.tensors[k] != want:
            wrong.append(f"{shown(k)}: file {header.tensors[k][0]} {header.tensors[k][1]} vs expected {want[0]} {want[1]}")
    if wrong:
        raise AdapterFileError(f"{where} has tensors of the wrong shape or dtype: {'; '.join(wrong[:5])}")


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is a regular file that starts like a safetensors file (a JSON header)."""
    fd, _ = container.open_regular(path)
    try:
        head = os.pread(fd, 9, 0)
    finally:
        os.close(fd)
    return len(head) == 9 and head[8:9] == b"{"


