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
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from or_core.errors import ConfigError, MissingPathError

__all__ = [
    "PretrainConfig",
    "PROFILES",
    "check_field",
    "config_recipe",
    "fit_to_data",
    "load_yaml",
    "method_profile_settings",
    "recipe",
    "resolve_config",
]


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
    #: that cost (measurements: results/benchmarks/NOTES.md#batched-augmentation-gpu). Changes
    #: the random stream (deterministic and resumable all the same); ignored in a multi-process run.
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
    #: On the CPU, train under bfloat16 autocast with channels-last weights where oneDNN has
    #: native bfloat16 kernels (else float32, as without it); evaluation stays float32.
    cpu_bf16: bool = False
    #: ``torch.compile`` of the backbone and its EMA copies: false, true (the default mode) or a
    #: mode name such as ``reduce-overhead`` (CUDA graphs); see
    #: :mod:`or_core.fast_path.compiled_calls`.
    compile: bool | str = False
    #: With ``compile``: compile the OR term too, in the same mode (its forward and its
    #: closed-form backward in one graph, a CUDA graph under ``reduce-overhead``), instead of
    #: running its per-layer kernels eagerly beside the compiled backbone.
    compile_or: bool = False
    profile: str = "custom"

    def __post_init__(self) -> None:
        """Check every field's type and range (:func:`check_field`) and the fields together;
        integral floats (``2.0``) become ints and ints of float fields become floats."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name), "config"))
        _check_together(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> PretrainConfig:
        """The config of a mapping (a run's ``config.yaml``, a checkpoint's ``config``);
        unknown keys are a :class:`~or_core.errors.ConfigError` naming them and ``where``."""
        if not isinstance(values, dict):
            raise ConfigError(
                f"{where}: expected a mapping of config fields, got {type(values).__name__}"
            )
        _check_keys(values, where)
        return cls(**values)


#: The profiles. ``ci`` is a smoke scale (seconds per run: what the notebooks run in CI; its
#: numbers show the pipeline, not learning). ``cpu``: minutes on two cores, chosen on the
#: validation split with BYOL without OR (results/cpu_profile/pilots_2026-12-07.json; its time:
#: timing_2026-12-07.json there): a width-0.125 ResNet-18 at 32 px, all training images but the
#: validation ones, batch 64 (more steps for the same images beat batch 128), bfloat16 where the
#: CPU has it (more images in the same time), SGD with cosine decay rather than the methods'
#: LARS recipes, which collapsed at this budget; evaluated on all 50,000 training and 10,000
#: test images, where raw pixels reach their known kNN score. ``cpu_small`` is the earlier cpu
#: profile, kept because the records of ``configs/matrix_cpu.yaml`` and
#: ``configs/methods_cpu.yaml`` were made with it (they say ``profile: cpu``; their scale is
#: ``cpu-small``). ``gpu`` is the recipe of the libraries the paper used (ResNet-18 with the
#: CIFAR stem, batch 256, full data). Numbers not set here come from the method.
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {
        "width": 0.125,
        "subset": 48000,
        "epochs": 7,
        "batch_size": 64,
        "optimizer": "sgd",
        "lr": 0.15,
        "weight_decay": 5e-4,
        "warmup_epochs": 1,
        "eval_train_subset": 50000,
        "eval_test_subset": 10000,
        "val_images": 2000,
        "linear_epochs": 30,
        "cpu_bf16": True,
        "method_kwargs": {"proj_hidden_dim": 1024, "proj_output_dim": 256},
    },
    "cpu_small": {
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
        # CUDA graphs for the backbone and its EMA copy: a step is bound by its kernel launches
        # (see or_core.fast_path.compiled_calls); compiling costs up to a minute once per run.
        # Not applied in multi-process (DDP) runs, where it is untested.
        "compile": "reduce-overhead",
    },
}


def _default_data_root() -> str:
    """``$OR_CORE_CACHE/datasets`` when that variable is set (as
    :func:`or_core.data.default_data_root` reads it), else ``~/.cache/or_core/datasets``, written
    unexpanded."""
    cache = os.environ.get("OR_CORE_CACHE")
    return str(Path(cache).expanduser() / "datasets") if cache else "~/.cache/or_core/datasets"


def read_yaml_file(path: Path, missing_hint: str) -> Any:
    """The content of a YAML file (config, matrix or campaign).

    Raises:
        MissingPathError: no such file (the message ends with ``missing_hint``).
        ConfigError: invalid YAML, naming the file, the line and the problem.
    """
    if not path.is_file():
        raise MissingPathError(missing_hint)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ConfigError(f"{path}{line}: not valid YAML ({problem}); fix the file") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; unknown keys are an error naming the valid ones."""
    path = Path(path)
    missing = f"config file not found: {path}; check the path given to --config"
    data = read_yaml_file(path, missing) or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config fields (field: value), got "
            f"{type(data).__name__}"
        )
    _check_keys(data, str(path))
    for key, value in data.items():
        check_field(key, value, str(path))
    return data


