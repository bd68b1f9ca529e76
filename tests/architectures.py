"""Real architectures from their public constructors, at tiny sizes with random weights: transformers,
torchvision, timm and plain PyTorch models, each with an input and a training loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SEED = 0


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED + 1)


def flatten(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensors, tuples, lists, dicts and Hugging Face outputs)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flatten(v)]
    return []


def float_loss(out: Any) -> torch.Tensor:
    """A loss that reaches every floating-point output."""
    return sum(t.float().pow(2).mean() for t in flatten(out) if t.is_floating_point())  # type: ignore[return-value]


@dataclass(frozen=True)
class Arch:
    """One architecture.

    Attributes:
        name: Short name (test ids).
        build: Builds the model in eval mode, seeded (two calls give the same weights).
        make_input: The input: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        loss: A training loss ``loss(model, input)`` (default: squares of every float output).
        tied: Whether the model ties weights (an embedding and its output layer).
        family: Where it comes from (transformers, torchvision, timm, torch).
    """

    name: str
    build_fn: Callable[[], nn.Module]
    make_input: Callable[[], Any]
    family: str
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None
    tied: bool = False

    def build(self) -> nn.Module:
        torch.manual_seed(SEED)
        return self.build_fn().eval()

    def input(self) -> Any:
        return self.make_input()

    def __str__(self) -> str:
        return self.name


def call(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on an input of any of the three shapes."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def train_loss(arch: Arch, model: nn.Module, inputs: Any) -> torch.Tensor:
    return arch.loss(model, inputs) if arch.loss is not None else float_loss(call(model, inputs))


# -- transformers ------------------------------------------------------------------------------------

def _hf(cls: str, config: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, cls)(getattr(transformers, config)(**options))
    return build


def _ids(vocab: int = 64) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"input_ids": torch.randint(0, vocab, (2, 6), generator=_gen())}


def _seq2seq(extra: str, shape: tuple[int, ...]) -> Callable[[], dict[str, torch.Tensor]]:
    def make() -> dict[str, torch.Tensor]:
        g = _gen()
        first = torch.randn(*shape, generator=g) if extra == "input_features" else torch.randint(0, 64, shape, generator=g)
        return {extra: first, "decoder_input_ids": torch.randint(0, 64, (2, 4), generator=g)}
    return make


_DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

TRANSFORMERS = [
    Arch("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     **_SPECIAL), _ids(), "transformers", tied=True),
    Arch("llama", _hf("LlamaForCausalLM", "LlamaConfig", **_DECODER, **_SPECIAL), _ids(), "transformers"),
    Arch("qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", **_DECODER, **_SPECIAL), _ids(), "transformers"),
    Arch("mistral", _hf("MistralForCausalLM", "MistralConfig", **_DECODER, **_SPECIAL), _ids(), "transformers"),
    Arch("t5", _hf("T5ForConditionalGeneration", "T5Config", vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                   num_heads=4, **_SPECIAL), _seq2seq("input_ids", (2, 6)), "transformers", tied=True),
    Arch("bert", _hf("BertModel", "BertConfig", **_BERT), _ids(), "transformers"),
    Arch("bert_classifier", _hf("BertForSequenceClassification", "BertConfig", num_labels=3, **_BERT), _ids(),
         "transformers"),
    Arch("distilbert", _hf("DistilBertModel", "DistilBertConfig", vocab_size=64, dim=32, n_layers=2, n_heads=4,
                           hidden_dim=64, max_position_embeddings=64), _ids(), "transformers"),
    Arch("hf_vit", _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=5),
         lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=_gen())}, "transformers"),
    Arch("whisper", _hf("WhisperForConditionalGeneration", "WhisperConfig", vocab_size=64, d_model=32, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
                        decoder_start_token_id=1, **_SPECIAL),
         _seq2seq("input_features", (2, 8, 32)), "transformers", tied=True),
    Arch("clip", _hf("CLIPModel", "CLIPConfig", projection_dim=16,
                     text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=16, **_SPECIAL),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4)),
         lambda: {"input_ids": torch.randint(3, 64, (2, 6), generator=_gen()),
                  "pixel_values": torch.randn(2, 3, 32, 32, generator=_gen())}, "transformers"),
]


# -- torchvision -------------------------------------------------------------------------------------

def _image(size: int = 32, batch: int = 2) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(batch, 3, size, size, generator=_gen())


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=5)
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision starts it at zero: nothing upstream gets a gradient
    return vit


def _tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=5)


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=5)


def _r3d() -> nn.Module:
    from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv3DSimple, VideoResNet

    return VideoResNet(BasicBlock, [Conv3DSimple] * 4, [1, 1, 1, 1], BasicStem, num_classes=4)


def _detector() -> nn.Module:
    import torchvision

    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64)


def _detector_loss(model: nn.Module, images: Any) -> torch.Tensor:
    """The detector's own losses while training; in eval mode (FISH's Fisher estimate) its detections'."""
    if not model.training:
        return float_loss(model(images))
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])} for _ in images]
    return sum(model(images, targets).values())  # type: ignore[return-value]


