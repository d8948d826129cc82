"""Transfer of a trained encoder to other data sets by a linear probe (He, Du & Ma, Table 5).

The encoder of a finished run is frozen; its features of a transfer set's training and test
images train and test one linear classifier (:func:`or_core.evaluate.linear_probe_accuracy`).
The data sets are those of the paper's transfer table, read through torchvision with their
official splits::

    python -m or_core transfer runs/byol-so --dataset dtd --data-root ~/data

======================  ==========================  ================  =========
``--dataset``           torchvision class           trained on        tested on
======================  ==========================  ================  =========
``food101``             ``Food101``                 train             test
``flowers102``          ``Flowers102``              train + val       test
``dtd``                 ``DTD`` (partition 1)       train + val       test
``gtsrb``               ``GTSRB``                   train             test
``stl10``               ``STL10`` (labelled)        train             test
``cifar10/100``         ``CIFAR10`` / ``CIFAR100``  train             test
======================  ==========================  ================  =========

Flowers102 and DTD come with a validation split for choosing hyper-parameters; with none to
choose here, the probe trains on train + val, as in Kornblith, Shlens & Le (CVPR 2019), whose
protocol the SSL transfer tables follow.

A missing data set is downloaded into ``--data-root`` (torchvision's ``download=True``); offline,
put a copy there in the layout torchvision reads (:data:`TRANSFER_SETS`' ``layout``, shown in
the error). CIFAR is read by :func:`or_core.data.load_split`, which also takes the ImageFolder
trees of the shared archives (``<data-root>/cifar10/train`` and ``/test``).

Every image is resized (shorter side) and center-cropped to the run's training image size (32 px
for a CIFAR-trained encoder) and normalized with the training mean and standard deviation,
without other augmentation: the encoder sees the transfer images as it saw its training images.
"""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from or_core.atomic import write_json_atomic
from or_core.data import DATASET_NAMES, default_data_root, load_split
from or_core.errors import ConfigError, DataError, disk_error
from or_core.evaluate import extract_features, linear_probe_accuracy
from or_core.measure import TrainedRun, load_trained
from or_core.provenance import provenance

__all__ = ["TRANSFER_SETS", "TransferSet", "load_transfer_split", "transfer"]

#: Files of a run directory (those of :mod:`or_core.train`).


@dataclass(frozen=True)
class TransferSet:
    """A transfer data set: how torchvision builds one split and where it wants the files.

    Attributes:
        name: the ``--dataset`` name.
        build: ``build(root, split, download, transform)``, the torchvision data set of a split.
        train_splits: the official splits the probe trains on (concatenated).
        test_split: the official split it is tested on.
        layout: the files torchvision reads under the data root (for the offline message).
    """

    name: str
    build: Callable[[str, str, bool, Callable], Dataset] | None
    train_splits: tuple[str, ...]
    test_split: str
    layout: str


def _torchvision(cls_name: str, **fixed: Any) -> Callable[[str, str, bool, Callable], Dataset]:
    def build(root: str, split: str, download: bool, transform: Callable) -> Dataset:
        from torchvision import datasets

        return getattr(datasets, cls_name)(root, split=split, download=download, transform=transform, **fixed)

    return build


#: The data sets of the paper's transfer table (Table 5), plus CIFAR, by ``--dataset`` name.
TRANSFER_SETS: dict[str, TransferSet] = {
    s.name: s
    for s in (
        TransferSet(
            "food101", _torchvision("Food101"), ("train",), "test",
            "food-101/images/<class>/<id>.jpg and food-101/meta/{train,test}.json",
        ),
        TransferSet(
            "flowers102", _torchvision("Flowers102"), ("train", "val"), "test",
            "flowers-102/jpg/image_<00001>.jpg, flowers-102/imagelabels.mat and flowers-102/setid.mat",
        ),
        TransferSet(
            "dtd", _torchvision("DTD", partition=1), ("train", "val"), "test",
            "dtd/dtd/images/<class>/<name>.jpg and dtd/dtd/labels/{train,val,test}1.txt",
        ),
        TransferSet(
            "gtsrb", _torchvision("GTSRB"), ("train",), "test",
            "gtsrb/GTSRB/Training/<class>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm and gtsrb/GT-final_test.csv",
        ),
        TransferSet(
            "stl10", _torchvision("STL10"), ("train",), "test",
            "stl10_binary/{train,test}_{X,y}.bin and stl10_binary/class_names.txt",
        ),
        # CIFAR goes through or_core.data.load_split (torchvision or the shared ImageFolder trees).
        TransferSet("cifar10", None, ("train",), "test", "cifar-10-batches-py/ or cifar10/{train,test}/<class>/"),
        TransferSet("cifar100", None, ("train",), "test", "cifar-100-python/ or cifar100/{train,test}/<class>/"),
    )
}
assert set(DATASET_NAMES) <= set(TRANSFER_SETS)


def _transfer_set(name: str) -> TransferSet:
    found = TRANSFER_SETS.get(name.lower())
    if found is None:
        raise ConfigError(f"unknown transfer data set {name!r}: use one of {', '.join(TRANSFER_SETS)}")
    return found


