"""A conformance kit for peftkit method plugins: the invariants every method must keep, checked on
small built-in models through peftkit's public API only.

A plugin author subclasses :class:`MethodSuite` in their own package's tests, and pytest runs every
check on every kit model the method applies to::

    from peftkit.testing import MethodSuite

    class TestIA3(MethodSuite):
        method = "ia3"

Outside pytest (unittest, a notebook), :func:`check_method` runs the same checks and raises one
``AssertionError`` listing every failure::

    from peftkit.testing import check_method

    check_method("ia3", random_options={"init": 1.5})

The checks (see :data:`CHECKS`; each is a ``check_<name>`` method of :class:`MethodSuite`):

* ``identity_at_init``: a fresh adapter leaves the backbone's outputs unchanged (eval mode,
  without and with autograd).
* ``frozen_backbone``: a few AdamW steps (weight decay on) change no backbone parameter or buffer,
  bit for bit (BatchNorm statistics included); only ``peft_adapters.*`` parameters are trainable.
* ``gradients``: after a random perturbation of the adapter, every trainable tensor gets a finite,
  non-zero gradient, and no backbone parameter gets one.
* ``save_load``: save, then load onto a fresh identically-seeded backbone: same outputs and same
  adapter tensors bit for bit; saving the loaded adapter again gives the same file contents.
* ``file_contents``: the file holds only the adapter's tensors (each equal to one of the adapter's
  state tensors), no backbone tensor except those of modules trained whole (saved whole); its
  adapter tensors take at most half the backbone's bytes and the file less than the backbone.
* ``merge``: the weight-space and output-space forms agree; ``merge()`` changes the backbone's
  weights and equals the unmerged model; ``unmerge()`` restores the backbone bit for bit. For a
  method that does not merge, ``merge()`` raises ``MergeError`` and changes nothing.
* ``unwrap``: ``unwrap()`` gives back the very backbone, bit for bit, with its ``requires_grad``
  and training flags and its own outputs; ``unwrap(merge=True)`` keeps the adapted outputs (or
  raises ``MergeError`` and changes nothing).
* ``adapters``: a second adapter of the method is inert until activated, switches, disables,
  deletes, saves and reloads exactly.
* ``trained_module``: with ``train=[output layer]`` both the adapter and that module train, the
  module is saved whole and the file reloads exactly.
* ``unknown_option``: an unknown option is a ``ConfigError`` naming it, and changes nothing.
* ``wrong_backbone``: loading the file onto a backbone of other shapes is a ``PeftkitError`` that
  leaves that backbone untouched.
* ``corrupt_file``: truncated or corrupted copies of the file are refused with ``AdapterFileError``
  and leave the backbone untouched.

A kit model on which ``peftkit.wrap`` raises :class:`~peftkit.errors.TargetError` (the method finds
nothing to adapt there) is skipped, but the suite fails if the method applies to none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.errors import (
    AdapterFileError,
    ConfigError,
    MergeError,
    PeftkitError,
    TargetError,
)
from peftkit.plugins import pm

__all__ = [
    "CHECKS",
    "MODELS",
    "CheckResult",
    "ConvNet",
    "Example",
    "KitModel",
    "LSTMClassifier",
    "MethodSuite",
    "NotApplicable",
    "TransformerClassifier",
    "check_method",
    "check_suite",
    "get_model",
    "mlp",
    "registered",
]

Example = tuple[torch.Tensor, torch.Tensor]
"""An ``(inputs, labels)`` batch of a kit model: the model maps ``inputs`` to class logits."""

_ADAPTER = "default"
_NO_SUCH_OPTION = "peftkit_testing_no_such_option"
_MERGE_TOL = {"rtol": 1e-4, "atol": 1e-5}  # float tolerance: merged weights round differently
_STEPS = 3


# -- the kit's models -------------------------------------------------------------------------------


def mlp(width: int = 64) -> nn.Sequential:
    """A three-layer perceptron: 16 inputs, two hidden ``Linear`` layers of ``width`` (the second
    without a bias, as many real layers are), 5 classes."""
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width, bias=False), nn.ReLU(),
                         nn.Linear(width, 5))


class ConvNet(nn.Module):
    """Two 3x3 convolutions with BatchNorm, global average pooling and a ``Linear`` head (5 classes)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 5)
        with torch.no_grad():  # statistics as after pre-training, not the neutral 0 and 1
            for bn in (self.bn1, self.bn2):
                assert bn.running_mean is not None and bn.running_var is not None  # track_running_stats
                bn.running_mean.normal_(0.0, 0.2)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        out: torch.Tensor = self.fc(h.mean(dim=(2, 3)))
        return out


