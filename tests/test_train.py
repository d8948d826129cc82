"""The pretraining engine on the real CIFAR-10: learning, resume, every method, clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from or_core import data as data_module
from or_core.config import PROFILES, PretrainConfig, fit_to_data, resolve_config
from or_core.divergence import NonFiniteLossError
from or_core.evaluate import extract_features
from or_core.fast_path.batched_views import step_views
from or_core.measure import load_trained
from or_core.methods import available_methods, method_class
from or_core.run_files import RunConfigMismatchError, prepare_run_dir
from or_core.train import initial_pass, pretrain, training_step
from or_core.training_run import build_run

REPO = Path(__file__).resolve().parents[1]


def tiny(data_root: Path, **overrides) -> PretrainConfig:
    """A run of seconds: a narrow ResNet-18 on 512 real CIFAR-10 images."""
    values = dict(
        dataset="cifar10", data_root=str(data_root), width=0.125, subset=512, epochs=2, batch_size=64,
        eval_train_subset=500, eval_test_subset=200, linear_epochs=2, knn_k=20, profile="test",
        method_kwargs={"proj_hidden_dim": 64, "proj_output_dim": 32},
    )
    values.update(overrides)
    return PretrainConfig(**values)


@pytest.fixture(scope="module")
def data_root(cifar10_dir: Path) -> Path:
    """The folder holding the ``cifar10`` ImageFolder tree, so that ``dataset="cifar10"`` reads it."""
    return cifar10_dir.parent


def test_run_directory_holds_config_metrics_checkpoint_and_summary(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny(data_root, regularizer="so", gamma=1e-4)
    summary = pretrain(cfg, tmp_path, show_progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"}
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert m["or_term"] > 0 and m["ssl_loss"] == m["ssl_loss"]
        assert {"lr", "images_per_s", "effective_rank", "std_of_l2_normalized"} <= set(m)
    required = {
        "method", "regularizer", "gamma", "backbone", "dataset", "profile", "epochs", "knn_top1",
        "linear_top1", "effective_rank", "or_so_total", "wall_time_s", "images_per_s", "device",
        "torch", "lightly", "git_commit",
    }
    assert required <= set(summary)
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["gamma"] == 1e-4 and 0.0 <= summary["knn_top1"] <= 1.0
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg.to_dict()
    # a finished run is not trained again
    again = pretrain(cfg, tmp_path, show_progress=False)
    assert again == summary


def test_load_trained_gives_the_features_of_the_runs_own_model(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(data_root, epochs=1, regularizer="so", gamma=1e-4)
    pretrain(cfg, tmp_path, show_progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    # the run's own model, as it was got back before: the whole run rebuilt, the checkpoint loaded
    run = build_run(fit_to_data(cfg, notify=False))
    run.method.load_state_dict(state["method"])
    images = run.train.images[:96]

    def no_data(*args, **kwargs):
        raise AssertionError("load_trained read the data set")

    monkeypatch.setattr(data_module, "load_split", no_data)
    monkeypatch.setattr(data_module, "load_split_at_most", no_data)
    trained = load_trained(tmp_path, device="cpu")
    assert not trained.method.training and trained.epoch == 1 and trained.image_size == run.image_size
    assert (trained.mean, trained.std) == (run.mean, run.std)
    loaded = trained.method.state_dict()  # backbone and heads, every tensor of the checkpoint
    assert loaded.keys() == state["method"].keys()
    assert all(torch.equal(loaded[k], state["method"][k]) for k in loaded)
    assert torch.equal(trained.features(images), extract_features(run.method.backbone, images, run.mean, run.std))


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["method"]


def test_resume_after_sigkill_is_bit_identical(data_root: Path, tmp_path: Path) -> None:
    args = [
        sys.executable, "-m", "or_core", "pretrain", "--method", "byol", "--regularizer", "srip",
        "--dataset", "cifar10", "--data-root", str(data_root), "--width", "0.125", "--subset", "512",
        "--epochs", "3", "--batch-size", "64", "--config", str(tmp_path / "small.yaml"), "--no-progress",
    ]
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({
        "eval_train_subset": 500, "eval_test_subset": 200, "linear_epochs": 1, "knn_k": 20,
        "method_kwargs": {"proj_hidden_dim": 64, "proj_output_dim": 32},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*args, "--out", str(straight)], check=True, env=env, capture_output=True)

    proc = subprocess.Popen([*args, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"]
    assert 1 <= done < 3, "the kill should land before the end of training"
    subprocess.run([*args, "--out", str(killed)], check=True, env=env, capture_output=True)

    a, b = _final_state(straight), _final_state(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3]


def test_augmenting_several_batches_at_once_covers_every_batch_and_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    """``augment_batches=3`` over 8 batches: chunks of 3, 3 and 2, each one call of the
    augmentation cut into its batches; a run stopped after an epoch and resumed ends with the
    weights of an uninterrupted one."""
    cfg = tiny(data_root, regularizer="so", gamma=1e-4, augment_batches=3, batch_size=64, subset=512)
    run = build_run(cfg)
    batches = [images for images, _ in run.epoch_batches(0)]
    views = list(step_views(run, batches, torch.Generator().manual_seed(1)))
    assert len(batches) == len(views) == 8
    reference = torch.Generator().manual_seed(1)
    for first, size in ((0, 3), (3, 3), (6, 2)):
        whole = run.augment(torch.cat(batches[first : first + size]), generator=reference)
        for j in range(size):
            assert all(torch.equal(v, w[64 * j : 64 * (j + 1)]) for v, w in zip(views[first + j], whole))
    pretrain(cfg, tmp_path / "straight", show_progress=False)
    pretrain(cfg, tmp_path / "resumed", show_progress=False, stop_after_epochs=1)
    pretrain(cfg, tmp_path / "resumed", show_progress=False)
    straight, resumed = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(ValueError, match="augment_batches"):
        build_run(tiny(data_root, augment_batches=0))


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_with_a_finite_loss(method: str, data_root: Path, tmp_path: Path) -> None:
    heads = {"proj_hidden_dim": 64, "proj_output_dim": 32}
    if method == "wmse":  # whitened sub-batches of 64 (the batch), at least twice the projection
        heads["whitening_size"] = 64
    cfg = tiny(data_root, method=method, regularizer="so", epochs=1, subset=256, method_kwargs=heads)
    run = build_run(cfg)
    before = {k: v.clone() for k, v in run.method.backbone.state_dict().items()}
    summary = pretrain(cfg, tmp_path, show_progress=False)
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert torch.isfinite(torch.tensor(metrics["ssl_loss"])) and metrics["or_term"] > 0
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["method"]
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[f"backbone.{k}"])]
    assert changed, "training must move the backbone"
    assert summary["method"] == method


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny(data_root, epochs=3)
    pretrain(cfg, tmp_path, show_progress=False, stop_after_epochs=1)
    good = (tmp_path / "checkpoint.pt").read_bytes()

    from or_core.methods.base import SSLMethod

    original = SSLMethod.training_loss

    def poisoned(self, views, progress, indices=None):
        out = original(self, views, progress, indices)
        if progress >= 0.5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SSLMethod, "training_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 12 \(epoch 2\).*the last good checkpoint \(epoch 1\) is kept"):
        pretrain(cfg, tmp_path, show_progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert not (tmp_path / "summary.json").exists()


def test_clear_errors(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="byol"):
        build_run(tiny(data_root, method="byoll"))
    with pytest.raises(ValueError, match="cifar10"):
        build_run(tiny(data_root, dataset="imagenet-1k"))
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-folder"):
        build_run(tiny(data_root, dataset=str(tmp_path / "no-such-folder")))
    with pytest.raises(ValueError, match="unknown profile 'tpu'; valid profiles: cpu, cpu_small, ci, gpu"):
        resolve_config("tpu")
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown config field.*epochz"):
        resolve_config("cpu", tmp_path / "bad.yaml")
    cfg = tiny(data_root, epochs=3)
    pretrain(cfg, tmp_path / "run", show_progress=False, stop_after_epochs=1)
    with pytest.raises(RunConfigMismatchError, match="epochs: 3 there, 2 now"):
        pretrain(tiny(data_root, epochs=2), tmp_path / "run", show_progress=False)
    # the checkpoint's own config decides, not config.yaml
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(RunConfigMismatchError, match="epochs: 3 there, 2 now"):
        pretrain(tiny(data_root, epochs=2), tmp_path / "run", show_progress=False)
    # a checkpoint written before a field existed holds that field's default: it resumes
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    del state["config"]["compile_or"]
    prepare_run_dir(cfg, tmp_path / "run", state, write=False)
    with pytest.raises(RunConfigMismatchError, match="compile_or: False there, True now"):
        prepare_run_dir(dataclasses.replace(cfg, compile_or=True), tmp_path / "run", state, write=False)


def test_cli_help_lists_methods_datasets_and_profiles() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "or_core", "pretrain", "--help"], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    for name in [*available_methods(), "cifar10", "cifar100", "ImageFolder", "cpu", "gpu", "srip"]:
        assert name in out
    bad = subprocess.run(
        [sys.executable, "-m", "or_core", "pretrain", "--method", "nope", "--out", "x"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "invalid choice: 'nope'" in bad.stderr and "byol" in bad.stderr



def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads ``5e-4`` as a string; the config turns it into the number it means."""
    path = tmp_path / "c.yaml"
    path.write_text("weight_decay: 5e-4\nregularizer: so\ngamma: 1e-6\nepochs: 3\n")
    cfg = resolve_config("cpu", path)
    assert (cfg.weight_decay, cfg.gamma, cfg.epochs) == (5e-4, 1e-6, 3)
    assert isinstance(cfg.weight_decay, float)
    path.write_text("lr: fast\n")
    with pytest.raises(ValueError, match="'lr' must be a number > 0, got 'fast'"):
        resolve_config("cpu", path)


