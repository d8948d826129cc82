"""The final evaluation of a cpu-profile run with the reference cache empty and then filled.

Every run's evaluation also measures two references that do not depend on its training (kNN
on raw pixels, kNN on the encoder before training); :mod:`or_core.reference_cache` keeps them
after the first run. This times :func:`or_core.evaluate.evaluate_run` of one run twice in one
process, first with an empty cache (what every run paid before), then with the cache the first
call filled (what every later run of the same data and seed pays), and prints both and their
ratio as JSON. The encoder is the run's untrained one: the evaluation's cost does not depend
on the weights.

    OMP_NUM_THREADS=1 python benchmarks/eval_references.py --profile cpu --out results/benchmarks/eval_references_cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from or_core import evaluate, reference_cache
from or_core.config import fit_to_data, resolve_config
from or_core.provenance import provenance
from or_core.training_run import build_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--method", default="byol")
    parser.add_argument("--repeats", type=int, default=1, help="warm evaluations after the cold one")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    cfg = fit_to_data(resolve_config(args.profile, overrides={"method": args.method, "device": "cpu"}))
    run = build_run(cfg)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="or_core_references_") as folder, \
            mock.patch.object(reference_cache, "reference_dir", lambda: Path(folder)):  # an empty cache
        times = []
        for _ in range(1 + args.repeats):
            t = time.perf_counter()
            summary = evaluate.evaluate_run(run, [], 0.0)
            times.append(time.perf_counter() - t)
    result = {
        "benchmark": "eval_references",
        "profile": args.profile,
        "method": args.method,
        "threads": torch.get_num_threads(),
        "eval_train_images": summary["eval_train_images"],
        "eval_test_images": summary["eval_test_images"],
        "cold_s": times[0],
        "warm_s": times[1:],
        "warm_over_cold": min(times[1:]) / times[0] if len(times) > 1 else None,
        "provenance": provenance(" ".join(["benchmarks/eval_references.py", *[f"--{k}={v}" for k, v in vars(args).items()]]),
                                 time.perf_counter() - started),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
