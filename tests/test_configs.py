"""Every YAML file under configs/ is valid: plain config files resolve to a PretrainConfig, matrix
files expand to runs whose configs resolve, with methods, regularizers and data sets that exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from or_core.config import resolve_config
from or_core.experiments import load_matrix
from or_core.methods import available_methods
from or_core.orthogonality import PENALTY_KINDS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _is_matrix(path: Path) -> bool:
    return "runs" in (yaml.safe_load(path.read_text()) or {}) and not _is_campaign(path)


def _is_campaign(path: Path) -> bool:
    """Campaign files (``python -m or_core campaign``) are checked by tests/test_campaign.py."""
    return path.name.startswith("campaign_")


@pytest.mark.parametrize("path", [p for p in CONFIGS if not _is_matrix(p) and not _is_campaign(p)], ids=lambda p: p.name)
def test_config_file_resolves(path: Path) -> None:
    cfg = resolve_config(config_file=path)
    assert cfg.method in available_methods()


@pytest.mark.parametrize("path", [p for p in CONFIGS if _is_matrix(p)], ids=lambda p: p.name)
def test_matrix_file_expands_to_valid_runs(path: Path) -> None:
    matrix = load_matrix(path)
    assert matrix.experiments, f"{path.name} has no runs"
    grids = matrix.choose.get("grids", {})
    for experiment in matrix.experiments:
        overrides = dict(experiment.overrides)
        if experiment.needs_chosen_gamma:
            # the norm-only controls (so_diag, so_offdiag) take SO's grid unless given their own
            grid = grids.get(overrides["regularizer"]) or (grids.get("so") if overrides["regularizer"].startswith("so_") else None)
            assert grid, f"{experiment.name}: no grid to choose its gamma from"
            overrides["gamma"] = grid[0]
        cfg = resolve_config(matrix.profile, overrides={**overrides, "profile": matrix.profile})
        assert cfg.method in available_methods() and cfg.regularizer in {"none", *PENALTY_KINDS}
        assert cfg.dataset in {"cifar10", "cifar100"} or "/" not in cfg.dataset, experiment.name
