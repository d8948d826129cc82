"""Image data as uint8 tensors: resident (decoded once, cached on disk) or streamed.

Two ways to feed a training loop, both ending in uint8 batches ``(B, 3, H, W)`` on which the
augmentations run batched on the device (see ``or_core.augment``):

* **Resident** (:func:`load_split`): the whole split decoded once to a ``uint8`` tensor, saved to a
  cache file, then held in memory or on the GPU (``.to(device)``) and cut into batches by
  :func:`batches`. CIFAR-10/100 take 150 MB, Imagenette-64 or ImageNet-100 at 64 px 0.1-1.5 GB.
* **Streamed** (:func:`streaming_loader`): a ``DataLoader`` whose workers decode each image of an
  ImageFolder to a fixed-size uint8 tensor, for data sets too large to hold (ImageNet-1k).

Sources (:func:`resolve_dataset`): ``"cifar10"`` / ``"cifar100"`` through torchvision (downloaded
to a folder you pick), unless an ImageFolder tree ``<root>/cifar10/train`` exists there (the
shared archives, offline machines); or the path of any ImageFolder root with ``train/`` and
``val/`` or ``test/`` (ImageNet layout: ImageNet-100, ImageNet-1k, Imagenette).

Example::

    data = load_split("cifar10", "train", root="~/data").to("cuda")
    gen = torch.Generator().manual_seed(0)
    for images, labels in batches(data, batch_size=512, shuffle=True, generator=gen):
        ...  # images: uint8 (512, 3, 32, 32) on the GPU
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from or_core.atomic import write_text_atomic
from or_core.checkpoint import save_atomic
from or_core.errors import DataError, MissingPathError

__all__ = [
    "DATASET_NAMES",
    "CorruptImageError",
    "class_folders",
    "count_images",
    "folder_fingerprint",
    "DatasetSource",
    "ImageTensors",
    "balanced_subset",
    "batch_indices",
    "batches",
    "decode_image",
    "load_holdout",
    "load_split_at_most",
    "default_cache_dir",
    "default_data_root",
    "extract_archive",
    "load_split",
    "resolve_dataset",
    "scan_image_folder",
    "streaming_loader",
    "SeededBatchSampler",
]

#: Data set names understood by :func:`resolve_dataset` (any ImageFolder path works too).
DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif")
Split = Literal["train", "test"]

_CACHE_VERSION = 1  # bump when the cache file's content changes
_IN_PROCESS_FILES = 1024  # splits up to this size decode without worker processes
_MARKER_SUFFIX = ".extracted"


class CorruptImageError(DataError):
    """An image file that cannot be decoded; the message names the file."""


def default_cache_dir() -> Path:
    """``$OR_CORE_CACHE`` if set, else ``~/.cache/or_core``."""
    return Path(os.environ.get("OR_CORE_CACHE", "~/.cache/or_core")).expanduser()


# ----------------------------------------------------------------------------------------------
# Archives
# ----------------------------------------------------------------------------------------------
def _fingerprint(path: Path) -> str:
    """``sha256:<hex>`` of the file's content: a copy of the same archive elsewhere (another
    path, another mtime) is recognized as already extracted (hashing an archive is cheap)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _extract_into(archive: Path, target: Path) -> None:
    """Extract ``archive`` into ``target``; members escaping it (``..``, absolute, links out)
    raise ``tarfile.FilterError`` through the ``"data"`` filter (PEP 706)."""
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")


