"""Multi-process training (DDP on gloo, 2 CPU processes) against one process with the same global batch."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from or_core import distributed
from or_core.config import PretrainConfig
from or_core.data import SeededBatchSampler, load_split, load_split_at_most, scan_image_folder, streaming_loader
from or_core.distributed import CPUSyncBatchNorm, convert_cpu_sync_batchnorm
from or_core.train import build_run, pretrain

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Single process: nothing distributed happens
# ----------------------------------------------------------------------------------------------
def test_without_a_process_group_everything_is_a_no_op() -> None:
    assert not distributed.is_distributed() and distributed.is_main_process()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard_rows(6) == (0, 6)
    distributed.check_batch_size(7)
    assert distributed.method_kwargs("simclr", {"temperature": 0.1}) == {"temperature": 0.1}
    loss = torch.tensor(1.5)
    assert distributed.all_reduce_mean(loss) is loss
    method = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert distributed.wrap_method(method, torch.device("cpu")) is method
    assert isinstance(method[1], nn.BatchNorm2d) and not isinstance(method[1], CPUSyncBatchNorm)


def test_cpu_sync_batchnorm_is_plain_batch_norm_in_one_process() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    converted = convert_cpu_sync_batchnorm(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)))
    converted.load_state_dict(ref.state_dict())
    assert isinstance(converted[1], CPUSyncBatchNorm)
    assert converted.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(10, 5)
    torch.testing.assert_close(converted(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(converted[1].running_var, ref[1].running_var, rtol=0, atol=0)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_batch_sampler_splits_every_global_batch_into_contiguous_shards(world: int) -> None:
    """Every rank's sampler, set to the same generator, yields B / W indices per batch, and the
    ranks' shards, concatenated in rank order, are the global batches of the unsharded sampler."""
    n, batch = 203, 24
    whole = SeededBatchSampler(n, batch, shuffle=True, drop_last=True)
    shards = [
        SeededBatchSampler(n, batch, shuffle=True, drop_last=True, rows=(r * batch // world, (r + 1) * batch // world))
        for r in range(world)
    ]
    for epoch in range(2):  # as Run.epoch_batches: the same generator state on every process
        for sampler in [whole, *shards]:
            sampler.generator = torch.Generator().manual_seed(100 + epoch)
        global_batches = list(whole)
        per_rank = [list(sampler) for sampler in shards]
        assert len(global_batches) == n // batch and all(len(p) == len(global_batches) for p in per_rank)
        for step, indices in enumerate(global_batches):
            assert all(len(p[step]) == batch // world for p in per_rank)
            assert sum((p[step] for p in per_rank), []) == indices
    assert all(len(sampler) == n // batch for sampler in shards)


def test_sharded_batch_sampler_rejects_rows_outside_the_batches() -> None:
    for rows in ((0, 0), (4, 9), (-1, 4)):
        with pytest.raises(ValueError, match="not a non-empty range"):
            SeededBatchSampler(20, 8, rows=rows)
    with pytest.raises(ValueError, match="trailing batch of 4 images: use drop_last=True"):
        SeededBatchSampler(20, 8, drop_last=False, rows=(0, 4))
    assert list(SeededBatchSampler(20, 8, shuffle=False, drop_last=False, rows=(0, 8)))[-1] == [16, 17, 18, 19]
    assert list(SeededBatchSampler(20, 8, shuffle=False, drop_last=True, rows=(4, 8)))[-1] == [12, 13, 14, 15]


def test_streaming_loader_of_a_shard_decodes_only_its_rows(small_image_folder: Callable[..., Path]) -> None:
    """A loader with ``rows`` yields those rows of every global batch: the same images, decoded."""
    folder = small_image_folder(per_class=8, classes=3)
    whole = streaming_loader(folder, 32, 8, num_workers=0, split="train", drop_last=True, seed=3)
    halves = [
        streaming_loader(folder, 32, 8, num_workers=0, split="train", drop_last=True, seed=3, rows=rows)
        for rows in ((0, 4), (4, 8))
    ]
    for (images, labels), (first, first_labels), (second, second_labels) in zip(whole, *halves, strict=True):
        assert first.shape == second.shape == (4, 3, 32, 32) and first.dtype == torch.uint8
        assert torch.equal(torch.cat([first, second]), images)
        assert torch.equal(torch.cat([first_labels, second_labels]), labels)


# ----------------------------------------------------------------------------------------------
# Two gloo processes: the CPU synchronized batch norm against nn.BatchNorm*d on the full batch
# ----------------------------------------------------------------------------------------------
def _check_sync_bn(rank: int, world: int, shape: tuple[int, ...], bn_cls: type, momentum: float | None) -> None:
    """Forward, gradients, running statistics and eval output of one layer on a sharded batch."""
    torch.manual_seed(0)  # the same full batch and layer on every process
    channels = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    w = torch.randn(shape, dtype=torch.float64)  # loss = sum(out * w): non-trivial gradients
    ref = bn_cls(channels, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    sync = convert_cpu_sync_batchnorm(nn.Sequential(bn_cls(channels, momentum=momentum).double()))[0]
    sync.load_state_dict(ref.state_dict())
    assert isinstance(sync, CPUSyncBatchNorm)

    for _ in range(2):  # two steps: running statistics accumulate
        x.grad = None
        ref.zero_grad()
        sync.zero_grad()
        out_ref = ref(x)
        (out_ref * w).sum().backward()
        n = shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        x_local = x.detach()[part].clone().requires_grad_()
        out = sync(x_local)
        (out * w[part]).sum().backward()  # the sum over processes is the full-batch loss
        grads = torch.cat([sync.weight.grad, sync.bias.grad])
        dist.all_reduce(grads)
        exact = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out, out_ref.detach()[part], **exact)
        torch.testing.assert_close(x_local.grad, x.grad[part], **exact)
        torch.testing.assert_close(grads, torch.cat([ref.weight.grad, ref.bias.grad]), **exact)
        torch.testing.assert_close(sync.running_mean, ref.running_mean, **exact)
        torch.testing.assert_close(sync.running_var, ref.running_var, **exact)
        assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked)
    sync.eval()
    ref.eval()
    torch.testing.assert_close(sync(x.detach()[part]), ref(x.detach())[part], **exact)


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _check_sync_bn(rank, world, (8, 4, 5, 5), nn.BatchNorm2d, 0.1)
        _check_sync_bn(rank, world, (6, 5), nn.BatchNorm1d, None)  # projector heads; cumulative average
        # The data shard, the gather switch and the batch-size check.
        assert distributed.shard_rows(64) == (32 * rank, 32 * rank + 32)
        with pytest.raises(ValueError, match="does not split evenly across 2 processes"):
            distributed.shard_rows(63)
        assert distributed.method_kwargs("simclr", {})["gather_distributed"] is True
        assert distributed.method_kwargs("simclr", {"gather_distributed": False})["gather_distributed"] is False
        assert "gather_distributed" not in distributed.method_kwargs("byol", {})
        distributed.check_batch_size(64)
        with pytest.raises(ValueError, match="not divisible by the 2 processes"):
            distributed.check_batch_size(63)
        assert distributed.is_main_process() == (rank == 0)
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_matches_batch_norm_on_the_full_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


# ----------------------------------------------------------------------------------------------
# End to end: torchrun with 2 processes vs pretrain in one process
# ----------------------------------------------------------------------------------------------
def _config(data_root: Path, method: str) -> PretrainConfig:
    """4 steps of a narrow ResNet-18 on 256 real CIFAR-10 images, global batch 64."""
    return PretrainConfig(
        method=method, regularizer="so", dataset="cifar10", data_root=str(data_root), width=0.125,
        subset=256, epochs=1, batch_size=64, eval_train_subset=200, eval_test_subset=100,
        linear_epochs=1, knn_k=20, profile="test", method_kwargs={"proj_hidden_dim": 64, "proj_output_dim": 32},
    )


def _assert_same_training(cfg: PretrainConfig, one: Path, two: Path) -> None:
    """The 2-process weights equal the 1-process ones up to floating-point summation order.

    Every floating tensor of the final method state (online and EMA networks, batch-norm running
    statistics) is compared as its change from the initial weights, ``delta``:
    ``|delta_2 - delta_1| <= 0.1 |delta_1| + 1e-6`` (norms per tensor). Not exact: the gradients
    are averaged by an all-reduce, batch-norm sums are added across processes and convolutions
    run on half batches, all in another summation order; the ~1e-7 relative differences of the
    first step are amplified by the next ones to at most ~3% of a tensor's change here (a single
    process with 1 thread vs 2 threads differs as much). A missing synchronization is far outside
    the bound: without synchronized batch norm the median tensor is off by ~80% of its change,
    SimCLR without ``gather_distributed`` by ~17% (and its loss by 12%).
    """
    torch.manual_seed(0)
    with torch.no_grad():
        initial = build_run(cfg).method.state_dict()
    ckpt1 = torch.load(one / "checkpoint.pt", weights_only=False)
    ckpt2 = torch.load(two / "checkpoint.pt", weights_only=False)
    state1, state2 = ckpt1["method"], ckpt2["method"]
    assert state1.keys() == state2.keys()
    off = []
    for key, value in state1.items():
        if not value.is_floating_point():
            assert torch.equal(value, state2[key]), key
            continue
        change = (value - initial[key]).norm().item()
        error = (state2[key] - value).norm().item()
        if error > 0.1 * change + 1e-6:
            off.append(f"{key}: |difference| {error:.3g}, |change| {change:.3g}")
    assert not off, "\n".join(off)
    m1, m2 = ckpt1["history"][-1], ckpt2["history"][-1]
    assert m1["step"] == m2["step"] == 4
    assert m2["ssl_loss"] == pytest.approx(m1["ssl_loss"], rel=2e-3)
    assert m2["or_term"] == pytest.approx(m1["or_term"], rel=1e-4)


def _torchrun(cfg: PretrainConfig, out: Path, *extra: str) -> None:
    """``torchrun --standalone --nproc_per_node 2 -m or_core pretrain`` of ``cfg`` into ``out``."""
    config_file = out.parent / f"{out.name}.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "or_core", "pretrain", "--config", str(config_file), "--out", str(out), "--no-progress", *extra,
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("method", ["byol", "simclr"])  # simclr: gather_distributed negatives
def test_two_processes_match_one_process_with_the_same_global_batch(
    method: str, cifar10_dir: Path, tmp_path: Path
) -> None:
    cfg = _config(cifar10_dir.parent, method)
    # Decode the subset first: building the cache draws from the global RNG (decoding workers),
    # which would change the initial weights of whichever run built it.
    load_split(cfg.dataset, "train", cfg.data_root, cfg.image_size, cfg.subset, cfg.seed)
    load_split(cfg.dataset, "test", cfg.data_root, cfg.image_size, 512, cfg.seed)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1): fast on a busy CPU
    try:
        pretrain(cfg, tmp_path / "one", progress=False)
        _torchrun(cfg, tmp_path / "two")
        _assert_same_training(cfg, tmp_path / "one", tmp_path / "two")
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    assert {p.name for p in two.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"}
    assert yaml.safe_load((two / "config.yaml").read_text()) == cfg.to_dict()
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 1


def test_two_process_run_resumes_bit_identically(cifar10_dir: Path, tmp_path: Path) -> None:
    """torchrun with 2 processes, stopped after epoch 1 and resumed, ends where the same 2-process
    run without a stop ends: every tensor of the final state equal, bit for bit."""
    cfg = _config(cifar10_dir.parent, "byol")
    cfg.epochs, cfg.subset = 2, 128
    _torchrun(cfg, tmp_path / "straight")
    _torchrun(cfg, tmp_path / "resumed", "--stop-after-epochs", "1")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "resumed" / "summary.json").exists()
    _torchrun(cfg, tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["method"].keys() == b["method"].keys()
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    assert [h["ssl_loss"] for h in a["history"]] == [h["ssl_loss"] for h in b["history"]]


def _image_folder(source: Path, train_files: list[str], dest: Path, test_per_class: int = 8) -> Path:
    """An ImageFolder of symlinks: ``train/`` holds ``train_files`` (``<class>/<file>`` of
    ``source/train``), ``test/`` the first ``test_per_class`` files of each class of ``source/test``."""
    for relative in train_files:
        (dest / "train" / relative).parent.mkdir(parents=True, exist_ok=True)
        (dest / "train" / relative).symlink_to(source / "train" / relative)
    for class_dir in sorted((source / "test").iterdir()):
        (dest / "test" / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:test_per_class]:
            (dest / "test" / class_dir.name / f.name).symlink_to(f)
    return dest


def test_two_streaming_processes_match_one_process_with_the_same_global_batch(cifar10_dir: Path, tmp_path: Path) -> None:
    """``stream: true`` under torchrun: each process's DataLoader decodes only its half of every
    global batch (JPEG files) and augments it with the parameters drawn for the whole batch.

    The run follows the single-process streamed run within the bounds of
    :func:`_assert_same_training`, and it is bit-identical to the 2-process run on the same
    images held resident. The folder holds the 256 CIFAR-10 images of the resident test above,
    in the same order, so the bounds are checked where they were calibrated. On other images
    the drift is of the same size: on 256 Imagenette-64 images at 32 px (the seeded subset of
    ``subset=256``), the 2-process run is at most 3.4% of a tensor's change away from the
    1-process run (median 0.3%), streamed or resident alike, and 2 threads against 1 in one
    process at most 0.5% (measured 2026-11-25; an earlier reading of 10-20% on Imagenette was
    not reproduced).
    """
    resident = _config(cifar10_dir.parent, "byol")
    subset = load_split(resident.dataset, "train", resident.data_root, resident.image_size, resident.subset, resident.seed)
    folder = _image_folder(cifar10_dir, subset.files, tmp_path / "cifar10-256")
    _, files, _ = scan_image_folder(folder / "train")
    assert [f.relative_to(folder / "train").as_posix() for f in files] == subset.files  # the same order
    cfg = dataclasses.replace(
        resident, dataset=str(folder), data_root=str(tmp_path), subset=None, stream=True, image_size=32,
        num_workers=1, eval_train_subset=None, eval_test_subset=None,
    )
    # Decode the probe batch and the resident copy first (workers that draw from the global RNG).
    load_split_at_most(cfg.dataset, "test", cfg.data_root, cfg.image_size, 512, cfg.seed)
    load_split(cfg.dataset, "train", cfg.data_root, cfg.image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker (OMP_NUM_THREADS=1)
    try:
        pretrain(cfg, tmp_path / "one", progress=False)
        _torchrun(cfg, tmp_path / "two")
        _assert_same_training(cfg, tmp_path / "one", tmp_path / "two")
        _torchrun(dataclasses.replace(cfg, stream=False), tmp_path / "two_resident")
    finally:
        torch.set_num_threads(threads)
    streamed = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["method"]
    held = torch.load(tmp_path / "two_resident" / "checkpoint.pt", weights_only=False)["method"]
    assert streamed.keys() == held.keys() and all(torch.equal(streamed[k], held[k]) for k in streamed)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["train_images"] == 256 and summary["batch_size"] == 64
