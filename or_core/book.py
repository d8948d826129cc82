"""Build the book: execute the notebooks with papermill, then build the Jupyter Book.

Usage::

    python -m or_core.book                          # cpu profile, every notebook, strict build
    python -m or_core.book --profile gpu            # the sizes a Colab user runs
    python -m or_core.book --notebooks 02           # only notebooks whose name starts with 02
    python -m or_core.book --skip-execute           # rebuild the HTML from the executed notebooks

Steps:

1. Every notebook ``notebooks/NN_*.ipynb`` (the committed sources, without outputs) is executed
   by papermill with kernel ``python3`` and working directory ``notebooks/``, into
   ``book/notebooks/<same name>.ipynb``. Its parameters come from the profile file
   ``notebooks/profiles/<profile>.yaml``, a flat mapping shared by all notebooks; each notebook
   receives the keys its ``parameters`` cell declares. A provenance note (command, date, run
   time, machine, versions, commit) is added below the notebook's title. A failing notebook
   stops everything with its name and the failing cell. The kernel runs without progress bars
   (``TQDM_DISABLE=1``: a bar's carriage returns are noise on a static page; a reader running
   the notebook still gets them), writes each table's CSV into
   ``book/generated/html/notebooks/<notebook>/`` (:class:`or_core.report.TableView`), and the
   cell papermill injects is tagged ``remove-cell`` like the Colab cell.
2. The intro's claims table and figure (:func:`write_intro`) into ``book/generated/``, from the
   cpu-small records, and the reproduce page's cost table, from the measured GPU runs.
3. ``jupyter-book build book --all -W -n --keep-going``: every page rebuilt, a warning fails
   the build. The HTML lands in ``book/_build/html``.

Nothing of this writes into the repository's tracked files but ``results/figures/`` (notebook
05, byte-identical when the records and the code are unchanged); in the cpu profile the ci-scale
records the notebooks regenerate go to ``records_out`` (``~/.cache/or_core/book-records``), so
that building a clean clone leaves it clean, and every page's note says "with uncommitted
changes" only when the sources were changed before the build began.

Inside a notebook, :func:`apply_profile` lets a reader switch profiles by editing one line
(``profile = "gpu"``) instead of every size.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "REPO_ROOT",
    "NOTEBOOKS_DIR",
    "PROFILES_DIR",
    "BOOK_DIR",
    "BookError",
    "load_profile",
    "apply_profile",
    "notebook_parameters",
    "find_notebooks",
    "execute_notebook",
    "build_book",
    "write_intro",
    "records_dir",
    "GENERATED_SUBDIR",
    "prepare_shared_datasets",
    "main",
]

#: The repository root (where ``notebooks/`` and ``book/`` are), for a clone or editable install.
REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PROFILES_DIR = NOTEBOOKS_DIR / "profiles"
BOOK_DIR = REPO_ROOT / "book"
#: Where the executed notebooks go, relative to the book's root (git-ignored).
EXECUTED_SUBDIR = "notebooks"
#: Where the build writes what the pages include but git does not track (relative to the book).
GENERATED_SUBDIR = "generated"
#: Tags the book's pages read: the cells they leave out, and the code they fold.
REMOVE_CELL, HIDE_INPUT = "remove-cell", "hide-input"
#: The profile whose values the notebooks' ``parameters`` cells hold.
DEFAULT_PROFILE = "cpu"
KERNEL = "python3"


class BookError(RuntimeError):
    """A notebook failed or the book did not build; the message says which and where."""


# ----------------------------------------------------------------------------------------------
# Profiles
# ----------------------------------------------------------------------------------------------
def _profile_path(profile: str | Path) -> Path:
    """The YAML file of a profile: a path, or a name looked up in ``./profiles`` then the repo's."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise FileNotFoundError(f"profile file not found: {candidate}")
        return candidate
    searched = [Path.cwd() / "profiles", PROFILES_DIR]
    for folder in searched:
        path = folder / f"{profile}.yaml"
        if path.is_file():
            return path
    available = sorted({p.stem for folder in searched if folder.is_dir() for p in folder.glob("*.yaml")})
    raise FileNotFoundError(
        f"profile {str(profile)!r} not found in {', '.join(str(f) for f in searched)}"
        + (f"; available: {', '.join(available)}" if available else "")
    )


