"""Where a training step's time goes: wall time, host time per phase, GPU kernel time, launches.

A step is ``augment`` (:func:`or_core.fast_path.step_views`), then ``forward`` (EMA update, loss and OR term),
``backward`` and ``optimizer`` (update, schedule), the labels
:func:`or_core.train.optimization_step` gives its phases. For each configuration this prints

* ``wall ms``: the step's wall time, from ``steps`` unprofiled steps after a warm-up;
* the host (CPU) time of each phase, from a torch.profiler trace of ``profiled`` more steps;
* ``kernel ms``: the summed time of the GPU kernels per step, and ``launches`` per step;
* ``host ops``: top-level ATen operators the host dispatches per step in each phase (an op
  called by another op is not counted again), on any device: each costs the host a few
  microseconds and on CUDA launches one or more kernels, so on the CPU it measures the
  launch-bound part of a GPU step (autocast, on CUDA only, adds its casts).

On CUDA, ``kernel ms`` well under ``wall ms`` means the GPU idles while the host issues ops:
the step is bound by launches, not by arithmetic, and a larger batch raises images/s nearly in
proportion. Run it on a GPU; on the CPU the kernel columns are empty.

Usage::

    python benchmarks/step_profile.py --method byol --regularizers none so \\
        --augment-batches 1 8 --batch-sizes 256 1024 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from or_core.config import resolve_config
from or_core.provenance import provenance
from or_core.evaluate import device_name
from or_core.fast_path.batched_views import step_views
from or_core.train import optimization_step
from or_core.training_run import build_run

PHASES = ("augment", "forward", "backward", "optimizer")


def _device_us(event) -> float:
    """Self time on the device of a profiler average (the name changed across torch versions)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def count_host_ops(events, steps: int) -> dict[str, float]:
    """Top-level ``aten::`` ops per step in each phase: ops whose parent is not an ATen op,
    assigned to the phase whose time range holds their start (backward ops run on the autograd
    engine's threads, outside the phase's call stack)."""
    ranges = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PHASES]
    counts = {p: 0 for p in PHASES}
    for e in events:
        parent = e.cpu_parent
        if not e.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        start = e.time_range.start
        for begin, end, phase in ranges:
            if begin <= start <= end:
                counts[phase] += 1
                break
    return {p: n / steps for p, n in counts.items()}


def measure(overrides: dict, profile_name: str, steps: int, profiled: int, warmup: int) -> dict:
    cfg = resolve_config(profile_name, overrides=overrides)
    run = build_run(cfg)
    cuda = run.device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    images, batch = run.train.images, cfg.batch_size

    def batches(n: int):
        for i in range(n):
            begin = (i * batch) % (images.shape[0] - batch + 1)
            yield images[begin : begin + batch]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for views in step_views(run, batches(warmup), generator):
        optimization_step(run, views, 0.1)
    sync()
    start = time.perf_counter()
    for views in step_views(run, batches(steps), generator):
        optimization_step(run, views, 0.1)
    sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for views in step_views(run, batches(profiled), generator):
            optimization_step(run, views, 0.1)
        sync()
    host_ops = count_host_ops(prof.events(), profiled)
    averages = prof.key_averages()
    host_ms = {p: 0.0 for p in PHASES}
    kernel_us, launches = 0.0, 0
    for event in averages:
        if event.key in host_ms:
            host_ms[event.key] += event.cpu_time_total / 1e3 / profiled
        if getattr(event, "device_type", None) == DeviceType.CUDA:
            kernel_us += _device_us(event)
            launches += event.count
    return {
        "method": cfg.method,
        "regularizer": cfg.regularizer,
        "batch_size": batch,
        "augment_batches": cfg.augment_batches,
        "optimizer": type(run.optimizer).__name__,
        "wall_ms_per_step": wall_ms,
        "images_per_s": batch * 1e3 / wall_ms,
        "host_ms_per_step": host_ms,
        "host_ops_per_step": host_ops,
        "kernel_ms_per_step": kernel_us / 1e3 / profiled if cuda else None,
        "kernel_launches_per_step": launches / profiled if cuda else None,
        "device": device_name(run.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help="cpu or gpu (default: gpu on CUDA, else cpu)")
    parser.add_argument("--method", default="byol")
    parser.add_argument("--regularizers", nargs="+", default=["none", "so"])
    parser.add_argument("--augment-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[None], help="default: the profile's")
    parser.add_argument("--optimizer", default=None, help="default: the profile's (cpu: sgd; gpu: the method's)")
    parser.add_argument("--steps", type=int, default=30, help="timed, unprofiled steps")
    parser.add_argument("--profiled", type=int, default=8, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    profile_name = args.profile or ("gpu" if torch.cuda.is_available() else "cpu")
    rows = []
    header = f"{'config':<30}{'wall ms':>9}{'img/s':>9}" + "".join(f"{p:>10}" for p in PHASES)
    print(header + f"{'kernel ms':>11}{'launches':>10}{'host ops':>10}")
    for regularizer, chunk, batch in itertools.product(args.regularizers, args.augment_batches, args.batch_sizes):
        overrides = {
            "method": args.method, "regularizer": regularizer, "augment_batches": chunk,
            "batch_size": batch, "data_root": args.data_root, "optimizer": args.optimizer,
        }
        r = measure(overrides, profile_name, args.steps, args.profiled, args.warmup)
        rows.append(r)
        name = f"{r['method']}+{regularizer} b{r['batch_size']} aug{chunk}"
        kernel = "" if r["kernel_ms_per_step"] is None else f"{r['kernel_ms_per_step']:>11.1f}{r['kernel_launches_per_step']:>10.0f}"
        print(
            f"{name:<30}{r['wall_ms_per_step']:>9.1f}{r['images_per_s']:>9.0f}"
            + "".join(f"{r['host_ms_per_step'][p]:>10.1f}" for p in PHASES)
            + (kernel or " " * 21)
            + f"{sum(r['host_ops_per_step'].values()):>10.0f}",
            flush=True,
        )
        print(
            f"{'':<30}host ops per phase: "
            + ", ".join(f"{p} {n:.0f}" for p, n in r["host_ops_per_step"].items()),
            flush=True,
        )
    payload = {
        "benchmark": "step_profile", "profile": profile_name, "torch": torch.__version__,
        "provenance": provenance(), "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
