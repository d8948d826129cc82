"""Shared fixtures: the real data sets of ``../shared/datasets``, extracted once into a cache,
and the book built once for the whole session (``tests/test_book.py``, ``tests/test_browser.py``).

Environment variables:
    OR_CORE_SHARED_DATASETS: folder holding the ``*.tar.gz`` archives (default
        ``<repo root>/../shared/datasets``).
    OR_CORE_CACHE: cache folder the archives are extracted into (default
        ``~/.cache/or_core``); the trees land in ``<cache>/datasets``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from or_core.data import default_data_root, extract_archive

REPO_ROOT = Path(__file__).resolve().parents[1]
BOOK = REPO_ROOT / "book"
#: Every notebook's cpu-profile run plus ``jupyter-book build`` stay well inside this.
BUILD_TIMEOUT_S = 900
#: What ``python -m or_core.book`` needs; the build is skipped without any of them.
BOOK_MODULES = ("papermill", "jupyter_book", "matplotlib", "seaborn", "pandas", "ipykernel")


@pytest.fixture(scope="session")
def shared_datasets_dir() -> Path:
    """The folder of the shared dataset archives; skips the test if it is absent."""
    env = os.environ.get("OR_CORE_SHARED_DATASETS")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "datasets"
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path} (set OR_CORE_SHARED_DATASETS)")
    return path


def _extracted(shared: Path, archive_name: str) -> Path:
    archive = shared / archive_name
    if not archive.is_file():
        pytest.skip(f"dataset archive not found: {archive}")
    return extract_archive(archive, default_data_root())


@pytest.fixture(scope="session")
def cifar10_dir(shared_datasets_dir: Path) -> Path:
    """The extracted CIFAR-10 ImageFolder root (``train/``, ``test/``)."""
    return _extracted(shared_datasets_dir, "cifar10.tar.gz")


@pytest.fixture(scope="session")
def cifar100_dir(shared_datasets_dir: Path) -> Path:
    """The extracted CIFAR-100 ImageFolder root (``train/``, ``test/``)."""
    return _extracted(shared_datasets_dir, "cifar100.tar.gz")


@pytest.fixture(scope="session")
def imagenette_dir(shared_datasets_dir: Path) -> Path:
    """The extracted Imagenette-64 ImageFolder root (``train/``, ``val/``)."""
    return _extracted(shared_datasets_dir, "imagenette-64.tar.gz")


@pytest.fixture
def small_image_folder(imagenette_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """A factory of small ImageFolders of real Imagenette-64 files (symlinks) under ``tmp_path``:
    ``make(per_class=40, classes=3)`` gives ``train/`` with ``per_class`` files of each of the
    first ``classes`` classes and ``val/`` with half as many."""

    def make(per_class: int = 40, classes: int = 3, name: str = "tiny-imagenette") -> Path:
        dest = tmp_path / name
        for split in ("train", "val"):
            for class_dir in sorted((imagenette_dir / split).iterdir())[:classes]:
                target = dest / split / class_dir.name
                target.mkdir(parents=True)
                for f in sorted(class_dir.iterdir())[: per_class if split == "train" else per_class // 2]:
                    (target / f.name).symlink_to(f)
        return dest

    return make


def _tree_state() -> dict[str, str] | None:
    """``git status --porcelain`` and ``git diff`` of the repository, or None outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        return {"status": git("status", "--porcelain"), "diff": git("diff", "--binary")}
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.fixture(scope="session")
def tree_before_build() -> dict[str, str] | None:
    """The git state of the repository just before ``built_book`` builds (None without git)."""
    return _tree_state()


@pytest.fixture(scope="session")
def tree_after_build(built_book: Path) -> dict[str, str] | None:
    """The git state of the repository right after ``built_book`` was built."""
    return _tree_state()


@pytest.fixture(scope="session")
def built_book(tmp_path_factory: pytest.TempPathFactory, tree_before_build: dict[str, str] | None) -> Path:
    """A copy of book/ built by ``python -m or_core.book`` with the cpu profile, once a session.

    The copy leaves a reader's own ``book/_build`` alone; the HTML is in ``<copy>/_build/html``
    and the executed notebooks in ``<copy>/notebooks``. Skips the test when a module the build
    needs is missing.
    """
    for module in BOOK_MODULES:
        pytest.importorskip(module)
    book = tmp_path_factory.mktemp("book") / "book"
    shutil.copytree(BOOK, book, ignore=shutil.ignore_patterns("_build", "notebooks", ".ipynb_checkpoints"))
    proc = subprocess.run(
        [sys.executable, "-m", "or_core.book", "--profile", "cpu", "--book-dir", str(book)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "timings:" in proc.stdout
    return book
