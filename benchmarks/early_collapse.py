"""The first steps of DINO or SwaV in the cpu profile, watched for collapse to uniform outputs.

Trains ``--steps`` steps of the run ``resolve_config("cpu", method=...)`` builds (on its real
CIFAR-10 subset, with its learning-rate schedule) and every ``--every`` steps prints, on the
batch about to be trained on:

* DINO: the std over the batch of the teacher's head outputs (cosine scale; the per-image signal
  the targets carry), the entropies of the centered, sharpened teacher targets ``H(t)`` and of
  the student's predictions ``H(s)`` (both ``ln K`` when uniform), and the student's std.
* SwaV: the entropies of the Sinkhorn codes of view 1 ``H(code)`` and of the predictions from
  view 2 ``H(pred)``, the mean cosine between the projections of different images and between
  the two views of one image (different images at cosine 1: every projection is the same).

``--published`` drops the cpu profile's per-method settings
(the method class's ``profile_settings``): the method's published settings at the
profile's sizes, which stay at the loss of uniform predictions. Example::

    python benchmarks/early_collapse.py --method swav --steps 200 --published
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from lightly.loss.swav_loss import sinkhorn

from or_core.config import PROFILES, resolve_config
from or_core.fast_path.batched_views import step_views
from or_core.train import optimization_step
from or_core.training_run import Run, build_run


def _entropy(p: torch.Tensor) -> float:
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())


@torch.no_grad()
def dino_stats(run: Run, views: list[torch.Tensor], progress: float) -> dict[str, float]:
    m = run.method
    teacher = m.forward_teacher(views[0])
    student = m.forward_student(views[1])
    center = m.criterion.center.reshape(1, -1)
    targets = torch.softmax((teacher - center) / m.teacher_temperature(progress), dim=-1)
    predictions = torch.softmax(student / m.criterion.student_temp, dim=-1)
    return {
        "ln_K": math.log(teacher.shape[1]),
        "teacher_std_over_batch": float(teacher.std(0).mean()),
        "H_targets": _entropy(targets),
        "H_predictions": _entropy(predictions),
        "student_std_over_batch": float(student.std(0).mean()),
    }


@torch.no_grad()
def swav_stats(run: Run, views: list[torch.Tensor], progress: float) -> dict[str, float]:
    m = run.method
    m.prototypes.normalize()
    z = [F.normalize(m.projection_head(m.features(v)), dim=1) for v in views[:2]]
    scores = [m.prototypes(v) for v in z]
    codes = sinkhorn(scores[0], iterations=m.criterion.sinkhorn_iterations, epsilon=m.criterion.sinkhorn_epsilon)
    predictions = torch.softmax(scores[1] / m.criterion.temperature, dim=1)
    n = z[0].shape[0]
    cos = z[0] @ z[0].T
    return {
        "ln_K": math.log(scores[0].shape[1]),
        "H_codes": _entropy(codes),
        "H_predictions": _entropy(predictions),
        "mean_cos_between_images": float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))),
        "mean_cos_between_views": float((z[0] * z[1]).sum(1).mean()),
    }


STATS = {"dino": dino_stats, "swav": swav_stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(STATS), required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--published", action="store_true", help="without the profile's per-method settings")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the rows here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve_config("cpu", overrides={"method": args.method})
    if args.published:
        cfg.lr, cfg.method_kwargs = PROFILES["cpu"]["lr"], dict(PROFILES["cpu"]["method_kwargs"])
    run = build_run(cfg)
    total = cfg.epochs * run.steps_per_epoch
    rng = torch.Generator().manual_seed(cfg.seed)

    def batches() -> Iterator[torch.Tensor]:
        for epoch in range(cfg.epochs):
            yield from (images for images, _ in run.epoch_batches(epoch))

    settings = "published" if args.published else "cpu-profile"
    print(f"{args.method}, {settings} settings: lr {cfg.lr}, method_kwargs {cfg.method_kwargs}")
    rows, start = [], time.perf_counter()
    for step, views in enumerate(step_views(run, batches(), rng)):
        if step >= args.steps:
            break
        progress = step / total
        stats = STATS[args.method](run, views, progress) if step % args.every == 0 else None
        loss = float(optimization_step(run, views, progress)["ssl_loss"])
        if stats is not None:
            row = {"step": step, "ssl_loss": loss, **stats, "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"method": args.method, "published": args.published, "config": cfg.to_dict(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
