"""One typed configuration for a pretraining run: profiles, YAML files and command-line overrides.

A run's settings are resolved in this order, each overriding the last:

1. the dataclass defaults below;
2. the profile (``cpu``: small and honest on two cores; ``gpu``: the paper-scale recipe);
3. a YAML file (``--config configs/....yaml``), any subset of the fields;
4. explicit overrides (command-line flags, notebook parameters).

Fields left ``None`` take the method's published defaults (optimizer, learning rate, weight
decay) when the run is built.

Data: by default the training split is decoded once into a uint8 tensor held on the device.
``stream: true`` (ImageNet-size folders) instead decodes each epoch in ``num_workers``
DataLoader processes to ``decode_size`` squares (default ``image_size``, which streaming
needs), and evaluation streams the test split likewise.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PretrainConfig", "PROFILES", "PROFILE_METHOD_SETTINGS", "resolve_config", "load_yaml"]


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; saved as ``config.yaml`` in its run directory."""

    method: str = "byol"
    regularizer: str = "none"
    gamma: float | None = None
    backbone: str = "resnet18"
    width: float = 1.0
    dataset: str = "cifar10"
    data_root: str = field(default_factory=lambda: _default_data_root())
    image_size: int | None = None
    subset: int | None = None
    stream: bool = False
    decode_size: int | None = None
    num_workers: int | None = None
    epochs: int = 200
    batch_size: int = 256
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: int | None = None
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    augment_overrides: dict[str, Any] = field(default_factory=dict)
    #: Training batches augmented in one call (one process only). Each call of the batched
    #: augmentation issues ~1,300 small tensor ops whatever the batch size; on a GPU, where
    #: the step waits on the host's op launches, augmenting several batches at once divides
    #: that cost (BYOL + SO, batch 256, H200: 5.6k -> 8.2k images/s at 8). Changes the random
    #: stream (deterministic and resumable all the same); ignored in a multi-process run.
    augment_batches: int = 1
    knn_k: int = 200
    knn_t: float = 0.1
    eval_train_subset: int | None = None
    eval_test_subset: int | None = None
    val_images: int | None = None
    linear_epochs: int = 100
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    #: ``torch.compile`` of the backbone and its EMA copies: false, true (the default mode) or a
    #: mode name such as ``reduce-overhead`` (CUDA graphs); see :mod:`or_core.compiling`.
    compile: bool | str = False
    profile: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The profiles. ``ci`` is a smoke scale (seconds per run: what the notebooks run in CI; its
#: numbers show the pipeline, not learning). ``cpu``: minutes on two cores, chosen by measured
#: pilots (results/cpu_profile/): a width-0.125 ResNet-18 at 32 px sees three times the images
#: of a width-0.25 one in the same time and learns more (BYOL+SO kNN +10 to +13 points over its
#: untrained encoder against +4 to +5); SGD with cosine decay (lightly's CIFAR-10 benchmark
#: optimizer, lr raised from 0.06 to 0.15 for the short schedule) rather than the methods' LARS
#: recipes, which collapsed at this budget. ``gpu`` is the recipe of the libraries the paper
#: used (ResNet-18 with the CIFAR stem, batch 256, full data). Numbers not set here come from
#: the method.
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {
        "width": 0.125,
        "subset": 20480,
        "epochs": 5,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.15,
        "weight_decay": 5e-4,
        "warmup_epochs": 1,
        "eval_train_subset": 10000,
        "eval_test_subset": 2000,
        "val_images": 2000,
        "linear_epochs": 30,
        "method_kwargs": {"proj_hidden_dim": 1024, "proj_output_dim": 256},
    },
    "ci": {
        "width": 0.125,
        "subset": 1024,
        "epochs": 2,
        "batch_size": 128,
        "optimizer": "sgd",
        "lr": 0.06,
        "weight_decay": 5e-4,
        "warmup_epochs": 0,
        "eval_train_subset": 2000,
        "eval_test_subset": 1000,
        "val_images": 500,
        "linear_epochs": 10,
        "method_kwargs": {"proj_hidden_dim": 512, "proj_output_dim": 128},
    },
    "gpu": {
        "width": 1.0,
        "epochs": 200,
        "batch_size": 256,
        "linear_epochs": 100,
        "augment_batches": 8,
        # CUDA graphs for the backbone and its EMA copy: BYOL + SO, batch 256, torch 2.11,
        # 7,552 -> 13,282 images/s on one H100, 7,366 -> 16,627 on one H200; compiling takes up
        # to a minute once per run. Not applied in multi-process (DDP) runs, where it is untested.
        "compile": "reduce-overhead",
    },
}


