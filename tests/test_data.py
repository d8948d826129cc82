"""Data: archive extraction, dataset resolution, the uint8 tensor cache, streaming, batches.

Runs on the real CIFAR-10 and Imagenette-64 of ``../shared/datasets`` (see ``conftest.py``).
"""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import or_core.data as data
from or_core.data import (
    CorruptImageError,
    DataError,
    ImageTensors,
    balanced_subset,
    batches,
    decode_image,
    extract_archive,
    load_split,
    resolve_dataset,
    streaming_loader,
)

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def _pil_pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def _copy_tree(source: Path, target: Path, per_class: int = 4, classes: int = 3) -> Path:
    """A small ImageFolder copy ``target/{train,test}/<class>/`` of ``source``'s test split."""
    for split in ("train", "test"):
        for class_dir in sorted((source / "test").iterdir())[:classes]:
            (target / split / class_dir.name).mkdir(parents=True)
            for file in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(file, target / split / class_dir.name / file.name)
    return target


@pytest.fixture(scope="module")
def cifar_subset(cifar10_dir: Path, tmp_path_factory) -> tuple[ImageTensors, Path]:
    cache = tmp_path_factory.mktemp("tensor-cache")
    return load_split(cifar10_dir, "test", subset=1000, seed=0, cache_dir=cache), cache


# ----------------------------------------------------------------------------------------------
# Archives
# ----------------------------------------------------------------------------------------------
def test_extract_archive_is_idempotent(shared_datasets_dir: Path, cifar10_dir: Path):
    again = extract_archive(shared_datasets_dir / "cifar10.tar.gz", cifar10_dir.parent)
    assert again == cifar10_dir and again.name == "cifar10"
    for split in ("train", "test"):
        assert sorted(p.name for p in (again / split).iterdir()) == CIFAR10_CLASSES
    assert (cifar10_dir.parent / "cifar10.tar.gz.extracted").is_file()


def test_a_copy_of_an_extracted_archive_is_not_extracted_again(shared_datasets_dir: Path, cifar10_dir: Path, tmp_path: Path):
    """Another path and mtime, same content: the tree in use is left alone (a re-extraction
    once swapped it out under a running job)."""
    copy = tmp_path / "cifar10.tar.gz"
    shutil.copyfile(shared_datasets_dir / "cifar10.tar.gz", copy)
    inode = (cifar10_dir / "test").stat().st_ino
    assert extract_archive(copy, cifar10_dir.parent) == cifar10_dir
    assert (cifar10_dir / "test").stat().st_ino == inode