def load_profile(profile: str | Path) -> dict[str, Any]:
    """The parameters of a profile (``"cpu"``, ``"gpu"`` or a YAML path) as a flat mapping.

    Raises:
        FileNotFoundError: no such profile (the message lists the available ones).
        ValueError: the file is not a flat mapping of names to scalars or lists.
    """
    path = _profile_path(profile)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile must be a mapping of parameter names to values")
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"{path}: a profile is flat; nested mappings under {', '.join(nested)}")
    return data


def apply_profile(
    profile: str, namespace: MutableMapping[str, Any], base: str = DEFAULT_PROFILE
) -> dict[str, Any]:
    """Switch a notebook's parameters to ``profile`` where they still hold ``base``'s values.

    A notebook's ``parameters`` cell holds the ``base`` (cpu) profile's values. Called right
    after it, ``apply_profile(profile, globals())`` replaces every parameter that still equals
    its ``base`` value by ``profile``'s value, and keeps a value that was changed by hand or
    injected by papermill. So editing ``profile = "gpu"`` alone switches every size, and
    ``python -m or_core.book --profile gpu`` (which injects the gpu values) is left as it is.
    With ``profile == base`` nothing is read or changed.

    Returns:
        ``{name: new value}`` of the parameters that were changed.
    """
    if profile == base:
        return {}
    defaults, chosen = load_profile(base), load_profile(profile)
    changed = {}
    for name, value in chosen.items():
        at_default = name in namespace and name in defaults and namespace[name] == defaults[name]
        if at_default and value != defaults[name]:
            namespace[name] = value
            changed[name] = value
    return changed


