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
from or_core import evaluate as evaluate_module
from or_core import train as train_module
from or_core import training_run as training_run_module
from or_core.augment import MultiViewAugment
from or_core.config import PretrainConfig
from or_core.data import SeededBatchSampler, load_split, load_split_at_most, scan_image_folder, streaming_loader
from or_core.distributed import CPUSyncBatchNorm, convert_cpu_sync_batchnorm
from or_core.evaluate import extract_features
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


def _deepclusterv2_worker(rank: int, world: int, init_file: str) -> None:
    """Each process writes the memory rows of its own images (rank r: rows r, r + W, ...); after
    the clustering both hold the same centroids and the assignment of every image."""
    from or_core.methods.deepclusterv2 import DeepClusterV2

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same module and projections on both processes
        method = DeepClusterV2(nn.Sequential(nn.Flatten(), nn.Linear(12, 8)), 8, proj_hidden_dim=16,
                               proj_output_dim=4, num_prototypes=(3, 5), num_samples=40)
        projections = torch.nn.functional.normalize(torch.randn(2, 40, 4), dim=2)
        mine = torch.arange(rank, 40, world)
        method.memory[:, mine] = projections[:, mine]
        method.written[mine] = True
        method.cluster()
        for h, prototypes in enumerate(method.prototypes):
            everyone = [torch.empty_like(prototypes) for _ in range(world)]
            dist.all_gather(everyone, prototypes.detach())
            assert all(torch.equal(p, everyone[0]) for p in everyone)
            sims = projections[h % 2] @ prototypes.t()  # every image, whichever process saw it: its nearest centroid
            assert torch.allclose(sims.gather(1, method.assignments[h][:, None]).squeeze(1), sims.max(dim=1).values, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_deepclusterv2_processes_share_centroids_and_every_images_assignment(tmp_path: Path) -> None:
    mp.spawn(_deepclusterv2_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


# ----------------------------------------------------------------------------------------------
# End to end: torchrun with 2 processes vs pretrain in one process, both in float64
# ----------------------------------------------------------------------------------------------
# What these tests compare is the training arithmetic of DDP (the gradient all-reduce, the
# synchronized batch norm, SimCLR's gathered negatives, the sharded data), so both runs train in
# float64 on the same views, bit for bit. Anything less is a lottery (measured on a 2-core
# AVX-512 Xeon, torch 2.14.1, the configs of _config, 2026-12-03; "x%" is the worst tensor's
# |delta_2 - delta_1| / |delta_1|, see _training_differences):
#
# * The training is not a smooth function of its inputs at the float32 scale: ReLUs. In one
#   process in float64 (at 32 px), views perturbed by a relative 1e-8 move the weights linearly,
#   by at most 4.5e-6 of their change (a gain of ~400); perturbed by 6e-8 (a float32 ulp) in 4% of
#   the values, by 2e-6, 5e-4 or 9%, depending on which values. Of the 18M ReLU inputs of a
#   step, 0, 0, 0 and 2 changed sign in the 4 steps of the first case, 2, 374, 27265 and 146078
#   in the last: a flip changes a gradient by a finite amount, and the next steps spread it.
# * float32 arithmetic rounds differently in 2 processes than in 1 (half-batch convolutions,
#   all-reduced sums): on the same views, 2 processes ended 3.9% (BYOL) and 12% (SimCLR) away
#   from 1 (and 13.6%, BYOL at 32 px on the library's views: the failure that led here). A
#   tolerance that holds for that holds for a real bug too: SimCLR without its gathered
#   negatives moves the median tensor by 25%.
# * float64 on the library's views is no better a bet: a shard's views equal the whole batch's
#   rows only to float32 rounding (tests/test_augment.py), 1 ulp in ~1% of the values on that
#   Xeon, and 2 processes ended 1.8e-4 (BYOL) and 5.3% (SimCLR) away.
# * float64 on the same views: 6e-13 (BYOL), 4e-13 (SimCLR).
#
# Hence _RowBlockFloat64Augment: the 1-process run augments its batch as the 2 row blocks the 2
# processes augment (each call draws the parameters of the whole global batch: the same
# computations, bit for bit) and casts the views to float64, where the model trains
# (torch.set_default_dtype). The shard augmentation itself is tested against the whole batch in
# tests/test_augment.py; here the views are an input, the same for both runs.

#: The processes of the torchrun runs.
WORLD = 2
#: ``|delta_2 - delta_1| <= TRAINING_RTOL * |delta_1| + TRAINING_ATOL`` per tensor, see
#: :func:`_training_differences` for the derivation.
TRAINING_RTOL, TRAINING_ATOL = 1e-6, 1e-12


class _RowBlockFloat64Augment(MultiViewAugment):
    """The library's augmentation applied to blocks of ``total / WORLD`` rows (one process's
    shard), its views concatenated and cast to float64.

    A process of the 2-process run holds one block: one call, exactly the library's. The
    1-process run holds all blocks and augments each from the generator state the call started
    from (every call draws the parameters of the whole batch, so the generator ends where a
    single call leaves it): the views are those of the 2 processes, bit for bit.
    """

    def forward(self, images, generator=None, rows=None, total=None):  # type: ignore[override]
        n = images.shape[0]
        start = 0 if rows is None else rows[0]
        total = n if total is None else total
        block = total // WORLD
        if generator is None or start % block or n % block:
            raise ValueError(f"rows {rows} of {total} are not whole blocks of {block}, or no generator")
        state = generator.get_state()
        blocks = []
        for offset in range(0, n, block):
            generator.set_state(state)
            rows_ = (start + offset, start + offset + block)
            blocks.append(super().forward(images[offset : offset + block], generator, rows=rows_, total=total))
        return [torch.cat(views).to(torch.float64) for views in zip(*blocks)]


def _float64_features(*args, **kwargs) -> torch.Tensor:
    """:func:`or_core.evaluate.extract_features` in float64 (it returns float32; the linear
    probe's classifier is built in the default dtype, float64 here)."""
    return extract_features(*args, **kwargs).to(torch.float64)


def _use_float64_training(patch: Callable[[object, str, object], None] = setattr) -> None:
    """Make :func:`or_core.train.pretrain` build and train its model in float64: float64 as the
    default dtype, :class:`_RowBlockFloat64Augment` as its augmentation, float64 features for
    its evaluation (the two places where the library hands float32 to the model)."""
    torch.set_default_dtype(torch.float64)
    patch(training_run_module, "MultiViewAugment", _RowBlockFloat64Augment)
    patch(train_module, "extract_features", _float64_features)  # the probe batch of every epoch
    patch(evaluate_module, "extract_features", _float64_features)  # the final evaluation


@pytest.fixture
def float64_training(monkeypatch: pytest.MonkeyPatch):
    """:func:`_use_float64_training` in this process, with one thread (as a torchrun worker,
    ``OMP_NUM_THREADS=1``: faster on a busy CPU; in float64 the thread count does not matter)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    _use_float64_training(monkeypatch.setattr)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def _config(data_root: Path, method: str) -> PretrainConfig:
    """4 steps of a narrow ResNet-18 on 256 real CIFAR-10 images at 16 px (a quarter of the float64
    convolutions' work at 32 px), global batch 64."""
    return PretrainConfig(
        method=method, regularizer="so", dataset="cifar10", data_root=str(data_root), width=0.125,
        subset=256, image_size=16, epochs=1, batch_size=64, eval_train_subset=200, eval_test_subset=100,
        linear_epochs=1, knn_k=20, profile="test", method_kwargs={"proj_hidden_dim": 64, "proj_output_dim": 32},
    )


def _initial_state(cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    """The method state every run of ``cfg`` starts from."""
    torch.manual_seed(0)
    with torch.no_grad():
        return build_run(cfg).method.state_dict()


def _training_differences(initial: dict[str, torch.Tensor], one: Path, two: Path) -> tuple[float, list[str]]:
    """How far the final method state of run ``two`` is from that of run ``one`` (both started
    from ``initial``), in units of the bound: ``(worst ratio, lines of the tensors above 1)``.

    Every floating tensor (online and EMA networks, batch-norm running statistics) is compared
    as its change from the initial weights, ``delta``: the ratio is
    ``|delta_2 - delta_1| / (TRAINING_RTOL |delta_1| + TRAINING_ATOL)`` (norms per tensor).
    Integer tensors (batch counts) must be equal.

    The bound, for float64 runs on the same views (see above): the runs differ only in the order
    of float64 sums (gradients all-reduced, batch-norm sums added across processes, convolutions
    on half batches). A sum of n terms in another order is off by at most ~n u of its terms'
    magnitude (u = 1.1e-16), n up to ~3e4 here (conv1's weight gradient sums 2 x 64 x 16 x 16
    products): ~4e-12 relative per step at worst; amplified ~400 times by the 4 steps (above),
    ``delta`` agrees to ~1.5e-9 at worst; measured: 6e-13. A ReLU flip needs an input that close
    to zero: of a run's ~2e7 ReLU inputs, ~1e-4 expected flips at the worst, ~1e-7 at the measured
    size. ``TRAINING_RTOL`` = 1e-6 is ~700 times the worst case. A real bug moves a tensor by the
    order of its change (the negative controls, median tensor: 95% without the gradient
    all-reduce, 25% for SimCLR without gathered negatives: over 1e5 times the bound).
    ``TRAINING_ATOL`` = 1e-12 covers tensors that do not move (a bias before batch norm has a zero
    gradient: its change is rounding, ~1e-16), and is ~1e4 float64 ulps of any weight here.
    """
    state1 = torch.load(one / "checkpoint.pt", weights_only=False)["method"]
    state2 = torch.load(two / "checkpoint.pt", weights_only=False)["method"]
    assert state1.keys() == state2.keys()
    worst, off = 0.0, []
    for key, value in state1.items():
        if not value.is_floating_point():
            assert torch.equal(value, state2[key]), key
            continue
        assert value.dtype == state2[key].dtype == initial[key].dtype == torch.float64, key
        change = (value - initial[key]).norm().item()
        error = (state2[key] - value).norm().item()
        ratio = error / (TRAINING_RTOL * change + TRAINING_ATOL)
        worst = max(worst, ratio)
        if ratio > 1:
            off.append(f"{key}: |difference| {error:.3g}, |change| {change:.3g}")
    return worst, off


def _assert_same_training(initial: dict[str, torch.Tensor], one: Path, two: Path) -> None:
    """The 2-process run ``two`` trained as the 1-process run ``one``: every tensor within the
    bound of :func:`_training_differences`, and the same logged losses.

    The losses of metrics.jsonl are float32 (``optimization_step`` returns them so), the epoch
    mean of 4 steps; each process rounds its own loss, which the processes then average: a step's
    value is off by at most ~2 float32 ulps of the loss (2.4e-7 relative), from float64 losses
    that agree to ~1e-12. Hence ``rel=1e-6``.
    """
    _, off = _training_differences(initial, one, two)
    assert not off, "\n".join(off)
    m1 = torch.load(one / "checkpoint.pt", weights_only=False)["history"][-1]
    m2 = torch.load(two / "checkpoint.pt", weights_only=False)["history"][-1]
    assert m1["step"] == m2["step"] == 4
    assert m2["ssl_loss"] == pytest.approx(m1["ssl_loss"], rel=1e-6)
    assert m2["or_term"] == pytest.approx(m1["or_term"], rel=1e-6)


def _assert_caught(initial: dict[str, torch.Tensor], one: Path, broken: Path) -> float:
    """The negative control: a 2-process run with a synchronization missing (``broken``) is far
    outside the bound of :func:`_training_differences`; returns its worst ratio."""
    worst, off = _training_differences(initial, one, broken)
    assert worst > 1e3 and off, f"a run without synchronization is only {worst:.3g} times the bound away"
    return worst


def _torchrun(
    cfg: PretrainConfig, out: Path, *extra: str, harness: str | None = "float64",
    then: tuple[str, PretrainConfig, Path] | None = None,
) -> None:
    """``torchrun --standalone --nproc_per_node 2`` of ``pretrain`` of ``cfg`` into ``out``.

    ``harness=None`` runs ``-m or_core pretrain`` as it is. Otherwise this file is the entry point
    (see its end), with one of :data:`HARNESSES`; ``then``, a ``(harness, config, out)``, is a
    second run by the same processes after the first (which saves starting torchrun again).
    """
    # PYTHONPATH: the processes import the or_core of this checkout, as the tests do.
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    env.pop("WORLD_SIZE", None)

    def job(job_cfg: PretrainConfig, job_out: Path, *job_extra: str) -> list[str]:
        config_file = job_out.parent / f"{job_out.name}.yaml"
        config_file.write_text(yaml.safe_dump(job_cfg.to_dict()))
        return ["pretrain", "--config", str(config_file), "--out", str(job_out), "--no-progress", *job_extra]

    if harness is None:
        assert then is None, "a second run needs a harness"
        entry = ["-m", "or_core", *job(cfg, out, *extra)]
    else:
        entry = [str(Path(__file__).resolve()), harness, *job(cfg, out, *extra)]
        if then is not None:
            entry += ["+", then[0], *job(then[1], then[2])]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), *entry],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("method", ["byol", "simclr"])  # simclr: gather_distributed negatives
def test_two_processes_match_one_process_with_the_same_global_batch(
    method: str, cifar10_dir: Path, tmp_path: Path, float64_training: None
) -> None:
    """Within the float64 bound of :func:`_training_differences`; the negative control, run by the
    same torchrun processes after it, is far outside: BYOL without the gradient all-reduce,
    SimCLR without ``gather_distributed`` (each process's own negatives only)."""
    cfg = _config(cifar10_dir.parent, method)
    # Decode the subset first: building the cache draws from the global RNG (decoding workers),
    # which would change the initial weights of whichever run built it.
    load_split(cfg.dataset, "train", cfg.data_root, cfg.image_size, cfg.subset, cfg.seed)
    load_split(cfg.dataset, "test", cfg.data_root, cfg.image_size, 512, cfg.seed)

    if method == "byol":
        control = ("float64-without-gradient-sync", cfg, tmp_path / "broken")
    else:
        control = ("float64", dataclasses.replace(cfg, method_kwargs={**cfg.method_kwargs, "gather_distributed": False}), tmp_path / "broken")

    pretrain(cfg, tmp_path / "one", show_progress=False)
    _torchrun(cfg, tmp_path / "two", then=control)
    initial = _initial_state(cfg)
    _assert_same_training(initial, tmp_path / "one", tmp_path / "two")
    _assert_caught(initial, tmp_path / "one", tmp_path / "broken")
    two = tmp_path / "two"
    assert {p.name for p in two.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"}
    assert yaml.safe_load((two / "config.yaml").read_text()) == cfg.to_dict()
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 1


def test_two_process_run_resumes_bit_identically(cifar10_dir: Path, tmp_path: Path) -> None:
    """torchrun with 2 processes, stopped after epoch 1 and resumed, ends where the same 2-process
    run without a stop ends: every tensor of the final state equal, bit for bit (the same
    computation replayed, float32, through ``python -m or_core`` as it is)."""
    cfg = _config(cifar10_dir.parent, "byol")
    cfg.epochs, cfg.subset = 2, 128
    _torchrun(cfg, tmp_path / "straight", harness=None)
    _torchrun(cfg, tmp_path / "resumed", "--stop-after-epochs", "1", harness=None)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "resumed" / "summary.json").exists()
    _torchrun(cfg, tmp_path / "resumed", harness=None)
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


def test_two_streaming_processes_match_one_process_with_the_same_global_batch(
    cifar10_dir: Path, tmp_path: Path, float64_training: None
) -> None:
    """``stream: true`` under torchrun: each process's DataLoader decodes only its half of every
    global batch (JPEG files) and augments it with the parameters drawn for the whole batch.

    In float64 (see above) the run follows the single-process streamed run within the bound of
    :func:`_training_differences` (whose negative controls are in the resident test above), and it
    is bit-identical to the 2-process run on the same images held resident: the same processes,
    shapes and threads, so the same computation, on the same decoded images. The folder holds the
    256 CIFAR-10 images of the resident test above, in the same order.
    """
    resident = _config(cifar10_dir.parent, "byol")
    subset = load_split(resident.dataset, "train", resident.data_root, resident.image_size, resident.subset, resident.seed)
    folder = _image_folder(cifar10_dir, subset.files, tmp_path / "cifar10-256")
    _, files, _ = scan_image_folder(folder / "train")
    assert [f.relative_to(folder / "train").as_posix() for f in files] == subset.files  # the same order
    cfg = dataclasses.replace(
        resident, dataset=str(folder), data_root=str(tmp_path), subset=None, stream=True,
        num_workers=1, eval_train_subset=None, eval_test_subset=None,
    )
    # Decode the probe batch and the resident copy first (workers that draw from the global RNG).
    load_split_at_most(cfg.dataset, "test", cfg.data_root, cfg.image_size, 512, cfg.seed)
    load_split(cfg.dataset, "train", cfg.data_root, cfg.image_size)
    pretrain(cfg, tmp_path / "one", show_progress=False)
    _torchrun(cfg, tmp_path / "two", then=("float64", dataclasses.replace(cfg, stream=False), tmp_path / "two_resident"))
    _assert_same_training(_initial_state(cfg), tmp_path / "one", tmp_path / "two")
    streamed = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["method"]
    held = torch.load(tmp_path / "two_resident" / "checkpoint.pt", weights_only=False)["method"]
    assert streamed.keys() == held.keys() and all(torch.equal(streamed[k], held[k]) for k in streamed)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["train_images"] == 256 and summary["batch_size"] == 64


def _without_gradient_sync(method: nn.Module, device: torch.device) -> nn.Module:
    """:func:`or_core.distributed.wrap_method` that forgot DDP: batch norm is synchronized, but
    every process steps with the gradient of its own shard."""
    return convert_cpu_sync_batchnorm(method)


#: The entry point's harnesses: float64 training (:func:`_use_float64_training`), and the same
#: without the gradient all-reduce (a negative control).
HARNESSES: dict[str, Callable[[nn.Module, torch.device], nn.Module] | None] = {
    "float64": None,
    "float64-without-gradient-sync": _without_gradient_sync,
}


if __name__ == "__main__":
    # _torchrun's entry point: ``test_distributed.py HARNESS pretrain ARGS [+ HARNESS pretrain ARGS]``,
    # the runs one after the other in one process group (pretrain neither creates nor destroys it).
    from or_core.__main__ import main

    jobs: list[list[str]] = [[]]
    for arg in sys.argv[1:]:
        if arg == "+":
            jobs.append([])
        else:
            jobs[-1].append(arg)
    _use_float64_training()
    wrap_method = distributed.wrap_method
    distributed.init_process_group(torch.device("cpu"))
    try:
        for harness, *argv in jobs:
            distributed.wrap_method = HARNESSES[harness] or wrap_method
            if main(argv) != 0:
                sys.exit(1)
    finally:
        distributed.destroy_process_group()
