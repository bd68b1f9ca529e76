"""Adapter files: safetensors with string metadata, written atomically, validated before use.

Metadata keys (all strings): ``peftkit.format``, ``peftkit.method``, ``peftkit.plugin`` (JSON:
distribution, version, entry point), ``peftkit.config`` (JSON), ``peftkit.targets`` (JSON: path ->
class, role and tensor shapes), ``peftkit.backbone`` (JSON fingerprint), ``peftkit.adapter`` (the
adapter's name), ``peftkit.version``. Tensors: ``<backbone path>.<adapter tensor name>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from . import distributed
from .attach import TensorStamp, stamps_match
from .errors import AdapterFileError, BackboneMismatchError, ConfigError, UnknownMethodError
from .model import AdaptedModel, AdapterSet, Prepared, build, ensure_unwrapped
from .plugins import get_method
from .targets import nearest_names

__all__ = ["FORMAT_VERSION", "AdapterHeader", "hotswap", "load", "read_header", "save"]

FORMAT_VERSION = "1"
_KEYS = ("peftkit.format", "peftkit.method", "peftkit.plugin", "peftkit.config", "peftkit.targets", "peftkit.backbone")


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict(keep_vars=True))


def describe_targets(model: nn.Module, modules: AdapterSet) -> dict[str, Any]:
    """path -> {class, role, shapes[, spec]} for the base modules an adapter touches."""
    out: dict[str, Any] = {}

    def add(path: str, role: str, spec: dict[str, Any]) -> None:
        m = model.get_submodule(path)
        out[path] = {"class": distributed.original_class(m).__name__, "role": role,
                     "shapes": {k: list(t.shape) for k, t in _module_tensors(m).items()}}
        if spec:
            out[path]["spec"] = spec

    for p, a in modules.items():
        add(p, "target", a.spec())
    for p, _ in modules.train_items():
        add(p, "head", {"outputs": modules.fresh[p]}) if p in modules.fresh else add(p, "train", {})
    if modules.heads is not None:
        add(modules.heads_path, "heads", modules.heads.spec())
    return out


def fingerprint(model: nn.Module, paths: list[str], with_values: bool) -> dict[str, str | None]:
    """Hash of the touched base tensors' names, shapes and dtypes (and values when asked; sharded
    tensors are gathered for that, so under FSDP2 every rank must call it)."""
    layout = hashlib.sha256()
    content = hashlib.sha256() if with_values else None
    for p in sorted(paths):
        for k, t in sorted(_module_tensors(model.get_submodule(p)).items()):
            layout.update(f"{p}.{k}|{list(t.shape)}|{t.dtype}\n".encode())
            if content is not None:
                whole = distributed.full_tensor(t.detach())
                content.update(whole.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return {"layout": layout.hexdigest(), "values": content.hexdigest() if content else None}


def save(model: AdaptedModel, path: str | os.PathLike[str], adapter: str | None = None, *,
         writer: int | None = 0) -> Path:
    """Write one adapter's tensors and metadata to ``path`` (atomically: temp file + rename).

    Under ``torch.distributed`` only rank ``writer`` writes. On a model sharded with FSDP2 every rank
    must call ``save``: the full adapter tensors are gathered (a collective), rank ``writer``
    writes the same bytes a single process would, and all ranks wait for the file before
    returning. Unsharded models (DDP) need no collective, so calling it on rank 0 alone is fine.

    Args:
        model: The adapted model (a DistributedDataParallel wrapper around one is fine).
        path: Destination ``.safetensors`` file.
        adapter: Which adapter; default: the only adapter, or the only active one.
        writer: The rank that writes when distributed; None: every rank that calls it writes.

    Returns:
        The path written (or that rank ``writer`` wrote).
    """
    model = distributed.unwrap_parallel(model)
    adapter = _pick_adapter(model, adapter)
    rec = model._record(adapter)
    if adapter in model._state.merged:
        raise ConfigError(f"adapter {adapter!r} is merged; unmerge() before saving so the file holds its own tensors")
    base = model.base_model
    mods = rec.modules
    held = mods.file_tensors()
    sharded = any(distributed.is_dtensor(t) for t in held.values()) or distributed.is_sharded(base)
    tensors = {k: distributed.full_tensor(t.detach()).contiguous().cpu() for k, t in held.items()}
    described = describe_targets(base, mods)
    meta = {
        "peftkit.format": FORMAT_VERSION,
        "peftkit.method": rec.method.name,
        "peftkit.plugin": _json({"distribution": rec.info.distribution, "version": rec.info.version,
                                 "entry_point": rec.info.plugin}),
        "peftkit.config": rec.method.config_json(),
        "peftkit.targets": _json(described),
        "peftkit.backbone": _json(fingerprint(base, list(described), rec.method.hash_base_values)),
        "peftkit.adapter": adapter,
        "peftkit.version": _version(),
    }
    dest = Path(path)
    if writer is None or distributed.rank() == writer:
        _write(dest, tensors, meta)
    if sharded and distributed.world_size() > 1:
        torch.distributed.barrier()  # the file exists on every rank's return
    return dest


def _write(dest: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _serialize(tensors, meta, f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _serialize(tensors: dict[str, torch.Tensor], meta: dict[str, str], f: Any) -> None:
    """Write the safetensors format with every key sorted, so equal contents give equal bytes in any
    process (``safetensors.save_file`` orders metadata by a per-process hash seed). Tensors are laid
    out widest dtype first, which keeps each one aligned to its element size."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    for k in order:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _st_dtype(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for k in order:
        t = tensors[k].detach().contiguous().cpu()
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _pick_adapter(model: AdaptedModel, adapter: str | None) -> str:
    model = distributed.unwrap_parallel(model)
    if not isinstance(model, AdaptedModel):
        raise ConfigError(f"expected an AdaptedModel (from peftkit.wrap), got {type(model).__name__}")
    if adapter is None:
        names = model.adapter_names if len(model.adapter_names) == 1 else model.active_adapters
        if len(names) != 1:
            raise ConfigError(f"this model holds adapters {model.adapter_names}; say which one with adapter=NAME")
        adapter = names[0]
    model._record(adapter)
    return adapter


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peftkit")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class AdapterHeader:
    """An adapter file's metadata and tensor table, read without loading the tensors."""

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
        return sum(_numel(s) * _DTYPE_BYTES.get(d, 4) for s, d in self.tensors.values())


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def read_header(path: str | os.PathLike[str]) -> AdapterHeader:
    """Read and check an adapter file's metadata (no backbone needed).

    Raises:
        AdapterFileError: missing, not a safetensors file, truncated, corrupt, not a peftkit file,
            or written by a newer format version.
    """
    p = Path(path)
    if not p.is_file():
        raise AdapterFileError(f"adapter file {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(k)
                tensors[k] = (list(sl.get_shape()), sl.get_dtype())
    except Exception as exc:
        raise AdapterFileError(f"{str(p)!r} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    with p.open("rb") as f:
        data_end = 8 + int.from_bytes(f.read(8), "little")
    expected = data_end + sum(_numel(s) * _DTYPE_BYTES.get(d, 0) for s, d in tensors.values())
    if p.stat().st_size < expected:
        raise AdapterFileError(f"{str(p)!r} is truncated: {p.stat().st_size} bytes, its header describes {expected}")
    missing = [k for k in _KEYS if k not in meta]
    if missing:
        raise AdapterFileError(f"{str(p)!r} is not a peftkit adapter file: metadata lacks {', '.join(missing)}")
    if meta["peftkit.format"] != FORMAT_VERSION:
        raise AdapterFileError(f"{str(p)!r} uses adapter format {meta['peftkit.format']!r}; this peftkit reads "
                               f"format {FORMAT_VERSION!r}. Upgrade peftkit (pip install -U peftkit).")
    try:
        parsed = {k: json.loads(meta[k]) for k in ("peftkit.plugin", "peftkit.config", "peftkit.targets", "peftkit.backbone")}
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{str(p)!r} has corrupt metadata: {exc}") from exc
    return AdapterHeader(p, meta["peftkit.method"], parsed["peftkit.plugin"], parsed["peftkit.config"],
                         parsed["peftkit.targets"], parsed["peftkit.backbone"], meta.get("peftkit.adapter", "default"),
                         tensors, dict(meta))


def _check_backbone(model: nn.Module, header: AdapterHeader) -> None:
    modules = dict(model.named_modules())
    problems = []
    for path, want in header.targets.items():
        m = modules.get(path)
        if m is None:
            if len(problems) < 5:  # only the reported ones get a (costly) nearest-name search
                near = nearest_names(model, path, 3)
                problems.append(f"module {path!r} is missing" + (f" (nearest: {', '.join(near)})" if near else ""))
            else:
                problems.append(path)
            continue
        have_class = distributed.original_class(m).__name__
        if have_class != want["class"]:
            problems.append(f"{path!r} is a {have_class}, the file expects a {want['class']}")
            continue
        have = {k: list(t.shape) for k, t in _module_tensors(m).items()}
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


def read_adapter(model: nn.Module, path: str | os.PathLike[str]) -> tuple[AdapterHeader, Prepared]:
    """Validate an adapter file against ``model`` and build its adapter, without touching ``model``."""
    header = read_header(path)
    try:
        info = get_method(header.method)
    except UnknownMethodError as exc:
        plug = header.plugin
        raise UnknownMethodError(
            f"{str(header.path)!r} needs method {header.method!r} from plugin distribution "
            f"{plug.get('distribution')!r} (version {plug.get('version')}); install it "
            f"(pip install {plug.get('distribution')}) and retry. {exc}") from None
    try:
        method = info.cls.configure(**header.config)
    except ConfigError as exc:
        raise AdapterFileError(f"{str(header.path)!r} has a config the installed {info.distribution} "
                               f"{info.version} does not accept (written by {header.plugin.get('version')}): {exc}") from exc
    _check_backbone(model, header)
    roles = {p: t["role"] for p, t in header.targets.items()}
    specs = {p: t.get("spec", {}) for p, t in header.targets.items()}
    unknown = sorted({r for r in roles.values()} - {"target", "train", "head", "heads"})
    if unknown:
        raise AdapterFileError(f"{str(header.path)!r} has target roles {unknown} this peftkit does not know; upgrade peftkit")
    try:
        prepared = build(model, method, info, [p for p, r in roles.items() if r == "target"],
                         [p for p, r in roles.items() if r in ("train", "head")], specs,
                         fresh={p: specs[p]["outputs"] for p, r in roles.items() if r == "head"},
                         heads=next(((p, specs[p]["heads"]) for p, r in roles.items() if r == "heads"), None))
    except (KeyError, TypeError) as exc:
        raise AdapterFileError(f"{str(header.path)!r} has incomplete target specs: {exc}") from exc
    expected = prepared.modules.file_tensors()
    values = _read_tensors(header, expected)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(values[k])
    # the hot swap of another file into this adapter compares against these (already checked here)
    prepared.cache = {"targets": header.targets, _fingerprint_key(header.backbone): header.backbone,
                      "stamps": [TensorStamp(t) for t in _touched(model, header.targets)]}
    return header, prepared


def _touched(model: nn.Module, paths: Any) -> list[torch.Tensor]:
    """The base tensors a file's checks read (what the checks cached on a record must still match)."""
    return [t for p in sorted(set(paths)) for t in _module_tensors(model.get_submodule(p)).values()]


def _fingerprint_key(backbone: dict[str, Any]) -> str:
    """Where a record caches its backbone fingerprint: with or without the content hash."""
    return "backbone+values" if backbone.get("values") is not None else "backbone"


def hotswap(model: AdaptedModel, path: str | os.PathLike[str], adapter: str | None = None) -> str:
    """Replace an existing adapter's tensors by a compatible file's, in place (a hot swap).

    Nothing is rebuilt or re-attached: the same modules and parameters (so an optimizer, a
    ``torch.compile`` graph or FSDP2 groups built on them stay valid) take the file's values. The
    file must hold the same method with the same options on the same targets: for example another
    task's adapter trained with the same recipe. On an FSDP2-sharded model every rank reads the file
    and keeps its own shard (no communication); under DDP, swap on every rank.

    Args:
        model: The adapted model (a DistributedDataParallel wrapper around one is fine).
        path: The ``.safetensors`` adapter file.
        adapter: The adapter to overwrite; default: the only adapter, or the only active one.

    Returns:
        The name of the adapter swapped.

    Raises:
        AdapterFileError: the file does not fit this adapter (another method, other options, other
            targets or tensor shapes); use :meth:`AdaptedModel.load_adapter` for those.
        BackboneMismatchError: the file was made for other base weights.
        ConfigError: the adapter is merged.
    """
    model = distributed.unwrap_parallel(model)
    name = _pick_adapter(model, adapter)
    rec = model._record(name)
    if name in model._state.merged:
        raise ConfigError(f"adapter {name!r} is merged; unmerge() before hot swapping its weights")
    header = read_header(path)
    where = repr(str(header.path))
    if header.method != rec.method.name:
        raise AdapterFileError(f"{where} holds a {header.method!r} adapter and {name!r} is {rec.method.name!r}; "
                               "load it as a new adapter with load_adapter() instead")
    mine = json.loads(rec.method.config_json())
    if header.config != mine:
        diff = [f"{k}: file {header.config.get(k)!r} vs {mine.get(k)!r}"
                for k in sorted(set(mine) | set(header.config)) if mine.get(k) != header.config.get(k)]
        raise AdapterFileError(f"{where} was trained with other options than adapter {name!r} ({'; '.join(diff[:4])}); "
                               "hot swapping needs the same options. Load it with load_adapter() instead.")
    base = model.base_model
    cached = rec.cache
    touched = _touched(base, [*rec.modules.paths, *rec.modules.train_paths, *([rec.modules.heads_path] if rec.modules.heads is not None else [])])
    if not stamps_match(cached.get("stamps", []), touched):  # first swap, or the backbone changed (dtype, values)
        cached.clear()
        cached["stamps"] = [TensorStamp(t) for t in touched]
    if "targets" not in cached:
        cached["targets"] = describe_targets(base, rec.modules)
    if header.targets != cached["targets"]:
        diff = sorted(p for p in set(header.targets) | set(cached["targets"])
                      if header.targets.get(p) != cached["targets"].get(p))
        raise AdapterFileError(f"{where} adapts other modules, or the same ones with other shapes, than adapter "
                               f"{name!r} (first differences: {diff[:3]}); load it with load_adapter() instead")
    key = _fingerprint_key(header.backbone)
    if key not in cached:
        cached[key] = fingerprint(base, list(cached["targets"]), header.backbone.get("values") is not None)
    if cached[key] != header.backbone:
        raise BackboneMismatchError(f"{where} was made for other base weights (or dtypes) than this model's; "
                                    "load it onto the backbone it was trained on")
    expected = rec.modules.file_tensors()
    values = _read_tensors(header, expected)
    with torch.no_grad():
        for k, dst in expected.items():
            distributed.assign(dst, values[k])
    model._drop_folded()
    return name


def _read_tensors(header: AdapterHeader, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors, checked against the keys, shapes and dtypes ``expected`` (global shapes for
    sharded tensors)."""
    where = repr(str(header.path))
    missing = sorted(set(expected) - set(header.tensors))
    unexpected = sorted(set(header.tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(f"{where} does not match its own metadata: missing tensors "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k}: file {header.tensors[k][0]} {header.tensors[k][1]} vs expected {list(t.shape)} {_st_dtype(t.dtype)}"
             for k, t in expected.items() if header.tensors[k] != (list(t.shape), _st_dtype(t.dtype))]
    if wrong:
        raise AdapterFileError(f"{where} has tensors of the wrong shape or dtype: {'; '.join(wrong[:5])}")
    try:
        with safe_open(str(header.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in expected}
    except Exception as exc:
        raise AdapterFileError(f"{where} could not be read (corrupt data?): {exc}") from exc


def _is_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _st_dtype(dtype: torch.dtype) -> str:
    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}.get(dtype, str(dtype))


def load(model: nn.Module, path: str | os.PathLike[str], name: str | None = None) -> AdaptedModel:
    """Load an adapter file onto ``model``: a plain backbone (wrapped anew) or an AdaptedModel.

    Everything is checked first (format, method and plugin, targets, shapes, dtypes, fingerprint);
    a refused load leaves ``model`` exactly as it was.

    On a model sharded with :func:`peftkit.distributed.shard` that already holds an adapter of
    that name, the file's tensors go into it (see :func:`hotswap`): every rank keeps its shard.

    Args:
        model: The backbone the adapter was trained on (freshly built is fine), or an AdaptedModel.
        path: The ``.safetensors`` adapter file.
        name: The adapter's name; default: the name stored in the file.

    Returns:
        The AdaptedModel with the loaded adapter active.

    Raises:
        AdapterFileError, BackboneMismatchError, UnknownMethodError: the file cannot be used here.
    """
    if Path(path).is_dir() or (Path(path).is_file() and not _is_safetensors(Path(path))):
        from .formats import find_format, import_adapter

        if find_format(path) is not None:  # another format (e.g. a PEFT directory)
            return import_adapter(model, path, name=name or "default")
    model = distributed.unwrap_parallel(model)
    if isinstance(model, AdaptedModel):
        target = (name or read_header(path).adapter) if model.__dict__.get("_sharded") else None
        if target in model.adapter_names:
            hotswap(model, path, target)  # FSDP2: the adapter exists; each rank takes its shard
        else:
            model.load_adapter(path, name=name)
        return model
    ensure_unwrapped(model)
    header, prepared = read_adapter(model, path)
    adapted = AdaptedModel(model)
    adapted.install(name or header.adapter, prepared)
    adapted.set_adapter(name or header.adapter)
    return adapted
