"""Adding a method is one new file: a module on ``or_core.methods``' path with an ``SSLMethod``
subclass that declares its ``name`` is found by the registry, the configs and profiles, the
view recipes, the command line and the matrix, and trains, with no edit anywhere else."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import or_core.methods
from or_core.augment import method_views
from or_core.config import resolve_config
from or_core.experiments import run_matrix
from or_core.methods import METHODS, available_methods, discover_methods, method_class
from or_core.methods.view_recipes import base_view, simclr_views
from cli_helpers import run_cli

NAME = "toy_cosine"
MODULE = f"or_core.methods.{NAME}"

# What a developer would save as or_core/methods/toy_cosine.py.
SOURCE = textwrap.dedent(
    '''
    """A toy method: two views' projections pulled together by their cosine (it collapses,
    but it trains)."""

    from __future__ import annotations

    from collections.abc import Sequence

    import torch.nn.functional as F
    from torch import Tensor, nn

    from or_core.augment import ViewConfig
    from or_core.methods.base import OptimizerDefaults, SSLMethod
    from or_core.methods.view_recipes import simclr_views


    class ToyCosine(SSLMethod):
        """``2 - 2 cos(z0, z1)`` between the projections of two SimCLR views.

        Defaults: SGD lr 0.05, weight decay 5e-4 (a test's numbers).
        """

        name = "toy_cosine"
        aliases = ("toy",)
        default_optimizer = OptimizerDefaults(
            name="sgd", lr=0.05, weight_decay=5e-4, source="tests/test_adding_a_method.py"
        )
        profile_settings = {"ci": {"lr": 0.02, "method_kwargs": {"proj_output_dim": 16}}}

        @classmethod
        def view_recipe(cls, base: ViewConfig, n_local_views: int) -> list[ViewConfig]:
            return simclr_views(base)

        def __init__(
            self,
            backbone: nn.Module,
            feature_dim: int,
            regularizer: str = "none",
            gamma: float | None = None,
            proj_hidden_dim: int = 64,
            proj_output_dim: int = 32,
        ) -> None:
            super().__init__(backbone, feature_dim, regularizer, gamma)
            self.projection_head = nn.Sequential(
                nn.Linear(feature_dim, proj_hidden_dim),
                nn.ReLU(),
                nn.Linear(proj_hidden_dim, proj_output_dim),
            )

        def ssl_loss(self, views: Sequence[Tensor], progress: float) -> Tensor:
            z0, z1 = (self.projection_head(self.features(v)) for v in views)
            return 2 - 2 * F.cosine_similarity(z0, z1).mean()
    '''
)


@pytest.fixture
def toy_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type]:
    """The toy method's module in a folder added to the package's ``__path__``, discovered;
    forgotten afterwards."""
    folder = tmp_path / "methods"
    folder.mkdir()
    (folder / f"{NAME}.py").write_text(SOURCE)
    monkeypatch.setattr(or_core.methods, "__path__", [*or_core.methods.__path__, str(folder)])
    assert NAME not in available_methods()
    try:
        discover_methods()
        yield method_class(NAME)
    finally:
        METHODS.pop(NAME, None)
        sys.modules.pop(MODULE, None)


def test_a_new_module_is_a_registered_method_with_its_views_and_profile_settings(toy_method):
    assert NAME in available_methods() and toy_method.__module__ == MODULE
    assert method_views(NAME, 32) == method_views("simclr", 32) != method_views("byol", 32)
    assert method_views(NAME, 96) == simclr_views(base_view(96))  # blur on above 64 px
    assert method_views("Toy", 32, n_local_views=2) == toy_method.views(32)
    ci = resolve_config("ci", overrides={"method": NAME})
    assert ci.lr == 0.02 and ci.method_kwargs["proj_output_dim"] == 16
    assert resolve_config("cpu", overrides={"method": NAME}).lr != 0.02
    assert discover_methods()[NAME] is toy_method  # discovering again changes nothing


def test_a_new_method_is_listed_by_the_cli_and_trains_there(
    toy_method, cifar10_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    code, out, _ = run_cli(capsys, "pretrain", "--help")
    assert code == 0 and NAME in out
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text(yaml.safe_dump({
        "subset": 256, "epochs": 1, "eval_train_subset": 500, "eval_test_subset": 200,
        "val_images": 0, "linear_epochs": 1, "knn_k": 20,
    }))
    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "pretrain", "--method", NAME, "--profile", "ci", "--dataset", "cifar10",
        "--data-root", cifar10_dir.parent, "--config", sizes, "--out", out_dir, "--no-progress",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["method"] == NAME and 0.0 <= summary["knn_top1"] <= 1.0
    (last,) = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= last["ssl_loss"] <= 4.0
    config = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert config["lr"] == 0.02 and config["method_kwargs"]["proj_output_dim"] == 16


def test_a_matrix_takes_a_new_method(toy_method, tmp_path: Path):
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({
        "profile": "ci", "results": str(tmp_path / "results"),
        "runs": [{"group": "toy", "method": [NAME, "byol"], "dataset": "cifar10"}],
    }))
    pending = run_matrix(path, tmp_path / "work", dry_run=True)
    assert pending == [f"{NAME}-cifar10-none-s0", "byol-cifar10-none-s0"]