def extract_archive(archive: Path | str, cache_dir: Path | str) -> Path:
    """Extract a ``.tar(.gz)`` archive into ``cache_dir`` once; return its extracted top folder.

    Idempotent and safe when interrupted: the archive is extracted into a temporary folder beside
    the target, moved into place with one rename, and only then is a marker
    ``<cache_dir>/<archive name>.extracted`` written (with the archive's SHA-256, so a changed
    archive is extracted again and a copy of the same one elsewhere is not). Without a valid
    marker the target is rebuilt; an old folder is renamed away first, so a process reading
    it meanwhile never finds it missing.

    An archive holding a single top-level folder (``cifar10/...``) yields
    ``<cache_dir>/cifar10``; any other layout yields ``<cache_dir>/<archive stem>``.
    """
    archive, cache_dir = Path(archive).expanduser(), Path(cache_dir).expanduser()
    if not archive.is_file():
        raise MissingPathError(f"archive not found: {archive}")
    marker = cache_dir / (archive.name + _MARKER_SUFFIX)
    fingerprint = _fingerprint(archive)
    found = _completed_extraction(marker, fingerprint)
    if found is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", dir=cache_dir))
    try:
        _extract_into(archive, tmp)
        entries = list(tmp.iterdir())
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        name = source.name if source is not tmp else archive.name.split(".")[0]
        target = cache_dir / name
        done_meanwhile = _completed_extraction(marker, fingerprint)  # by a concurrent process
        if done_meanwhile is not None:
            return done_meanwhile
        if target.exists():  # left by an interrupted run, or another archive's: swap it out
            os.replace(target, tmp / ".replaced")  # (readers never find the folder missing)
        os.replace(source, target)
        write_text_atomic(marker, f"{fingerprint}\n{name}\n")
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _completed_extraction(marker: Path, fingerprint: str) -> Path | None:
    """The extracted folder if ``marker`` says the archive of ``fingerprint`` was fully
    extracted, else ``None``."""
    if not marker.is_file():
        return None
    lines = marker.read_text().splitlines()
    if len(lines) != 2 or lines[0] != fingerprint:
        return None
    target = marker.parent / lines[1]
    return target if target.is_dir() else None


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSource:
    """Where a data set's images come from.

    Attributes:
        name: ``"cifar10"``, ``"cifar100"`` or the ImageFolder root's folder name.
        root: the ImageFolder root (holding ``train/`` and ``val/`` or ``test/``), or the folder
            torchvision downloads CIFAR into.
        kind: ``"imagefolder"`` or ``"torchvision"``.
    """

    name: str
    root: Path
    kind: Literal["imagefolder", "torchvision"]

    def split_dir(self, split: str) -> Path:
        """The folder of ``split`` (``"test"`` falls back to ``val/`` and vice versa)."""
        if self.kind != "imagefolder":
            raise ValueError(f"{self.name} comes from torchvision and has no split folders")
        candidates = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}
        if split not in candidates:
            raise ValueError(f"split must be 'train' or 'test' ('val' works too), got {split!r}")
        for folder in candidates[split]:
            if (self.root / folder).is_dir():
                return self.root / folder
        wanted = " or ".join(f"{self.root / f}/" for f in candidates[split])
        raise MissingPathError(
            f"split {split!r} of {self.name}: no folder {wanted}; add it or point --dataset at another root"
        )


def default_data_root() -> Path:
    """``<default_cache_dir()>/datasets``: where named data sets are looked for (and downloaded)
    when no ``root`` is given, and where the test suite extracts the shared archives."""
    return default_cache_dir() / "datasets"


def resolve_dataset(name_or_path: str | Path, root: Path | str | None = None) -> DatasetSource:
    """Resolve a data set name or ImageFolder path to a :class:`DatasetSource`.

    Args:
        name_or_path: ``"cifar10"``, ``"cifar100"``, or the path of an ImageFolder root with
            ``train/`` and ``val/`` or ``test/`` subfolders, each holding one folder per class.
        root: for a name, the folder torchvision downloads into (default
            :func:`default_data_root`); if ``<root>/<name>/train`` is an ImageFolder tree it is
            used instead (no download). A relative name that is no folder here but an
            ImageFolder tree under ``root`` (``"imagenette-64"``) resolves there.

    Raises:
        ValueError: an unknown name that is not an existing folder.
    """
    root = default_data_root() if root is None else Path(root).expanduser()
    key = str(name_or_path).lower()
    if key in DATASET_NAMES:
        tree = root / key
        if (tree / "train").is_dir():
            return DatasetSource(key, tree.resolve(), "imagefolder")
        return DatasetSource(key, root.resolve(), "torchvision")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return DatasetSource(path.resolve().name, path.resolve(), "imagefolder")
    if not path.is_absolute() and (root / path / "train").is_dir():  # a tree under the data root
        return DatasetSource(path.name, (root / path).resolve(), "imagefolder")
    raise DataError(
        f"unknown data set {str(name_or_path)!r}: use one of {', '.join(DATASET_NAMES)}, or the "
        f"path of an ImageFolder root with train/ and val/ or test/ (no such folder: {path})"
    )


