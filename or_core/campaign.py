"""GPU campaigns: a priority-ordered list of runs for short GPU windows, each trained and
recorded inside one command.

GPU time comes in windows of one command of about 9 minutes, whose results come back as a few
small files. A checkpoint of a full-width ResNet-18 with its optimizer and EMA state is too big
to come back, so no run may be left half-way: every run starts and finishes inside one call,
and a run that cannot finish in the time left is not started. A campaign file
(``configs/campaign_gpu.yaml``) lists the runs in priority order::

    name: paper-recipe CIFAR campaign, 100 epochs
    profile: gpu
    scale: gpu-100ep                    # the records' scale label (default: the profile's)
    results: results/campaign_gpu       # recorded runs, skipped
    base: {epochs: 100}                 # config fields of every run
    rates:                              # training images/s per method and regularizer
      byol: {none: 20217, so: 17886, any: 15152}   # ``any``: every other regularizer
    allowance_s: {startup: 20, compile: 40, evaluation: 40}
    margin: 1.1                         # training time x margin
    skip_to_smaller: false
    runs:
      - {priority: P1, method: byol, regularizer: none}
      - {priority: P1, method: byol, regularizer: so, gamma: 1.0e-6}
      - {priority: P2, name: my-run, method: simclr, seed: [1, 2]}   # lists expand

An entry holds config fields and ``name`` (default :func:`or_core.experiments.run_name`, e.g.
``byol-cifar10-so-1e-6-s0``; only for an entry of one run), ``priority`` (a label, recorded as
the record's group) and ``note``. A regularized run without a gamma gets the regularizer's
default (:data:`or_core.orthogonality.DEFAULT_GAMMA`) written into its config.

The expected time of a run, in seconds::

    startup + compile (if the run is compiled) + evaluation
        + margin * epochs * (train_images // batch_size) * batch_size / rate

``rate`` is the file's ``rates`` entry of the run's method and regularizer (``any`` standing in
for regularizers not listed), replaced by a measured one where ``--rates`` gives it (a rates
JSON, a ``benchmarks/train_throughput.py`` JSON or a folder of records or bundles: the lowest
measurement of the run's method, regularizer and compile mode wins). A run with no rate is an
error of the file. The file is validated whole before anything runs (one ``ConfigError`` line
naming each bad entry by its number and run name); ``--dry-run`` lists what a call would do.

:func:`run_campaign` walks the runs in order. A run already recorded (``<name>.json`` in the
results folder, or in the output folder from an earlier call) is skipped. A run expected to
take longer than a whole call of this budget has (the budget less the second or so of reading
the file) can never run at that budget: it is skipped, said so, and the campaign goes on (were
it waited for, it would block every later run). A run that fits a call but not the time left
stops the campaign there (priority order: the next call starts with it), unless the file sets
``skip_to_smaller: true``, which lets later, smaller runs use what is left. The budget's clock
starts when the command has imported its modules (a few seconds: give the machine's command a
limit of about the budget + 60 s); a run still training when the budget is spent is stopped
(``SIGALRM``), nothing of it is written, and the campaign ends, so the command never outlasts
its budget by more than the cleanup. A run that fails (an input error: a diverged loss, say)
writes nothing either and the campaign goes on; a call with a failed or stopped run ends with
:class:`CampaignRunsFailed` (one line, exit code 2) after its summary.

Each finished run leaves one file in the output folder, ``<name>.json``, written atomically
at its end (:func:`or_core.atomic.write_json_atomic`): the same record as a matrix run's
(:func:`or_core.experiments.run_experiment`: config, summary, per-epoch history, collapse
spectra of the weights, hidden features and representation, provenance), plus a ``campaign``
block (the estimate and what was measured against it). The provenance names the device the run
trained on (``torch.cuda.get_device_name`` or the CPU's model) and its ``gpu_minutes`` (the
run's wall time, training and evaluation; ``None`` on the CPU). The run's directory (checkpoint and all) lives in a
temporary folder outside the output folder and is deleted. To record a bundle, copy it into
the results folder (``cp OUT/*.json results/campaign_gpu/``) and commit it: the report reads
it like any record (``or_core.report.load_folder("results/campaign_gpu")``), and the next call
skips the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from or_core.atomic import write_json_atomic
from or_core.config import PROFILES, PretrainConfig, check_field, fit_to_data, read_yaml_file, resolve_config
from or_core.data import count_images, load_split
from or_core.errors import ConfigError, InputError, MissingPathError, input_error_message
from or_core.fast_path.compiled_calls import compile_mode
from or_core.matrix import run_name
from or_core.methods import REGULARIZERS, available_methods
from or_core.orthogonality import DEFAULT_GAMMA
from or_core.measure import collapse_spectra, load_trained
from or_core.provenance import provenance
from or_core.records import scale_of
from or_core.run_files import read_metrics
from or_core.train import pretrain

__all__ = [
    "Campaign", "CampaignRun", "CampaignResult", "CampaignRunsFailed", "RunOverBudget", "load_campaign",
    "expected_seconds", "decide", "read_rates", "run_campaign",
]

#: Top-level keys of a campaign file.
CAMPAIGN_KEYS = (
    "name", "profile", "scale", "results", "base", "rates", "allowance_s", "margin", "skip_to_smaller", "runs",
)
#: Keys of a run entry that are not config fields.
ENTRY_KEYS = ("name", "priority", "note")
#: The ``rates`` key that stands in for every regularizer a method's rates do not list.
ANY = "any"
#: Fixed seconds added to every run (``allowance_s``) for what is not training (start, data,
#: kNN, linear probe) and, for a compiled run only, compiling: about 1.3 times what they took
#: on one GPU (measurements: results/benchmarks/NOTES.md#run-allowance).
DEFAULT_ALLOWANCE_S = {"startup": 20.0, "compile": 40.0, "evaluation": 40.0}
#: The training time is multiplied by this (at least 1): the same run's speed varies between
#: calls on one machine (see results/benchmarks/NOTES.md#run-allowance).
DEFAULT_MARGIN = 1.1
#: What a run may be instead of trained, in the final summary.
RECORDED, NEVER_FITS, NOT_STARTED, FAILED, ABORTED = "recorded", "never fits", "not started", "failed", "aborted"


class CampaignRunsFailed(InputError):
    """Some runs of a campaign failed or ran past the budget; the others are written."""


class RunOverBudget(BaseException):
    """The campaign's budget was spent while a run was still training (its estimate was too low).

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way (a data
    loader's, say) may swallow it and let the run outlive the command."""


@dataclass(frozen=True)
class CampaignRun:
    """One run of a campaign: its config (fitted to the data) and its expected time."""

    name: str
    number: int
    priority: str | None
    cfg: PretrainConfig
    train_images: int
    rate: float
    rate_source: str
    expected_s: float
    note: str | None = None


@dataclass
class Campaign:
    """A parsed and validated campaign file."""

    path: Path
    name: str
    profile: str
    scale: str
    results: Path
    allowance_s: dict[str, float]
    margin: float
    skip_to_smaller: bool
    runs: list[CampaignRun] = field(default_factory=list)

    def record_path(self, run: CampaignRun) -> Path:
        return self.results / f"{run.name}.json"


@dataclass
class CampaignResult:
    """What one call did: runs written (name -> bundle path), runs not trained (name -> why)
    by kind (:data:`RECORDED`, :data:`NEVER_FITS`, :data:`NOT_STARTED`, :data:`FAILED`,
    :data:`ABORTED`), and the budget left."""

    ran: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, tuple[str, str]] = field(default_factory=dict)
    remaining_s: float = 0.0