def test_profile_method_settings_sit_between_the_profile_and_the_user(tmp_path: Path) -> None:
    """The cpu profile's DINO and SwaV settings apply to those methods only, over the profile's
    own values, and a YAML file or a flag still overrides them."""
    dino = resolve_config("cpu", overrides={"method": "dino"})
    expected = method_class("dino").profile_settings["cpu"]
    assert dino.lr == expected["lr"] != PROFILES["cpu"]["lr"]
    assert dino.method_kwargs == {**PROFILES["cpu"]["method_kwargs"], **expected["method_kwargs"]}
    assert dino.width == PROFILES["cpu"]["width"]
    swav = resolve_config("cpu", overrides={"method": "swav"})
    assert swav.lr == PROFILES["cpu"]["lr"] and swav.method_kwargs["num_local_views"] == 0
    byol = resolve_config("cpu", overrides={"method": "byol"})
    assert byol.method_kwargs == PROFILES["cpu"]["method_kwargs"]
    assert resolve_config("gpu", overrides={"method": "dino"}).method_kwargs == {}
    path = tmp_path / "c.yaml"
    path.write_text("method: dino\nlr: 0.3\nmethod_kwargs: {num_local_views: 2}\n")
    from_file = resolve_config("cpu", path)
    assert from_file.lr == 0.3 and from_file.method_kwargs["num_local_views"] == 2
    assert from_file.method_kwargs["num_prototypes"] == expected["method_kwargs"]["num_prototypes"]
    flag = resolve_config("cpu", path, overrides={"lr": 0.01, "method": "swav"})
    assert flag.lr == 0.01 and flag.method_kwargs["sinkhorn_epsilon"] == 0.02
    assert "num_prototypes" in flag.method_kwargs and flag.method_kwargs["num_local_views"] == 2