def _resize_to_tensor(size: int) -> Callable:
    """PIL image -> uint8 ``(3, size, size)``: shorter side to ``size``, center crop, as the
    ImageFolder data of :mod:`or_core.data`."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.PILToTensor()])


def _open_split(spec: TransferSet, root: Path, split: str, download: bool, transform: Callable) -> Dataset:
    """torchvision's data set of ``split``; a missing or unreachable copy is one :class:`DataError`."""
    assert spec.build is not None
    try:
        return spec.build(str(root), split, download, transform)
    except (OSError, RuntimeError, tarfile.TarError) as error:  # offline, not found, bad archive
        if isinstance(error, OSError) and disk_error(error) is not None:
            raise disk_error(error) from error  # type: ignore[misc]
        how = "could not download it" if download else "not found (download is off)"
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(
            f"{spec.name} {split} split: {how} into {root} ({reason}); put a copy there as torchvision "
            f"expects it: {root}/{spec.layout}"
        ) from error


def load_transfer_split(
    name: str,
    train: bool,
    image_size: int,
    root: str | Path | None = None,
    download: bool = True,
    num_workers: int = 0,
) -> tuple[Dataset, int]:
    """The training (official train splits, concatenated) or test split of transfer set ``name``
    as a data set of ``(uint8 (3, image_size, image_size), label)``, and its number of classes.

    Raises:
        ConfigError: an unknown ``name``.
        DataError: the data set is neither under ``root`` nor downloadable.
    """
    spec = _transfer_set(name)
    root = default_data_root() if root is None else Path(os.path.expanduser(str(root)))
    if spec.build is None:  # CIFAR: or_core's resident loader (torchvision or ImageFolder trees)
        data = load_split(spec.name, "train" if train else "test", root, image_size, num_workers=num_workers or None)
        return torch.utils.data.TensorDataset(data.images, data.labels), data.num_classes
    transform = _resize_to_tensor(image_size)
    splits = spec.train_splits if train else (spec.test_split,)
    parts = [_open_split(spec, root, split, download, transform) for split in splits]
    return ConcatDataset(parts), _num_classes(parts[0])


def _num_classes(dataset: Dataset) -> int:
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    labels = getattr(dataset, "_labels", None) or [label for _, label in getattr(dataset, "_samples", [])]
    return 1 + max(labels)


def _features(
    encoder: TrainedRun, dataset: Dataset, device: torch.device, num_workers: int, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Features and labels of a whole split, decoded batch by batch (only features are kept)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for images, y in loader:
        feats.append(extract_features(encoder.backbone, images, encoder.mean, encoder.std, batch_size, device))
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    if not feats:
        raise DataError("a split of the transfer set has no images: check its split files under --data-root")
    return torch.cat(feats), torch.cat(labels)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def transfer(
    run_dir: str | Path,
    dataset: str,
    data_root: str | Path | None = None,
    image_size: int | None = None,
    epochs: int = 100,
    seed: int = 0,
    download: bool = True,
    device: str = "auto",
    num_workers: int = 0,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Linear probe of the frozen encoder of ``run_dir`` on transfer set ``dataset``.

    Args:
        run_dir: a pretrain run directory (its ``checkpoint.pt``).
        dataset: a name of :data:`TRANSFER_SETS`.
        data_root: where the data set is (or is downloaded to); default
            :func:`or_core.data.default_data_root`.
        image_size: side the images are resized to; default the run's training image size.
        epochs: epochs of the linear probe.
        seed: seed of the probe's initialization and batch order.
        download: download a missing data set (torchvision's ``download=True``).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:1"``, ...
        num_workers: DataLoader processes decoding the images (0: in this process).
        out: the record's file; default ``<run_dir>/transfer/<dataset>.json``.

    Returns:
        The record written to ``out``: the data set, the probe's top-1/top-5 test accuracy, the
        image counts and the run's method, regularizer and backbone.
    """
    spec = _transfer_set(dataset)
    if epochs < 1:
        raise ConfigError(f"epochs is the number of linear-probe epochs, at least 1; got {epochs}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels; got {image_size}")
    run_dir = Path(run_dir)
    torch_device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    encoder = load_trained(run_dir, torch_device)
    size = image_size or encoder.image_size
    train_set, num_classes = load_transfer_split(spec.name, True, size, data_root, download, num_workers)
    test_set, _ = load_transfer_split(spec.name, False, size, data_root, download, num_workers)
    train_feats, train_labels = _features(encoder, train_set, torch_device, num_workers)
    test_feats, test_labels = _features(encoder, test_set, torch_device, num_workers)
    num_classes = max(num_classes, int(train_labels.max()) + 1)
    probe = linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, epochs=epochs,
                                  seed=seed)
    cfg = encoder.cfg
    record = {
        "transfer_dataset": spec.name,
        "train_splits": list(spec.train_splits),
        "test_split": spec.test_split,
        "linear_top1": probe["top1"],
        "linear_top5": probe["top5"],
        "num_classes": num_classes,
        "train_images": len(train_labels),
        "test_images": len(test_labels),
        "image_size": size,
        "training_image_size": encoder.image_size,
        "linear_epochs": epochs,
        "seed": seed,
        "run_dir": str(run_dir.resolve()),
        "run_epoch": encoder.epoch,
        "method": cfg.method,
        "regularizer": cfg.regularizer,
        "gamma": cfg.gamma,
        "backbone": cfg.backbone,
        "width": cfg.width,
        "pretrain_dataset": cfg.dataset,
        "feature_dim": train_feats.shape[1],
        "wall_time_s": time.perf_counter() - start,
        "device": str(torch_device),
        "provenance": provenance(wall_time_s=time.perf_counter() - start),
    }
    target = Path(out) if out is not None else run_dir / "transfer" / f"{spec.name}.json"
    write_json_atomic(target, record, indent=2)
    return record
