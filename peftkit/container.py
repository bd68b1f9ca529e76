"""The safetensors container, read and written by peftkit itself.

Adapter files come from strangers, so reading one is bounded by the file itself:

* one ``open`` (non-blocking, regular files only: a FIFO or a device is refused at once), and every
  later read from that same descriptor, so a file replaced on disk while it is read (an atomic save
  of the same path) still gives one consistent snapshot;
* the header is checked field by field before anything else: its size against the file's, every
  tensor's dtype, shape and byte range against the data that is really there, the metadata as
  strings; a refused file costs a few reads and one JSON parse of at most the file's own header;
* tensors are read only when asked for, only those asked for.

Writing: keys sorted, so that the same adapter gives the same bytes in any process
(``safetensors.save_file`` orders metadata by a per-process hash seed); a temporary file beside the
destination, renamed into place, so the destination is whole or absent; temporary files left by
killed writers are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import AdapterFileError, ConfigError

__all__ = ["DTYPES", "Snapshot", "TensorInfo", "dtype_name", "finite", "open_regular", "remove_stale_temporaries", "serialize",
           "temporary_beside", "write_atomic"]

# The JSON header's bound. safetensors allows 100 MB; an adapter needs far less (LoRA on every Linear
# of a 70B model: 1,120 tensors, 0.2 MB), and parsing costs time and some 40x its size in memory.
MAX_HEADER = 4 * 1024 * 1024
_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64", "C64",
          "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ"]
_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
          "U64": "uint64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
          "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz"}
# every dtype the safetensors format names that this torch has
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, _TORCH[n]) for n in _NAMES if hasattr(torch, _TORCH[n])}
_BY_DTYPE = {d: n for n, d in DTYPES.items()}
_TEMP = re.compile(r"\.(?P<name>.+)\.peftkit-(?P<pid>\d+)-[A-Za-z0-9_]+(?:\.old)?\.tmp$")


def finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or infinity (integer and bool tensors always do; the float8 types,
    which ``torch.isfinite`` does not take, are checked in float32)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.element_size() == 1:
        t = t.float()
    return bool(torch.isfinite(t).all())


def dtype_name(dtype: torch.dtype, what: str = "a tensor") -> str:
    """The safetensors name of ``dtype``.

    Raises:
        ConfigError: the format has no such dtype (say, complex128): nothing could read it back.
    """
    name = _BY_DTYPE.get(dtype)
    if name is None:
        raise ConfigError(f"{what} has dtype {dtype}, which the safetensors format cannot store (it stores "
                          f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES.values())}); cast it first")
    return name


# -- reading -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file, as its header describes it (checked against the file's size)."""

    dtype: str  # the safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # byte offsets in the data section
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of :attr:`dtype`."""
        return DTYPES[self.dtype]


def open_regular(path: str | os.PathLike[str], what: str = "adapter file",
                 dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without blocking on a FIFO or a device: ``(fd, stat)``
    (``path`` relative to the open directory ``dir_fd``, when given).

    Raises:
        AdapterFileError: missing, unreadable, or not a regular file.
    """
    p = str(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
    except FileNotFoundError:
        raise AdapterFileError(f"{what} {p!r} does not exist") from None
    except OSError as exc:
        raise AdapterFileError(f"{what} {p!r} cannot be opened: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise AdapterFileError(f"{what} {p!r} is not a regular file (a directory, a FIFO or a device); refused")
    return fd, info


def _read_exact(fd: int, size: int, offset: int, where: str) -> bytes:
    chunks, done = [], 0
    while done < size:
        chunk = os.pread(fd, min(size - done, 64 * 1024 * 1024), offset + done)
        if not chunk:
            raise AdapterFileError(f"{where} is truncated (it shrank while being read?)")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


class Snapshot:
    """One open safetensors file: its checked header now, any of its tensors later, all from the same
    descriptor (one consistent version of the file). Use as a context manager. ``dir_fd``: ``path``
    is relative to that open directory; ``shown_as``: the path messages name.

    Attributes:
        path: The file.
        size: Its size in bytes.
        metadata: The ``__metadata__`` strings.
        tensors: ``{key: TensorInfo}``, in the file's order.
    """

    def __init__(self, path: str | os.PathLike[str], dir_fd: int | None = None, shown_as: str | None = None) -> None:
        self.path = Path(shown_as or path)
        self._where = repr(str(self.path))
        self._fd, info = open_regular(path, dir_fd=dir_fd)
        try:
            self.size = info.st_size
            self.metadata, self.tensors, self._data = self._parse()
        except BaseException:
            os.close(self._fd)
            raise

    def _fail(self, why: str) -> AdapterFileError:
        return AdapterFileError(f"{self._where} is not a readable safetensors file: {why}")

    def _parse(self) -> tuple[dict[str, str], dict[str, TensorInfo], int]:
        if self.size < 8:
            raise self._fail(f"{self.size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(_read_exact(self._fd, 8, 0, self._where), "little")
        if n > self.size - 8:
            raise self._fail(f"its header claims {n} bytes, the file has {self.size - 8} after the length")
        if n > MAX_HEADER:
            raise self._fail(f"its header is {n} bytes, over the {MAX_HEADER}-byte bound for adapter files")
        raw = _read_exact(self._fd, n, 8, self._where)
        try:
            header = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than any header needs
            raise self._fail(f"its header is not valid JSON ({type(exc).__name__})") from None
        if not isinstance(header, dict):
            raise self._fail("its header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise self._fail("its __metadata__ is not a map of strings to strings")
        data = self.size - 8 - n
        tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            tensors[key] = self._tensor(key, entry, data)
        spans = sorted((t.start, t.end, k) for k, t in tensors.items() if t.end > t.start)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise self._fail(f"tensors {a!r} and {b!r} overlap")
        return meta, tensors, 8 + n

    def _tensor(self, key: str, entry: Any, data: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"the entry of {key!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise self._fail(f"{key!r} has dtype {dtype!r}; known: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 64:
            raise self._fail(f"{key!r} has shape {str(shape)[:80]}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise self._fail(f"{key!r} has data offsets {str(offsets)[:80]} outside the {data} bytes of data")
        numel = 1
        for s in shape:
            numel *= s
        if (offsets[1] - offsets[0]) != numel * DTYPES[dtype].itemsize:
            raise self._fail(f"{key!r} is {dtype} {shape}, {numel * DTYPES[dtype].itemsize} bytes, and its data "
                             f"offsets hold {offsets[1] - offsets[0]}")
        return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])

    def read(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` (default: all), read from this snapshot (new tensors, CPU)."""
        out = {}
        for k in self.tensors if keys is None else keys:
            info = self.tensors[k]
            raw = bytearray(_read_exact(self._fd, info.end - info.start, self._data + info.start, self._where))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            if info.dtype == "BOOL" and bool((flat > 1).any()):
                raise AdapterFileError(f"{self._where}: bool tensor {k!r} holds values other than 0 and 1")
            out[k] = flat.view(info.torch_dtype).reshape(info.shape)
        return out

    def close(self) -> None:
        """Close the file (idempotent); tensors already read stay valid."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# -- writing -----------------------------------------------------------------------------------------

def serialize(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], f: BinaryIO) -> None:
    """Write the safetensors format with every key sorted, so that equal contents give equal bytes in
    any process. Tensors are laid out widest dtype first, which keeps each one aligned to its element
    size.

    Raises:
        ConfigError: a tensor of a dtype the format cannot store (checked before anything is written).
    """
    names = {k: dtype_name(t.dtype, f"tensor {k!r}") for k, t in tensors.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    for k in order:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": names[k], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for k in order:
        t = tensors[k].detach().contiguous().cpu()
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # a memoryview of the bytes, no copy


def temporary_beside(dest: Path, suffix: str = ".tmp", directory: bool = False) -> str:
    """A new temporary file (or directory) in ``dest``'s folder, named so that a later writer can tell
    it was left by a process that is gone (its pid is in the name)."""
    prefix = f".{dest.name}.peftkit-{os.getpid()}-"
    if directory:
        return tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=dest.parent)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dest.parent)
    os.close(fd)
    return name


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: leave its files alone
    return True


def remove_stale_temporaries(dest: Path) -> None:
    """Remove temporaries for ``dest`` left by writers that were killed (their process is gone)."""
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or match["name"] != dest.name or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                import shutil

                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def write_atomic(dest: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
    """Write a safetensors file: whole or absent, also if the writer is killed at any moment."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest)
    tmp = temporary_beside(dest)
    try:
        with open(tmp, "wb") as f:
            serialize(tensors, meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