def notebook_parameters(notebook: Path, profile: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``profile`` that ``notebook``'s ``parameters`` cell declares."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    return {name: value for name, value in profile.items() if name in declared}


# ----------------------------------------------------------------------------------------------
# Executing the notebooks
# ----------------------------------------------------------------------------------------------
def find_notebooks(selection: Sequence[str] | None = None, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The source notebooks ``NN_*.ipynb``, sorted; with ``selection``, those whose name starts
    with one of its entries (``"02"``, ``"02_or_theory"`` or ``"02_or_theory.ipynb"``).

    Raises:
        BookError: an entry of ``selection`` matches no notebook.
    """
    sources = sorted(p for p in notebooks_dir.glob("[0-9][0-9]_*.ipynb") if p.is_file())
    if not selection:
        return sources
    chosen = []
    for entry in selection:
        stem = entry.removesuffix(".ipynb")
        matches = [p for p in sources if p.stem.startswith(stem)]
        if not matches:
            names = ", ".join(p.name for p in sources) or "none"
            raise BookError(f"no notebook matches {entry!r} in {notebooks_dir} (notebooks: {names})")
        chosen += [p for p in matches if p not in chosen]
    return sorted(chosen)


def provenance(profile: str, seconds: float, command: str) -> dict[str, Any]:
    """Where, when and with what a notebook was executed: the keys of every record's
    provenance (:func:`or_core.provenance.provenance`) and the ``profile``."""
    from or_core.provenance import provenance as made_with

    return {**made_with(command, wall_time_s=seconds), "profile": profile}


def _provenance_markdown(info: dict[str, Any]) -> str:
    commit = info["git_commit"]
    commit = (
        f"commit `{commit[:12]}`" + (" with uncommitted changes" if info["git_dirty"] else "")
        if commit != "unknown"
        else "outside a git checkout"
    )
    profile = str(info["profile"])
    source = profile if profile.endswith((".yaml", ".yml")) else f"notebooks/profiles/{profile}.yaml"
    return (
        "```{note}\n"
        f"Executed with the notebooks' **{Path(profile).stem}** profile (`{source}`; the scale of each number "
        "is in its table's or figure's title) by "
        f"`{info['command']}` on "
        f"{info['date_utc']} in {info['wall_time_s']:.0f} s: {info['machine']}, {info['device']}, "
        f"Python {info['python']}, torch {info['torch']}, lightly {info['lightly']}, {commit}.\n"
        "```"
    )


def records_dir(records_out: str | Path, *parts: str) -> Path:
    """``records_out`` (a notebook's parameter: where its records go) with ``~`` expanded, and
    ``parts`` below it: ``records_dir("~/.cache/or_core/book-records", "notebooks")``."""
    return Path(records_out).expanduser().joinpath(*parts)


def _add_provenance(path: Path, info: dict[str, Any]) -> None:
    """Record ``info`` in the executed notebook: metadata, and a note under its title. The
    cell papermill injected (its ``injected-parameters`` tag) is tagged ``remove-cell``: the page
    shows the profile in the note, not as code."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata["or_core"] = info
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and REMOVE_CELL not in tags:
            cell.metadata["tags"] = [*tags, REMOVE_CELL]
    cell = nbformat.v4.new_markdown_cell(_provenance_markdown(info))
    cell.metadata["tags"] = ["provenance"]
    titles = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.lstrip().startswith("# ")
    ]
    nb.cells.insert(titles[0] + 1 if titles else 0, cell)
    nbformat.write(nb, path)


def execute_notebook(
    source: Path,
    output: Path,
    profile: str = DEFAULT_PROFILE,
    *,
    kernel: str = KERNEL,
    command: str = "python -m or_core.book",
    tables_dir: Path | None = None,
    git_dirty: bool | None = None,
) -> float:
    """Execute ``source`` with papermill into ``output`` with ``profile``'s parameters.

    The working directory is the source's folder (``notebooks/``), so that relative paths
    (``profiles/``, ``../results``) work as they do for a reader. ``tables_dir``: where the
    notebook's tables write their CSV (:data:`or_core.report.TABLES_ENV`). ``git_dirty``: the
    state of the sources when the build began, for the page's note (default: now).

    Returns:
        The seconds it took.

    Raises:
        BookError: the notebook raised (the message names it, the cell and the error) or its
            kernel failed. The partly executed notebook is left at ``output``.
    """
    import papermill

    params = notebook_parameters(source, load_profile(profile))
    output.parent.mkdir(parents=True, exist_ok=True)
    from or_core.report import TABLES_ENV

    start = time.perf_counter()
    # The kernel inherits this process's environment: no progress bars, the tables' CSV folder.
    kernel_env = {"TQDM_DISABLE": "1", TABLES_ENV: str(tables_dir) if tables_dir is not None else None}
    saved = {name: os.environ.get(name) for name in kernel_env}
    for name, value in kernel_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        papermill.execute_notebook(
            str(source),
            str(output),
            parameters=params,
            kernel_name=kernel,
            cwd=str(source.parent),
            progress_bar=False,
        )
    except papermill.PapermillExecutionError as err:
        raise BookError(
            f"notebook {source.name} failed in cell {err.cell_index} (execution count "
            f"{err.exec_count}): {err.ename}: {err.evalue}\n  the executed notebook with the "
            f"traceback: {output}"
        ) from None
    except Exception as err:  # kernel start-up, dead kernel, timeout, missing kernel spec
        raise BookError(f"notebook {source.name} could not be executed: {type(err).__name__}: {err}") from err
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    seconds = time.perf_counter() - start
    info = provenance(str(profile), seconds, command)
    if git_dirty is not None:
        info["git_dirty"] = git_dirty
    _add_provenance(output, info)
    return seconds


def write_intro(book_dir: Path = BOOK_DIR, results: Path = REPO_ROOT / "results") -> Path:
    """The intro's answer, regenerated from the records: ``<book>/generated/claims.md`` (one row
    per claim at the cpu-small scale: :func:`or_core.report.headline_claims`, with links to the
    sections that show them; the scale's recipe from :func:`or_core.config.recipe`) and the
    figure it shows (``results/figures/spectra_cpu_small.png``, copied beside it). Also makes
    ``<book>/generated/html``, the folder the build copies as it is (the tables' CSV files).
    Returns the Markdown file."""
    import shutil

    from or_core import report, stats
    from or_core.config import recipe

    generated = book_dir / GENERATED_SUBDIR
    (generated / "html").mkdir(parents=True, exist_ok=True)
    records = report.load_folder(results / "matrix_cpu")
    frame = report.records_frame(records)
    table = report.claims(frame, records)
    headline = report.headline_claims(table)
    headline.to_csv(generated / "html" / "claims.csv")  # served beside the intro page
    figure = results / "figures" / "spectra_cpu_small.png"
    lines = [
        f"Each claim of the paper, checked on the {len(records)} **{report.scale_label(frame)}** records of "
        f"`results/matrix_cpu/` ({recipe('cpu_small')}). Per claim, the comparison with the most seeds: "
        f"the mean paired difference over its seeds (> 0 agrees with the paper), its paired-t 95% interval "
        f"and the verdict ({stats.RULE}). The other comparisons, and every number behind these, are in "
        "the section each row links to.",
        "",
        report.claims_markdown(headline),
        "",
        '<p class="or-table-csv"><a href="claims.csv" download="claims.csv">claims.csv</a> (this table; every '
        'comparison of every claim is in the CSV files of notebook 05)</p>',
        "",
    ]
    if figure.is_file():
        shutil.copyfile(figure, generated / figure.name)
        lines += [
            f"```{{figure}} {GENERATED_SUBDIR}/{figure.name}",
            ":name: intro-figure2",
            ":width: 100%",
            "",
            "Normalized eigenvalue spectra of a weight, of hidden features and of the representation for "
            "BYOL, BYOL + whitening and BYOL + SO, from the same records (the paper's Figure 2; "
            "{ref}`figures-spectra` has the others). What to look for: whether a method's curve lies above "
            "BYOL's (a flatter spectrum, less collapse). " + _figure2_numbers(frame),
            "```",
        ]
    path = generated / "claims.md"
    path.write_text("\n".join(lines) + "\n")
    _write_paired_claims(generated, results)
    _write_answer(generated, results)
    _write_costs(generated, results)
    return path


def _points(value: float) -> str:
    """An accuracy difference in percentage points, signed: ``"-0.5"``."""
    return f"{100 * value:+.1f}"


#: How the answer words the verdict of a claim about the weights, per claim and verdict.
_WEIGHT_WORDS = {
    "orthogonality": {"supported": "closer to orthogonal (a lower SO error)",
                      "contradicted": "further from orthogonal (a higher SO error)"},
    "weights": {"supported": "with flatter spectra", "contradicted": "with less flat spectra"},
}


def _paired_answer(records: list[dict[str, Any]]) -> list[str]:
    """The paired matrix's answer in words, one sentence per comparison with >= 2 seeds: its kNN
    effect in points with the interval, what the interval rules out, and what OR did to the
    weights it acts on (their SO error and the flatness of their spectra, each beyond the
    seeds' spread or not)."""
    from or_core import report

    if not records:
        return ["no comparison run recorded yet."]
    table = report.claims(report.records_frame(records), records)
    knn = table.loc[["accuracy_knn"]]
    knn = knn[(knn["comparison"] != report.ALL_COMPARISONS) & (knn["seeds"] >= 2)]
    with_or = sum(r["config"]["regularizer"] != "none" for r in records)
    if knn.empty:
        return [f"{with_or} runs with OR recorded, no comparison with two seeds yet."]
    sentences = []
    for _, row in knn.iterrows():
        text = (f"{row['comparison']} against the same method without OR, {row['seeds']} paired seeds: "
                f"test kNN top-1 {_points(row['effect'])} points (95% CI {_points(row['ci_low'])} to "
                f"{_points(row['ci_high'])}), {row['verdict']}")
        if row["ci_high"] > 0:
            text += f"; a gain above {_points(row['ci_high'])} points is ruled out at this scale"
        moved = []
        for claim, words in _WEIGHT_WORDS.items():
            rows = table.loc[[claim]].set_index("comparison")
            if row["comparison"] in rows.index and rows.loc[row["comparison"], "verdict"] in words:
                moved.append(words[rows.loc[row["comparison"], "verdict"]])
        if moved:
            text += f". With OR the weights end up {' and '.join(moved)}, beyond the seeds' spread"
        else:
            text += (". With OR the weights' SO error and spectra show no detectable change, so at this gamma and "
                     "width the regularizer barely acts and the comparison says little about OR's mechanism")
        sentences.append(text + ".")
    return sentences


def _gpu_answer(results: Path) -> list[str]:
    """The finished gpu-profile run directories of ``results/gpu_runs`` paired as without / with
    OR (same method, data set, epochs and GPU): one sentence per pair, one seed, no verdict."""
    from or_core import report
    from or_core.run_dirs import load_run_dirs, run_dirs_table

    table = run_dirs_table(load_run_dirs(results / "gpu_runs")) if (results / "gpu_runs").is_dir() else None
    if table is None or table.empty:
        return []
    done = table[table["finished"].astype(bool)]
    keys = ["method", "dataset", "epochs", "device"]
    sentences = []
    for _, base in done[done["regularizer"] == "none"].iterrows():
        same = done[(done[keys] == base[keys]).all(axis=1) & (done["regularizer"] != "none")]
        for _, run in same.iterrows():
            method = report.method_label(run["method"])
            sentences.append(
                f"{method} + {report.REGULARIZER_LABELS.get(run['regularizer'], run['regularizer'])} (gamma "
                f"{report.gamma_text(run['gamma'])}) against {method}, full-width ResNet-18 on all of "
                f"{report.dataset_label(run['dataset'])}, {run['epochs']} epochs on one {run['device']}, one seed: "
                f"kNN top-1 {run['knn_top1']:.3f} against "
                f"{base['knn_top1']:.3f}, linear top-1 {run['linear_top1']:.3f} against {base['linear_top1']:.3f}, "
                f"effective rank of the representation {run['effective_rank']:.0f} against "
                f"{base['effective_rank']:.0f}: the paper's direction, but one pair, so no verdict.")
    return sentences


def _write_answer(generated: Path, results: Path) -> Path:
    """``<generated>/answer.md``, the intro's answer in words, regenerated from the records: the
    paired cpu-profile comparisons (:func:`_paired_answer`), the gpu-profile pairs
    (:func:`_gpu_answer`) and a pointer to the weaker cpu-small matrix."""
    from or_core import report

    folder = results / "matrix_cpu_paired"
    records = [r for r in report.load_folder(folder) if "selection" not in r["groups"]]
    lines = ["**In words, from the records so far:**", ""]
    scale = ""
    if records:
        summary = records[0]["summary"]
        scale = f" (a width-{summary['width']:g} ResNet-18, {summary['epochs']} epochs)"
    lines += [f"- **The cpu profile, paired fresh seeds**{scale}: " + s for s in _paired_answer(records)]
    lines += ["- **The gpu profile, shortened** (a single pair, not the paper's 200 epochs): " + s
              for s in _gpu_answer(results)]
    missing = report.missing_runs(PAIRED_MATRIX, folder) if PAIRED_MATRIX.is_file() else None
    if missing is not None and len(missing):
        groups = sorted({g for cell in missing["groups"] for g in cell.split(", ")} - {"selection", "methods"})
        lines.append(f"- **Still to train in the paired matrix:** {len(missing)} runs (groups {', '.join(groups)}).")
    if not report.load_folder(results / "campaign_gpu"):
        lines.append("- **Not measured yet:** the paper-scale comparisons on several seeds "
                     "(`configs/campaign_gpu.yaml`, {doc}`reproduce`).")
    lines.append("")
    path = generated / "answer.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _figure2_numbers(frame: Any) -> str:
    """The intro figure's reading in numbers: the representation's effective rank and the
    final SO error of BYOL, BYOL + SO and BYOL + whitening (Table 1 analogue, seed 0)."""
    from or_core import report

    table = report.table1(frame)
    parts = [f"{label} {table.loc[row, 'effective_rank']:.1f}" for label, row in
             (("BYOL", "BYOL"), ("BYOL + SO", "BYOL + SO"), ("BYOL + whitening", "BYOL + feature whitening"))
             if row in table.index and not math.isnan(table.loc[row, "effective_rank"])]
    if not parts:
        return ""
    text = f"Effective rank of the representation, seed 0: {', '.join(parts)}"
    if {"BYOL", "BYOL + SO"} <= set(table.index):
        text += (f"; SO error of the weights: BYOL {table.loc['BYOL', 'or_so_total']:.4g}, "
                 f"BYOL + SO {table.loc['BYOL + SO', 'or_so_total']:.4g}")
    return text + "."


#: The matrix of the cpu profile's paired comparisons, and where notebook 05 shows it.
PAIRED_MATRIX = REPO_ROOT / "configs" / "matrix_cpu_paired.yaml"
PAIRED_SECTION = ("figures-profile-paired", "05 §15")


def _write_paired_claims(generated: Path, results: Path) -> Path:
    """``<generated>/claims_paired.md``: the intro's answer from the paired matrix
    (:data:`PAIRED_MATRIX`) as far as it is recorded: per claim, the comparison with the most
    seeds among its comparison runs (the selection runs never count), and how many of the
    matrix's runs are still missing. Its CSV goes to ``<generated>/html/claims_paired.csv``."""
    from or_core import report
    from or_core.config import recipe

    folder = results / "matrix_cpu_paired"
    records = [r for r in report.load_folder(folder) if "selection" not in r["groups"]] if folder.is_dir() else []
    frame = report.records_frame(records)
    headline = report.headline_claims(report.claims(frame, records))
    headline.to_csv(generated / "html" / "claims_paired.csv")
    missing = len(report.missing_runs(PAIRED_MATRIX, folder)) if PAIRED_MATRIX.is_file() else 0
    sections = {str(key): PAIRED_SECTION for key in headline.index}
    lines = [
        f"Each claim of the paper, checked on the {len(records)} comparison runs recorded so far of "
        f"`configs/matrix_cpu_paired.yaml` (the **cpu** profile: {recipe('cpu')}). Gamma is chosen per method "
        "on the validation split of a selection seed that no comparison uses; the comparisons pair runs with and "
        f"without OR on fresh seeds. {missing} runs of that matrix are still to be trained, so most claims have "
        "too few pairs yet; the rows fill in as the records land.",
        "",
        report.claims_markdown(headline, sections),
        "",
        '<p class="or-table-csv"><a href="claims_paired.csv" download="claims_paired.csv">claims_paired.csv</a> '
        "(this table)</p>",
        "",
    ]
    path = generated / "claims_paired.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _method_citation(cls: type) -> tuple[str, str]:
    """``(citation, url)`` of a method from its module's docstring, which opens with
    ``Name: Authors, "Title" (Venue Year), https://...``: the text up to the first parenthesis
    that ends in a year, and the first URL."""
    first = " ".join((sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0].split())
    cited = re.match(r".*?\([^()]*\d{4}\)", first)
    url = re.search(r"https?://[^\s,;]+", first)
    return (cited.group(0) if cited else first).rstrip("."), (url.group(0).rstrip(".") if url else "")


def write_library_page(book_dir: Path = BOOK_DIR) -> list[Path]:
    """The tables of the book's library page, made from the code so that they cannot go stale:
    ``<book>/generated/methods.md`` (every registered method: its ``--method`` name, paper and
    the recipe its defaults come from) and ``<book>/generated/transfer_sets.md`` (the
    ``--dataset`` names of ``python -m or_core transfer`` with the files a local copy needs)."""
    from or_core.methods import discover_methods
    from or_core.transfer import TRANSFER_SETS

    generated = book_dir / GENERATED_SUBDIR
    generated.mkdir(parents=True, exist_ok=True)
    rows = ["| `--method` | method and paper | defaults from |", "|---|---|---|"]
    for name, cls in sorted(discover_methods().items()):
        citation, url = _method_citation(cls)
        paper = f"[{citation}]({url})" if url else citation
        rows.append(f"| `{name}` | {paper.replace('|', '/')} | {cls.default_optimizer.source} |")
    methods = generated / "methods.md"
    methods.write_text("\n".join(rows) + "\n")
    sets = ["| `--dataset` | training split | evaluated on | a local copy under `--data-root` |", "|---|---|---|---|"]
    for name, entry in TRANSFER_SETS.items():
        parts = re.split(r"(,? and |, | or )", entry.layout)  # file patterns, and the words between them
        files = "".join(part if i % 2 else f"`{part}`" for i, part in enumerate(parts))
        sets.append(f"| `{name}` | {' + '.join(entry.train_splits)} | {entry.test_split} | {files} |")
    transfer = generated / "transfer_sets.md"
    transfer.write_text("\n".join(sets) + "\n")
    return [methods, transfer]


def _write_costs(generated: Path, results: Path) -> Path:
    """``<book>/generated/cost.md``, the reproduce page's cost table, from the measured run
    directories of ``results/gpu_runs`` (:mod:`or_core.costs`)."""
    from or_core import costs
    from or_core.run_dirs import load_run_dirs

    measured = costs.measured_runs(load_run_dirs(results / "gpu_runs"))
    matrices = [REPO_ROOT / "configs" / name for name in ("matrix_gpu.yaml", "matrix_paper.yaml")]
    table = costs.matrix_costs([m for m in matrices if m.is_file()], measured)
    path = generated / "cost.md"
    path.write_text(costs.costs_markdown(table) + "\n" if len(table) else "No measured run yet.\n")
    return path


# ----------------------------------------------------------------------------------------------
# Building the HTML
# ----------------------------------------------------------------------------------------------
def build_book(book_dir: Path = BOOK_DIR, strict: bool = True) -> float:
    """``jupyter-book build BOOK --all [-W -n --keep-going]``; returns the seconds it took.

    Raises:
        BookError: the build failed (with ``strict``, any warning fails it); the message holds
            the end of its output.
    """
    args = ["build", str(book_dir), "--all"]
    if strict:
        args += ["-W", "-n", "--keep-going"]
    entry = "from jupyter_book.cli.main import main; main(prog_name='jupyter-book')"
    cmd = [sys.executable, "-c", entry, *args]  # the jupyter-book of this interpreter
    print(f"$ jupyter-book {' '.join(shlex.quote(a) for a in args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # no terminal colours
    if proc.returncode != 0:
        warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
        shown = "\n".join(warnings[-30:]) or "\n".join(log.splitlines()[-40:])
        raise BookError(f"jupyter-book build failed (exit {proc.returncode}):\n{shown}")
    return seconds


def _stale_outputs(executed_dir: Path, sources: Sequence[Path]) -> list[Path]:
    names = {p.name for p in sources}
    return [p for p in executed_dir.glob("*.ipynb") if p.name not in names]


def prepare_shared_datasets() -> list[Path]:
    """Extract the project's shared data archives into the data root, when there are any.

    On this project's machines ``../shared/datasets`` (or ``$OR_CORE_SHARED_DATASETS``) holds
    CIFAR-10, CIFAR-100 and Imagenette-64 as ``*.tar.gz`` ImageFolder trees; they are extracted
    once into :func:`or_core.data.default_data_root`, where the notebooks look first. Elsewhere
    nothing happens and CIFAR is downloaded by torchvision when a notebook needs it.
    """
    from or_core.data import default_data_root, extract_archive

    env = os.environ.get("OR_CORE_SHARED_DATASETS")
    shared = Path(env) if env else REPO_ROOT.parent / "shared" / "datasets"
    if not shared.is_dir():
        return []
    return [extract_archive(archive, default_data_root()) for archive in sorted(shared.glob("*.tar.gz"))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m or_core.book",
        description="Execute the notebooks with papermill and build the Jupyter Book (strict).",
    )
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="cpu (default), gpu, or a YAML file")
    parser.add_argument(
        "--notebooks", nargs="+", default=None, metavar="NN", help="only these notebooks (name prefixes)"
    )
    parser.add_argument(
        "--skip-execute", action="store_true", help="build from the notebooks executed before"
    )
    parser.add_argument("--skip-build", action="store_true", help="execute the notebooks only")
    parser.add_argument(
        "--book-dir", type=Path, default=BOOK_DIR, help="the book's source folder (default: book/)"
    )
    parser.add_argument(
        "--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help="the source notebooks (default: notebooks/)"
    )
    parser.add_argument("--kernel", default=KERNEL, help="Jupyter kernel (default: python3)")
    args = parser.parse_args(argv)

    book_dir = args.book_dir.resolve()
    notebooks_dir = args.notebooks_dir.resolve()
    executed_dir = book_dir / EXECUTED_SUBDIR
    command = "python -m or_core.book"
    if args.profile != DEFAULT_PROFILE:
        command += f" --profile {args.profile}"
    timings: dict[str, float] = {}
    total = time.perf_counter()
    from or_core.provenance import git_dirty

    dirty_at_start = git_dirty()  # the notebooks' own outputs must not count as changes to the sources
    try:
        if not args.skip_execute:
            load_profile(args.profile)  # fail early on an unknown profile
            sources = find_notebooks(args.notebooks, notebooks_dir)
            if not sources:
                raise BookError(f"no notebooks NN_*.ipynb in {notebooks_dir}")
            for tree in prepare_shared_datasets():
                print(f"data: {tree}")
            if not args.notebooks:
                for stale in _stale_outputs(executed_dir, sources):
                    print(f"removing {stale} (its source notebook is gone)")
                    stale.unlink()
            for source in sources:
                print(f"executing {source.name} ({args.profile} profile) ...", flush=True)
                seconds = execute_notebook(
                    source, executed_dir / source.name, args.profile, kernel=args.kernel, command=command,
                    tables_dir=book_dir / GENERATED_SUBDIR / "html" / EXECUTED_SUBDIR / source.stem,
                    git_dirty=dirty_at_start,
                )
                timings[source.name] = seconds
                print(f"  {source.name}: {seconds:.1f} s", flush=True)
        if not args.skip_build:
            if not list(executed_dir.glob("*.ipynb")):
                raise BookError(f"no executed notebooks in {executed_dir}: run without --skip-execute")
            write_intro(book_dir)
            write_library_page(book_dir)
            timings["jupyter-book build"] = build_book(book_dir)
    except BookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    timings["total"] = time.perf_counter() - total

    print("\ntimings:")
    for name, seconds in timings.items():
        print(f"  {name:<32}{seconds:8.1f} s")
    if not args.skip_build:
        print(f"\nthe book: {book_dir / '_build' / 'html' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