class TransformerClassifier(nn.Module):
    """Token embedding, a two-layer ``nn.TransformerEncoder`` (token 0 is padding, masked out),
    mean pooling over the real tokens and a ``Linear`` head (5 classes)."""

    def __init__(self, width: int = 32, vocab: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(width, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        with warnings.catch_warnings():  # the packed fast path is used on purpose; its prototype notice is noise
            warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
            h = self.encoder(self.embed(ids), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        out: torch.Tensor = self.head((h * keep).sum(dim=1) / keep.sum(dim=1))
        return out


class LSTMClassifier(nn.Module):
    """Token embedding, a one-layer ``nn.LSTM`` and a ``Linear`` head on the last state (5 classes)."""

    def __init__(self, width: int = 32, vocab: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width // 2)
        self.lstm = nn.LSTM(width // 2, width, batch_first=True)
        self.head = nn.Linear(width, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embed(ids))
        out: torch.Tensor = self.head(states[:, -1])
        return out


def _images(g: torch.Generator) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=g)


def _features(g: torch.Generator) -> torch.Tensor:
    return torch.randn(6, 16, generator=g)


def _padded_ids(g: torch.Generator) -> torch.Tensor:
    ids = torch.randint(1, 32, (3, 7), generator=g)
    ids[1, 5:] = 0  # padding: the encoder masks it (and packs the batch on its fast path)
    ids[2, 4:] = 0
    return ids


def _ids(g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 32, (3, 7), generator=g)


@dataclasses.dataclass(frozen=True)
class KitModel:
    """One of the kit's small backbones, with a seeded builder and a seeded example batch.

    Attributes:
        name: Short name (``"mlp"``, ``"cnn"``, ``"transformer"``, ``"lstm"``), used in test ids.
        head: Path of the output layer (a ``Linear`` producing the logits).
        width: Hidden width of the standard build.
        other_width: Hidden width of the build with other shapes (see :meth:`build`).
        factory: ``factory(width) -> nn.Module``.
        inputs: ``inputs(generator) -> tensor``: the example's inputs.
        num_classes: Number of logits.
    """

    name: str
    head: str
    width: int
    other_width: int
    factory: Callable[[int], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]
    num_classes: int = 5

    def build(self, seed: int = 0, *, other_shapes: bool = False) -> nn.Module:
        """Build the backbone with weights drawn from ``seed`` (the global RNG is left as it was).

        Two calls with the same arguments give bitwise-identical models, like a pretrained
        checkpoint loaded twice.

        Args:
            seed: Seed of the weights.
            other_shapes: Build it with another hidden width, so that every layer but the input
                has other shapes (a backbone an adapter file of the standard build must not load on).
        """
        with _seeded(seed):
            return self.factory(self.other_width if other_shapes else self.width)

    def example(self) -> Example:
        """A fixed ``(inputs, labels)`` batch (the same tensors on every call)."""
        g = torch.Generator().manual_seed(1234)
        x = self.inputs(g)
        y = torch.randint(0, self.num_classes, (x.shape[0],), generator=g)
        return x, y


MODELS: tuple[KitModel, ...] = (
    KitModel("mlp", "4", 64, 48, mlp, _features),
    KitModel("cnn", "fc", 16, 12, ConvNet, _images),
    KitModel("transformer", "head", 32, 24, TransformerClassifier, _padded_ids),
    KitModel("lstm", "head", 32, 24, LSTMClassifier, _ids),
)
"""Every kit model: a Linear MLP, a CNN with BatchNorm, a Transformer encoder and an LSTM."""


def get_model(name: str | KitModel) -> KitModel:
    """The kit model called ``name`` (a :class:`KitModel` of your own is returned as it is).

    Raises:
        KeyError: no kit model has that name (the message lists them).
    """
    if isinstance(name, KitModel):
        return name
    for m in MODELS:
        if m.name == name:
            return m
    raise KeyError(f"no kit model named {name!r}; the kit has: {', '.join(m.name for m in MODELS)}")


@contextlib.contextmanager
def registered(*methods: type[peftkit.Method[Any]], plugin: str | None = None) -> Iterator[list[str]]:
    """Register method classes in this process for the length of a ``with`` block, as an installed
    plugin's ``register_methods`` hook would (for tests, before the package is installed with its
    entry point); they are unregistered afterwards, also when the block raises.

    Args:
        *methods: The ``peftkit.Method`` subclasses.
        plugin: The plugin name to register them under (default: one made from their names).

    Yields:
        The methods' names.

    Raises:
        PluginError: (on first use) a class that is not a Method subclass, or a name another plugin
            already registers.

    Example::

        with peftkit.testing.registered(BitFit):
            check_method("bitfit")
    """
    name = plugin or "peftkit-testing:" + ",".join(m.name for m in methods)

    class _Plugin:
        @peftkit.hookimpl
        def register_methods(self, register: Callable[[type[Any]], None]) -> None:
            for m in methods:
                register(m)

    pm.register(_Plugin(), name=name)
    try:
        yield [m.name for m in methods]
    finally:
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)


# -- helpers --------------------------------------------------------------------------------------


class NotApplicable(Exception):
    """A check that does not apply to this method on this model (for example, the method finds no
    targets in it). The pytest suite reports it as a skip; :func:`check_method` as skipped."""


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG for the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().reshape(-1).contiguous().view(torch.uint8),
                       b.detach().reshape(-1).contiguous().view(torch.uint8))


def _assert_unchanged(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], what: str) -> None:
    assert list(before) == list(after), (
        f"{what}: its tensor names changed (added {sorted(set(after) - set(before))[:5]}, "
        f"removed {sorted(set(before) - set(after))[:5]})")
    changed = [k for k in before if not _bitwise_equal(before[k], after[k])]
    assert not changed, f"{what}: tensors changed: {', '.join(changed[:8])}{' …' if len(changed) > 8 else ''}"


def _unmatched(tensors: Mapping[str, torch.Tensor], pool: list[torch.Tensor]) -> list[str]:
    """Names of ``tensors`` bitwise equal to no distinct tensor of ``pool`` (each used once)."""
    left = list(pool)
    missing = []
    for key, t in tensors.items():
        i = next((i for i, s in enumerate(left) if _bitwise_equal(s, t)), None)
        if i is None:
            missing.append(key)
        else:
            del left[i]
    return missing


def _flags(module: nn.Module) -> tuple[list[bool], list[bool]]:
    return [p.requires_grad for p in module.parameters()], [m.training for m in module.modules()]


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x)
        return out


