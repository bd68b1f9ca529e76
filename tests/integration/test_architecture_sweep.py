"""Every built-in method on real architectures (transformers, torchvision, timm, plain PyTorch; tiny
configs, random weights): wrap with defaults, identity at init, one training step with the backbone
bitwise frozen, an exact save/load round trip, merged == unmerged, and a PEFT export that PEFT
computes identically. Where a method does not apply, the refusal must be a ``PeftkitError`` with
the reason written below."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import ARCHS, Arch, call, flatten, train_loss
from conftest import snapshot
from peftkit_plugins.peft_format import peft_doubles_mha_out_proj

import peftkit
from peftkit.errors import ConfigError, MergeError, PeftkitError

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"r": 2},
    "serial_adapter": {},
    "parallel_adapter": {},
    "last_layer": {},
    "fish": {"keep": 0.01, "samples": 2},
    "ia3": {},  # the third-party example plugin (examples/peftkit-ia3)
}

_NO_HEAD = "needs the model's single output layer"
# (architecture, method) -> why wrapping is refused. Every other pair must work.
REFUSED = {
    **{(a, "last_layer"): _NO_HEAD for a in ("bert", "distilbert", "clip", "fasterrcnn")},
    # IA3 (the example plugin) scales Linear and Conv2d outputs only
    **{(a, "ia3"): "found no default targets" for a in ("gpt2", "lstm", "gru", "conv1d", "r3d")},
}
# (architecture, method) -> why merging is refused (besides non-linear bottleneck adapters, never mergeable)
UNMERGEABLE: dict[tuple[str, str], str] = {}
# architecture -> why a default LoRA cannot be exported to PEFT (else PEFT must compute the same outputs)
PEFT_REFUSED = {
    # nn.MultiheadAttention: PEFT before 0.22 applies out_proj's delta twice (PR #3774)
    **({"vit": "out_proj delta twice"} if peft_doubles_mha_out_proj() else {}),
    "swin": "PEFT cannot apply LoRA to .*qkv",  # read by a function, not called
    "padded_encoder": "PEFT cannot apply LoRA to .*linear1",  # nn.TransformerEncoderLayer's fused path
    "deeplabv3": "ignores dilation",  # PEFT's conv LoRA builds its factors without the conv's dilation
    "r3d": "whose constructor does not take",  # PEFT builds LoRA factors with the layer's class (Conv3DSimple)
    "whisper": "WhisperEncoder reads its stride",  # PEFT's LoRA layer has no stride
    "timm_mobilevitv2": "PEFT cannot apply LoRA to .*qkv_proj",  # its cross-attention path reads the weight
    "lstm": "RecurrentLoRA has no PEFT equivalent",  # PEFT has no LoRA layer for LSTM/GRU/RNN
    "gru": "RecurrentLoRA has no PEFT equivalent",
}


def _close(actual: Any, expected: Any, rtol: float, atol: float) -> None:
    a, e = flatten(actual), flatten(expected)
    assert len(a) == len(e)
    for x, y in zip(a, e, strict=True):
        if x.is_floating_point():
            scale = max(1.0, y.abs().max().item()) if y.numel() else 1.0
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol * scale)
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def _out(model: torch.nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        return call(model, inputs)


def _options(arch: Arch, method: str) -> dict[str, Any]:
    options = dict(METHODS[method])
    if method == "fish":
        inputs = arch.input()
        options.update(data=[inputs], loss_fn=lambda model, batch: train_loss(arch, model, batch))
    return options


def _flags(model: torch.nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ARCHS, ids=str)
def test_method_on_architecture(arch: Arch, method: str, tmp_path: Path) -> None:
    base = arch.build()
    inputs = arch.input()
    before, flags = snapshot(base), _flags(base)
    plain = _out(base, inputs)
    why = REFUSED.get((arch.name, method))
    if why is not None:
        with pytest.raises(PeftkitError, match=why):
            peftkit.wrap(base, method, **_options(arch, method))
        assert snapshot(base).keys() == before.keys() and _flags(base) == flags  # a refusal changes nothing
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
        return
    m = peftkit.wrap(base, method, **_options(arch, method))

    # identity at init, in both forms (weight space without autograd, the training forms with it)
    _close(_out(m, inputs), plain, rtol=1e-5, atol=1e-5)
    _close(call(m, inputs), plain, rtol=1e-4, atol=1e-5)

    # one training step: only the adapter moves
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    train_loss(arch, m, inputs).backward()
    trained = [p for p in m.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), "no adapter tensor got a gradient"
    opt.step()
    for k, v in snapshot(base).items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed while training"
    with torch.no_grad():  # a visible adapter, whatever its initialisation
        for p in trained:
            p.add_(0.05 * torch.randn_like(p))
    m.eval()
    adapted = _out(m, inputs)

    # the file holds the adapter, and reproduces it exactly on a fresh backbone
    path = peftkit.save(m, tmp_path / "a.safetensors")
    _close(_out(peftkit.load(arch.build(), path), inputs), adapted, rtol=0, atol=0)

    # merged equals unmerged, and unmerge gives the backbone back bit for bit
    unmergeable = UNMERGEABLE.get((arch.name, method))
    if method in ("serial_adapter", "parallel_adapter"):
        unmergeable = "cannot be written as a weight delta"
    if unmergeable is not None:
        with pytest.raises(MergeError, match=unmergeable):
            m.merge()
    else:
        m.merge()
        _close(_out(m, inputs), adapted, rtol=1e-4, atol=1e-5)
        m.unmerge()
    for k, v in snapshot(base).items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} differs after merge and unmerge"

    if method == "lora":
        _peft_round_trip(arch, m, inputs, adapted, tmp_path)


def _peft_round_trip(arch: Arch, m: peftkit.AdaptedModel, inputs: Any, adapted: Any, tmp_path: Path) -> None:
    """A PEFT export is refused (for the reason above), or PEFT computes the adapted model's outputs."""
    peft = pytest.importorskip("peft")
    why = PEFT_REFUSED.get(arch.name)
    if why is not None:
        with pytest.raises(ConfigError, match=why):
            peftkit.export_peft(m, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    out = peftkit.export_peft(m, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(arch.build(), str(out)).eval()
    # PEFT adds s*B(Ax) to Wx where peftkit computes (W + s*BA)x: float32 rounding, which on one
    # thread (the suite's workers) reaches 6e-5 on CLIP's projections; the adapters moved each output
    # by 5e-2 (BERT) to 0.9 (resnet18) of its scale
    _close(_out(theirs, inputs), adapted, rtol=1e-4, atol=1e-4)


def test_expectations_name_real_pairs() -> None:
    names = {a.name for a in ARCHS}
    for arch, method in [*REFUSED, *UNMERGEABLE]:
        assert arch in names and method in METHODS
    assert set(PEFT_REFUSED) <= names
    assert all(re.compile(p) for p in [*REFUSED.values(), *UNMERGEABLE.values(), *PEFT_REFUSED.values()])
