"""What the nearest-neighbour look-ups of NNCLR, NNSiam and NNBYOL cost per training step, by
support-set size: two look-ups of lightly's ``NNMemoryBankModule`` (one with the queue update),
as the methods make them, on unit projections.

Beside it, what one whole cpu-profile BYOL step costs (``batch / images_per_s`` of the cpu
profile's pilots, ``results/cpu_profile/pilots_2026-12-07.json``), to say whether the support
set dominates a step at a given size.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/nn_lookup.py --json results/benchmarks/nn_lookup_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from lightly.models.modules.nn_memory_bank import NNMemoryBankModule

from or_core.provenance import provenance


def lookup_ms(queue_size: int, batch_size: int, dim: int, steps: int, device: torch.device) -> float:
    """Median milliseconds of one training step's two look-ups (the second updates the queue)."""
    bank = NNMemoryBankModule(size=(queue_size, dim)).to(device).train()
    z = F.normalize(torch.randn(batch_size, dim, device=device), dim=1)
    for _ in range(3):
        bank(z, update=True)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        bank(z, update=False)
        bank(z, update=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-sizes", type=int, nargs="+", default=[65536, 16384, 4096])
    parser.add_argument("--batch-size", type=int, default=64, help="the cpu profile's batch")
    parser.add_argument("--dim", type=int, default=256, help="the cpu profile's proj_output_dim")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [
        {"queue_size": q, "lookup_ms_per_step": lookup_ms(q, args.batch_size, args.dim, args.steps, device)}
        for q in args.queue_sizes
    ]
    payload = {
        "benchmark": "nn_lookup", "device": str(device), "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "dim": args.dim, "steps": args.steps,
        "provenance": provenance(), "results": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
