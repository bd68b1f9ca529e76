"""DDP and FSDP2 with 2 CPU processes (torchrun, gloo) against one process, plus the single-process
parts of ``peftkit.distributed``: meta-device models, DDP-readiness, errors.

The 2-process runs live in ``distributed_worker.py``; one torchrun launch runs every scenario.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
import peftkit.distributed as pdist
from peftkit.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402
from conftest import assert_bitwise_equal  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The single-process reference (in this process) and one torchrun launch of every 2-process run."""
    ref = tmp_path_factory.mktemp("single")
    out = tmp_path_factory.mktemp("two")
    facts = {m: worker.train(m, "single", ref) for m in (*worker.METHODS, *(["qlora"] if worker.QLORA else []))}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "distributed_worker.py"), str(out), str(ref)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    reports = [json.loads((out / f"report-{r}.json").read_text()) for r in range(2)]
    return {"ref": ref, "out": out, "single": facts, "reports": reports}


@pytest.mark.parametrize("method", worker.METHODS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_like_one(runs: dict[str, Any], method: str, mode: str) -> None:
    ref = torch.load(runs["ref"] / f"{method}-single.pt")
    got = torch.load(runs["out"] / f"{method}-{mode}.pt")
    assert got.keys() == ref.keys()
    for k in ref:
        if ref[k].is_floating_point():
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)
        else:  # FISH positions: every rank selected the same mask as the single process
            assert torch.equal(got[k], ref[k]), k
    trained = [k for k in ref if k.endswith(("_delta", "lora_B", "up.weight"))]
    assert any(ref[k].abs().sum() > 0 for k in trained), "the adapters did not train at all"


@pytest.mark.parametrize("method", worker.METHODS)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_saved_file_is_what_one_process_writes(runs: dict[str, Any], method: str, mode: str, tmp_path: Path) -> None:
    file = runs["out"] / f"{method}-{mode}.safetensors"
    single = peftkit.read_header(runs["ref"] / f"{method}-single.safetensors")
    header = peftkit.read_header(file)
    assert header.metadata == single.metadata  # same targets, shapes, fingerprint (with values for FISH)
    assert header.tensors == single.tensors
    # the same weights saved by one process give the same bytes
    again = peftkit.save(peftkit.load(worker.backbone(), file), tmp_path / "again.safetensors")
    assert again.read_bytes() == file.read_bytes()


@pytest.mark.skipif(not worker.QLORA, reason="needs torchao")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_qlora_on_an_nf4_backbone_trains_like_one_process(runs: dict[str, Any], mode: str) -> None:
    """FSDP2 shards torchao's NF4 weights (NF4Tensor implements its all-gather), DDP leaves them alone."""
    ref = torch.load(runs["ref"] / "qlora-single.pt")
    got = torch.load(runs["out"] / f"qlora-{mode}.pt")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)
    assert any(ref[k].abs().sum() > 0 for k in ref if k.endswith("lora_B"))
    # every NF4 weight, gathered by FSDP2 or whole, went through peftkit's NF4Linear, none through torchao's
    # whole-layer dequantization: 4 layers x 5 steps, forward and backward (the first layer's input needs no gradient)
    for facts in (runs["single"]["qlora"], *(r[f"qlora-{mode}"] for r in runs["reports"])):
        assert facts["dequantizations"] == {"peftkit": 4 * 5 + 3 * 5, "torchao": 0}
    assert peftkit.read_header(runs["out"] / f"qlora-{mode}.safetensors").metadata == peftkit.read_header(
        runs["ref"] / "qlora-single.safetensors").metadata


@pytest.mark.parametrize(("backend", "scheme", "kind"), [("bitsandbytes", "nf4", "bnb-nf4"),
                                                         ("bitsandbytes", "int8", "bnb-int8"),
                                                         ("torchao", "int8", "int8")])
def test_shard_refuses_quantized_weights_fsdp2_cannot_shard(backend: str, scheme: str, kind: str) -> None:
    pytest.importorskip(backend)
    torch.manual_seed(0)
    model = peftkit.quantize(worker.Net(d=128), scheme, [r"blocks\..*"], backend=backend)
    m = peftkit.wrap(model, "lora", r=2, targets=["fc1"])
    with pytest.raises(ConfigError, match=rf"FSDP2 cannot shard blocks\.0\.fc1\.weight \({kind}\).*nf4.*DDP"):
        pdist.shard(m)
    assert not m.sharded