def _exact(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=lambda m: f"{what}\n{m}")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, *, rtol: float | None = None,
           atol: float | None = None) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}\n{m}")


def _loss(model: nn.Module, example: Example) -> torch.Tensor:
    x, y = example
    return F.cross_entropy(model(x).float(), y)


def _trainable(m: peftkit.AdaptedModel) -> dict[str, nn.Parameter]:
    return {n: p for n, p in m.named_parameters() if p.requires_grad}


def _train(m: peftkit.AdaptedModel, example: Example, steps: int = _STEPS) -> None:
    """A few AdamW steps with weight decay (which would move any frozen tensor it were given)."""
    m.train()
    opt = torch.optim.AdamW(list(_trainable(m).values()), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        loss = _loss(m, example)
        assert torch.isfinite(loss), f"the training loss is {loss.item()}"
        opt.zero_grad()
        torch.autograd.backward(loss)  # what loss.backward() runs; Tensor.backward is unannotated
        opt.step()


def _perturb(m: peftkit.AdaptedModel, name: str = _ADAPTER, seed: int = 7) -> None:
    """Move every floating-point tensor of an adapter off its initial value (LoRA's B = 0, a zero
    up-projection or unit scales would otherwise hide bugs that only show on a trained adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.peft_adapters[name].parameters():
            if p.is_floating_point():
                p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.dtype))


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _under(key: str, paths: Iterable[str]) -> bool:
    return any(p == "" or key == p or key.startswith(p + ".") for p in paths)


def _whole_modules(path: Path) -> list[str]:
    """Paths of the modules an adapter file holds whole (``train`` modules and new heads)."""
    return [p for p, t in peftkit.read_header(path).targets.items() if t.get("role") in ("train", "head")]


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[tuple[int, int | torch.SymInt]] = set()
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _corruptions(data: bytes, has_float: bool) -> list[tuple[str, bytes]]:
    """Broken copies of a safetensors file: (description, bytes)."""
    n = int.from_bytes(data[:8], "little")
    body = len(data) - 8 - n
    out = [
        ("an empty file", b""),
        ("a file cut inside its header-length prefix", data[:5]),
        ("a file cut inside its JSON header", data[: 8 + n // 2]),
        ("a file missing its last byte", data[:-1]),
        ("a header length pointing past the end of the file", (len(data) + 1000).to_bytes(8, "little") + data[8:]),
        ("a JSON header overwritten with garbage", data[:8] + b"\xff" * n + data[8 + n:]),
    ]
    if body > 1:
        out.append(("a file cut inside its tensor data", data[: 8 + n + body // 2]))
    if has_float and body > 0:
        out.append(("tensor data overwritten with NaN bytes", data[: 8 + n] + b"\xff" * body))
    return out


# -- the suite --------------------------------------------------------------------------------------

CHECKS: tuple[str, ...] = (
    "identity_at_init",
    "frozen_backbone",
    "gradients",
    "save_load",
    "file_contents",
    "merge",
    "unwrap",
    "adapters",
    "trained_module",
    "unknown_option",
    "wrong_backbone",
    "corrupt_file",
)
"""Names of the checks, in the order they run; ``MethodSuite.check_<name>`` implements each."""


class MethodSuite:
    """Conformance tests for one peftkit method: subclass it in a test file and pytest collects it.

    Example::

        from peftkit.testing import MethodSuite

        class TestIA3(MethodSuite):
            method = "ia3"
            random_options = {"init": 1.5}

    Each check is a ``test_<check>`` method parametrised over :attr:`models` (ids ``[mlp]``,
    ``[cnn]``, ...), plus ``test_applies_to_some_model``. A model on which ``peftkit.wrap`` raises
    :class:`~peftkit.errors.TargetError` is skipped; the suite fails if that happens on every model.
    The ``check_<name>(model, workdir)`` methods hold the checks themselves and can be called from
    other tests.

    Attributes:
        method: The registered method name (required).
        options: Options for an adapter as a user would create it (identity at init if
            :attr:`identity_at_init`).
        random_options: Options making the adapter's init non-identity, used wherever the check
            wants a non-trivial adapter (save/load, merge, ...); None: :attr:`options`. The kit
            also perturbs every adapter tensor randomly in those checks.
        models: Names of the kit models to run on (see :data:`MODELS`); default all.
        identity_at_init: Whether a fresh adapter leaves the outputs unchanged.
        merges: Whether ``merge()`` works; if False it must raise ``MergeError`` and change nothing.
        max_file_ratio: Largest allowed size of the file's adapter tensors (not counting modules
            trained whole) relative to the backbone's; the whole file must also stay smaller than
            the backbone. None: no size checks (for a method whose adapters are large by design).
    """

    method: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Any]] = {}
    random_options: ClassVar[Mapping[str, Any] | None] = None
    models: ClassVar[Sequence[str | KitModel]] = tuple(m.name for m in MODELS)
    identity_at_init: ClassVar[bool] = True
    merges: ClassVar[bool] = True
    max_file_ratio: ClassVar[float | None] = 0.5

    # -- hooks ------------------------------------------------------------------------------------
    def options_for(self, model: KitModel, example: Example) -> dict[str, Any]:
        """Extra options that depend on the model or on data, added to :attr:`options` and
        :attr:`random_options` (default: none).

        Override for a method that needs data, e.g. FISH::

            def options_for(self, model, example):
                return {"data": [example]}

        Args:
            model: The kit model being wrapped.
            example: Its example ``(inputs, labels)`` batch.
        """
        return {}

    # -- pytest glue ------------------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc: Any) -> None:
        """Parametrise every test taking ``kit_model`` over :attr:`models` (a pytest hook)."""
        if "kit_model" in metafunc.fixturenames:
            chosen = [get_model(n) for n in self.models]
            metafunc.parametrize("kit_model", chosen, ids=[m.name for m in chosen])

    def _run_in_pytest(self, check: str, model: KitModel, workdir: Path) -> None:
        try:
            getattr(self, f"check_{check}")(model, workdir)
        except NotApplicable as exc:
            import pytest

            pytest.skip(str(exc))

    def test_applies_to_some_model(self) -> None:
        """The method finds something to adapt in at least one of :attr:`models`."""
        self.check_applies()

    def test_identity_at_init(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("identity_at_init", kit_model, tmp_path)

    def test_frozen_backbone(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("frozen_backbone", kit_model, tmp_path)

    def test_gradients(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("gradients", kit_model, tmp_path)

    def test_save_load(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("save_load", kit_model, tmp_path)

    def test_file_contents(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("file_contents", kit_model, tmp_path)

    def test_merge(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("merge", kit_model, tmp_path)

    def test_unwrap(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("unwrap", kit_model, tmp_path)

    def test_adapters(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("adapters", kit_model, tmp_path)

    def test_trained_module(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("trained_module", kit_model, tmp_path)

    def test_unknown_option(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("unknown_option", kit_model, tmp_path)

    def test_wrong_backbone(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("wrong_backbone", kit_model, tmp_path)

    def test_corrupt_file(self, kit_model: KitModel, tmp_path: Path) -> None:
        self._run_in_pytest("corrupt_file", kit_model, tmp_path)

    # -- building blocks --------------------------------------------------------------------------
    def all_options(self, model: KitModel, *, random: bool = False) -> dict[str, Any]:
        """The options the checks pass to ``peftkit.wrap`` for ``model``: :attr:`options` (or
        :attr:`random_options` with ``random``) plus :meth:`options_for`."""
        if not self.method:
            raise TypeError(f"{type(self).__name__} must set `method` to a registered method name")
        base = self.random_options if random and self.random_options is not None else self.options
        return {**base, **self.options_for(model, model.example())}

    def wrap(self, model: KitModel, backbone: nn.Module, *, random: bool = False, seed: int = 1,
             **kwargs: Any) -> peftkit.AdaptedModel:
        """``peftkit.wrap`` the method onto ``backbone`` with the suite's options (RNG seeded).

        Raises:
            NotApplicable: the method finds no targets in this model (``TargetError``).
        """
        options = self.all_options(model, random=random)
        try:
            with _seeded(seed):
                return peftkit.wrap(backbone, self.method, **kwargs, **options)
        except TargetError as exc:
            raise NotApplicable(f"method {self.method!r} does not apply to the kit's {model.name} model: {exc}") from exc

    def _random_adapter(self, model: KitModel, **kwargs: Any) -> tuple[nn.Module, peftkit.AdaptedModel]:
        """A backbone and a non-identity adapter on it (random options, then perturbed), in eval mode."""
        backbone = model.build()
        m = self.wrap(model, backbone, random=True, **kwargs)
        _perturb(m)
        return backbone, m.eval()

    # -- the checks -------------------------------------------------------------------------------
    def check_applies(self) -> None:
        """At least one of :attr:`models` has something the method adapts.

        Raises:
            AssertionError: ``peftkit.wrap`` raised ``TargetError`` on every model.
        """
        reasons = []
        for name in self.models:
            model = get_model(name)
            try:
                self.wrap(model, model.build())
                return
            except NotApplicable as exc:
                reasons.append(str(exc))
        raise AssertionError(f"method {self.method!r} applies to none of the kit models "
                             f"{[get_model(m).name for m in self.models]}, so "
                             "no check ran:\n  " + "\n  ".join(reasons))

    def check_identity_at_init(self, model: KitModel, workdir: Path) -> None:
        """A fresh adapter leaves the outputs equal to the backbone's (eval mode; without and with
        autograd, which may take different forms of the adapter)."""
        if not self.identity_at_init:
            raise NotApplicable("identity_at_init = False")
        x, _ = model.example()
        backbone = model.build().eval()
        expected = _out(backbone, x)
        m = self.wrap(model, backbone).eval()
        _close(_out(m, x), expected, "a fresh adapter changed the outputs (eval, no autograd)")
        _close(m(x).detach(), expected, "a fresh adapter changed the outputs (eval, with autograd)")

    def check_frozen_backbone(self, model: KitModel, workdir: Path) -> None:
        """Training changes no backbone tensor (bitwise, buffers included) and moves the adapter;
        only ``peft_adapters.*`` parameters require gradients."""
        backbone = model.build()
        before = _snapshot(backbone)
        m = self.wrap(model, backbone)
        trainable = _trainable(m)
        assert trainable, "the adapter has no trainable parameter"
        outside = [n for n in trainable if not n.startswith("peft_adapters.")]
        assert not outside, f"parameters outside peft_adapters require gradients: {outside[:5]}"
        assert not any(p.requires_grad for p in backbone.parameters()), "a backbone parameter requires gradients"
        assert m.trainable_parameters() == sum(p.numel() for p in trainable.values()), (
            "trainable_parameters() disagrees with the parameters that require gradients")
        initial = {n: p.detach().clone() for n, p in trainable.items()}
        _train(m, model.example())
        _assert_unchanged(before, _snapshot(backbone), "training changed the backbone (wrap + optimizer steps)")
        assert any(not torch.equal(p, initial[n]) for n, p in _trainable(m).items()), (
            f"{_STEPS} AdamW steps changed no trainable tensor")

    def check_gradients(self, model: KitModel, workdir: Path) -> None:
        """After a random perturbation, one backward pass gives every trainable tensor a finite,
        non-zero gradient and no backbone parameter a gradient."""
        backbone = model.build()
        m = self.wrap(model, backbone)
        _perturb(m)
        m.train()
        torch.autograd.backward(_loss(m, model.example()))
        problems = []
        for n, p in _trainable(m).items():
            if p.grad is None:
                problems.append(f"{n}: no gradient")
            elif not torch.isfinite(p.grad).all():
                problems.append(f"{n}: non-finite gradient")
            elif not p.grad.any():
                problems.append(f"{n}: zero gradient")
        assert not problems, "gradients do not reach every trainable tensor: " + "; ".join(problems[:8])
        got = [n for n, p in backbone.named_parameters() if p.grad is not None]
        assert not got, f"backbone parameters got gradients: {got[:5]}"

    def check_save_load(self, model: KitModel, workdir: Path) -> None:
        """Save, load onto a fresh identically-seeded backbone: outputs and adapter tensors are
        bitwise equal, the backbone is untouched, and saving again gives the same file contents."""
        x, _ = model.example()
        _, m = self._random_adapter(model)
        expected = _out(m, x)
        path = peftkit.save(m, workdir / "adapter.safetensors")
        header = peftkit.read_header(path)
        assert header.method == self.method, f"the file names method {header.method!r}"
        fresh = model.build()
        before = _snapshot(fresh)
        loaded = peftkit.load(fresh, path).eval()
        assert loaded.adapter_names == [_ADAPTER] and loaded.active_adapters == [_ADAPTER], (
            f"loaded adapters {loaded.adapter_names}, active {loaded.active_adapters}")
        _exact(_out(loaded, x), expected, "the loaded adapter gives other outputs than the saved one")
        mine, theirs = m.peft_adapters[_ADAPTER].state_dict(), loaded.peft_adapters[_ADAPTER].state_dict()
        assert len(mine) == len(theirs), f"the loaded adapter holds {len(theirs)} tensors, the saved one {len(mine)}"
        unmatched = _unmatched(theirs, list(mine.values()))
        assert not unmatched, f"loaded adapter tensors equal to none of the saved adapter's: {unmatched[:5]}"
        _assert_unchanged(before, _snapshot(fresh), "loading changed the backbone")
        assert loaded.trainable_parameters() == m.trainable_parameters(), (
            "the loaded adapter does not train the same parameters")
        again = peftkit.save(loaded, workdir / "again.safetensors")
        second = peftkit.read_header(again)
        assert (second.config, second.targets) == (header.config, header.targets), (
            "the reloaded adapter saves another config or targets table than the file it came from")
        _assert_unchanged(_file_tensors(path), _file_tensors(again), "saving the loaded adapter gives other tensors")

    def check_file_contents(self, model: KitModel, workdir: Path) -> None:
        """The file holds the adapter's tensors and nothing else: each equals a distinct tensor of the
        adapter's state, backbone tensor names appear only for modules trained whole (all of their
        tensors), and the other tensors are small next to the backbone."""
        backbone, m = self._random_adapter(model)
        path = peftkit.save(m, workdir / "adapter.safetensors")
        stored = _file_tensors(path)
        state = list(m.peft_adapters[_ADAPTER].state_dict().values())
        assert len(stored) == len(state), (
            f"the file holds {len(stored)} tensors and the adapter's state {len(state)}")
        unmatched = _unmatched(stored, state)
        assert not unmatched, f"file tensors that are no tensor of the adapter: {unmatched[:5]}"
        whole = _whole_modules(path)
        base_keys = set(backbone.state_dict())
        leaked = sorted(k for k in set(stored) & base_keys if not _under(k, whole))
        assert not leaked, f"the file holds backbone tensors of modules not trained whole: {leaked[:5]}"
        for p in whole:
            missing = [f"{p}.{k}" for k in backbone.get_submodule(p).state_dict() if f"{p}.{k}" not in stored]
            assert not missing, f"module {p!r} is trained whole but the file lacks {missing[:5]}"
        if self.max_file_ratio is not None:
            whole_bytes = _nbytes(t for k, t in stored.items() if _under(k, whole))
            adapter_bytes = _nbytes(t for k, t in stored.items() if not _under(k, whole))
            backbone_bytes = _nbytes(backbone.state_dict().values())
            assert adapter_bytes <= self.max_file_ratio * backbone_bytes, (
                f"the file's adapter tensors take {adapter_bytes} bytes, more than {self.max_file_ratio:g} x the "
                f"backbone's {backbone_bytes} (set max_file_ratio on the suite if that is by design)")
            size = path.stat().st_size
            assert size - whole_bytes < backbone_bytes, (
                f"the file takes {size} bytes ({whole_bytes} of them modules trained whole), as much as the "
                f"backbone's {backbone_bytes}: its metadata is too large")

    def check_merge(self, model: KitModel, workdir: Path) -> None:
        """Unmerged, the forms with and without autograd agree. ``merge()`` (twice) writes into the
        backbone and gives the unmerged outputs to float tolerance; ``unmerge()`` (twice) restores the
        backbone bitwise. If :attr:`merges` is False, ``merge()`` raises ``MergeError`` and changes
        nothing."""
        x, _ = model.example()
        backbone, m = self._random_adapter(model)
        before = _snapshot(backbone)
        unmerged = _out(m, x)
        base_out = _out(model.build().eval(), x)
        assert not torch.allclose(unmerged, base_out), "a perturbed adapter leaves the outputs unchanged"
        _close(m(x).detach(), unmerged, "the adapter's forms with and without autograd disagree", **_MERGE_TOL)
        if not self.merges:
            try:
                m.merge()
            except MergeError:
                pass
            else:
                raise AssertionError("merges = False, but merge() did not raise MergeError")
            assert not m.merged, "a refused merge left the model marked merged"
            _assert_unchanged(before, _snapshot(backbone), "a refused merge changed the backbone")
            _exact(_out(m, x), unmerged, "a refused merge changed the outputs")
            return
        try:
            m.merge()
        except MergeError as exc:
            raise AssertionError(f"merges = True, but merge() raised MergeError ({exc}); set merges = False on "
                                 "the suite if the method cannot merge") from exc
        m.merge()  # idempotent
        assert m.merged, "merge() did not mark the model merged"
        after = _snapshot(backbone)
        assert any(k not in after or not _bitwise_equal(t, after[k]) for k, t in before.items()), (
            "merge() changed no backbone tensor")
        _close(_out(m, x), unmerged, "merged outputs differ from unmerged ones", **_MERGE_TOL)
        m.unmerge()
        m.unmerge()
        assert not m.merged, "unmerge() left the model marked merged"
        _assert_unchanged(before, _snapshot(backbone), "unmerge() did not restore the backbone")
        _close(_out(m, x), unmerged, "outputs after unmerge() differ from the unmerged ones", **_MERGE_TOL)

    def check_unwrap(self, model: KitModel, workdir: Path) -> None:
        """``unwrap()`` returns the backbone itself, bitwise as given, with its flags and outputs;
        ``unwrap(merge=True)`` keeps the adapted outputs, or raises ``MergeError`` and changes
        nothing if :attr:`merges` is False."""
        x, _ = model.example()
        expected_plain = _out(model.build().eval(), x)
        backbone = model.build()
        next(backbone.parameters()).requires_grad_(False)  # flags to restore: a frozen parameter, a module in eval
        next(sub for sub in backbone.modules() if sub is not backbone).eval()
        before, flags, keys = _snapshot(backbone), _flags(backbone), list(backbone.state_dict())
        m = self.wrap(model, backbone, random=True)
        assert list(backbone.state_dict()) == keys, "wrapping changed the backbone's state_dict() keys"
        _perturb(m)
        _out(m.eval(), x)  # a forward first: whatever it sets up (cached weights, ...) must go too
        back = m.unwrap()
        assert back is backbone, "unwrap() did not return the backbone given to wrap()"
        _assert_unchanged(before, _snapshot(back), "unwrap() did not give back the backbone unchanged")
        assert _flags(back) == flags, "unwrap() did not restore requires_grad and training flags"
        _exact(_out(back.eval(), x), expected_plain, "the unwrapped backbone gives other outputs than before wrap()")

        backbone, m = self._random_adapter(model)
        adapted = _out(m, x)
        if not self.merges:
            before = _snapshot(backbone)
            try:
                m.unwrap(merge=True)
            except MergeError:
                pass
            else:
                raise AssertionError("merges = False, but unwrap(merge=True) did not raise MergeError")
            _assert_unchanged(before, _snapshot(backbone), "a refused unwrap(merge=True) changed the backbone")
            _exact(_out(m, x), adapted, "a refused unwrap(merge=True) changed the outputs")
            return
        try:
            plain = m.unwrap(merge=True)
        except MergeError as exc:
            raise AssertionError(f"merges = True, but unwrap(merge=True) raised MergeError ({exc})") from exc
        assert plain is backbone, "unwrap(merge=True) did not return the backbone"
        _close(_out(plain.eval(), x), adapted, "the merged, unwrapped backbone gives other outputs", **_MERGE_TOL)

    def check_adapters(self, model: KitModel, workdir: Path) -> None:
        """A second adapter is inert until activated; switching, disabling, deleting, saving and
        reloading it all give the expected outputs exactly, and only the active adapter trains."""
        x, _ = model.example()
        base_out = _out(model.build().eval(), x)
        _, m = self._random_adapter(model)
        out_a = _out(m, x)
        with _seeded(2):
            m.add_adapter("second", self.method, **self.all_options(model, random=True))
        _perturb(m, "second", seed=8)
        assert m.adapter_names == [_ADAPTER, "second"], f"adapter names {m.adapter_names}"
        assert m.active_adapters == [_ADAPTER], f"adding an adapter changed the active ones: {m.active_adapters}"
        _exact(_out(m, x), out_a, "an inactive adapter changed the outputs")
        m.set_adapter("second")
        out_b = _out(m, x)
        assert not torch.allclose(out_a, out_b), "two different adapters give the same outputs"
        want = {id(p) for p in m.peft_adapters["second"].parameters()}
        got = {id(p) for p in m.parameters() if p.requires_grad}
        assert got == want, "after set_adapter('second') the trainable parameters are not exactly the second adapter's"
        with m.disable_adapters():
            _exact(_out(m, x), base_out, "disable_adapters() does not give the backbone's outputs")
        _exact(_out(m, x), out_b, "outputs after disable_adapters() differ from before")
        path = peftkit.save(m, workdir / "second.safetensors", adapter="second")
        m.delete_adapter("second")
        assert m.active_adapters == [] and m.adapter_names == [_ADAPTER], (
            f"after delete_adapter: names {m.adapter_names}, active {m.active_adapters}")
        _exact(_out(m, x), base_out, "with no active adapter the outputs are not the backbone's")
        m.set_adapter(_ADAPTER)
        _exact(_out(m, x), out_a, "the first adapter's outputs changed after adding and deleting another")
        assert m.load_adapter(path, name="third") == "third"
        m.set_adapter("third")
        _exact(_out(m, x), out_b, "a saved and reloaded adapter gives other outputs")

    def check_trained_module(self, model: KitModel, workdir: Path) -> None:
        """With ``train=[<output layer>]`` the layer is saved whole (starting as the backbone's copy),
        training moves it and the adapter but not the backbone, and the file reloads exactly."""
        x, _ = model.example()
        backbone = model.build()
        before = _snapshot(backbone)
        m = self.wrap(model, backbone, train=[model.head])
        start = _file_tensors(peftkit.save(m, workdir / "start.safetensors"))
        head = {f"{model.head}.{k}": t for k, t in backbone.get_submodule(model.head).state_dict().items()}
        assert set(head) <= set(start), f"the trained module {model.head!r} is not saved whole"
        _assert_unchanged(head, {k: start[k] for k in head}, "the trained module does not start as the backbone's")
        _train(m, model.example())
        _assert_unchanged(before, _snapshot(backbone), "training with train=[...] changed the backbone")
        path = peftkit.save(m, workdir / "trained.safetensors")
        end = _file_tensors(path)
        assert set(start) == set(end), "the file's tensor names changed during training"
        assert any(not torch.equal(start[k], end[k]) for k in head), f"the trained module {model.head!r} did not train"
        others = [k for k in start if k not in head]
        assert not others or any(not torch.equal(start[k], end[k]) for k in others), (
            "the adapter did not train beside the trained module")
        expected = _out(m.eval(), x)
        _exact(_out(peftkit.load(model.build(), path).eval(), x), expected,
               "the reloaded adapter with a trained module gives other outputs")

    def check_unknown_option(self, model: KitModel, workdir: Path) -> None:
        """An unknown option is a ``ConfigError`` naming it; the backbone is left as it was and can
        still be wrapped."""
        backbone = model.build()
        before, flags = _snapshot(backbone), _flags(backbone)
        try:
            unknown: dict[str, Any] = {_NO_SUCH_OPTION: 1}
            self.wrap(model, backbone, **unknown)
        except ConfigError as exc:
            assert _NO_SUCH_OPTION in str(exc), f"the ConfigError does not name the unknown option: {exc}"
        else:
            raise AssertionError(f"wrap() accepted the unknown option {_NO_SUCH_OPTION!r}")
        _assert_unchanged(before, _snapshot(backbone), "a refused wrap() changed the backbone")
        assert _flags(backbone) == flags, "a refused wrap() changed requires_grad or training flags"
        self.wrap(model, backbone)  # nothing was left attached

    def check_wrong_backbone(self, model: KitModel, workdir: Path) -> None:
        """Loading the file onto a backbone with other shapes raises a ``PeftkitError`` (typically
        ``BackboneMismatchError``) and leaves that backbone's tensors, flags and outputs as they were."""
        x, _ = model.example()
        _, m = self._random_adapter(model)
        path = peftkit.save(m, workdir / "adapter.safetensors")
        other = model.build(other_shapes=True).eval()
        before, flags = _snapshot(other), _flags(other)
        expected = _out(other, x)
        try:
            peftkit.load(other, path)
        except PeftkitError:
            pass
        else:
            raise AssertionError("a file was loaded onto a backbone with other shapes")
        _assert_unchanged(before, _snapshot(other), "a refused load changed the backbone")
        assert _flags(other) == flags, "a refused load changed requires_grad or training flags"
        _exact(_out(other, x), expected, "a refused load changed the backbone's outputs")

    def check_corrupt_file(self, model: KitModel, workdir: Path) -> None:
        """Truncated copies of the file (empty; cut in the length prefix, the header, the data, by one
        byte), a bad header length, a garbled header and NaN-filled tensor data are each refused with
        ``AdapterFileError``, leaving the backbone untouched."""
        _, m = self._random_adapter(model)
        path = peftkit.save(m, workdir / "adapter.safetensors")
        data = path.read_bytes()
        has_float = any(t.is_floating_point() for t in _file_tensors(path).values())
        backbone = model.build()
        before, flags = _snapshot(backbone), _flags(backbone)
        problems = []
        for i, (what, broken) in enumerate(_corruptions(data, has_float)):
            bad = workdir / f"corrupt-{i}.safetensors"
            bad.write_bytes(broken)
            try:
                peftkit.load(backbone, bad)
            except AdapterFileError:
                continue
            except Exception as exc:
                problems.append(f"{what}: {type(exc).__name__} instead of AdapterFileError ({str(exc)[:120]})")
            else:
                problems.append(f"{what}: loaded without an error")
        assert not problems, "corrupt files are not refused with AdapterFileError: " + "; ".join(problems)
        _assert_unchanged(before, _snapshot(backbone), "a refused load changed the backbone")
        assert _flags(backbone) == flags, "a refused load changed requires_grad or training flags"


# -- outside pytest ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one model.

    Attributes:
        check: The check's name (one of :data:`CHECKS`, or ``"applies"``).
        model: The kit model's name (empty for ``"applies"``).
        status: ``"passed"``, ``"failed"`` or ``"skipped"``.
        detail: Why it failed or was skipped (empty when it passed).
    """

    check: str
    model: str
    status: str
    detail: str = ""


def check_suite(suite: type[MethodSuite], checks: Iterable[str] | None = None) -> list[CheckResult]:
    """Run a :class:`MethodSuite` subclass's checks without pytest.

    Args:
        suite: The subclass (its attributes and hooks configure the checks).
        checks: Names of the checks to run (see :data:`CHECKS`); default all.

    Returns:
        One :class:`CheckResult` per check and model, when all passed or were skipped.

    Raises:
        AssertionError: some check failed; the message lists every failure.
        ValueError: an unknown check name.
    """
    chosen = list(CHECKS if checks is None else checks)
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; the kit's checks are: {', '.join(CHECKS)}")
    instance = suite()
    results: list[CheckResult] = []
    try:
        instance.check_applies()
        results.append(CheckResult("applies", "", "passed"))
    except Exception as exc:  # AssertionError, or a plugin's error (a PluginError from wrap): a failure either way
        detail = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
        results.append(CheckResult("applies", "", "failed", detail))
    for check in chosen:
        for model in [get_model(m) for m in instance.models]:
            name = model.name
            with tempfile.TemporaryDirectory(prefix="peftkit-testing-") as tmp:
                try:
                    getattr(instance, f"check_{check}")(model, Path(tmp))
                except NotApplicable as exc:
                    results.append(CheckResult(check, name, "skipped", str(exc)))
                except AssertionError as exc:
                    results.append(CheckResult(check, name, "failed", str(exc)))
                except Exception as exc:  # an unexpected error is a failure too, with where it came from
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    results.append(CheckResult(check, name, "failed", f"{type(exc).__name__}: {exc} "
                                               f"(at {os.path.basename(where.filename)}:{where.lineno})"))
                else:
                    results.append(CheckResult(check, name, "passed"))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        lines = [f"{r.check}[{r.model}]: {r.detail}" if r.model else f"{r.check}: {r.detail}" for r in failed]
        raise AssertionError(f"method {instance.method!r} failed {len(failed)} of {len(results)} checks:\n"
                             + "\n".join(f"- {line}" for line in lines))
    return results


def check_method(method: str, options: Mapping[str, Any] | None = None, *,
                 random_options: Mapping[str, Any] | None = None, models: Sequence[str | KitModel] | None = None,
                 identity_at_init: bool = True, merges: bool = True,
                 options_for: Callable[[KitModel, Example], Mapping[str, Any]] | None = None,
                 max_file_ratio: float | None = 0.5, checks: Iterable[str] | None = None) -> list[CheckResult]:
    """Run every conformance check on ``method`` without pytest (unittest, notebooks, scripts).

    Example::

        from peftkit.testing import check_method

        check_method("ia3", random_options={"init": 1.5})
        check_method("fish", {"keep": 0.25, "samples": 8}, options_for=lambda model, ex: {"data": [ex]})

    Args:
        method: The registered method name.
        options: See :attr:`MethodSuite.options`.
        random_options: See :attr:`MethodSuite.random_options`.
        models: See :attr:`MethodSuite.models`; default all kit models.
        identity_at_init: See :attr:`MethodSuite.identity_at_init`.
        merges: See :attr:`MethodSuite.merges`.
        options_for: ``options_for(model, example) -> options``, see :meth:`MethodSuite.options_for`.
        max_file_ratio: See :attr:`MethodSuite.max_file_ratio`.
        checks: Names of the checks to run (see :data:`CHECKS`); default all.

    Returns:
        One :class:`CheckResult` per check and model, when none failed.

    Raises:
        AssertionError: some check failed; the message lists every failure.
    """
    attrs: dict[str, Any] = {
        "method": method,
        "options": dict(options or {}),
        "random_options": None if random_options is None else dict(random_options),
        "models": tuple(models) if models is not None else MethodSuite.models,
        "identity_at_init": identity_at_init,
        "merges": merges,
        "max_file_ratio": max_file_ratio,
    }
    if options_for is not None:
        hook = options_for
        attrs["options_for"] = lambda self, model, example: dict(hook(model, example))
    for name in attrs["models"]:
        get_model(name)  # an unknown name fails here, not once per check
    return check_suite(type(f"CheckMethod_{method}", (MethodSuite,), attrs), checks)
