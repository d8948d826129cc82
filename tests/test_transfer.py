"""``python -m or_core transfer``: a linear probe of a trained run's frozen encoder on data sets
laid out as torchvision reads them (DTD, Food-101), built from real CIFAR-10 images; nothing is
downloaded (``--no-download``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli
from or_core.config import resolve_config
from or_core.transfer import TRANSFER_SETS, load_transfer_split
from or_core.train import pretrain

#: CIFAR-10 classes used as texture / food classes, and images per official split.
CLASSES = ("airplane", "frog", "truck")
PER_SPLIT = {"train": 6, "val": 3, "test": 4}


@pytest.fixture(scope="module")
def trained_run(cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of ci-scale BYOL + SO on 256 CIFAR-10 images (32 px), evaluation shrunk."""
    cfg = resolve_config("ci", overrides={
        "dataset": "cifar10", "data_root": str(cifar10_dir.parent), "regularizer": "so", "epochs": 1,
        "subset": 256, "batch_size": 128, "eval_train_subset": 100, "eval_test_subset": 50, "val_images": 0,
        "linear_epochs": 1,
    })
    out = tmp_path_factory.mktemp("transfer") / "run"
    pretrain(cfg, out, show_progress=False)
    return out


def _cifar_files(cifar10_dir: Path) -> dict[str, list[Path]]:
    n = sum(PER_SPLIT.values())
    return {c: sorted((cifar10_dir / "train" / c).iterdir())[:n] for c in CLASSES}


def _by_split(files: list[Path]) -> dict[str, list[Path]]:
    out, start = {}, 0
    for split, n in PER_SPLIT.items():
        out[split], start = files[start : start + n], start + n
    return out


@pytest.fixture
def dtd_root(cifar10_dir: Path, tmp_path: Path) -> Path:
    """``<root>/dtd/dtd/images/<class>/<name>.jpg`` and ``labels/{train,val,test}1.txt``."""
    root = tmp_path / "data"
    data = root / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True)
    lines = {split: [] for split in PER_SPLIT}
    for cls, files in _cifar_files(cifar10_dir).items():
        (data / "images" / cls).mkdir(parents=True)
        for split, chunk in _by_split(files).items():
            for f in chunk:
                name = f"{cls}_{f.stem}.jpg"  # PIL reads a PNG by its content, whatever the suffix
                (data / "images" / cls / name).symlink_to(f)
                lines[split].append(f"{cls}/{name}")
    for split, entries in lines.items():
        (data / "labels" / f"{split}1.txt").write_text("\n".join(entries) + "\n")
    return root


@pytest.fixture
def food_root(cifar10_dir: Path, tmp_path: Path) -> Path:
    """``<root>/food-101/images/<class>/<id>.jpg`` and ``meta/{train,test}.json``."""
    root = tmp_path / "data"
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    meta = {"train": {}, "test": {}}
    for cls, files in _cifar_files(cifar10_dir).items():
        (base / "images" / cls).mkdir(parents=True)
        for split, chunk in _by_split(files).items():
            target = "test" if split == "test" else "train"  # Food-101 has no val split
            for f in chunk:
                (base / "images" / cls / f"{f.stem}.jpg").symlink_to(f)
                meta[target].setdefault(cls, []).append(f"{cls}/{f.stem}")
    for split, classes in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(classes))
    return root


def test_every_transfer_set_of_table_5_is_offered() -> None:
    assert {"food101", "flowers102", "dtd", "gtsrb", "stl10", "cifar10", "cifar100"} <= set(TRANSFER_SETS)


