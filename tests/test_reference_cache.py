"""The cache of the references each run's evaluation repeats (raw-pixel and untrained kNN)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from or_core import evaluate, reference_cache
from or_core.config import fit_to_data, resolve_config
from or_core.training_run import build_run


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OR_CORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "references"


def test_a_value_is_computed_once_per_key_and_a_broken_entry_again(cache: Path) -> None:
    calls = []

    def compute(value: float):
        return lambda: calls.append(value) or value

    assert reference_cache.cached_value("raw", {"images": "a"}, compute(0.25)) == 0.25
    assert reference_cache.cached_value("raw", {"images": "a"}, compute(0.75)) == 0.25  # read, not computed
    assert reference_cache.cached_value("raw", {"images": "b"}, compute(0.5)) == 0.5
    assert calls == [0.25, 0.5]
    for entry in cache.glob("raw-*.json"):
        entry.write_text("{ cut short")
    assert reference_cache.cached_value("raw", {"images": "a"}, compute(0.125)) == 0.125
    assert reference_cache.cached_value("raw", {"images": "a"}, compute(0.0)) == 0.125
    assert calls == [0.25, 0.5, 0.125]


def test_the_digest_follows_every_byte_dtype_and_shape() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    same = reference_cache.tensor_digest([x.clone(), torch.tensor(3)])
    assert reference_cache.tensor_digest([x, torch.tensor(3)]) == same
    y = x.clone()
    y[2, 3] = torch.nextafter(y[2, 3], torch.tensor(100.0))  # one ulp
    assert reference_cache.tensor_digest([y, torch.tensor(3)]) != same
    assert reference_cache.tensor_digest([x.reshape(4, 3), torch.tensor(3)]) != same
    assert reference_cache.tensor_digest([x.double(), torch.tensor(3)]) != same
    assert reference_cache.tensor_digest([x.t(), torch.tensor(3)]) != same  # the values in another order


def test_a_second_run_reads_both_references_and_another_seed_recomputes_its_encoders(
    small_image_folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same run evaluated twice computes its references once (kNN is never called the
    second time); a run of another seed starts from other weights, so its untrained kNN is its
    own, while its evaluation images (no subset) and so its raw-pixel kNN are shared."""
    folder = small_image_folder(per_class=60, classes=3)

    def run_of(seed: int):
        overrides = {"dataset": str(folder), "device": "cpu", "seed": seed, "eval_train_subset": None, "batch_size": 32,
                     "eval_test_subset": None}
        return build_run(fit_to_data(resolve_config("ci", overrides=overrides), notify=False))

    run = run_of(0)
    root = Path(run.cfg.data_root).expanduser()
    first = (evaluate.raw_pixel_knn(run, root), evaluate.untrained_knn(run, root))
    calls = []
    knn = evaluate.knn_accuracy
    monkeypatch.setattr(evaluate, "knn_accuracy", lambda *a, **k: calls.append(a[0].shape) or knn(*a, **k))
    assert (evaluate.raw_pixel_knn(run, root), evaluate.untrained_knn(run, root)) == first
    assert calls == []
    other = run_of(1)
    assert evaluate.raw_pixel_knn(other, root) == first[0] and calls == []
    evaluate.untrained_knn(other, root)
    assert len(calls) == 1
