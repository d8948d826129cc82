"""The cpu profile's two additions: bfloat16 training on CPUs that have it, and the raw-pixel
kNN every trained encoder is measured against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from or_core.config import PROFILES, fit_to_data, resolve_config
from or_core.evaluate import knn_accuracy, raw_pixel_knn
from or_core.fast_path.batched_views import step_views
from or_core.train import optimization_step
from or_core.training_run import build_run, trains_in_cpu_bf16

BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _ci_run(folder: Path, **overrides):
    cfg = fit_to_data(resolve_config("ci", overrides={"dataset": str(folder), "device": "cpu", **overrides}), notify=False)
    return build_run(cfg)


@pytest.fixture
def folder(small_image_folder) -> Path:
    return small_image_folder(per_class=60, classes=3)


def test_cpu_bf16_is_the_cpu_profiles_and_nobody_elses() -> None:
    assert PROFILES["cpu"]["cpu_bf16"] is True
    assert all(not p.get("cpu_bf16", False) for name, p in PROFILES.items() if name != "cpu")
    assert resolve_config("ci").cpu_bf16 is False


def test_cpu_bf16_trains_under_autocast_with_float32_weights(folder: Path) -> None:
    """Where oneDNN has bfloat16 kernels the step runs under autocast (the projector's output is
    bfloat16) on channels-last weights that stay float32; elsewhere the run is float32, NCHW."""
    run = _ci_run(folder, cpu_bf16=True, batch_size=32)
    assert trains_in_cpu_bf16(run.cfg, run.device) is BF16
    conv = run.method.backbone.conv1.weight
    assert conv.dtype == torch.float32
    assert conv.is_contiguous(memory_format=torch.channels_last) is BF16
    dtypes = []
    hook = run.method.projection_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    views = next(step_views(run, (images for images, _ in run.epoch_batches(0)), torch.Generator().manual_seed(0)))
    before = conv.detach().clone()
    out = optimization_step(run, views, 0.0)
    hook.remove()
    assert torch.isfinite(out["loss"]) and not torch.equal(before, conv.detach())
    assert set(dtypes) == {torch.bfloat16 if BF16 else torch.float32}
    assert all(p.dtype == torch.float32 for p in run.method.parameters())


def test_raw_pixel_knn_is_the_knn_of_the_normalized_images(folder: Path) -> None:
    """The identity encoder's kNN, recomputed here from the images: ``(x / 255 - mean) / std``
    flattened, with the run's k and t on the run's evaluation images."""
    from or_core.data import load_split

    run = _ci_run(folder)
    cfg, root = run.cfg, Path(run.cfg.data_root).expanduser()
    got = raw_pixel_knn(run, root)
    train = load_split(cfg.dataset, "train", root, cfg.image_size, cfg.eval_train_subset, cfg.seed)
    test = load_split(cfg.dataset, "test", root, cfg.image_size, cfg.eval_test_subset, cfg.seed)
    mean, std = torch.tensor(run.mean).view(1, 3, 1, 1), torch.tensor(run.std).view(1, 3, 1, 1)
    pixels = lambda x: ((x.float() / 255 - mean) / std).flatten(1)  # noqa: E731
    want = knn_accuracy(pixels(train.images), train.labels, pixels(test.images), test.labels, 3, cfg.knn_k, cfg.knn_t)
    # float rounding can move a vote only at an exact tie: one test image at most
    assert got == pytest.approx(want["top1"], abs=1.0 / len(test.labels) + 1e-9)
    assert 1 / 3 < got <= 1.0  # three Imagenette classes: pixels beat chance


PILOTS = Path(__file__).resolve().parents[1] / "results" / "cpu_profile" / "pilots_2026-12-07.json"


def test_the_cpu_profile_is_the_pilot_chosen_on_validation() -> None:
    """The profile's training settings are those of the pilot with the best validation kNN among
    the runs without OR (never the test numbers), and the README quotes that pilot's record."""
    import json
    import re

    record = json.loads(PILOTS.read_text())
    runs = {r["label"]: r for r in record["runs"]}
    chosen = max((r for r in runs.values() if r["config"]["regularizer"] == "none"), key=lambda r: r["val_knn_top1"])
    assert record["selected"]["label"] == chosen["label"]
    profile = resolve_config("cpu", overrides={"method": "byol", "seed": chosen["config"]["seed"]}).to_dict()
    for key in ("width", "subset", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs",
                "eval_train_subset", "eval_test_subset", "val_images", "linear_epochs", "cpu_bf16", "method_kwargs",
                "augment_overrides", "image_size"):
        assert profile[key] == chosen["config"][key], key
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    quoted = re.search(r"validation kNN top-1 (0\.\d{3}) and test kNN top-1 (0\.\d{3}).*?raw pixels reach (0\.\d{3})", readme)
    assert quoted, "the README's cpu-profile sentence"
    val, test, pixels = (float(q) for q in quoted.groups())
    assert val == pytest.approx(chosen["val_knn_top1"], abs=5e-4)
    assert test == pytest.approx(chosen["test_knn_top1"], abs=5e-4)
    assert pixels == pytest.approx(record["raw_pixels_knn_top1"], abs=5e-4)
    assert test > record["raw_pixels_knn_top1"] and chosen["test_knn_top1"] >= 0.45


def test_the_untrained_reference_is_the_runs_own_initial_encoder(folder: Path) -> None:
    """``untrained_knn`` rebuilds the encoder the run started from (same weights, bit for bit),
    runs the same kNN on it, and leaves the global random state alone."""
    from or_core.evaluate import extract_features, untrained_knn
    from or_core.training_run import initial_backbone

    run = _ci_run(folder)
    start = {k: v.clone() for k, v in run.method.backbone.state_dict().items()}
    rebuilt, _ = initial_backbone(run.cfg, run.image_size)
    assert start.keys() == rebuilt.state_dict().keys()
    assert all(torch.equal(start[k], v) for k, v in rebuilt.state_dict().items())

    cfg, root = run.cfg, Path(run.cfg.data_root).expanduser()
    raw_pixel_knn(run, root)  # decodes the evaluation splits (a first decoding draws from the global RNG)
    state = torch.random.get_rng_state()
    got = untrained_knn(run, root)
    assert torch.equal(torch.random.get_rng_state(), state)
    from or_core.data import load_split

    train = load_split(cfg.dataset, "train", root, cfg.image_size, cfg.eval_train_subset, cfg.seed)
    test = load_split(cfg.dataset, "test", root, cfg.image_size, cfg.eval_test_subset, cfg.seed)
    feats = [extract_features(run.method.backbone, d.images, run.mean, run.std, device=run.device) for d in (train, test)]
    want = knn_accuracy(feats[0], train.labels, feats[1], test.labels, 3, cfg.knn_k, cfg.knn_t)["top1"]
    # the run has not trained, so its backbone is the untrained encoder; a tie may move one vote
    assert got == pytest.approx(want, abs=1.0 / len(test.labels) + 1e-9)
