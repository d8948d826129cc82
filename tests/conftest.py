"""Shared fixtures: the real data sets of ``../shared/datasets``, extracted once into a cache.

Environment variables:
    OR_CORE_SHARED_DATASETS: folder holding the ``*.tar.gz`` archives (default
        ``<repo root>/../shared/datasets``).
    OR_CORE_CACHE: cache folder the archives are extracted into (default
        ``~/.cache/or_core``); the trees land in ``<cache>/datasets``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from or_core.data import default_data_root, extract_archive

REPO_ROOT = Path(__file__).resolve().parents[1]


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
