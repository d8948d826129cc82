"""Throughput of or_core's batched augmentation vs lightly's per-image transforms.

Workload: BYOL's two views at 32 px for real CIFAR-10 training images, batch 256.

* **lightly**: ``BYOLTransform(BYOLView1Transform(input_size=32, gaussian_blur=0.0),
  BYOLView2Transform(input_size=32, gaussian_blur=0.0))`` -- the setup of lightly's CIFAR-10
  examples/benchmark ("we disable resizing and gaussian blur for cifar10"; ImageNet
  normalization, lightly's default) -- applied per PIL image by a ``torch.utils.data.DataLoader``
  (``num_workers=2``, ``batch_size=256``, shuffled, ``persistent_workers=True``) over the
  images held in memory as PIL images (decoded once, as torchvision's CIFAR10 dataset does).
* **or_core**: ``MultiViewAugment(method_views("byol", 32))`` (BYOL views, blur off at 32 px,
  CIFAR-10 normalization) on batches cut from a resident uint8 tensor of the same images
  (shuffled index per epoch, the batch gather included in the time), in the main process
  with torch's default thread count, and again with one thread; on CUDA too if available.

Each row is one full pass over the images per repeat, after one warm-up pass; the reported
figure is the median over the repeats, in two-view images per second.

Usage::

    python benchmarks/augment.py [--num-images 5120] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from or_core.augment import MultiViewAugment, method_views

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 256
IMAGE_SIZE = 32


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _decode_with_pil(split_dir: Path, num_images: int, seed: int) -> Tensor:
    """Fallback: decode ``num_images`` random files of an ImageFolder split with PIL."""
    files = sorted(
        p for p in split_dir.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:num_images]
    arrays = [torch.from_numpy(np.asarray(Image.open(files[int(i)]).convert("RGB"))) for i in pick]
    return torch.stack(arrays).permute(0, 3, 1, 2).contiguous()


def load_cifar10_train(data_root: Path | None, num_images: int, seed: int = 0) -> Tensor:
    """uint8 ``(N, 3, 32, 32)`` CIFAR-10 training images.

    ``data_root`` holds ``cifar10/train/<class>/*.jpg``; without it the shared archive
    ``<repo>/../shared/datasets/cifar10.tar.gz`` is extracted into or_core's cache (as the
    tests do). Uses ``or_core.data.load_split`` when available, else decodes with PIL.
    """
    try:
        from or_core import data as or_data
    except ImportError:  # pragma: no cover - the data module is optional for this script
        or_data = None
    if data_root is None:
        archive = Path(
            os.environ.get("OR_CORE_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
        )
        archive = archive / "cifar10.tar.gz"
        if or_data is None:
            raise SystemExit("pass --data-root (folder holding cifar10/train)")
        tree = or_data.extract_archive(archive, or_data.default_cache_dir() / "datasets")
        data_root = tree.parent if tree.name == "cifar10" else tree
    if or_data is not None:
        return or_data.load_split(
            "cifar10", "train", data_root, subset=num_images, seed=seed
        ).images
    return _decode_with_pil(Path(data_root) / "cifar10" / "train", num_images, seed)


class _PILDataset(Dataset):
    """In-memory PIL images with a per-image transform (like torchvision's CIFAR10)."""

    def __init__(self, images: Tensor, transform: Callable) -> None:
        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), 0


# ----------------------------------------------------------------------------------------------
# Timed runs
# ----------------------------------------------------------------------------------------------
def _timed(
    run_epoch: Callable[[], int], repeats: int, sync: Callable[[], None] = lambda: None
) -> dict:
    """Run one warm-up epoch and ``repeats`` timed epochs; images/s per epoch and median."""
    run_epoch()
    sync()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = run_epoch()
        sync()
        rates.append(n / (time.perf_counter() - start))
    return {"median_images_per_s": statistics.median(rates), "images_per_s": rates}


def bench_lightly(images: Tensor, repeats: int, num_workers: int) -> dict:
    from lightly.transforms.byol_transform import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
    )

    transform = BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=IMAGE_SIZE, gaussian_blur=0.0),
        view_2_transform=BYOLView2Transform(input_size=IMAGE_SIZE, gaussian_blur=0.0),
    )
    loader = DataLoader(
        _PILDataset(images, transform),
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )

    def epoch() -> int:
        n = 0
        for (view1, view2), _ in loader:
            assert view1.shape == view2.shape == (BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE)
            n += view1.shape[0]
        return n

    return _timed(epoch, repeats)


def bench_ours(images: Tensor, repeats: int, device: torch.device, threads: int | None) -> dict:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        data = images.to(device)
        augment = MultiViewAugment(method_views("byol", IMAGE_SIZE))
        gen = torch.Generator().manual_seed(0)
        steps = data.shape[0] // BATCH_SIZE

        def epoch() -> int:
            order = torch.randperm(data.shape[0], generator=gen).to(device)
            for step in range(steps):
                batch = data[order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]]
                view1, view2 = augment(batch, generator=gen)
            assert view1.shape == view2.shape == (BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE)
            return steps * BATCH_SIZE

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        return _timed(epoch, repeats, sync)
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--num-images", type=int, default=5120, help="CIFAR-10 train images (default 5120)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per row (default 5)")
    parser.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers for lightly (default 2)"
    )
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding cifar10/train")
    parser.add_argument(
        "--json", type=Path, default=None, help="write the results here (default: stdout)"
    )
    args = parser.parse_args(argv)

    images = load_cifar10_train(args.data_root, args.num_images)
    images = images[: (images.shape[0] // BATCH_SIZE) * BATCH_SIZE].contiguous()
    rows: dict[str, dict] = {}
    rows[f"lightly BYOLTransform, DataLoader workers={args.workers}"] = bench_lightly(
        images, args.repeats, args.workers
    )
    default_threads = torch.get_num_threads()
    rows[f"or_core MultiViewAugment, cpu, {default_threads} threads"] = bench_ours(
        images, args.repeats, torch.device("cpu"), None
    )
    if default_threads != 1:
        rows["or_core MultiViewAugment, cpu, 1 thread"] = bench_ours(
            images, args.repeats, torch.device("cpu"), 1
        )
    if torch.cuda.is_available():
        rows[f"or_core MultiViewAugment, cuda ({torch.cuda.get_device_name()})"] = bench_ours(
            images, args.repeats, torch.device("cuda"), None
        )

    baseline = next(iter(rows.values()))["median_images_per_s"]
    for row in rows.values():
        row["speedup_vs_lightly"] = row["median_images_per_s"] / baseline
    result = {
        "workload": "BYOL two views, 32 px, batch 256, CIFAR-10 train images",
        "num_images": int(images.shape[0]),
        "repeats": args.repeats,
        "unit": "two-view images per second (median over repeats)",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "rows": rows,
    }

    width = max(len(name) for name in rows)
    header = ("img/s (median)", "min", "max", "vs lightly")
    print(
        f"{'configuration':<{width}}  {header[0]:>14}  {header[1]:>8}  {header[2]:>8}  {header[3]:>10}"
    )
    for name, row in rows.items():
        rates = row["images_per_s"]
        median, speedup = row["median_images_per_s"], row["speedup_vs_lightly"]
        print(
            f"{name:<{width}}  {median:>14.0f}  {min(rates):>8.0f}  {max(rates):>8.0f}  {speedup:>9.2f}x"
        )
    print(f"(load average during the run: {result['machine']['load_average_1m']})")
    if args.json is None:
        print(json.dumps(result, indent=2))
    else:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
