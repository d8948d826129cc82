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
    for page in ("index.html", "intro.html", "reproduce.html", "bibliography.html"):
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
