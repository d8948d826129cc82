"""Matrix files read: the runs a matrix names, the gamma its records choose, the runs still to train.

A matrix file (``configs/matrix_cpu_paired.yaml``) names a profile, a results folder and
entries; an entry's list values expand to every combination (the format is described in
:mod:`or_core.experiments`, which trains them). This module only reads: :func:`load_matrix`
parses and validates a file, :func:`choose_gamma` picks the gamma of a ``gamma: chosen`` run
from the records, :func:`pending_runs` lists the runs without a record. It imports nothing of
the training code, so that the tables of :mod:`or_core.report` can name a matrix's runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from or_core.config import PROFILES, PretrainConfig, check_field, read_yaml_file, resolve_config
from or_core.errors import ConfigError, InputError
from or_core.orthogonality import DEFAULT_GAMMA
from or_core.records import load_records

__all__ = [
    "Experiment", "Matrix", "GammaNotChosen", "load_matrix", "run_name", "choose_gamma", "choice_key",
    "grid_of", "resolve_chosen", "pending_runs",
]

CHOSEN = "chosen"
#: Keys of a matrix entry that are not config fields.
ENTRY_KEYS = ("group", "transfer", "outside_paper_grid", "note")
#: Top-level keys of a matrix file.
MATRIX_KEYS = ("name", "profile", "results", "base", "choose_gamma", "runs")
#: Keys of a matrix file's ``choose_gamma`` block: ``selection_seeds`` (a choice per method and
#: data set, its grid runs generated) or ``method`` and ``dataset`` (one choice for all, its grid
#: runs listed: the single-method form); ``metric`` is optional.
CHOOSE_KEYS = ("method", "dataset", "metric", "selection_seeds", "grids")
#: The metrics gamma may be chosen on: measured on held-out *training* images. A test metric
#: (``knn_top1``) would choose gamma on the very images that then judge it.
VALIDATION_METRICS = ("val_knn_top1",)
#: Regularizers that use another's grid where ``grids`` gives none of their own: SO's two parts,
#: controls of SO, are tuned over SO's gammas.
GRID_OF = {"so_diag": "so", "so_offdiag": "so"}
#: The group of every generated selection run (``--groups selection`` runs all the grids).
SELECTION_GROUP = "selection"


class GammaNotChosen(InputError, RuntimeError):
    """A ``gamma: chosen`` run whose gamma cannot be chosen: the grid's runs are not all
    recorded (not run yet, left out by ``--groups``, or failed)."""


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """One run of a matrix: config overrides on top of the matrix's profile and base."""

    name: str
    overrides: dict[str, Any]
    groups: tuple[str, ...]
    transfer: tuple[str, ...] = ()
    outside_paper_grid: bool = False
    gamma_choice: dict[str, Any] | None = None
    #: A run of a generated selection grid: it chooses gamma and is never compared.
    selection: bool = False

    @property
    def needs_chosen_gamma(self) -> bool:
        return self.overrides.get("gamma") == CHOSEN

    def with_gamma(self, choice: dict[str, Any]) -> Experiment:
        """This run with the chosen gamma filled in, renamed after it."""
        overrides = {**self.overrides, "gamma": choice["gamma"]}
        return dataclasses.replace(self, name=run_name(overrides), overrides=overrides, gamma_choice=choice)


@dataclass(kw_only=True)
class Matrix:
    """A parsed matrix file."""

    path: Path
    profile: str
    results: Path
    base: dict[str, Any]
    choose: dict[str, Any]
    experiments: list[Experiment] = field(default_factory=list)

    def record_path(self, experiment: Experiment) -> Path:
        return self.results / f"{experiment.name}.json"

    @property
    def per_method(self) -> bool:
        """Whether gamma is chosen per (method, data set) on selection seeds (else the
        single-method form: one choice for all, from one method's seed-0 runs)."""
        return _per_method(self.choose)


def _per_method(choose: dict[str, Any]) -> bool:
    return "selection_seeds" in choose