def _tv(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, **options)
    return build


TORCHVISION = [
    Arch("resnet18", _tv("resnet18", num_classes=5), _image(), "torchvision"),
    Arch("mobilenet_v3_small", _tv("mobilenet_v3_small", num_classes=5), _image(), "torchvision"),
    Arch("efficientnet_b0", _tv("efficientnet_b0", num_classes=5), _image(), "torchvision"),
    Arch("convnext", _tv_convnext, _image(), "torchvision"),
    Arch("vit", _tv_vit, _image(), "torchvision"),
    Arch("swin", _tv_swin, _image(), "torchvision"),
    Arch("fasterrcnn", _detector, lambda: (list(torch.rand(2, 3, 64, 64, generator=_gen()).unbind(0)),), "torchvision",
         loss=lambda model, inputs: _detector_loss(model, inputs[0])),
    Arch("deeplabv3", _tv("deeplabv3_mobilenet_v3_large", weights_backbone=None, num_classes=3, aux_loss=False),
         _image(64), "torchvision"),
    Arch("r3d", _r3d, lambda: torch.randn(1, 3, 4, 32, 32, generator=_gen()), "torchvision"),
]


# -- timm --------------------------------------------------------------------------------------------

def _timm(name: str, **options: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=5, **options)
    return build


TIMM = [
    Arch("timm_vit", _timm("vit_tiny_patch16_224", img_size=32), _image(), "timm"),
    Arch("timm_convnext", _timm("convnext_atto"), _image(), "timm"),
    Arch("timm_efficientnet", _timm("efficientnet_b0"), _image(), "timm"),
    Arch("timm_mobilevitv2", _timm("mobilevitv2_050"), _image(64), "timm"),
    Arch("timm_coatnet", _timm("coatnet_nano_rw_224", img_size=64), _image(64), "timm"),
]


# -- plain PyTorch -----------------------------------------------------------------------------------

class RecurrentClassifier(nn.Module):
    """Embedding -> LSTM/GRU (two layers, both directions) -> Linear: the course's text classifier."""

    def __init__(self, cell: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.rnn = cell(16, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(48, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(ids))
        return self.head(h[:, -1])


class SignalNet(nn.Module):
    """Conv1d layers over a multichannel signal."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 5, padding=2)
        self.bn = nn.BatchNorm1d(16)
        self.c2 = nn.Conv1d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).mean(-1))


class PaddedEncoder(nn.Module):
    """nn.TransformerEncoder over padded sequences (its nested-tensor fast path in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=padding))


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 50, (3, 7), generator=_gen())
    padding = torch.arange(7)[None, :] >= torch.tensor([[7], [4], [2]])
    return ids, padding


TORCH = [
    Arch("lstm", RecurrentClassifier, lambda: torch.randint(0, 50, (2, 7), generator=_gen()), "torch"),
    Arch("gru", lambda: RecurrentClassifier(nn.GRU), lambda: torch.randint(0, 50, (2, 7), generator=_gen()), "torch"),
    Arch("conv1d", SignalNet, lambda: torch.randn(2, 4, 20, generator=_gen()), "torch"),
    Arch("padded_encoder", PaddedEncoder, _padded, "torch"),
]

ARCHS = TRANSFORMERS + TORCHVISION + TIMM + TORCH
BY_NAME = {a.name: a for a in ARCHS}


def build_or_skip(name: str) -> tuple[Arch, nn.Module]:
    """The architecture ``name`` and its model (seeded, eval mode); the test is skipped when the
    library it comes from is not installed."""
    import pytest

    arch = BY_NAME[name]
    if arch.family in ("transformers", "timm"):
        pytest.importorskip(arch.family)
    return arch, arch.build()