def test_fsdp_groups_each_adapter_with_its_block(runs: dict[str, Any]) -> None:
    groups = runs["reports"][0]["lora-fsdp"]["groups"]
    for i in (0, 1):
        names = groups[f"blocks.{i}"]
        assert f"base_model.blocks.{i}.fc1.weight" in names
        adapters = [n for n in names if n.startswith("peft_adapters.")]
        assert len(adapters) == 4  # lora_A and lora_B of fc1 and fc2 of this block
    assert not set(groups["blocks.0"]) & set(groups["blocks.1"])
    # a module trained whole inside a block (its copy) and the adapters there join that block's group
    serial = runs["reports"][0]["serial-fsdp"]["groups"]["blocks.1"]
    assert sum(n.startswith("peft_adapters.default.copies.") for n in serial) == 2  # fc1's weight and bias
    assert any(n.startswith("peft_adapters.default.adapters.") for n in serial)


@pytest.mark.parametrize("method", worker.METHODS)
def test_only_trainable_gradients_are_communicated(runs: dict[str, Any], method: str) -> None:
    report = runs["reports"][0]
    trainable = report[f"{method}-ddp"]["trainable"]
    assert report[f"{method}-ddp"]["grad_bytes_per_step"] == 4 * trainable
    # FSDP2 pads each gradient to a multiple of the world size before the reduce-scatter
    fsdp = report[f"{method}-fsdp"]["grad_bytes_per_step"]
    assert 4 * trainable <= fsdp <= 4 * (trainable + 2 * 16)
    assert report["full-ddp"]["grad_bytes_per_step"] == 4 * sum(p.numel() for p in worker.backbone().parameters())


@pytest.mark.parametrize("method", worker.METHODS)
def test_loading_on_sharded_models(runs: dict[str, Any], method: str) -> None:
    x, _ = worker.batch()
    with torch.no_grad():
        want = peftkit.load(worker.backbone(), runs["ref"] / f"{method}-single.safetensors")(x)
    for rank, report in enumerate(runs["reports"]):
        loading = report[f"{method}-loading"]
        torch.testing.assert_close(torch.tensor(loading["loaded_then_sharded"]), want, msg=f"rank {rank}")
        torch.testing.assert_close(torch.tensor(loading["hotswapped"]), want, msg=f"rank {rank}")
    # each rank holds its own half (dim 0) of every sharded adapter tensor
    full = torch.load(runs["ref"] / f"{method}-single.pt")
    for rank, report in enumerate(runs["reports"]):
        for key, (shape, head) in report[f"{method}-loading"]["shards"].items():
            parts = full[key].chunk(2)  # FSDP2 shards dim 0 as torch.chunk does
            part = parts[rank] if rank < len(parts) else full[key][:0]
            assert list(part.shape) == shape, key
            torch.testing.assert_close(torch.tensor(head), part.flatten()[:3].float(), msg=key)


# -- single process ---------------------------------------------------------------------------------

def test_shard_refuses_without_a_process_group() -> None:
    m = peftkit.wrap(worker.backbone(), "lora", r=2, targets=["fc1"])
    with pytest.raises(ConfigError, match="init_process_group"):
        pdist.shard(m)
    with pytest.raises(ConfigError, match="AdaptedModel"):
        pdist.shard(worker.backbone())


def test_ddp_skips_integer_adapter_buffers() -> None:
    x, y = worker.batch()
    m = peftkit.wrap(worker.backbone(), "fish", keep=0.1, data=[(x, y)], samples=16)
    ignored = m._ddp_params_and_buffers_to_ignore
    assert ignored and all(n.startswith("peft_adapters.") and n.endswith("_index") for n in ignored)
    buffers = dict(m.named_buffers())
    assert all(buffers[n].dtype == torch.int16 for n in ignored)


def test_helpers_without_a_process_group() -> None:
    assert (pdist.rank(), pdist.world_size()) == (0, 1)
    t = torch.ones(3)
    pdist.all_reduce_sum([t])
    assert torch.equal(t, torch.ones(3))
    m = peftkit.wrap(worker.backbone(), "lora", r=2, targets=["fc1"])
    assert not pdist.is_sharded(m) and pdist.full_tensor(t) is t
    assert pdist.original_class(m.base_model.inp) is nn.Linear
    assert pdist.unwrap_parallel(nn.DataParallel(m)) is m


def test_meta_device_wrap_materialises_nothing_then_loads(tmp_path: Path) -> None:
    x, _ = worker.batch()
    trained = peftkit.wrap(worker.backbone(), "lora", r=2, targets=["fc1", "fc2"], train=["head"])
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        want = trained(x)
    file = peftkit.save(trained, tmp_path / "a.safetensors")
    weights = worker.backbone().state_dict()

    with torch.device("meta"):
        big = worker.Net()
    m = peftkit.wrap(big, "lora", r=2, targets=["fc1", "fc2"], train=["head"])
    assert all(t.is_meta for t in m.parameters()) and all(t.is_meta for t in m.buffers())
    m.to_empty(device="cpu")  # memory for the real weights, once
    m.base_model.load_state_dict(weights)
    name = m.load_adapter(file, name="task")
    m.set_adapter(name)
    with torch.no_grad():
        torch.testing.assert_close(m(x), want)
    m.hotswap(file, adapter="default")  # the adapter wrapped on meta gets real values too
    m.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(m(x), want)


