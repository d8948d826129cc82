"""What a notebook shows when a Jupyter kernel runs it: every figure, no progress-bar noise.

Both broke in the book while the plain-Python tests passed, because only a kernel has the inline
backend and tqdm's widget bar; so these run a tiny notebook in a real kernel with papermill
(a few seconds).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import nbformat
import pytest

from or_core import plots
from or_core.progress import disabled_by_environment, progress_bar

papermill = pytest.importorskip("papermill")


def _run(cells: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> list[list[dict]]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    source, output = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, source)
    papermill.execute_notebook(str(source), str(output), kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    return [cell["outputs"] for cell in nbformat.read(output, as_version=4).cells]


def test_every_figure_of_a_notebook_is_shown_not_only_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figure = "fig = plots.plot_curves({'BYOL': [1.0, 0.5, 0.25]}, 'a title')"
    outputs = _run(["from or_core import plots", figure, figure, figure], tmp_path, monkeypatch)
    shown = [sum("image/png" in o.get("data", {}) for o in cell) for cell in outputs[1:]]
    assert shown == [1, 1, 1]


def test_tqdm_disable_silences_every_bar_in_a_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bar = "import or_core, or_core.train\nfrom or_core.progress import progress_bar\nfor _ in progress_bar(range(3), desc='decoding'):\n    pass"
    outputs = _run([bar], tmp_path, monkeypatch, TQDM_DISABLE="1")
    assert outputs == [[]]


def test_figure_context_keeps_the_interactive_mode_a_backend_turned_on_inside_it() -> None:
    before = matplotlib.is_interactive()
    try:
        matplotlib.interactive(False)
        with plots.figure_context():
            matplotlib.interactive(True)  # what the inline backend does when the first figure loads it
        assert matplotlib.is_interactive()
        with plots.figure_context():
            pass
        assert matplotlib.is_interactive()
    finally:
        matplotlib.interactive(before)


@pytest.mark.parametrize(("value", "off"), [("", False), ("0", False), ("false", False), ("1", True), ("True", True)])
def test_tqdm_disable_values(monkeypatch: pytest.MonkeyPatch, value: str, off: bool) -> None:
    monkeypatch.setenv("TQDM_DISABLE", value)
    assert disabled_by_environment() is off
    assert progress_bar(range(2)).disable is off
    assert progress_bar(range(2), enabled=False).disable is True
