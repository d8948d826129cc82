"""What orthogonality regularization costs in a training step: fast vs naive, SO and SRIP.

Three figures, from interleaved repeats (every repeat runs each variant once, in a shuffled
order, so the drifts of a noisy machine hit all of them alike):

* ``step``: a BYOL-style training step (two views, online ResNet-18 + projector + predictor,
  EMA target forward, SGD update) with no OR, with the naive OR and with the fast OR.
  ``step_median_ratio_vs_none`` (``/ none``) is ``median step(variant) / median step(none)``,
  the cost of leaving OR on, measured directly; ``step_ratio_vs_none`` (``paired``) is the
  median over repeats of the ratio within one repeat, with its range.
* ``or_only``: the OR term's forward and backward alone (medians); ``naive / fast`` is the
  speed-up of the implementation.
* ``additive_ratio_vs_none``: ``1 + or_only / step(none)``. The OR term is a separate branch of
  the graph, so this is what it adds to a step; on a busy machine it is far less noisy than
  the direct ratio, whose spread the JSON also reports (``step_ratio_range``).

"naive" is the per-layer autograd loop one would write first: ``sum(so_penalty(w) for w in ...)``
(autograd through each Gram) and, for SRIP, Bansal et al.'s form: the Gram formed with autograd
and two power iterations from a fresh random vector each step. "fast" is
:class:`or_core.OrthogonalityRegularizer`.

Usage::

    python benchmarks/or_overhead.py                      # CPU (and CUDA if present)
    python benchmarks/or_overhead.py --batch-size 64 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import update_momentum
from lightly.loss import NegativeCosineSimilarity
from torch import Tensor, nn

from or_core import OrthogonalityRegularizer, regularized_weights, so_penalty, srip_penalty
from or_core.backbones import build_backbone
from or_core.provenance import git_commit

VARIANTS = ("none", "so-naive", "so-fast", "srip-naive", "srip-fast")


def naive_term(kind: str, weights: list[Tensor], gamma: float) -> Tensor:
    """The per-layer autograd loop: every Gram formed and differentiated by autograd."""
    if kind == "so":
        return gamma * sum(so_penalty(w) for w in weights)
    return gamma * sum(srip_penalty(w, n_power_iterations=2) for w in weights)


class BYOLStep:
    """One BYOL training step on a given backbone, with an optional OR term."""

    def __init__(self, device: torch.device, batch_size: int, image_size: int) -> None:
        backbone, dim = build_backbone("resnet18", image_size=image_size)
        self.online = nn.Sequential(backbone, BYOLProjectionHead(dim, 4096, 256)).to(device)
        self.predictor = BYOLPredictionHead(256, 4096, 256).to(device)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.backbone = backbone
        self.weights = [w for _, w in regularized_weights(backbone)]
        self.fast = {
            "so": OrthogonalityRegularizer(backbone, "so").to(device),
            "srip": OrthogonalityRegularizer(backbone, "srip").to(device),
        }
        params = list(self.online.parameters()) + list(self.predictor.parameters())
        self.optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        self.criterion = NegativeCosineSimilarity()
        self.device = device
        g = torch.Generator().manual_seed(0)
        self.views = [
            torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device) for _ in range(2)
        ]
        self.autocast = device.type == "cuda"
        if self.autocast:
            self.online.to(memory_format=torch.channels_last)
            self.target.to(memory_format=torch.channels_last)
            self.views = [v.contiguous(memory_format=torch.channels_last) for v in self.views]

    def or_term(self, variant: str) -> Tensor | None:
        if variant == "none":
            return None
        kind, how = variant.split("-")
        if how == "fast":
            return self.fast[kind]()
        return naive_term(kind, self.weights, self.fast[kind].gamma)

    def step(self, variant: str) -> None:
        update_momentum(self.online, self.target, 0.99)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            x0, x1 = self.views
            p0, p1 = self.predictor(self.online(x0)), self.predictor(self.online(x1))
            with torch.no_grad():
                z0, z1 = self.target(x0), self.target(x1)
            loss = 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        term = self.or_term(variant)
        if term is not None:
            loss = loss + term
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def or_only(self, variant: str) -> None:
        for w in self.weights:
            w.grad = None
        self.or_term(variant).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fn: Callable[[str], None], variants: tuple[str, ...], repeats: int, device: torch.device, seed: int
) -> dict[str, list[float]]:
    """Seconds per variant and repeat; each repeat runs every variant once, in a shuffled order."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up
        fn(v)
    for _ in range(repeats):
        order = list(variants)
        rng.shuffle(order)
        for v in order:
            _sync(device)
            start = time.perf_counter()
            fn(v)
            _sync(device)
            times[v].append(time.perf_counter() - start)
    return times