def test_streaming_run_trains_and_resumes_exactly(small_image_folder: Callable[..., Path], tmp_path: Path) -> None:
    """``stream: true``: DataLoader workers decode every epoch; the batch order is seeded per
    epoch, so 1 epoch + resume + 1 epoch equals 2 epochs in one go, weight for weight."""
    folder = small_image_folder()
    cfg = tiny(tmp_path, dataset=str(folder), subset=None, stream=True, image_size=32, decode_size=40,
               num_workers=1, batch_size=32, eval_train_subset=None, eval_test_subset=None, val_images=None)
    straight = pretrain(cfg, tmp_path / "straight", show_progress=False)
    assert straight["train_images"] == 120 and straight["eval_test_images"] == 60
    assert straight["image_size"] == 32 and 0.0 <= straight["knn_top1"] <= 1.0
    pretrain(cfg, tmp_path / "resumed", show_progress=False, stop_after_epochs=1)
    pretrain(cfg, tmp_path / "resumed", show_progress=False)
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a streamed evaluation subset: only features are kept in memory
    sub = pretrain(dataclasses.replace(cfg, eval_train_subset=30, eval_test_subset=15), tmp_path / "sub", show_progress=False)
    assert sub["eval_train_images"] == 30 and sub["eval_test_images"] == 15
    with pytest.raises(ValueError, match="needs image_size"):
        build_run(tiny(tmp_path, dataset=str(folder), subset=None, stream=True))