def test_a_changed_archive_replaces_the_tree(tmp_path: Path):
    cache = tmp_path / "cache"
    first = _write_tar(tmp_path / "toy.tar.gz", {"toy/a.txt": b"a"})
    root = extract_archive(first, cache)
    _write_tar(first, {"toy/a.txt": b"A", "toy/c.txt": b"c"})
    assert extract_archive(first, cache) == root
    assert (root / "a.txt").read_bytes() == b"A" and (root / "c.txt").is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["toy", "toy.tar.gz.extracted"]  # no leftovers


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_extract_archive_rejects_members_escaping_the_target(tmp_path: Path):
    archive = _write_tar(tmp_path / "evil.tar.gz", {"evil/ok.txt": b"ok", "../escaped.txt": b"x"})
    with pytest.raises(tarfile.FilterError):
        extract_archive(archive, tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists()
    assert not list((tmp_path / "cache").iterdir())  # no target, no marker, no temp folder


def test_extract_archive_rebuilds_an_interrupted_extraction(tmp_path: Path):
    archive = _write_tar(tmp_path / "toy.tar.gz", {"toy/a.txt": b"a", "toy/b.txt": b"b"})
    cache = tmp_path / "cache"
    (cache / "toy").mkdir(parents=True)  # a half-done extraction: a folder, no marker
    (cache / "toy" / "a.txt").write_bytes(b"partial")
    root = extract_archive(archive, cache)
    assert root == cache / "toy"
    assert (root / "a.txt").read_bytes() == b"a" and (root / "b.txt").read_bytes() == b"b"
    (root / "b.txt").unlink()  # a valid marker: the folder is trusted and left alone
    assert extract_archive(archive, cache) == root and not (root / "b.txt").exists()


# ----------------------------------------------------------------------------------------------
# Resident tensors from the real CIFAR-10
# ----------------------------------------------------------------------------------------------
def test_cifar10_subset_is_balanced_uint8(cifar_subset):
    subset, _ = cifar_subset
    assert subset.images.shape == (1000, 3, 32, 32) and subset.images.dtype == torch.uint8
    assert subset.labels.dtype == torch.int64
    assert subset.classes == CIFAR10_CLASSES
    assert torch.bincount(subset.labels).tolist() == [100] * 10
    assert len(set(subset.files)) == 1000 and subset.num_skipped == 0


def test_cifar10_labels_match_class_folders(cifar_subset):
    subset, _ = cifar_subset
    folders = [file.split("/")[0] for file in subset.files]
    assert folders == [subset.classes[label] for label in subset.labels.tolist()]


def test_cifar10_pixels_equal_pil_decode(cifar_subset, cifar10_dir: Path):
    subset, _ = cifar_subset
    for i in (0, 123, 999):
        assert torch.equal(subset.images[i], _pil_pixels(cifar10_dir / "test" / subset.files[i]))


def test_second_load_reads_the_cache(cifar_subset, cifar10_dir: Path, monkeypatch):
    subset, cache = cifar_subset
    cache_files = list((cache / "tensors").glob("cifar10-test-orig-sub1000-seed0-*.pt"))
    assert len(cache_files) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cached split was decoded again")

    monkeypatch.setattr(data, "_decode_all", no_decoding)
    again = load_split(cifar10_dir, "test", subset=1000, seed=0, cache_dir=cache)
    assert torch.equal(again.images, subset.images) and again.files == subset.files
    by_name = load_split("cifar10", "test", root=cifar10_dir.parent, subset=1000, cache_dir=cache)
    assert torch.equal(by_name.labels, subset.labels)


def test_subset_depends_on_the_seed_only(cifar_subset, cifar10_dir: Path, tmp_path: Path):
    subset, _ = cifar_subset
    fresh = load_split(cifar10_dir, "test", subset=1000, seed=0, cache_dir=tmp_path)
    assert fresh.files == subset.files  # rebuilt from scratch: the same subset
    other = load_split(cifar10_dir, "test", subset=1000, seed=1, cache_dir=tmp_path)
    assert other.files != subset.files
    assert torch.bincount(other.labels).tolist() == [100] * 10


def test_balanced_subset_spreads_what_small_classes_cannot_take():
    labels = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    picked = balanced_subset(labels, 13, seed=0)
    assert torch.bincount(labels[picked]).tolist() == [2, 6, 5]
    assert torch.equal(picked, torch.sort(picked).values)
    with pytest.raises(ValueError, match="subset"):
        balanced_subset(labels, 23)


def test_to_moves_images_and_labels(cifar_subset):
    subset, _ = cifar_subset
    moved = subset.to("meta")
    assert moved.images.device.type == "meta" and moved.labels.device.type == "meta"
    assert moved.classes == subset.classes and subset.images.device.type == "cpu"


# ----------------------------------------------------------------------------------------------
# Imagenette and resizing
# ----------------------------------------------------------------------------------------------
def test_imagenette_resized_to_32(imagenette_dir: Path, tmp_path: Path):
    val = load_split(imagenette_dir, "test", image_size=32, subset=300, cache_dir=tmp_path)
    assert val.images.shape == (300, 3, 32, 32) and val.images.dtype == torch.uint8
    assert len(val.classes) == 10 and all(c.startswith("n0") for c in val.classes)
    with Image.open(imagenette_dir / "val" / val.files[0]) as img:
        expected = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert torch.equal(val.images[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))


def test_decode_image_resizes_shorter_side_then_crops_center(tmp_path: Path):
    array = np.zeros((20, 60, 3), dtype=np.uint8)  # H=20, W=60: left | center | right thirds
    array[:, 20:40] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = decode_image(tmp_path / "wide.png", image_size=10)
    assert image.shape == (3, 10, 10) and image.dtype == torch.uint8
    assert image[:, :, 1:-1].min() == 255  # only the white center survives the crop


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
def test_unknown_name_lists_valid_names(tmp_path: Path):
    with pytest.raises(ValueError, match="cifar10, cifar100") as info:
        load_split("cifar11", "train", root=tmp_path)
    assert "path" in str(info.value)


def test_missing_split_folder_is_named(tmp_path: Path):
    (tmp_path / "only-train" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="only-train/test"):
        load_split(tmp_path / "only-train", "test", cache_dir=tmp_path)


def test_empty_folders_are_named(tmp_path: Path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folder in .*empty/train"):
        load_split(tmp_path / "empty", "train", cache_dir=tmp_path)
    (tmp_path / "empty" / "train" / "cat").mkdir()
    (tmp_path / "empty" / "train" / "cat" / "notes.txt").write_text("no image")
    with pytest.raises(DataError, match="no image in .*empty/train"):
        load_split(tmp_path / "empty", "train", cache_dir=tmp_path)


def test_an_extra_or_missing_class_folder_in_the_test_split_is_named(cifar10_dir: Path, tmp_path: Path):
    # An empty extra folder sorting before the others would shift every test label by one.
    root = _copy_tree(cifar10_dir, tmp_path / "tree")
    (root / "test" / "aardvark").mkdir()
    with pytest.raises(DataError, match=r"test: class folder\(s\) \['aardvark'\] not in the training split"):
        load_split(root, "test", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="aardvark"):
        streaming_loader(root, 32, 4, num_workers=0, split="test")
    (root / "test" / "aardvark").rmdir()
    shutil.rmtree(root / "test" / "bird")
    with pytest.raises(DataError, match=r"no folder for training class\(es\) \['bird'\]"):
        load_split(root, "test", cache_dir=tmp_path / "cache")


def test_an_empty_class_folder_is_named(cifar10_dir: Path, tmp_path: Path):
    root = _copy_tree(cifar10_dir, tmp_path / "tree")
    (root / "train" / "aardvark").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) \['aardvark'\] of .*train hold no image"):
        load_split(root, "train", cache_dir=tmp_path / "cache")


def test_a_changed_training_folder_is_noticed_by_a_cached_test_split(cifar10_dir: Path, tmp_path: Path):
    root = _copy_tree(cifar10_dir, tmp_path / "tree")
    assert load_split(root, "test", cache_dir=tmp_path / "cache").classes == CIFAR10_CLASSES[:3]
    (root / "train" / "aardvark").mkdir()  # after the test split was cached
    shutil.copy(next((root / "train" / "bird").iterdir()), root / "train" / "aardvark" / "a.jpg")
    with pytest.raises(DataError, match=r"no folder for training class\(es\) \['aardvark'\]"):
        load_split(root, "test", cache_dir=tmp_path / "cache")


def test_the_cache_is_keyed_by_the_folder_contents_not_its_path(cifar10_dir: Path, tmp_path: Path):
    root = _copy_tree(cifar10_dir, tmp_path / "tree")
    cache = tmp_path / "cache"
    first = load_split(root, "train", cache_dir=cache)
    assert len(first) == 12
    # a file removed, one added, one rewritten under the same name: each is decoded anew
    victim = sorted((root / "train" / "bird").iterdir())[0]
    victim.unlink()
    assert len(load_split(root, "train", cache_dir=cache)) == 11
    shutil.copy(sorted((cifar10_dir / "train" / "bird").iterdir())[0], root / "train" / "bird" / "new.jpg")
    added = load_split(root, "train", cache_dir=cache)
    assert len(added) == 12 and "bird/new.jpg" in added.files
    target = sorted((root / "train" / "automobile").iterdir())[0]
    replacement = sorted((cifar10_dir / "train" / "automobile").iterdir())[0]
    target.write_bytes(replacement.read_bytes())
    rewritten = load_split(root, "train", cache_dir=cache)
    row = rewritten.files.index(target.relative_to(root / "train").as_posix())
    assert torch.equal(rewritten.images[row], _pil_pixels(replacement))
    assert len(list((cache / "tensors").iterdir())) == 4  # one cache file per content


@pytest.fixture()
def corrupt_tree(cifar10_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A 3-class copy of CIFAR-10 with one truncated JPEG in ``train/``."""
    root = _copy_tree(cifar10_dir, tmp_path / "tree")
    bad = sorted((root / "train").rglob("*.jpg"))[5]
    bad.write_bytes(bad.read_bytes()[:200])
    return root, bad


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_error_names_the_file(corrupt_tree, tmp_path: Path, num_workers: int):
    root, bad = corrupt_tree
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        load_split(root, "train", cache_dir=tmp_path / "cache", num_workers=num_workers)


def test_skip_corrupt_leaves_the_file_out_and_reports_it(corrupt_tree, tmp_path: Path):
    root, bad = corrupt_tree
    with pytest.warns(UserWarning, match="skipped 1 corrupt image"):
        loaded = load_split(root, "train", cache_dir=tmp_path / "cache", skip_corrupt=True)
    assert loaded.num_skipped == 1 and len(loaded) == 11
    assert loaded.skipped_files == [bad.relative_to(root / "train").as_posix()]
    # the cached split remembers the corrupt file
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        load_split(root, "train", cache_dir=tmp_path / "cache")


def test_garbage_file_error_names_the_file(tmp_path: Path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(CorruptImageError, match=re.escape(str(garbage))):
        decode_image(garbage, 32)


def test_resolve_dataset_prefers_a_local_tree(cifar10_dir: Path, tmp_path: Path):
    local = resolve_dataset("CIFAR10", cifar10_dir.parent)
    assert local.kind == "imagefolder" and local.root == cifar10_dir.resolve()
    assert local.split_dir("test") == cifar10_dir.resolve() / "test"
    assert resolve_dataset("cifar10") == local  # the default root is where conftest extracts
    assert resolve_dataset("cifar100", tmp_path).kind == "torchvision"


def test_failed_download_explains_the_offline_layout(monkeypatch, tmp_path: Path):
    def offline(root, train, download):
        raise OSError("Name or service not known")

    monkeypatch.setattr("torchvision.datasets.CIFAR100", offline)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "cifar100")) + "/train"):
        load_split("cifar100", "train", root=tmp_path, cache_dir=tmp_path)


def test_torchvision_arrays_become_tensors_without_decoding(monkeypatch, tmp_path: Path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)

    class FakeCIFAR10:  # the attributes torchvision's CIFAR10 exposes, without a download
        def __init__(self, root, train, download):
            self.data, self.targets = pixels, [i % 10 for i in range(20)]
            self.classes = CIFAR10_CLASSES

    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    loaded = load_split("cifar10", "train", root=tmp_path, cache_dir=tmp_path)
    assert torch.equal(loaded.images, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert loaded.labels.tolist() == [i % 10 for i in range(20)] and loaded.files == []
    resized = load_split("cifar10", "train", root=tmp_path, image_size=16, cache_dir=tmp_path)
    assert resized.images.shape == (20, 3, 16, 16) and resized.images.dtype == torch.uint8


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------
def test_streaming_loader_yields_uint8_batches(imagenette_dir: Path):
    loader = streaming_loader(imagenette_dir, 48, batch_size=16, num_workers=2, split="val")
    images, labels = next(iter(loader))
    assert images.shape == (16, 3, 48, 48) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    assert len(loader) == -(-3925 // 16)


def test_streaming_loader_is_seeded_and_needs_a_split(imagenette_dir: Path):
    def first_labels(seed: int) -> list[int]:
        loader = streaming_loader(imagenette_dir / "val", 32, 8, num_workers=0, seed=seed)
        return next(iter(loader))[1].tolist()

    assert first_labels(0) == first_labels(0) != first_labels(1)
    with pytest.raises(ValueError, match="split="):
        streaming_loader(imagenette_dir, 32, 8, num_workers=0)


def test_streaming_loader_error_names_the_file(corrupt_tree):
    root, bad = corrupt_tree
    loader = streaming_loader(root, 32, 4, num_workers=0, shuffle=False, split="train")
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        list(loader)


# ----------------------------------------------------------------------------------------------
# Batches from resident tensors
# ----------------------------------------------------------------------------------------------
def _toy(n: int = 10) -> ImageTensors:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()
    return ImageTensors(images=images, labels=torch.arange(n), classes=[str(i) for i in range(n)])


def test_batches_cover_every_item_once_per_epoch():
    epoch = list(batches(_toy(), 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(labels) for _, labels in epoch] == [4, 4]  # drop_last
    seen = torch.cat([labels for _, labels in epoch])
    assert len(set(seen.tolist())) == 8
    for images, labels in epoch:
        assert torch.equal(images[:, 0, 0, 0].long(), labels)  # images follow their labels
    kept = list(batches(_toy(), 4, shuffle=False, drop_last=False))
    assert torch.equal(torch.cat([labels for _, labels in kept]), torch.arange(10))


def test_batches_resume_exactly_from_a_generator_state():
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    full = [labels for _, labels in batches(_toy(20), 4, generator=generator)]
    generator.set_state(state)
    resumed = [labels for _, labels in batches(_toy(20), 4, generator=generator, start=2)]
    assert len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed, strict=True))
    assert not torch.equal(full[0], torch.arange(4))  # shuffled
