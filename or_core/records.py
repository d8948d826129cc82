"""Result records: the small JSON files under ``results/`` that every figure and table comes from.

A record is one run (or one measurement), never a checkpoint or data: its configuration, its
numbers, the collapse spectra of its final encoder, the scale it was made at and its provenance
(commit, date, machine, library versions, wall time, command). Records are written atomically
and read back with :func:`load_records`; the book re-plots them and tests check claims against
them.

Scales, written into every record and onto every figure made from it:

* ``cpu-small``: the cpu profile (narrow ResNet-18, a CIFAR subset, a few epochs on two cores);
  not the paper's setup.
* ``cpu-ci``: the smaller runs the notebooks make in CI (a smoke scale: they show the pipeline,
  their numbers mean little).
* ``paper-scale``: the gpu profile, the recipe of the libraries the paper used.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from or_core.augment import normalize
from or_core.diagnostics import (
    REPRESENTATION,
    covariance_eigenvalues,
    effective_rank,
    features,
    normalized_spectrum,
    weight_spectra,
)
from or_core.orthogonality import regularized_weights, so_penalty

__all__ = [
    "SCALES",
    "scale_of",
    "git_commit",
    "provenance",
    "stage_names",
    "collapse_spectra",
    "write_record",
    "load_record",
    "load_records",
]

#: The scale each profile's records are made at.
SCALES: dict[str, str] = {"cpu": "cpu-small", "ci": "cpu-ci", "gpu": "paper-scale"}


def scale_of(profile: str) -> str:
    """``cpu`` -> ``cpu-small``, ``ci`` -> ``cpu-ci``, ``gpu`` -> ``paper-scale``; else ``custom``."""
    return SCALES.get(profile, "custom")


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    """The commit of the or_core checkout, or ``"unknown"`` outside a git checkout.

    ``$OR_CORE_GIT_COMMIT``, when set, comes first: whoever copies a committed tree to another
    machine (whose copy may have no ``.git``, or an older one) names its commit there and
    vouches that the tree is that commit."""
    return os.environ.get("OR_CORE_GIT_COMMIT") or _git("rev-parse", "HEAD") or "unknown"


def provenance(command: str | Sequence[str] | None = None, wall_time_s: float | None = None) -> dict[str, Any]:
    """Where, when and with what a record was made.

    ``command`` defaults to this process's command line; ``git_dirty`` says whether tracked
    files outside ``results/`` differed from ``git_commit`` when the record was written (never,
    when ``$OR_CORE_GIT_COMMIT`` names the commit: see :func:`git_commit`).
    """
    import lightly

    if command is None:
        command = [Path(sys.argv[0]).name, *sys.argv[1:]]
    if not isinstance(command, str):
        command = " ".join(str(c) for c in command)
    cuda = torch.cuda.is_available()
    return {
        "git_commit": git_commit(),
        # changes to tracked files other than results/ (which the runs themselves rewrite)
        "git_dirty": False if os.environ.get("OR_CORE_GIT_COMMIT") else bool(
            _git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results")
        ),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu, {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightly": lightly.__version__,
        "command": command,
        "wall_time_s": None if wall_time_s is None else round(float(wall_time_s), 1),
    }


def stage_names(backbone: nn.Module) -> list[str]:
    """The hidden layers whose features the paper's Figure 3 shows: a ResNet's four stages
    (``layer1`` ... ``layer4``), or four evenly spaced blocks of a torchvision ViT."""
    names = dict(backbone.named_modules())
    resnet = [f"layer{i}" for i in range(1, 5)]
    if all(n in names for n in resnet):
        return resnet
    blocks = [n for n in names if n.startswith("encoder.layers.") and n.count(".") == 2]
    if blocks:
        step = max(1, len(blocks) // 4)
        return blocks[step - 1 :: step][:4]
    raise ValueError(f"no ResNet stages or ViT blocks in {type(backbone).__name__}")


def _batches(images: Tensor, mean: Sequence[float], std: Sequence[float], batch_size: int) -> Iterable[Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield normalize(images[start : start + batch_size].float().div_(255), mean, std)


def _floats(x: Tensor, digits: int = 6) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in x.double().tolist()]


@torch.no_grad()
def collapse_spectra(
    backbone: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    layers: Sequence[str] | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The paper's collapse diagnostics of one encoder, as plain lists for a JSON record.

    * ``weights``: for every regularized weight ``W`` (matrix view), the eigenvalues of its
      smaller-side Gram, ``s_i^2`` for the singular values ``s_i``, divided by the largest;
    * ``so``: ``||G||_F^2`` of each weight (the orthogonality error that SO minimizes);
    * ``hidden``: for each layer in ``layers`` (default :func:`stage_names`), the eigenvalues of
      the covariance of its globally pooled output over ``images``, divided by the largest;
    * ``representation``: the same for the encoder's output;
    * ``effective_rank``: of each pooled hidden feature and of the representation.

    ``images`` are uint8 ``(N, 3, H, W)`` test images, normalized with the training
    ``mean``/``std``; every spectrum is sorted descending (Figures 2 and 3 of He, Du & Ma).
    """
    layers = list(layers) if layers is not None else stage_names(backbone)
    weights = {
        name.removesuffix(".weight"): _floats(normalized_spectrum(s.double() ** 2))
        for name, s in weight_spectra(backbone).items()
    }
    so = {name.removesuffix(".weight"): float(so_penalty(w.detach().double())) for name, w in regularized_weights(backbone)}
    rows = features(backbone, _batches(images.cpu(), mean, std, batch_size), layers, device=device)
    spectra = {name: normalized_spectrum(covariance_eigenvalues(x)) for name, x in rows.items()}
    return {
        "images": int(images.shape[0]),
        "weights": weights,
        "so": so,
        "hidden": {name: _floats(spectra[name]) for name in layers},
        "representation": _floats(spectra[REPRESENTATION]),
        "effective_rank": {name: effective_rank(x) for name, x in rows.items()},
    }


def write_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as indented JSON, atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_record(path: str | Path) -> dict[str, Any]:
    """One record; a file that is not a JSON object is an error naming it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a valid JSON record: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a JSON object")
    return record


def load_records(directory: str | Path, pattern: str = "*.json") -> list[dict[str, Any]]:
    """Every record matching ``pattern`` under ``directory`` (recursively), sorted by path, each
    with its path under the key ``"_path"``. A missing directory is an error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no results folder at {directory}")
    records = []
    for path in sorted(directory.rglob(pattern)):
        record = load_record(path)
        record["_path"] = str(path)
        records.append(record)
    return records