def measure(
    device: torch.device, batch_size: int, image_size: int, repeats: int, or_repeats: int,
    step_variants: tuple[str, ...] = VARIANTS,
) -> dict:
    bench = BYOLStep(device, batch_size, image_size)
    step_times = interleaved_times(bench.step, step_variants, repeats, device, seed=0)
    or_times = interleaved_times(bench.or_only, VARIANTS[1:], or_repeats, device, seed=1)
    step = {v: statistics.median(t) for v, t in step_times.items()}
    or_only = {v: statistics.median(t) for v, t in or_times.items()}
    paired = {
        v: [t / base for t, base in zip(step_times[v], step_times["none"])] for v in step_variants[1:]
    }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "image_size": image_size,
        "repeats": repeats,
        "step_s": step,
        "step_ratio_vs_none": {v: statistics.median(r) for v, r in paired.items()},
        "step_median_ratio_vs_none": {v: step[v] / step["none"] for v in step_variants[1:]},
        "step_ratio_range": {v: [min(r), max(r)] for v, r in paired.items()},
        "or_only_s": or_only,
        "additive_ratio_vs_none": {v: 1 + or_only[v] / step["none"] for v in VARIANTS[1:]},
        "or_only_speedup_naive_over_fast": {
            k: or_only[f"{k}-naive"] / or_only[f"{k}-fast"] for k in ("so", "srip")
        },
    }


def _print(name: str, r: dict) -> None:
    print(f"\n{name}: {r['device']}, batch {r['batch_size']} x 2 views, {r['image_size']} px, "
          f"{r['repeats']} interleaved repeats (medians)")
    print(f"{'variant':<12}{'step s':>10}{'/ none':>9}{'paired':>9}{'range':>18}{'OR-only s':>12}{'additive':>10}")
    for v in VARIANTS:
        if v == "none":
            print(f"{v:<12}{r['step_s'][v]:>10.3f}")
            continue
        if v not in r["step_s"]:
            print(f"{v:<12}{'-':>10}{'-':>9}{'-':>9}{'-':>18}{r['or_only_s'][v]:>12.4f}{r['additive_ratio_vs_none'][v]:>10.4f}")
            continue
        lo, hi = r["step_ratio_range"][v]
        print(
            f"{v:<12}{r['step_s'][v]:>10.3f}{r['step_median_ratio_vs_none'][v]:>9.4f}{r['step_ratio_vs_none'][v]:>9.4f}"
            f"{f'[{lo:.3f}, {hi:.3f}]':>18}{r['or_only_s'][v]:>12.4f}{r['additive_ratio_vs_none'][v]:>10.4f}"
        )
    for k, s in r["or_only_speedup_naive_over_fast"].items():
        print(f"{k.upper()} OR-only speed-up, naive / fast: x{s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved step repeats on the CPU")
    parser.add_argument("--cuda-repeats", type=int, default=30)
    parser.add_argument("--or-repeats", type=int, default=10)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement")
    parser.add_argument(
        "--step-variants", nargs="*", default=list(VARIANTS[1:]),
        help="variants timed in whole steps besides none (the OR-only timing covers all)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    results: dict = {
        "benchmark": "or_overhead",
        "command": " ".join(sys.argv),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    if not args.no_cpu:
        step_variants = ("none", *args.step_variants)
        results["cpu"] = measure(
            torch.device("cpu"), args.batch_size, args.image_size, args.repeats, args.or_repeats, step_variants
        )
        _print("CPU", results["cpu"])
    if torch.cuda.is_available():
        results["cuda"] = measure(
            torch.device("cuda"), args.batch_size, args.image_size, args.cuda_repeats, 5 * args.or_repeats
        )
        _print("CUDA", results["cuda"])
    text = json.dumps(results, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