#: Settings of a profile for one method, applied over the profile (and under a YAML file and
#: explicit overrides).
#:
#: cpu: DINO and SwaV with their published (solo-learn) settings never left the loss of uniform
#: predictions (ln K) in the profile's 800 steps and ended at the untrained encoder's kNN top-1
#: (0.245 and 0.233 against 0.229; results/methods_cpu/ at 785e37d). Per-step diagnostics showed
#: why: at width 0.125 the random encoder's projections of different images are nearly parallel,
#: so the teacher's targets (DINO) and the Sinkhorn codes (SwaV) are near uniform and a constant
#: output is the cheapest fit (SwaV's projections reached a mean pairwise cosine of 0.99 within
#: 200 steps). What learns instead, one seed each, measured 2026-11-26 (kNN / linear top-1):
#:
#: * DINO: lightly's CIFAR-10 benchmark head (512 hidden, 64 bottleneck, 2048 prototypes, batch
#:   norm), teacher momentum 0.99, teacher temperature 0.04, no local crops: 0.344 / 0.368 at the
#:   profile's lr 0.15 and 0.367 / 0.361 at lr 0.05 (kept).
#: * SwaV: lightly's head (512 -> 128, 512 prototypes), sharper codes (Sinkhorn epsilon 0.02), the
#:   prototypes frozen for the first 20% of training, no local crops, no queue: 0.354 / 0.387 at
#:   lr 0.15 (kept) and 0.292 / 0.335 at lr 0.05.
#:
#: Without local crops both also train about twice as fast on two cores.
PROFILE_METHOD_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "dino": {
            "lr": 0.05,
            "method_kwargs": {
                "proj_hidden_dim": 512,
                "proj_output_dim": 64,
                "num_prototypes": 2048,
                "batch_norm": True,
                "base_momentum": 0.99,
                "warmup_teacher_temp": 0.04,
                "teacher_temp": 0.04,
                "num_local_views": 0,
            },
        },
        "swav": {
            "method_kwargs": {
                "proj_hidden_dim": 512,
                "proj_output_dim": 128,
                "num_prototypes": 512,
                "sinkhorn_epsilon": 0.02,
                "freeze_prototypes_progress": 0.2,
                "queue_length": 0,
                "num_local_views": 0,
            },
        },
    },
}


def _default_data_root() -> str:
    """``$OR_CORE_CACHE/datasets`` when that variable is set (as :func:`or_core.data.default_data_root`
    reads it), else ``~/.cache/or_core/datasets``, written unexpanded."""
    cache = os.environ.get("OR_CORE_CACHE")
    return str(Path(cache).expanduser() / "datasets") if cache else "~/.cache/or_core/datasets"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; unknown keys are an error naming the valid ones."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    _check_keys(data, str(path))
    return data


def _check_keys(values: dict[str, Any], where: str) -> None:
    valid = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown config field(s) {unknown}; valid fields: {sorted(valid)}")


def resolve_config(
    profile: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> PretrainConfig:
    """Defaults, then ``profile`` (with its :data:`PROFILE_METHOD_SETTINGS` for the run's method),
    then ``config_file``, then ``overrides`` (``None`` values skipped).

    ``method_kwargs`` and ``augment_overrides`` (fields of
    :class:`or_core.augment.ViewConfig` for the full-size views) are merged key by key.
    """
    values: dict[str, Any] = {}
    from_file = load_yaml(config_file) if config_file is not None else {}
    clean = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(clean, "overrides")
    if profile is not None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
        values = _merge(values, {**PROFILES[profile], "profile": profile})
        method = clean.get("method", from_file.get("method", PretrainConfig.method))
        values = _merge(values, PROFILE_METHOD_SETTINGS.get(profile, {}).get(method, {}))
    values = _merge(_merge(values, from_file), clean)
    return PretrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


_NUMBER_FIELDS = {
    f.name: (float if "float" in str(f.type) else int)
    for f in dataclasses.fields(PretrainConfig)
    if "float" in str(f.type) or str(f.type).startswith("int")
}


def _coerce(key: str, value: Any) -> Any:
    """Numbers written as strings become numbers: YAML 1.1 reads ``5e-4`` as the string "5e-4"."""
    kind = _NUMBER_FIELDS.get(key)
    if kind is None or not isinstance(value, str):
        return value
    try:
        return kind(float(value)) if kind is int and float(value).is_integer() else kind(value)
    except ValueError:
        raise ValueError(f"config field {key!r} must be a number, got {value!r}") from None


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in new.items():
        if key in ("method_kwargs", "augment_overrides") and isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged
