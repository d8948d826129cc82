"""Markdown tables of the JSON files that ``benchmarks/gpu_checks.sh`` wrote into one folder.

Reads whichever of ``throughput_byol.json``, ``throughput_byol_compile.json``,
``throughput_methods.json``, ``step_profile.json``, ``augment.json`` and ``or_overhead.json``
the folder holds, and prints one table per file; nothing is typed in.

Usage::

    python benchmarks/gpu_report.py results/benchmarks/h200/call2-aeefdc8
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _compile_label(value: object) -> str:
    """``no``, or the torch.compile mode (``True`` in older files: the default mode)."""
    if not value or value == "none":
        return "no"
    return "default" if value is True else str(value)


def throughput(path: Path) -> str:
    data = json.loads(path.read_text())
    rows = [
        [r["method"], r["regularizer"], r["backbone"], r["batch_size"], r.get("augment_batches", 1),
         _compile_label(r.get("compile", data.get("compile"))), f"{r['images_per_s']:,.0f}", r["device"]]
        for r in data["results"]
    ]
    header = ["method", "OR", "backbone", "batch", "batches per augment call", "compile", "images/s", "device"]
    return f"**{path.name}** (torch {data['torch']})\n\n" + _table(header, rows)


def step_profile(path: Path) -> str:
    data = json.loads(path.read_text())
    rows = []
    for r in data["rows"]:
        host = r["host_ms_per_step"]
        rows.append([
            f"{r['method']}+{r['regularizer']}", r["batch_size"], r["augment_batches"], f"{r['wall_ms_per_step']:.1f}",
            f"{r['images_per_s']:,.0f}", *(f"{host[p]:.1f}" for p in ("augment", "forward", "backward", "optimizer")),
            f"{r['kernel_launches_per_step']:,.0f}",
        ])
    header = ["run", "batch", "batches per augment call", "wall ms/step", "images/s", "host ms: augment",
              "forward", "backward", "optimizer", "kernel launches/step"]
    return f"**{path.name}** (torch {data['torch']}; host times from a profiled pass)\n\n" + _table(header, rows)


def augment(path: Path) -> str:
    data = json.loads(path.read_text())
    rows = [[name, f"{r['median_images_per_s']:,.0f}", f"{r['speedup_vs_lightly']:.2f}x"] for name, r in data["rows"].items()]
    return f"**{path.name}** ({data['workload']}; {data['machine']['cpu_count']} CPU cores)\n\n" + _table(
        ["configuration", "two-view images/s (median)", "vs lightly"], rows
    )


def or_overhead(path: Path) -> str:
    data = json.loads(path.read_text())
    cuda = data["cuda"]
    rows = [[v, f"{cuda['step_s'][v] * 1e3:.1f}", f"{cuda['step_median_ratio_vs_none'].get(v, 1.0):.2f}",
             f"{cuda['or_only_s'].get(v, 0.0) * 1e3:.1f}" if v != "none" else ""] for v in cuda["step_s"]]
    return f"**{path.name}** ({cuda['device']}, batch {cuda['batch_size']} x 2 views, {cuda['repeats']} repeats)\n\n" + _table(
        ["variant", "step ms", "/ none", "OR term alone, ms"], rows
    )


READERS = {
    "throughput_byol.json": throughput,
    "throughput_byol_compile.json": throughput,
    "throughput_methods.json": throughput,
    "step_profile.json": step_profile,
    "augment.json": augment,
    "or_overhead.json": or_overhead,
}


def report(folder: Path) -> str:
    parts = [READERS[name](folder / name) for name in READERS if (folder / name).is_file()]
    if not parts:
        raise SystemExit(f"no benchmark JSON of gpu_checks.sh in {folder}")
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(report(Path(sys.argv[1])), end="")
