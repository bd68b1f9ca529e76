"""What a new user hit on real architectures, one test per surprise (tiny configs, random weights)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from architectures import BY_NAME, call
from conftest import assert_bitwise_equal, snapshot
from torch import nn

import peftkit
from peftkit.errors import ConfigError, MergeError, TargetError


def _out(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = call(model, inputs)
    return out.logits if hasattr(out, "logits") else out


# -- 1. one backbone, one wrapper ------------------------------------------------------------------

def test_a_wrapped_transformer_cannot_be_wrapped_or_loaded_onto_again(tmp_path: Path) -> None:
    arch = BY_NAME["bert_classifier"]
    base, inputs = arch.build(), arch.input()
    before, plain = snapshot(base), _out(base, inputs)
    m = peftkit.wrap(base, "lora", r=4, init=False)
    path = peftkit.save(m, tmp_path / "a.safetensors")
    for again in (lambda: peftkit.wrap(base, "lora"), lambda: peftkit.load(base, path),
                  lambda: peftkit.wrap(base.bert.encoder, "lora")):
        with pytest.raises(ConfigError, match="already wrapped"):
            again()
    m.train()
    call(m, inputs).logits.sum().backward()
    _out(m, inputs)
    assert_bitwise_equal(snapshot(m.unwrap()), before)
    torch.testing.assert_close(_out(base, inputs), plain, rtol=0, atol=0)


# -- 2. caches follow dtype and device ----------------------------------------------------------------

@pytest.mark.parametrize("cast", ["bfloat16", "half", "double", "meta"])
def test_changing_dtype_or_device_after_inference(cast: str) -> None:
    arch = BY_NAME["gpt2"]
    inputs = arch.input()
    m = peftkit.wrap(arch.build(), "lora", r=4, init=False).eval()
    _out(m, inputs)  # fills the inference cache
    m = m.to("meta") if cast == "meta" else getattr(m, cast)() if cast in ("half", "double") else m.to(torch.bfloat16)
    out = _out(m, inputs)
    dtype = {"bfloat16": torch.bfloat16, "half": torch.float16, "double": torch.float64, "meta": torch.float32}[cast]
    assert out.dtype == dtype and out.device.type == ("meta" if cast == "meta" else "cpu")
    if cast == "double":  # the same adapted function, recomputed from the cast tensors
        fresh = peftkit.wrap(arch.build(), "lora", r=4, init=False).double().eval()
        fresh.load_state_dict(m.state_dict())
        torch.testing.assert_close(out, _out(fresh, inputs), rtol=0, atol=0)


# -- 3. tied weights --------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "target"), [("gpt2", "wte"), ("gpt2", "lm_head"), ("t5", "embed_tokens"), ("t5", "shared")])
def test_merging_lora_on_a_tied_weight_is_refused_up_front(arch: str, target: str) -> None:
    a = BY_NAME[arch]
    base, inputs = a.build(), a.input()
    before = snapshot(base)
    m = peftkit.wrap(base, "lora", r=4, targets=[target], init=False).eval()
    unmerged = _out(m, inputs)
    for merge in (m.merge, lambda: m.unwrap(merge=True)):
        with pytest.raises(MergeError, match="tied weights.*Nothing was merged"):
            merge()
        assert not m.merged
        assert_bitwise_equal(snapshot(base), before)
        torch.testing.assert_close(_out(m, inputs), unmerged, rtol=0, atol=0)


def test_fish_on_a_tied_parameter_changes_it_wherever_it_is_read_and_merges_exactly() -> None:
    a = BY_NAME["gpt2"]
    base, inputs = a.build(), a.input()
    mask = {"transformer.wte.weight": torch.arange(0, 2048, 7)}  # the embedding, tied to lm_head
    m = peftkit.wrap(base, "fish", mask=mask).eval()
    delta = m.peft_adapters["default"].adapters[0].weight_delta
    with torch.no_grad():
        delta.normal_()
    unmerged = _out(m, inputs)
    plain = a.build()
    with torch.no_grad():  # the parameter itself changed: both the lookup and the output layer see it
        plain.transformer.wte.weight.view(-1).index_add_(0, mask["transformer.wte.weight"], delta)
    torch.testing.assert_close(unmerged, _out(plain, inputs), rtol=1e-5, atol=1e-5)
    m.merge()
    torch.testing.assert_close(_out(m, inputs), unmerged, rtol=1e-5, atol=1e-5)
    m.unmerge()


# -- 4. nn.TransformerEncoder with a padding mask ---------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "serial_adapter", "parallel_adapter", "ia3"])
def test_identity_at_init_on_padded_positions_too(method: str) -> None:
    a = BY_NAME["padded_encoder"]
    base, (ids, padding) = a.build(), a.input()
    with torch.no_grad():
        encoded = base.encoder(base.embed(ids), src_key_padding_mask=padding)
        plain = base(ids, padding)
    assert torch.all(encoded[padding] == base.encoder.norm.bias)  # the packed path: zeros before the final norm
    m = peftkit.wrap(base, method).eval()
    for grad in (False, True):  # inference, and the training forms (eval mode with autograd)
        with torch.set_grad_enabled(grad):
            out = m(ids, padding)
        torch.testing.assert_close(out.detach(), plain, rtol=1e-5, atol=1e-5)
    assert base.encoder.use_nested_tensor and torch.backends.mha.get_fastpath_enabled()


# -- 5. the output layer ----------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "candidates"), [
    ("fasterrcnn", "roi_heads.box_predictor.cls_score, roi_heads.box_predictor.bbox_pred"),
    ("clip", ""), ("bert", ""), ("distilbert", "")])
def test_models_without_a_single_output_layer_refuse_head_and_last_layer(arch: str, candidates: str) -> None:
    base = BY_NAME[arch].build()
    flags = [p.requires_grad for p in base.parameters()]
    for method, options in (("lora", {"head": 5}), ("last_layer", {})):
        with pytest.raises(TargetError, match=f"has none: .*{candidates}"):
            peftkit.wrap(base, method, **options)
        assert [p.requires_grad for p in base.parameters()] == flags


def test_the_output_layer_comes_from_what_the_model_returns() -> None:
    clip = BY_NAME["clip"].build()
    paths = peftkit.wrap(clip, "lora").peft_adapters["default"].paths
    assert "text_projection" in paths and "visual_projection" in paths  # no output layer: projections adapted
    bert = BY_NAME["bert"]
    layers = peftkit.targets.output_layers(bert.build(), example_input=bert.input())
    assert layers.path is None and set(layers.candidates) == {"encoder.layer.1.output.LayerNorm", "pooler.dense"}
    for name, head in [("gpt2", "lm_head"), ("t5", "lm_head"), ("whisper", "proj_out"), ("bert_classifier", "classifier"),
                       ("hf_vit", "classifier"), ("timm_coatnet", "head.fc"), ("deeplabv3", "classifier.4")]:
        a = BY_NAME[name]
        assert peftkit.find_output_layer(a.build()) == head
        assert peftkit.find_output_layer(a.build(), example_input=a.input()) == head


def test_a_sequential_mlp_whose_first_layer_reads_the_last_ones_width_has_one_output_layer() -> None:
    # a Sequential's layers are chained, never side by side: Linear(128, 256) ... Linear(128, 4) are not twin heads
    mlp = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 4))
    assert peftkit.find_output_layer(mlp) == "4" == peftkit.find_output_layer(mlp, example_input=torch.randn(2, 128))
    assert peftkit.wrap(mlp, "last_layer").trainable_parameters() == 128 * 4 + 4
    nested = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 3)))
    assert peftkit.find_output_layer(nested) == "1.3"


def test_tracing_the_output_layer_leaves_the_backbone_as_it_was() -> None:
    net = BY_NAME["resnet18"].build().train()
    before = snapshot(net)
    assert peftkit.find_output_layer(net, example_input=torch.randn(2, 3, 32, 32)) == "fc"
    assert_bitwise_equal(snapshot(net), before)  # BatchNorm statistics did not move
    assert all(m.training for m in net.modules())


# -- 6. PEFT export ----------------------------------------------------------------------------------

def test_peft_export_of_a_new_head_says_how_to_load_it(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    a = BY_NAME["bert_classifier"]
    m = peftkit.wrap(a.build(), "lora", r=4, targets=["query", "value"], head=5, init=False).eval()
    expected = _out(m, a.input())
    with pytest.warns(UserWarning, match=r"model.classifier = nn.Linear\(32, 5\)"):
        out = peftkit.export_peft(m, tmp_path / "p")
    with pytest.raises(peftkit.errors.BackboneMismatchError, match="replace model.classifier first"):
        peftkit.import_peft(a.build(), out)
    base = a.build()
    base.classifier = nn.Linear(32, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    torch.testing.assert_close(_out(theirs, a.input()), expected, rtol=1e-5, atol=1e-5)


# -- 7. bottleneck adapters' defaults ---------------------------------------------------------------

@pytest.mark.parametrize(("arch", "first", "count"), [
    ("gpt2", ["transformer.h.0.attn", "transformer.h.0.mlp"], 4),
    ("t5", ["encoder.block.0.layer.0.SelfAttention", "encoder.block.0.layer.1.DenseReluDense"], 8),
    ("whisper", ["model.encoder.layers.0.self_attn", "model.encoder.layers.0.fc2"], 4),
    ("timm_mobilevitv2", ["stages.0.0", "stages.1.0"], 24),
    ("timm_coatnet", ["stages.0.blocks.0", "stages.0.blocks.1"], 25),
    ("mobilenet_v3_small", ["features.1", "features.2"], 11),
    ("efficientnet_b0", ["features.1.0", "features.2.0"], 16),
    ("convnext", ["features.1.0", "features.1.1"], 4),
    ("r3d", ["layer1.0", "layer2.0"], 4),
    ("lstm", ["rnn"], 1),
])
@pytest.mark.parametrize("method", ["serial_adapter", "parallel_adapter"])
def test_bottleneck_defaults_follow_the_blocks(arch: str, first: list[str], count: int, method: str) -> None:
    a = BY_NAME[arch]
    base = a.build()
    m = peftkit.wrap(base, method)
    paths = m.peft_adapters["default"].paths
    assert paths[:2] == first and len(paths) == count
    share = m.trainable_parameters() / sum(p.numel() for p in base.parameters())
    assert share < 0.04, f"{share:.1%} of the backbone"
    torch.testing.assert_close(_out(m.eval(), a.input()), _out(a.build(), a.input()), rtol=1e-5, atol=1e-5)


def test_convnext_tiny_adapters_stay_small() -> None:
    import torchvision

    net = torchvision.models.convnext_tiny()
    m = peftkit.wrap(net, "serial_adapter")
    assert m.trainable_parameters() / sum(p.numel() for p in net.parameters()) < 0.02  # was 6.9 M (25%)


def test_a_block_whose_sizes_are_not_its_projections_fails_clearly() -> None:
    class Concat(nn.Module):  # two branches side by side, concatenated: 2 x 4 features, not 4
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x), self.b(x)], -1)

    m = peftkit.wrap(nn.Sequential(nn.Linear(4, 4), Concat()), "serial_adapter", targets=["1"])
    with pytest.raises(TargetError, match="expects its output to hold 4 features.*target the layers inside"):
        m(torch.randn(2, 4))


# -- 8. messages ------------------------------------------------------------------------------------

def test_messages_that_used_to_mislead() -> None:
    r3d = BY_NAME["r3d"].build()
    assert len(peftkit.wrap(r3d, "serial_adapter", targets=nn.Conv3d).peft_adapters["default"].paths) > 10
    lstm = BY_NAME["lstm"].build()
    with pytest.raises(TargetError, match=r"cannot adapt: rnn \(LSTM\)\. Nothing inside them can be adapted either; "
                                          r"in RecurrentClassifier, 'ia3' can adapt: Linear \(e\.g\. head\)"):
        peftkit.wrap(lstm, "ia3", targets=["rnn"])
    with pytest.raises(TargetError, match="No module name is close to 'xyzzy'; the most common names"):
        peftkit.wrap(lstm, "lora", targets=["xyzzy"])
    with pytest.raises(TargetError, match="Nearest module names: rnn"):
        peftkit.wrap(lstm, "serial_adapter", targets=["rnnn"])
    t5 = BY_NAME["t5"]
    m = peftkit.wrap(t5.build(), "last_layer").train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # `shared` is never called, but lm_head's aliases are
        call(m, t5.input()).logits.sum().backward()


# -- found by a fresh-eyes review on architectures the tests above did not cover --------------------

def test_weight_normalised_layers_are_left_out_or_refused_clearly() -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm_param = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.norm_hook = nn.utils.weight_norm(nn.Linear(8, 8))
            self.plain = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.plain(torch.relu(self.norm_hook(torch.relu(self.norm_param(x))))))

    net, x = Net(), torch.randn(2, 8)
    plain = _out(net, x)
    m = peftkit.wrap(net, "lora", r=2)
    assert m.peft_adapters["default"].paths == ["plain"]
    torch.testing.assert_close(_out(m, x), plain)
    m.unwrap()
    for target in ("norm_param", "norm_hook"):
        with pytest.raises(TargetError, match="computed from other tensors on every call"):
            peftkit.wrap(net, "lora", targets=[target])
    assert not any(n.endswith(("original0", "original1", "weight_g", "weight_v"))
                   for n in peftkit.fisher.candidate_names(net, None))


def test_a_module_called_under_two_names() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    net, x = Twice(), torch.randn(4, 8)
    weight = net.a.weight
    peftkit.fisher_information(net, [x], lambda mod, b: mod(b).pow(2).mean(), samples=4, vectorize=True)
    assert net.a.weight is weight and type(net.a.weight) is nn.Parameter  # torch.func left a wrapper here once
    m = peftkit.wrap(net, "fish", keep=0.1, samples=4, data=[x], loss_fn=lambda mod, b: mod(b).pow(2).mean())
    assert net.a.weight is weight
    m.unwrap()
    m = peftkit.wrap(net, "lora", r=2, init=False).eval()
    unmerged = _out(m, x)
    m.merge()  # one module, two names: one reader of its weight, so merging is exact
    torch.testing.assert_close(_out(m, x), unmerged, rtol=1e-5, atol=1e-6)
    m.unmerge()
    with pytest.raises(ConfigError, match="also called as 'b'"):
        peftkit.export_peft(m, "/nonexistent/never-written")


def test_fish_runs_on_the_meta_device() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    m = peftkit.wrap(net, "fish", mask={"0.weight": torch.tensor([1, 5, 9])}).to("meta")
    assert m(torch.randn(2, 8, device="meta")).shape == (2, 3)


@pytest.mark.parametrize("builder", ["retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large", "keypointrcnn_resnet50_fpn",
                                     "fcos_resnet50_fpn"])
def test_detection_models_have_no_single_output_layer(builder: str) -> None:
    import torchvision

    model = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None, num_classes=3)
    layers = peftkit.targets.output_layers(model)
    assert layers.path is None and len(layers.candidates) >= 2
    with pytest.raises(TargetError, match="detection model"):
        peftkit.wrap(model, "last_layer")


@pytest.mark.parametrize(("name", "size"), [("shufflenet_v2_x0_5", 64), ("densenet121", 64), ("squeezenet1_1", 64),
                                             ("maxvit_t", 224), ("regnet_x_400mf", 64), ("googlenet", 64)])
@pytest.mark.parametrize("method", ["serial_adapter", "parallel_adapter"])
def test_bottleneck_defaults_run_on_concatenating_and_mixed_blocks(name: str, size: int, method: str) -> None:
    import torchvision

    kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, num_classes=5, **kw).eval()
    x = torch.randn(1, 3, size, size)
    plain = _out(net, x)
    m = peftkit.wrap(net, method, init="houlsby").eval()  # a visible adapter: its shapes must fit
    assert _out(m, x).shape == plain.shape
    m.train()
    m(x).sum().backward()


def test_target_messages_for_parameters_and_containers() -> None:
    import torchvision

    net = torchvision.models.resnet18()
    with pytest.raises(TargetError, match="'fc.weight' is a parameter, and 'serial_adapter' selects modules; select 'fc'"):
        peftkit.wrap(net, "serial_adapter", targets=["fc.weight"])
    assert peftkit.wrap(net, "lora", targets=["fc.weight"]).unwrap() is net  # LoRA adapts parameters too
    with pytest.raises(TargetError, match=r"downsample \(Sequential\), none of which 'lora' can adapt; select the layers "
                                          r"inside them, e.g. layer2.0.downsample.0"):
        peftkit.wrap(net, "lora", targets=r"layer2\.0\.downsample")


def test_writes_through_data_need_clear_cache() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    m = peftkit.wrap(net, "lora", r=2, init=False).eval()
    x = torch.randn(2, 8)
    _out(m, x)  # fills the inference cache
    net[0].weight.data.copy_(net[0].weight.data * 1.5)  # bypasses PyTorch's version counter
    m.clear_cache()
    torch.testing.assert_close(_out(m, x), m(x).detach())  # cached form == the form computed from live weights