def test_every_batch_comes_with_the_positions_of_its_images(
    data_root: Path, small_image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    """``Run.epoch_batches`` yields ``(images, indices)``: the images are the training set's rows
    ``indices``, resident or streamed, and an epoch visits distinct positions (all but the
    dropped last incomplete batch)."""
    resident = build_run(tiny(data_root, batch_size=48))
    seen = []
    for images, indices in resident.epoch_batches(1):
        assert torch.equal(images, resident.train.images[indices])
        seen += indices.tolist()
    assert len(seen) == len(set(seen)) == 512 - 512 % 48
    folder = small_image_folder()
    streamed = build_run(tiny(tmp_path, dataset=str(folder), subset=None, stream=True, image_size=32,
                              num_workers=1, batch_size=32, val_images=None))
    seen = []
    for images, indices in streamed.epoch_batches(0):
        assert torch.equal(images, torch.stack([streamed.loader.dataset[int(i)][0] for i in indices]))
        seen += indices.tolist()
    assert len(seen) == len(set(seen)) == 120 - 120 % 32


def test_the_pass_before_training_gives_every_image_its_cluster(data_root: Path) -> None:
    """DeepCluster V2 ``needs_initial_pass``: one pass over the training set (the batches of
    epoch 0, no gradient, no weight moved) fills the memory of every image it saw and clusters it."""
    run = build_run(tiny(data_root, method="deepclusterv2", batch_size=48, method_kwargs={
        "proj_hidden_dim": 64, "proj_output_dim": 32, "num_prototypes": [10, 20]}))
    weights = {k: v.detach().clone() for k, v in run.method.named_parameters() if v.requires_grad}  # not the prototypes
    seen = torch.cat([indices for _, indices in run.epoch_batches(0)])
    assert initial_pass(run, torch.Generator().manual_seed(1)) > 0
    assigned = run.method.assignments >= 0
    assert torch.equal(assigned.nonzero()[:, 1].unique(), seen.sort().values) and assigned[:, seen].all()
    assert len(seen) == 512 - 512 % 48 and not run.method.written.any()
    assert all(torch.equal(v, dict(run.method.named_parameters())[k]) for k, v in weights.items())
    for h, prototypes in enumerate(run.method.prototypes):  # the memory's own clustering
        sims = run.method.memory[h % 2, seen] @ prototypes.t()  # the nearest centroid, to rounding (matmul shapes differ)
        assert torch.allclose(sims.gather(1, run.method.assignments[h, seen][:, None]).squeeze(1), sims.max(dim=1).values, atol=1e-5)


def test_deepclusterv2_clusters_after_each_epoch_and_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    """The clustering after an epoch is part of that epoch's checkpoint: 1 epoch + resume + 1
    epoch ends with the weights, prototypes and assignments of 2 epochs in one go."""
    cfg = tiny(data_root, method="deepclusterv2", method_kwargs={
        "proj_hidden_dim": 64, "proj_output_dim": 32, "num_prototypes": [10, 20]})
    straight = pretrain(cfg, tmp_path / "straight", show_progress=False)
    history = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["ssl_loss"] > 0.0  # the pass before training gave the first epoch its targets
    pretrain(cfg, tmp_path / "resumed", show_progress=False, stop_after_epochs=1)
    resumed = pretrain(cfg, tmp_path / "resumed", show_progress=False)
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert any(k.endswith("assignments") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["knn_top1"] == resumed["knn_top1"]
    trained = load_trained(tmp_path / "straight")  # rebuilt without its data set: the memory's rows from the state
    assert all(torch.equal(v, a[k]) for k, v in trained.method.state_dict().items())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_a_cuda_step_in_float32_equals_the_cpu_step(data_root: Path) -> None:
    """BYOL + SO, one step from the same initial weights on the same real images with the same
    augmentation stream: the CUDA update equals the CPU update to float32 rounding (TF32 off).

    The bound is 5e-3 relative: cuDNN's float32 convolutions (Winograd and FFT among those its
    autotuner picks) round differently from oneDNN's; measured 1.8e-3 on an H200 (torch 2.11).
    A wrong augmentation, EMA or OR gradient on CUDA gives an error of order 1."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        updates = {}
        for device in ("cpu", "cuda"):
            run = build_run(tiny(data_root, regularizer="so", gamma=1e-4, device=device, amp=False, channels_last=False))
            before = {k: v.detach().cpu().clone() for k, v in run.method.backbone.named_parameters()}
            out = training_step(run, run.train.images[:64], 0.0, torch.Generator().manual_seed(5))
            assert torch.isfinite(out["loss"]).item() and out["or_term"].item() > 0
            updates[device] = torch.cat(
                [(p.detach().cpu() - before[k]).flatten() for k, p in run.method.backbone.named_parameters()]
            )
        relative = (updates["cuda"] - updates["cpu"]).norm() / updates["cpu"].norm()
        assert updates["cpu"].norm() > 0 and relative < 5e-3, f"relative update difference {relative:.2e}"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@needs_cuda
@pytest.mark.parametrize("method", ["byol", "simclr", "dino"])
def test_a_cuda_run_with_bf16_and_channels_last_trains_evaluates_and_resumes(method: str, data_root: Path, tmp_path: Path) -> None:
    """The CUDA path as the gpu profile uses it (bf16 autocast, channels_last): finite losses, the
    OR term in float32, a summary naming the GPU, and a resumed run that ends where it would."""
    cfg = tiny(data_root, method=method, regularizer="so", gamma=1e-4, device="cuda", amp=True, channels_last=True, epochs=2)
    pretrain(cfg, tmp_path / "first", show_progress=False, stop_after_epochs=1)
    summary = pretrain(cfg, tmp_path / "first", show_progress=False)
    lines = [json.loads(s) for s in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert all(m["or_term"] > 0 and m["ssl_loss"] == m["ssl_loss"] for m in lines)
    assert summary["device"] == torch.cuda.get_device_name() and 0.0 <= summary["knn_top1"] <= 1.0
    state = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=False, map_location="cpu")
    assert all(torch.isfinite(v).all() for v in state["method"].values() if v.is_floating_point())


#: Host-device synchronizations that a step may make, per method (files that the sync debug
#: mode reports): lightly's NTXentLoss with in-batch negatives (SimCLR, NNCLR) drops the diagonal
#: with a boolean mask, whose output size the host must read (``logits[~diag_mask]``, lightly
#: 1.6.0), and the backward of that indexing syncs too (reported at torch/autograd/graph.py, where
#: ``backward`` enters the engine). Measured on an H200, 2026-11-26. Everything else is ours to
#: keep free.
_LIGHTLY_SYNCS = {"simclr": {"ntx_ent_loss.py", "graph.py"}, "nnclr": {"ntx_ent_loss.py", "graph.py"}}


@needs_cuda
@pytest.mark.parametrize(
    ("method", "regularizer", "kwargs"),
    [
        ("byol", "so", {}),
        ("byol", "srip", {}),
        ("mocov2", "none", {"queue_size": 256}),
        ("nnclr", "none", {"queue_size": 256}),
        ("simclr", "so", {}),
        ("swav", "so", {"queue_length": 128, "queue_start_progress": 0.0, "num_local_views": 2}),
    ],
)
def test_a_cuda_training_step_never_waits_for_the_gpu(data_root: Path, method: str, regularizer: str, kwargs: dict) -> None:
    """A step with LARS (BYOL + SO or SRIP, and the methods with memory banks and queues):
    augmentation, loss, backward and update queue their work without a host-device
    synchronization, so the host can run ahead of the GPU; the one exception is lightly's
    in-batch NT-Xent loss (``_LIGHTLY_SYNCS``)."""
    cfg = tiny(data_root, method=method, regularizer=regularizer, device="cuda", optimizer="lars",
               method_kwargs={"proj_hidden_dim": 64, "proj_output_dim": 32, **kwargs})
    run = build_run(cfg)
    generator = torch.Generator().manual_seed(0)
    for begin in (0, 64, 128):  # momentum buffers, cuDNN autotuning, queue pointers read once
        training_step(run, run.train.images[begin : begin + 64], 0.1, generator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            training_step(run, run.train.images[192:256], 0.1, generator)
            torch.ones((), device="cuda").item()  # a known synchronization: the detector works
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    where = [Path(w.filename).name for w in syncs]
    assert where[-1:] == [Path(__file__).name], "the deliberate .item() was not reported"
    assert set(where[:-1]) <= _LIGHTLY_SYNCS.get(method, set()), [f"{w.filename}:{w.lineno}" for w in syncs]


def test_a_compiled_run_trains_evaluates_and_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    """``compile`` (inductor, the gpu profile's path; CUDA graphs need a GPU): BYOL + SO with its
    backbone and EMA backbone compiled trains, evaluates eagerly, and a run stopped after an epoch
    and resumed (state loaded into the compiled modules) ends with the weights of an
    uninterrupted one."""
    from torch._dynamo.utils import counters

    cfg = tiny(data_root, regularizer="so", gamma=1e-4, subset=256, compile="default")
    torch._dynamo.reset()
    counters.clear()
    straight = pretrain(cfg, tmp_path / "straight", show_progress=False)
    assert counters["stats"]["unique_graphs"] >= 2  # the online and the EMA backbone were compiled
    pretrain(cfg, tmp_path / "resumed", show_progress=False, stop_after_epochs=1)
    pretrain(cfg, tmp_path / "resumed", show_progress=False)
    first, second = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert 0.0 <= straight["knn_top1"] <= 1.0 and straight["or_so_total"] > 0
    assert yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())["compile"] == "default"


def test_the_warmup_comes_from_the_runs_recipe(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a warmup in the config, build_run takes the warmup of the recipe the optimizer is
    built from (SSLMethod.optimizer_defaults), not that of default_optimizer."""
    cls = method_class("byol")
    recipe = dataclasses.replace(cls.default_optimizer, warmup_epochs=1)
    monkeypatch.setattr(cls, "optimizer_defaults", classmethod(lambda c, backbone, image_size: recipe))
    assert cls.default_optimizer.warmup_epochs == 10
    run = build_run(tiny(data_root, method="byol", epochs=6))
    assert run.scheduler.warmup_epochs == 1 * run.steps_per_epoch  # default_optimizer: 3 epochs
