"""The book: source notebooks, profiles, and a strict build from the cpu profile.

The build test runs ``python -m or_core.book`` (papermill on every notebook, then
``jupyter-book build -W``) on a copy of ``book/``, so a reader's own build is left alone, and
checks the HTML: every page, every figure, every Colab link. It is skipped when the book's
dependencies (papermill, jupyter-book, matplotlib, seaborn, pandas) are not installed. The build
is the session fixture ``built_book`` of ``conftest.py``, shared with ``test_browser.py``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"
PROFILES = NOTEBOOKS / "profiles"
BOOK = REPO_ROOT / "book"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
COLAB = "https://colab.research.google.com/github"


def _profile(name: str) -> dict:
    return yaml.safe_load((PROFILES / f"{name}.yaml").read_text())


def _notebook(path: Path) -> dict:
    return json.loads(path.read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


# ----------------------------------------------------------------------------------------------
# The committed sources
# ----------------------------------------------------------------------------------------------
def test_an_executed_notebook_and_a_record_share_their_provenance_keys() -> None:
    from or_core import book
    from or_core.records import provenance

    info = book.provenance("cpu", 12.34, "python -m or_core.book --profile cpu")
    assert set(info) == set(provenance()) | {"profile"}
    assert info["profile"] == "cpu" and info["wall_time_s"] == 12.3 and info["command"].startswith("python -m or_core.book")
    note = book._provenance_markdown(info)
    assert "**cpu** profile" in note and info["date_utc"] in note and info["torch"] in note


def test_there_are_notebooks() -> None:
    assert SOURCES, f"no NN_*.ipynb notebooks in {NOTEBOOKS}"
    assert (NOTEBOOKS / "02_or_theory.ipynb") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_source_notebook_is_committed_without_outputs(path: Path) -> None:
    nb = _notebook(path)
    assert nb["nbformat"] == 4
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name}: cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{path.name}: cell {i} has an execution count"
    assert "papermill" not in nb["metadata"], f"{path.name} is an executed copy"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_source_notebook_has_a_parameters_cell_with_the_cpu_defaults(path: Path) -> None:
    cells = [c for c in _notebook(path)["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters'"
    assert cells[0]["cell_type"] == "code"
    defaults = {}
    for node in ast.parse(_source(cells[0])).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, "only `name = literal` lines"
        defaults[node.targets[0].id] = ast.literal_eval(node.value)
    cpu, gpu = _profile("cpu"), _profile("gpu")
    assert defaults.get("profile") == "cpu"
    for name, value in defaults.items():
        assert name in cpu and name in gpu, f"{path.name}: parameter {name!r} missing from a profile"
        assert value == cpu[name], f"{path.name}: {name} = {value!r}, the cpu profile says {cpu[name]!r}"


def _first_code_cell(path: Path) -> str:
    return _source(next(c for c in _notebook(path)["cells"] if c["cell_type"] == "code"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_first_code_cell_sets_colab_up_and_does_nothing_elsewhere(path: Path) -> None:
    pytest.importorskip("IPython")
    from IPython.core.inputtransformer2 import TransformerManager

    source = _first_code_cell(path)
    repo_url = yaml.safe_load((BOOK / "_config.yml").read_text())["repository"]["url"]
    assert 'if "google.colab" in sys.modules:' in source
    assert f"git clone --depth 1 {repo_url} /content/or_core" in source
    assert "%run /content/or_core/notebooks/colab_setup.py" in source
    # Outside Colab the cell must do nothing: run it as IPython reads its ! and % lines.
    namespace: dict = {}
    exec(compile(TransformerManager().transform_cell(source), "<colab cell>", "exec"), namespace)  # noqa: S102
    assert "google.colab" not in sys.modules


def test_every_notebook_has_the_same_colab_cell() -> None:
    assert len({_first_code_cell(path) for path in SOURCES}) == 1


def test_colab_setup_installs_the_checkout_and_works_in_its_notebooks_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = importlib.util.spec_from_file_location("colab_setup", NOTEBOOKS / "colab_setup.py")
    colab_setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colab_setup)
    commands: list[list[str]] = []
    monkeypatch.setattr(colab_setup.subprocess, "run", lambda command, check: commands.append(command))
    monkeypatch.chdir(tmp_path)
    assert colab_setup.setup() is False  # not on Colab
    assert commands == [] and Path.cwd() == tmp_path
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert colab_setup.setup() is True
    assert commands == [[sys.executable, "-m", "pip", "install", "--quiet", str(REPO_ROOT)]]
    assert Path.cwd() == NOTEBOOKS


@pytest.mark.parametrize("name", ["01_collapse.ipynb", "04_imagenet_pretraining.ipynb"])
def test_the_recorded_parameters_are_those_of_the_parameters_cell(name: str) -> None:
    cells = [c for c in _notebook(NOTEBOOKS / name)["cells"] if c["cell_type"] == "code"]
    declared = [node.targets[0].id for c in cells if "parameters" in c["metadata"].get("tags", [])
                for node in ast.parse(_source(c)).body]
    recorded = [
        node.value.keywords
        for c in cells[1:]  # after the Colab cell, plain Python
        for node in ast.walk(ast.parse(_source(c)))
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["parameters"]
    ]
    assert len(recorded) == 1, f"{name}: {len(recorded)} assignments to `parameters`"
    assert [k.arg for k in recorded[0]] == declared
    assert all(isinstance(k.value, ast.Name) and k.value.id == k.arg for k in recorded[0])


def test_profiles_are_flat_with_the_same_keys() -> None:
    cpu, gpu = _profile("cpu"), _profile("gpu")
    assert cpu["profile"] == "cpu" and gpu["profile"] == "gpu"
    assert set(cpu) == set(gpu)
    for value in [*cpu.values(), *gpu.values()]:
        assert not isinstance(value, dict)


def test_apply_profile_keeps_values_changed_by_hand() -> None:
    from or_core.book import apply_profile

    cpu, gpu = _profile("cpu"), _profile("gpu")
    namespace = dict(cpu, theory_gd_steps=7)
    changed = apply_profile("gpu", namespace)
    assert namespace["theory_gd_steps"] == 7
    assert namespace["theory_samples"] == gpu["theory_samples"] != cpu["theory_samples"]
    assert "theory_gd_steps" not in changed and "theory_samples" in changed
    assert apply_profile("cpu", namespace) == {}


def test_toc_config_and_bibliography() -> None:
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    assert toc["root"] == "intro"
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["repository"]["path_to_book"] == ""
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    bib = (BOOK / "references.bib").read_text()
    for key in ("he2024preventing", "bansal2018orthogonality", "susmelj2020lightly",
                "dacosta2022sololearn", "garrido2023rankme", "roy2007effective", "grill2020byol"):
        assert "{" + key + "," in bib


# ----------------------------------------------------------------------------------------------
# The build
# ----------------------------------------------------------------------------------------------
def _book_dependencies() -> None:
    for module in ("papermill", "jupyter_book", "matplotlib", "seaborn", "pandas", "ipykernel"):
        pytest.importorskip(module)


class _Links(HTMLParser):
    """The ``src`` of every ``<img>`` and the ``href`` of every ``<a>`` of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img" and attributes.get("src"):
            self.images.append(attributes["src"])  # type: ignore[arg-type]
        if tag == "a" and attributes.get("href"):
            self.links.append(attributes["href"])  # type: ignore[arg-type]


