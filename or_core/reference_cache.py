"""A disk cache for the reference numbers every run's evaluation repeats.

Each run's summary holds two references that do not depend on its training: kNN on the raw
pixels of its evaluation images, and kNN on its encoder before training
(:func:`or_core.evaluate.raw_pixel_knn`, :func:`or_core.evaluate.untrained_knn`). A matrix
recomputes them for every run, although they are the same for every run of one data set (raw
pixels) or of one seed and backbone (untrained). They are kept here, keyed by the content they
are computed from, so that the first run computes them and the others read them.

A key is a digest of everything the number depends on: the image and label tensors, the
initial weights, the kNN settings, the device type, the torch version and :data:`VERSION`
(raised when the computation changes). A changed input gives another key, never a stale
number. Files: ``<cache>/references/<kind>-<digest>.json`` (the cache folder of
:func:`or_core.data.default_cache_dir`), each with its key's readable fields.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from or_core.atomic import write_json_atomic
from or_core.data import default_cache_dir

__all__ = ["VERSION", "tensor_digest", "cached_value", "reference_dir"]

#: Raised when the way a reference is computed changes, so that older entries are not read.
VERSION = 1


def reference_dir() -> Path:
    """``<cache>/references``."""
    return default_cache_dir() / "references"


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cached_value(kind: str, key: Mapping[str, Any], compute: Callable[[], float]) -> float:
    """The number stored for ``(kind, key)``, else ``compute()``, stored then returned.

    ``key`` must be JSON-serializable; :data:`VERSION` and the torch version are added to it. An
    unreadable entry (a write cut short elsewhere) is computed again and replaced.
    """
    full = {"kind": kind, "version": VERSION, "torch": torch.__version__, **key}
    name = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:24]
    path = reference_dir() / f"{kind}-{name}.json"
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") == full:
            return float(entry["value"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = float(compute())
    write_json_atomic(path, {"key": full, "value": value})
    return value