def grid_of(grids: dict[str, Any], regularizer: Any) -> list[Any] | None:
    """The grid ``regularizer`` is chosen from: its own, else the one it shares (:data:`GRID_OF`)."""
    if not isinstance(regularizer, str):
        return None
    return grids.get(regularizer) or grids.get(GRID_OF.get(regularizer, ""))


def choice_key(overrides: dict[str, Any]) -> tuple[str, str, str]:
    """(method, data set, regularizer): what one gamma is chosen for, per method."""
    return (
        str(overrides.get("method", "byol")), Path(str(overrides.get("dataset", "cifar10"))).name,
        str(overrides.get("regularizer", "none")),
    )


def _format_gamma(gamma: Any) -> str:
    if gamma is None:
        return "default"
    if gamma == CHOSEN:
        return CHOSEN
    return f"{float(gamma):.0e}".replace("e-0", "e-").replace("e+0", "e")


def run_name(overrides: dict[str, Any]) -> str:
    """``<method>-<dataset>-<regularizer>[-<gamma>]-s<seed>``, e.g. ``byol-cifar10-so-1e-6-s0``."""
    regularizer = overrides.get("regularizer", "none")
    parts = [overrides.get("method", "byol"), Path(str(overrides.get("dataset", "cifar10"))).name, regularizer]
    if regularizer != "none":
        parts.append(_format_gamma(overrides.get("gamma")))
    parts.append(f"s{overrides.get('seed', 0)}")
    return "-".join(str(p) for p in parts)