# ----------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------
def expected_seconds(
    cfg: PretrainConfig, train_images: int, rate: float, allowance_s: dict[str, float], margin: float
) -> float:
    """Seconds one run is expected to take: the fixed allowances (``compile`` only if the run
    is compiled) plus ``margin`` times its training images over ``rate`` (images/s)."""
    images = cfg.epochs * (train_images // cfg.batch_size) * cfg.batch_size
    compiled = compile_mode(cfg.compile) is not None
    fixed = allowance_s["startup"] + allowance_s["evaluation"] + (allowance_s["compile"] if compiled else 0.0)
    return fixed + margin * images / rate


def decide(expected_s: float, remaining_s: float, available_s: float) -> str | None:
    """``None`` when a run of ``expected_s`` may start with ``remaining_s`` left; else
    :data:`NEVER_FITS` (more than ``available_s``, what a whole call has once it has read its
    file) or :data:`NOT_STARTED` (it would fit a later call)."""
    if expected_s > available_s:
        return NEVER_FITS
    if expected_s > remaining_s:
        return NOT_STARTED
    return None


#: A measured rate's compile mode when its source does not say (a plain rates mapping).
ANY_MODE = "any"


def _mode(value: Any) -> str:
    """A compile setting as the key of a measured rate: its mode, or ``"none"`` for eager."""
    try:
        return compile_mode(value) or "none"
    except ValueError:
        return "none"


def _rate_of(
    file_rates: dict[tuple[str, str], float], measured: dict[tuple[str, str, str], tuple[float, str]],
    cfg: PretrainConfig, source: str,
) -> tuple[float, str] | None:
    """The rate a run is expected to train at: a measurement of its method, regularizer and
    compile mode (a compiled run trains at about twice an eager one's rate), else the file's
    rate of its method and regularizer, else the method's ``any``; ``None`` if there is none."""
    mode = _mode(cfg.compile)
    for regularizer, key_mode in itertools.product((cfg.regularizer, ANY), (mode, ANY_MODE)):
        if (cfg.method, regularizer, key_mode) in measured:
            return measured[cfg.method, regularizer, key_mode]
    for key in ((cfg.method, cfg.regularizer), (cfg.method, ANY)):
        if key in file_rates:
            return file_rates[key], f"{source} rates.{key[0]}.{key[1]}"
    return None


def _history_rate(history: Sequence[dict[str, Any]]) -> float | None:
    """Training images/s of a run's epochs after the first (which compiles), per-epoch probe
    and checkpoint included; the first alone for a one-epoch run."""
    epochs = [h for h in history if h.get("images_per_s") and h.get("epoch_time_s")]
    epochs = epochs[1:] or epochs
    seconds = sum(float(h["epoch_time_s"]) for h in epochs)
    if not epochs or seconds <= 0:
        return None
    return sum(float(h["images_per_s"]) * float(h["epoch_time_s"]) for h in epochs) / seconds


def read_rates(path: str | Path) -> dict[tuple[str, str, str], tuple[float, str]]:
    """Measured rates, ``{(method, regularizer, compile mode): (images/s, source)}``, from ``path``:

    * a folder: every record or bundle under it (``*.json`` with ``config`` and ``history``),
      its rate :func:`_history_rate` (the epochs after the first), and any
      ``benchmarks/train_throughput.py`` JSON in it;
    * a ``benchmarks/train_throughput.py`` JSON (its ``results`` rows) or one record;
    * a JSON mapping ``{method: {regularizer: images/s}}`` (the ``rates`` block's form, for
      any compile mode), or ``{"rates": {...}}``.

    The compile mode is ``"none"`` for an eager run; several measurements of one key give the
    lowest (a campaign plans with the slowest it has seen).

    Raises:
        MissingPathError: ``path`` does not exist.
        ConfigError: a file that is none of these, named.
    """
    path = Path(path)
    if not path.exists():
        raise MissingPathError(
            f"rates not found: {path}; give a rates JSON, a train_throughput.py JSON or a folder of records"
        )
    found: dict[tuple[str, str, str], tuple[float, str]] = {}

    def add(method: Any, regularizer: Any, mode: str, rate: Any, source: str) -> None:
        number = _positive(rate)
        if not isinstance(method, str) or not isinstance(regularizer, str) or number is None:
            raise ConfigError(
                f"{source}: a rate needs a method, a regularizer and images/s > 0, "
                f"got {method!r}, {regularizer!r}, {rate!r}"
            )
        key = (method, regularizer, mode)
        if key not in found or number < found[key][0]:
            found[key] = (number, source)

    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    for file in files:
        # e.g. call1-<commit>/throughput_methods.json
        name = str(file.relative_to(path)) if path.is_dir() else file.name
        try:
            data = json.loads(file.read_text())
        except (ValueError, OSError) as error:
            raise ConfigError(f"{file}: not a JSON file of rates ({' '.join(str(error).split())})") from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict) and isinstance(data.get("history"), list):
            cfg, rate = data["config"], _history_rate(data["history"])
            if rate is not None:
                method, regularizer = cfg.get("method"), cfg.get("regularizer", "none")
                add(method, regularizer, _mode(cfg.get("compile")), rate, f"{name}, measured")
        elif isinstance(data, dict) and isinstance(data.get("results"), list):
            for row in data["results"]:
                if isinstance(row, dict) and "method" in row:  # rows of rates (not, say, concurrency.py's)
                    rate, source = row.get("images_per_s"), f"{name}, benchmark"
                    add(row.get("method"), row.get("regularizer"), _mode(row.get("compile")), rate, source)
        elif isinstance(data, dict) and not path.is_dir():
            block = data.get("rates", data)
            problems = _rates_problems(block, str(file))
            if problems:
                raise ConfigError("; ".join(problems))
            for (method, regularizer), rate in _rates_block(block).items():
                add(method, regularizer, ANY_MODE, rate, name)
        elif not path.is_dir():
            raise ConfigError(
                f"{file}: neither a rates mapping {{method: {{regularizer: images/s}}}}, a train_throughput.py JSON "
                "nor a record; see or_core/campaign.py"
            )
    return found


