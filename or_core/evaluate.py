"""Evaluation of a frozen encoder: weighted kNN and a linear probe on precomputed features.

Both read the features of the final weights (never the best epoch). kNN follows lightly's
benchmarks (Wu et al. 2018's weighted vote, ``k = 200``, ``t = 0.1`` on l2-normalized features)
through lightly's own :func:`~lightly.utils.benchmarking.knn_predict`; the linear probe is a
single ``nn.Linear`` trained with SGD on standardized features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict
from lightly.utils.benchmarking.topk import mean_topk_accuracy
from torch import Tensor, nn

from or_core.compiling import eager

__all__ = ["extract_features", "knn_accuracy", "linear_probe_accuracy"]


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
    without other augmentation. The backbone's train/eval mode is restored afterwards. A backbone
    compiled for training (:mod:`or_core.compiling`) runs eagerly here.
    """
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        with eager(backbone):
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(device, non_blocking=True).float().div_(255)
                x = (x - mean_t) / std_t
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
