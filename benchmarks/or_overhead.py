"""What orthogonality regularization costs in a training step: fast vs naive, SO and SRIP.

Two measurements, each as medians of interleaved repeats (variants alternate in a shuffled order
inside every repeat, so drifts of a noisy machine hit all of them alike):

* ``step``: a BYOL-style training step (two views, online ResNet-18 + projector + predictor,
  EMA target forward, SGD update) with no OR, with the naive OR and with the fast OR. The ratio
  ``step(variant) / step(none)`` is the cost of leaving OR on.
* ``or_only``: the OR term's forward and backward alone; ``naive / fast`` is the speed-up.

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
import json
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import update_momentum
from lightly.loss import NegativeCosineSimilarity
from torch import Tensor, nn

from or_core import OrthogonalityRegularizer, regularized_weights, so_penalty, srip_penalty
from or_core.backbones import build_backbone

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


def interleaved_medians(
    fn: Callable[[str], None], variants: tuple[str, ...], repeats: int, device: torch.device, seed: int
) -> dict[str, float]:
    """Median seconds per variant; each repeat runs every variant once, in a shuffled order."""
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
    return {v: statistics.median(t) for v, t in times.items()}


def measure(device: torch.device, batch_size: int, image_size: int, repeats: int, or_repeats: int) -> dict:
    bench = BYOLStep(device, batch_size, image_size)
    step = interleaved_medians(bench.step, VARIANTS, repeats, device, seed=0)
    or_only = interleaved_medians(bench.or_only, VARIANTS[1:], or_repeats, device, seed=1)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "image_size": image_size,
        "repeats": repeats,
        "step_s": step,
        "step_ratio_vs_none": {v: step[v] / step["none"] for v in VARIANTS[1:]},
        "or_only_s": or_only,
        "or_only_speedup_naive_over_fast": {
            k: or_only[f"{k}-naive"] / or_only[f"{k}-fast"] for k in ("so", "srip")
        },
    }


def _print(name: str, r: dict) -> None:
    print(f"\n{name}: {r['device']}, batch {r['batch_size']} x 2 views, {r['image_size']} px, "
          f"{r['repeats']} interleaved repeats (medians)")
    print(f"{'variant':<12}{'step s':>10}{'vs none':>10}{'OR-only s':>12}")
    for v in VARIANTS:
        ratio = "" if v == "none" else f"x{r['step_ratio_vs_none'][v]:.4f}"
        or_s = "" if v == "none" else f"{r['or_only_s'][v]:.4f}"
        print(f"{v:<12}{r['step_s'][v]:>10.3f}{ratio:>10}{or_s:>12}")
    for k, s in r["or_only_speedup_naive_over_fast"].items():
        print(f"{k.upper()} OR-only speed-up, naive / fast: x{s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved step repeats on the CPU")
    parser.add_argument("--cuda-repeats", type=int, default=30)
    parser.add_argument("--or-repeats", type=int, default=10)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurement")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    results: dict = {"torch": torch.__version__, "benchmark": "or_overhead"}
    if not args.no_cpu:
        results["cpu"] = measure(torch.device("cpu"), args.batch_size, args.image_size, args.repeats, args.or_repeats)
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
