"""Total training throughput of 1, 2 and 3 BYOL runs sharing one GPU, in one command.

A training step at batch 256 waits on the host issuing its kernels (``benchmarks/step_profile.py``),
so one run may leave the GPU idle part of the time; if two or three runs side by side train at
more images/s in total than one, a GPU window can train that many campaign runs at once. Each
count starts its processes together; each builds the run exactly as ``python -m or_core
pretrain`` does (``benchmarks/train_throughput.py``'s way: data resident on the device, batched
augmentation, the method's loss with the OR term, optimizer; the gpu profile compiles with CUDA
graphs), trains ``--warmup`` untimed steps (compilation, graph capture), says it is ready, waits
until every process of the count is ready, then times ``--steps`` steps between two device
synchronizations. The total is all processes' images over the span from the first start to the
last end; ``overlap`` is the share of that span in which all of them were timing.

Usage::

    python benchmarks/concurrency.py --json $OUT/concurrency.json     # CUDA: BYOL + SO, 1 2 3 processes (~2 min)
    python benchmarks/concurrency.py --device cpu --counts 1 2 --steps 2 --warmup 1   # a tiny CPU version

Without CUDA (and without ``--device cpu``) it says so and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from anywhere, without an install
    sys.path.insert(0, str(REPO))

from or_core.config import resolve_config  # noqa: E402
from or_core.provenance import provenance  # noqa: E402
from or_core.evaluate import device_name  # noqa: E402
from or_core.fast_path.batched_views import step_views  # noqa: E402
from or_core.train import optimization_step  # noqa: E402
from or_core.training_run import build_run  # noqa: E402

#: Lines of a worker's stdout that the parent reads; anything else a library prints is ignored.
TAG = "CONCURRENCY "


def _worker(args: argparse.Namespace) -> None:
    """One process: build the run, warm up, say ready, wait for the go on stdin, time the steps,
    print the result as one tagged JSON line."""
    overrides = {
        "method": args.method, "regularizer": args.regularizer, "device": args.device, "seed": args.seed,
        "data_root": args.data_root, "batch_size": args.batch_size, "subset": args.subset,
    }
    cfg = resolve_config(args.profile, overrides=overrides)
    run = build_run(cfg)
    images, batch = run.train.images, cfg.batch_size
    generator = torch.Generator().manual_seed(args.seed)

    def sync() -> None:
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)

    def batches():
        for i in range(args.warmup + args.steps):
            begin = (i * batch) % (images.shape[0] - batch + 1)
            yield images[begin : begin + batch]

    start = wall_start = None
    for i, views in enumerate(step_views(run, batches(), generator)):
        if i == args.warmup:
            sync()
            print(f"{TAG}ready", flush=True)
            if sys.stdin.readline().strip() != "go":
                return
            start, wall_start = time.perf_counter(), time.time()
        optimization_step(run, views, 0.1)
    sync()
    seconds = time.perf_counter() - start
    result = {
        "start": wall_start, "end": wall_start + seconds, "steps": args.steps, "images": args.steps * batch,
        "images_per_s": args.steps * batch / seconds, "device": device_name(run.device),
        "backbone": f"{cfg.backbone} x{cfg.width}", "batch_size": batch, "compile": cfg.compile,
        "augment_batches": cfg.augment_batches,
    }
    print(TAG + json.dumps(result), flush=True)


def _tagged(process: subprocess.Popen) -> str:
    """The next tagged line of a worker ('' once it has ended)."""
    for line in process.stdout:
        if line.startswith(TAG):
            return line[len(TAG):].strip()
    return ""


def measure(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``count`` workers together and return their total and per-process images/s."""
    threads = max(1, (os.cpu_count() or count) // count)  # the host's cores shared fairly
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    workers = []
    for i in range(count):
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--worker", "--method", args.method, "--regularizer",
            args.regularizer, "--device", args.device, "--profile", args.profile, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--seed", str(i),
        ]
        for flag, value in (("--data-root", args.data_root), ("--batch-size", args.batch_size), ("--subset", args.subset)):
            if value is not None:
                cmd += [flag, str(value)]
        workers.append(subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    # A hung worker must not hold the GPU window: every worker is killed at the time limit.
    watchdog = threading.Timer(args.timeout_s, lambda: [w.kill() for w in workers])
    watchdog.start()
    try:
        for i, w in enumerate(workers):
            if _tagged(w) != "ready":
                raise RuntimeError(f"worker {i} of {count} ended before its warm-up was done (exit code {w.wait()})")
        for w in workers:  # all warmed up: they start timing together
            w.stdin.write("go\n")
            w.stdin.flush()
        results = []
        for i, w in enumerate(workers):
            line = _tagged(w)
            if not line:
                raise RuntimeError(f"worker {i} of {count} ended without a result (exit code {w.wait()})")
            results.append(json.loads(line))
    finally:
        watchdog.cancel()
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
    first, last = min(r["start"] for r in results), max(r["end"] for r in results)
    together = max(0.0, min(r["end"] for r in results) - max(r["start"] for r in results))
    return {
        "processes": count,
        "total_images_per_s": sum(r["images"] for r in results) / (last - first),
        "per_process_images_per_s": [r["images_per_s"] for r in results],
        "span_s": last - first,
        "overlap": together / (last - first),
        "omp_threads_per_process": threads,
        "workers": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3], help="processes side by side, one row each")
    parser.add_argument("--method", default="byol")
    parser.add_argument("--regularizer", default="so")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a tiny version, for tests)")
    parser.add_argument("--profile", default=None, help="default: gpu on CUDA, ci on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process (default: 100 cuda, 3 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 20 cuda, 1 cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the profile's (cpu: 32)")
    parser.add_argument("--subset", type=int, default=None, help="training images held (default: all on CUDA, 256 on the CPU)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--timeout-s", type=float, default=240, help="per count: workers still running then are killed")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.profile = args.profile or ("gpu" if cuda else "ci")
    args.steps = args.steps or (100 if cuda else 3)
    args.warmup = args.warmup or (20 if cuda else 1)
    if not cuda:
        args.batch_size = args.batch_size or 32
        args.subset = args.subset or 256
    if args.worker:
        _worker(args)
        return
    if cuda and not torch.cuda.is_available():
        print(
            "error: no CUDA device here: this benchmark measures runs sharing one GPU; "
            "`--device cpu` runs a tiny CPU version of it", file=sys.stderr,
        )
        sys.exit(2)
    rows = []
    print(f"{'processes':>9}{'total images/s':>16}{'vs 1':>7}{'overlap':>9}  per process")
    for count in args.counts:
        row = measure(count, args)
        row["speedup_vs_1"] = row["total_images_per_s"] / rows[0]["total_images_per_s"] if rows and rows[0]["processes"] == 1 else None
        rows.append(row)
        vs = f"{row['speedup_vs_1']:.2f}" if row["speedup_vs_1"] else "-"
        each = ", ".join(f"{x:,.0f}" for x in row["per_process_images_per_s"])
        print(f"{count:>9}{row['total_images_per_s']:>16,.0f}{vs:>7}{row['overlap']:>9.2f}  {each}", flush=True)
    first = rows[0]["workers"][0]
    payload = {
        "benchmark": "concurrency", "method": args.method, "regularizer": args.regularizer, "profile": args.profile,
        "device": first["device"], "backbone": first["backbone"], "batch_size": first["batch_size"],
        "compile": first["compile"], "augment_batches": first["augment_batches"], "steps": args.steps,
        "warmup": args.warmup, "torch": torch.__version__, "provenance": provenance(), "results": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: v for k, v in payload.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