def _check_keys(values: dict[str, Any], where: str) -> None:
    valid = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(
            f"{where}: unknown config field(s) {unknown}; valid fields: {sorted(valid)}"
        )


def resolve_config(
    profile: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> PretrainConfig:
    """Defaults, then ``profile`` (with the run's method's settings for it,
    :func:`method_profile_settings`), then ``config_file``, then ``overrides`` (``None`` values
    skipped).

    ``method_kwargs`` and ``augment_overrides`` (fields of
    :class:`or_core.augment.ViewConfig` for the full-size views) are merged key by key.
    """
    values: dict[str, Any] = {}
    from_file = load_yaml(config_file) if config_file is not None else {}
    clean = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(clean, "flags/overrides")
    for key, value in clean.items():
        check_field(key, value, "flags/overrides")
    if profile is not None:
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
        values = _merge(values, {**PROFILES[profile], "profile": profile})
        method = clean.get("method", from_file.get("method", PretrainConfig.method))
        values = _merge(values, method_profile_settings(method, profile))
    values = _merge(_merge(values, from_file), clean)
    return PretrainConfig(**values)


def method_profile_settings(method: str, profile: str) -> dict[str, Any]:
    """The config fields that method ``method`` sets for ``profile`` (its ``profile_settings``;
    none for an unknown method, which the config then names as such).

    Raises:
        ConfigError: a field that is no config field or a value of the wrong type.
    """
    from or_core.methods import METHODS

    cls = METHODS.get(method) if isinstance(method, str) else None
    settings = cls.profile_settings.get(profile, {}) if cls is not None else {}
    where = f"{cls.__name__}.profile_settings[{profile!r}]" if cls is not None else ""
    _check_keys(settings, where)
    for key, value in settings.items():
        check_field(key, value, where)
    return settings


# ----------------------------------------------------------------------------------------------
# Sizes that fit the data
# ----------------------------------------------------------------------------------------------
#: The largest share of the training images that a clipped validation split takes.
_MAX_VALIDATION_SHARE = 5  # one fifth


def fit_to_data(cfg: PretrainConfig, notify: bool = True) -> PretrainConfig:
    """``cfg`` with every size that exceeds its data set clipped to what the folder holds.

    A profile's sizes (``subset``, ``val_images``, ``eval_train_subset``, ``eval_test_subset``,
    ``knn_k``) are written for CIFAR; on a smaller folder they become:

    * ``subset`` + ``val_images`` <= the training images: ``val_images`` at most a fifth of them,
      ``subset`` the rest (the validation images stay outside the pretraining subset);
    * ``eval_train_subset`` <= the training images, ``eval_test_subset`` <= the test images;
    * ``knn_k`` <= the smallest kNN bank (the evaluation and, with validation, the pretraining
      subset).

    With ``notify``, one line on stderr says what changed. The counts come from the folder
    (:func:`or_core.data.count_images`); nothing is decoded.
    """
    from or_core.data import count_images

    root = os.path.expanduser(cfg.data_root)
    n_train = count_images(cfg.dataset, "train", root)
    n_test = count_images(cfg.dataset, "test", root)
    fitted: dict[str, Any] = {}
    subset, val = cfg.subset, cfg.val_images
    if subset is not None:
        if val and subset + val > n_train:
            val = min(val, n_train // _MAX_VALIDATION_SHARE) or None
        subset = min(subset, n_train - (val or 0))
    fitted.update(subset=subset, val_images=val)
    if cfg.eval_train_subset is not None:
        fitted["eval_train_subset"] = min(cfg.eval_train_subset, n_train)
    if cfg.eval_test_subset is not None:
        fitted["eval_test_subset"] = min(cfg.eval_test_subset, n_test)
    pretraining_bank = [subset] if subset is not None and val else []
    banks = [fitted.get("eval_train_subset") or n_train, *pretraining_bank]
    fitted["knn_k"] = min(cfg.knn_k, *banks)
    changed = {k: (getattr(cfg, k), v) for k, v in fitted.items() if getattr(cfg, k) != v}
    if not changed:
        return cfg
    if notify:
        what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        print(
            f"notice: {cfg.dataset} holds {n_train} training and {n_test} test images, fewer than "
            f"the sizes asked for: {what}",
            file=sys.stderr,
            flush=True,
        )
    return dataclasses.replace(cfg, **{k: new for k, (_, new) in changed.items()})


# ----------------------------------------------------------------------------------------------
# Field checks
# ----------------------------------------------------------------------------------------------
#: Integer fields and their smallest value; ``None`` allowed for the optional ones.
_INTEGERS: dict[str, tuple[int, bool]] = {
    "epochs": (1, False),
    "batch_size": (1, False),
    "augment_batches": (1, False),
    "knn_k": (1, False),
    "linear_epochs": (1, False),
    "seed": (0, False),
    "image_size": (1, True),
    "subset": (1, True),
    "decode_size": (1, True),
    "num_workers": (0, True),
    "warmup_epochs": (0, True),
    "eval_train_subset": (1, True),
    "eval_test_subset": (1, True),
    "val_images": (0, True),
}
#: Float fields: (bound, strictly above it, optional).
_FLOATS: dict[str, tuple[float, bool, bool]] = {
    "width": (0.0, True, False),
    "knn_t": (0.0, True, False),
    "gamma": (0.0, False, True),
    "lr": (0.0, True, True),
    "weight_decay": (0.0, False, True),
}
_BOOLEANS = ("stream", "amp", "channels_last", "cpu_bf16", "compile_or")
_STRINGS = ("method", "regularizer", "backbone", "dataset", "data_root", "device", "profile")
_MAPPINGS = ("method_kwargs", "augment_overrides")
_OPTIMIZERS = ("lars", "sgd", "adamw")


def _number(key: str, value: Any, where: str, kind: str) -> float:
    """``value`` as a number: YAML 1.1 reads ``5e-4`` as the string "5e-4"; booleans are no
    numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    example = "5" if kind.startswith("an integer") else "1e-4"
    raise ConfigError(
        f"{where}: field {key!r} must be {kind}, got {value!r}; write a number such as {example}"
    )


def check_field(key: str, value: Any, where: str = "config") -> Any:
    """``value`` checked for the type and range of config field ``key``, normalized (numbers
    written as strings, integral floats of integer fields, ints of float fields).

    Raises:
        ConfigError: naming ``where``, the field, the value and what it must be.
    """
    if key in _INTEGERS:
        low, optional = _INTEGERS[key]
        if value is None and optional:
            return None
        kind = f"an integer >= {low}"
        number = _number(key, value, where, kind)
        if not float(number).is_integer() or number < low:
            raise ConfigError(f"{where}: field {key!r} must be {kind}, got {value!r}")
        return int(number)
    if key in _FLOATS:
        bound, strict, optional = _FLOATS[key]
        if value is None and optional:
            return None
        kind = f"a number {'>' if strict else '>='} {bound:g}"
        number = float(_number(key, value, where, kind))
        if not math.isfinite(number) or number < bound or (strict and number == bound):
            raise ConfigError(f"{where}: field {key!r} must be {kind}, got {value!r}")
        return number
    if key in _BOOLEANS:
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where}: field {key!r} must be true or false (unquoted), got {value!r}"
            )
        return value
    if key in _STRINGS:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
        return value
    if key in _MAPPINGS:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(
                f"{where}: field {key!r} must be a mapping of names to values, got {value!r}"
            )
        return dict(value)
    if key == "optimizer":
        if value is not None and value not in _OPTIMIZERS:
            raise ConfigError(
                f"{where}: field 'optimizer' must be one of {', '.join(_OPTIMIZERS)}, got "
                f"{value!r}"
            )
        return value
    if key == "compile":
        from or_core.fast_path.compiled_calls import COMPILE_MODES

        if not isinstance(value, bool) and value not in ("none", *COMPILE_MODES):
            raise ConfigError(
                f"{where}: field 'compile' must be true, false or one of none, "
                f"{', '.join(COMPILE_MODES)}, got {value!r}"
            )
        return value
    return value


def _check_together(cfg: PretrainConfig) -> None:
    """Names that must be registered and fields that only make sense together."""
    from or_core.backbones import BACKBONE_NAMES
    from or_core.methods import REGULARIZERS, available_methods

    if cfg.method not in available_methods():
        raise ConfigError(
            f"unknown method {cfg.method!r}; valid methods: {', '.join(available_methods())}"
        )
    if cfg.regularizer not in REGULARIZERS:
        raise ConfigError(
            f"unknown regularizer {cfg.regularizer!r}; valid regularizers: "
            f"{', '.join(REGULARIZERS)}"
        )
    if cfg.backbone not in BACKBONE_NAMES:
        raise ConfigError(
            f"unknown backbone {cfg.backbone!r}; valid backbones: {', '.join(BACKBONE_NAMES)}"
        )
    if cfg.regularizer == "none" and cfg.gamma is not None:
        raise ConfigError(
            f"gamma {cfg.gamma:g} is set but the regularizer is none: choose a regularizer "
            f"({', '.join(r for r in REGULARIZERS if r != 'none')}) or drop gamma"
        )


def _merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in new.items():
        if key in ("method_kwargs", "augment_overrides") and isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def _count(n: int | None, what: str, otherwise: str) -> str:
    return f"{n:,} {what}" if n else otherwise


def config_recipe(cfg: PretrainConfig, dataset: str | None = None) -> str:
    """A resolved config's training and evaluation recipe in one Markdown sentence, so that a
    page says what its numbers were made with and the sentence changes with the config:

    ``"ResNet-18 at width 0.125, 20,480 CIFAR-10 training images, 5 epochs at batch 128, SGD
    (lr 0.15, weight decay 0.0005, 1 warm-up epoch); kNN (k = 200, t = 0.1) and a 30-epoch
    linear probe on 10,000 training / 2,000 test images; 2,000 held-out training images for
    validation"``. Fields left to the method say "the method's". ``dataset``: the data set's
    name in the sentence (default: from ``cfg.dataset``).
    """
    names = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
    dataset = dataset or names.get(Path(str(cfg.dataset)).name, Path(str(cfg.dataset)).name)
    backbone = cfg.backbone.replace("resnet", "ResNet-")
    width = f" at width {cfg.width:g}" if cfg.width != 1.0 else " (full width)"
    optimizer = cfg.optimizer.upper() if cfg.optimizer else "the method's optimizer"
    lr = f"lr {cfg.lr:g}" if cfg.lr is not None else "the method's lr"
    wd = f"weight decay {cfg.weight_decay:g}" if cfg.weight_decay is not None else "the method's weight decay"
    warmup = (f", {cfg.warmup_epochs} warm-up epoch{'s' if cfg.warmup_epochs != 1 else ''}"
              if cfg.warmup_epochs else "")
    probe = (f"kNN (k = {cfg.knn_k}, t = {cfg.knn_t:g}) and a {cfg.linear_epochs}-epoch linear probe on "
             f"{_count(cfg.eval_train_subset, 'training', 'all training')} / "
             f"{_count(cfg.eval_test_subset, 'test', 'all test')} images")
    validation = f"; {cfg.val_images:,} held-out training images for validation" if cfg.val_images else ""
    return (f"{backbone}{width}, {_count(cfg.subset, f'{dataset} training images', f'all {dataset} training images')}, "
            f"{cfg.epochs} epochs at batch {cfg.batch_size}, {optimizer} ({lr}, {wd}{warmup}); {probe}{validation}")


def recipe(profile: str, method: str = "byol", dataset: str | None = None) -> str:
    """The recipe of a profile of :data:`PROFILES` for ``method`` (:func:`config_recipe` of
    :func:`resolve_config`)."""
    return config_recipe(resolve_config(profile, overrides={"method": method}), dataset)
