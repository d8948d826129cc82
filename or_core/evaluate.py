"""Evaluation of a frozen encoder: its features, weighted kNN and a linear probe, and the final
evaluation of a run into its ``summary.json``.

* :func:`normalized_batches`, :func:`extract_features`: the one path from a run's uint8 images
  to the inputs of its encoder (scaled to ``[0, 1]``, normalized with the training
  ``mean``/``std``) and to its features; the collapse spectra of
  :func:`or_core.measure.collapse_spectra` read the same batches;
* :func:`knn_accuracy`, :func:`linear_probe_accuracy`: on precomputed features of the final
  weights (never the best epoch). kNN follows lightly's benchmarks (Wu et al. 2018's weighted
  vote, ``k = 200``, ``t = 0.1`` on l2-normalized features) through lightly's own
  :func:`~lightly.utils.benchmarking.knn_predict`; the linear probe is a single ``nn.Linear``
  trained with SGD on standardized features;
* :func:`evaluate_run`: kNN, linear probe and collapse scalars of a trained :class:`Run`, the
  summary :func:`or_core.train.pretrain` writes; :func:`evaluate_dir`: the same for the last
  checkpoint of a run directory, with other evaluation settings.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from lightly.utils.benchmarking.topk import mean_topk_accuracy
from torch import Tensor, nn

from or_core.checkpoint import load_run_checkpoint
from or_core.config import PretrainConfig, fit_to_data
from or_core.data import load_holdout, load_split, resolve_dataset, streaming_loader
from or_core.diagnostics import effective_rank, rankme, std_of_l2_normalized
from or_core.divergence import check_finite_weights, require_finite
from or_core.errors import ConfigError
from or_core.fast_path.compiled_calls import eager
from or_core.orthogonality import regularized_weights, so_penalty
from or_core.provenance import versions
from or_core.reference_cache import cached_value, tensor_digest
from or_core.run_files import CHECKPOINT_FILE, write_summary
from or_core.training_run import Run, build_run, initial_backbone

__all__ = [
    "EVALUATION_FIELDS",
    "normalized_batches",
    "extract_features",
    "raw_pixel_knn",
    "knn_accuracy",
    "linear_probe_accuracy",
    "device_name",
    "evaluate_run",
    "evaluate_dir",
]

#: The config fields that ``evaluate`` may change: they decide how, not what, was trained.
EVALUATION_FIELDS = ("eval_train_subset", "eval_test_subset", "val_images", "linear_epochs", "knn_k", "knn_t")


def normalized_batches(
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> Iterator[Tensor]:
    """Batches of uint8 images ``(N, 3, H, W)`` as the encoder sees them at evaluation:
    on ``device``, float32, ``x / 255`` normalized per channel, ``(x / 255 - mean) / std``
    (``mean``/``std`` those of training), without other augmentation."""
    device = torch.device(device) if device is not None else images.device
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True).float().div_(255)
        yield (x - mean_t) / std_t


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 512,
    device: torch.device | str | None = None,
    amp: bool = False,
) -> Tensor:
    """Backbone features ``(N, D)`` in float32 of uint8 images ``(N, 3, H, W)``, in eval mode.

    Images are scaled to ``[0, 1]`` and normalized with ``mean``/``std`` (those of training),
    without other augmentation (:func:`normalized_batches`). The backbone's train/eval mode is
    restored afterwards. A backbone compiled for training (:mod:`or_core.fast_path.compiled_calls`)
    runs eagerly here.
    """
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        with eager():
            for x in normalized_batches(images, mean, std, batch_size, device):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                    out.append(backbone(x).flatten(start_dim=1).float())
    finally:
        backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of the weighted kNN classifier of lightly's benchmarks.

    Each test feature votes with its ``k`` most cosine-similar training features, neighbour
    ``j`` weighing ``exp(s_j / t)`` for its class (Wu et al., CVPR 2018). ``k`` is capped at the
    number of training features.
    """
    bank = F.normalize(train_features, dim=1).t().contiguous()
    labels = train_labels.to(bank.device)
    k = min(k, bank.shape[1])
    correct = {1: 0.0, 5: 0.0}
    for start in range(0, test_features.shape[0], batch_size):
        feats = F.normalize(test_features[start : start + batch_size].to(bank.device), dim=1)
        target = test_labels[start : start + batch_size].to(bank.device)
        predicted = knn_predict(feats, bank, labels, num_classes, knn_k=k, knn_t=t)
        accuracy = mean_topk_accuracy(predicted, target, k=(1, min(5, num_classes)))
        for key, top in ((1, 1), (5, min(5, num_classes))):
            correct[key] += accuracy[top].item() * target.shape[0]
    n = test_features.shape[0]
    return {"top1": correct[1] / n, "top5": correct[5] / n}


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1 and top-5 test accuracy of a linear classifier on frozen features.

    Features are standardized with the training set's mean and standard deviation; the
    classifier is trained with SGD (momentum 0.9) and a cosine learning-rate decay over
    ``epochs`` passes of shuffled mini-batches, then evaluated once.
    """
    device = train_features.device
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp_min(1e-6)
    x_train = (train_features - mean) / std
    x_test = (test_features.to(device) - mean) / std
    y_train = train_labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        classifier.weight.copy_(0.01 * torch.randn(classifier.weight.shape, generator=generator))
        classifier.bias.zero_()
    classifier.to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-x_train.shape[0] // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=generator).to(device)
        for start in range(0, x_train.shape[0], batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(classifier(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        predicted = classifier(x_test).argsort(dim=1, descending=True)
        top5 = min(5, num_classes)
        accuracy = mean_topk_accuracy(predicted, test_labels.to(device), k=(1, top5))
    return {"top1": accuracy[1].item(), "top5": accuracy[top5].item()}


# ----------------------------------------------------------------------------------------------
# The final evaluation of a run
# ----------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (<processor>, <n> threads)``: the ``device`` of a summary."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def evaluate_run(run: Run, history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """The summary of a trained run: kNN and linear probe of the final backbone, collapse
    scalars (effective rank, RankMe, std of the l2-normalized features of the test images, the
    SO penalty of the regularized weights), timing, and the code's :func:`~or_core.provenance.versions`."""
    cfg = run.cfg
    root = Path(os.path.expanduser(cfg.data_root))
    backbone = run.method.backbone
    train_feats, train_labels, num_classes = _split_features(run, root, "train", cfg.eval_train_subset)
    test_feats, test_labels, _ = _split_features(run, root, "test", cfg.eval_test_subset)
    require_finite(train_feats, "the features of the evaluation's training images")
    require_finite(test_feats, "the features of the evaluation's test images")
    knn = knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, cfg.knn_k, cfg.knn_t)
    linear = linear_probe_accuracy(
        train_feats, train_labels, test_feats, test_labels, num_classes, epochs=cfg.linear_epochs, seed=cfg.seed
    )
    val = _validation_knn(run, root)
    pixels = raw_pixel_knn(run, root)
    untrained = untrained_knn(run, root)
    with torch.no_grad():
        so_total = sum(so_penalty(w.detach()).item() for _, w in regularized_weights(backbone))
    regularizer = run.method.regularizer
    code = versions()
    return {
        "method": cfg.method,
        "regularizer": cfg.regularizer,
        "gamma": regularizer.gamma if regularizer is not None else None,
        "backbone": cfg.backbone,
        "width": cfg.width,
        "dataset": cfg.dataset,
        "profile": cfg.profile,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "train_images": run.train_size,
        "image_size": run.image_size,
        "seed": cfg.seed,
        "knn_k": cfg.knn_k,
        "knn_t": cfg.knn_t,
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "raw_pixels_knn_top1": pixels,
        "untrained_knn_top1": untrained,
        "linear_top1": linear["top1"],
        "linear_top5": linear["top5"],
        "eval_train_images": len(train_labels),
        "eval_test_images": len(test_labels),
        "val_knn_top1": val["top1"] if val else None,
        "val_images": cfg.val_images if val else None,
        "effective_rank": effective_rank(test_feats),
        "rankme": rankme(test_feats),
        "std_of_l2_normalized": std_of_l2_normalized(test_feats).item(),
        "or_so_total": so_total,
        "final_ssl_loss": history[-1]["ssl_loss"] if history else math.nan,
        "wall_time_s": wall,
        "images_per_s": run.steps_per_epoch * cfg.batch_size * cfg.epochs / wall if wall > 0 else math.nan,
        "device": device_name(run.device),
        "torch": code["torch"],
        "lightly": code["lightly"],
        "python": code["python"],
        "git_commit": code["git_commit"],
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _split_features(
    run: Run, root: Path, split: str, subset: int | None, backbone: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Frozen features of ``backbone`` (default: the run's), labels and class count of a split
    (a class-balanced subset of ``subset`` images if given). Resident runs decode the split into
    the tensor cache; a streaming run streams it through DataLoader workers (only the features
    stay in memory)."""
    cfg = run.cfg
    backbone = run.method.backbone if backbone is None else backbone
    features = lambda images: extract_features(  # noqa: E731
        backbone, images, run.mean, run.std, device=run.device, amp=cfg.amp
    )
    if not cfg.stream:
        data = load_split(cfg.dataset, split, root, cfg.image_size, subset, cfg.seed)
        return features(data.images), data.labels, data.num_classes
    loader = streaming_loader(
        resolve_dataset(cfg.dataset, root).root, run.image_size, 256, cfg.num_workers, shuffle=False, split=split,
        seed=cfg.seed, subset=subset,
    )
    feats, labels = [], []
    for images, y in loader:
        feats.append(features(images))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels), len(loader.dataset.classes)


def untrained_knn(run: Run, root: Path) -> float | None:
    """kNN top-1 of the run's encoder before training: :func:`~or_core.training_run.initial_backbone`
    rebuilds the same architecture from the same seed, hence the same initial weights, and the same
    kNN runs on the same images. A method whose kNN is not above it has learned nothing that kNN
    can use. Rebuilding it leaves the global random state as it was. ``None`` for a streamed run, as for
    :func:`raw_pixel_knn`. Computed once per initial weights and evaluation images, then read
    from :mod:`or_core.reference_cache`."""
    cfg = run.cfg
    if cfg.stream:
        return None
    with torch.random.fork_rng(devices=[]):
        backbone, _ = initial_backbone(cfg, run.image_size)
    backbone.to(run.device)

    def compute() -> float:
        train_feats, train_labels, num_classes = _split_features(run, root, "train", cfg.eval_train_subset, backbone)
        test_feats, test_labels, _ = _split_features(run, root, "test", cfg.eval_test_subset, backbone)
        return knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes, cfg.knn_k, cfg.knn_t)["top1"]

    key = {**_reference_key(run, *_evaluation_splits(run, root)), "weights": tensor_digest(backbone.state_dict().values()),
           "amp": cfg.amp, "device": run.device.type}
    return cached_value("untrained_knn", key, compute)


def _evaluation_splits(run: Run, root: Path) -> tuple[Any, Any]:
    """The evaluation's training and test images (uint8, from the tensor cache)."""
    cfg = run.cfg
    return (load_split(cfg.dataset, "train", root, cfg.image_size, cfg.eval_train_subset, cfg.seed),
            load_split(cfg.dataset, "test", root, cfg.image_size, cfg.eval_test_subset, cfg.seed))


def _reference_key(run: Run, train: Any, test: Any) -> dict[str, Any]:
    """What both references depend on besides the encoder: the evaluation images and labels
    (their digest), the normalization and the kNN settings."""
    cfg = run.cfg
    return {"images": tensor_digest([train.images, train.labels, test.images, test.labels]),
            "mean": list(run.mean), "std": list(run.std), "knn_k": cfg.knn_k, "knn_t": cfg.knn_t}


def raw_pixel_knn(run: Run, root: Path) -> float | None:
    """kNN top-1 of the identity encoder: the evaluation images themselves, normalized as for
    training and flattened, with the same kNN on the same images. A trained encoder that does
    not beat it has learned nothing kNN can use. ``None`` for a streamed run (its images are
    not held in memory). Computed once per evaluation images, then read from
    :mod:`or_core.reference_cache`."""
    cfg = run.cfg
    if cfg.stream:
        return None
    train, test = _evaluation_splits(run, root)
    flatten = nn.Flatten()

    def pixels(images: torch.Tensor) -> torch.Tensor:
        return extract_features(flatten, images, run.mean, run.std, device=run.device)

    def compute() -> float:
        return knn_accuracy(pixels(train.images), train.labels, pixels(test.images), test.labels,
                            train.num_classes, cfg.knn_k, cfg.knn_t)["top1"]

    return cached_value("raw_pixels_knn", {**_reference_key(run, train, test), "device": run.device.type}, compute)


def _validation_knn(run: Run, root: Path) -> dict[str, float] | None:
    """kNN top-1 of held-out training images (:func:`or_core.data.load_holdout`) against the
    pretraining images: the number hyper-parameters are chosen on. ``None`` without a
    ``val_images`` setting or when the run trains on the whole training split."""
    cfg = run.cfg
    if not cfg.val_images or cfg.subset is None or run.train is None:
        return None
    holdout = load_holdout(cfg.dataset, cfg.val_images, cfg.subset, cfg.seed, root, cfg.image_size)
    backbone = run.method.backbone
    bank = extract_features(backbone, run.train.images, run.mean, run.std, device=run.device, amp=cfg.amp)
    queries = extract_features(backbone, holdout.images, run.mean, run.std, device=run.device, amp=cfg.amp)
    return knn_accuracy(
        bank, run.train.labels.to(bank.device), queries, holdout.labels.to(bank.device),
        holdout.num_classes, cfg.knn_k, cfg.knn_t,
    )


def evaluate_dir(out: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Re-evaluate the last checkpoint of the run in ``out`` and rewrite its ``summary.json``.

    The run's config is the checkpoint's own (``config.yaml`` only for checkpoints without
    one); ``overrides`` change its evaluation fields (``eval_train_subset``,
    ``eval_test_subset``, ``val_images``, ``linear_epochs``, ``knn_k``, ``knn_t``), and sizes
    larger than the data are clipped to it (:func:`or_core.config.fit_to_data`).
    """
    out = Path(out)
    state, saved = load_run_checkpoint(out, "evaluate")
    overrides = dict(overrides or {})
    not_evaluation = sorted(set(overrides) - set(EVALUATION_FIELDS))
    if not_evaluation:
        raise ConfigError(f"evaluate changes only {', '.join(EVALUATION_FIELDS)}; not {not_evaluation}")
    cfg = fit_to_data(PretrainConfig.from_dict({**saved, **overrides}, str(out / CHECKPOINT_FILE)))
    run = build_run(cfg)
    run.method.load_state_dict(state["method"])
    check_finite_weights(run.method, f"in {out / CHECKPOINT_FILE} (epoch {state['epoch']})")
    summary = evaluate_run(run, state["history"], state["train_wall_time_s"])
    summary["evaluated_epoch"] = state["epoch"]
    write_summary(out, summary)
    return summary