def test_meta_device_wrap_then_reset_to_train_a_new_adapter() -> None:
    x, _ = worker.batch()
    plain = worker.backbone()
    with torch.device("meta"):
        m = peftkit.wrap(worker.Net(), "lora", r=2, targets=["fc1", "fc2"], train=["head"])
    m.to_empty(device="cpu")
    m.base_model.load_state_dict(plain.state_dict())
    assert m.reset_adapter() == "default"
    adapters = m.peft_adapters["default"]
    assert all(torch.isfinite(t).all() for t in adapters.file_tensors().values())
    torch.testing.assert_close(adapters.file_tensors()["head.weight"], plain.head.weight)
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x))  # LoRA starts as the identity
    assert any(t.abs().sum() > 0 for k, t in adapters.file_tensors().items() if k.endswith("lora_A"))


def test_reset_of_a_loaded_fish_adapter_keeps_its_positions(tmp_path: Path) -> None:
    x, y = worker.batch()
    m = peftkit.wrap(worker.backbone(), "fish", keep=0.1, data=[(x, y)], samples=16)
    def positions_of(model: peftkit.AdaptedModel) -> dict[str, torch.Tensor]:
        return {k: t.clone() for k, t in model.peft_adapters["default"].file_tensors().items() if k.endswith("_index")}

    positions = positions_of(m)
    with torch.no_grad():
        for p in m.peft_adapters["default"].parameters():
            p.add_(1.0)
    assert m.reset_adapter() == "default"  # wrapped: rebuilt from its plan, positions included
    assert_bitwise_equal(positions_of(m), positions)
    assert all(torch.count_nonzero(p) == 0 for p in m.peft_adapters["default"].parameters())
    with torch.no_grad():
        for p in m.peft_adapters["default"].parameters():
            p.add_(1.0)
    loaded = peftkit.load(worker.backbone(), peftkit.save(m, tmp_path / "f.safetensors")).eval()
    loaded.reset_adapter()  # loaded: the file's plan has no positions, so the file's stay
    assert_bitwise_equal(positions_of(loaded), positions)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), worker.backbone().eval()(x), rtol=0, atol=0)  # the identity again


def test_sharded_models_refuse_changes_to_the_adapter_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = peftkit.wrap(worker.backbone(), "lora", r=2, targets=["fc1"])
    file = peftkit.save(m, tmp_path / "a.safetensors")
    # what shard() makes true (its tensors become DTensors); the checks need no process group
    monkeypatch.setattr(peftkit.AdaptedModel, "sharded", property(lambda self: True))
    for call in (lambda: m.add_adapter("b", "lora", r=2, targets=["fc1"]), lambda: m.load_adapter(file, name="b"),
                 lambda: m.delete_adapter("default"), m.merge):
        with pytest.raises(ConfigError, match="before sharding; to swap an adapter's weights on a sharded model use hotswap"):
            call()
    assert m.hotswap(file) == "default" and m.adapter_names == ["default"]
    assert peftkit.load(m, file) is m and m.adapter_names == ["default"]  # a held name: swapped in place


def test_shard_names_scalar_adapter_parameters() -> None:
    m = peftkit.wrap(worker.backbone(), "serial_adapter", scale="learned", targets=["fc2"])
    assert all(p.dim() >= 1 for p in m.parameters())  # the built-ins hold scalars as shape (1,)
    m.peft_adapters["default"].adapters[0].learned_scale = nn.Parameter(torch.ones(()))
    with pytest.raises(peftkit.errors.PluginError, match=r"0-dim parameters.*learned_scale.*shape \(1,\)"):
        pdist.shard(m)


def test_shard_refuses_merged_resharded_and_blockless_models(monkeypatch: pytest.MonkeyPatch) -> None:
    m = peftkit.wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), "lora", r=2, targets=["0"])
    m.merge()
    with pytest.raises(peftkit.errors.MergeError, match="unmerge"):
        pdist.shard(m)
    m.unmerge()
    with pytest.raises(ConfigError, match="no block with parameters.*pass blocks="):
        pdist.shard(m, blocks=[nn.ReLU])
    monkeypatch.setattr(peftkit.AdaptedModel, "sharded", property(lambda self: True))
    with pytest.raises(ConfigError, match="already sharded"):
        pdist.shard(m)