def scan_image_folder(
    split_dir: Path | str, expected_classes: Sequence[str] | None = None
) -> tuple[list[str], list[Path], list[int]]:
    """Classes, image files and labels of an ImageFolder split ``split_dir/<class>/**/<image>``.

    Classes are the sorted subfolder names and files are sorted within each class, so labels
    match ``torchvision.datasets.ImageFolder``. With ``expected_classes`` (the training split's
    classes, for another split) the folder names must be the same, so that a label means the
    same class in every split.

    Raises:
        MissingPathError: ``split_dir`` is missing or has no class folder.
        DataError: no image at all, a class folder without images, or class folders other than
            ``expected_classes``; the message names them.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise MissingPathError(f"image folder not found: {split_dir}")
    classes = class_folders(split_dir)
    if not classes:
        raise MissingPathError(f"no class folder in {split_dir} (expected {split_dir}/<class>/<image>)")
    if expected_classes is not None and classes != sorted(expected_classes):
        extra = sorted(set(classes) - set(expected_classes))
        missing = sorted(set(expected_classes) - set(classes))
        problems = ([f"class folder(s) {extra} not in the training split"] if extra else []) + (
            [f"no folder for training class(es) {missing}"] if missing else []
        )
        raise DataError(
            f"{split_dir}: {' and '.join(problems)}; every split needs the same class folders "
            f"(labels are matched by folder name): remove or add folders"
        )
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        found = _images_under(split_dir / name)
        if not found:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(
            f"no image in the class folders of {split_dir} "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    if empty:
        raise DataError(
            f"class folder(s) {empty} of {split_dir} hold no image ({', '.join(IMAGE_EXTENSIONS)}): "
            f"remove them or add images"
        )
    return classes, files, labels


def class_folders(split_dir: Path | str) -> list[str]:
    """The sorted names of the class folders of an ImageFolder split (hidden ones excluded)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def count_images(name_or_path: str | Path, split: Split, root: Path | str | None = None) -> int:
    """How many images ``split`` of a data set holds, without decoding any (CIFAR through
    torchvision: its fixed sizes)."""
    source = resolve_dataset(name_or_path, root)
    if source.kind == "torchvision":
        return 50_000 if split == "train" else 10_000
    split_dir = source.split_dir(split)
    if not class_folders(split_dir):
        scan_image_folder(split_dir)  # raises, naming the problem
    return sum(len(_image_stats(os.path.join(split_dir, name), "")) for name in class_folders(split_dir))


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, _, names in sorted(os.walk(folder, followlinks=True)):
        found += [Path(dirpath, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return found


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
def decode_image(path: Path | str, image_size: int | None = None) -> Tensor:
    """Decode an image file to a uint8 RGB tensor ``(3, H, W)``.

    With ``image_size``, the shorter side is resized to ``image_size`` (bilinear, antialiased)
    and the center ``image_size x image_size`` is cropped; an image already of that size is left
    untouched. A JPEG at least 4 times larger than needed is decoded at a reduced DCT scale
    (PIL ``draft``, 1/2 to 1/8) that keeps at least ``2 * image_size`` on each side, then resized:
    faster, and close to a full decode (the antialiased resize still does the last halving or
    more; measurements: results/benchmarks/NOTES.md#decode-chunks). Smaller files,
    CIFAR and Imagenette-64 included, decode in full.

    Raises:
        CorruptImageError: the file cannot be read or decoded; the message names it.
    """
    return torch.from_numpy(_decode_array(path, image_size).transpose(2, 0, 1).copy())


def _decode_array(path: Path | str, image_size: int | None) -> np.ndarray:
    """:func:`decode_image` as a ``(H, W, 3)`` uint8 array (no per-image tensor overhead)."""
    try:
        with Image.open(path) as img:
            if image_size is not None:
                img.draft("RGB", (2 * image_size, 2 * image_size))
            return np.asarray(_resize_center_crop(img.convert("RGB"), image_size))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot decode image {path}: {error}") from error


def _resize_center_crop(img: Image.Image, size: int | None) -> Image.Image:
    """Resize the shorter side to ``size`` then crop the center square (torchvision's rounding)."""
    if size is None or img.size == (size, size):
        return img
    w, h = img.size
    if min(w, h) != size:
        w, h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class _DecodedFiles(Dataset):
    """Image files decoded to uint8 ``(3, S, S)`` tensors; an item is ``(image, label)``."""

    def __init__(
        self, files: Sequence[Path], labels: Sequence[int], image_size: int, classes: Sequence[str] = ()
    ) -> None:
        self.files = list(files)
        self.labels = list(labels)
        self.image_size = image_size
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return decode_image(self.files[index], self.image_size), self.labels[index]


class _DecodedChunks(Dataset):
    """Consecutive chunks of files decoded into one uint8 ``(k, 3, H, W)`` tensor each.

    One tensor per chunk instead of one per image: a worker hands each tensor back through
    shared memory, and for 32 px images that hand-over costs more than the decoding. An item
    is ``(images, ok, errors)``: ``ok`` is False where a file could not be decoded, and
    ``errors`` holds those files' messages. Corrupt files are reported, not raised: an
    exception raised in a worker keeps the loader alive in its traceback, which makes shutting
    the workers down slow.
    """

    def __init__(
        self,
        files: Sequence[Path],
        size: tuple[int, int],
        image_size: int | None,
        chunk: int = 256,
    ) -> None:
        self.files = list(files)
        self.size = size
        self.image_size = image_size
        self.chunk = chunk

    def __len__(self) -> int:
        return -(-len(self.files) // self.chunk)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, list[str]]:
        files = self.files[index * self.chunk : (index + 1) * self.chunk]
        images = np.zeros((len(files), *self.size, 3), dtype=np.uint8)
        ok = torch.ones(len(files), dtype=torch.bool)
        errors = []
        for i, path in enumerate(files):
            try:
                images[i] = self._decode(path)
            except CorruptImageError as error:
                ok[i] = False
                errors.append(str(error))
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), ok, errors

    def _decode(self, path: Path) -> np.ndarray:
        image = _decode_array(path, self.image_size)
        if image.shape[:2] != self.size:
            h, w = self.size
            raise DataError(
                f"{path} is {image.shape[1]}x{image.shape[0]}, the first image {w}x{h}: pass "
                f"image_size to bring all images to one size"
            )
        return image


def _default_workers() -> int:
    """``min(8, usable CPUs)``."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, usable or 1)


# ----------------------------------------------------------------------------------------------
# Resident tensors
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTensors:
    """A whole split as tensors.

    Attributes:
        images: uint8 ``(N, 3, H, W)``.
        labels: int64 ``(N,)``.
        classes: class names; ``labels`` index into them.
        files: image paths relative to the split folder (empty for torchvision CIFAR).
        skipped_files: corrupt files left out (``skip_corrupt=True``).
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    files: list[str] = dataclasses.field(default_factory=list)
    skipped_files: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_skipped(self) -> int:
        """How many corrupt images were left out."""
        return len(self.skipped_files)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageTensors:
        """The same data with ``images`` and ``labels`` on ``device``."""
        return dataclasses.replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )


def load_split(
    name_or_path: str | Path,
    split: Split = "train",
    root: Path | str | None = None,
    image_size: int | None = None,
    subset: int | None = None,
    seed: int = 0,
    cache_dir: Path | str | None = None,
    skip_corrupt: bool = False,
    num_workers: int | None = None,
    progress: bool = False,
) -> ImageTensors:
    """Load a split as uint8 tensors, decoding it once and caching the result on disk.

    The first call decodes every image (in parallel, ``num_workers`` processes) to a fixed size
    and saves an :class:`ImageTensors` to ``<cache_dir>/tensors/`` (temporary file, fsync,
    rename), keyed by the split folder and its contents (class folders, file names, sizes and
    modification times), ``image_size``, ``subset`` and ``seed``; later calls just read that
    file. A changed folder under the same path is decoded again.

    A split other than ``train`` must have the training split's class folders (labels are
    matched by folder name); an extra, missing or empty class folder is a :class:`DataError`
    naming it.

    Args:
        name_or_path: ``"cifar10"``, ``"cifar100"`` or an ImageFolder root, see
            :func:`resolve_dataset`.
        split: ``"train"`` or ``"test"`` (``val/`` is used when there is no ``test/``).
        root: download folder for the named data sets (or the folder holding their trees),
            default :func:`default_data_root`.
        image_size: resize the shorter side to this and crop the center square; ``None`` keeps
            the files' size (which must then be the same for every image).
        subset: keep this many images, class-balanced, chosen with ``seed`` (the same subset on
            every call with the same ``seed``).
        seed: seed of the subset.
        cache_dir: cache folder (tensors go to ``<cache_dir>/tensors``), default
            :func:`default_cache_dir`.
        skip_corrupt: leave out files that cannot be decoded (warns; see
            :attr:`ImageTensors.num_skipped`) instead of raising :class:`CorruptImageError`.
        num_workers: decoding processes, default ``min(8, cpu count)``; 0 decodes in-process.
        progress: show a progress bar while decoding.
    """
    source = resolve_dataset(name_or_path, root)
    location = _split_location(source, split)
    expected = _training_classes(source, location)
    cache_file = _cache_path(cache_dir, source, location, split, image_size, subset, seed)
    data = _read_cache(cache_file)
    if data is None:
        if source.kind == "torchvision":
            data = _load_torchvision(source, split, image_size, subset, seed)
        else:
            data = _load_image_folder(
                location, image_size, subset, seed, skip_corrupt, num_workers, progress, expected
            )
        _write_cache(cache_file, data)
    elif expected is not None and data.classes != expected:  # the training split changed
        scan_image_folder(location, expected)  # raises, naming the folders
    _report_skipped(data, location, skip_corrupt)
    return data


def _training_classes(source: DatasetSource, location: Path) -> list[str] | None:
    """The class folders of the training split, when ``location`` is another split's folder."""
    if source.kind != "imagefolder":
        return None
    train = source.split_dir("train")
    return None if location == train else class_folders(train)


def _split_location(source: DatasetSource, split: str) -> Path:
    """The split folder (ImageFolder) or the download folder (torchvision)."""
    if source.kind == "torchvision":
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return source.root
    return source.split_dir(split)


def _report_skipped(data: ImageTensors, location: Path, skip_corrupt: bool) -> None:
    if not data.skipped_files:
        return
    first = location / data.skipped_files[0]
    if not skip_corrupt:
        raise CorruptImageError(
            f"cannot decode image {first} (cached as corrupt with {data.num_skipped - 1} other "
            f"file(s)); pass skip_corrupt=True to leave them out"
        )
    message = f"skipped {data.num_skipped} corrupt image(s) in {location}, e.g. {first}"
    warnings.warn(message, stacklevel=3)  # points at the caller of load_split


def load_split_at_most(
    name_or_path: str | Path,
    split: Split,
    root: Path | str | None,
    image_size: int | None,
    subset: int | None,
    seed: int = 0,
) -> ImageTensors:
    """:func:`load_split` with ``subset`` class-balanced images, or the whole split if it has
    fewer (a small test split, Imagenette-64's 9,469 training images)."""
    try:
        return load_split(name_or_path, split, root, image_size, subset, seed)
    except ValueError as error:
        if subset is None or not str(error).startswith("subset must be in"):
            raise
        return load_split(name_or_path, split, root, image_size, None, seed)


def load_holdout(
    name_or_path: str | Path,
    size: int,
    train_subset: int,
    seed: int = 0,
    root: Path | str | None = None,
    image_size: int | None = None,
    cache_dir: Path | str | None = None,
    holdout_seed: int = 2411_00392,
) -> ImageTensors:
    """A validation split carved out of the training split: ``size`` training images (class
    balanced) that the pretraining subset ``load_split(..., "train", subset=train_subset,
    seed=seed)`` does not contain.

    Hyper-parameters such as OR's ``gamma`` are chosen on it, never on the test split. The
    choice is a function of ``holdout_seed`` and the pretraining subset alone, so every run on
    the same subset is validated on the same images.
    """
    full = load_split(name_or_path, "train", root, image_size, None, 0, cache_dir)
    if full.num_skipped:
        raise ValueError("a holdout split needs a training split without skipped (corrupt) images")
    used = torch.zeros(len(full), dtype=torch.bool)
    used[balanced_subset(full.labels, train_subset, seed)] = True
    free = torch.nonzero(~used).flatten()
    if size > free.numel():
        raise ValueError(
            f"a holdout of {size} images needs that many training images outside the pretraining "
            f"subset of {train_subset}; only {free.numel()} are left"
        )
    keep = free[balanced_subset(full.labels[free], size, holdout_seed)]
    return dataclasses.replace(
        full,
        images=full.images[keep],
        labels=full.labels[keep],
        files=[full.files[i] for i in keep.tolist()] if full.files else [],
    )


def balanced_subset(labels: Tensor, size: int, seed: int = 0) -> Tensor:
    """Sorted indices of a seeded subset of ``size`` with (as nearly as possible) equal counts
    per class; a class with too few items gives its share to the others."""
    if not 0 < size <= labels.numel():
        raise DataError(f"subset must be in [1, {labels.numel()}], got {size}")
    generator = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    quotas = _share(size, [len(idx) for idx in per_class])
    chosen = [
        idx[torch.randperm(len(idx), generator=generator)[:quota]]
        for idx, quota in zip(per_class, quotas, strict=True)
    ]
    return torch.sort(torch.cat(chosen)).values


def _share(total: int, capacities: list[int]) -> list[int]:
    """Split ``total`` as evenly as possible into parts bounded by ``capacities`` (the first
    parts take the remainder)."""
    quotas = [0] * len(capacities)
    open_ = [i for i, cap in enumerate(capacities) if cap > 0]
    while total > 0 and open_:
        each, extra = divmod(total, len(open_))
        for rank, i in enumerate(open_):
            take = min(each + (rank < extra), capacities[i] - quotas[i])
            quotas[i] += take
            total -= take
        open_ = [i for i in open_ if quotas[i] < capacities[i]]
    return quotas


def _load_image_folder(
    split_dir: Path,
    image_size: int | None,
    subset: int | None,
    seed: int,
    skip_corrupt: bool,
    num_workers: int | None,
    progress: bool,
    expected_classes: Sequence[str] | None = None,
) -> ImageTensors:
    classes, files, labels = scan_image_folder(split_dir, expected_classes)
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    if subset is not None:
        keep = balanced_subset(label_tensor, subset, seed)
        files, label_tensor = [files[i] for i in keep.tolist()], label_tensor[keep]
    images, ok = _decode_all(files, image_size, skip_corrupt, num_workers, progress)
    relative = [f.relative_to(split_dir).as_posix() for f in files]
    return ImageTensors(
        images=images[ok],
        labels=label_tensor[ok],
        classes=classes,
        files=[r for r, good in zip(relative, ok.tolist(), strict=True) if good],
        skipped_files=[r for r, good in zip(relative, ok.tolist(), strict=True) if not good],
    )


def _decode_all(
    files: list[Path],
    image_size: int | None,
    skip_corrupt: bool,
    num_workers: int | None,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """Decode ``files`` in parallel into one uint8 tensor; also return the mask of decoded ones.

    Raises:
        CorruptImageError: naming the first file that cannot be decoded, unless ``skip_corrupt``.
    """
    size = _output_size(files, image_size, skip_corrupt)
    chunks = _DecodedChunks(files, size, image_size)
    workers = _default_workers() if num_workers is None else num_workers
    if num_workers is None and len(files) <= _IN_PROCESS_FILES:
        workers = 0  # starting worker processes would take longer than decoding these
    loader = DataLoader(chunks, batch_size=None, num_workers=min(workers, len(chunks)))
    images = torch.empty(len(files), 3, *size, dtype=torch.uint8)
    ok = torch.empty(len(files), dtype=torch.bool)
    failure = None
    for index, (chunk_images, chunk_ok, errors) in enumerate(_maybe_progress(loader, progress)):
        if errors and not skip_corrupt:
            failure = errors[0]
            break  # drops the loader: its workers shut down now
        begin = index * chunks.chunk  # the loader keeps the order of the chunks
        images[begin : begin + len(chunk_ok)] = chunk_images
        ok[begin : begin + len(chunk_ok)] = chunk_ok
    if failure is not None:
        raise CorruptImageError(failure)
    return images, ok


def _output_size(files: list[Path], image_size: int | None, skip_corrupt: bool) -> tuple[int, int]:
    """``(image_size, image_size)``, or the size of the first decodable file."""
    if image_size is not None:
        return image_size, image_size
    for path in files:
        try:
            with Image.open(path) as img:
                return img.size[1], img.size[0]
        except OSError as error:
            if not skip_corrupt:
                raise CorruptImageError(f"cannot decode image {path}: {error}") from error
    raise CorruptImageError(f"no decodable image among {len(files)} files, e.g. {files[0]}")


def _maybe_progress(loader: DataLoader, progress: bool) -> Iterable:
    if not progress:
        return loader
    from or_core.progress import progress_bar

    return progress_bar(loader, desc="decoding", unit="chunk")


def _load_torchvision(
    source: DatasetSource, split: str, image_size: int | None, subset: int | None, seed: int
) -> ImageTensors:
    """CIFAR through torchvision (downloading into ``source.root``), arrays to tensors directly."""
    from torchvision import datasets
    from torchvision.transforms.v2 import functional as TF

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[source.name]
    try:
        dataset = cls(str(source.root), train=split == "train", download=True)
    except OSError as error:  # no network: say how to work offline
        raise DataError(
            f"could not download {source.name} into {source.root} ({error}); offline, put an "
            f"ImageFolder tree at {source.root / source.name}/train and /test instead"
        ) from error
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    if subset is not None:
        keep = balanced_subset(labels, subset, seed)
        images, labels = images[keep], labels[keep]
    if image_size is not None and images.shape[-1] != image_size:
        images = TF.resize(images, [image_size, image_size], antialias=True)
    return ImageTensors(images=images, labels=labels, classes=list(dataset.classes))


# ----------------------------------------------------------------------------------------------
# The tensor cache
# ----------------------------------------------------------------------------------------------
def _cache_path(
    cache_dir: Path | str | None,
    source: DatasetSource,
    location: Path,
    split: str,
    image_size: int | None,
    subset: int | None,
    seed: int,
) -> Path:
    """``<cache>/tensors/<name>-<split>-<size>[-sub<n>-seed<s>]-<hash of the full key>.pt``; the
    key holds the folder's contents (:func:`folder_fingerprint`) for an ImageFolder."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    contents = folder_fingerprint(location) if source.kind == "imagefolder" else ""
    key = f"v{_CACHE_VERSION}|{source.kind}|{location}|{split}|{image_size}|{subset}|{seed}|{contents}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    size = "orig" if image_size is None else f"{image_size}px"
    picked = "" if subset is None else f"-sub{subset}-seed{seed}"
    return base / "tensors" / f"{source.name}-{split}-{size}{picked}-{digest}.pt"


def folder_fingerprint(split_dir: Path) -> str:
    """A digest of an ImageFolder split's contents: its class folders and, for every image, the
    path, size and modification time (a ``stat`` per file, no reading, so it stays cheap), so
    that a file added, removed, renamed or rewritten gives another digest."""
    lines = [f"{name}/" for name in class_folders(split_dir)]
    for name in class_folders(split_dir):
        lines += _image_stats(os.path.join(split_dir, name), f"{name}/")
    return hashlib.sha1("\n".join(sorted(lines)).encode()).hexdigest()


def _image_stats(folder: str, prefix: str) -> list[str]:
    """``"<relative path>\\t<size>\\t<mtime ns>"`` of every image under ``folder`` (links followed)."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                found += _image_stats(entry.path, f"{prefix}{entry.name}/")
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                info = entry.stat()
                found.append(f"{prefix}{entry.name}\t{info.st_size}\t{info.st_mtime_ns}")
    return found


def _read_cache(path: Path) -> ImageTensors | None:
    """The cached tensors, or ``None`` if there is no (readable) cache file."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
        return ImageTensors(**state)
    except Exception as error:  # a foreign or damaged file: rebuild it
        warnings.warn(f"ignoring unreadable cache file {path}: {error}", stacklevel=3)
        return None


def _as_dict(data: ImageTensors) -> dict:
    """The fields of ``data`` (no deep copy, unlike ``dataclasses.asdict``)."""
    return {field.name: getattr(data, field.name) for field in dataclasses.fields(data)}


def _write_cache(path: Path, data: ImageTensors) -> None:
    """Save ``data`` atomically: a temporary file beside ``path``, fsync, rename."""
    save_atomic(_as_dict(data), path)


# ----------------------------------------------------------------------------------------------
# Batches from resident tensors
# ----------------------------------------------------------------------------------------------
def batch_indices(
    n: int,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = True,
    start: int = 0,
    rows: tuple[int, int] | None = None,
) -> Iterator[Tensor]:
    """Index batches over ``range(n)``: one permutation drawn from ``generator`` per call.

    For an exact resume mid-epoch, restore the generator's state from the start of the epoch
    and pass ``start`` = the number of batches already done.

    With ``rows = (first, stop)`` only the rows ``[first, stop)`` of every batch are yielded (the
    permutation is the same): a process of a multi-process run takes its shard of every global
    batch this way. Rows other than the whole batch need ``drop_last=True`` when ``n`` is no
    multiple of ``batch_size`` (a trailing short batch would not split like the others).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    first, last = _check_rows(rows, batch_size, n, drop_last)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for begin in range(start * batch_size, stop, batch_size):
        yield order[begin : begin + batch_size][first:last]


def _check_rows(rows: tuple[int, int] | None, batch_size: int, n: int, drop_last: bool) -> tuple[int, int]:
    """``rows`` as ``(first, stop)`` (default: the whole batch), checked against the batches.

    Raises:
        ValueError: ``rows`` is no range of ``range(batch_size)``, or only part of the batch
            while a trailing short batch is kept (``drop_last=False``): it would not split
            like the others.
    """
    if rows is None:
        return 0, batch_size
    first, last = int(rows[0]), int(rows[1])
    if not 0 <= first < last <= batch_size:
        raise ValueError(f"rows {(first, last)} are not a non-empty range of a batch of {batch_size}")
    if (first, last) != (0, batch_size) and not drop_last and n % batch_size:
        raise ValueError(
            f"rows {(first, last)} of a trailing batch of {n % batch_size} images: use drop_last=True"
        )
    return first, last


def batches(
    data: ImageTensors,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = True,
    start: int = 0,
    rows: tuple[int, int] | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(images, labels)`` batches sliced from resident tensors, on their device.

    The permutation is drawn on the CPU from ``generator`` (seeded, so a run and its resume see
    the same order, see :func:`batch_indices`) and moved to the data's device. With ``rows``,
    only those rows of every batch (:func:`batch_indices`).
    """
    device = data.images.device
    for idx in batch_indices(len(data), batch_size, shuffle, generator, drop_last, start, rows):
        idx = idx.to(device, non_blocking=True)
        yield data.images[idx], data.labels[idx]


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------
def streaming_loader(
    root_or_split_dir: Path | str,
    image_size: int,
    batch_size: int,
    num_workers: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    split: str | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    subset: int | None = None,
    rows: tuple[int, int] | None = None,
) -> DataLoader:
    """A ``DataLoader`` of ``(uint8 (B, 3, S, S), int64 (B,))`` batches decoded from an ImageFolder.

    Each worker decodes an image, resizes its shorter side to ``image_size`` and crops the
    center square (:func:`decode_image`). The batch then goes to the device, where the
    augmentations (random-resized crop included) run batched on these fixed-size crops, as for
    resident data. The crop loses the borders of non-square images: the price of fixed-size,
    cheap-to-move uint8 batches. For ImageNet at 224 px, decode at a larger ``image_size``
    (e.g. 256) and crop on the device.

    Args:
        root_or_split_dir: a split folder (``<split>/<class>/<image>``), or with ``split`` an
            ImageFolder root.
        image_size: side ``S`` of the decoded images.
        batch_size: images per batch.
        num_workers: decoding processes, default ``min(8, cpu count)``.
        shuffle: reshuffle every epoch, from a generator seeded with ``seed``.
        seed: seed of the shuffling (and of the workers' base seed).
        split: ``"train"``, ``"test"`` or ``"val"`` when ``root_or_split_dir`` is a root.
        drop_last: drop the last incomplete batch.
        pin_memory: default: when CUDA is available.
        subset: stream only this many images, a class-balanced subset chosen with ``seed`` (the
            same images as ``load_split(..., subset=subset, seed=seed)``).
        rows: ``(first, stop)``: of every batch of ``batch_size`` indices, load only the rows
            ``[first, stop)`` (:class:`SeededBatchSampler`). A process of a multi-process run
            passes its shard of the global batch (:func:`or_core.distributed.shard_rows`), so
            that its workers decode ``batch_size / W`` images per step instead of all of them.
    """
    split_dir = _streaming_split_dir(Path(root_or_split_dir).expanduser(), split)
    expected = None
    if split is not None and split != "train":  # labels matched to the training split's by name
        expected = _training_classes(resolve_dataset(Path(root_or_split_dir).expanduser()), split_dir)
    classes, files, labels = scan_image_folder(split_dir, expected)
    if subset is not None:
        keep = balanced_subset(torch.tensor(labels), subset, seed).tolist()
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    workers = _default_workers() if num_workers is None else num_workers
    return DataLoader(
        _DecodedFiles(files, labels, image_size, classes),
        batch_sampler=SeededBatchSampler(len(files), batch_size, shuffle, drop_last, seed, rows),
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
    )


class SeededBatchSampler(Sampler[list[int]]):
    """Index batches of a new permutation per pass (:func:`batch_indices`), drawn from
    ``generator`` in the main process. Setting ``generator`` before a pass (e.g. to a state
    that depends on the epoch alone) fixes that pass's order, whatever came before: what an
    exact resume of a streamed run needs. The workers draw nothing.

    With ``rows = (first, stop)`` every batch of ``batch_size`` indices is cut to its rows
    ``[first, stop)``: processes that set the same generator and take disjoint rows load
    disjoint shards of the same global batches."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rows: tuple[int, int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.rows = _check_rows(rows, batch_size, n, drop_last)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[list[int]]:
        indices = batch_indices(self.n, self.batch_size, self.shuffle, self.generator, self.drop_last, rows=self.rows)
        for idx in indices:
            yield idx.tolist()

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


def _streaming_split_dir(path: Path, split: str | None) -> Path:
    """``path/<split>`` for a root, ``path`` itself for a split folder."""
    if split is not None:
        return resolve_dataset(path).split_dir(split)
    if (path / "train").is_dir() and ((path / "val").is_dir() or (path / "test").is_dir()):
        raise ValueError(f"{path} is a data set root (train/, val/ or test/): pass split=")
    return path