def _parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_book_pages_exist(built_book: Path) -> None:
    html = built_book / "_build" / "html"
    for page in ("index.html", "intro.html", "reproduce.html", "library.html", "bibliography.html"):
        assert (html / page).is_file(), page
    for source in SOURCES:
        assert (html / "notebooks" / f"{source.stem}.html").is_file(), source.name
    assert "Bansal" in (html / "bibliography.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_executed_notebook_has_outputs_and_provenance(built_book: Path, source: Path) -> None:
    nb = _notebook(built_book / "notebooks" / source.name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(o.get("output_type") != "error" for c in code for o in c["outputs"])
    assert nb["metadata"]["or_core"]["profile"] == "cpu"
    assert any("provenance" in c["metadata"].get("tags", []) for c in nb["cells"])


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_every_figure_is_embedded_or_an_existing_file(built_book: Path, source: Path) -> None:
    page = built_book / "_build" / "html" / "notebooks" / f"{source.stem}.html"
    images = _parse(page).images
    figures = [src for src in images if "_images/" in src or src.startswith("data:image/")]
    if source.name == "02_or_theory.ipynb":
        assert len(figures) >= 6, f"{len(figures)} figures on the page"
    for src in images:
        if src.startswith("data:image/"):
            continue
        assert "://" not in src, f"{page.name}: image from elsewhere: {src}"
        assert (page.parent / src.split("#")[0]).is_file(), f"{page.name}: missing image {src}"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_colab_link_opens_the_committed_source(built_book: Path, source: Path) -> None:
    page = built_book / "_build" / "html" / "notebooks" / f"{source.stem}.html"
    repo = yaml.safe_load((BOOK / "_config.yml").read_text())["repository"]["url"]
    owner_name = repo.removeprefix("https://github.com/")
    expected = f"{COLAB}/{owner_name}/blob/main/notebooks/{source.name}"
    colab = sorted({href for href in _parse(page).links if href.startswith("https://colab.")})
    assert colab == [expected]
    assert (REPO_ROOT / "notebooks" / source.name).is_file()


def test_building_the_book_leaves_the_tree_as_it_was(built_book: Path, tree_before_build, tree_after_build) -> None:
    """The build regenerates records and figures, but writes no tracked file differently: a
    build from a clean clone leaves it clean (and its pages say so)."""
    if tree_before_build is None:
        pytest.skip("not a git checkout")
    assert tree_after_build["status"] == tree_before_build["status"]
    assert tree_after_build["diff"] == tree_before_build["diff"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_a_page_says_uncommitted_changes_only_when_there_were(built_book: Path, tree_before_build, source: Path) -> None:
    if tree_before_build is None:
        pytest.skip("not a git checkout")
    nb = _notebook(built_book / "notebooks" / source.name)
    dirty = bool(tree_before_build["status"].strip())
    assert nb["metadata"]["or_core"]["git_dirty"] is dirty
    note = next(_source(c) for c in nb["cells"] if "provenance" in c["metadata"].get("tags", []))
    assert ("with uncommitted changes" in note) is dirty


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_no_progress_bar_noise_on_a_page(built_book: Path, source: Path) -> None:
    nb = _notebook(built_book / "notebooks" / source.name)
    streams = ["".join(o.get("text", "")) if isinstance(o.get("text"), list) else o.get("text", "")
               for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"] if o.get("output_type") == "stream"]
    noisy = [t[:120] for t in streams if "\r" in t or "it/s]" in t or "IProgress" in t or re.search(r"\d+%\|", t)]
    assert not noisy, f"{source.name}: {noisy}"
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert all("remove-cell" in c["metadata"]["tags"] for c in injected)


def test_every_table_csv_is_published_beside_its_page(built_book: Path) -> None:
    html = built_book / "_build" / "html"
    for source in SOURCES:
        page = html / "notebooks" / f"{source.stem}.html"
        links = [href for href in _parse(page).links if href.endswith(".csv")]
        tables = page.read_text(encoding="utf-8").count('class="or-table"')
        assert len(links) == tables, f"{page.name}: {tables} tables, {len(links)} CSV links"
        for href in links:
            assert (page.parent / href).is_file(), f"{page.name}: {href}"
    assert (html / "claims.csv").is_file()


def test_a_failing_notebook_stops_the_build_with_its_name(tmp_path: Path) -> None:
    _book_dependencies()
    import nbformat

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('raise ValueError("boom")')])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / "07_broken.ipynb")
    proc = subprocess.run(
        [sys.executable, "-m", "or_core.book", "--notebooks-dir", str(notebooks),
         "--book-dir", str(tmp_path / "book")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "07_broken.ipynb failed" in proc.stderr and "ValueError: boom" in proc.stderr
    assert "jupyter-book build" not in proc.stdout


# ----------------------------------------------------------------------------------------------
# The figures
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def plots():
    pytest.importorskip("seaborn")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from or_core import plots

    yield plots
    plt.close("all")


def test_plots_return_figures_with_log_scales(plots) -> None:
    import torch

    spectra = {
        "flat": torch.ones(8),
        "decaying": torch.logspace(0, -3, 8),
        "with zeros": torch.tensor([2.0, 1.0, 0.0]),
    }
    fig = plots.plot_spectra(spectra, "spectra")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and len(ax.lines) == 3
    assert ax.lines[0].get_ydata().tolist() == [1.0] * 8  # normalized by the largest value
    assert ax.lines[2].get_ydata().tolist() == [1.0, 0.5]  # zeros left out of the log axis

    fig = plots.plot_curves({"a": [3.0, 2.0, 1.0]}, hlines={"floor": 1.0})
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == 2

    panels = {"SO": torch.rand(5, 4), "SRIP": torch.rand(5, 4), "third": torch.rand(5, 4)}
    fig = plots.plot_singular_value_trajectories(panels)  # 2 columns: 3 panels and a hidden one
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3 and all(len(ax.lines) == 4 + 1 for ax in visible)  # 4 values + the target

    fig = plots.plot_power_iteration({"starts": torch.rand(4, 10) + 1e-3, "one": torch.rand(10) + 1e-3})
    assert fig.axes[0].get_yscale() == "log" and len(fig.axes[0].lines) == 2

    fig = plots.plot_or_cost({"fast": [0.001, 0.002], "slow": [1.0, 1.2]})
    assert fig.axes[0].get_xscale() == "linear"  # bars on a linear axis even 500x apart
    fig = plots.plot_or_cost({"a": [0.01], "b": [0.02]}, unit="s")
    assert fig.axes[0].get_xscale() == "linear"


def _book_figures(plots) -> dict:
    """One figure of every kind the book draws, from the committed records where it draws records."""
    import torch

    from or_core import report, run_dirs

    records = report.load_folder(REPO_ROOT / "results" / "matrix_cpu")
    frame = report.records_frame(records)
    benchmark = json.loads((REPO_ROOT / "results" / "benchmarks" / "or_overhead_cpu.json").read_text())
    runs = [r for r in run_dirs.load_run_dirs(REPO_ROOT / "results" / "gpu_runs") if r.name.endswith("_30ep_h100")]
    return {
        "spectra": plots.plot_spectra({"untrained": torch.rand(64), "BYOL": torch.rand(64), "BYOL + SO": torch.rand(64)}),
        "curves": plots.plot_curves({"a": [3.0, 2.0, 1.0], "b": [2.0, 1.5, 1.2]}, "t", hlines={"floor": 1.0}),
        "trajectories": plots.plot_singular_value_trajectories({k: torch.rand(5, 4) for k in ("a", "b", "c", "d")}),
        "power iteration": plots.plot_power_iteration({"starts": torch.rand(4, 10) + 1e-3}),
        "or cost": plots.plot_or_cost({"none": [0.001], "SO": [0.002], "SRIP": [0.004]}),
        "panels": plots.plot_spectra_panels({f"layer{i}": {"BYOL": torch.rand(16)} for i in range(4)}, "t"),
        "gamma response": plots.gamma_response(frame),
        "figure 2": plots.figure2(records),
        "weights": plots.spectra_figure(records, "weights"),
        "figure 3": plots.stage_spectra_figure(records),
        "overhead": plots.overhead_figure(benchmark),
        "history": plots.history_figure(runs, title="BYOL, CIFAR-10, 30 epochs [gpu runs]"),
    }


def test_every_figure_is_drawn_at_the_width_it_is_shown_with_readable_text(plots) -> None:
    """The book shows a figure at most about 690 px wide: drawn wider, it is scaled down and its
    text shrinks (1,451 px figures had tick labels about 5 px tall). Saved as the inline
    backend saves it (tight box, the figure's dpi), every figure fits, and no text of it is
    smaller than MIN_FONT_PT, which at the figure's dpi is at least 9 px."""
    import io

    from PIL import Image

    assert plots.MIN_FONT_PT * plots.DPI / 72 >= 9
    for name, fig in _book_figures(plots).items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
        width = Image.open(io.BytesIO(buffer.getvalue())).size[0]
        assert fig.dpi == plots.DPI, name
        assert width <= 690, f"{name}: {width} px wide"
        texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
                 if t.get_visible() and t.get_text().strip()]
        small = {t.get_text(): t.get_fontsize() for t in texts if t.get_fontsize() < plots.MIN_FONT_PT}
        assert not small, f"{name}: text below {plots.MIN_FONT_PT} pt: {small}"


def test_a_condition_looks_the_same_in_every_figure(plots) -> None:
    """BYOL + SO is one colour in Figure 2, Figure 3, the gamma response and a spectra plot
    whatever the other lines are; the labels name BYOL as BYOL everywhere."""
    import torch

    from or_core import report

    records = report.load_folder(REPO_ROOT / "results" / "matrix_cpu")
    figures = [plots.figure2(records), plots.stage_spectra_figure(records), plots.gamma_response(report.records_frame(records)),
               plots.plot_spectra({"untrained": torch.rand(8), "BYOL + SO (effective rank 3.1)": torch.rand(8)})]
    seen: dict[str, set] = {}
    for fig in figures:
        for ax in fig.axes:
            for line in ax.get_lines():
                label = line.get_label()
                if label.startswith("_"):
                    continue
                assert "byol" not in label, f"lower-case method name in {label!r}"
                key = plots.condition_of(label)
                if key is not None:
                    seen.setdefault(key, set()).add(line.get_color())
    assert {"so", "none", "srip", "whitening", "untrained"} <= set(seen), seen
    assert all(colors == {plots.CONDITIONS[key].color} for key, colors in seen.items()), seen
    assert len({c.color for c in plots.CONDITIONS.values()}) == len(plots.CONDITIONS)
    # labels that are no condition, or two of one condition, fall back to distinct styles
    styles = plots.condition_style(["BYOL + SO, seed 0", "BYOL + SO, seed 1"])
    assert styles[0]["color"] != styles[1]["color"]


def test_two_points_are_points_not_a_curve(plots) -> None:
    fig = plots.plot_curves({"BYOL": [1.0, 2.0], "BYOL + SO": [1.0, 2.0, 2.5]}, logy=False)
    two, three = fig.axes[0].get_lines()
    assert two.get_linestyle() == "None" and two.get_marker() not in (None, "None", "")
    assert three.get_linestyle() != "None"


# ----------------------------------------------------------------------------------------------
# The pages as a reader sees them: setup out of the way, tables that fit, the answer first
# ----------------------------------------------------------------------------------------------
def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_setup_cells_are_kept_off_the_page(path: Path) -> None:
    """The Colab cell and the Parameters heading are removed from the page, the parameters,
    imports and record-writing cells fold their code; the notebook itself keeps them all, so
    Colab and papermill run it as before."""
    cells = _notebook(path)["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "google.colab" in _source(code[0]) and "remove-cell" in _tags(code[0])
    params = next(c for c in code if "parameters" in _tags(c))
    assert "hide-input" in _tags(params)
    imports = cells[cells.index(params) + 1]
    assert "import" in _source(imports) and "hide-input" in _tags(imports)
    for cell in cells:
        if cell["cell_type"] == "markdown" and _source(cell).startswith("## Parameters"):
            assert "remove-cell" in _tags(cell)
        if cell["cell_type"] == "code" and "write_record(" in _source(cell):
            assert "hide-input" in _tags(cell), _source(cell)[:80]
    removed = [c for c in cells if "remove-cell" in _tags(c)]
    assert all("google.colab" in _source(c) or _source(c).startswith("## Parameters") for c in removed)


def test_the_injected_parameters_are_removed_from_the_page(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    from or_core import book

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title"), nbformat.v4.new_code_cell("x = 1"),
                nbformat.v4.new_code_cell("x = 2")]
    nb.cells[1].metadata["tags"] = ["parameters"]
    nb.cells[2].metadata["tags"] = ["injected-parameters"]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    book._add_provenance(path, book.provenance("cpu", 1.0, "python -m or_core.book"))
    cells = nbformat.read(path, as_version=4).cells
    tags = {c.source: c.metadata.get("tags", []) for c in cells if c.cell_type == "code"}
    assert tags == {"x = 1": ["parameters"], "x = 2": ["injected-parameters", "remove-cell"]}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_notebooks_write_their_records_to_records_out(path: Path) -> None:
    """A build in the cpu profile writes no record into the repository: every record path goes
    through records_out, which the cpu profile puts outside the clone (the gpu profile into
    results/, for records to commit)."""
    sources = [_source(c) for c in _notebook(path)["cells"] if c["cell_type"] == "code"]
    for source in sources:
        for call in ("write_record(", "run_matrix("):
            if call in source and "def " not in source.split(call)[0].splitlines()[-1]:
                line = next(l for l in source.splitlines() if call in l)
                assert "records_dir(" in line or "results=" in source, f"{path.name}: {line.strip()}"
    cpu, gpu = _profile("cpu"), _profile("gpu")
    out = Path(cpu["records_out"]).expanduser().resolve()
    assert REPO_ROOT.resolve() not in out.parents and out != REPO_ROOT.resolve()
    assert (NOTEBOOKS / gpu["records_out"]).resolve() == (REPO_ROOT / "results").resolve()


def test_tables_show_counts_as_integers_and_gammas_in_one_format() -> None:
    pd = pytest.importorskip("pandas")
    from or_core import report

    table = pd.DataFrame({"seed": [1.0, 2.0, float("nan")], "epochs": [30.0, 30.0, 30.0],
                          "gamma": [1e-6, 1e-3, float("nan")], "knn_top1": [0.5, 0.25, 0.125]})
    html = report.styled(table).to_html()
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", html)
    assert cells[:4] == ["1", "30", "1e-6", "0.500"] and cells[4:8] == ["2", "30", "1e-3", "0.250"]
    assert "1.000" not in html and "30.000" not in html
    assert "white-space: nowrap" in html  # "1e-6" is never broken at its hyphen


def test_every_table_has_its_csv_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pd = pytest.importorskip("pandas")
    import base64

    from or_core import report

    table = pd.DataFrame({"seed": range(20), "knn_top1": [i / 40 for i in range(20)]})
    folder = tmp_path / "05_figures"
    monkeypatch.setenv(report.TABLES_ENV, str(folder))
    html = report.show(table, "paired_seeds")._repr_html_()
    assert (folder / "paired_seeds.csv").read_text() == table.to_csv()
    assert 'href="05_figures/paired_seeds.csv"' in html
    assert "<details>" in html  # 20 rows > LONG_TABLE_ROWS: collapsed
    monkeypatch.delenv(report.TABLES_ENV)
    short = report.show(table.head(3), "short")._repr_html_()
    href = re.search(r'href="data:text/csv;base64,([^"]+)"', short).group(1)
    assert base64.b64decode(href).decode() == table.head(3).to_csv() and "<details>" not in short
    with pytest.raises(ValueError, match="names a file"):
        report.show(table, "../escape")


def test_the_recipe_on_each_page_comes_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from or_core import config

    small = config.PROFILES["cpu_small"]
    text = config.recipe("cpu_small")
    for piece in (f"{small['subset']:,} CIFAR-10 training images", f"{small['epochs']} epochs at batch {small['batch_size']}",
                  f"lr {small['lr']:g}", f"width {small['width']:g}", f"{small['linear_epochs']}-epoch linear probe"):
        assert piece in text, (piece, text)
    monkeypatch.setitem(config.PROFILES, "cpu_small", {**small, "epochs": 11})
    assert "11 epochs" in config.recipe("cpu_small")


def test_the_intro_opens_with_the_claims_table_of_the_records(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    from or_core import book, report

    records = report.load_folder(REPO_ROOT / "results" / "matrix_cpu")
    if not records:
        pytest.skip("no cpu-small records")
    path = book.write_intro(tmp_path)
    text = path.read_text()
    table = report.claims(report.records_frame(records), records)
    headline = report.headline_claims(table)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header == ["claim", "comparison (the one with the most seeds)", "effect", "95% CI", "seeds", "verdict", "section"]
    assert len(rows) - 1 == len(headline) == len(set(table.index))
    for (key, row), line in zip(headline.iterrows(), rows[1:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["claim"] and cells[5] == f"**{row['verdict']}**" and cells[4] == str(row["seeds"])
        if row["comparisons"] == "none":  # a claim without runs yet (the norm-only control here)
            assert cells[1] == "-" and row["verdict"] == report.NO_DATA
        else:
            assert cells[1].startswith(row["comparison"]) and f"({row['comparisons']} comparisons" in cells[1]
        label = report.CLAIM_SECTIONS[key][0]
        assert f"<{label}>" in cells[-1]
        comparisons = table.loc[[key]]
        assert int(row["seeds"]) == max(comparisons["seeds"][comparisons["comparison"] != report.ALL_COMPARISONS], default=0)
    assert pd.read_csv(tmp_path / "generated" / "html" / "claims.csv", index_col="id").index.tolist() == list(headline.index)
    assert (tmp_path / "generated" / "spectra_cpu_small.png").is_file() and "intro-figure2" in text
    # every link target exists in notebook 05, so the strict build resolves it
    figures = "".join(_source(c) for c in _notebook(NOTEBOOKS / "05_figures.ipynb")["cells"] if c["cell_type"] == "markdown")
    for label, _ in report.CLAIM_SECTIONS.values():
        assert f"({label})=" in figures, label
    assert "{include} generated/claims.md" in (BOOK / "intro.md").read_text()
    # and the reproduce page's cost table, from the measured GPU runs
    cost = (tmp_path / "generated" / "cost.md").read_text()
    assert cost.startswith("| matrix |") and "`matrix_gpu.yaml`" in cost
    assert "{include} generated/cost.md" in (BOOK / "reproduce.md").read_text()


def test_the_intro_shows_the_paired_matrix_as_far_as_it_is_recorded(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    from or_core import book, report

    results = tmp_path / "results"
    source = report.load_folder(REPO_ROOT / "results" / "matrix_cpu_paired")
    if not source:
        pytest.skip("no paired records")
    (results / "matrix_cpu_paired").mkdir(parents=True)
    for record in source:  # every comparison run, and one selection run that must not count
        path = Path(record.pop("_path"))
        (results / "matrix_cpu_paired" / path.name).write_text(json.dumps(record))
    comparisons = [r for r in source if "selection" not in r["groups"]]
    assert len(comparisons) < len(source)
    generated = tmp_path / "book" / "generated"
    (generated / "html").mkdir(parents=True)
    text = book._write_paired_claims(generated, results).read_text()
    assert f"checked on the {len(comparisons)} comparison runs recorded so far" in text
    missing = len(report.missing_runs(book.PAIRED_MATRIX, results / "matrix_cpu_paired"))
    assert f"{missing} runs of that matrix are still to be trained" in text
    frame = report.records_frame(comparisons)
    headline = report.headline_claims(report.claims(frame, comparisons))
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [c.strip("| ").split(" | ")[0] for c in rows] == headline["claim"].tolist()
    for line, verdict in zip(rows, headline["verdict"]):
        assert f"**{verdict}**" in line and "<figures-profile-paired>" in line
    assert pd.read_csv(generated / "html" / "claims_paired.csv", index_col="id").index.tolist() == list(headline.index)
    intro = (BOOK / "intro.md").read_text()
    assert intro.index("{include} generated/claims_paired.md") < intro.index("{include} generated/claims.md")
    figures = "".join(_source(c) for c in _notebook(NOTEBOOKS / "05_figures.ipynb")["cells"] if c["cell_type"] == "markdown")
    assert "(figures-profile-paired)=" in figures and "(figures-gpu)=" in figures


def _copy_records(records: list[dict], folder: Path) -> None:
    folder.mkdir(parents=True)
    for record in records:
        record = {k: v for k, v in record.items() if k != "_path"}
        (folder / f"{record['name']}.json").write_text(json.dumps(record))


def test_the_intros_answer_in_words_is_the_paired_records_interval(tmp_path: Path) -> None:
    """``generated/answer.md``: BYOL + SO against BYOL on seeds 0-2 of the paired matrix, in
    points with the paired-t interval computed here by hand (t_{0.975, 2} = 4.303), the bound
    it rules out, and that OR moved neither the weights' SO error nor their spectra; then the
    same records with the SO error of the OR runs cut by 100 (a change far beyond the seeds'
    spread) say that the weights ended closer to orthogonal.
    The H100 pair of ``results/gpu_runs`` is quoted from its summaries."""
    from or_core import book, report

    names = {f"byol-cifar10-{reg}-s{seed}" for reg in ("none", "so-1e-6") for seed in (0, 1, 2)}
    source = [r for r in report.load_folder(REPO_ROOT / "results" / "matrix_cpu_paired") if r["name"] in names]
    if len(source) < len(names):
        pytest.skip("waiting for the paired BYOL records of seeds 0-2")
    by = {(r["config"]["regularizer"], r["config"]["seed"]): r["summary"] for r in source}
    d = [by["so", s]["knn_top1"] - by["none", s]["knn_top1"] for s in (0, 1, 2)]
    mean = sum(d) / 3
    half = 4.302652729911275 * math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
    results = tmp_path / "results"
    _copy_records(source, results / "matrix_cpu_paired")
    shutil.copytree(REPO_ROOT / "results" / "gpu_runs", results / "gpu_runs")
    generated = tmp_path / "generated"
    generated.mkdir()
    text = book._write_answer(generated, results).read_text()
    interval = f"{100 * mean:+.1f} points (95% CI {100 * (mean - half):+.1f} to {100 * (mean + half):+.1f})"
    assert f"BYOL / CIFAR-10 / SO (gamma 1e-6) against the same method without OR, 3 paired seeds: test kNN top-1 {interval}" in text
    assert f"a gain above {100 * (mean + half):+.1f} points is ruled out" in text
    assert "the weights' SO error and spectra show no detectable change" in text
    none, so = (json.loads((REPO_ROOT / "results" / "gpu_runs" / f"byol_{reg}_cifar10_30ep_h100" / "summary.json").read_text())
                for reg in ("none", "so"))
    assert (f"kNN top-1 {so['knn_top1']:.3f} against {none['knn_top1']:.3f}, linear top-1 {so['linear_top1']:.3f} "
            f"against {none['linear_top1']:.3f}") in text
    lowered = [{**r, "summary": {**r["summary"], "or_so_total": r["summary"]["or_so_total"] / 100}}
               if r["config"]["regularizer"] == "so" else r for r in source]
    shutil.rmtree(results / "matrix_cpu_paired")
    _copy_records(lowered, results / "matrix_cpu_paired")
    assert "With OR the weights end up closer to orthogonal (a lower SO error)" in (
        book._write_answer(generated, results).read_text())
    assert (BOOK / "intro.md").read_text().index("{include} generated/answer.md") < (BOOK / "intro.md").read_text().index(
        "{include} generated/claims_paired.md")


def test_published_baselines_stand_beside_ours_with_their_protocols() -> None:
    from or_core import report

    published = report.published_baselines()
    assert {(b["library"], b["dataset"], b["metric"]) for b in published} >= {
        ("lightly", "cifar10", "knn_top1"), ("solo-learn", "cifar10", "linear_top1"), ("solo-learn", "cifar100", "linear_top1")}
    records = report.load_folder(REPO_ROOT / "results" / "matrix_cpu")
    frame = report.records_frame(records)
    table = report.baselines_table(frame, published)
    theirs = table[~table["source"].str.startswith("or_core")]
    assert theirs["value"].tolist() == [b["value"] for b in published] and theirs["protocol"].str.len().min() > 20
    ours = table[table["source"].str.startswith("or_core")]
    for _, row in ours.iterrows():
        run = report.select_runs(frame)
        run = run[(run["method"] == "byol") & (run["dataset"] == row["dataset"]) & (run["regularizer"] == "none")]
        assert row["value"] == run[row["metric"]].iloc[0]


def test_what_goes_against_the_paper_is_said_from_the_records() -> None:
    from or_core import report

    records = report.load_folder(REPO_ROOT / "results" / "matrix_cpu")
    frame = report.records_frame(records)
    sentences = report.against_paper(frame)
    t1 = report.table1(frame)
    # a gap counts beyond 1.96 * sqrt(2) * sd of BYOL without OR over its seeds (the 95% band of
    # the difference of two runs that differ by seed), computed here from the records
    for column, words in (("knn_top1", "test kNN top-1"), ("effective_rank", "the representation's effective rank")):
        seeds = [r["summary"][column] for r in records if r["config"]["method"] == "byol"
                 and r["config"]["regularizer"] == "none" and Path(r["config"]["dataset"]).name == "cifar10"]
        assert len(seeds) >= 2
        mean = sum(seeds) / len(seeds)
        band = 1.96 * math.sqrt(2) * math.sqrt(sum((v - mean) ** 2 for v in seeds) / (len(seeds) - 1))
        assert report.seed_band(frame, column) == pytest.approx(band, rel=1e-9)
        gap = t1.loc["BYOL + feature whitening", column] - t1.loc["BYOL + SO", column]
        said = any("feature whitening is above BYOL + SO" in s and words in s for s in sentences)
        assert said == (gap > band), (column, gap, band)
    flipped = frame.copy()
    is_white = flipped["method"] == "byol_whitening"
    for column in ("knn_top1", "linear_top1", "effective_rank", "weight_flatness", "hidden_flatness"):
        flipped.loc[is_white, column] = -1.0  # whitening below SO everywhere: nothing to say about Table 1
    assert not any("feature whitening" in s for s in report.against_paper(flipped))


def test_the_readme_figure_is_not_rewritten_when_its_pixels_are_the_same(plots, tmp_path: Path) -> None:
    import torch

    path = tmp_path / "figure.png"
    fig = plots.plot_spectra({"BYOL": torch.linspace(1, 0.1, 16)}, "t")
    assert plots.save_if_changed(fig, path) is True
    written = path.stat().st_mtime_ns
    assert plots.save_if_changed(fig, path) is False and path.stat().st_mtime_ns == written
    other = plots.plot_spectra({"BYOL": torch.linspace(1, 0.5, 16)}, "t")
    assert plots.save_if_changed(other, path) is True


def test_the_library_page_lists_every_method_and_transfer_set(built_book: Path) -> None:
    from or_core.methods import discover_methods
    from or_core.transfer import TRANSFER_SETS

    text = (built_book / "_build" / "html" / "library.html").read_text(encoding="utf-8")
    for name in [*discover_methods(), *TRANSFER_SETS, "OrthogonalityCallback"]:
        assert f">{name}<" in text or f"{name}(" in text, name


def test_the_library_tables_come_from_the_registry(tmp_path: Path) -> None:
    """One row per registered method, each with its paper (linked where its module cites a URL)
    and the recipe file of its defaults; one row per transfer set with its splits."""
    from or_core import book
    from or_core.methods import discover_methods
    from or_core.transfer import TRANSFER_SETS

    methods, transfer = book.write_library_page(tmp_path)
    rows = [line for line in methods.read_text().splitlines()[2:]]
    registry = discover_methods()
    assert [row.split("|")[1].strip() for row in rows] == [f"`{name}`" for name in sorted(registry)]
    for row, (name, cls) in zip(rows, sorted(registry.items())):
        assert cls.default_optimizer.source in row
        if name != "byol_whitening":  # the paper's own baseline: no separate publication
            assert "](https://arxiv.org/abs/" in row and re.search(r"\(\w*[ ]?\d{4}\)\]", row), row
    assert "[BYOL: Grill et al., \"Bootstrap Your Own Latent" in methods.read_text()
    sets = transfer.read_text().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in sets] == [f"`{name}`" for name in TRANSFER_SETS]
    assert "| `flowers102` | train + val | test |" in transfer.read_text()