def _expand(entry: dict[str, Any], base: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every combination of an entry's list values, as (config overrides, entry extras)."""
    extras = {k: entry[k] for k in ENTRY_KEYS if k in entry}
    fields = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    keys = list(fields)
    values = [v if isinstance(v, list) else [v] for v in fields.values()]
    out = []
    for combo in itertools.product(*values):
        overrides = {"method": "byol", "dataset": "cifar10", "regularizer": "none", "seed": 0}
        overrides.update({**base, **dict(zip(keys, combo, strict=True))})
        if overrides.get("regularizer", "none") == "none":
            overrides.pop("gamma", None)
        out.append((overrides, extras))
    return out


def _kind(value: Any) -> str:
    """What a YAML value is, in YAML's words: ``a mapping``, ``a list``, ``the text 'byol'``."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"the {'text' if isinstance(value, str) else type(value).__name__} {value!r}"


def _read_spec(path: Path) -> dict[str, Any]:
    """The mapping of a matrix file; a missing file, invalid YAML or a top level that is not a
    mapping is an error naming the file and the fix."""
    spec = read_yaml_file(
        path, f"matrix file not found: {path}; check the path (the matrices are configs/matrix_*.yaml)"
    )
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{path}: expected a mapping of {', '.join(MATRIX_KEYS)} at the top level, got {_kind(spec)}; "
            "see configs/matrix_cpu.yaml"
        )
    runs = spec.get("runs")
    if runs is None or runs == []:
        raise ConfigError(
            f"{path}: no runs; add a `runs:` list with one `- {{method: ..., dataset: ...}}` item per entry"
        )
    if not isinstance(runs, list):
        raise ConfigError(
            f"{path}: `runs:` must be a list of entries, each a `- ` item such as "
            f"`- {{method: byol, regularizer: so}}`, "
            f"got {_kind(runs)}; put a `- ` before each entry"
        )
    return spec


def _top_problems(spec: dict[str, Any]) -> list[str]:
    """What is wrong with a matrix file's keys, profile, ``base`` and ``choose_gamma`` block."""
    problems = []
    unknown = sorted(set(spec) - set(MATRIX_KEYS), key=str)
    if unknown:
        problems.append(f"unknown keys {unknown}; valid keys: {', '.join(MATRIX_KEYS)}")
    profile = spec.get("profile", "cpu")
    if profile not in PROFILES:
        problems.append(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        problems.append(f"`base:` must be a mapping of config fields, got {_kind(base)}")
    else:
        problems += _field_problems("base", base, expand=False)
    choose = spec.get("choose_gamma") or {}
    if not isinstance(choose, dict):
        problems.append(f"`choose_gamma:` must be a mapping of {', '.join(CHOOSE_KEYS)}, got {_kind(choose)}")
    elif choose:
        problems += _choose_problems(choose)
    return problems


def _choose_problems(choose: dict[str, Any]) -> list[str]:
    """What is wrong with a ``choose_gamma`` block: its keys, its form (selection seeds, or one
    method and data set), a metric that is not a validation metric, grids of numbers."""
    problems = []
    unknown = sorted(set(choose) - set(CHOOSE_KEYS), key=str)
    if unknown:
        problems.append(f"choose_gamma: unknown keys {unknown}; valid keys: {', '.join(CHOOSE_KEYS)}")
    if _per_method(choose):
        problems += _seeds_problems(choose)
    else:
        for key in ("method", "dataset"):
            if not isinstance(choose.get(key), str):
                problems.append(
                    f"choose_gamma: {key!r} must name the {key} of the grid's runs, got {choose.get(key)!r} "
                    "(or give selection_seeds: a choice per method and data set)"
                )
    metric = choose.get("metric", VALIDATION_METRICS[0])
    if metric not in VALIDATION_METRICS:
        problems.append(
            f"choose_gamma: metric {metric!r} is not a validation metric: a gamma chosen on the test split is judged "
            f"on the images it was chosen on; use {' or '.join(VALIDATION_METRICS)} (held-out training images)"
        )
    grids = choose.get("grids")
    if not isinstance(grids, dict) or not grids:
        return [*problems, f"choose_gamma: 'grids' must map regularizers to lists of gammas, got {grids!r}"]
    for regularizer, grid in grids.items():
        if not isinstance(grid, list) or not grid:
            problems.append(
                f"choose_gamma: the grid of {regularizer!r} must be a non-empty list of gammas, got {grid!r}"
            )
            continue
        for gamma in grid:
            try:
                check_field("gamma", gamma)
            except ConfigError:
                problems.append(f"choose_gamma: the grid of {regularizer!r} must hold numbers >= 0, got {gamma!r}")
    return problems


def _seeds_problems(choose: dict[str, Any]) -> list[str]:
    """The per-method form: distinct selection seeds, and no single method or data set (the
    two forms choose differently; one block that mixes them would be read as either)."""
    problems = []
    mixed = [key for key in ("method", "dataset") if key in choose]
    if mixed:
        problems.append(
            f"choose_gamma: {' and '.join(mixed)} belong to the single-method form; with selection_seeds gamma is "
            f"chosen for every method and data set of the gamma: chosen runs; remove {' and '.join(mixed)}"
        )
    seeds = choose["selection_seeds"]
    valid = isinstance(seeds, list) and seeds and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds
    )
    if not valid or len(set(seeds)) != len(seeds):
        problems.append(
            f"choose_gamma: 'selection_seeds' must be a non-empty list of distinct integers >= 0 that no comparison "
            f"uses, such as [100], got {seeds!r}"
        )
    return problems


def _field_problems(where: str, fields: dict[str, Any], expand: bool = True) -> list[str]:
    """Unknown config fields of ``fields`` and values of the wrong type or range (every value
    of a list, with ``expand``: an entry's lists expand to runs), each as ``where: ...``."""
    valid = {f.name for f in dataclasses.fields(PretrainConfig)} - {"profile"}
    extra = set(ENTRY_KEYS) if expand else set()
    unknown = sorted(set(fields) - valid - extra - {"profile"}, key=str)
    problems = [f"{where}: unknown fields {unknown}; valid: {sorted(valid | extra)}"] if unknown else []
    if "profile" in fields:
        problems.append(
            f"{where}: 'profile' is the matrix's own (a top-level `profile:`), not a field of runs; move it"
        )
    for key, value in fields.items():
        if key not in valid:
            continue
        values = value if expand and isinstance(value, list) else [value]
        if not values:
            problems.append(f"{where}: field {key!r} is an empty list; give at least one value")
        for v in values:
            if key == "gamma" and v == CHOSEN:
                continue
            try:
                check_field(key, v, where)
            except ConfigError as error:
                problems.append(str(error))
    return problems


def _extras_problems(where: str, entry: dict[str, Any]) -> list[str]:
    """What is wrong with an entry's keys that are not config fields."""
    problems = []
    if "group" in entry and not isinstance(entry["group"], str):
        problems.append(f"{where}: 'group' must be one name, got {entry['group']!r}")
    transfer = entry.get("transfer")
    if transfer is not None and (not isinstance(transfer, list) or not all(isinstance(t, str) for t in transfer)):
        problems.append(f"{where}: 'transfer' must be a list of data sets such as [cifar100], got {transfer!r}")
    if "outside_paper_grid" in entry and not isinstance(entry["outside_paper_grid"], bool):
        problems.append(f"{where}: 'outside_paper_grid' must be true or false, got {entry['outside_paper_grid']!r}")
    return problems


def _config_problems(where: str, overrides: dict[str, Any], profile: str, grids: dict[str, Any]) -> list[str]:
    """The config of one expanded run built as :func:`run_experiment` builds it, ``gamma:
    chosen`` standing in for the first gamma of its regularizer's grid; its problem, if any."""
    overrides = dict(overrides)
    if overrides.get("gamma") == CHOSEN:
        regularizer = overrides.get("regularizer")
        grid = grid_of(grids, regularizer)
        if not grid:
            shared = f" (or one for {GRID_OF[regularizer]!r}, whose grid it shares)" if regularizer in GRID_OF else ""
            return [
                f"{where}: gamma: chosen needs a grid for regularizer {regularizer!r}{shared} in choose_gamma.grids "
                f"(it has {', '.join(map(str, grids)) or 'none'}); add one or give gamma a number"
            ]
        overrides["gamma"] = grid[0]
    try:
        resolve_config(profile, overrides={**overrides, "profile": profile})
    except ConfigError as error:
        return [f"{where}: {error}"]
    return []


def _entry_problems(
    where: str, entry: Any, base: dict[str, Any], profile: str, grids: dict[str, Any], check_configs: bool
) -> list[str]:
    """Every problem of one ``runs:`` entry: its shape, its fields and (with ``check_configs``:
    the file's profile and base are valid) the configs of the runs it expands to."""
    if not isinstance(entry, dict):
        return [f"{where}: expected a mapping of fields such as {{method: byol, regularizer: so}}, got {_kind(entry)}"]
    problems = [*_field_problems(where, entry), *_extras_problems(where, entry)]
    if problems or not check_configs:
        return problems
    for overrides, _ in _expand(entry, base):
        problems += [p for p in _config_problems(where, overrides, profile, grids) if p not in problems]
    return problems


def _gamma_of(experiment: Experiment) -> float | None:
    """The gamma a (regularized, not chosen) run trains with: its own, or the regularizer's default."""
    gamma = experiment.overrides.get("gamma")
    return DEFAULT_GAMMA.get(experiment.overrides.get("regularizer")) if gamma is None else float(gamma)


def _grid_problems(experiments: Sequence[Experiment], choose: dict[str, Any]) -> list[str]:
    """``gamma: chosen`` of a regularizer needs every gamma of its grid among the matrix's
    runs (``choose_gamma``'s method and data set, seed 0, inside the paper's grid)."""
    problems = []
    regularizers = dict.fromkeys(e.overrides.get("regularizer") for e in experiments if e.needs_chosen_gamma)
    for regularizer in regularizers:
        grid = grid_of(choose.get("grids") or {}, regularizer) or []
        have = [
            _gamma_of(e) for e in experiments
            if not e.needs_chosen_gamma and not e.outside_paper_grid and e.overrides.get("regularizer") == regularizer
            and e.overrides.get("method") == choose.get("method") and e.overrides.get("seed") == 0
            and Path(str(e.overrides.get("dataset"))).name == choose.get("dataset")
        ]
        missing = [g for g in grid if not any(h is not None and math.isclose(float(g), h, rel_tol=1e-9) for h in have)]
        if missing:
            problems.append(
                f"choose_gamma: gamma: chosen for {regularizer} needs the grid's runs ({choose.get('method')} on "
                f"{choose.get('dataset')}, seed 0) with gamma {missing}; add them to runs:"
            )
    return problems


def _seed_leak(where: str, entry_runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> list[str]:
    """An entry of ``runs:`` is a comparison (the selection runs are generated, never listed):
    on a selection seed its score would be the very draw that chose its gamma (winner's curse)."""
    leaks = [o for o in entry_runs if o.get("seed", 0) in seeds]
    if not leaks:
        return []
    used = sorted({o.get("seed", 0) for o in leaks})
    return [
        f"{where}: {', '.join(run_name(o) for o in leaks)} use{'s' if len(leaks) == 1 else ''} selection seed "
        f"{', '.join(map(str, used))} (choose_gamma.selection_seeds {list(seeds)}): a comparison on a seed that chose "
        "its gamma favours that gamma; give the entry other seeds"
    ]


def _selection_runs(experiments: Sequence[Experiment], choose: dict[str, Any]) -> tuple[list[Experiment], list[str]]:
    """The generated grid runs of the per-method form, and what stops them.

    For each (method, data set, regularizer) of a ``gamma: chosen`` run: every gamma of its
    grid on every selection seed, with the chosen runs' other settings (gamma is chosen for
    the setup it serves, so chosen runs of one key must agree on everything but the seed),
    in group ``selection`` and the groups of the runs it chooses for (``--groups byol`` then
    runs BYOL's grid before BYOL's comparisons).
    """
    families: dict[tuple[str, str, str], tuple[dict[str, Any], list[str], str]] = {}
    problems = []
    for e in experiments:
        if not e.needs_chosen_gamma:
            continue
        key = choice_key(e.overrides)
        settings = {k: v for k, v in e.overrides.items() if k not in ("seed", "gamma")}
        same, groups, first = families.setdefault(key, (settings, [], e.name))
        if same != settings:
            differ = sorted(k for k in {*same, *settings} if same.get(k) != settings.get(k))
            problems.append(
                f"choose_gamma: gamma: chosen runs {first} and {e.name} ({key[0]} on {key[1]} with {key[2]}) differ in "
                f"{differ}; one gamma is chosen per method, data set and regularizer: make them the same or give one "
                "gamma a number"
            )
            continue
        groups += [g for g in e.groups if g not in groups]
    runs = []
    for key, (settings, groups, _) in families.items():
        for gamma, seed in itertools.product(grid_of(choose["grids"], key[2]) or [], choose["selection_seeds"]):
            overrides = {**settings, "gamma": gamma, "seed": seed}
            runs.append(Experiment(
                name=run_name(overrides), overrides=overrides, groups=(SELECTION_GROUP, *groups), selection=True
            ))
    return runs, problems


def _split_problems(selection: Sequence[Experiment], profile: str, metric: str) -> list[str]:
    """A selection run without a validation split would have no score to choose on; found
    now, not after its grid has trained."""
    bare = []
    for e in selection:
        cfg = resolve_config(profile, overrides={**e.overrides, "profile": profile})
        if not cfg.val_images or cfg.subset is None:
            bare.append(e.name)
    if not bare:
        return []
    more = f" and {len(bare) - 1} more" if len(bare) > 1 else ""
    return [
        f"choose_gamma: selection run {bare[0]}{more} has no validation split (val_images 0 or no subset), so no "
        f"{metric} to choose gamma on; set val_images >= 1 and a subset in base or the entries"
    ]


def _with_shared_grids(choose: dict[str, Any], experiments: Sequence[Experiment]) -> dict[str, Any]:
    """``choose`` with a grid under the name of each chosen regularizer that shares another's
    (``so_diag``: SO's), so that ``choose["grids"][regularizer]`` names every grid in use."""
    given = choose.get("grids") or {}
    grids = dict(given)
    for e in experiments:
        regularizer = e.overrides.get("regularizer")
        if e.needs_chosen_gamma and regularizer not in grids and grid_of(grids, regularizer):
            grids[regularizer] = list(grid_of(grids, regularizer) or [])
    return choose if grids == given else {**choose, "grids": grids}


def load_matrix(path: str | Path, results: str | Path | None = None) -> Matrix:
    """Parse and validate a matrix file; identical runs named by several entries are merged
    (their groups and transfer sets joined).

    Every run's config is built as it will be trained (a ``gamma: chosen`` with the first gamma
    of its grid), so that a bad entry is found before anything runs, not hours later. With
    ``selection_seeds`` the selection runs are generated (listed first) and an entry on a
    selection seed is an error; in the single-method form the grid's runs must be listed.

    Raises:
        MissingPathError: the file does not exist.
        ConfigError: one line naming the file and every problem, each bad entry by its number
            in ``runs:`` counted from 1, e.g. ``m.yaml (run entries counted from 1): run entry
            2: field 'epochs' must be an integer >= 1, got 1.7; run entry 5: unknown method ...``.
    """
    path = Path(path)
    spec = _read_spec(path)
    top = _top_problems(spec)
    profile = spec.get("profile", "cpu")
    base = spec.get("base") or {}
    base = base if isinstance(base, dict) else {}
    choose = spec.get("choose_gamma") or {}
    choose = choose if isinstance(choose, dict) else {}
    grids = choose.get("grids") if isinstance(choose.get("grids"), dict) else {}
    problems = list(top)
    merged: dict[str, dict[str, Any]] = {}
    for number, entry in enumerate(spec["runs"], start=1):
        where = f"run entry {number}"
        # With a bad profile or base every run's config would fail alike: those are named
        # once, and the entries' own fields are still checked.
        found = _entry_problems(where, entry, base, profile, grids, check_configs=not top)
        problems += found
        if found or top:
            continue
        expanded = _expand(entry, base)
        if _per_method(choose):
            leaks = _seed_leak(where, [o for o, _ in expanded], choose["selection_seeds"])
            problems += leaks
            if leaks:
                continue
        for overrides, extras in expanded:
            name = run_name(overrides)
            slot = merged.setdefault(
                name, {"overrides": overrides, "groups": [], "transfer": [], "outside": False, "entry": number}
            )
            if slot["overrides"] != overrides:
                problems.append(
                    f"{where}: run {name} is also named by run entry {slot['entry']} with other settings; "
                    "make them the same or tell them apart (e.g. by seed)"
                )
                continue
            group = extras.get("group", "ungrouped")
            if group not in slot["groups"]:
                slot["groups"].append(group)
            for t in extras.get("transfer", []) or []:
                if t not in slot["transfer"]:
                    slot["transfer"].append(t)
            slot["outside"] |= bool(extras.get("outside_paper_grid", False))
    experiments = [
        Experiment(
            name=name, overrides=s["overrides"], groups=tuple(s["groups"]), transfer=tuple(s["transfer"]),
            outside_paper_grid=s["outside"],
        )
        for name, s in merged.items()
    ]
    if not problems and _per_method(choose):
        selection, problems = _selection_runs(experiments, choose)
        problems = problems or _split_problems(selection, profile, choose.get("metric", VALIDATION_METRICS[0]))
        experiments = [*selection, *experiments]  # first: the dry run lists them in the order they run
    elif not problems:
        problems = _grid_problems(experiments, choose)
    if problems:
        raise ConfigError(f"{path} (run entries counted from 1): " + "; ".join(problems))
    if results is not None:  # given by the caller: relative to the working directory
        results_dir = Path(results)
    else:  # the file's own: relative to the repository that holds configs/
        results_dir = Path(spec.get("results", "results/matrix"))
        if not results_dir.is_absolute() and path.parent.name == "configs":
            results_dir = path.resolve().parents[1] / results_dir
    return Matrix(
        path=path, profile=profile, results=results_dir, base=base, choose=_with_shared_grids(choose, experiments),
        experiments=experiments,
    )


# ----------------------------------------------------------------------------------------------
# Choosing gamma on the validation split
# ----------------------------------------------------------------------------------------------
def choose_gamma(
    records: Sequence[dict[str, Any]], regularizer: str, choose: dict[str, Any],
    method: str | None = None, dataset: str | None = None,
) -> dict[str, Any]:
    """The paper-grid gamma of ``regularizer`` with the best mean validation metric over the
    selection seeds (ties to the smaller gamma).

    Candidates are the records of ``method`` and ``dataset`` (the per-method form, with
    ``selection_seeds``) or of ``choose``'s method and data set, seed 0 (the single-method
    form), inside the paper's grid; every gamma on every seed must be recorded (else
    :class:`GammaNotChosen`). Returns ``{"gamma", "metric", "candidates"}`` (candidates: the
    mean per gamma), and in the per-method form also ``method``, ``dataset``,
    ``regularizer``, ``seeds`` and ``per_seed`` (the scores the means are of).
    """
    per_method = _per_method(choose)
    method = method if per_method else choose["method"]
    dataset = dataset if per_method else choose["dataset"]
    seeds = [int(s) for s in choose["selection_seeds"]] if per_method else [0]
    grid = [float(g) for g in grid_of(choose["grids"], regularizer) or []]
    metric = choose.get("metric", VALIDATION_METRICS[0])
    scores = _grid_scores(records, regularizer, method, dataset, grid, seeds, metric)
    missing = [(g, s) for g in grid for s in seeds if (g, s) not in scores]
    if missing:
        on = "" if not per_method else f" on seed {sorted({s for _, s in missing})}"
        raise GammaNotChosen(
            f"gamma for {regularizer} cannot be chosen yet: no record of {method} on "
            f"{dataset} with gamma {list(dict.fromkeys(g for g, _ in missing))}{on}; run the grid first"
        )
    unscored = [(g, s) for (g, s), v in scores.items() if v is None]
    if unscored:
        raise GammaNotChosen(
            f"gamma for {regularizer} cannot be chosen: the records of {method} on {dataset} with (gamma, seed) "
            f"{unscored} have no {metric} (trained without a validation split); set val_images and train them again"
        )
    means = {g: sum(scores[g, s] for s in seeds) / len(seeds) for g in grid}
    best = max(grid, key=lambda g: (means[g], -g))
    choice = {"gamma": best, "metric": metric, "candidates": {f"{g:g}": means[g] for g in grid}}
    if per_method:  # the single-method form's records keep the choice they were written with
        choice.update(
            method=method, dataset=dataset, regularizer=regularizer, seeds=seeds,
            per_seed={f"{g:g}": {str(s): scores[g, s] for s in seeds} for g in grid},
        )
    return choice


def _grid_scores(
    records: Sequence[dict[str, Any]], regularizer: str, method: str | None, dataset: str | None,
    grid: Sequence[float], seeds: Sequence[int], metric: str,
) -> dict[tuple[float, int], float | None]:
    """``{(gamma, seed): metric}`` of the records of ``method`` on ``dataset`` with
    ``regularizer`` at a gamma of ``grid`` on one of ``seeds`` (outside-grid runs never count)."""
    scores = {}
    for record in records:
        cfg, summary = record["config"], record["summary"]
        if (
            cfg["method"] == method and Path(cfg["dataset"]).name == dataset and cfg["regularizer"] == regularizer
            and cfg["seed"] in seeds and not record.get("outside_paper_grid")
        ):
            gamma = next((g for g in grid if math.isclose(float(summary["gamma"]), g, rel_tol=1e-9)), None)
            if gamma is not None:
                scores[gamma, int(cfg["seed"])] = summary.get(metric)
    return scores


def resolve_each(
    matrix: Matrix, experiments: Sequence[Experiment]
) -> tuple[list[Experiment], list[tuple[Experiment, GammaNotChosen]]]:
    """``experiments`` with every ``gamma: chosen`` that the records can choose filled in, and
    the chosen runs whose gamma cannot be chosen yet, each with why (one regularizer's grid
    missing a record leaves the other regularizers' runs to go on)."""
    records = load_records(matrix.results) if matrix.results.is_dir() else []
    choices: dict[tuple[str, ...], dict[str, Any] | GammaNotChosen] = {}
    resolved, unresolved = [], []
    for e in experiments:
        if not e.needs_chosen_gamma:
            resolved.append(e)
            continue
        method, dataset, reg = choice_key(e.overrides)
        # Per method, each (method, data set, regularizer) has its own choice; the
        # single-method form has one per regularizer, for all.
        key = (method, dataset, reg) if matrix.per_method else (reg,)
        if key not in choices:
            try:
                choices[key] = choose_gamma(records, reg, matrix.choose, method, dataset)
            except GammaNotChosen as error:
                choices[key] = error
        choice = choices[key]
        if isinstance(choice, GammaNotChosen):
            unresolved.append((e, choice))
        else:
            resolved.append(e.with_gamma(choice))
    return resolved, unresolved


def resolve_chosen(matrix: Matrix, experiments: Sequence[Experiment]) -> list[Experiment]:
    """``experiments`` with every ``gamma: chosen`` replaced by the gamma the records choose;
    :class:`GammaNotChosen` if a grid is not all recorded yet."""
    resolved, unresolved = resolve_each(matrix, experiments)
    if unresolved:
        raise unresolved[0][1]
    return resolved


def check_selection(matrix: Matrix, groups: Sequence[str] | None, only: Sequence[str] | None) -> None:
    """``--groups`` and ``--only`` must name groups and runs of the matrix (a typo would run
    nothing, silently); a chosen-gamma run may be named with any gamma of its grid."""
    known_groups = {g for e in matrix.experiments for g in e.groups}
    unknown = sorted(set(groups or ()) - known_groups)
    if unknown:
        raise ConfigError(f"{matrix.path}: no group {unknown}; its groups: {', '.join(sorted(known_groups))}")
    names = set()
    for e in matrix.experiments:
        names.add(e.name)
        if e.needs_chosen_gamma:
            grid = grid_of(matrix.choose.get("grids") or {}, e.overrides.get("regularizer")) or []
            names |= {run_name({**e.overrides, "gamma": g}) for g in grid}
    unknown = sorted(set(only or ()) - names)
    if unknown:
        raise ConfigError(f"{matrix.path}: no run named {unknown}; `--dry-run` lists the pending runs")


def pending_runs(
    matrix: Matrix, groups: Sequence[str] | None = None, only: Sequence[str] | None = None, rerun: bool = False,
) -> list[str]:
    """The names of the runs of ``matrix`` that :func:`or_core.experiments.run_matrix` would
    train, in its order (its dry run): runs without a record (``rerun``: every selected run),
    restricted to ``groups`` and ``only``. A ``gamma: chosen`` run is named by its resolved
    gamma once its own grid is recorded (other runs of the first phase may still be missing),
    by its template (``...-chosen-s0``) before."""
    check_selection(matrix, groups, only)
    wanted = [e for e in matrix.experiments if groups is None or set(e.groups) & set(groups)]
    names: list[str] = []
    for chosen_phase in (False, True):
        phase = [e for e in wanted if e.needs_chosen_gamma == chosen_phase]
        if chosen_phase and phase:
            phase, unresolved = resolve_each(matrix, phase)
            if only is None:  # a worker (--only) of the first phase skips them
                names += [e.name for e, _ in unresolved]
        phase = [e for e in phase
                 if (rerun or not matrix.record_path(e).is_file()) and (only is None or e.name in only)]
        names += list({e.name: e for e in phase})
    return names