# ----------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------
def _number(value: Any, minimum: float = 0.0, strict: bool = True) -> float | None:
    """``value`` as a finite number above ``minimum`` (or equal to it, unless ``strict``),
    else ``None``; YAML 1.1 reads ``1.3e4`` as text, and a boolean is no number."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    ok = math.isfinite(number) and (number > minimum or (not strict and number == minimum))
    return number if ok else None


def _positive(value: Any) -> float | None:
    """``value`` as a finite number > 0, else ``None``."""
    return _number(value)


def _rates_problems(block: Any, where: str) -> list[str]:
    if not isinstance(block, dict) or not block:
        return [f"{where}: `rates:` must map methods to {{regularizer: images/s}} (or {ANY}: images/s), got {block!r}"]
    problems = []
    for method, rates in block.items():
        if method not in available_methods():
            problems.append(f"{where}: rates: unknown method {method!r}; valid: {', '.join(available_methods())}")
        if not isinstance(rates, dict) or not rates:
            problems.append(f"{where}: rates of {method!r} must map regularizers (or {ANY}) to images/s, got {rates!r}")
            continue
        for regularizer, rate in rates.items():
            if regularizer != ANY and regularizer not in REGULARIZERS:
                problems.append(
                    f"{where}: rates of {method!r}: unknown regularizer {regularizer!r}; "
                    f"valid: {', '.join(REGULARIZERS)}, {ANY}"
                )
            if _positive(rate) is None:
                problems.append(f"{where}: rates of {method!r}: {regularizer!r} must be images/s > 0, got {rate!r}")
    return problems


def _rates_block(block: dict[str, dict[str, Any]]) -> dict[tuple[str, str], float]:
    return {(m, r): float(v) for m, rates in block.items() for r, v in rates.items()}


def _read_file(path: Path) -> dict[str, Any]:
    spec = read_yaml_file(path, f"campaign file not found: {path}; check the path (e.g. configs/campaign_gpu.yaml)")
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{path}: expected a mapping of {', '.join(CAMPAIGN_KEYS)} at the top level; see configs/campaign_gpu.yaml"
        )
    runs = spec.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(
            f"{path}: `runs:` must be a non-empty list of entries, each a `- {{method: ..., regularizer: ...}}` item"
        )
    return spec


def _top_problems(spec: dict[str, Any]) -> list[str]:
    problems = []
    unknown = sorted(set(spec) - set(CAMPAIGN_KEYS), key=str)
    if unknown:
        problems.append(f"unknown keys {unknown}; valid keys: {', '.join(CAMPAIGN_KEYS)}")
    if spec.get("profile", "gpu") not in PROFILES:
        problems.append(f"unknown profile {spec.get('profile')!r}; valid profiles: {', '.join(PROFILES)}")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        problems.append(f"`base:` must be a mapping of config fields, got {base!r}")
    else:
        problems += _field_problems("base", base)
    problems += _rates_problems(spec.get("rates"), "rates")
    allowance = spec.get("allowance_s") or {}
    if not isinstance(allowance, dict) or set(allowance) - set(DEFAULT_ALLOWANCE_S):
        problems.append(
            f"`allowance_s:` must map some of {', '.join(DEFAULT_ALLOWANCE_S)} to seconds >= 0, got {allowance!r}"
        )
    else:
        for key, value in allowance.items():
            if _number(value, strict=False) is None:
                problems.append(f"allowance_s: {key!r} must be seconds >= 0, got {value!r}")
    if _number(spec.get("margin", DEFAULT_MARGIN), 1.0, strict=False) is None:
        problems.append(
            f"`margin:` must be a number >= 1 (below 1 a run is assumed faster than measured), "
            f"got {spec.get('margin')!r}"
        )
    if not isinstance(spec.get("skip_to_smaller", False), bool):
        problems.append(f"`skip_to_smaller:` must be true or false, got {spec.get('skip_to_smaller')!r}")
    for key in ("name", "scale", "results"):
        if key in spec and (not isinstance(spec[key], str) or not spec[key]):
            problems.append(f"`{key}:` must be a non-empty text, got {spec[key]!r}")
    return problems


def _field_problems(where: str, fields: dict[str, Any], extra: Sequence[str] = (), expand: bool = False) -> list[str]:
    """Unknown config fields of ``fields`` and values of the wrong type or range (every value
    of a list, with ``expand``: an entry's lists expand to runs), each as ``where: ...``."""
    valid = {f.name for f in dataclasses.fields(PretrainConfig)} - {"profile"}
    unknown = sorted(set(fields) - valid - set(extra), key=str)
    problems = [f"{where}: unknown fields {unknown}; valid: {sorted(valid | set(extra))}"] if unknown else []
    if "profile" in fields:
        problems.append(
            f"{where}: 'profile' is the campaign's own (a top-level `profile:`), not a field of runs; move it"
        )
    for key, value in fields.items():
        if key in valid:
            for v in value if isinstance(value, list) and expand else [value]:
                try:
                    check_field(key, v, where)
                except ConfigError as error:
                    problems.append(str(error))
    return problems


def _expand(entry: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    """The config overrides of every run of an entry (its lists expand, in product order)."""
    fields = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    values = [v if isinstance(v, list) else [v] for v in fields.values()]
    out = []
    for combo in itertools.product(*values):
        overrides = {"method": "byol", "dataset": "cifar10", "regularizer": "none", "seed": 0}
        overrides.update({**base, **dict(zip(fields, combo, strict=True))})
        regularizer = overrides["regularizer"]
        if regularizer == "none":
            overrides.pop("gamma", None)
        elif overrides.get("gamma") is None and regularizer in DEFAULT_GAMMA:
            overrides["gamma"] = DEFAULT_GAMMA[regularizer]  # written down: the record says which gamma
        out.append(overrides)
    return out


#: The fields :func:`or_core.config.fit_to_data` may change (the sizes it clips to the data).
FITTED_FIELDS = ("subset", "val_images", "eval_train_subset", "eval_test_subset", "knn_k")


def _fitted(cfg: PretrainConfig, memo: dict[tuple[Any, ...], dict[str, Any]]) -> PretrainConfig:
    """:func:`or_core.config.fit_to_data` of ``cfg``, each data set and set of sizes counted
    once: it lists the folders' files, and a campaign of 21 CIFAR runs would list 60,000 files
    21 times on the GPU's clock."""
    key = (cfg.dataset, cfg.data_root, *(getattr(cfg, k) for k in FITTED_FIELDS))
    if key not in memo:
        fitted = fit_to_data(cfg, notify=False)
        memo[key] = {k: getattr(fitted, k) for k in FITTED_FIELDS}
    return dataclasses.replace(cfg, **memo[key])


def _train_images(cfg: PretrainConfig, counts: dict[tuple[str, str], int]) -> int:
    """The images one epoch draws from: the subset, else the whole training split."""
    if cfg.subset is not None:
        return cfg.subset
    key = (cfg.dataset, cfg.data_root)
    if key not in counts:
        counts[key] = count_images(cfg.dataset, "train", os.path.expanduser(cfg.data_root))
    return counts[key]


def load_campaign(
    path: str | Path,
    results: str | Path | None = None,
    measured: dict[tuple[str, str, str], tuple[float, str]] | None = None,
) -> Campaign:
    """Parse and validate a campaign file; every run's config is built (and fitted to its data)
    as it will train, and every run needs a rate (``measured`` ones, from :func:`read_rates`,
    before the file's), so that a bad entry is found before any GPU time is spent.

    Raises:
        MissingPathError: the file does not exist.
        ConfigError: one line naming the file and every problem, each bad entry by its number
            in ``runs:`` counted from 1 and its run's name, e.g. ``c.yaml (run entries counted
            from 1): run entry 2 (simclr-cifar10-none-s0): no rate for simclr + none ...``.
    """
    path = Path(path)
    spec = _read_file(path)
    top = _top_problems(spec)
    problems = list(top)
    profile = spec.get("profile", "gpu")
    base = spec.get("base") if isinstance(spec.get("base"), dict) else {}
    # With a bad top level every run would fail alike: it is named once, and the entries'
    # own fields are still checked.
    file_rates = _rates_block(spec["rates"]) if not top else {}
    allowance = dict(DEFAULT_ALLOWANCE_S)
    if not top:
        allowance.update({k: float(v) for k, v in (spec.get("allowance_s") or {}).items()})
    margin = float(spec.get("margin", DEFAULT_MARGIN)) if not top else 1.0
    runs: list[CampaignRun] = []
    counts: dict[tuple[str, str], int] = {}
    fits: dict[tuple[Any, ...], dict[str, Any]] = {}
    entry_of: dict[str, int] = {}
    for number, entry in enumerate(spec["runs"], start=1):
        where = f"run entry {number}"
        if not isinstance(entry, dict):
            problems.append(
                f"{where}: expected a mapping of fields such as {{method: byol, regularizer: so}}, got {entry!r}"
            )
            continue
        found = _field_problems(where, entry, ENTRY_KEYS, expand=True)
        for key in ("name", "priority", "note"):
            if key in entry and not isinstance(entry[key], str):
                found.append(f"{where}: {key!r} must be a text, got {entry[key]!r}")
        problems += found
        if found or top:
            continue
        expanded = _expand(entry, base)
        if "name" in entry and len(expanded) > 1:
            problems.append(
                f"{where}: 'name' names one run, but the entry's lists make {len(expanded)}; drop the name or the lists"
            )
            continue
        for overrides in expanded:
            name = entry.get("name") or run_name(overrides)
            label = f"{where} ({name})"
            if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                problems.append(
                    f"{label}: a name holds letters, digits, '.', '_' and '-' only (it names the bundle file)"
                )
                continue
            if name in entry_of:
                problems.append(
                    f"{label}: the name is also run entry {entry_of[name]}'s; tell them apart (e.g. by seed or name)"
                )
                continue
            entry_of[name] = number
            try:
                cfg = _fitted(resolve_config(profile, overrides={**overrides, "profile": profile}), fits)
                train_images = _train_images(cfg, counts)
            except InputError as error:
                problems.append(f"{label}: {input_error_message(error)}")
                continue
            rate = _rate_of(file_rates, measured or {}, cfg, path.name)
            if rate is None:
                problems.append(
                    f"{label}: no rate for {cfg.method} + {cfg.regularizer}; add rates.{cfg.method}.{cfg.regularizer} "
                    f"(or rates.{cfg.method}.{ANY}) in images/s, measured (results/benchmarks/)"
                )
                continue
            expected = expected_seconds(cfg, train_images, rate[0], allowance, margin)
            runs.append(CampaignRun(
                name, number, entry.get("priority"), cfg, train_images, rate[0], rate[1], expected, entry.get("note"),
            ))
    if problems:
        raise ConfigError(f"{path} (run entries counted from 1): " + "; ".join(problems))
    if results is not None:  # given by the caller: relative to the working directory
        results_dir = Path(results)
    else:  # the file's own: relative to the repository that holds configs/
        results_dir = Path(spec.get("results", f"results/{path.stem}"))
        if not results_dir.is_absolute() and path.parent.name == "configs":
            results_dir = path.resolve().parents[1] / results_dir
    scale = spec.get("scale", scale_of(profile))
    skip = bool(spec.get("skip_to_smaller", False))
    return Campaign(path, spec.get("name", path.stem), profile, scale, results_dir, allowance, margin, skip, runs)


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _deadline(seconds: float, name: str) -> Iterator[None]:
    """Raise :class:`RunOverBudget` in the block once ``seconds`` have passed (``SIGALRM``; the
    main thread of a Unix process only, elsewhere no limit): a run the estimate got wrong ends
    with the budget, not with the machine's command limit, which would lose every result."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RunOverBudget(f"{name} was still running when the budget was spent")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_name()}, {torch.get_num_threads()} threads"


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bundle(
    campaign: Campaign, run: CampaignRun, work: Path, summary: dict[str, Any], start: float, command: str
) -> dict[str, Any]:
    """The run's record (:func:`or_core.experiments.run_experiment`'s fields) from its run
    directory: the collapse spectra of the final encoder on the test images, evaluated eagerly
    (:func:`or_core.measure.load_trained` compiles nothing)."""
    cfg = run.cfg
    _free_device_memory()
    evaluation = load_trained(work)
    root = Path(os.path.expanduser(cfg.data_root))
    test = load_split(cfg.dataset, "test", root, cfg.image_size, cfg.eval_test_subset, cfg.seed)
    backbone = evaluation.method.backbone
    collapse = collapse_spectra(backbone, test.images, evaluation.mean, evaluation.std, device=evaluation.device)
    history = read_metrics(work)
    wall = time.perf_counter() - start
    training = float(summary["wall_time_s"])
    rate = _history_rate(history)
    first_extra = None  # what compiling (and the first epoch's warm-up) cost over a later epoch
    if len(history) > 1 and rate:
        seconds = float(history[0]["epoch_time_s"])
        first_extra = seconds - float(history[0]["images_per_s"]) * seconds / rate
    record_provenance = provenance(command, wall_time_s=training)
    record_provenance.update(
        device=_device_label(evaluation.device),
        gpu_minutes=round(wall / 60, 3) if evaluation.device.type == "cuda" else None,
        record_wall_time_s=round(wall, 1),
    )
    return {
        "name": run.name,
        "matrix": campaign.path.name,
        "groups": [run.priority] if run.priority else [],
        "outside_paper_grid": False,
        "selection_run": False,
        "scale": campaign.scale,
        "config": cfg.to_dict(),
        "summary": summary,
        "gamma_choice": None,
        "history": history,
        "collapse": collapse,
        "transfer": {},
        "campaign": {
            "file": campaign.path.name,
            "name": campaign.name,
            "entry": run.number,
            "priority": run.priority,
            "note": run.note,
            "expected_s": round(run.expected_s, 1),
            "rate_images_per_s": run.rate,
            "rate_source": run.rate_source,
            "allowance_s": campaign.allowance_s,
            "margin": campaign.margin,
            "measured": {
                "wall_s": round(wall, 1),
                "training_s": round(training, 1),
                "outside_training_s": round(wall - training, 1),
                "images_per_s_after_first_epoch": None if rate is None else round(rate, 1),
                "first_epoch_extra_s": None if first_extra is None else round(first_extra, 1),
            },
        },
        "provenance": record_provenance,
    }


def _train_one(
    campaign: Campaign, run: CampaignRun, out_dir: Path, seconds_left: float, command: str
) -> tuple[Path, dict[str, Any]]:
    """Train ``run`` in a temporary folder, then write its bundle into ``out_dir``; the
    folder is deleted whatever happens, and nothing is written unless the run finished."""
    work = Path(tempfile.mkdtemp(prefix=f"or_core-campaign-{run.name}-"))
    start = time.perf_counter()
    try:
        with _deadline(seconds_left, run.name):
            summary = pretrain(run.cfg, work, show_progress=False)
            record = _bundle(campaign, run, work, summary, start, command)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _free_device_memory()
    path = out_dir / f"{run.name}.json"
    write_json_atomic(path, record)
    return path, record


# ----------------------------------------------------------------------------------------------
# The campaign
# ----------------------------------------------------------------------------------------------
def _say(line: str) -> None:
    print(f"[campaign] {line}", flush=True)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def _summarize(result: CampaignResult, budget_s: float, dry_run: bool) -> None:
    """The end of a call: what ran, what did not and why (runs sharing a reason on one line),
    and the budget left."""
    _say(("would run: " if dry_run else "ran: ") + (", ".join(result.ran) or "nothing"))
    for kind in (RECORDED, NEVER_FITS, NOT_STARTED, FAILED, ABORTED):
        reasons: dict[str, list[str]] = {}
        for name, (k, why) in result.skipped.items():
            if k == kind:
                reasons.setdefault(why, []).append(name)
        if reasons:
            count = sum(len(names) for names in reasons.values())
            _say(f"{kind} ({count}): " + "; ".join(f"{', '.join(names)} ({why})" for why, names in reasons.items()))
    assumed = " (if each run takes its expected time)" if dry_run else ""
    _say(f"budget left: {result.remaining_s:.0f} s of {budget_s:.0f} s{assumed}")


def run_campaign(
    path: str | Path,
    budget_s: float,
    out: str | Path,
    results: str | Path | None = None,
    rates: str | Path | None = None,
    dry_run: bool = False,
    command: str | None = None,
) -> CampaignResult:
    """Train the next runs of the campaign at ``path`` that fit ``budget_s`` seconds, each
    leaving its bundle ``<name>.json`` in ``out``; returns what was run and skipped.

    The file is validated first (:func:`load_campaign`, with the measured ``rates`` of
    :func:`read_rates`); the clock starts at the call. ``dry_run`` trains nothing and lists
    what a call would do if every run took its expected time. One line is printed per run and
    a summary at the end (what ran, what was skipped and why, the budget left).

    Raises:
        ConfigError: a bad file, ``budget_s`` <= 0, or ``out`` is not a folder.
        CampaignRunsFailed: a run failed (an input error, e.g. a diverged loss) or ran past the
            budget; the summary was printed and every finished run is written.
    """
    started = time.monotonic()
    if _positive(budget_s) is None:
        raise ConfigError(f"--budget-s must be seconds > 0, got {budget_s!r}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; give a folder for the bundles")
    measured = read_rates(rates) if rates is not None else None
    campaign = load_campaign(path, results, measured)
    command = command or f"python -m or_core campaign {path} --budget-s {budget_s:g} --out {out}"
    if not dry_run:
        out_dir.mkdir(parents=True, exist_ok=True)
        for tmp in out_dir.glob(".*.tmp"):  # a write killed half-way (never a bundle)
            tmp.unlink(missing_ok=True)
    # What a call of this budget has once the file is read: a run expected to take longer can
    # never start at this budget (it is skipped, not waited for: it would block the campaign).
    fresh = budget_s - (time.monotonic() - started)
    result = CampaignResult()
    clock = 0.0  # dry run: the seconds the runs before would take
    stopped_at: str | None = None
    for run in campaign.runs:
        remaining = budget_s - (time.monotonic() - started) - clock
        bundle = out_dir / f"{run.name}.json"  # an earlier call's of this window, not committed yet
        recorded = next((p for p in (campaign.record_path(run), bundle) if p.is_file()), None)
        if recorded is not None:
            result.skipped[run.name] = (RECORDED, f"in {recorded.parent}")
            continue
        why = decide(run.expected_s, remaining, fresh)
        if why != NEVER_FITS and stopped_at is not None:
            result.skipped[run.name] = (NOT_STARTED, f"after {stopped_at}, in priority order")
            continue
        if why == NEVER_FITS:
            result.skipped[run.name] = (
                why, f"expected {run.expected_s:.0f} s > the {fresh:.0f} s a call of this budget has"
            )
            _say(
                f"skip {run.name}: expected {_minutes(run.expected_s)}, more than a call of this budget has "
                f"({fresh:.0f} s); give it a larger --budget-s or a measured rate (--rates)"
            )
            continue
        if why == NOT_STARTED:
            result.skipped[run.name] = (why, f"expected {run.expected_s:.0f} s > {remaining:.0f} s left")
            if not campaign.skip_to_smaller:
                stopped_at = run.name
            continue
        where = f"{run.name} ({run.priority or 'no priority'}, entry {run.number})"
        if dry_run:
            clock += run.expected_s
            result.ran[run.name] = bundle
            _say(
                f"would run {where}: expected {_minutes(run.expected_s)} at {run.rate:,.0f} images/s "
                f"({run.rate_source})"
            )
            continue
        _say(
            f"start {where}: expected {_minutes(run.expected_s)} at {run.rate:,.0f} images/s ({run.rate_source}), "
            f"{remaining:.0f} s left"
        )
        begin = time.monotonic()
        try:
            bundle, record = _train_one(campaign, run, out_dir, remaining, command)
        except RunOverBudget as error:
            result.skipped[run.name] = (
                ABORTED,
                f"{error}, after {time.monotonic() - begin:.0f} s (expected {run.expected_s:.0f} s); nothing written: "
                "lower its rate",
            )
            _say(f"aborted {run.name}: {result.skipped[run.name][1]}")
            stopped_at = run.name
            continue
        except InputError as error:  # a diverged run must not cost the window's other runs
            result.skipped[run.name] = (FAILED, input_error_message(error) or str(error))
            _say(f"failed {run.name}: {result.skipped[run.name][1]}")
            continue
        result.ran[run.name] = bundle
        s = record["summary"]
        _say(
            f"done {run.name}: {time.monotonic() - begin:.0f} s (expected {run.expected_s:.0f} s), "
            f"knn_top1 {s['knn_top1']:.4f}, linear_top1 {s['linear_top1']:.4f}, effective rank "
            f"{s['effective_rank']:.1f} on {record['provenance']['device']} -> {bundle}"
        )
    result.remaining_s = budget_s - (time.monotonic() - started) - clock
    _summarize(result, budget_s, dry_run)
    bad = {n: why for n, (kind, why) in result.skipped.items() if kind in (FAILED, ABORTED)}
    if bad:
        raise CampaignRunsFailed(
            f"{len(bad)} campaign run(s) failed or ran past the budget ({', '.join(bad)}), each listed above; "
            f"{len(result.ran)} written to {out_dir}; fix the cause and run the same command again"
        )
    return result