def test_dtd_split_reads_the_official_split_files_pixel_for_pixel(dtd_root: Path, cifar10_dir: Path) -> None:
    train, classes = load_transfer_split("dtd", True, 32, dtd_root, download=False)
    test, _ = load_transfer_split("dtd", False, 32, dtd_root, download=False)
    assert classes == len(CLASSES)
    assert len(train) == len(CLASSES) * (PER_SPLIT["train"] + PER_SPLIT["val"])  # train + val
    assert len(test) == len(CLASSES) * PER_SPLIT["test"]
    # 32 px images stay as they are: the test split's first image is its CIFAR file, its label
    # the index of its class among the sorted class names.
    image, label = test[0]
    first = _by_split(_cifar_files(cifar10_dir)[CLASSES[0]])["test"][0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image, torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1))
    assert label == sorted(CLASSES).index(CLASSES[0])
    # Resized to another side: shorter side and center crop.
    assert load_transfer_split("dtd", False, 20, dtd_root, download=False)[0][0][0].shape == (3, 20, 20)


@pytest.mark.parametrize("dataset", ["dtd", "food101"])
def test_transfer_command_writes_a_record(trained_run: Path, dataset: str, request, capsys) -> None:
    root = request.getfixturevalue("dtd_root" if dataset == "dtd" else "food_root")
    code, out, err = run_cli(
        capsys, "transfer", trained_run, "--dataset", dataset, "--data-root", root, "--no-download",
        "--epochs", 30, "--device", "cpu",
    )
    assert code == 0, err
    record = json.loads((trained_run / "transfer" / f"{dataset}.json").read_text())
    assert json.loads(out) == record
    n_train = PER_SPLIT["train"] + PER_SPLIT["val"]
    assert (record["train_images"], record["test_images"]) == (3 * n_train, 3 * PER_SPLIT["test"])
    assert record["num_classes"] == 3 and record["transfer_dataset"] == dataset
    assert record["image_size"] == record["training_image_size"] == 32  # the run's CIFAR size
    assert record["regularizer"] == "so" and record["method"] == "byol"
    assert record["feature_dim"] == 64  # ResNet-18 at width 0.125
    assert 0.0 <= record["linear_top1"] <= record["linear_top5"] <= 1.0


def test_probe_on_features_of_its_own_training_images_fits_them(trained_run: Path, dtd_root: Path, capsys) -> None:
    """Test split = training split: 27 images in 64 dimensions are linearly separable, so a
    probe that pairs each feature with its image's label reaches 100% (a label or order mix-up
    between images and features would not)."""
    labels = dtd_root / "dtd" / "dtd" / "labels"
    (labels / "test1.txt").write_text((labels / "train1.txt").read_text() + (labels / "val1.txt").read_text())
    code, out, err = run_cli(
        capsys, "transfer", trained_run, "--dataset", "dtd", "--data-root", dtd_root, "--no-download",
        "--epochs", 200, "--device", "cpu", "--record", dtd_root / "record.json",
    )
    assert code == 0, err
    assert json.loads(out)["linear_top1"] == 1.0


def test_missing_data_set_is_one_line_naming_the_layout(trained_run: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(
        capsys, "transfer", trained_run, "--dataset", "dtd", "--data-root", tmp_path / "empty", "--no-download",
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'empty'}/dtd/dtd/images/<class>/<name>.jpg" in err


def test_unreachable_download_is_one_line_naming_the_layout(trained_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import urllib.error

    import torchvision.datasets.food101 as food101

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(food101, "download_and_extract_archive", offline)
    code, _, err = run_cli(capsys, "transfer", trained_run, "--dataset", "food101", "--data-root", tmp_path / "d")
    assert code == 2 and err.count("\n") == 1
    assert "could not download" in err and "name resolution" in err
    assert f"{tmp_path / 'd'}/food-101/images/<class>/<id>.jpg" in err


def test_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "transfer", tmp_path, "--dataset", "imagenet")
    assert code == 2 and "invalid choice: 'imagenet'" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "transfer", tmp_path / "nope", "--dataset", "dtd")
    assert code == 2 and "run directory not found" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "transfer", tmp_path, "--dataset", "dtd")
    assert code == 2 and "has no checkpoint.pt" in err and err.count("\n") == 1
