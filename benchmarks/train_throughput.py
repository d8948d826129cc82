"""Training throughput (images/s) per method: the cpu profile here, the gpu profile on CUDA.

Each measurement builds the run exactly as ``python -m or_core pretrain`` does (data resident on
the device, batched augmentation, the method's loss with the OR term, optimizer and schedule)
and times full training steps after a warm-up, waiting for the device at both ends.

Usage::

    python benchmarks/train_throughput.py                          # cpu profile, every method
    python benchmarks/train_throughput.py --profile gpu --methods byol --regularizers none so srip
    python benchmarks/train_throughput.py --data-root PATH --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from or_core.fast_path.compiled_calls import COMPILE_MODES, compile_mode
from or_core.config import resolve_config
from or_core.provenance import provenance
from or_core.methods import available_methods
from or_core.evaluate import device_name
from or_core.fast_path.batched_views import step_views
from or_core.train import optimization_step
from or_core.training_run import build_run


def throughput(method: str, profile: str, regularizer: str, steps: int, warmup: int, overrides: dict) -> dict:
    cfg = resolve_config(profile, overrides={"method": method, "regularizer": regularizer, **overrides})
    run = build_run(cfg)
    generator = torch.Generator().manual_seed(0)
    images = run.train.images
    batch = cfg.batch_size

    def sync() -> None:
        if run.device.type == "cuda":
            torch.cuda.synchronize()

    def batches():
        for i in range(warmup + steps):
            begin = (i * batch) % (images.shape[0] - batch + 1)
            yield images[begin : begin + batch]

    # the clock starts after the warm-up steps (their chunk of augmented batches included)
    first_losses = []
    for i, views in enumerate(step_views(run, batches(), generator)):
        if i == warmup:
            sync()
            start = time.perf_counter()
        out = optimization_step(run, views, 0.1)
        if i < 5:  # same seed, same data: compiled and eager runs should start alike
            first_losses.append(out["loss"])
    sync()
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "regularizer": regularizer,
        "profile": profile,
        "backbone": f"{cfg.backbone} x{cfg.width}",
        "batch_size": batch,
        "augment_batches": cfg.augment_batches,
        "compile": cfg.compile,
        "compile_or": cfg.compile_or,
        "image_size": int(images.shape[-1]),
        "steps": steps,
        "images_per_s": steps * batch / seconds,
        "first_losses": [round(x.item(), 5) for x in first_losses],
        "device": device_name(run.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help="cpu or gpu (default: gpu on CUDA, else cpu)")
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method")
    parser.add_argument("--regularizers", nargs="+", default=["so"], help="one row per method and regularizer (default: so)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 cpu, 50 gpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 1 cpu, 10 gpu)")
    parser.add_argument("--augment-batches", type=int, nargs="+", default=[None], help="batches augmented per call, one row each (default: the profile's)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--compile", nargs="+", default=[None], choices=("none", *COMPILE_MODES),
        help="torch.compile modes, one row each, e.g. none reduce-overhead (default: the profile's)",
    )
    parser.add_argument(
        "--compile-or", nargs="+", default=["false"], choices=("false", "true"),
        help="with --compile: also compile the OR term; one row each (e.g. false true)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    profile = args.profile or ("gpu" if torch.cuda.is_available() else "cpu")
    gpu = profile == "gpu"
    steps = args.steps or (50 if gpu else 5)
    warmup = args.warmup or (10 if gpu else 1)
    overrides = {"data_root": args.data_root, "batch_size": args.batch_size}
    results = []
    print(f"{'method':<20}{'backbone':<16}{'batch':>6}{'aug.batches':>12}{'compile':>18}{'images/s':>12}  device")
    for method in args.methods or available_methods():
        for regularizer in args.regularizers:
            for chunk, mode, with_or in itertools.product(args.augment_batches, args.compile, args.compile_or):
                if with_or == "true" and (compile_mode(mode) is None or regularizer == "none"):
                    continue  # nothing more to compile
                torch._dynamo.reset()  # each run compiles afresh (the on-disk caches still help)
                r = throughput(method, profile, regularizer, steps, warmup,
                               {**overrides, "augment_batches": chunk, "compile": mode, "compile_or": with_or == "true"})
                results.append(r)
                print(
                    f"{method + '+' + regularizer:<20}{r['backbone']:<16}{r['batch_size']:>6}{r['augment_batches']:>12}"
                    f"{(compile_mode(r['compile']) or 'none') + (' +OR' if r['compile_or'] else ''):>18}"
                    f"{r['images_per_s']:>12.1f}  {r['device']}",
                    flush=True,
                )
    payload = {
        "benchmark": "train_throughput", "compile": args.compile, "compile_or": args.compile_or, "torch": torch.__version__,
        "provenance": provenance(), "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
