"""``peftkit train`` / ``peftkit predict`` end to end on a generated ImageFolder, and their misuse."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import peftkit
from peftkit import classify
from peftkit.cli import main
from peftkit.errors import AdapterFileError, ConfigError, UnknownMethodError

COLOURS = {"ants": (200, 40, 40), "bees": (40, 40, 200), "wasps": (40, 200, 40)}


def _draw(folder: Path, colour: tuple[int, int, int], n: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = (rng.random((40, 40, 3)) * 60).astype("uint8")
        y, x = rng.integers(4, 16, 2)
        pixels[y:y + 20, x:x + 20] = colour
        Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ folders of three classes of coloured squares on noise."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        _draw(root / "train" / name, colour, 12, rng)
        _draw(root / "val" / name, colour, 4, rng)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 weights with BatchNorm statistics of real activations (as pretrained weights have)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path


def test_train_then_predict_from_the_command_line(images: Path, weights: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "colours.safetensors"
    argv = ["train", "--data", str(images), "--model", "resnet18", "--weights", str(weights), "--method", "lora",
            "--r", "4", "--alpha", "8", "--epochs", "4", "--image-size", "32", "--batch-size", "12", "--lr", "3e-3",
            "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "resnet18 + lora" in printed and "epoch 4/4" in printed and "val accuracy" in printed
    assert out.with_suffix(".png").stat().st_size > 1000
    header = peftkit.read_header(out)
    assert header.method == "lora" and header.config["r"] == 4 and header.config["alpha"] == 8
    meta = header.user_metadata
    assert json.loads(meta["train.classes"]) == sorted(COLOURS) and meta["train.model"] == "resnet18"
    assert meta["train.image_size"] == "32" and float(meta["train.val_accuracy"]) >= 0.75  # chance: 1/3
    assert all(k.startswith("train.") for k in meta)

    csv_path = tmp_path / "predictions.csv"
    assert main(["predict", "--adapter", str(out), "--weights", str(weights), "--data", str(images / "val"),
                 "--out", str(csv_path)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 12 and {r["label"] for r in rows} == set(COLOURS)
    accuracy = sum(r["predicted"] == r["label"] for r in rows) / len(rows)
    # predict rebuilds the backbone and applies the same evaluation transform: the accuracy train saved
    assert accuracy == pytest.approx(float(meta["train.val_accuracy"]))
    assert f"accuracy {accuracy:.1%}" in capsys.readouterr().err
    # one image; then images in a folder not named after a class: no labels, no accuracy
    assert main(["predict", "--adapter", str(out), "--weights", str(weights),
                 "--data", str(images / "val" / "bees" / "1.png")]) == 0
    line = capsys.readouterr().out.splitlines()[1].split(",")
    assert line[1] in COLOURS and line[3] == "bees"
    unlabelled = tmp_path / "photos"
    _draw(unlabelled, COLOURS["wasps"], 2, np.random.default_rng(1))
    assert main(["predict", "--adapter", str(out), "--weights", str(weights), "--data", str(unlabelled)]) == 0
    captured = capsys.readouterr()
    assert [r.split(",")[3] for r in captured.out.splitlines()[1:]] == ["", ""]
    assert "accuracy" not in captured.err


def test_python_api_split_folders_timm_and_fish(images: Path, tmp_path: Path) -> None:
    """Class folders without val/ are split per class; a timm model; FISH gets the training data."""
    flat = images / "train"
    result = classify.train(flat, tmp_path / "timm.safetensors", model="timm:test_resnet", method="last_layer",
                            epochs=1, image_size=32, batch_size=8, plot=False, log=lambda _: None)
    assert result.classes == sorted(COLOURS) and result.best_epoch == 1 and len(result.history) == 1
    assert int(result.confusion.sum()) == 3 * 2  # 20% of 12 images per class, held out
    assert result.trainable < result.total
    fish = classify.train(flat, tmp_path / "fish.safetensors", method="fish", options={"keep": 0.001, "samples": 8},
                          epochs=1, image_size=32, batch_size=8, max_steps=1, plot=False, log=lambda _: None)
    assert peftkit.read_header(fish.adapter).method == "fish"


def test_method_options_take_the_configs_types() -> None:
    opts = classify.method_options("lora", ["--r", "8", "--alpha=16", "--dropout", "0.1", "--targets", "layer3,layer4"])
    assert opts == {"r": 8, "alpha": 16.0, "dropout": 0.1, "targets": ["layer3", "layer4"]}
    assert classify.method_options("fish", ["--candidates", "layer4", "--keep", "0.01"]) == {
        "candidates": ["layer4"], "keep": 0.01}
    with pytest.raises(ConfigError, match=r"no option --rank .*--r\b"):
        classify.method_options("lora", ["--rank", "8"])
    with pytest.raises(ConfigError, match="--r 'eight' is not a valid int"):
        classify.method_options("lora", ["--r", "eight"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        classify.method_options("lora", ["stray"])
    with pytest.raises(ConfigError, match="--r needs a value"):
        classify.method_options("lora", ["--r", "--alpha", "4"])
    assert classify.method_options("lora", ["--rslora", "--r", "2"]) == {"rslora": True, "r": 2}
    with pytest.raises(UnknownMethodError, match="lorra"):
        classify.method_options("lorra", [])


def test_misuse_is_refused_with_the_fix(images: Path, weights: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        classify.build_backbone("resnet-18")
    with pytest.raises(ConfigError, match="are not resnet34's"):
        classify.build_backbone("resnet34", weights)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        classify.build_backbone("resnet18", bad)
    with pytest.raises(ConfigError, match="is not a folder"):
        classify.train(tmp_path / "nowhere", tmp_path / "x.safetensors")
    one = tmp_path / "one"
    _draw(one / "ants", COLOURS["ants"], 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="at least two"):
        classify.train(one, tmp_path / "x.safetensors", image_size=32)
    with pytest.raises(ConfigError, match="head='keep'"):
        classify.train(images, tmp_path / "x.safetensors", head="keep", image_size=32, log=lambda _: None)
    for bad, match in (({"out": tmp_path / "x.png"}, "safetensors name"), ({"out": tmp_path}, "safetensors name"),
                       ({"max_steps": 0}, "max_steps"), ({"image_size": -3}, "image_size"), ({"image_size": 0}, "image_size"),
                       ({"lr": 0.0}, "lr=0.0"), ({"lr": -1.0}, "lr=-1.0"), ({"epochs": 0}, "epochs")):
        with pytest.raises(ConfigError, match=match):
            classify.train(images, **{"out": tmp_path / "x.safetensors", "image_size": 32, **bad})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="leaves 0 images for training"):
        classify.train(images / "train", tmp_path / "x.safetensors", val_fraction=0.99, image_size=32)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.png").exists()

    out = tmp_path / "a.safetensors"
    classify.train(images, out, weights=weights, method="last_layer", epochs=1, image_size=32, max_steps=1,
                   plot=False, log=lambda _: None)
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(ConfigError, match="not the ones"):
        classify.predict(out, images / "val", weights=other)
    with pytest.raises(ConfigError, match="pass that file with --weights"):
        classify.predict(out, images / "val")
    # the same tensors re-saved (another container, a wrapping dict) are the same weights
    copy = tmp_path / "copy.pth"
    torch.save({"state_dict": dict(reversed(list(torch.load(weights, weights_only=True).items())))}, copy)
    assert len(classify.predict(out, images / "val", weights=copy)) == 12
    with pytest.raises(ConfigError, match="does not exist"):
        classify.predict(out, tmp_path / "nowhere", weights=weights)
    with pytest.raises(ConfigError, match="batch_size"):
        classify.predict(out, images / "val", weights=weights, batch_size=0)
    broken = tmp_path / "broken"
    shutil.copytree(images / "val", broken)
    (broken / "bees" / "bad.jpg").write_text("not an image")
    with pytest.raises(ConfigError, match=r"bad\.jpg' is not a readable image"):
        classify.predict(out, broken, weights=weights)
    with pytest.raises(ConfigError, match=r"bad\.jpg' is not a readable image"):
        classify.train(broken, tmp_path / "b.safetensors", epochs=1, image_size=32, plot=False, log=lambda _: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        classify.predict(out, tmp_path / "empty", weights=weights)
    plain = peftkit.save(peftkit.wrap(torchvision.models.resnet18(), "lora", r=2), tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match="not written by `peftkit train`"):
        classify.predict(plain, images / "val")
    # the command line says it in one line, exit status 2; unknown options are named
    assert main(["train", "--data", str(images), "--out", str(out), "--method", "lora", "--rank", "4"]) == 2
    assert "did you mean --r" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["methods", "--r", "4"])  # only train takes method options


def test_save_metadata_round_trips_and_reserved_keys_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = peftkit.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), "lora", r=2)
    path = peftkit.save(m, tmp_path / "a.safetensors", metadata={"task": "demo", "labels": '["a","b"]'})
    assert peftkit.read_header(path).user_metadata == {"task": "demo", "labels": '["a","b"]'}
    for bad, match in (({"peftkit.method": "x"}, "reserved"), ({"n": 3}, "strings"), ({"": "x"}, "reserved or empty"),
                       ({"big": "x" * (1 << 21)}, "bounded")):
        with pytest.raises(ConfigError, match=match):
            peftkit.save(m, tmp_path / "b.safetensors", metadata=bad)  # type: ignore[dict-item]
        assert not (tmp_path / "b.safetensors").exists()
    again = peftkit.load(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), path)
    assert again.adapter_names == ["default"]
    with pytest.raises(AdapterFileError):
        classify.predict(tmp_path / "missing.safetensors", tmp_path)
